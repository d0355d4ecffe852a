"""quantize: bit-exact against torch's casts, ml_dtypes and a brute-force oracle; laws; stochastic rounding."""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lossscale import BF16, E2M1, E2M3, E3M2, E4M3, E5M2, FP16, FP32, FloatFormat, explain, quantize

from .oracle import neighbours, round_nearest

BOUNDARY_LOWS = (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF)


def _f32_from_patterns(patterns: torch.Tensor) -> torch.Tensor:
    """int64 patterns in [0, 2^32) -> float32 with those bits."""
    return patterns.to(torch.int32).view(torch.float32)  # int64 -> int32 wraps: the same low 32 bits


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: identical bit patterns, or both NaN (payloads may differ)."""
    int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return (a.view(int_dtype) == b.view(int_dtype)) | (a.isnan() & b.isnan())


def _assert_same_bits(got: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> None:
    same = _same_bits(got, ref)
    if not bool(same.all()):
        bad = (~same).nonzero().flatten()[:8]
        raise AssertionError(
            f"{int((~same).sum())} mismatches, e.g. x={x[bad].tolist()} got={got[bad].tolist()} "
            f"expected={ref[bad].tolist()}"
        )


def _wide_sample(n: int, seed: int, lo_exp: int = -160, hi_exp: int = 140) -> torch.Tensor:
    """Random float32 values with exponents spread over [lo_exp, hi_exp] (covering subnormal to inf)."""
    g = torch.Generator().manual_seed(seed)
    mant = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    exp = torch.randint(lo_exp, hi_exp, (n,), generator=g).double()
    sign = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return (sign * mant * torch.exp2(exp)).float()  # inf beyond fp32 range: intended


def _edges(fmt: FloatFormat) -> torch.Tensor:
    """Every edge of a format: around max, the overflow midpoint, min normal, min subnormal and half of it."""
    ulp_max = math.ldexp(1.0, fmt.emax - fmt.mantissa_bits)
    mid = fmt.max + ulp_max / 2
    pts = [0.0, -0.0, math.inf, -math.inf, math.nan, fmt.max, mid, fmt.min_normal, fmt.min_subnormal,
           fmt.min_subnormal / 2, fmt.min_subnormal * 1.5, fmt.min_normal - fmt.min_subnormal / 2,
           fmt.max + ulp_max, 2 * fmt.max, 1.0, 1.0 + fmt.eps / 2, 1.0 + 1.5 * fmt.eps]
    out = []
    for p in pts:
        with np.errstate(over="ignore"):
            p32 = np.float32(p)
        out += [p32, np.nextafter(p32, np.float32(np.inf)), np.nextafter(p32, np.float32(-np.inf))]
    t = torch.tensor(np.array(out, dtype=np.float32))
    return torch.cat([t, -t])


# --------------------------------------------------------------------------------------------------------
# BF16 and FP16: the bit-level kernel against torch's own casts


@pytest.mark.parametrize(("fmt", "dtype"), [(BF16, torch.bfloat16), (FP16, torch.float16)], ids=str)
def test_bit_level_matches_native_on_every_high_half(fmt: FloatFormat, dtype: torch.dtype) -> None:
    hi = torch.arange(1 << 16, dtype=torch.int64) << 16
    lows = torch.tensor(BOUNDARY_LOWS, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    rand_lows = torch.randint(0, 1 << 16, (1 << 16, 4), generator=g)
    patterns = torch.cat([(hi[:, None] | lows[None, :]).flatten(), (hi[:, None] | rand_lows).flatten()])
    x = _f32_from_patterns(patterns)
    _assert_same_bits(quantize(x, fmt, impl="bits"), x.to(dtype).float(), x)


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "dtype"), [(BF16, torch.bfloat16), (FP16, torch.float16)], ids=str)
def test_bit_level_matches_native_on_all_2_32_patterns(fmt: FloatFormat, dtype: torch.dtype) -> None:
    chunk = 1 << 24
    for start in range(0, 1 << 32, chunk):
        x = _f32_from_patterns(torch.arange(start, start + chunk, dtype=torch.int64))
        got = quantize(x, fmt, impl="bits")
        ref = x.to(dtype).float()
        same = _same_bits(got, ref)
        assert bool(same.all()), f"mismatch in patterns [{start:#x}, {start + chunk:#x})"


@pytest.mark.parametrize("fmt", [BF16, FP16, E4M3, E5M2], ids=str)
def test_native_and_bit_level_paths_agree(fmt: FloatFormat) -> None:
    x = torch.cat([_wide_sample(200_000, 1, -40, 40), _edges(fmt)])
    _assert_same_bits(quantize(x, fmt, impl="native"), quantize(x, fmt, impl="bits"), x)
    _assert_same_bits(quantize(x, fmt, impl="auto"), quantize(x, fmt, impl="bits"), x)


# --------------------------------------------------------------------------------------------------------
# FP8 and the OCP MX formats against ml_dtypes and torch's float8 casts

ML_DTYPES = [
    (E4M3, ml_dtypes.float8_e4m3fn),
    (E5M2, ml_dtypes.float8_e5m2),
    (E2M1, ml_dtypes.float4_e2m1fn),
    (E2M3, ml_dtypes.float6_e2m3fn),
    (E3M2, ml_dtypes.float6_e3m2fn),
]


@pytest.mark.parametrize(("fmt", "md"), ML_DTYPES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", ["auto", "bits"])
def test_small_formats_match_ml_dtypes(fmt: FloatFormat, md: type, impl: str) -> None:
    x = torch.cat([_wide_sample(300_000, 2, fmt.emin - fmt.mantissa_bits - 4, fmt.emax + 3), _edges(fmt)])
    if fmt.nonfinite == "none":
        x = x[~x.isnan()]  # ml_dtypes turns NaN into -0 there; we keep NaN (tested below)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = torch.from_numpy(x.numpy().astype(md).astype(np.float32))
    _assert_same_bits(quantize(x, fmt, impl=impl), ref, x)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", [E2M1, E2M3, E3M2], ids=str)
def test_nan_stays_nan_in_formats_without_nan(fmt: FloatFormat) -> None:
    out = quantize(torch.tensor([math.nan, math.inf, -math.inf]), fmt)
    assert out[0].isnan() and out[1].item() == fmt.max and out[2].item() == -fmt.max


def test_e4m3_saturate_matches_torch_cast() -> None:
    # torch's float32 -> float8_e4m3fn cast saturates (inf -> 448): it is the oracle for saturate=True.
    x = torch.cat([_wide_sample(300_000, 3, -14, 12), _edges(E4M3)])
    ref = x.to(torch.float8_e4m3fn).float()
    for impl in ("auto", "bits"):
        _assert_same_bits(quantize(x, E4M3, saturate=True, impl=impl), ref, x)  # type: ignore[arg-type]


def test_e5m2_torch_cast_overflows_to_inf_and_saturate_matches_oracle() -> None:
    x = torch.cat([_wide_sample(300_000, 4, -20, 18), _edges(E5M2)])
    _assert_same_bits(quantize(x, E5M2), x.to(torch.float8_e5m2).float(), x)
    ref = torch.from_numpy(round_nearest(x.numpy(), E5M2, saturate=True).astype(np.float32))
    for impl in ("auto", "bits"):
        _assert_same_bits(quantize(x, E5M2, saturate=True, impl=impl), ref, x)  # type: ignore[arg-type]


def test_e4m3_overflow_midpoint_rounds_to_even() -> None:
    # 464 is halfway between 448 (1.110 x 2^8) and the NaN slot 480: ties to even give 448.
    x = torch.tensor([464.0, np.nextafter(np.float32(464), np.float32(1000)), 1e30, math.inf, -465.0])
    out = quantize(x, E4M3)
    assert out[0].item() == 448.0 and out[1:].isnan().all()


# --------------------------------------------------------------------------------------------------------
# Custom formats against the brute-force oracle

CUSTOM = [
    FloatFormat(3, 2),  # IEEE-style E3M2 (inf, NaN)
    E3M2,
    E2M1,
    FloatFormat(6, 9),
    FloatFormat(4, 3),  # IEEE-style E4M3, max 240
    FloatFormat(5, 4, nonfinite="nan"),
    FloatFormat(7, 12),
    FloatFormat(3, 0, nonfinite="none"),
    dataclasses.replace(FP16, subnormals=False),
    dataclasses.replace(BF16, subnormals=False),
    dataclasses.replace(E4M3, subnormals=False),
]


@pytest.mark.parametrize("fmt", CUSTOM, ids=str)
@pytest.mark.parametrize("saturate", [False, True])
def test_custom_formats_match_brute_force_oracle(fmt: FloatFormat, saturate: bool) -> None:
    x = torch.cat([_wide_sample(100_000, 5, fmt.emin - fmt.mantissa_bits - 4, min(fmt.emax + 3, 130)),
                   _edges(fmt)])
    ref = torch.from_numpy(round_nearest(x.numpy(), fmt, saturate=saturate).astype(np.float32))
    _assert_same_bits(quantize(x, fmt, saturate=saturate), ref, x)


@pytest.mark.parametrize("fmt", [BF16, FP16, E4M3, E5M2, FloatFormat(6, 9), E2M1], ids=str)
def test_float64_inputs_are_rounded_once(fmt: FloatFormat) -> None:
    g = torch.Generator().manual_seed(6)
    n = 100_000
    x = (1 + torch.rand(n, generator=g, dtype=torch.float64)) * torch.exp2(
        torch.randint(fmt.emin - fmt.mantissa_bits - 3, fmt.emax + 2, (n,), generator=g).double()
    )
    # The midpoints between neighbours, and one fp64 ulp either side: where rounding through fp32 first
    # (as torch and ml_dtypes do) goes wrong.
    lo, hi = (torch.from_numpy(v) for v in neighbours(x.numpy(), fmt))
    mid = ((lo + hi) / 2)[hi <= fmt.max]
    inf = torch.tensor(math.inf, dtype=torch.float64)
    x = torch.cat([x, mid, mid.nextafter(inf), mid.nextafter(-inf)])
    ref = torch.from_numpy(round_nearest(x.numpy(), fmt))
    _assert_same_bits(quantize(x, fmt), ref, x)


def test_float64_double_rounding_example() -> None:
    x = torch.tensor([1 + 2**-8 + 2**-40], dtype=torch.float64)
    assert quantize(x, BF16).item() == 1.0078125
    assert x.float().bfloat16().item() == 1.0  # what rounding through fp32 gives


# --------------------------------------------------------------------------------------------------------
# Laws (hypothesis)

FORMATS_FOR_LAWS = [BF16, FP16, E4M3, E5M2, E3M2, FloatFormat(6, 9)]
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@given(st.lists(finite_f32, min_size=1, max_size=64), st.sampled_from(FORMATS_FOR_LAWS))
def test_idempotent(values: list[float], fmt: FloatFormat) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    once = quantize(x, fmt, saturate=True)
    _assert_same_bits(quantize(once, fmt, saturate=True), once, x)


@given(finite_f32, finite_f32, st.sampled_from(FORMATS_FOR_LAWS))
def test_monotone(a: float, b: float, fmt: FloatFormat) -> None:
    lo, hi = sorted((a, b))
    q = quantize(torch.tensor([lo, hi]), fmt, saturate=True)
    assert q[0] <= q[1]


@given(st.lists(st.floats(width=32), min_size=1, max_size=64), st.sampled_from(FORMATS_FOR_LAWS))
def test_sign_symmetric(values: list[float], fmt: FloatFormat) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    _assert_same_bits(quantize(-x, fmt), -quantize(x, fmt), x)


@given(
    st.floats(min_value=1.0, max_value=2.0, exclude_max=True),
    st.integers(-40, 40),
    st.integers(-20, 20),
    st.sampled_from(FORMATS_FOR_LAWS),
)
def test_power_of_two_scaling_commutes_in_the_normal_range(m: float, e: int, k: int, fmt: FloatFormat) -> None:
    x = torch.tensor([m * 2.0**e], dtype=torch.float64).float()
    xs = x * 2.0**k
    for v in (x, xs):  # both in the normal range, and their rounding stays below max
        if not fmt.min_normal <= v.item() <= fmt.max / 2:
            return
    assert quantize(xs, fmt).item() == quantize(x, fmt).item() * 2.0**k


def test_power_of_two_scaling_does_not_commute_for_subnormals() -> None:
    # In FP16, 1.375 * 2^-23 is subnormal (spacing 2^-24): it rounds to 1.5 * 2^-23 (ties to even) and
    # loses precision; scaled by 2^10 it is normal and exact. Loss scaling shifts values out of this region.
    x = torch.tensor([1.375 * 2.0**-23])
    assert quantize(x * 2.0**10, FP16).item() == 1.375 * 2.0**-13
    assert quantize(x, FP16).item() * 2.0**10 == 1.5 * 2.0**-13


# --------------------------------------------------------------------------------------------------------
# Stochastic rounding

SR_FORMATS = [BF16, FP16, E4M3, E5M2, E2M1, FloatFormat(6, 9), dataclasses.replace(FP16, subnormals=False)]


@pytest.mark.parametrize("fmt", SR_FORMATS, ids=str)
def test_stochastic_returns_a_neighbour(fmt: FloatFormat) -> None:
    x = _wide_sample(100_000, 7, fmt.emin - fmt.mantissa_bits - 3, fmt.emax)
    x = x[x.abs() <= fmt.max]
    out = quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(0)).double()
    lo, hi = (torch.from_numpy(v) for v in neighbours(x.numpy(), fmt))
    if not fmt.subnormals:
        lo = torch.where(lo.abs() < fmt.min_normal, lo * 0, lo)
        hi = torch.where(hi.abs() < fmt.min_normal, hi * 0, hi)
    ok = (out == lo) | (out == hi)
    assert bool(ok.all()), x[~ok][:5]


@pytest.mark.parametrize(
    ("fmt", "value", "dtype"),
    [
        (BF16, 1.0 + 2**-9, torch.float32),  # a quarter of an ulp above 1.0
        (BF16, 1.0 + 2**-8 + 2**-10, torch.float32),
        (FP16, 0.3 * 2.0**-24, torch.float32),  # below the min subnormal: rounds up with p = 0.3
        (FP16, 5.7 * 2.0**-24, torch.float32),  # subnormal range
        (E4M3, 0.1, torch.float32),
        (E5M2, 3e-6, torch.float32),  # subnormal range
        (FloatFormat(6, 9), 1.0 / 3.0, torch.float64),
        (BF16, 2.0**-130 * 1.3, torch.float64),  # BF16 subnormal from an fp64 input
    ],
)
def test_stochastic_is_unbiased_within_3_sigma(fmt: FloatFormat, value: float, dtype: torch.dtype) -> None:
    n = 400_000
    x = torch.full((n,), value, dtype=dtype)
    out = quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(1)).double()
    lo, hi = (float(v[0]) for v in neighbours(np.array([x[0].item()]), fmt))
    p = (x[0].item() - lo) / (hi - lo)
    assert set(out.unique().tolist()) <= {lo, hi}
    frac_up = (out == hi).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac_up - p) <= 3 * sigma, (frac_up, p, sigma)


def test_stochastic_is_reproducible_and_uses_the_generator() -> None:
    x = torch.rand(10_000) * 1e-3
    a = quantize(x, FP16, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    b = quantize(x, FP16, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    c = quantize(x, FP16, rounding="stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stochastic_overflow_and_specials() -> None:
    x = torch.tensor([math.nan, math.inf, -math.inf, 1e6, -0.0, 0.0])
    out = quantize(x, FP16, rounding="stochastic")
    assert out[0].isnan() and out[1].item() == math.inf and out[2].item() == -math.inf
    assert out[3].item() == math.inf
    assert math.copysign(1, out[4].item()) == -1 and math.copysign(1, out[5].item()) == 1
    out = quantize(x, E4M3, rounding="stochastic", saturate=True)
    assert out[0].isnan() and out[1:4].tolist() == [448.0, -448.0, 448.0]


# --------------------------------------------------------------------------------------------------------
# Shapes, dtypes, specials, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(0,), (), (3, 0, 2), (2, 3, 4)])
def test_dtype_and_shape_preserved(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape).to(dtype)
    for rounding in ("nearest", "stochastic"):
        out = quantize(x, "e4m3", rounding=rounding)  # type: ignore[arg-type]
        assert out.dtype == dtype and out.shape == x.shape


def test_half_precision_inputs() -> None:
    x = torch.randn(1000).bfloat16()
    assert torch.equal(quantize(x, BF16), x)  # already representable
    assert torch.equal(quantize(x, E4M3), quantize(x.float(), E4M3).bfloat16())
    # Rounded in float32, then cast back: 65504 rounds to 65536 in BF16, which float16 cannot hold.
    h = torch.tensor([65504.0, 3 * 2.0**-24], dtype=torch.float16)
    assert quantize(h, BF16).tolist() == [math.inf, 3 * 2.0**-24]
    assert quantize(h, BF16).dtype == torch.float16


def test_signed_zero_and_fp32_identity() -> None:
    x = torch.tensor([-0.0, 0.0, -1e-45, 1e-45])
    out = quantize(x, FP16)
    assert [math.copysign(1, v) for v in out.tolist()] == [-1, 1, -1, 1]
    assert out.abs().max().item() == 0.0
    y = torch.randn(100)
    q = quantize(y, FP32)
    assert torch.equal(q, y) and q.data_ptr() != y.data_ptr()


def test_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *a: object, _n: str = name, _o: object = original, **k: object) -> object:
            calls.append(_n)
            return _o(self, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, spy)
    x = torch.randn(1000) * 1e-5
    for fmt in (BF16, FP16, E4M3, E5M2, FloatFormat(6, 9), E2M1):
        for rounding in ("nearest", "stochastic"):
            quantize(x, fmt, rounding=rounding)  # type: ignore[arg-type]
            quantize(x.double(), fmt, rounding=rounding)  # type: ignore[arg-type]
    assert calls == []


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: quantize([1.0], BF16), TypeError, "x must be a torch.Tensor"),  # type: ignore[arg-type]
        (lambda: quantize(torch.ones(2, dtype=torch.int32), BF16), TypeError, "floating-point tensor"),
        (lambda: quantize(torch.ones(2), "bf17"), ValueError, "unknown format name"),
        (lambda: quantize(torch.ones(2), "e9m2"), ValueError, "exponent_bits must be in 2..8"),
        (lambda: quantize(torch.ones(2), BF16, rounding="up"), ValueError, r"rounding must be one of \('nearest'"),
        (lambda: quantize(torch.ones(2), BF16, impl="fast"), ValueError, "impl must be one of"),
        (lambda: quantize(torch.ones(2), "e6m9", impl="native"), ValueError, "impl='native' needs"),
        (lambda: quantize(torch.ones(2), BF16, saturate=1), TypeError, "saturate must be a bool"),
        (lambda: quantize(torch.ones(2), BF16, generator=3), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_input(call: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        call()  # type: ignore[operator]


def test_explain_statuses() -> None:
    assert explain(1e-8, "fp16").status == "underflow"
    assert explain(1e-6, "fp16").status == "subnormal"
    assert explain(70000.0, "fp16").status == "overflow"
    assert explain(math.inf, "e4m3").status == "overflow"
    assert explain(500.0, "e4m3", saturate=True).status == "saturated"
    assert explain(3.0, "e2m1").status == "exact"
    info = explain(0.1, "bf16")
    assert info.status == "rounded" and info.bits == 0x3DCD and info.bits_str == "0|01111011|1001101"
    assert info.relative_error == pytest.approx(abs(0.10009765625 - 0.1) / 0.1)


@pytest.mark.parametrize("fmt", [FP16, E5M2, E4M3, E2M1, BF16], ids=str)
def test_stochastic_just_past_max_rounds_to_max_or_overflows(fmt: FloatFormat) -> None:
    # Between max and the overflow midpoint: nearest gives max; stochastic gives max or the overflow value
    # (inf, NaN, or max again for saturating formats), never a finite value past max.
    ulp = math.ldexp(1.0, fmt.emax - fmt.mantissa_bits)
    x = torch.full((20_000,), fmt.max + ulp / 4, dtype=torch.float64).float()
    out = quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(0))
    assert quantize(x[:1], fmt).item() == fmt.max
    at_max = (out == fmt.max).double().mean().item()
    overflowed = {"ieee": out.isinf(), "nan": out.isnan(), "none": out == fmt.max}[fmt.nonfinite]
    assert bool(((out == fmt.max) | overflowed).all())
    if fmt.nonfinite != "none":
        p_up = 0.25  # (max + ulp/4 - max) / ulp
        assert abs((1 - at_max) - p_up) <= 3 * math.sqrt(p_up * (1 - p_up) / x.numel())


def test_stochastic_bf16_specials_and_nan_payloads() -> None:
    # The 8-exponent-bit fast path adds random bits to the signed pattern: NaN payloads near the top (and
    # negative NaNs, whose pattern is 0xFFFF...) may carry into the sign bit, so NaN must be restored.
    patterns = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000, 0x7F800000, -8388608, -2147483648, 0,
                             0x7F7F8000, 0x00008000], dtype=torch.int32)  # ..., +inf, -inf, -0, +0, big, tiny
    x = patterns.view(torch.float32).repeat_interleave(2000)
    out = quantize(x, BF16, rounding="stochastic", generator=torch.Generator().manual_seed(0)).view(10, -1)
    assert out[:4].isnan().all()
    assert (out[4] == math.inf).all() and (out[5] == -math.inf).all()
    assert (out[6].view(torch.int32) == -2147483648).all() and (out[7].view(torch.int32) == 0).all()
    assert set(out[8].tolist()) == {BF16.max, math.inf}  # halfway between BF16 max and 2^128
    assert set(out[9].tolist()) == {0.0, 2.0**-133}  # half of the smallest BF16 subnormal
