"""Floating-point number formats as data.

A binary floating-point format with ``E`` exponent bits and ``M`` mantissa bits stores

    sign (1 bit) | exponent field (E bits) | mantissa field (M bits)

and, for an exponent field ``f`` and mantissa field ``m``:

    f == 0              subnormal:  (-1)^s * 2^(1 - bias) * (m / 2^M)      (or zero)
    0 < f < top         normal:     (-1)^s * 2^(f - bias) * (1 + m / 2^M)
    f == top = 2^E - 1  depends on the format's non-finite encodings (``nonfinite``):
        "ieee"  every pattern is special: m == 0 is +-inf, m != 0 is NaN (FP32, BF16, FP16, E5M2)
        "nan"   normal numbers, except the single pattern m == all ones, which is NaN (E4M3FN)
        "none"  normal numbers; the format has neither inf nor NaN (the OCP MX E2M1, E2M3, E3M2)

with ``bias = 2^(E-1) - 1``. A format may also flush subnormals to zero (``subnormals=False``, as TPUs do
for BF16): then the smallest positive value is ``min_normal``.

Sources: IEEE 754-2019; "FP8 Formats for Deep Learning" (Micikevicius et al., arXiv:2209.05433) for E4M3/
E5M2; the OCP Microscaling Formats (MX) v1.0 specification for E2M1, E2M3 and E3M2.

Formats are limited to what FP32 can carry exactly (exponent bits 2..8, mantissa bits 0..23), because every
computation in lossscale happens in an FP32 (or FP64) container.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
from collections.abc import Mapping
from typing import Literal, Union

import torch

__all__ = [
    "FloatFormat",
    "NonFinite",
    "FormatLike",
    "BF16",
    "FP16",
    "FP32",
    "E4M3",
    "E5M2",
    "E2M1",
    "E2M3",
    "E3M2",
    "PRESETS",
]

NonFinite = Literal["ieee", "nan", "none"]
_NONFINITE_CHOICES: tuple[str, ...] = ("ieee", "nan", "none")
# Suffixes of generic names ("e6m9", "e4m3fn", "e3m2fnuz"-like): ieee has none.
_SUFFIX = {"ieee": "", "nan": "fn", "none": "f"}


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: ``exponent_bits`` and ``mantissa_bits`` plus its special values.

    Args:
        exponent_bits: width of the exponent field, 2..8.
        mantissa_bits: width of the stored mantissa (without the implicit bit), 0..23.
        nonfinite: what the top exponent field encodes: ``"ieee"`` (inf and NaN, the default),
            ``"nan"`` (finite numbers and a single NaN pattern, as E4M3FN) or ``"none"`` (finite only,
            as the OCP MX formats E2M1, E2M3, E3M2).
        subnormals: False flushes subnormal results to zero (sign kept), as TPUs do for BF16.

    Example:
        >>> from lossscale import FloatFormat
        >>> FloatFormat(4, 3, nonfinite="nan").max
        448.0
        >>> FloatFormat.parse("bf16").min_subnormal == 2.0**-133
        True
        >>> FloatFormat(6, 9).name
        'e6m9'
    """

    exponent_bits: int
    mantissa_bits: int
    nonfinite: NonFinite = "ieee"
    subnormals: bool = True

    def __post_init__(self) -> None:
        for field in ("exponent_bits", "mantissa_bits"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{field} must be an int, got {type(value).__name__}")
        if not 2 <= self.exponent_bits <= 8:
            raise ValueError(
                f"exponent_bits must be in 2..8 (formats must fit in FP32), got {self.exponent_bits}"
            )
        if not 0 <= self.mantissa_bits <= 23:
            raise ValueError(
                f"mantissa_bits must be in 0..23 (formats must fit in FP32), got {self.mantissa_bits}"
            )
        if self.nonfinite not in _NONFINITE_CHOICES:
            raise ValueError(
                f"nonfinite must be one of {_NONFINITE_CHOICES}, got {self.nonfinite!r}"
            )
        if not isinstance(self.subnormals, bool):
            raise TypeError(f"subnormals must be a bool, got {type(self.subnormals).__name__}")
        if self.nonfinite == "ieee" and self.mantissa_bits == 0:
            raise ValueError(
                "an IEEE-style format with 0 mantissa bits has no NaN encoding (the top exponent field "
                "would hold only inf); use nonfinite='nan' or 'none', or at least 1 mantissa bit"
            )
        if self.emax > 127:
            raise ValueError(
                "a finite-only format with 8 exponent bits reaches 2^128, beyond FP32's range; "
                "use nonfinite='ieee' or fewer exponent bits"
            )

    # ----------------------------------------------------------------------------------------------
    # Derived properties
    @property
    def bits(self) -> int:
        """Total width: sign + exponent + mantissa."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        """Exponent bias, ``2^(E-1) - 1``."""
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def has_inf(self) -> bool:
        return self.nonfinite == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.nonfinite != "none"

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number, ``1 - bias``."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite number."""
        top = (1 << self.exponent_bits) - 1
        if self.nonfinite == "ieee" or (self.nonfinite == "nan" and self.mantissa_bits == 0):
            # The top exponent field holds no finite number (for "nan" with M == 0 its only
            # pattern is the NaN).
            return top - 1 - self.bias
        return top - self.bias

    @property
    def max(self) -> float:
        """Largest finite value."""
        m = self.mantissa_bits
        if self.nonfinite == "nan" and m > 0:
            # The all-ones mantissa of the top exponent is the NaN: the largest mantissa is 1...10.
            significand = 2.0 - 2.0 ** (1 - m)
        else:
            significand = 2.0 - 2.0**-m
        return math.ldexp(significand, self.emax)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, ``2^emin``."""
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value: ``2^(emin - M)``, or ``min_normal`` when subnormals are flushed."""
        if not self.subnormals:
            return self.min_normal
        return math.ldexp(1.0, self.emin - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Distance from 1.0 to the next larger value, ``2^-M``."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @functools.cached_property
    def name(self) -> str:
        """Lower-case name used in files and CLI flags: ``"bf16"``, ``"e4m3"``, ``"e6m9"``, ...

        Cached: rounding sites look it up on every call (a frozen dataclass's fields never change)."""
        for preset_name, preset in PRESETS.items():
            if preset == self:
                return preset_name
            if preset == dataclasses.replace(self, subnormals=True) and not self.subnormals:
                return preset_name + "-ftz"
        base = f"e{self.exponent_bits}m{self.mantissa_bits}"
        suffix = _SUFFIX[self.nonfinite]
        if not suffix and base in PRESETS:
            # e.g. an IEEE-style E4M3 (max 240) must not be confused with the E4M3FN preset.
            suffix = "ieee"
        return base + suffix + ("" if self.subnormals else "-ftz")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype with exactly this format's values, if torch has one."""
        return _TORCH_DTYPES.get(self)

    # ----------------------------------------------------------------------------------------------
    # Encodings
    @property
    def num_patterns(self) -> int:
        """Number of bit patterns, ``2^bits``."""
        return 1 << self.bits

    def decode(self, bits: int) -> float:
        """The value of a bit pattern (an int in ``[0, 2^bits)``); NaN patterns give ``nan``.

        >>> from lossscale import E4M3
        >>> E4M3.decode(0b0_1111_110), E4M3.decode(0b0_1111_111)
        (448.0, nan)
        """
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise TypeError(f"bits must be an int, got {type(bits).__name__}")
        if not 0 <= bits < self.num_patterns:
            raise ValueError(f"bits must be in [0, {self.num_patterns}), got {bits}")
        e_bits, m_bits = self.exponent_bits, self.mantissa_bits
        sign = -1.0 if bits >> (e_bits + m_bits) else 1.0
        field = (bits >> m_bits) & ((1 << e_bits) - 1)
        mant = bits & ((1 << m_bits) - 1)
        top = (1 << e_bits) - 1
        if field == top and self.nonfinite == "ieee":
            return sign * math.inf if mant == 0 else math.nan
        if field == top and self.nonfinite == "nan" and mant == (1 << m_bits) - 1:
            return math.nan
        if field == 0:
            if not self.subnormals:
                return sign * 0.0
            return sign * math.ldexp(mant, self.emin - m_bits)
        return sign * math.ldexp((1 << m_bits) | mant, field - self.bias - m_bits)

    def encode(self, value: float) -> int | None:
        """The bit pattern of a value the format holds exactly (as :func:`~lossscale.quantize` returns);
        ``None`` for a value it cannot encode (NaN or inf in a finite-only format).

        NaN encodes as the canonical quiet NaN (IEEE-style) or the single NaN pattern (E4M3FN).
        Raises ``ValueError`` for a finite value that is not exactly representable.

        >>> from lossscale import BF16
        >>> hex(BF16.encode(1.0)), hex(BF16.encode(-2.0**-133))
        ('0x3f80', '0x8001')
        """
        value = float(value)
        e_bits, m_bits = self.exponent_bits, self.mantissa_bits
        top = (1 << e_bits) - 1
        sign = (1 << (e_bits + m_bits)) if math.copysign(1.0, value) < 0 else 0
        if math.isnan(value):
            if self.nonfinite == "none":
                return None
            if self.nonfinite == "nan":
                return (top << m_bits) | ((1 << m_bits) - 1)
            return (top << m_bits) | (1 << (m_bits - 1))
        if math.isinf(value):
            return sign | (top << m_bits) if self.has_inf else None
        mag = abs(value)
        if mag == 0.0:
            return sign
        if mag > self.max or (mag < self.min_normal and not self.subnormals):
            raise ValueError(f"value {value!r} is not representable in {self.name}")
        _, exp = math.frexp(mag)  # mag = f * 2^exp, 0.5 <= f < 1
        e = exp - 1
        if e < self.emin:  # subnormal
            mant_f = math.ldexp(mag, m_bits - self.emin)
            field = 0
        else:
            mant_f = math.ldexp(mag, m_bits - e) - (1 << m_bits)
            field = e + self.bias
        if mant_f != int(mant_f):
            raise ValueError(f"value {value!r} is not representable in {self.name}")
        return sign | (field << m_bits) | int(mant_f)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return (
            f"FloatFormat(exponent_bits={self.exponent_bits}, mantissa_bits={self.mantissa_bits}, "
            f"nonfinite={self.nonfinite!r}, subnormals={self.subnormals})  # {self.name}"
        )

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: FormatLike) -> FloatFormat:
        """A format from a name (``"bf16"``, ``"E4M3"``, ``"e6m9"``, ``"e4m3fn"``, ``"fp16-ftz"``), a torch
        dtype (``torch.bfloat16``) or a ``FloatFormat`` (returned as is).

        Generic names are ``e<E>m<M>`` with an optional suffix: none or ``ieee`` (inf and NaN), ``fn``
        (a single NaN, like ``float8_e4m3fn``), ``f`` (finite only); and ``-ftz`` to flush subnormals.
        A bare ``e4m3``/``e2m1``/``e2m3``/``e3m2`` is the preset (finite-only forms).
        """
        if isinstance(spec, FloatFormat):
            return spec
        if isinstance(spec, torch.dtype):
            for fmt, dtype in _TORCH_DTYPES.items():
                if dtype == spec:
                    return fmt
            raise ValueError(
                f"format: torch dtype {spec} has no FloatFormat; allowed dtypes: "
                + ", ".join(str(d) for d in _TORCH_DTYPES.values())
            )
        if not isinstance(spec, str):
            raise TypeError(
                f"format must be a FloatFormat, a format name or a torch dtype, got {type(spec).__name__}"
            )
        key = spec.strip().lower().replace("_", "").replace("torch.", "")
        ftz = key.endswith("-ftz")
        if ftz:
            key = key[: -len("-ftz")]
        found = _ALIASES.get(key)
        if found is not None:
            fmt = found
        else:
            match = re.fullmatch(r"(?:float\d*)?e(\d+)m(\d+)(ieee|fn|f)?", key)
            if match is None:
                raise ValueError(
                    f"format: unknown format name {spec!r}; allowed: {', '.join(PRESETS)}, "
                    "'e<E>m<M>' with an optional suffix 'ieee', 'fn' or 'f', and '-ftz'"
                )
            e, m, suffix = int(match.group(1)), int(match.group(2)), match.group(3)
            if suffix is None and f"e{e}m{m}" in PRESETS:
                fmt = PRESETS[f"e{e}m{m}"]
            else:
                nonfinite: NonFinite = {None: "ieee", "ieee": "ieee", "fn": "nan", "f": "none"}[suffix]  # type: ignore[assignment]
                fmt = cls(e, m, nonfinite=nonfinite)
        return dataclasses.replace(fmt, subnormals=False) if ftz else fmt


FormatLike = Union[FloatFormat, str, torch.dtype]

FP32 = FloatFormat(8, 23)
BF16 = FloatFormat(8, 7)
FP16 = FloatFormat(5, 10)
E4M3 = FloatFormat(4, 3, nonfinite="nan")
E5M2 = FloatFormat(5, 2)
E2M1 = FloatFormat(2, 1, nonfinite="none")
E2M3 = FloatFormat(2, 3, nonfinite="none")
E3M2 = FloatFormat(3, 2, nonfinite="none")

# Read-only: a lookup table shared by every caller (``lossscale.PRESETS["bf16"]``), not a registry to add to.
PRESETS: Mapping[str, FloatFormat] = types.MappingProxyType({
    "fp32": FP32,
    "bf16": BF16,
    "fp16": FP16,
    "e4m3": E4M3,
    "e5m2": E5M2,
    "e2m1": E2M1,
    "e2m3": E2M3,
    "e3m2": E3M2,
})

_TORCH_DTYPES: dict[FloatFormat, torch.dtype] = {
    FP32: torch.float32,
    BF16: torch.bfloat16,
    FP16: torch.float16,
    E4M3: torch.float8_e4m3fn,
    E5M2: torch.float8_e5m2,
}

_ALIASES: dict[str, FloatFormat] = {
    **PRESETS,
    "float32": FP32,
    "float": FP32,
    "bfloat16": BF16,
    "float16": FP16,
    "half": FP16,
    "fp8e4m3": E4M3,
    "fp8e5m2": E5M2,
    "e4m3fn": E4M3,
    "float8e4m3fn": E4M3,
    "float8e4m3": E4M3,
    "float8e5m2": E5M2,
    "fp4e2m1": E2M1,
    "float4e2m1fn": E2M1,
    "fp6e2m3": E2M3,
    "float6e2m3fn": E2M3,
    "fp6e3m2": E3M2,
    "float6e3m2fn": E3M2,
}
