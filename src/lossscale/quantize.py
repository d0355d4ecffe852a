"""Rounding to a :class:`~lossscale.formats.FloatFormat`: round-to-nearest-even and stochastic rounding.

Two implementations give the same bits:

* ``native``: torch's own casts (``x.to(torch.bfloat16).to(x.dtype)``), for the formats torch has, with
  lossscale's overflow semantics put on top (torch's float32 -> float8_e4m3fn cast saturates; ours does not
  unless asked). Used by default for float32 inputs' nearest rounding to BF16, FP16, E5M2 and saturating
  E4M3 (non-saturating E4M3 is faster with the bit-level kernel on CPU).
* ``bits``: lossscale's own vectorised bit-level kernel, for every format (and the only correct one for
  float64 inputs: torch and ml_dtypes round float64 through float32 first, which rounds twice).

The bit-level kernel has two exact forms (C = container mantissa bits: 23 for float32, 52 for float64;
M = format mantissa bits; s = C - M):

* 8-exponent-bit formats in float32 (BF16, e8m3, ...) share the container's exponent range, subnormals
  included, so one integer add on the signed bit pattern ``b`` rounds every value:

      nearest:     b' = (b + (2^(s-1) - 1) + lsb) & ~(2^s - 1)     # round half to even
      stochastic:  b' = (b + R) & ~(2^s - 1),  R ~ U{0, ..., 2^s - 1}   # P(up) = dropped bits / 2^s

  A carry out of the mantissa is the next binade's first value, and a carry past max is inf's pattern.
* every other format: ``(|x| + K) - K`` with ``K = 2^(E + C - M)``, ``E = max(exponent(|x|), emin)``, one
  correctly rounded container addition whose spacing at K is the format's spacing at |x|, normal or
  subnormal alike (see ``_nearest_by_addition``). Stochastic rounding adds random bits below the kept
  mantissa where the result is normal, and uses fixed point with B = 31 (float32) or 62 (float64) random
  bits where it is subnormal, so its rounding probability there is exact to 2^-B of the spacing.

Values that round past ``max`` overflow to inf (IEEE-style formats), NaN (formats whose only special is NaN,
as ml_dtypes and the OCP FP8 non-saturating conversion do) or saturate to ``max`` (formats with neither, as
ml_dtypes does).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Literal, Union

import torch

from .formats import FP32, FloatFormat, FormatLike

if TYPE_CHECKING:
    from .blockformats import BlockFormat

__all__ = ["quantize", "explain", "RoundingInfo", "Rounding", "RoundingImpl"]

Rounding = Literal["nearest", "stochastic"]
RoundingImpl = Literal["auto", "native", "bits"]
_ROUNDINGS = ("nearest", "stochastic")
_IMPLS = ("auto", "native", "bits")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def quantize(
    x: torch.Tensor,
    fmt: Union[FormatLike, BlockFormat],
    dim: int | None = None,
    scale_mode: str | None = None,
    *,
    rounding: Rounding = "nearest",
    saturate: bool = False,
    generator: torch.Generator | None = None,
    impl: RoundingImpl = "auto",
) -> torch.Tensor:
    """Round ``x`` to the values of ``fmt``; returns a new tensor of ``x``'s dtype, shape and device.

    Args:
        x: a float32, float64, bfloat16 or float16 tensor (any shape, including empty and 0-d).
        fmt: a :class:`FloatFormat`, a format name (``"bf16"``, ``"e4m3"``, ``"e6m9"``) or a torch dtype; or a
            block format (:class:`~lossscale.BlockFormat` or a name: ``"mxfp8"``, ``"mxfp4"``, ``"nvfp4"``, ...),
            see :func:`lossscale.blockformats.block_quantize`: blocks along ``dim`` (default -1), a ragged last
            block is its own shorter block, elements always saturate, a block holding inf/NaN becomes NaN,
            nearest rounding only, FP32 computation (float64 is refused).
        dim: block formats only: the dimension the blocks run along (default -1).
        scale_mode: block formats with E8M0 scales only: ``"floor"`` (default; OCP MX spec) or ``"rceil"``
            (NVIDIA's hardware rule).
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

    Autograd: every path has the same straight-through gradient. When ``x`` requires grad (and grad mode
    is on), the result does too and its gradient passes to ``x`` unchanged (identity, overflowed and
    underflowed elements included), the straight-through estimator of Bengio et al. 2013 ("Estimating or
    propagating gradients through stochastic neurons"); round the gradient itself where it should be
    rounded. (torch.ao's fake-quantize zeroes it outside the clamp range instead.)

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
    from .blockformats import BlockFormat, block_quantize, is_block_name

    if isinstance(fmt, BlockFormat) or (isinstance(fmt, str) and is_block_name(fmt)):
        if rounding != "nearest" or generator is not None or impl != "auto":
            raise ValueError(
                f"block format {fmt}: only rounding='nearest' with impl='auto' and no generator is supported "
                f"(got rounding={rounding!r}, impl={impl!r})"
            )
        return block_quantize(x, fmt, -1 if dim is None else dim, "floor" if scale_mode is None else scale_mode)  # type: ignore[arg-type]
    if dim is not None or scale_mode is not None:
        raise ValueError(
            f"dim and scale_mode apply to block formats (mxfp8, mxfp4, nvfp4, ...), not to {fmt!s}; "
            f"got dim={dim!r}, scale_mode={scale_mode!r}"
        )
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

    if x.requires_grad and torch.is_grad_enabled():
        out: torch.Tensor = _StraightThrough.apply(  # type: ignore[no-untyped-call]
            x, fmt, rounding, saturate, generator, impl
        )
        return out

    if x.dtype in (torch.bfloat16, torch.float16):
        # Upcasting is exact; the container round trip is exact when fmt fits in x's dtype.
        return quantize(
            x.float(), fmt, rounding=rounding, saturate=saturate, generator=generator, impl=impl
        ).to(x.dtype)

    if x.numel() == 0:
        return x.clone()
    if rounding == "nearest" and (
        impl == "native" or (impl == "auto" and _native_ok(x.dtype, fmt) and _native_is_faster(fmt, saturate))
    ):
        return _native_nearest(x, fmt, saturate)
    if saturate:
        # Clamping to +-max first is the saturating conversion: max rounds to itself, and every value that
        # would round past max (inf included) becomes max. NaN passes through clamp unchanged.
        x = x.clamp(-fmt.max, fmt.max)
    if fmt == FP32:
        # Identity for float32; float64 -> float32 is a single correctly rounded native cast.
        return x.clone() if x.dtype == torch.float32 else x.float().double()
    return _bits(x, fmt, rounding, generator)


class _StraightThrough(torch.autograd.Function):
    """quantize in forward (computed without autograd, so every path gives the same bits as without
    grad), the identity in backward: one gradient rule for all paths, some of which (the bit-pattern
    kernels) have no derivative of their own."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, fmt: FloatFormat, rounding: Rounding, saturate: bool,
        generator: torch.Generator | None, impl: RoundingImpl,
    ) -> torch.Tensor:
        return quantize(x.detach(), fmt, rounding=rounding, saturate=saturate, generator=generator, impl=impl)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad, None, None, None, None, None


# ------------------------------------------------------------------------------------------------------
# Native path


def _native_ok(dtype: torch.dtype, fmt: FloatFormat) -> bool:
    return dtype == torch.float32 and fmt.torch_dtype is not None


def _native_is_faster(fmt: FloatFormat, saturate: bool) -> bool:
    # torch's float8_e4m3fn -> float32 cast runs about as slowly on CPU as the whole bit-level kernel, and
    # its non-saturating form needs an extra overflow pass on top (benchmarks/quantize.py); saturating,
    # the cast alone is the answer.
    return fmt.nonfinite != "nan" or saturate


def _native_nearest(x: torch.Tensor, fmt: FloatFormat, saturate: bool) -> torch.Tensor:
    target = fmt.torch_dtype
    assert target is not None  # guarded by _native_ok
    if fmt.nonfinite == "nan" and saturate:
        return x.to(target).to(x.dtype)  # torch's float8_e4m3fn cast saturates by itself
    if saturate:
        x = x.clamp(-fmt.max, fmt.max)
    out = x.to(target).to(x.dtype)
    if fmt == FP32:
        return out.clone()
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
        self.emax = self.bias  # largest finite exponent: field 2^E - 2
        self.exponent_mask = ((1 << self.exponent_bits) - 1) << self.mantissa_bits
        self.inf_bits = self.exponent_mask


_F32 = _Container(torch.float32)
_F64 = _Container(torch.float64)


def _bits(
    x: torch.Tensor, fmt: FloatFormat, rounding: str, generator: torch.Generator | None
) -> torch.Tensor:
    c = _F32 if x.dtype == torch.float32 else _F64
    if fmt.emin == c.emin:  # 8-exponent-bit formats in float32: work on the signed pattern directly
        return _same_exponent_range(x, fmt, c, rounding, generator)
    # Every other (format, container) pair: the format's exponent range is narrower than the container's
    # by enough that the rounding constants below stay finite (emax + C - M <= container emax for every
    # format with at most 7 exponent bits in float32, and for every format in float64).
    xa = x.abs()
    fill = {"ieee": math.inf, "nan": math.nan, "none": fmt.max}[fmt.nonfinite]
    if rounding == "stochastic":
        out = _stochastic(xa, fmt, c, generator)  # NaN in, NaN out
        if not fmt.subnormals:
            out = out.masked_fill_(out < fmt.min_normal, 0.0)
        # Stochastic rounding may take a value just past max down to max, or up to the next value past it:
        # overflow is decided on the result. NaN > max is False.
        return out.masked_fill_(out > fmt.max, fill).copysign_(x)

    # Overflow is decided on the input, not on the rounded bits: |x| past the midpoint between max and the
    # next value up (reached exactly when the tie goes away from max: max's last bit is 1 unless the
    # format's only special is NaN, as in E4M3FN's 1.110 x 2^8). NaN > mid is False, and NaN inputs come
    # out of the addition NaN.
    mid = _overflow_midpoint(fmt)
    over = xa > mid if fmt.nonfinite == "nan" else xa >= mid
    out = _nearest_by_addition(xa, fmt, c)  # in place on xa
    if not fmt.subnormals:
        # Rounded as if subnormals existed, then flushed (sign kept by the copysign below).
        out = out.masked_fill_(out < fmt.min_normal, 0.0)
    return out.masked_fill_(over, fill).copysign_(x)


def _nearest_by_addition(xa: torch.Tensor, fmt: FloatFormat, c: _Container) -> torch.Tensor:
    """Round |x| half to even with one container addition per element.

    With E = max(exponent(|x|), emin) and K = 2^(E + C - M), the container's spacing at K is 2^(E - M),
    the format's spacing at |x| (normal or subnormal alike), and |x| < K; so the correctly rounded sum
    |x| + K is K + round(|x|), and subtracting K is exact (Sterbenz). K is built from the exponent bits.
    """
    shift = c.mantissa_bits - fmt.mantissa_bits
    lo = (fmt.emin + c.bias) << c.mantissa_bits
    hi = (c.emax + c.bias - shift) << c.mantissa_bits  # keeps K finite for inf/NaN/huge inputs
    k = (
        xa.view(c.int_dtype)
        .bitwise_and(c.exponent_mask)
        .clamp_(lo, hi)
        .add_(shift << c.mantissa_bits)
        .view(c.dtype)
    )
    return xa.add_(k).sub_(k)  # in place: the caller has no further use for |x|


def _same_exponent_range(
    x: torch.Tensor, fmt: FloatFormat, c: _Container, rounding: str, gen: torch.Generator | None
) -> torch.Tensor:
    """Round to a format with the container's exponent range (BF16 and other 8-exponent-bit formats in
    float32) with one integer add on the signed bit pattern.

    The pattern is sign | magnitude, so adding to it adds to the magnitude whatever the sign (a magnitude
    below inf's pattern plus less than 2^s never reaches the sign bit), and clearing the low s bits
    truncates the magnitude toward zero:

        nearest:     b' = (b + (2^(s-1) - 1) + lsb) & ~(2^s - 1)     lsb = last kept mantissa bit (ties to even)
        stochastic:  b' = (b + R) & ~(2^s - 1),  R ~ U{0, ..., 2^s - 1}

    A carry out of the mantissa is the next binade's first value; the subnormals align with the
    container's; a carry past max lands on inf's pattern, which is this format's overflow. Only NaN needs
    restoring (its payload plus the addend may carry into the sign bit). Flush-to-zero clears results whose
    exponent field is 0, keeping the sign.
    """
    shift = c.mantissa_bits - fmt.mantissa_bits
    low_mask = (1 << shift) - 1
    b = x.view(c.int_dtype)
    if rounding == "stochastic":
        r = torch.randint(0, 1 << shift, x.shape, dtype=c.int_dtype, device=x.device, generator=gen)
    else:
        # the last kept mantissa bit as 0 or 1 ((b & bit) clamped to 1: cheaper than a shift on CPU)
        r = (b & (1 << shift)).clamp_(max=1).add_(low_mask >> 1)
    r = r.add_(b).bitwise_and_(~low_mask)
    if not fmt.subnormals:
        sign_bit = -(1 << (c.mantissa_bits + c.exponent_bits))  # the pattern 100...0 as a signed int
        r = torch.where((r & c.exponent_mask) == 0, r & sign_bit, r)
    return r.view(c.dtype).masked_fill_(x.isnan(), math.nan)


def _stochastic(
    xa: torch.Tensor, fmt: FloatFormat, c: _Container, gen: torch.Generator | None
) -> torch.Tensor:
    """Stochastic rounding of |x|: up with probability (|x| - lower neighbour) / spacing.

    One draw of B uniform random bits per element (B = 31 for float32, 62 for float64) serves both cases:

    * result normal: add s = C - M random bits below the kept mantissa and truncate (Croci et al.
      2022, "Stochastic rounding: implementation, error analysis and applications"); the carry into the
      exponent field is the next binade's first value. Exact: P(up) = dropped bits / 2^s.
    * result subnormal (spacing q = min_subnormal, which the container's mantissa does not align with
      unless the format shares its emin, as BF16 in float32 does): k = |x| / q (exact), round up when
      R < floor(frac(k) * 2^B): exact to 2^-B of q.
    """
    shift = c.mantissa_bits - fmt.mantissa_bits
    low_mask = (1 << shift) - 1
    # NaN patterns sit above inf's: clamping keeps the add from carrying into the sign bit (NaN inputs take
    # the subnormal branch below, which keeps them NaN).
    a = xa.view(c.int_dtype).clamp(max=c.inf_bits)
    rand_bits = 31 if c.int_dtype == torch.int32 else 62
    r = torch.randint(0, 1 << rand_bits, xa.shape, dtype=c.int_dtype, device=xa.device, generator=gen)
    # Each element takes one of the two branches, so both may use the same random bits.
    out = (r & low_mask).add_(a).bitwise_and_(~low_mask).view(c.dtype)
    q = math.ldexp(1.0, fmt.emin - fmt.mantissa_bits)
    k = xa * (1.0 / q)  # exact: a power of two, and k < 2^M below min_normal
    floor = k.floor()
    threshold = (k - floor).mul_(math.ldexp(1.0, rand_bits)).to(c.int_dtype)
    sub = floor.add_(r < threshold).mul_(q)
    # NaN fails `>=` and takes `sub`, which is NaN: NaN propagates.
    return torch.where(xa >= fmt.min_normal, out, sub)


# ------------------------------------------------------------------------------------------------------
# One value, explained (for `lossscale formats --value`)

RoundingStatus = Literal["exact", "rounded", "subnormal", "underflow", "overflow", "saturated", "nan"]


@dataclasses.dataclass(frozen=True)
class RoundingInfo:
    """How one value rounds in one format (see :func:`explain`)."""

    format: str
    input: float
    value: float
    bits: int | None  # the stored pattern; None where the format cannot encode the result (NaN in E2M1)
    bits_str: str  # "s|exponent|mantissa" in binary
    relative_error: float  # |value - input| / |input|; 0 for exact, inf for overflow, 1 for underflow
    status: RoundingStatus


def explain(value: float, fmt: FormatLike, *, saturate: bool = False) -> RoundingInfo:
    """Round one Python float (a double, rounded once) to ``fmt`` and say what happened.

    ``status`` is ``"nan"`` for a NaN input, ``"overflow"`` when a finite input became inf/NaN,
    ``"saturated"`` when it was clamped to +-max, ``"underflow"`` when a nonzero input became zero,
    ``"subnormal"`` when the result is subnormal, else ``"exact"`` or ``"rounded"``. A host-side helper
    (for ``lossscale formats --value``): it reads its one result back, so keep it out of training loops.

    >>> explain(1e-8, "fp16").status, explain(1e-8, "bf16").status
    ('underflow', 'rounded')
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"value must be a float, got {type(value).__name__}")
    fmt = FloatFormat.parse(fmt)
    x = float(value)
    out = float(quantize(torch.tensor(x, dtype=torch.float64), fmt, saturate=saturate).item())
    status: RoundingStatus
    if math.isnan(x):
        status = "nan"
    elif not math.isfinite(out) and out != x:
        status = "overflow"  # a finite value past max, or an infinity the format cannot hold
    elif abs(x) > fmt.max and abs(out) == fmt.max:
        status = "saturated"
    elif x != 0.0 and out == 0.0:
        status = "underflow"
    elif out != 0.0 and abs(out) < fmt.min_normal:
        status = "subnormal"
    else:
        status = "exact" if out == x else "rounded"
    if x == 0.0 or math.isnan(x) or math.isnan(out):
        rel = 0.0 if out == x or (math.isnan(x) and math.isnan(out)) else math.inf
    elif math.isinf(x):
        rel = 0.0 if out == x else math.inf
    else:
        rel = abs(out - x) / abs(x)
    bits = fmt.encode(out)
    return RoundingInfo(fmt.name, x, out, bits, _bits_str(bits, fmt), rel, status)


def _bits_str(bits: int | None, fmt: FloatFormat) -> str:
    if bits is None:
        return "-"
    e, m = fmt.exponent_bits, fmt.mantissa_bits
    s = format(bits, f"0{fmt.bits}b")
    return f"{s[0]}|{s[1:1 + e]}|{s[1 + e:]}" if m else f"{s[0]}|{s[1:1 + e]}|"
