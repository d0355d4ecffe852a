"""Emulated ops against native CPU torch.autocast(bfloat16), rounding sites, counters, GEMM counts."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lossscale
from lossscale import BF16, E4M3, FP16, Precision, RoundingCounters, quantize
from lossscale.emulate._core import current_scale, round_to, scaled_round

# Tolerances, one table (measured on torch 2.13 CPU with a fixed seed; the reason beside each).
TOL = {
    # CPU autocast GEMMs accumulate in FP32 and round once, as emulation does: only the summation order
    # differs, which moves a result across a rounding boundary rarely (a prototype measured 99.997-100%;
    # here every op measures 100%, bit-identical).
    "gemm_out_within_1ulp": 0.999,
    "gemm_grad_within_1ulp": 0.99,
    # Negative control: FP32 compute without rounding measured 67-81% within one BF16 ulp of native.
    "fp32_control_max": 0.95,
    # CPU flash attention rounds exp(S - max) to BF16 before PV as our emulation does, but blocks the softmax
    # (running max per block) and recomputes P in backward in its own order: measured 98.8-99.3% (outputs)
    # and 97.8-99.9% (grads) within one ulp, SQNR 58-68 dB; FP32 compute measures 55-74% within one ulp.
    "sdpa_within_1ulp": 0.95,
    "sdpa_sqnr_db": 54.0,
    "sdpa_fp32_control_max": 0.9,
}


def within_one_ulp(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of elements of a and b (BF16 values) that differ by at most one BF16 ulp of the larger."""
    a, b = a.detach().float(), b.detach().float()
    m = torch.maximum(a.abs(), b.abs())
    exponent = torch.floor(torch.log2(m.clamp_min(BF16.min_normal)))
    ulp = torch.exp2(exponent - BF16.mantissa_bits)
    return ((a - b).abs() <= ulp).double().mean().item()


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.detach().double(), x.detach().double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum())).item()


def run(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], mode: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward under `mode` ("native", "emulated", "fp32"), backward with a fixed upstream gradient outside
    the context (as training code does)."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    if mode == "native":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*leaves)
    elif mode == "emulated":
        with lossscale.autocast("bf16-mixed", emulate=True):
            out = fn(*leaves)
    else:
        out = fn(*leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.float().backward(upstream)
    grads = [t.grad for t in leaves]
    assert all(g is not None for g in grads)
    return out.float(), grads  # type: ignore[return-value]


def _inputs(*shapes: tuple[int, ...], scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) * (scale if i == 1 else 1.0) for i, s in enumerate(shapes)]


OPS: dict[str, tuple[Callable[..., torch.Tensor], list[torch.Tensor]]] = {
    "linear": (lambda x, w, b: F.linear(x, w, b), _inputs((64, 128), (96, 128), (96,), scale=0.1)),
    "matmul": (lambda a, b: a @ b, _inputs((4, 32, 64), (64, 48))),
    "mm": (lambda a, b: torch.mm(a, b), _inputs((48, 64), (64, 40))),
    "bmm": (lambda a, b: torch.bmm(a, b), _inputs((4, 32, 64), (4, 64, 48))),
    "addmm": (lambda c, a, b: torch.addmm(c, a, b), _inputs((40,), (48, 64), (64, 40))),
    "baddbmm": (lambda c, a, b: torch.baddbmm(c, a, b), _inputs((4, 32, 48), (4, 32, 64), (4, 64, 48))),
    "conv1d": (lambda x, w, b: F.conv1d(x, w, b, padding=1), _inputs((4, 16, 40), (24, 16, 3), (24,), scale=0.2)),
    "conv2d": (
        lambda x, w, b: F.conv2d(x, w, b, padding=1),
        _inputs((4, 16, 12, 12), (24, 16, 3, 3), (24,), scale=0.1),
    ),
    "conv3d": (
        lambda x, w, b: F.conv3d(x, w, b, padding=1),
        _inputs((2, 8, 6, 6, 6), (12, 8, 3, 3, 3), (12,), scale=0.1),
    ),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_matches_native_bf16_autocast(name: str) -> None:
    fn, inputs = OPS[name]
    out_n, grads_n = run(fn, inputs, "native")
    out_e, grads_e = run(fn, inputs, "emulated")
    out_f, grads_f = run(fn, inputs, "fp32")
    # Emulated results hold BF16 values, like the native ones.
    assert torch.equal(quantize(out_e, BF16), out_e)
    frac = within_one_ulp(out_e, out_n)
    grad_fracs = [within_one_ulp(a, b) for a, b in zip(grads_e, grads_n, strict=True)]
    print(f"{name}: output {frac:.5f}, grads {[round(f, 5) for f in grad_fracs]}")
    assert frac >= TOL["gemm_out_within_1ulp"]
    assert min(grad_fracs) >= TOL["gemm_grad_within_1ulp"]
    # Negative control: without emulation the same comparison fails.
    control = within_one_ulp(out_f, out_n)
    control_grads = [within_one_ulp(a, b) for a, b in zip(grads_f, grads_n, strict=True)]
    print(f"{name} (fp32 control): output {control:.5f}, grads {[round(f, 5) for f in control_grads]}")
    assert control < TOL["fp32_control_max"]
    assert min(control_grads) < TOL["fp32_control_max"]


SDPA_CASES: dict[str, dict[str, object]] = {
    "plain": {},
    "causal": {"is_causal": True},
    "float_mask": {"attn_mask": torch.randn(32, 32, generator=torch.Generator().manual_seed(3))},
}


@pytest.mark.parametrize("case", sorted(SDPA_CASES))
def test_sdpa_matches_native_flash_attention(case: str) -> None:
    kwargs = SDPA_CASES[case]
    inputs = _inputs((2, 4, 32, 16), (2, 4, 32, 16), (2, 4, 32, 16))

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)  # type: ignore[arg-type]

    out_n, grads_n = run(fn, inputs, "native")
    out_e, grads_e = run(fn, inputs, "emulated")
    out_f, grads_f = run(fn, inputs, "fp32")
    fracs = [within_one_ulp(out_e, out_n)] + [within_one_ulp(a, b) for a, b in zip(grads_e, grads_n, strict=True)]
    sqnrs = [sqnr_db(out_n, out_e)] + [sqnr_db(b, a) for a, b in zip(grads_e, grads_n, strict=True)]
    controls = [within_one_ulp(out_f, out_n)] + [within_one_ulp(a, b) for a, b in zip(grads_f, grads_n, strict=True)]
    print(f"sdpa {case}: within 1 ulp {fracs}, SQNR {sqnrs} dB, fp32 control within 1 ulp {controls}")
    assert min(fracs) >= TOL["sdpa_within_1ulp"]
    assert min(sqnrs) >= TOL["sdpa_sqnr_db"]
    assert max(controls) <= TOL["sdpa_fp32_control_max"]


def test_sdpa_gqa_and_bool_mask_run_and_round() -> None:
    q = torch.randn(1, 4, 8, 16, requires_grad=True)
    k = torch.randn(1, 2, 8, 16, requires_grad=True)
    v = torch.randn(1, 2, 8, 16, requires_grad=True)
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) > 0.3
    mask.fill_diagonal_(True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with lossscale.autocast("bf16-mixed", emulate=True):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.shape == ref.shape
    assert torch.equal(quantize(out, BF16), out)
    assert sqnr_db(ref, out) > 30
    out.sum().backward()
    assert k.grad is not None and k.grad.shape == k.shape


# ------------------------------------------------------------------------------------------------------
# Rounding sites and counters


def test_counters_exact_values() -> None:
    counters = RoundingCounters()
    x = torch.tensor([1e-8, 0.0, 1e5, 1.0, 1e-6, -1e-6, math.inf, math.nan, -7e4])
    q = round_to(x, FP16, "site", counters)
    assert torch.allclose(q, quantize(x, FP16), rtol=0, atol=0, equal_nan=True)
    c = counters.read()[("site", "fp16")]
    # nonzero: all but 0.0 (NaN counts as nonzero); underflow: 1e-8 (< 2^-25); subnormal: +-1e-6 (< 2^-14);
    # overflow: 1e5 and -7e4 (> 65504 + half ulp); inf and NaN were not finite to begin with.
    assert (c.elements, c.nonzero, c.underflow, c.subnormal, c.overflow) == (9, 8, 1, 2, 2)
    assert c.underflow_fraction_of_nonzero == 1 / 8 and c.overflow_fraction == 2 / 9
    round_to(torch.tensor([1e-8]), FP16, "site", counters)
    assert counters.read()[("site", "fp16")].underflow == 2
    totals = counters.totals()
    assert totals["fp16"].elements == 10
    assert "site" in counters.summary()
    counters.reset()
    assert counters.read() == {}


def test_counters_through_autocast_forward_and_backward() -> None:
    counters = RoundingCounters()
    x = torch.full((2, 4), 1e-5)
    w = torch.full((3, 4), 1e-5, requires_grad=True)
    with lossscale.autocast("fp16-mixed", counters=counters):
        y = F.linear(x, w)
    # 1e-5 is an FP16 subnormal (< 2^-14); the dot products (4e-10 < 2^-25) underflow: 6 outputs become 0.
    (y * 1e-3).sum().backward()  # backward outside the context still counts
    r = counters.read()
    assert r[("linear.input", "fp16")] == lossscale.SiteCounts(8, 8, 0, 8, 0)
    assert r[("linear.weight", "fp16")] == lossscale.SiteCounts(12, 12, 0, 12, 0)
    assert r[("linear.output", "fp16")] == lossscale.SiteCounts(6, 6, 6, 0, 0)
    # The gradient 1e-3 entering the backward GEMMs is normal; dW = 2 * 1e-3 * 1e-5 = 2e-8 < 2^-25 underflows.
    assert r[("linear.output.grad", "fp16")] == lossscale.SiteCounts(6, 6, 0, 0, 0)
    assert r[("linear.weight.grad", "fp16")] == lossscale.SiteCounts(12, 12, 12, 0, 0)
    assert counters.gemms == {"linear": 1}


def test_counters_read_is_the_only_sync_point() -> None:
    # The per-site storage is a device tensor updated in place; read() returns ints.
    counters = RoundingCounters()
    round_to(torch.tensor([1e-30, 1.0]), BF16, "s", counters)
    state = counters.state()
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 for t in state.values())
    assert isinstance(counters.read()[("s", "bf16")].nonzero, int)


@pytest.mark.parametrize(
    "amax, expected",
    [
        (448.0, 1.0), (449.0, 0.5), (224.0, 2.0), (0.1, 4096.0), (0.0, 1.0), (math.inf, 1.0),
        (1e-30, 2.0**108), (1e-44, 2.0**126),
    ],
)
def test_current_scale_is_largest_power_of_two(amax: float, expected: float) -> None:
    x = torch.tensor([amax, -amax / 2, 0.0])
    scale, inv = current_scale(x, E4M3)
    assert scale.item() == expected and inv.item() == 1 / expected


def test_scaled_round_is_round_of_scaled() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 0.02
    scale, inv = current_scale(x, E4M3)
    assert torch.equal(scaled_round(x, E4M3, "s", None), quantize(x * scale, E4M3) * inv)
    # The amax lands in [max/2, max]: the top binade of E4M3 is used.
    assert E4M3.max / 2 < (x.abs().max() * scale).item() <= E4M3.max


# ------------------------------------------------------------------------------------------------------
# Context behaviour


def test_fp32_and_nested_contexts() -> None:
    x = torch.tensor([[1.0 + 2**-9]])
    w = torch.tensor([[1.0]])
    with lossscale.autocast("bf16-mixed", emulate=True):
        assert F.linear(x, w).item() == 1.0
        with lossscale.autocast("fp32"):
            assert F.linear(x, w).item() == 1.0 + 2**-9
        with lossscale.autocast("fp16-mixed"):
            assert F.linear(x, w).item() == 1.0 + 2**-9  # representable in FP16
            assert F.linear(torch.tensor([[1.0 + 2**-11 + 2**-12]]), w).item() == 1.0 + 2**-10
        assert F.linear(x, w).item() == 1.0
    assert F.linear(x, w).item() == 1.0 + 2**-9


def test_non_fp32_tensors_pass_through() -> None:
    x = torch.tensor([[1.0 + 2**-20]], dtype=torch.float64)
    w = torch.tensor([[1.0]], dtype=torch.float64)
    with lossscale.autocast("bf16-mixed", emulate=True):
        assert F.linear(x, w).item() == 1.0 + 2**-20
        assert (x @ w).item() == 1.0 + 2**-20


def test_matmul_operator_forms_are_emulated() -> None:
    a = torch.tensor([[1.0 + 2**-9]])
    b = torch.tensor([[1.0]])
    with lossscale.autocast("bf16-mixed", emulate=True):
        for out in (a @ b, a.matmul(b), torch.matmul(a, b), a.mm(b), torch.mm(a, b)):
            assert out.item() == 1.0


def test_native_mode_is_torch_autocast() -> None:
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with lossscale.autocast("bf16-mixed", emulate=False, device_type="cpu") as ac:
        y = F.linear(x, w)
    assert not ac.emulated and y.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x, w)
    assert torch.equal(y, ref)
    # emulate=None on CPU chooses emulation.
    with lossscale.autocast("bf16-mixed", device_type="cpu") as ac:
        y = F.linear(x, w)
    assert ac.emulated and y.dtype == torch.float32


def test_autocast_argument_validation() -> None:
    with pytest.raises(ValueError, match="cannot run precision 'fp8-hybrid' natively"):
        lossscale.autocast("fp8-hybrid", emulate=False)
    with pytest.raises(ValueError, match="counters need emulation"):
        lossscale.autocast("bf16-mixed", emulate=False, counters=RoundingCounters())
    with pytest.raises(TypeError, match="emulate must be a bool"):
        lossscale.autocast("bf16-mixed", emulate=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="counters must be a RoundingCounters"):
        lossscale.autocast("bf16-mixed", counters={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision: unknown name"):
        lossscale.autocast("bf17")
    ac = lossscale.autocast("bf16-mixed", emulate=True)
    with ac, pytest.raises(RuntimeError, match="already active"):
        ac.__enter__()


def test_weight_rounded_once_per_context() -> None:
    # A weight used twice gets one rounded copy, so its gradient is summed in FP32 and rounded once.
    counters = RoundingCounters()
    w = torch.tensor([[1.0 + 2**-9]], requires_grad=True)
    x = torch.tensor([[1.0]])
    with lossscale.autocast("bf16-mixed", counters=counters):
        y = F.linear(x, w) + F.linear(2 * x, w)
    y.sum().backward()
    r = counters.read()
    assert r[("linear.weight", "bf16")].elements == 1
    assert r[("linear.weight.grad", "bf16")].elements == 1
    assert w.grad is not None and w.grad.item() == 3.0


def test_model_site_names() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    counters = RoundingCounters()
    with lossscale.autocast("bf16-mixed", counters=counters, model=model):
        model(torch.randn(3, 4)).sum().backward()
    sites = {site for site, _ in counters.read()}
    assert {"0:linear.weight", "2.0:linear.output", "2.0:linear.output.grad"} <= sites
    assert not model._forward_hooks and not model[0]._forward_pre_hooks  # hooks removed on exit


# ------------------------------------------------------------------------------------------------------
# Every low-precision layer is emulated: count the rounded GEMMs per module type.

T, B = 5, 3


def _gemm_cases() -> list[tuple[str, Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]], dict[str, int]]]:
    x3 = lambda: (torch.randn(T, B, 8),)  # noqa: E731
    return [
        ("Linear", lambda: nn.Linear(8, 4), lambda: (torch.randn(B, 8),), {"linear": 1}),
        ("Conv1d", lambda: nn.Conv1d(2, 3, 3), lambda: (torch.randn(B, 2, 8),), {"conv1d": 1}),
        ("Conv2d", lambda: nn.Conv2d(2, 3, 3), lambda: (torch.randn(B, 2, 8, 8),), {"conv2d": 1}),
        ("Conv3d", lambda: nn.Conv3d(2, 3, 3), lambda: (torch.randn(B, 2, 5, 5, 5),), {"conv3d": 1}),
        # One input GEMM over all steps plus one recurrent GEMM per step, per layer and direction.
        ("LSTM", lambda: nn.LSTM(8, 6), x3, {"lstm": 1 + T}),
        ("LSTM-2-layer-bidirectional", lambda: nn.LSTM(8, 6, 2, bidirectional=True), x3, {"lstm": 2 * 2 * (1 + T)}),
        ("LSTM-proj", lambda: nn.LSTM(8, 6, proj_size=4), x3, {"lstm": 1 + 2 * T}),
        ("GRU", lambda: nn.GRU(8, 6, 2), x3, {"gru": 2 * (1 + T)}),
        ("RNN", lambda: nn.RNN(8, 6, nonlinearity="relu"), x3, {"rnn": 1 + T}),
        ("LSTMCell", lambda: nn.LSTMCell(8, 6), lambda: (torch.randn(B, 8),), {"lstm_cell": 2}),
        ("GRUCell", lambda: nn.GRUCell(8, 6), lambda: (torch.randn(B, 8),), {"gru_cell": 2}),
        ("RNNCell", lambda: nn.RNNCell(8, 6), lambda: (torch.randn(B, 8),), {"rnn_tanh_cell": 2}),
        # Packed in-projection (1) + QK^T and PV (2) + out-projection (1).
        ("MultiheadAttention", lambda: nn.MultiheadAttention(8, 2), lambda: (torch.randn(T, B, 8),) * 3, {"mha": 4}),
        (
            "MultiheadAttention-kdim",
            lambda: nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True),
            lambda: (torch.randn(B, T, 8), torch.randn(B, 7, 4), torch.randn(B, 7, 4)),
            {"mha": 6},
        ),
        (
            "TransformerEncoderLayer",
            lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0),
            lambda: (torch.randn(T, B, 8),),
            {"mha": 4, "linear": 2},
        ),
        (
            "TransformerDecoderLayer",
            lambda: nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
            lambda: (torch.randn(B, T, 8), torch.randn(B, 7, 8)),
            # self-attention 4; cross-attention: q and packed kv projections (2) + 2 + out (1).
            {"mha": 9, "linear": 2},
        ),
    ]


@pytest.mark.parametrize("case", _gemm_cases(), ids=lambda c: c[0])
def test_rounded_gemms_per_module_type(
    case: tuple[str, Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]], dict[str, int]],
) -> None:
    _, make, inputs, expected = case
    torch.manual_seed(0)
    module = make()
    counters = RoundingCounters()
    with lossscale.autocast("bf16-mixed", emulate=True, counters=counters):
        out = module(*inputs())
    first = out[0] if isinstance(out, tuple) else out
    first.float().sum().backward()
    assert counters.gemms == expected
    # Every weight matrix went through a rounding site, and so did its gradient.
    sites = {site for site, _ in counters.read()}
    assert any(s.endswith("weight.grad") or "weight_" in s for s in sites)
    for name, p in module.named_parameters():
        assert p.grad is not None, name


def test_packed_sequence_is_refused_not_left_fp32() -> None:
    lstm = nn.LSTM(4, 3)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 4), [5, 3])
    with lossscale.autocast("bf16-mixed", emulate=True), pytest.raises(NotImplementedError, match="PackedSequence"):
        lstm(packed)


def test_fp16_precision_rounds_to_fp16() -> None:
    x = torch.tensor([[1.0 + 2**-11 + 2**-12]])
    with lossscale.autocast(Precision(compute=FP16), emulate=True):
        assert F.linear(x, torch.tensor([[1.0]])).item() == 1.0 + 2**-10


def test_weight_cache_respects_grad_mode() -> None:
    # A weight first used under no_grad must still get a gradient when used with grad in the same context.
    lin = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with lossscale.autocast("bf16-mixed", emulate=True):
        with torch.no_grad():
            lin(x)
        lin(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_current_scaling_accepts_empty_tensors() -> None:
    # An empty batch has no amax: its scale is 1 (nothing to scale), not an error from amax() deep inside.
    scale, inv = current_scale(torch.zeros(0, 4), E4M3)
    assert scale.item() == 1.0 and inv.item() == 1.0
    lin = torch.nn.Linear(4, 3)
    with lossscale.autocast("fp8-hybrid", emulate=True):
        y = lin(torch.zeros(0, 4, requires_grad=True))
    assert y.shape == (0, 3)
    y.sum().backward()
    assert lin.weight.grad is not None and torch.equal(lin.weight.grad, torch.zeros(3, 4))


def test_default_on_a_cuda_machine_emulates_tensors_on_other_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    # emulate=None on a CUDA machine runs CUDA tensors under torch.autocast; a CPU model there must still be
    # emulated, not silently left in FP32. No GPU here: pretend CUDA exists and record torch.autocast's use.
    import contextlib

    import lossscale

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64)
    with lossscale.autocast("bf16-mixed", emulate=True):
        expected = lin(x)
    entered: list[tuple[str, torch.dtype]] = []

    @contextlib.contextmanager
    def fake_autocast(device_type: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
        entered.append((device_type, dtype))
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "autocast", fake_autocast)
    ac = lossscale.autocast("bf16-mixed")
    assert not ac.emulated and ac.device_type == "cuda" and "emulated elsewhere" in repr(ac)
    with ac:
        got = lin(x)
    assert entered == [("cuda", torch.bfloat16)]
    assert torch.equal(got, expected)
    assert not torch.equal(lin(x), expected)  # negative control: plain FP32 differs
