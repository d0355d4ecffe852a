"""FloatFormat: derived constants against torch.finfo, ml_dtypes.finfo and the reference table."""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from lossscale import BF16, E2M1, E2M3, E3M2, E4M3, E5M2, FP16, FP32, PRESETS, FloatFormat

TORCH_MIRRORS = [
    (FP32, torch.float32),
    (BF16, torch.bfloat16),
    (FP16, torch.float16),
    (E4M3, torch.float8_e4m3fn),
    (E5M2, torch.float8_e5m2),
]

ML_DTYPES_MIRRORS = [
    (BF16, ml_dtypes.bfloat16),
    (E4M3, ml_dtypes.float8_e4m3fn),
    (E5M2, ml_dtypes.float8_e5m2),
    (E2M1, ml_dtypes.float4_e2m1fn),
    (E2M3, ml_dtypes.float6_e2m3fn),
    (E3M2, ml_dtypes.float6_e3m2fn),
]


@pytest.mark.parametrize(("fmt", "dtype"), TORCH_MIRRORS, ids=lambda v: str(v))
def test_presets_match_torch_finfo(fmt: FloatFormat, dtype: torch.dtype) -> None:
    fi = torch.finfo(dtype)
    assert fmt.max == fi.max
    assert fmt.min_normal == fi.tiny
    # torch.finfo has no smallest_subnormal: read it off the pattern 0...01 of the dtype itself.
    int_dtype = {8: torch.uint8, 16: torch.int16, 32: torch.int32}[fi.bits]
    assert fmt.min_subnormal == torch.ones(1, dtype=int_dtype).view(dtype).double().item()
    assert fmt.min_normal == fi.smallest_normal
    assert fmt.eps == fi.eps
    assert fmt.bits == fi.bits
    assert fmt.torch_dtype == dtype
    assert FloatFormat.parse(dtype) == fmt


@pytest.mark.parametrize(("fmt", "dtype"), ML_DTYPES_MIRRORS, ids=lambda v: str(v))
def test_presets_match_ml_dtypes_finfo(fmt: FloatFormat, dtype: type) -> None:
    fi = ml_dtypes.finfo(dtype)
    assert fmt.max == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert fmt.eps == float(fi.eps)
    assert fmt.bits == fi.bits


@pytest.mark.parametrize(("fmt", "dtype"), ML_DTYPES_MIRRORS, ids=lambda v: str(v))
def test_decode_matches_ml_dtypes_bit_patterns(fmt: FloatFormat, dtype: type) -> None:
    n = fmt.num_patterns
    raw = np.arange(n, dtype=np.uint16 if fmt.bits > 8 else np.uint8)
    with np.errstate(invalid="ignore"):  # NaN patterns
        expected = raw.view(dtype).astype(np.float64)  # 4- and 6-bit types: one per byte, low bits
    got = np.array([fmt.decode(int(b)) for b in range(n)])
    np.testing.assert_array_equal(got, expected)  # NaN == NaN for assert_array_equal


def test_reference_table_values() -> None:
    # The constants as the specifications state them: IEEE 754-2019 binary16; bfloat16 (the top half of
    # binary32); OCP 8-bit Floating Point Specification (OFP8) rev. 1.0 for E4M3/E5M2; OCP Microscaling
    # Formats (MX) v1.0 for E2M1/E2M3/E3M2.
    assert (BF16.bias, BF16.max, BF16.min_normal, BF16.min_subnormal, BF16.eps) == (
        127, (2 - 2**-7) * 2.0**127, 2.0**-126, 2.0**-133, 2.0**-7
    )
    assert (FP16.bias, FP16.max, FP16.min_normal, FP16.min_subnormal) == (15, 65504.0, 2.0**-14, 2.0**-24)
    assert (E4M3.bias, E4M3.max, E4M3.min_normal, E4M3.min_subnormal, E4M3.eps) == (
        7, 448.0, 2.0**-6, 2.0**-9, 0.125
    )
    assert (E5M2.bias, E5M2.max, E5M2.min_normal, E5M2.min_subnormal) == (15, 57344.0, 2.0**-14, 2.0**-16)
    assert (E2M1.max, E2M3.max, E3M2.max) == (6.0, 7.5, 28.0)
    assert E4M3.has_nan and not E4M3.has_inf and E5M2.has_inf and not E2M1.has_nan


def test_custom_format_constants() -> None:
    e6m9 = FloatFormat(6, 9)
    assert e6m9.bias == 31 and e6m9.bits == 16
    assert e6m9.max == (2 - 2**-9) * 2.0**31
    assert e6m9.min_normal == 2.0**-30 and e6m9.min_subnormal == 2.0**-39
    e4m3_ieee = FloatFormat(4, 3)
    assert e4m3_ieee.max == 240.0 and e4m3_ieee.name == "e4m3ieee"
    e3m0 = FloatFormat(3, 0, nonfinite="nan")  # top exponent's only pattern is the NaN
    assert e3m0.max == 8.0 and e3m0.min_subnormal == e3m0.min_normal == 0.25
    ftz = dataclasses.replace(BF16, subnormals=False)
    assert ftz.min_subnormal == 2.0**-126 and ftz.name == "bf16-ftz"


@pytest.mark.parametrize(
    "spec",
    ["bf16", "fp16", "fp32", "e4m3", "e5m2", "e2m1", "e2m3", "e3m2", "e6m9", "e4m3ieee", "e3m2fn",
     "e5m7f", "e2m1fn", "bf16-ftz", "e6m9-ftz", "e8m0fn"],
)
def test_name_round_trips(spec: str) -> None:
    fmt = FloatFormat.parse(spec)
    assert fmt.name == spec
    assert FloatFormat.parse(fmt.name) == fmt
    assert FloatFormat.parse(fmt) is fmt


@pytest.mark.parametrize(
    ("alias", "fmt"),
    [("BF16", BF16), ("bfloat16", BF16), ("torch.float16", FP16), ("half", FP16), ("float8_e4m3fn", E4M3),
     ("E4M3FN", E4M3), ("fp8_e5m2", E5M2), ("float4_e2m1fn", E2M1), (" float32 ", FP32)],
)
def test_parse_aliases(alias: str, fmt: FloatFormat) -> None:
    assert FloatFormat.parse(alias) == fmt


SMALL_FORMATS = [f for f in PRESETS.values() if f.bits <= 16] + [FloatFormat(6, 9), FloatFormat(3, 4, "nan")]


@pytest.mark.parametrize("fmt", SMALL_FORMATS, ids=str)
def test_encode_decode_round_trip_every_pattern(fmt: FloatFormat) -> None:
    for b in range(fmt.num_patterns):
        v = fmt.decode(b)
        if math.isnan(v):
            assert fmt.encode(v) is not None
            assert math.isnan(fmt.decode(fmt.encode(v)))  # type: ignore[arg-type]
        else:
            assert fmt.encode(v) == b


def test_encode_refuses_unrepresentable() -> None:
    with pytest.raises(ValueError, match="not representable"):
        BF16.encode(1.0 + 2**-9)
    with pytest.raises(ValueError, match="not representable"):
        E4M3.encode(500.0)
    assert E2M1.encode(math.nan) is None and E4M3.encode(math.inf) is None


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(exponent_bits=1, mantissa_bits=3), ValueError, "exponent_bits must be in 2..8"),
        (dict(exponent_bits=9, mantissa_bits=3), ValueError, "exponent_bits must be in 2..8"),
        (dict(exponent_bits=5, mantissa_bits=24), ValueError, "mantissa_bits must be in 0..23"),
        (dict(exponent_bits=5, mantissa_bits=-1), ValueError, "mantissa_bits must be in 0..23"),
        (dict(exponent_bits=5, mantissa_bits=0), ValueError, "no NaN encoding"),
        (dict(exponent_bits=8, mantissa_bits=3, nonfinite="nan"), ValueError, "beyond FP32's range"),
        (dict(exponent_bits=8, mantissa_bits=3, nonfinite="none"), ValueError, "beyond FP32's range"),
        (dict(exponent_bits=4, mantissa_bits=3, nonfinite="fnuz"), ValueError, "nonfinite must be one of"),
        (dict(exponent_bits=4.0, mantissa_bits=3), TypeError, "exponent_bits must be an int"),
        (dict(exponent_bits=True, mantissa_bits=3), TypeError, "exponent_bits must be an int"),
        (dict(exponent_bits=4, mantissa_bits=3, subnormals=1), TypeError, "subnormals must be a bool"),
    ],
)
def test_invalid_formats_are_refused(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        FloatFormat(**kwargs)


def test_parse_errors_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="unknown format name 'bf17'.*allowed: fp32, bf16"):
        FloatFormat.parse("bf17")
    with pytest.raises(ValueError, match="torch dtype torch.int32 has no FloatFormat"):
        FloatFormat.parse(torch.int32)
    with pytest.raises(TypeError, match="format must be a FloatFormat"):
        FloatFormat.parse(16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exponent_bits must be in 2..8"):
        FloatFormat.parse("e9m2")


def test_formats_are_frozen_and_hashable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        BF16.mantissa_bits = 8  # type: ignore[misc]
    assert len({BF16, FloatFormat(8, 7), FP16}) == 2


def test_presets_are_read_only() -> None:
    assert PRESETS["bf16"] is BF16 and list(PRESETS) == ["fp32", "bf16", "fp16", "e4m3", "e5m2", "e2m1", "e2m3", "e3m2"]
    with pytest.raises(TypeError):
        PRESETS["mine"] = FloatFormat(6, 9)  # type: ignore[index]
    assert "mine" not in PRESETS
