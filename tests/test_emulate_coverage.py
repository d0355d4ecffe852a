"""Coverage of CUDA autocast's lower-precision op list, checked by an aten-level audit written here.

The audit (:class:`GemmAudit`) is a ``TorchDispatchMode`` independent of the emulation's bookkeeping: it
records every GEMM-class aten call (forward and backward) and checks that each floating operand holds values
of the recipe's format (FP8: up to a power-of-two scale of the tensor). Per op, the emulated results are
compared with an independent oracle: native CPU autocast where it lowers the op, else FP64 on rounded
operands, rounded to BF16.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import lossscale
from lossscale.emulate import UnemulatedOpError

# GEMM-class aten ops and the positions of their GEMM operands (the rest of their floating arguments are
# addends / bias, which enter the epilogue in the output format).
AUDITED: dict[str, tuple[int, ...]] = {
    "mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2), "dot": (0, 1),
    "vdot": (0, 1), "mv": (0, 1), "addmv": (1, 2), "addr": (1, 2), "_trilinear": (0, 1, 2),
    "convolution": (0, 1), "convolution_backward": (0, 1, 2), "mkldnn_rnn_layer": (0, 1, 2, 3, 4),
    "_scaled_dot_product_flash_attention_for_cpu": (0, 1, 2),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (0, 1, 2, 3),
    "_prelu_kernel": (0, 1), "_prelu_kernel_backward": (0, 1, 2),
}


def _representable(x: torch.Tensor, dtype: torch.dtype, scaled: bool) -> bool:
    """Whether x's finite values are values of ``dtype`` (times one power of two when ``scaled``)."""
    x = x.detach().float()
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return True
    ks = [0]
    if scaled:
        amax = x.abs().max().item()
        if amax > 0:
            k = math.floor(math.log2(torch.finfo(dtype).max / amax))
            ks = [k - 1, k, k + 1]
    for k in ks:
        y = x * 2.0**k
        if torch.equal(y.to(dtype).float(), y):
            return True
    return False


# The formats GEMM operands may hold, per recipe (dtype, scaled).
OPERAND_FORMATS = {
    "bf16-mixed": [(torch.bfloat16, False)],
    "fp16-mixed": [(torch.float16, False)],
    "fp8-hybrid": [(torch.float8_e4m3fn, True), (torch.float8_e5m2, False)],
}


class GemmAudit(TorchDispatchMode):
    """Records GEMM-class aten calls on FP32 tensors and the operands that are not in the recipe's format."""

    def __init__(self, recipe: str) -> None:
        super().__init__()
        self.formats = OPERAND_FORMATS[recipe]
        self.calls: list[str] = []
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in AUDITED:
            self.calls.append(name)
            for i in AUDITED[name]:
                a = args[i] if i < len(args) else None
                if isinstance(a, torch.Tensor) and a.dtype == torch.float32:
                    if not any(_representable(a, d, s) for d, s in self.formats):
                        self.bad.append(f"{name} arg {i} {tuple(a.shape)}")
        return func(*args, **kwargs)


def audited_step(model: Callable[[], torch.Tensor], recipe: str, params: list[torch.Tensor]) -> GemmAudit:
    """Forward under emulation, backward outside the context, all under the audit."""
    audit = GemmAudit(recipe)
    with audit:
        with lossscale.autocast(recipe, emulate=True):
            out = model()
        out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in params)
    return audit


# ----------------------------------------------------------------------------------------------------------
# Models written here (no downloads), each using ops of CUDA autocast's lower-precision list.


class XLNetAttention(nn.Module):
    """XLNet's relative attention core: projections and scores by einsum."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        g = torch.Generator().manual_seed(0)
        self.q = nn.Parameter(torch.randn(d, heads, self.dh, generator=g) * 0.1)
        self.k = nn.Parameter(torch.randn(d, heads, self.dh, generator=g) * 0.1)
        self.v = nn.Parameter(torch.randn(d, heads, self.dh, generator=g) * 0.1)
        self.o = nn.Parameter(torch.randn(d, heads, self.dh, generator=g) * 0.1)
        self.r = nn.Parameter(torch.randn(d, heads, self.dh, generator=g) * 0.1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x: (i, b, d)
        q = torch.einsum("ibh,hnd->ibnd", x, self.q)
        k = torch.einsum("ibh,hnd->ibnd", x, self.k)
        v = torch.einsum("ibh,hnd->ibnd", x, self.v)
        r = torch.einsum("ibh,hnd->ibnd", pos, self.r)
        ac = torch.einsum("ibnd,jbnd->bnij", q, k)
        bd = torch.einsum("ibnd,jbnd->bnij", q, r)
        p = torch.softmax((ac + bd) / self.dh**0.5, dim=-1)
        a = torch.einsum("bnij,jbnd->ibnd", p, v)
        return torch.einsum("ibnd,hnd->ibh", a, self.o)


class GPTBlock(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, einsum: bool = False) -> None:
        super().__init__()
        self.h, self.einsum = heads, einsum
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        if self.einsum:
            s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d // self.h)
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            a = torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


def _models() -> dict[str, tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x_seq = torch.randn(6, 2, 32, generator=g)
    pos = torch.randn(6, 2, 32, generator=g)
    img = torch.randn(2, 8, 5, 5, generator=g)
    vec = torch.randn(4, 16, generator=g)
    tok = torch.randn(2, 8, 32, generator=g)
    decoder = nn.Sequential(
        nn.ConvTranspose2d(8, 6, 3, stride=2), nn.ReLU(), nn.ConvTranspose2d(6, 3, 3, padding=1),
        nn.Flatten(), nn.Unflatten(1, (3, 11, 11)),
    )
    prelu = nn.Sequential(nn.Linear(16, 24), nn.PReLU(24), nn.Linear(24, 8), nn.PReLU())
    bil = nn.Bilinear(16, 16, 12)
    conv1 = nn.Sequential(nn.Conv1d(8, 6, 3), nn.ConvTranspose1d(6, 4, 3))
    conv3 = nn.Sequential(nn.Conv3d(2, 3, 2), nn.ConvTranspose3d(3, 2, 2))
    cells = nn.ModuleList([nn.LSTMCell(16, 12), nn.GRUCell(12, 12), nn.RNNCell(12, 12)])
    lstm = nn.LSTM(16, 12, batch_first=True)
    return {
        "xlnet_einsum_attention": (XLNetAttention(), lambda m: m(x_seq, pos)),
        "transposed_conv_decoder": (decoder, lambda m: m(img)),
        "prelu_net": (prelu, lambda m: m(vec)),
        "bilinear": (bil, lambda m: m(vec, vec.flip(0))),
        "gpt_block": (GPTBlock(), lambda m: m(tok)),
        "gpt_block_einsum": (GPTBlock(einsum=True), lambda m: m(tok)),
        "conv1d_3d": (
            nn.ModuleList([conv1, conv3]),
            lambda m: m[0](img.flatten(2)[..., :10]).sum() + m[1](img[:, :2, None, :4, :4].expand(2, 2, 3, 4, 4)).sum(),
        ),
        "cells": (cells, lambda m: m[2](m[1](m[0](vec)[0]))),
        "lstm": (lstm, lambda m: m(vec.view(2, 2, 16))[0]),
    }


MODELS = _models()
RECIPES = ["bf16-mixed", "fp16-mixed", "fp8-hybrid"]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_audit_models(name: str, recipe: str) -> None:
    model, fwd = MODELS[name]
    model.zero_grad()
    audit = audited_step(lambda: fwd(model), recipe, list(model.parameters()))
    assert audit.calls, "the audit saw no GEMM"
    assert not audit.bad, f"{name}/{recipe}: GEMM operands not in the format: {audit.bad[:5]}"


FUNCTIONAL: dict[str, tuple[Callable[..., torch.Tensor], tuple[tuple[int, ...], ...]]] = {
    "einsum3": (lambda a, b, c: torch.einsum("ij,jk,kl->il", a, b, c), ((5, 6), (6, 7), (7, 3))),
    "tensordot": (lambda a, b: torch.tensordot(a, b, dims=([1, 2], [0, 1])), ((3, 4, 5), (4, 5, 6))),
    "inner": (lambda a, b: torch.inner(a, b), ((3, 8), (5, 8))),
    "chain_matmul": (lambda a, b, c: torch.chain_matmul(a, b, c), ((5, 6), (6, 7), (7, 3))),
    "multi_dot": (lambda a, b, c, d: torch.linalg.multi_dot([a, b, c, d]), ((5, 6), (6, 7), (7, 3), (3, 4))),
    "mv": (lambda a, v: torch.mv(a, v), ((5, 8), (8,))),
    "addmv": (lambda c, a, v: torch.addmv(c, a, v), ((5,), (5, 8), (8,))),
    "addr": (lambda c, u, v: torch.addr(c, u, v), ((5, 4), (5,), (4,))),
    "addbmm": (lambda c, a, b: torch.addbmm(c, a, b), ((5, 4), (3, 5, 6), (3, 6, 4))),
    "baddbmm": (lambda c, a, b: torch.baddbmm(c, a, b), ((3, 5, 4), (3, 5, 6), (3, 6, 4))),
    "addmm": (lambda c, a, b: torch.addmm(c, a, b), ((4,), (5, 6), (6, 4))),
    "bmm": (lambda a, b: a.bmm(b), ((3, 5, 6), (3, 6, 4))),
    "mm": (lambda a, b: a.mm(b), ((5, 6), (6, 4))),
    "matmul": (lambda a, b: a @ b, ((2, 5, 6), (6, 4))),
    "dot": (lambda a, b: torch.dot(a, b), ((8,), (8,))),
    "vdot": (lambda a, b: torch.vdot(a, b), ((8,), (8,))),
    "conv2d": (lambda x, w: F.conv2d(x, w, padding=1), ((2, 3, 5, 5), (4, 3, 3, 3))),
    "conv_transpose2d": (lambda x, w: F.conv_transpose2d(x, w, stride=2), ((2, 3, 5, 5), (3, 4, 3, 3))),
    "prelu": (lambda x, w: F.prelu(x, w), ((4, 3, 5), (3,))),
    "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), ((2, 6, 8), (2, 6, 8), (2, 6, 8))),
}


def _leaves(shapes: tuple[tuple[int, ...], ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_(True) for s in shapes]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_audit_functional(name: str, recipe: str) -> None:
    fn, shapes = FUNCTIONAL[name]
    leaves = _leaves(shapes)
    audit = audited_step(lambda: fn(*leaves), recipe, leaves)
    assert audit.calls
    assert not audit.bad, f"{name}/{recipe}: {audit.bad[:5]}"


def test_audit_fails_without_emulation() -> None:
    """Negative control: the same audit flags FP32 operands when the region is not emulated."""
    model, fwd = MODELS["xlnet_einsum_attention"]
    audit = GemmAudit("bf16-mixed")
    with audit:
        fwd(model).pow(2).mean().backward()
    assert len(audit.bad) > 10


# ----------------------------------------------------------------------------------------------------------
# Per op: emulated vs an independent oracle, within one BF16 ulp on >= 99.9% of elements.

WITHIN_1ULP = 0.999  # the bound; every op measures 100% here (same GEMM pieces, FP32 accumulation)


def _within_one_ulp(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    m = torch.maximum(a.abs(), b.abs()).clamp_min(2.0**-126)
    ulp = torch.exp2(torch.floor(torch.log2(m)) - 7)
    return ((a - b).abs() <= ulp).double().mean().item()


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().to(x.dtype)


def _emulated(fn: Callable[..., torch.Tensor], shapes: tuple[tuple[int, ...], ...], up: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
    leaves = _leaves(shapes)
    with lossscale.autocast("bf16-mixed", emulate=True):
        out = fn(*leaves)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)) if up is None else up
    out.backward(up)
    return out.detach(), [t.grad for t in leaves], up


def _native(fn: Callable[..., torch.Tensor], shapes: tuple[tuple[int, ...], ...], up: torch.Tensor):  # type: ignore[no-untyped-def]
    leaves = _leaves(shapes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*leaves)
    assert out.dtype == torch.bfloat16, "CPU autocast does not lower this op"
    out.float().backward(up)
    return out.float().detach(), [t.grad for t in leaves]


def _fp64_rounded(fn: Callable[..., torch.Tensor], shapes: tuple[tuple[int, ...], ...], up: torch.Tensor):  # type: ignore[no-untyped-def]
    """The op in FP64 on BF16-rounded operands (bias too), result and gradients rounded to BF16, the upstream
    gradient rounded to BF16 on entry (a single-GEMM op: no intermediate to round)."""
    leaves = [_bf16(t.detach()).double().requires_grad_(True) for t in _leaves(shapes)]
    out = fn(*leaves)
    out.backward(_bf16(up).double())
    return _bf16(out.detach()).float(), [_bf16(t.grad).float() for t in leaves]


NATIVE_LOWERED = ["einsum3", "tensordot", "inner", "chain_matmul", "multi_dot", "conv_transpose2d"]
# CPU autocast leaves these in FP32, or rounds partial sums where CUDA rounds once (addbmm: once per batch,
# where CUDA runs one GEMM over the batches; prelu: the weight gradient's sum, which CUDA accumulates in FP32
# and rounds once): the oracle is FP64 on rounded operands, rounded once.
FP64_ORACLE = ["mv", "addmv", "addr", "dot", "vdot", "addbmm", "prelu"]
BILINEAR: tuple[Callable[..., torch.Tensor], tuple[tuple[int, ...], ...]] = (
    lambda a, b, w, bias: F.bilinear(a, b, w, bias), ((6, 5), (6, 4), (3, 5, 4), (3,))
)


@pytest.mark.parametrize("name", NATIVE_LOWERED + FP64_ORACLE + ["bilinear"])
def test_op_within_one_ulp_of_oracle(name: str) -> None:
    fn, shapes = BILINEAR if name == "bilinear" else FUNCTIONAL[name]
    if name in ("einsum3", "chain_matmul", "multi_dot", "tensordot", "inner"):
        shapes = tuple(tuple(4 * d for d in s) for s in shapes)  # bigger: more elements to compare
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # chain_matmul's deprecation
        out, grads, up = _emulated(fn, shapes)
        oracle = _native if name in NATIVE_LOWERED else _fp64_rounded
        ref_out, ref_grads = oracle(fn, shapes, up)
        fp32_out = fn(*_leaves(shapes)).detach()
    assert torch.equal(_bf16(out), out), "emulated result is not BF16"
    fracs = [_within_one_ulp(out, ref_out)] + [_within_one_ulp(a, b) for a, b in zip(grads, ref_grads, strict=True)]
    assert min(fracs) >= WITHIN_1ULP, fracs
    # Negative control: without emulation the result holds FP32 values, which the BF16 check above rejects.
    assert not torch.equal(_bf16(fp32_out), fp32_out)


# ----------------------------------------------------------------------------------------------------------
# Autocast disabled inside an emulated region: FP32, exactly.


def test_autocast_disabled_region_is_fp32() -> None:
    x = torch.tensor([[1.0 + 2**-9]])
    w = torch.tensor([[1.0]])
    with lossscale.autocast("bf16-mixed", emulate=True):
        rounded = F.linear(x, w)
        with torch.autocast("cpu", enabled=False):
            exact = F.linear(x, w)
        again = F.linear(x, w)
    assert rounded.item() == 1.0 and again.item() == 1.0
    assert exact.item() == 1.0 + 2**-9  # the example: 1.00195 as in FP32, not 1.0


def test_autocast_disabled_region_forward_and_backward_equal_fp32() -> None:
    model, fwd = MODELS["gpt_block"]
    params = list(model.parameters())

    def grads(region: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        if region == "fp32":
            out = fwd(model)
        else:
            with lossscale.autocast("bf16-mixed", emulate=True), torch.autocast("cpu", enabled=False):
                out = fwd(model)
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in params]  # type: ignore[union-attr]

    out_f, g_f = grads("fp32")
    out_d, g_d = grads("disabled")
    assert torch.equal(out_f, out_d)
    assert all(torch.equal(a, b) for a, b in zip(g_f, g_d, strict=True))


# ----------------------------------------------------------------------------------------------------------
# Nothing silently FP32: an opaque torch.library op computing a GEMM.


@torch.library.custom_op("lossscale_test::fused_thing", mutates_args=())
def fused_thing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b)


@torch.library.custom_op("lossscale_test::opaque_scale", mutates_args=())
def opaque_scale(a: torch.Tensor) -> torch.Tensor:
    return a * 2.0


def test_strict_raises_on_fused_thing() -> None:
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with pytest.raises(UnemulatedOpError, match="lossscale_test::fused_thing.*mm"):
        with lossscale.autocast("bf16-mixed", emulate=True, strict=True):
            torch.ops.lossscale_test.fused_thing(a, b)


def test_fused_thing_warns_once_and_is_counted() -> None:
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    counters = lossscale.RoundingCounters()
    lossscale.emulate.mode._WARNED.discard("lossscale_test::fused_thing")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lossscale.autocast("bf16-mixed", emulate=True, counters=counters):
            y1 = torch.ops.lossscale_test.fused_thing(a, b)
            y2 = torch.ops.lossscale_test.fused_thing(a, b)
            z = torch.ops.lossscale_test.opaque_scale(a)  # no GEMM inside: silent, not counted
    ours = [w for w in caught if "fused_thing" in str(w.message)]
    assert len(ours) == 1 and "not emulated" in str(ours[0].message)
    assert counters.unemulated == {"lossscale_test::fused_thing": 2}
    assert torch.equal(y1, a @ b) and torch.equal(y2, a @ b) and torch.equal(z, a * 2)  # ran in FP32
    assert not any("opaque_scale" in str(w.message) for w in caught)


def test_strict_accepts_covered_ops() -> None:
    model, fwd = MODELS["gpt_block_einsum"]
    with lossscale.autocast("bf16-mixed", emulate=True, strict=True):
        fwd(model)


# ----------------------------------------------------------------------------------------------------------
# Issue 15 point 8: SDPA on an empty sequence returns what torch returns.


@pytest.mark.parametrize(("L", "S"), [(0, 4), (3, 0), (0, 0)])
def test_sdpa_empty_sequence(L: int, S: int) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, L, 8, generator=g, requires_grad=True)
    k = torch.randn(2, S, 8, generator=g, requires_grad=True)
    v = torch.randn(2, S, 5, generator=g, requires_grad=True)
    ref = F.scaled_dot_product_attention(q, k, v)
    with lossscale.autocast("bf16-mixed", emulate=True):
        out = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == ref.shape == (2, L, 5)
    assert torch.equal(out, ref)  # empty, or zeros when there are no keys
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_direct_aten_calls_are_emulated() -> None:
    leaves = _leaves(((5, 6), (6, 4), (4,)))
    audit = audited_step(lambda: torch.ops.aten.addmm(leaves[2], leaves[0], leaves[1]), "bf16-mixed", leaves)
    assert audit.calls and not audit.bad


# ----------------------------------------------------------------------------------------------------------
# Activation checkpointing: gradients bit-identical to the same emulation without checkpointing.


def _stack(island: bool = True) -> nn.Sequential:
    torch.manual_seed(3)
    blocks = [GPTBlock(), GPTBlock(einsum=True), XLNetLike(), FP32Island(), GPTBlock()]
    return nn.Sequential(*(b for b in blocks if island or not isinstance(b, FP32Island)))


class FP32Island(nn.Module):
    """A block with a region where the model turns autocast off (as transformers' rotary embeddings do)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            y = self.a(x)
        return x + self.b(torch.tanh(y))


class XLNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = XLNetAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, d) -> (b, t, d)
        y = x.transpose(0, 1)
        return x + self.att(y, y).transpose(0, 1)


def _ckpt_grads(model: nn.Sequential, how: str, recipe: str = "bf16-mixed") -> list[torch.Tensor]:
    model.zero_grad()
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with lossscale.autocast(recipe, emulate=True):
        if how == "none":
            y = model(x)
        elif how in ("reentrant", "non_reentrant"):
            y = x
            for block in model:
                y = checkpoint(block, y, use_reentrant=how == "reentrant")
        else:
            y = checkpoint_sequential(model, 2, x, use_reentrant=how == "sequential_reentrant")
    y.pow(2).mean().backward()  # outside the context, as training loops do
    return [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]  # type: ignore[union-attr]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("how", ["reentrant", "non_reentrant", "sequential", "sequential_reentrant"])
def test_checkpoint_gradients_bit_identical(how: str, recipe: str) -> None:
    model = _stack()
    ref = _ckpt_grads(model, "none", recipe)
    got = _ckpt_grads(model, how, recipe)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


@pytest.mark.parametrize("how", ["reentrant", "non_reentrant"])
def test_checkpoint_audit(how: str) -> None:
    model = _stack(island=False)  # the FP32 island's GEMMs are FP32 on purpose
    audit = GemmAudit("bf16-mixed")
    with audit:
        _ckpt_grads(model, how)
    assert audit.calls and not audit.bad, audit.bad[:5]


@pytest.mark.parametrize("how", ["reentrant", "non_reentrant"])
def test_checkpoint_negative_control(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the re-entry switched off the recomputation runs in FP32: the gradients differ (reentrant) or
    torch's checkpoint refuses the mismatching recomputation (non-reentrant)."""
    model = _stack()
    ref = _ckpt_grads(model, "none")
    monkeypatch.setattr(lossscale.emulate.mode, "_bind_checkpoint", lambda emu: None)
    if how == "reentrant":
        got = _ckpt_grads(model, how)
        assert sum(not torch.equal(a, b) for a, b in zip(ref, got, strict=True)) > len(ref) // 2
    else:
        with pytest.raises(torch.utils.checkpoint.CheckpointError):
            _ckpt_grads(model, how)


def test_transformers_gradient_checkpointing() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        with lossscale.autocast("bf16-mixed", emulate=True):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    got = grads()
    assert len(got) == len(ref) > 20
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


# ----------------------------------------------------------------------------------------------------------
# torch.compile: runs eagerly inside the emulation, with one warning; numbers equal eager emulation.


@pytest.mark.slow  # importing torch._dynamo and tracing take 30+ s on two shared cores
def test_compiled_module_runs_eagerly_with_one_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    compiled = torch.compile(model)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))

    def steps(m: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        for _ in range(20):
            with lossscale.autocast("bf16-mixed", emulate=True):
                y = m(x)
            y.sum().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]

    lossscale.emulate.mode._LOCAL.compile_warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y_c, g_c = steps(compiled)
    ours = [w for w in caught if "torch.compile" in str(w.message)]
    assert len(ours) == 1 and "eagerly" in str(ours[0].message)
    assert not any("recompile" in str(w.message) for w in caught)
    y_e, g_e = steps(model)
    assert torch.equal(y_c, y_e) and all(torch.equal(a, b) for a, b in zip(g_c, g_e, strict=True))
    assert torch.equal(quantize_bf16(y_e), y_e)  # emulated, not FP32


def quantize_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


# ----------------------------------------------------------------------------------------------------------
# The covered-op list in docs/emulation.md is the code's table.


def test_docs_list_the_covered_ops() -> None:
    from pathlib import Path

    from lossscale.emulate.mode import covered_ops

    doc = (Path(__file__).resolve().parents[1] / "docs" / "emulation.md").read_text()
    start = doc.index("<!-- covered-ops:start")
    end = doc.index("<!-- covered-ops:end -->")
    listed = sorted(
        name.strip().strip("`") for name in doc[start:end].split("-->", 1)[1].replace("\n", " ").split(",")
        if name.strip()
    )
    assert listed == covered_ops()
    aten_start = doc.index("<!-- aten-gemms:start")
    aten_end = doc.index("<!-- aten-gemms:end -->")
    aten_listed = sorted(
        n.strip().strip("`") for n in doc[aten_start:aten_end].split("-->", 1)[1].replace("\n", " ").split(",")
        if n.strip()
    )
    assert aten_listed == sorted(lossscale.emulate.aten.GEMM_ATEN)


def test_unhandled_gemm_named_torch_function_is_loud() -> None:
    """A torch function without a handler whose name says GEMM (here linalg.vecdot) is warned and counted,
    and refused under strict=True."""
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(UnemulatedOpError, match="vecdot"):
        with lossscale.autocast("bf16-mixed", emulate=True, strict=True):
            torch.linalg.vecdot(a, b)
    counters = lossscale.RoundingCounters()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with lossscale.autocast("bf16-mixed", emulate=True, counters=counters):
            y = torch.linalg.vecdot(a, b)
    assert torch.equal(y, torch.linalg.vecdot(a, b))  # ran in FP32
    assert sum(n for op, n in counters.unemulated.items() if "vecdot" in op) == 1


def test_composite_backward_twice_with_retain_graph_and_double_backward_is_loud() -> None:
    # A composite (einsum) runs as an inner autograd region: backward(retain_graph=True) twice must work and
    # accumulate exactly twice the gradient of one backward; create_graph must raise, not drop terms.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, generator=gen, requires_grad=True)
    b = torch.randn(8, 3, generator=gen, requires_grad=True)
    with lossscale.autocast("bf16-mixed", emulate=True):
        z = torch.einsum("ij,jk->ik", a, b).sum()
    z.backward(retain_graph=True)
    first = a.grad.clone()  # type: ignore[union-attr]
    z.backward()
    assert torch.equal(a.grad, 2 * first)  # type: ignore[arg-type]
    a.grad = b.grad = None
    with lossscale.autocast("bf16-mixed", emulate=True):
        z = torch.einsum("ij,jk->ik", a, b).square().sum()  # the incoming gradient 2y depends on a and b
    (ga,) = torch.autograd.grad(z, [a], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        ga.sum().backward()


def _delayed_ckpt_run(how: str, steps: int = 3) -> tuple[list[torch.Tensor], lossscale.RecipeState]:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    gen = torch.Generator().manual_seed(6)
    state = lossscale.RecipeState()
    for step in range(steps):
        model.zero_grad()
        x = (torch.randn(4, 32, generator=gen) * 2.0**step).requires_grad_()  # amax moves: so do the scales
        with lossscale.autocast("fp8-delayed", emulate=True, recipe_state=state, model=model):
            if how == "none":
                y = model(x)
            else:
                y = checkpoint(model[:2], x, use_reentrant=how == "reentrant")
                y = checkpoint(model[2:], y, use_reentrant=how == "reentrant")
        (y.pow(2).mean() * 1e-3).backward()
    return [p.grad.clone() for p in model.parameters()], state  # type: ignore[union-attr]


@pytest.mark.parametrize("how", ["reentrant", "non_reentrant"])
def test_checkpoint_under_delayed_scaling_is_bit_identical(how: str) -> None:
    # The recomputation replays the original forward's delayed scales from the same RecipeState, without
    # recording a second amax or counting twice: gradients, scales and counts equal the un-checkpointed run.
    ref, s_ref = _delayed_ckpt_run("none")
    got, s_got = _delayed_ckpt_run(how)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    assert s_ref.delayed.keys() == s_got.delayed.keys()
    assert all(torch.equal(s_ref.delayed[k].scale, s_got.delayed[k].scale) for k in s_ref.delayed)
    assert not any(torch.equal(h.scale, torch.ones(())) for h in s_ref.delayed.values())  # scales moved
    assert s_ref.read() == s_got.read()


def test_checkpoint_under_delayed_scaling_with_a_shared_site_warns() -> None:
    layer = nn.Linear(16, 16)
    state = lossscale.RecipeState()
    x = torch.randn(4, 16)
    with lossscale.autocast("fp8-delayed", emulate=True, recipe_state=state, model=layer):
        y = checkpoint(lambda t: layer(layer(t)), x, use_reentrant=False)  # one module called twice
    with pytest.warns(RuntimeWarning, match="replays the last call's scale"):
        y.sum().backward()
