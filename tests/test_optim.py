"""lossscale.optim: bit-exactness against torch.optim, compensation, state, loss-scaler skips.

Tolerances (one table; the reason for each bound on the line below it):

| check                          | bound                                      |
|--------------------------------|--------------------------------------------|
| FP32, compensation="none"      | bit-exact vs torch.optim                   |
|   same operations in the same order                                         |
| Kahan BF16 weight vs FP32 run  | <= 1 BF16 spacing of the weight            |
|   the weight is the FP32 trajectory rounded once (plus the buffer's rounding) |
| Kahan weight + buffer, AdamW   | <= 0.1 BF16 spacing                        |
|   only the buffer's own rounding (2^-8 of it) accumulates                   |
| Kahan weight + buffer, SGD     | <= 0.25 BF16 spacing                       |
|   plus: SGD's step follows a gradient computed from the rounded weight (measured 0.1) |
| stochastic rounding, mean      | 4 standard errors of the per-element mean  |
|   SR noise is zero-mean; 4 sigma keeps a fixed-seed test far from flaky     |
| SR unbiased (one rounding)     | 3 sigma of a binomial proportion           |
| native BF16 vs emulated BF16   | bit-exact (same FP32 arithmetic and rounding) |
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch

import lossscale
from lossscale.optim import SGD, Adam, AdamW, adamw, apply_update_, sgd
from lossscale.formats import BF16

SHAPES = [(7, 5), (13,), (3, 4, 2)]


def _randn(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


# ------------------------------------------------------------------------------------------------------
# FP32 with compensation="none": bit for bit torch.optim

TORCH_CASES: list[tuple[Any, Any, dict[str, Any]]] = [
    (AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (AdamW, torch.optim.AdamW, dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True)),
    (AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, maximize=True)),
    (Adam, torch.optim.Adam, dict(lr=1e-2)),
    (Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
    (Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    (SGD, torch.optim.SGD, dict(lr=1e-2)),
    (SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)),
    (SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.1, maximize=True)),
]


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("case", range(len(TORCH_CASES)))
def test_fp32_none_matches_torch_bitwise(case: int, foreach: bool) -> None:
    ours_cls, torch_cls, kw = TORCH_CASES[case]
    gen = torch.Generator().manual_seed(case)
    init = [_randn(s, gen) for s in SHAPES]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    # Two param groups (the second with its own lr) to cover group handling.
    ours = ours_cls([{"params": a[:2]}, {"params": a[2:], "lr": 5e-3}], foreach=foreach, **kw)
    ref = torch_cls([{"params": b[:2]}, {"params": b[2:], "lr": 5e-3}], foreach=foreach, **kw)
    for step in range(25):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if step % 7 == 3 and i == 1:  # a parameter without gradient this step: no update, no step count
                x.grad = y.grad = None
                continue
            g = _randn(x.shape, gen)
            x.grad, y.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a, b, strict=True):
        for key, val in ref.state[y].items():
            if key == "step":
                assert ours.state[x]["step"] == int(val.item())
            else:
                assert torch.equal(ours.state[x][key], val), key


def test_fp32_default_compensation_is_none_and_bf16_default_is_kahan() -> None:
    w32 = torch.nn.Parameter(torch.ones(3))
    w16 = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    wem = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([{"params": [w32]}, {"params": [w16]}, {"params": [wem], "weight_format": "bf16"}])
    for w in (w32, w16, wem):
        w.grad = torch.ones_like(w)
    opt.step()
    assert "kahan_comp" not in opt.state[w32]
    assert opt.state[w16]["kahan_comp"].dtype == torch.bfloat16
    assert opt.state[wem]["kahan_comp"].dtype == torch.float32  # emulated: FP32 tensor holding BF16 values
    assert opt.state[w16]["exp_avg"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: AdamW(p, lr=-1e-3), "Invalid learning rate"),
        (lambda p: AdamW(p, betas=(1.0, 0.999)), "beta parameter at index 0"),
        (lambda p: AdamW(p, betas=(0.9, -0.1)), "beta parameter at index 1"),
        (lambda p: Adam(p, eps=-1.0), "Invalid epsilon"),
        (lambda p: AdamW(p, weight_decay=-0.1), "Invalid weight_decay"),
        (lambda p: AdamW(p, compensation="kahn"), "compensation must be one of"),
        (lambda p: SGD(p, lr=-0.1), "Invalid learning rate"),
        (lambda p: SGD(p, momentum=-0.5), "Invalid momentum"),
        (lambda p: SGD(p, lr=0.1, nesterov=True), "Nesterov momentum requires"),
        (lambda p: SGD(p, compensation="round"), "compensation must be one of"),
        (lambda p: AdamW(p, state_dtype=torch.float16), "state_dtype must be"),
        (lambda p: AdamW(p, fused=True), "fused=True is not supported"),
        (lambda p: SGD(p, weight_format="nonsense"), "format"),
    ],
)
def test_bad_input_raises_value_error(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.ones(2))])


def test_bad_input_types_and_formats() -> None:
    with pytest.raises(TypeError, match="tensor lr would need a host sync"):
        AdamW([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match="does not match a torch.bfloat16 parameter"):
        AdamW([torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], weight_format="fp16")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        SGD([torch.nn.Parameter(torch.ones(2, dtype=torch.float64))])
    with pytest.raises(ValueError, match="compensation must be one of"):
        opt = SGD([torch.nn.Parameter(torch.ones(2))])
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "compensation": "nope"})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: AdamW(p, betas=0.9), "betas"),
        (lambda p: AdamW(p, betas=("0.9", 0.999)), "betas"),
        (lambda p: Adam(p, eps="1e-8"), "eps"),
        (lambda p: AdamW(p, weight_decay="0.1"), "weight_decay"),
        (lambda p: SGD(p, momentum="0.9"), "momentum"),
        (lambda p: SGD(p, dampening=None), "dampening"),
    ],
)
def test_wrong_types_raise_type_error_naming_the_argument(make: Any, match: str) -> None:
    # Not a bare "'<' not supported between 'str' and 'float'" from deep inside the checks.
    with pytest.raises(TypeError, match=match):
        make([torch.nn.Parameter(torch.ones(2))])


# ------------------------------------------------------------------------------------------------------
# Updates below BF16 resolution: negative control, Kahan tracks FP32, SR within a statistical band

N_ELEM = 4096


def _stall_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights in [1, 2) (BF16 spacing 2^-7, so updates below 2^-8 round away) and a target 0.05 below."""
    gen = torch.Generator().manual_seed(seed)
    w0 = lossscale.quantize(1.0 + torch.rand(N_ELEM, generator=gen) * 0.9, "bf16")
    return w0, w0 - 0.05


def _run(opt_factory: Any, w0: torch.Tensor, target: torch.Tensor, steps: int, dtype: torch.dtype) -> Any:
    w = torch.nn.Parameter(w0.clone().to(dtype))
    opt = opt_factory([w])
    for _ in range(steps):
        w.grad = (w.detach().float() - target).to(dtype)  # gradient of 0.5 * ||w - target||^2
        opt.step()
    return w.detach().float(), opt.state[w]


OPTIMIZERS = {
    # AdamW: each step moves ~lr = 1e-4, far below half the BF16 spacing (2^-8 = 3.9e-3).
    "adamw": (
        lambda p, **kw: AdamW(p, lr=1e-4, weight_decay=0.0, **kw),
        lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0, foreach=False),
        400,
    ),
    # SGD with momentum: updates lr * g / (1 - 0.9) <= 5e-4, also below half the spacing.
    "sgd": (
        lambda p, **kw: SGD(p, lr=1e-3, momentum=0.9, **kw),
        lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, foreach=False),
        300,
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_negative_control_bf16_without_compensation_stalls(name: str) -> None:
    ours, ref, steps = OPTIMIZERS[name]
    w0, target = _stall_problem(1)
    w_ref, _ = _run(ref, w0, target, steps, torch.float32)
    assert (w0 - w_ref).mean() > 0.03  # FP32 makes real progress
    w_none, _ = _run(lambda p: ours(p, compensation="none"), w0, target, steps, torch.bfloat16)
    assert torch.equal(w_none, w0)  # every update rounded away: not a single weight moved


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_kahan_bf16_tracks_fp32_torch(name: str, state_dtype: torch.dtype) -> None:
    ours, ref, steps = OPTIMIZERS[name]
    w0, target = _stall_problem(2)
    w_ref, _ = _run(ref, w0, target, steps, torch.float32)
    w_k, state = _run(lambda p: ours(p, state_dtype=state_dtype), w0, target, steps, torch.bfloat16)
    spacing = 2.0**-7  # BF16 spacing in [1, 2)
    assert (w_k - w_ref).abs().max() <= spacing
    if state_dtype == torch.float32:
        # Weight + buffer carry the FP32 trajectory up to the buffer's own rounding, plus (SGD) the effect of
        # gradients computed from the rounded weight the model sees (see the table at the top).
        bound = {"adamw": 0.1, "sgd": 0.25}[name] * spacing
        assert (w_k + state["kahan_comp"].float() - w_ref).abs().max() <= bound
    # The weights moved as far as FP32's did, to within rounding (the negative control moved 0).
    assert abs(float((w0 - w_k).mean() - (w0 - w_ref).mean())) <= spacing / 2


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_stochastic_bf16_tracks_fp32_within_statistical_band(name: str) -> None:
    # A linear loss (constant gradient per weight) keeps the FP32 trajectory independent of the
    # weights, so the SR run differs from it only by rounding noise, which must be zero-mean. (On the quadratic
    # the noise also feeds back through the gradient: Adam's m / sqrt(v) shrinks when g fluctuates.)
    ours, ref, steps = OPTIMIZERS[name]
    w0, _ = _stall_problem(3)
    # SGD's steps scale with the gradient: 0.05 keeps them below BF16 resolution (<= 7.5e-4 with momentum).
    scale = {"adamw": 1.0, "sgd": 0.05}[name]
    slope = (0.5 + torch.rand(N_ELEM, generator=torch.Generator().manual_seed(4))) * scale
    slope = lossscale.quantize(slope, "bf16")  # the BF16 run's gradient is exactly this

    def run(factory: Any, dtype: torch.dtype) -> torch.Tensor:
        w = torch.nn.Parameter(w0.clone().to(dtype))
        opt = factory([w])
        for _ in range(steps):
            w.grad = slope.to(dtype)
            opt.step()
        return w.detach().float()

    w_ref = run(ref, torch.float32)
    w_none = run(lambda p: ours(p, compensation="none"), torch.bfloat16)
    assert torch.equal(w_none, w0)  # negative control: stalls
    w_sr = run(lambda p: ours(p, compensation="stochastic", seed=1234), torch.bfloat16)
    diff = w_sr - w_ref
    stderr = float(diff.std()) / math.sqrt(N_ELEM)
    assert abs(float(diff.mean())) <= 4 * stderr  # zero-mean noise: the band is 4 standard errors
    # The band is narrow compared with the movement: the negative control (no movement) lies far outside it.
    moved = float((w0 - w_ref).mean())
    assert moved > 50 * stderr
    assert float(diff.std()) < 0.5 * moved


# ------------------------------------------------------------------------------------------------------
# Stochastic rounding: unbiased within 3 sigma, on a fixed seed


@pytest.mark.parametrize("frac", [0.03, 0.3, 0.5, 0.9])
def test_stochastic_update_unbiased_3_sigma(frac: float) -> None:
    n = 200_000
    spacing = 2.0**-7
    w = torch.full((n,), 1.5, dtype=torch.bfloat16)
    u = torch.full((n,), frac * spacing)
    gen = torch.Generator().manual_seed(7)
    apply_update_([w], [u], None, fmt=BF16, compensation="stochastic", generator=gen)
    steps = (w.float() - 1.5) / spacing
    assert bool(((steps == 0) | (steps == 1)).all())  # always one of the two neighbours
    p_hat = float(steps.mean())
    assert abs(p_hat - frac) <= 3 * math.sqrt(frac * (1 - frac) / n)
    # Negative control: nearest rounding is biased by the whole update (or by spacing - update).
    w2 = torch.full((n,), 1.5, dtype=torch.bfloat16)
    apply_update_([w2], [torch.full((n,), frac * spacing)], None, fmt=BF16, compensation="none")
    assert float((w2.float() - 1.5).mean() / spacing) in (0.0, 1.0)


def test_sgd_stochastic_step_unbiased_3_sigma() -> None:
    n = 100_000
    w = torch.nn.Parameter(torch.full((n,), -3.0, dtype=torch.bfloat16))  # spacing 2^-6 in [2, 4)
    opt = SGD([w], lr=1e-3, compensation="stochastic", seed=99)
    w.grad = torch.ones_like(w)
    opt.step()  # -3 - 1e-3: rounds to -3 or to -3 - 2^-6
    p_hat = float((w.detach().float() + 3.0).mean()) / -(2.0**-6)
    p = 1e-3 / 2.0**-6
    assert abs(p_hat - p) <= 3 * math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------------------------------------------
# Foreach and for-loop forms agree on the compensated path; native BF16 == emulated BF16


def _configs() -> list[tuple[str, Any]]:
    return [
        ("adamw-kahan", lambda p, **kw: AdamW(p, lr=1e-2, weight_decay=0.1, **kw)),
        ("adamw-kahan-bf16state-amsgrad", lambda p, **kw: AdamW(p, lr=1e-2, amsgrad=True, state_dtype="bf16", **kw)),
        # BF16 weights + BF16 states + Kahan: the all-BF16-operations path
        ("adamw-kahan-bf16state", lambda p, **kw: AdamW(p, lr=1e-2, weight_decay=0.1, state_dtype="bf16", **kw)),
        ("adam-l2-max-kahan-bf16state", lambda p, **kw: Adam(p, lr=1e-2, weight_decay=0.1, maximize=True,
                                                             state_dtype="bf16", **kw)),
        ("adamw-sr", lambda p, **kw: AdamW(p, lr=1e-2, compensation="stochastic", seed=5, **kw)),
        ("adamw-none", lambda p, **kw: AdamW(p, lr=1e-2, compensation="none", **kw)),
        ("adam-l2-kahan", lambda p, **kw: Adam(p, lr=1e-2, weight_decay=0.1, maximize=True, **kw)),
        ("sgd-nesterov-kahan", lambda p, **kw: SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, **kw)),
        ("sgd-sr-bf16state", lambda p, **kw: SGD(p, lr=1e-2, momentum=0.5, compensation="stochastic",
                                                state_dtype=torch.bfloat16, seed=3, **kw)),
    ]


def _bf16_values(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return lossscale.quantize(torch.randn(shape, generator=gen), "bf16")


def _train(factory: Any, params: list[torch.Tensor], grads: list[list[torch.Tensor]], **kw: Any) -> Any:
    opt = factory(params, **kw)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.to(p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("name_factory", _configs(), ids=[c[0] for c in _configs()])
def test_native_bf16_equals_emulated_bf16_bitwise(name_factory: Any) -> None:
    _, factory = name_factory
    gen = torch.Generator().manual_seed(11)
    init = [_bf16_values(s, gen) for s in SHAPES]
    grads = [[_bf16_values(s, gen) for s in SHAPES] for _ in range(12)]
    native = [torch.nn.Parameter(x.to(torch.bfloat16)) for x in init]
    emul = [torch.nn.Parameter(x.clone()) for x in init]
    on = _train(factory, native, grads)
    oe = _train(factory, emul, grads, weight_format="bf16")
    for pn, pe in zip(native, emul, strict=True):
        assert pe.dtype == torch.float32
        assert torch.equal(pn.detach().float(), pe.detach())
        for key, val in on.state[pn].items():
            other = oe.state[pe][key]
            if isinstance(val, torch.Tensor):
                assert torch.equal(val.float(), other.float()), key
            else:
                assert val == other


@pytest.mark.parametrize("name_factory", _configs(), ids=[c[0] for c in _configs()])
def test_foreach_equals_for_loop_bitwise(name_factory: Any) -> None:
    _, factory = name_factory
    gen = torch.Generator().manual_seed(12)
    init = [_bf16_values(s, gen) for s in SHAPES]
    grads = [[_bf16_values(s, gen) for s in SHAPES] for _ in range(8)]
    a = [torch.nn.Parameter(x.to(torch.bfloat16)) for x in init]
    b = [torch.nn.Parameter(x.to(torch.bfloat16)) for x in init]
    _train(factory, a, grads, foreach=True)
    _train(factory, b, grads, foreach=False)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_low_precision_weights_helper_matches_native() -> None:
    helper = getattr(lossscale, "low_precision_weights", None)
    if helper is None:
        pytest.skip("lossscale.low_precision_weights (emulation issue) is not available yet")
    gen = torch.Generator().manual_seed(13)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    native = torch.nn.Linear(8, 4)
    opt_e = AdamW(model.parameters(), lr=1e-2, weight_format="bf16")
    helper(model, "bf16-pure", optimizer=opt_e, native=False)
    native.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    native.to(torch.bfloat16)
    opt_n = AdamW(native.parameters(), lr=1e-2)
    for _ in range(5):
        for pe, pn in zip(model.parameters(), native.parameters(), strict=True):
            g = _bf16_values(tuple(pe.shape), gen)
            pe.grad, pn.grad = g.clone(), g.to(torch.bfloat16)
        opt_e.step()
        opt_n.step()
    for pe, pn in zip(model.parameters(), native.parameters(), strict=True):
        assert torch.equal(pe.detach(), pn.detach().float())


# ------------------------------------------------------------------------------------------------------
# state_dict: bit-exact round trip, resume continues bit-identically


def _snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[Any]:
    snap: list[Any] = [p.detach().clone() for p in params]
    for p in params:
        snap.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()})
    rng = opt._rng  # type: ignore[attr-defined]
    snap.append({k: g.get_state().clone() for k, g in rng._generators.items()})
    return snap


def _assert_same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        elif isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                if isinstance(x[k], torch.Tensor):
                    assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
                else:
                    assert x[k] == y[k], k
        else:
            assert x == y


@pytest.mark.parametrize("name_factory", _configs(), ids=[c[0] for c in _configs()])
@pytest.mark.parametrize("emulated", [False, True], ids=["native", "emulated"])
def test_state_dict_round_trip_and_resume_bit_identical(name_factory: Any, emulated: bool) -> None:
    _, factory = name_factory
    gen = torch.Generator().manual_seed(21)
    init = [_bf16_values(s, gen) for s in SHAPES]
    grads = [[_bf16_values(s, gen) for s in SHAPES] for _ in range(10)]
    kw: dict[str, Any] = {"weight_format": "bf16"} if emulated else {}
    dtype = torch.float32 if emulated else torch.bfloat16

    full = [torch.nn.Parameter(x.clone().to(dtype)) for x in init]
    _train(factory, full, grads, **kw)

    first = [torch.nn.Parameter(x.clone().to(dtype)) for x in init]
    opt1 = _train(factory, first, grads[:5], **kw)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(x.clone()) for x in ckpt["params"]]
    opt2 = factory(resumed, **kw)
    opt2.load_state_dict(ckpt["opt"])
    _assert_same(_snapshot(opt1, first), _snapshot(opt2, resumed))  # round trip is bit-exact
    for gs in grads[5:]:
        for p, g in zip(resumed, gs, strict=True):
            p.grad = g.to(p.dtype)
        opt2.step()
    for p, q in zip(full, resumed, strict=True):
        assert torch.equal(p, q)  # resume == uninterrupted run


def test_state_dict_keeps_nondefault_settings() -> None:
    w = torch.nn.Parameter(torch.ones(4))
    opt = AdamW([w], lr=0.02, betas=(0.5, 0.6), eps=1e-5, weight_decay=0.3, amsgrad=True, maximize=True,
                foreach=False, compensation="stochastic", weight_format="bf16", state_dtype="bf16", seed=77)
    w.grad = torch.ones(4)
    opt.step()
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    group = loaded["param_groups"][0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.02, (0.5, 0.6), 1e-5, 0.3)
    assert (group["amsgrad"], group["maximize"], group["foreach"]) == (True, True, False)
    assert (group["compensation"], group["weight_format"], group["state_dtype"]) == ("stochastic", "bf16", "bfloat16")
    assert loaded["lossscale"]["rng"]["seed"] == 77
    assert loaded["state"][0]["exp_avg"].dtype == torch.bfloat16
    opt2 = AdamW([torch.nn.Parameter(torch.ones(4))])
    opt2.load_state_dict(loaded)
    assert opt2.param_groups[0]["compensation"] == "stochastic"
    assert opt2._rng.seed == 77


# ------------------------------------------------------------------------------------------------------
# Loss scaler: skipped steps leave weights, buffers, states and the generator bit-identical


def _scaler_cases() -> list[tuple[str, Any, torch.dtype, dict[str, Any]]]:
    return [
        ("adamw-kahan-native", lambda p: AdamW(p, lr=1e-2), torch.bfloat16, {}),
        ("adamw-sr-emulated", lambda p: AdamW(p, lr=1e-2, compensation="stochastic", weight_format="bf16", seed=1),
         torch.float32, {}),
        ("sgd-kahan-native", lambda p: SGD(p, lr=1e-2, momentum=0.9), torch.bfloat16, {}),
    ]


def _make_scaler(kind: str) -> Any:
    if kind == "torch":
        return torch.amp.GradScaler("cpu", init_scale=2.0**8)
    return lossscale.LossScaler(init_scale=2.0**8)


@pytest.mark.parametrize("kind", ["torch", "lossscale"])
@pytest.mark.parametrize("case", _scaler_cases(), ids=[c[0] for c in _scaler_cases()])
def test_scaler_skipped_steps_leave_everything_bit_identical(case: Any, kind: str) -> None:
    _, factory, dtype, _ = case
    gen = torch.Generator().manual_seed(31)
    params = [torch.nn.Parameter(_bf16_values(s, gen).to(dtype)) for s in SHAPES]
    opt = factory(params)
    scaler = _make_scaler(kind)

    def iteration(bad: tuple[int, float] | None) -> None:
        scale = float(scaler.get_scale()) if kind == "torch" else scaler.get_scale()
        for i, p in enumerate(params):
            g = _bf16_values(tuple(p.shape), gen) * scale
            if bad is not None and bad[0] == i:
                g.view(-1)[i] = bad[1]  # inject inf/nan at this parameter
            p.grad = g.to(dtype)
        scaler.step(opt)
        scaler.update()

    scaler.scale(torch.ones((), dtype=torch.float32))  # lazily creates the scale tensor
    for _ in range(3):
        iteration(None)
    stepped = 0
    for i in range(len(params)):
        for bad in (math.inf, -math.inf, math.nan):
            before = _snapshot(opt, params)
            iteration((i, bad))
            _assert_same(before, _snapshot(opt, params))
        before = _snapshot(opt, params)
        iteration(None)  # a finite step after the skips does update
        stepped += 1
        assert not all(torch.equal(a, b) for a, b in zip(before[: len(params)], _snapshot(opt, params), strict=True))
    assert stepped == len(params)


# ------------------------------------------------------------------------------------------------------
# Functional forms and memory


def test_functional_adamw_matches_class_and_leaves_grads_alone() -> None:
    gen = torch.Generator().manual_seed(41)
    init = [_bf16_values(s, gen).to(torch.bfloat16) for s in SHAPES]
    grads = [[_bf16_values(s, gen).to(torch.bfloat16) for s in SHAPES] for _ in range(4)]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = _train(lambda p: AdamW(p, lr=1e-2, weight_decay=0.1, compensation="kahan"), params, grads)
    ws = [x.clone() for x in init]
    m = [torch.zeros(x.shape) for x in init]
    v = [torch.zeros(x.shape) for x in init]
    c: list[torch.Tensor | None] = [torch.zeros_like(x) for x in init]
    for t, gs in enumerate(grads, start=1):
        copies = [g.clone() for g in gs]
        adamw(ws, gs, m, v, [], [t] * len(ws), c, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8)
        assert all(torch.equal(g, h) for g, h in zip(gs, copies, strict=True))
    for p, w, ci in zip(params, ws, c, strict=True):
        assert torch.equal(p.detach(), w)
        assert ci is not None and torch.equal(opt.state[p]["kahan_comp"], ci)


def test_functional_sgd_creates_buffers_like_torch() -> None:
    w = torch.ones(3)
    bufs: list[torch.Tensor | None] = [None]
    sgd([w], [torch.full((3,), 2.0)], bufs, lr=0.5, momentum=0.9, state_dtype="bf16", weight_format="bf16",
        compensation="none")
    assert bufs[0] is not None and bufs[0].dtype == torch.bfloat16 and bufs[0].tolist() == [2.0] * 3
    assert w.tolist() == [0.0] * 3


@pytest.mark.parametrize(
    "state_dtype, expected", [(torch.float32, 12), (torch.bfloat16, 8)], ids=["fp32-states", "bf16-states"]
)
def test_optimizer_bytes_per_parameter_kahan_bf16(state_dtype: torch.dtype, expected: int) -> None:
    w = torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))
    opt = AdamW([w], state_dtype=state_dtype)
    w.grad = torch.ones_like(w)
    opt.step()
    state_bytes = sum(v.numel() * v.element_size() for v in opt.state[w].values() if isinstance(v, torch.Tensor))
    assert (state_bytes + w.numel() * w.element_size()) / w.numel() == expected


# ------------------------------------------------------------------------------------------------------
# Cache blocking: pieces of a tensor give the same bits as the whole tensor (except SR's draw order)


@pytest.mark.parametrize("name_factory", _configs(), ids=[c[0] for c in _configs()])
def test_cache_blocks_give_same_bits(name_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    name, factory = name_factory
    gen = torch.Generator().manual_seed(51)
    shapes = [(7, 50), (300,), (129,), (5,)]
    init = [_bf16_values(s, gen) for s in shapes]
    grads = [[_bf16_values(s, gen) for s in shapes] for _ in range(6)]
    whole = [torch.nn.Parameter(x.to(torch.bfloat16)) for x in init]
    _train(factory, whole, grads)
    # Pieces of 64 elements, a multiple of every SIMD width: torch's BF16 kernels treat a vector's worth of
    # elements and a remainder differently (last-bit differences), so blocks must keep the same alignment,
    # as the real block size (2^16) does.
    monkeypatch.setattr("lossscale.optim._buckets.CHUNK", 64)
    monkeypatch.setattr("lossscale.optim._buckets.CHUNK_NATIVE", 64)
    runs = []
    for foreach in (True, False):
        ps = [torch.nn.Parameter(x.to(torch.bfloat16)) for x in init]
        _train(factory, ps, grads, foreach=foreach)
        runs.append(ps)
    for a, b, w in zip(runs[0], runs[1], whole, strict=True):
        assert torch.equal(a, b)  # foreach and for-loop cut the same pieces: same bits, SR included
        if "sr" not in name:
            assert torch.equal(a, w)  # element-wise arithmetic: blocking changes nothing


def test_maximize_and_l2_never_write_fp32_grads() -> None:
    gen = torch.Generator().manual_seed(52)
    ws = [torch.nn.Parameter(_bf16_values(s, gen)) for s in SHAPES]
    opt_a = Adam(ws, lr=1e-2, weight_decay=0.1, maximize=True, weight_format="bf16")
    opt_s = SGD(ws, lr=1e-2, momentum=0.9, weight_decay=0.1, maximize=True, weight_format="bf16")
    for opt in (opt_a, opt_s, opt_a, opt_s):
        gs = [_bf16_values(s, gen) for s in SHAPES]
        for w, g in zip(ws, gs, strict=True):
            w.grad = g.clone()
        opt.step()
        assert all(torch.equal(w.grad, g) for w, g in zip(ws, gs, strict=True))


# ------------------------------------------------------------------------------------------------------
# Other weight formats: FP32 Kahan (textbook form) and native FP16


def test_fp32_kahan_keeps_updates_below_fp32_resolution() -> None:
    from lossscale.formats import FP32

    w_plain, w_kahan = torch.ones(4), torch.ones(4)
    c = torch.zeros(4)
    for _ in range(1000):  # 1e-8 is below half of FP32's spacing at 1 (2^-24 = 6e-8)
        apply_update_([w_plain], [torch.full((4,), 1e-8)], None, fmt=FP32, compensation="none")
        apply_update_([w_kahan], [torch.full((4,), 1e-8)], [c], fmt=FP32, compensation="kahan")
    assert torch.equal(w_plain, torch.ones(4))  # negative control: every update lost
    total = (w_kahan.double() + c.double() - 1.0).tolist()
    assert all(abs(t - 1e-5) < 1e-9 for t in total)


@pytest.mark.parametrize("compensation, moves", [("none", False), ("kahan", True), ("stochastic", True)])
def test_fp16_weights(compensation: str, moves: bool) -> None:
    w0 = torch.full((4096,), 1.5, dtype=torch.float16)  # FP16 spacing at 1.5 is 2^-10
    w = torch.nn.Parameter(w0.clone())
    opt = SGD([w], lr=1e-4, compensation=compensation, seed=0)
    for _ in range(200):  # 200 updates of 1e-4 (a tenth of a spacing each): 0.02 in total
        w.grad = torch.ones_like(w)
        opt.step()
    moved = float((w0.float() - w.detach().float()).mean())
    if moves:
        assert moved == pytest.approx(0.02, abs=2.0**-11)
    else:
        assert moved == 0.0


# ------------------------------------------------------------------------------------------------------
# load_state_dict: atomic on failure; torch.optim state migrates without per-step host syncs


def test_failed_load_leaves_the_optimizer_unchanged() -> None:
    w = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = AdamW([w], lr=1e-2, compensation="stochastic", seed=5)
    w.grad = torch.full_like(w, 0.5)
    opt.step()
    old = opt.state_dict()
    old["lossscale"]["version"] = 99  # from a newer lossscale
    w.grad = torch.full_like(w, -0.25)
    opt.step()
    before = io.BytesIO()
    torch.save(opt.state_dict(), before)
    with pytest.raises(ValueError, match="version"):
        opt.load_state_dict(old)
    after = io.BytesIO()
    torch.save(opt.state_dict(), after)
    assert opt.state[w]["step"] == 2
    assert before.getvalue() == after.getvalue()  # state, groups and generators untouched
    broken = opt.state_dict()
    broken["lossscale"] = {"version": 1, "rng": {"seed": "x", "states": {}}}
    with pytest.raises(ValueError, match="rng"):
        opt.load_state_dict(broken)
    assert opt.state[w]["step"] == 2


@pytest.mark.parametrize("ours, theirs", [(AdamW, torch.optim.AdamW), (Adam, torch.optim.Adam)])
def test_torch_optim_state_dict_migrates_with_python_int_steps(ours: Any, theirs: Any) -> None:
    # torch.optim keeps "step" as a tensor; a tensor step would make every later step() read it back to the
    # host (float(step): a sync per step) and drift from the Python-int layout our state_dict documents.
    gen = torch.Generator().manual_seed(3)
    w0 = _randn((6,), gen)
    grads = [_randn((6,), gen) for _ in range(4)]
    ref_w = torch.nn.Parameter(w0.clone())
    ref = theirs([ref_w], lr=1e-2, foreach=False)
    for g in grads:
        ref_w.grad = g.clone()
        ref.step()
    w = torch.nn.Parameter(w0.clone())
    src = theirs([w], lr=1e-2, foreach=False)
    for g in grads[:2]:
        w.grad = g.clone()
        src.step()
    opt = ours([w], lr=1e-2, foreach=False)
    opt.load_state_dict(src.state_dict())
    assert type(opt.state[w]["step"]) is int and opt.state[w]["step"] == 2
    group = opt.param_groups[0]  # torch's groups lack our options: they take our defaults, normalised
    assert (group["compensation"], group["weight_format"], group["state_dtype"]) == (None, None, "float32")
    for g in grads[2:]:
        w.grad = g.clone()
        opt.step()
    assert type(opt.state[w]["step"]) is int
    assert torch.equal(w, ref_w)  # and the migrated run continues bit for bit
