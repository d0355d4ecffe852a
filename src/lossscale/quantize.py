"""Rounding to a :class:`~lossscale.formats.FloatFormat`: round-to-nearest-even and stochastic rounding.

Two implementations give the same bits:

* ``native``: torch's own casts (``x.to(torch.bfloat16).to(x.dtype)``), for the formats torch has, with
  lossscale's overflow semantics put on top (torch's float32 -> float8_e4m3fn cast saturates; ours does not
  unless asked). Fast; used by default for FP32/BF16/FP16 containers' nearest rounding.
* ``bits``: lossscale's own vectorised bit-level kernel, for every format (and the only correct one for
  float64 inputs: torch and ml_dtypes round float64 through float32 first, which rounds twice).

The bit-level kernel works on the magnitude's bit pattern ``a`` in the container (int32 for float32, int64 for
float64). With ``s = C - M`` (C = container mantissa bits, M = format mantissa bits):

    nearest:     a' = (a + (2^(s-1) - 1) + ((a >> s) & 1)) & ~(2^s - 1)     # round half to even
    stochastic:  a' = (a + R) & ~(2^s - 1),  R ~ U{0, ..., 2^s - 1}         # P(up) = dropped bits / 2^s

A carry out of the mantissa increments the exponent field, which is exactly the next binade's first value,
so one integer add rounds every value whose result is normal in the format. Results in the format's
subnormal range have a fixed spacing ``q = min_subnormal``; there the kernel rounds ``|x|`` to a multiple of
``q`` instead (nearest: ``(|x| + q*2^C) - q*2^C``, a single correctly rounded container addition, since the
container's ulp at ``q*2^C`` is ``q``; stochastic: fixed point with 2^F fractional bits). Values that round
past ``max`` overflow to inf (IEEE-style formats), NaN (formats whose only special is NaN, as ml_dtypes and
the OCP FP8 non-saturating conversion do) or saturate to ``max`` (formats with neither, as ml_dtypes does).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

from .formats import FP32, FloatFormat, FormatLike

__all__ = ["quantize", "Rounding", "Impl"]

Rounding = Literal["nearest", "stochastic"]
Impl = Literal["auto", "native", "bits"]
_ROUNDINGS = ("nearest", "stochastic")
_IMPLS = ("auto", "native", "bits")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    rounding: Rounding = "nearest",
    saturate: bool = False,
    generator: torch.Generator | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Round ``x`` to the values of ``fmt``; returns a new tensor of ``x``'s dtype, shape and device.

    Args:
        x: a float32, float64, bfloat16 or float16 tensor (any shape, including empty and 0-d).
        fmt: a :class:`FloatFormat`, a format name (``"bf16"``, ``"e4m3"``, ``"e6m9"``) or a torch dtype.
        rounding: ``"nearest"`` (round half to even) or ``"stochastic"`` (rounds up with probability
            equal to the distance from the lower neighbour over the gap, so ``E[q(x)] = x`` inside the
            range; the result is always one of the two neighbours).
        saturate: clamp to ``+-max`` whatever would overflow, infinities included (what Transformer Engine
            and torch's float32 -> float8_e4m3fn CPU cast do). The default keeps overflow visible, as a loss
            scaler needs: ``+-inf`` for formats with infinities, NaN for E4M3FN-like formats; formats with
            neither (E2M1, E2M3, E3M2) always saturate.
        generator: random source for stochastic rounding (default: torch's global generator).
        impl: ``"auto"`` (torch's native cast where it gives the same bits, else the bit-level kernel),
            ``"native"`` (require the native cast) or ``"bits"`` (force lossscale's own kernel, e.g. to test
            it against the native cast).

    NaN stays NaN, also in formats that cannot encode it (E2M1, E2M3, E3M2; ml_dtypes turns it into -0 there:
    we keep it visible instead). Signed zeros keep their sign. Subnormals follow the format (flushed to zero,
    sign kept, when ``fmt.subnormals`` is False: results are rounded as if subnormals existed, then
    flushed). float64 inputs are rounded once, correctly. bfloat16/float16 inputs are rounded in float32 and
    cast back, which is exact when the format's values fit in the input dtype.

    Does not synchronise with the device (no ``.item()``); works on any device.

    Example:
        >>> import torch
        >>> from lossscale import quantize
        >>> quantize(torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 70000.0]), "bf16").tolist()
        [1.0, 1.015625, 70144.0]
        >>> quantize(torch.tensor([500.0, 1e6]), "e4m3").tolist()
        [nan, nan]
        >>> quantize(torch.tensor([500.0, float("inf")]), "e4m3", saturate=True).tolist()
        [448.0, 448.0]
        >>> quantize(torch.tensor([1.0 + 2**-8 + 2**-40], dtype=torch.float64), "bf16").item()
        1.0078125
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"x must be a floating-point tensor of dtype float32, float64, bfloat16 or float16, got {x.dtype}"
        )
    fmt = FloatFormat.parse(fmt)
    if rounding not in _ROUNDINGS:
        raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {rounding!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if not isinstance(saturate, bool):
        raise TypeError(f"saturate must be a bool, got {type(saturate).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if impl == "native" and (rounding != "nearest" or not _native_ok(x.dtype, fmt)):
        raise ValueError(
            f"impl='native' needs rounding='nearest', a float32/bfloat16/float16 input and a format torch has "
            f"(fp32, bf16, fp16, e4m3, e5m2, with subnormals); got rounding={rounding!r}, x.dtype={x.dtype}, "
            f"fmt={fmt.name}"
        )

    if x.dtype in (torch.bfloat16, torch.float16):
        # Upcasting is exact; the container round trip is exact when fmt fits in x's dtype.
        return quantize(
            x.float(), fmt, rounding=rounding, saturate=saturate, generator=generator, impl=impl
        ).to(x.dtype)

    if x.numel() == 0:
        return x.clone()
    if saturate:
        # Clamping to +-max first is the saturating conversion: max rounds to itself, and every value that
        # would round past max (inf included) becomes max. NaN passes through clamp unchanged.
        x = x.clamp(-fmt.max, fmt.max)
    if fmt == FP32:
        # Identity for float32; float64 -> float32 is a single correctly rounded native cast.
        return x.clone() if x.dtype == torch.float32 else x.float().double()
    if rounding == "nearest" and impl != "bits" and _native_ok(x.dtype, fmt):
        return _native_nearest(x, fmt)
    return _bits(x, fmt, rounding, generator)


# ------------------------------------------------------------------------------------------------------
# Native path


def _native_ok(dtype: torch.dtype, fmt: FloatFormat) -> bool:
    return dtype == torch.float32 and fmt.torch_dtype is not None


def _native_nearest(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    target = fmt.torch_dtype
    assert target is not None  # guarded by _native_ok
    out = x.to(target).to(x.dtype)
    if fmt.nonfinite == "nan":
        # torch's float32 -> float8_e4m3fn cast saturates (even inf -> 448); the non-saturating
        # conversion (OCP FP8 spec, ml_dtypes) gives NaN for whatever rounds past max. Past max means
        # strictly above the midpoint max + ulp/2: the midpoint itself rounds to max, whose last mantissa
        # bit is 0 (1.10 for E4M3), i.e. to even.
        out = out.masked_fill_(x.abs() > _overflow_midpoint(fmt), math.nan)
    return out


def _overflow_midpoint(fmt: FloatFormat) -> float:
    return fmt.max + math.ldexp(1.0, fmt.emax - fmt.mantissa_bits - 1)


# ------------------------------------------------------------------------------------------------------
# Bit-level path


class _Container:
    """Bit layout of the float container the kernel computes in.

    float32: sign(1) | exponent(8) | mantissa(23)      float64: sign(1) | exponent(11) | mantissa(52)
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        if dtype == torch.float32:
            self.int_dtype, self.mantissa_bits, self.exponent_bits = torch.int32, 23, 8
        else:
            self.int_dtype, self.mantissa_bits, self.exponent_bits = torch.int64, 52, 11
        self.bias = (1 << (self.exponent_bits - 1)) - 1
        self.emin = 1 - self.bias
        self.inf_bits = ((1 << self.exponent_bits) - 1) << self.mantissa_bits


_F32 = _Container(torch.float32)
_F64 = _Container(torch.float64)


@functools.lru_cache(maxsize=None)
def _needs_subnormal_path(fmt: FloatFormat, container_emin: int) -> bool:
    # Below the format's min normal its spacing is fixed (q); the integer add on the container's bits
    # is right there only if the container's own spacing is also fixed there, i.e. when the two formats
    # share emin (BF16 in float32: both subnormal ranges align bit for bit).
    return fmt.emin > container_emin


def _bits(
    x: torch.Tensor, fmt: FloatFormat, rounding: str, generator: torch.Generator | None
) -> torch.Tensor:
    c = _F32 if x.dtype == torch.float32 else _F64
    shift = c.mantissa_bits - fmt.mantissa_bits
    low_mask = (1 << shift) - 1

    xa = x.abs()
    # NaN patterns sit above the inf pattern; clamping their bits to inf keeps the integer add from
    # carrying into the sign bit. NaNs are put back at the end.
    a = xa.view(c.int_dtype).clamp(max=c.inf_bits)
    if shift > 0:
        if rounding == "nearest":
            r = (a >> shift).bitwise_and_(1).add_(low_mask >> 1)
        else:
            r = _random_bits(a.shape, shift, c.int_dtype, x.device, generator)
        r = r.add_(a).bitwise_and_(~low_mask)
    else:
        r = a
    out = r.view(c.dtype)

    if _needs_subnormal_path(fmt, c.emin):
        q = math.ldexp(1.0, fmt.emin - fmt.mantissa_bits)  # spacing of the format's subnormals
        if rounding == "nearest":
            # One container addition rounds |x| to a multiple of q, half to even: the container's ulp at
            # q * 2^C is exactly q, and |x| < min_normal <= q * 2^C.
            magic = math.ldexp(q, c.mantissa_bits)
            sub = (xa + magic).sub_(magic)
        else:
            sub = _stochastic_fixed_point(xa, fmt, q, generator)
        out = torch.where(xa < fmt.min_normal, sub, out)

    if not fmt.subnormals:
        out = out.masked_fill_(out < fmt.min_normal, 0.0)

    # Overflow and NaN in one select: `out <= max` is False for both.
    if fmt.nonfinite == "ieee":
        special = xa * math.inf  # inf for overflow, NaN for NaN
    elif fmt.nonfinite == "nan":
        special = torch.full_like(xa, math.nan)
    else:
        special = xa.clamp(max=fmt.max)  # saturate; NaN passes through
    out = torch.where(out <= fmt.max, out, special)
    return out.copysign_(x)


def _random_bits(
    shape: torch.Size, bits: int, int_dtype: torch.dtype, device: torch.device, gen: torch.Generator | None
) -> torch.Tensor:
    # Uniform integers in [0, 2^bits).
    return torch.randint(0, 1 << bits, shape, dtype=int_dtype, device=device, generator=gen)


def _stochastic_fixed_point(
    xa: torch.Tensor, fmt: FloatFormat, q: float, gen: torch.Generator | None
) -> torch.Tensor:
    """Stochastic rounding of |x| < min_normal to a multiple of q, in int64 fixed point.

    k = |x| / q < 2^M is scaled by 2^F (exact: a power of two) and truncated to an integer K; then
    n = (K + R) >> F with R ~ U[0, 2^F) rounds up with probability frac(k), exact to 2^-F.
    """
    frac_bits = 62 - fmt.mantissa_bits - 1
    fixed = (xa * math.ldexp(1.0 / q, frac_bits)).clamp_(max=math.ldexp(1.0, 62)).to(torch.int64)
    r = _random_bits(xa.shape, frac_bits, torch.int64, xa.device, gen)
    n = r.add_(fixed).bitwise_right_shift_(frac_bits)
    return n.to(xa.dtype).mul_(q)
