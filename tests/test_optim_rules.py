"""Each compensation rule of lossscale.optim against two independent checks, so that a sign or order error
in any one update path fails more than one test:

1. a reference written here, tensor by tensor, from the rule's formula (the module docstrings of
   lossscale.optim.adamw, .sgd and .compensation), compared bit for bit; it shares no code with the library
   beyond ``quantize`` for stochastic rounding (itself checked against torch and ml_dtypes elsewhere);
2. an FP64 control run of the same optimizer, which the compensated weight (``w + c`` for Kahan, the mean
   over elements for stochastic rounding) must track within the bounds below.

| check                                  | bound                                                    |
|----------------------------------------|----------------------------------------------------------|
| reference path                         | bit-exact (same operations, same order, same dtype)      |
| Kahan, FP64 control, ``w + c``         | 0.1 BF16 spacing at the weight                           |
|   only the buffer's own rounding (2^-8 of it) and, for BF16 states, the states' rounding accumulate |
| stochastic rounding, FP64 control      | mean error within 4 standard errors, and far below the movement |
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import lossscale
from lossscale.optim import SGD, Adam, AdamW

BF16 = torch.bfloat16
SHAPES = [(33, 17), (300,), (5,)]
LR, WD, BETAS, EPS = 1e-3, 0.1, (0.9, 0.99), 1e-8


def _bf16(shape: tuple[int, ...], gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(BF16)


def _problem(seed: int, steps: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    init = [_bf16(s, gen) for s in SHAPES]
    grads = [[_bf16(s, gen, 0.1) for s in SHAPES] for _ in range(steps)]
    return init, grads


def _run_ours(factory: Any, init: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> tuple[list[Any], Any]:
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = factory(params)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    return params, opt


# ------------------------------------------------------------------------------------------------------
# References, tensor by tensor


def _bias_terms(t: int) -> tuple[float, float]:
    b1, b2 = BETAS
    bc2 = (1 - b2 ** float(t)) ** 0.5
    return -(LR / (1 - b1 ** float(t))) * bc2, EPS * bc2


def _ref_adamw_kahan_all_bf16(
    init: list[torch.Tensor], grads: list[list[torch.Tensor]], *, decoupled: bool, maximize: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Kahan AdamW with every operation in BF16 (BF16 weights, BF16 states)::

        g = -grad if maximize; g += wd * w (Adam's L2)
        m = lerp(m, g, 1 - b1); v = b2 * v + (1 - b2) * g^2
        c = c + scale * m / (sqrt(v) + eps_term);  c -= lr * wd * w (AdamW)
        s = w + c;  c = c + (w - s);  w = s
    """
    out = []
    b1, b2 = BETAS
    for i, w0 in enumerate(init):
        w, c = w0.clone(), torch.zeros_like(w0)
        m, v = torch.zeros_like(w0), torch.zeros_like(w0)
        for t, gs in enumerate(grads, start=1):
            g = -gs[i] if maximize else gs[i]
            if not decoupled:
                g = g.add(w, alpha=WD)  # one rounding, as every BF16 op
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            scale, eps_term = _bias_terms(t)
            c.addcdiv_(m, v.sqrt() + eps_term, value=scale)
            if decoupled:
                c.add_(w, alpha=-LR * WD)
            s = w + c
            c.add_(w - s)
            w = s
        out.append((w, c))
    return out


def _ref_adamw_fp32_accumulated(
    init: list[torch.Tensor], grads: list[list[torch.Tensor]], *, rule: str, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """AdamW (FP32 states) on BF16 weights, the update accumulated in FP32::

        m, v in FP32;  acc = (1 - lr * wd) * w + c + scale * m / (sqrt(v) + eps_term)
        kahan: w = round(acc); c = round(acc - w)      stochastic: w = round_stochastic(acc)
    """
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    b1, b2 = BETAS
    gen = torch.Generator().manual_seed(seed)
    states = [
        (w0.clone(), torch.zeros_like(w0), torch.zeros(w0.shape), torch.zeros(w0.shape)) for w0 in init
    ]
    for t, gs in enumerate(grads, start=1):
        for i, (w, c, m, v) in enumerate(states):  # tensor by tensor in order: the generator's draw order
            g = gs[i].float()
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            scale, eps_term = _bias_terms(t)
            acc = c.float() + w.float() * (1 - LR * WD) if rule == "kahan" else w.float() * (1 - LR * WD)
            acc.addcdiv_(m, v.sqrt() + eps_term, value=scale)
            if rule == "kahan":
                w.copy_(acc.to(BF16))
                c.copy_((acc - w.float()).to(BF16))
            else:
                w.copy_(lossscale.quantize(acc, "bf16", rounding="stochastic", generator=gen).to(BF16))
    for w, c, _, _ in states:
        out.append((w, c if rule == "kahan" else None))
    return out


def _ref_sgd_fp32_accumulated(
    init: list[torch.Tensor], grads: list[list[torch.Tensor]], *, momentum: float, nesterov: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Kahan SGD on BF16 weights (FP32 momentum)::

        g = grad + wd * w;  b = g (first step) else momentum * b + g
        acc = w + c - lr * g - lr * momentum * b (Nesterov) or w + c - lr * b
        w = round(acc);  c = round(acc - w)
    """
    out = []
    for i, w0 in enumerate(init):
        w, c, b = w0.clone(), torch.zeros_like(w0), None
        for gs in grads:
            g = gs[i].float() + WD * w.float()
            b = g.clone() if b is None else b * momentum + g
            acc = c.float() + w.float()
            if nesterov:  # - lr * (g + momentum * b), as two FP32 additions (the library's order)
                acc = acc.add(g, alpha=-LR).add(b, alpha=-LR * momentum)
            else:
                acc = acc.add(b, alpha=-LR)
            w = acc.to(BF16)
            c = (acc - w.float()).to(BF16)
        out.append((w, c))
    return out


# The bitwise comparisons: each path against the reference of its rule.


@pytest.mark.parametrize("decoupled, maximize", [(True, False), (False, True)], ids=["adamw", "adam-l2-maximize"])
def test_all_bf16_kahan_path_equals_reference_bitwise(decoupled: bool, maximize: bool) -> None:
    init, grads = _problem(1, 25)
    cls = AdamW if decoupled else Adam
    params, opt = _run_ours(
        lambda p: cls(p, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, maximize=maximize, state_dtype="bf16"),
        init, grads,
    )
    ref = _ref_adamw_kahan_all_bf16(init, grads, decoupled=decoupled, maximize=maximize)
    for p, (w, c) in zip(params, ref, strict=True):
        assert torch.equal(p.detach(), w)
        assert torch.equal(opt.state[p]["kahan_comp"], c)


@pytest.mark.parametrize("rule", ["kahan", "stochastic"])
def test_fp32_accumulated_paths_equal_reference_bitwise(rule: str) -> None:
    init, grads = _problem(2, 25)
    params, opt = _run_ours(
        lambda p: AdamW(p, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, compensation=rule, seed=7), init, grads
    )
    ref = _ref_adamw_fp32_accumulated(init, grads, rule=rule, seed=7)
    for p, (w, c) in zip(params, ref, strict=True):
        assert torch.equal(p.detach(), w)
        if c is not None:
            assert torch.equal(opt.state[p]["kahan_comp"], c)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_kahan_path_equals_reference_bitwise(nesterov: bool) -> None:
    init, grads = _problem(3, 25)
    params, opt = _run_ours(lambda p: SGD(p, lr=LR, momentum=0.9, nesterov=nesterov, weight_decay=WD), init, grads)
    ref = _ref_sgd_fp32_accumulated(init, grads, momentum=0.9, nesterov=nesterov)
    for p, (w, c) in zip(params, ref, strict=True):
        assert torch.equal(p.detach(), w)
        assert torch.equal(opt.state[p]["kahan_comp"], c)


# ------------------------------------------------------------------------------------------------------
# FP64 control runs


def _fp64_adamw(
    init: list[torch.Tensor], grads: list[list[torch.Tensor]], *, bf16_states: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """AdamW in FP64 (the states rounded to BF16 after each update when ``bf16_states``, as ours keeps them):
    each weight and the path length ``sum_t |w_t - w_(t-1)|`` of each element."""
    b1, b2 = BETAS
    out = []
    for i, w0 in enumerate(init):
        w = w0.double()
        path = torch.zeros_like(w)
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        for t, gs in enumerate(grads, start=1):
            g = gs[i].double()
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            if bf16_states:
                m, v = m.to(BF16).double(), v.to(BF16).double()
            u = -(LR / (1 - b1**t)) * m / (v.sqrt() / math.sqrt(1 - b2**t) + EPS)
            new = w * (1 - LR * WD) + u
            path += (new - w).abs()
            w = new
        out.append((w, path))
    return out


def _spacing(w: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(2.0**-100))) - 7)  # BF16 spacing at w


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_kahan_weight_plus_buffer_tracks_fp64(state_dtype: str) -> None:
    init, grads = _problem(4, 60)
    params, opt = _run_ours(
        lambda p: AdamW(p, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, state_dtype=state_dtype), init, grads
    )
    ref = _fp64_adamw(init, grads, bf16_states=state_dtype == "bf16")
    for p, (w64, path), w0 in zip(params, ref, init, strict=True):
        total = p.detach().double() + opt.state[p]["kahan_comp"].double()
        # Kahan: w + c is the exact sum up to the buffer's roundings (0.1 spacing) plus the rounding of each
        # step's update itself (FP32 states: 2^-24 of it; BF16 states: the update is computed in BF16
        # operations, a few 2^-9 of it: 2^-6 of the path length covers both).
        bound = 0.1 * _spacing(w64) + 2.0**-6 * path
        assert bool(((total - w64).abs() <= bound).all())
        # The updates are real: the weights moved by many spacings in total (not a vacuous bound).
        assert float(((w64 - w0.double()).abs() / _spacing(w64)).mean()) > 1.0


def test_kahan_negative_control_without_buffer_is_far_from_fp64() -> None:
    # The same check fails for compensation="none": rounding to nearest loses the small updates.
    init, grads = _problem(4, 60)
    params, _ = _run_ours(
        lambda p: AdamW(p, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, compensation="none"), init, grads
    )
    ref = _fp64_adamw(init, grads, bf16_states=False)
    outside = 0
    for p, (w64, path) in zip(params, ref, strict=True):
        outside += int(((p.detach().double() - w64).abs() > 0.1 * _spacing(w64) + 2.0**-6 * path).sum())
    assert outside > 100


def test_stochastic_rounding_tracks_fp64_on_average() -> None:
    # Constant gradients keep the FP64 trajectory independent of the rounding; SR's error must be zero-mean.
    gen = torch.Generator().manual_seed(5)
    n = 20000
    w0 = (1.0 + torch.rand(n, generator=gen)).to(BF16)  # spacing 2^-7 in [1, 2): lr-sized updates round away
    g = (0.5 + torch.rand(n, generator=gen)).to(BF16)
    steps = 40
    p = torch.nn.Parameter(w0.clone())
    opt = AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, compensation="stochastic", seed=3)
    for _ in range(steps):
        p.grad = g.clone()
        opt.step()
    ((w64, _),) = _fp64_adamw([w0], [[g]] * steps, bf16_states=False)
    diff = p.detach().double() - w64
    stderr = float(diff.std()) / math.sqrt(n)
    assert abs(float(diff.mean())) <= 4 * stderr
    moved = float((w0.double() - w64).mean())
    assert moved > 50 * stderr
