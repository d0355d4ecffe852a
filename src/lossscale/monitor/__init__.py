"""Gradient health, measured: per-layer underflow, subnormal, overflow and swamping statistics.

:class:`GradientMonitor` hooks a model (and, optionally, its optimizer) and, on every ``every``-th training
step, measures every weight gradient and every activation gradient (the gradient of each leaf module's
output). For each gradient tensor ``g`` and each format ``F`` it counts, on the device, with one exact
definition per region (``r = round_F(|g|)``, round to nearest even, as :func:`lossscale.quantize`, without
saturation; for formats without infinities "past max" means what the rounding would give with more exponent
bits)::

    zero         g == 0 exactly (already zero in FP32; not counted as underflow)
    underflow    g != 0 and r == 0            <=>  |g| <= T_zero(F)      (e.g. FP16: |g| <= 2^-25)
    subnormal    0 < r < min_normal(F)        <=>  T_zero < |g| <= T_sub(F)
    overflow     r > max(F), or |g| == inf    <=>  |g| > T_fin(F)        (FP16: |g| > 65519.996...)
    nan          g is NaN (in no other region)

where the thresholds ``T`` are the largest FP32 values in each region, found once per format by asking
:func:`lossscale.quantize` itself (so ties go the way the rounding sends them: ``min_subnormal / 2`` rounds
to zero, being a tie with 0 as the even neighbour; FP16's ``65520`` is a tie that rounds to inf). It also
records ``max |g|`` (NaN counting as inf), the smallest nonzero ``|g|`` and a histogram of ``ceil(log2 |g|)``
over the nonzero finite values (bin ``c`` holds ``2^(c-1) < |g| <= 2^c``, c = -126..128; the lowest bin also
holds the FP32 subnormals). Because ``2^(c-1) < |g| <= 2^c`` is exactly what scaling by a power of two moves by
whole bins, the histogram answers "what would underflow at scale 2^k" exactly for formats with subnormals
(see :mod:`lossscale.diagnose`).

How (the kernel, :func:`_segment_stats`): the FP32 bit pattern of ``|g|`` is an integer in the same order as
``|g|``, and its exponent field names the binade. Every region edge is either a binade edge or lies inside
one binade, so one integer key per element, ``binade * (K + 1) + #(edges inside its binade below |g|)``
(the edges looked up per binade), and one histogram of (row, key) give every count above by cumulative sums.
Many gradients are packed into one flat chunk with a row index per element, so the number of kernels per
step does not grow with the number of layers.

With an ``optimizer`` it also measures **swamping**: around each sampled ``optimizer.step()`` (optimizer step
pre/post hooks, the public ``torch.optim.Optimizer`` API), an element is *updated* when its FP32 value
changed, and *swamped in F* when it changed but ``round_F(w_new) == round_F(w_old)``: the update would be
lost if the weights were stored in ``F`` (Zamirai et al. 2020, arXiv:2010.06192; REFERENCE.md "Swamping").

What the statistics mean depends on the run (every output says which, as ``source``):

* ``"fp32"``: the gradients are FP32 (or FP64): the format statistics say what *would* happen if those
  gradients were rounded to each format at the loss scale in use. This is the reference run.
* ``"emulated"``: inside :func:`lossscale.autocast` the gradients have already been rounded to the low
  format, so underflowed values are zeros by then and the "would underflow" columns say little; the
  emulation's own rounding-site counters (what really underflowed and overflowed where it rounded) are
  reported beside them, under ``emulation``.

All statistics of a sampled step are written into one float64 tensor on the gradients' device (one row per
layer entry); nothing is copied to the host until :meth:`GradientMonitor.read`. Gradients seen during
backward are taken as they are, so under a loss scaler they are the *scaled* gradients: the statistics are
at the scale actually used, which the monitor records (via ``scaler.scale(1)``, a device tensor) when a
``scaler`` is given.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from ._optimizers import check_not_meta, unwrap_optimizer
from .formats import FP32, FloatFormat, FormatLike
from .quantize import quantize

__all__ = [
    "HIST_MAX_LOG2",
    "HIST_MIN_LOG2",
    "Columns",
    "Entry",
    "FormatThresholds",
    "GradientMonitor",
    "MonitorConfig",
    "MonitorStats",
    "Source",
    "gradient_stats",
    "thresholds",
]

Source = Literal["fp32", "emulated"]
Kind = Literal["weight", "activation"]

# ceil(log2 |g|) over positive finite FP32 values, bin c holding 2^(c-1) < |g| <= 2^c, from the first normal
# binade to 2^128 (> max = 2^128 - 2^104); the lowest bin, -126, also holds every FP32 subnormal (0, 2^-126).
HIST_MIN_LOG2 = -126
HIST_MAX_LOG2 = 128
_NBINS = HIST_MAX_LOG2 - HIST_MIN_LOG2 + 1


# ----------------------------------------------------------------------------------------------------------
# Exact thresholds, from quantize itself


@dataclasses.dataclass(frozen=True)
class FormatThresholds:
    """The largest FP32 magnitudes that round to zero / below min_normal / to a finite value in ``fmt``.

    ``|g| <= zero``: underflows to 0. ``zero < |g| <= subnormal``: rounds to a subnormal (never, when the
    format flushes subnormals: then ``subnormal == zero``). ``|g| > finite``: overflows (inf included).
    """

    fmt: FloatFormat
    zero: float
    subnormal: float
    finite: float


def _f32(x: float) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.float32)


def _largest(pred: Callable[[torch.Tensor], bool], guess: float) -> float:
    """Largest non-negative FP32 ``x`` with ``pred(x)`` true, for a predicate that is true on ``[0, T]`` and
    false above (quantize is monotone), starting from a guess near the boundary."""
    x = _f32(guess).clamp(min=0.0)
    zero, inf = _f32(0.0), _f32(math.inf)
    while not pred(x):  # walk down to the first true value
        x = torch.nextafter(x, zero)
    while True:  # walk up while the next value is still true
        up = torch.nextafter(x, inf)
        if bool(torch.equal(up, x)) or not pred(up):
            return float(x.item())
        x = up


def _widened(fmt: FloatFormat) -> FloatFormat:
    """A format with fmt's grid near fmt.max but one more exponent bit, to see where rounding *would* go past
    max in formats that saturate (those with neither inf nor NaN)."""
    return FloatFormat(fmt.exponent_bits + 1, fmt.mantissa_bits, "ieee" if fmt.mantissa_bits else "nan")


def thresholds(fmt: FormatLike) -> FormatThresholds:
    """Exact FP32 thresholds of ``fmt`` (cached). Computed once per format on the CPU by asking
    :func:`lossscale.quantize` (a few host syncs, at construction time, never per step).

    Example:
        >>> from lossscale.monitor import thresholds
        >>> t = thresholds("fp16")
        >>> t.zero == 2.0**-25, t.finite < 65520.0 < 65520.0 + 2**-8
        (True, True)
    """
    return _thresholds(FloatFormat.parse(fmt))


@functools.cache
def _thresholds(fmt: FloatFormat) -> FormatThresholds:
    full_q = math.ldexp(1.0, fmt.emin - fmt.mantissa_bits)  # subnormal spacing, flushed or not

    def rounds_to_zero(x: torch.Tensor) -> bool:
        return bool(quantize(x, fmt)[0] == 0)

    def rounds_below_normal(x: torch.Tensor) -> bool:
        return bool(quantize(x, fmt)[0].abs() < fmt.min_normal)

    over = fmt if fmt.nonfinite != "none" else _widened(fmt)

    def rounds_finite(x: torch.Tensor) -> bool:
        return bool(quantize(x, over)[0] <= fmt.max)  # False for inf and NaN

    sub = _largest(rounds_below_normal, fmt.min_normal - full_q / 2)
    zero = _largest(rounds_to_zero, full_q / 2 if fmt.subnormals else fmt.min_normal - full_q / 2)
    fin = _largest(rounds_finite, fmt.max + math.ldexp(1.0, fmt.emax - fmt.mantissa_bits - 1))
    return FormatThresholds(fmt, zero, sub, fin)


# ----------------------------------------------------------------------------------------------------------
# Column layout of a statistics row


class Columns:
    """Column layout of one statistics row (float64; counts are exact integers below 2^53).

    ``MAX_ABS``, ``MIN_ABS`` (smallest nonzero |g|, inf if none); then counts: ``NUMEL``, ``ZEROS``, ``INF``,
    ``NAN``; per format ``f``: ``underflow(f)``, ``subnormal(f)``, ``overflow(f)``; the exponent histogram
    (``hist``); for weights ``UPDATED`` and per format ``swamped(f)``. Every column from ``NUMEL`` on adds up
    across gradients and steps; the first two combine by max and min.
    """

    MAX_ABS = 0
    MIN_ABS = 1
    NUMEL = 2
    ZEROS = 3
    INF = 4
    NAN = 5
    _FMT0 = 6

    def __init__(self, n_formats: int) -> None:
        self.n_formats = n_formats
        self.hist0 = self._FMT0 + 3 * n_formats
        self.updated = self.hist0 + _NBINS
        self.width = self.updated + 1 + n_formats

    def underflow(self, f: int) -> int:
        return self._FMT0 + 3 * f

    def subnormal(self, f: int) -> int:
        return self._FMT0 + 3 * f + 1

    def overflow(self, f: int) -> int:
        return self._FMT0 + 3 * f + 2

    @property
    def hist(self) -> slice:
        return slice(self.hist0, self.hist0 + _NBINS)

    def swamped(self, f: int) -> int:
        return self.updated + 1 + f


# FP32 magnitude bit patterns (int32): 0 | exponent (8) | mantissa (23). A pattern is monotone in |x|, so region
# tests are integer compares. With p = bits - 1, the "binade index" b = (p >> 23) + 1 is
#     0: x == 0        1: 0 < |x| <= 2^-126 (FP32 subnormals and 2^-126)
#     2..255: 2^(b-128) < |x| <= 2^(b-127), i.e. ceil(log2|x|) = b - 127 (255 also holds inf)    256: NaN
_SIGN_OFF = 0x7FFFFFFF
_INF_BITS = 0x7F800000
_NB_BINADES = 257


def _f32_bits(v: float) -> int:
    return int(np.array(v, dtype=np.float32).view(np.int32))


def _binade(bits: int) -> int:
    return ((bits - 1) >> 23) + 1


class _Tables:
    """Constants of the statistics kernel for one tuple of formats (host lists; device copies cached).

    Every region edge ``T`` (the thresholds of :func:`thresholds`, plus 0 and FP32 max) is either the top
    edge of a binade (a power of two >= 2^-126, or 0) or strictly inside one. Inside ones go into lookup
    tables ``lut[k][b]`` (the k-th edge inside binade b, ascending; INT32_MAX when none), so that one key
    ``b * (K + 1) + #(edges inside b below |x|)`` per element orders elements like ``|x|`` and one
    histogram of keys answers every ``#(|x| <= T)`` with a cumulative sum.
    """

    def __init__(self, formats: Sequence[FloatFormat]) -> None:
        self.formats = tuple(formats)
        self.cols = Columns(len(formats))
        ths = [thresholds(f) for f in self.formats]
        edges = sorted({0.0, FP32.max, *(v for t in ths for v in (t.zero, t.subnormal, t.finite))})
        inside: dict[int, list[int]] = {}
        for v in edges:
            bits = _f32_bits(v)
            if v != 0.0 and not (bits & 0x7FFFFF == 0 and bits >= 0x00800000):
                inside.setdefault(_binade(bits), []).append(bits)
        self.k = max((len(v) for v in inside.values()), default=0)
        self.stride = _NB_BINADES * (self.k + 1)
        luts = [[_SIGN_OFF] * _NB_BINADES for _ in range(self.k)]
        for b, lst in inside.items():
            for k, bits in enumerate(sorted(lst)):
                luts[k][b] = bits
        self.luts = luts

        def pos(v: float) -> int:
            """Key position p with #(|x| <= v) = cum[p]."""
            bits = _f32_bits(v)
            b = _binade(bits)
            if v != 0.0 and b in inside and bits in inside[b]:
                return b * (self.k + 1) + sorted(inside[b]).index(bits)
            return b * (self.k + 1) + self.k

        hi: list[int] = []
        lo: list[int] = []
        self.zero_pos = pos(0.0)
        self.max_pos = pos(FP32.max)
        self.inf_pos = 255 * (self.k + 1) + self.k  # |x| <= inf: everything but NaN
        for t in ths:
            hi += [pos(t.zero), pos(t.subnormal), self.inf_pos]
            lo += [self.zero_pos, pos(t.zero), pos(t.finite)]
        self.hi, self.lo = hi, lo
        self._cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        got = self._cache.get(device)
        if got is None:
            got = (
                _device_const(self.hi, torch.long, device),
                _device_const(self.lo, torch.long, device),
                *(_device_const(lut, torch.int32, device) for lut in self.luts),
            )
            self._cache[device] = got
        return got


def _device_const(values: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor on ``device``. Off the CPU it is written with scalar fills rather than copied
    from host memory: a pageable host-to-device copy would wait for the device (a sync)."""
    if device.type == "cpu":
        return torch.tensor(list(values), dtype=dtype)
    fill = collections.Counter(values).most_common(1)[0][0]
    out = torch.full((len(values),), fill, dtype=dtype, device=device)
    for i, v in enumerate(values):
        if v != fill:
            out[i] = v
    return out


@functools.lru_cache(maxsize=32)
def _tables(formats: tuple[FloatFormat, ...]) -> _Tables:
    return _Tables(formats)


def gradient_stats(g: torch.Tensor, formats: Sequence[FormatLike]) -> torch.Tensor:
    """One statistics row (float64, :class:`Columns` layout) for the tensor ``g``. Does not sync.

    Swamping columns are zero (they need an optimizer step; see :class:`GradientMonitor`).

    Example:
        >>> import torch
        >>> from lossscale.monitor import Columns, gradient_stats
        >>> row = gradient_stats(torch.tensor([0.0, 1e-9, 1e-6, 1.0, 7e4]), ["fp16"])
        >>> c = Columns(1)
        >>> [int(row[i]) for i in (c.NUMEL, c.ZEROS, c.underflow(0), c.subnormal(0), c.overflow(0))]
        [5, 1, 1, 1, 1]
    """
    tab = _tables(tuple(FloatFormat.parse(f) for f in formats))
    return _segment_stats(g.detach().reshape(-1), None, 1, tab)[0]


def _segment_stats(
    x: torch.Tensor,
    seg: torch.Tensor | None,
    n_seg: int,
    tab: _Tables,
    key_off: torch.Tensor | None = None,
    pieces: tuple[Sequence[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Statistics rows ``[n_seg, Columns.width]`` (float64) of a flat tensor whose element ``i`` belongs to
    row ``seg[i]`` (all to row 0 when ``seg`` is None). A fixed number of element-wise integer passes and
    one histogram, however many gradients were packed into ``x``; no sync. Optional precomputed layout:
    ``key_off`` (int32, ``seg * tab.stride``) and ``pieces`` (the lengths of the consecutive runs of equal
    ``seg`` and, on the device, each run's row), which lets the extremes be reduced run by run."""
    cols = tab.cols
    dev = x.device
    hi, lo, *luts = tab.on(dev)
    a = x if x.dtype == torch.float32 else x.float()  # bf16/fp16 exactly; fp64 judged by its FP32 rounding
    bits = a.contiguous().view(torch.int32).bitwise_and(_SIGN_OFF)  # |x| as an ordered integer
    p = bits - 1
    # int32 arithmetic (half the memory traffic of int64) until the one conversion the histogram needs.
    b = p.bitwise_right_shift(23).add_(1)  # binade index, see above
    key = b * (tab.k + 1)
    for lut in luts:
        key.add_(bits > lut.index_select(0, b))  # edges inside this element's binade that lie below |x|
    if seg is not None:
        key.add_(key_off if key_off is not None else (seg * tab.stride).to(torch.int32))
    counts = torch.zeros(n_seg * tab.stride, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key.to(torch.int64), torch.ones(1, dtype=torch.int64, device=dev).expand(key.numel()))
    counts = counts.view(n_seg, _NB_BINADES, tab.k + 1)
    cum = counts.view(n_seg, tab.stride).cumsum(1).to(torch.float64)
    numel = cum[:, -1:]
    per_format = cum[:, hi] - cum[:, lo]
    zeros = cum[:, tab.zero_pos : tab.zero_pos + 1]
    n_inf = cum[:, tab.inf_pos : tab.inf_pos + 1] - cum[:, tab.max_pos : tab.max_pos + 1]
    n_nan = numel - cum[:, tab.inf_pos : tab.inf_pos + 1]
    hist = counts[:, 1:256].sum(2).to(torch.float64)  # ceil(log2|x|) = -126 .. 128
    hist[:, -1:] -= n_inf

    # Extremes on the integer patterns: NaN counts as inf for the max; for the min, p = bits - 1 sends 0 to
    # -1, which the mask turns into INT32_MAX (ignored), and keeps every other pattern's order.
    big = bits.clamp_(max=_INF_BITS)
    small = p.bitwise_and_(_SIGN_OFF)
    if seg is None:
        if big.numel():
            mx = big.amax().reshape(1)
            mn = small.amin().reshape(1)
        else:
            mx = torch.zeros(1, dtype=torch.int32, device=dev)
            mn = torch.full((1,), _SIGN_OFF, dtype=torch.int32, device=dev)
    elif pieces is not None and len(pieces[0]) * 4096 <= big.numel():
        # Few long runs: a plain reduction per run, then per row (much cheaper than a scatter per element).
        lengths, run_rows = pieces
        mx_runs = torch.stack([t.amax() for t in torch.split(big, list(lengths))])
        mn_runs = torch.stack([t.amin() for t in torch.split(small, list(lengths))])
        mx = torch.zeros(n_seg, dtype=torch.int32, device=dev).scatter_reduce_(0, run_rows, mx_runs, "amax")
        mn = torch.full((n_seg,), _SIGN_OFF, dtype=torch.int32, device=dev)
        mn = mn.scatter_reduce_(0, run_rows, mn_runs, "amin")
    else:
        mx = torch.zeros(n_seg, dtype=torch.int32, device=dev).scatter_reduce_(0, seg, big, "amax")
        mn = torch.full((n_seg,), _SIGN_OFF, dtype=torch.int32, device=dev).scatter_reduce_(0, seg, small, "amin")
    max_abs = mx.view(torch.float32).to(torch.float64).view(n_seg, 1)
    none = mn >= _INF_BITS  # nothing nonzero and finite-or-inf: min undefined
    min_abs = torch.where(none, _INF_BITS, mn + 1).view(torch.float32).to(torch.float64).view(n_seg, 1)
    swamp = torch.zeros(n_seg, 1 + cols.n_formats, dtype=torch.float64, device=dev)
    return torch.cat([max_abs, min_abs, numel, zeros, n_inf, n_nan, per_format, hist, swamp], dim=1)


def _round_eq(a: torch.Tensor, b: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``round_fmt(a) == round_fmt(b)`` elementwise (no sync). For bf16/fp16 the comparison is made in the
    narrow dtype itself, whose cast is the same round-to-nearest-even as :func:`quantize`'s native path."""
    dtype = fmt.torch_dtype
    if dtype in (torch.bfloat16, torch.float16) and a.dtype == torch.float32:
        return a.to(dtype) == b.to(dtype)
    return quantize(a, fmt) == quantize(b, fmt)


def _swamp_masks(n_formats: int, device: torch.device) -> torch.Tensor:
    """``[2^(1+F), 1+F]`` float64: code c counts as updated when bit 0 is set, as swamped in format i when
    bits 0 and i+1 are set. Built on the device from arange (no host-to-device copy, which could sync)."""
    codes = torch.arange(1 << (1 + n_formats), device=device)
    changed = (codes & 1) != 0
    cols = [changed] + [changed & (((codes >> (i + 1)) & 1) != 0) for i in range(n_formats)]
    return torch.stack(cols, dim=1).to(torch.float64)


def _swamping_counts(
    old: torch.Tensor, new: torch.Tensor, seg: torch.Tensor | None, n_seg: int, formats: Sequence[FloatFormat]
) -> torch.Tensor:
    """``[n_seg, 1 + len(formats)]`` float64: per row, updated = #(new != old), then per format swamped =
    #(new != old and round_f(new) == round_f(old)). Flat inputs; no sync.

    Each element gets a small code (bit 0: changed; bit i+1: same rounding in format i) and one histogram of
    (row, code) counts everything."""
    if old.dtype != torch.float32:
        old, new = old.float(), new.float()
    dev = old.device
    n_codes = 1 << (1 + len(formats))
    code = (new != old).to(torch.uint8)
    for i, f in enumerate(formats):
        code.bitwise_or_(_round_eq(new, old, f).to(torch.uint8).bitwise_left_shift_(i + 1))
    key = code.to(torch.int64)
    if seg is not None:
        key.add_(seg, alpha=n_codes)
    hist = torch.zeros(n_seg * n_codes, dtype=torch.int64, device=dev)
    hist.scatter_add_(0, key, torch.ones(1, dtype=torch.int64, device=dev).expand(key.numel()))
    masks = _swamp_masks(len(formats), dev)
    return hist.view(n_seg, n_codes).to(torch.float64) @ masks


# ----------------------------------------------------------------------------------------------------------
# The monitor


class _Scaler(Protocol):
    def scale(self, outputs: torch.Tensor) -> torch.Tensor: ...


class _Counters(Protocol):
    """What the monitor needs of :class:`lossscale.RoundingCounters` (kept structural: no import upward)."""

    def read(self) -> Mapping[tuple[str, str], Any]: ...


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """What a :class:`GradientMonitor` measures.

    Args:
        formats: formats to judge the gradients against (names, dtypes or :class:`FloatFormat`).
        every: sample one training step in ``every`` (step 0, every, 2*every, ...). 1 samples all.
        weights: measure parameter gradients (one entry per parameter).
        activations: measure the gradient of each leaf module's output (one entry per leaf module).
        history: how many sampled steps' tables to keep on the device (oldest dropped; totals always cover
            every sampled step); None keeps all.
    """

    formats: tuple[FloatFormat, ...] = ()
    every: int = 100
    weights: bool = True
    activations: bool = True
    history: int | None = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.formats, tuple) or not self.formats:
            raise ValueError("formats must be a non-empty tuple of formats")
        for f in self.formats:
            if not isinstance(f, FloatFormat):
                raise TypeError(f"formats must hold FloatFormat values, got {type(f).__name__}")
        if len({f.name for f in self.formats}) != len(self.formats):
            raise ValueError(f"formats must not repeat, got {[f.name for f in self.formats]}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be an int >= 1, got {self.every!r}")
        for name in ("weights", "activations"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if not (self.weights or self.activations):
            raise ValueError("at least one of weights and activations must be True")
        if self.history is not None and (
            isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1
        ):
            raise ValueError(f"history must be None or an int >= 1, got {self.history!r}")

    @classmethod
    def make(cls, formats: Iterable[FormatLike] | str, **kwargs: Any) -> MonitorConfig:
        """A config from format specs (``"bf16,fp16"`` or ``["bf16", torch.float16]``)."""
        if isinstance(formats, str):
            formats = [f for f in formats.split(",") if f.strip()]
        return cls(formats=tuple(FloatFormat.parse(f) for f in formats), **kwargs)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the statistics: a parameter's gradient (``kind="weight"``, named like the parameter) or
    the gradient of a leaf module's output (``kind="activation"``, named like the module)."""

    name: str
    kind: Kind


@dataclasses.dataclass(frozen=True)
class MonitorStats:
    """What a :class:`GradientMonitor` measured, on the host (numpy).

    Attributes:
        source: ``"fp32"`` (format columns: what rounding these FP32 gradients *would* do) or ``"emulated"``
            (gradients were already rounded by :func:`lossscale.autocast`; see ``emulation``).
        formats: the formats, in column order.
        entries: one per row.
        steps: index of each kept sampled step, shape ``[R]``.
        scales: loss scale each kept step ran at (NaN without a scaler), ``[R]``.
        tables: ``[R, len(entries), Columns.width]``.
        total: ``[len(entries), Columns.width]`` over every sampled step (also those dropped from history).
        sampled: number of sampled steps.
        emulation: when ``source == "emulated"``: the emulation's rounding-site counters,
            ``{(site, format name): {"elements", "nonzero", "underflow", "subnormal", "overflow"}}``, cumulative
            over the run (what really underflowed where :func:`lossscale.autocast` rounded); else None.
    """

    source: Source
    formats: tuple[FloatFormat, ...]
    entries: tuple[Entry, ...]
    steps: np.ndarray
    scales: np.ndarray
    tables: np.ndarray
    total: np.ndarray
    sampled: int
    emulation: Mapping[tuple[str, str], Mapping[str, int]] | None = None

    @property
    def columns(self) -> Columns:
        return Columns(len(self.formats))

    def skipped(self) -> np.ndarray:
        """Per kept step: whether any weight gradient was inf or NaN (a loss scaler skips such a step)."""
        c = self.columns
        w = np.array([e.kind == "weight" for e in self.entries], dtype=bool)
        if self.tables.shape[0] == 0:
            return np.zeros(0, dtype=bool)
        bad = self.tables[:, w, c.INF] + self.tables[:, w, c.NAN]
        return np.asarray(bad.sum(axis=1) > 0)

    def kind_total(self, kind: Kind | None = None) -> np.ndarray:
        """The ``total`` rows of one kind (None: all) combined into one row."""
        rows = self.total[[kind is None or e.kind == kind for e in self.entries]]
        return _combine_rows(rows, self.columns)


def _combine_rows(rows: np.ndarray, cols: Columns) -> np.ndarray:
    out = np.zeros(cols.width, dtype=np.float64)
    if rows.shape[0] == 0:
        out[cols.MIN_ABS] = math.inf
        return out
    out[cols.NUMEL:] = rows[:, cols.NUMEL:].sum(axis=0)
    out[cols.MAX_ABS] = rows[:, cols.MAX_ABS].max()
    out[cols.MIN_ABS] = rows[:, cols.MIN_ABS].min()
    return out


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, Mapping):
        for x in obj.values():
            yield from _tensors(x)


# Elements per packed chunk: bounds the temporaries of one statistics pass (about 30 bytes per element) and
# amortises the per-op overhead over many small gradients.
_CHUNK = 1 << 20


def _pack(
    pieces: Sequence[tuple[int, torch.Tensor]], chunk: int | None = None
) -> list[list[tuple[int, torch.Tensor]]]:
    """Split flat tensors (tagged with their row) into slices and group them into chunks of at most ``chunk``
    elements, per device, in order. Statistics are additive (max/min for the extremes), so slicing a tensor
    across chunks changes nothing."""
    chunk = _CHUNK if chunk is None else chunk
    by_dev: dict[torch.device, list[list[tuple[int, torch.Tensor]]]] = {}
    fill: dict[torch.device, int] = {}
    for idx, t in pieces:
        dev = t.device
        groups = by_dev.setdefault(dev, [[]])
        start, n = 0, t.numel()
        while start < n:
            room = chunk - fill.get(dev, 0)
            if room <= 0:
                groups.append([])
                fill[dev] = 0
                room = chunk
            take = min(room, n - start)
            groups[-1].append((idx, t[start : start + take]))
            fill[dev] = fill.get(dev, 0) + take
            start += take
    return [g for groups in by_dev.values() for g in groups if g]


_HOLDERS = (nn.ParameterDict, nn.ParameterList)


class GradientMonitor:
    """Per-layer gradient statistics in each format, on sampled steps, without host syncs.

    Algorithm, on a sampled step (``step_index % every == 0``)::

        during backward:   keep each activation gradient (hook on each leaf module's output) and a copy
                           of each weight gradient (post-accumulate-grad hook, so before any unscale_)
        per packed chunk of those (many small gradients in one pass):
                           counts of zeros / underflow / subnormal / overflow per format, max|g|,
                           min nonzero |g|, histogram of ceil(log2|g|), per row (on the device)
        around optimizer.step():  swamped(f) = #(w changed and round_f(w_new) == round_f(w_old))
        monitor.step():    add the last chunks; keep the step's table; add it to the running totals

    Args:
        model: the module whose parameters and leaf modules are hooked.
        formats: formats to judge gradients against; default ``("bf16", "fp16", "e5m2")``.
        every: sample one step in ``every`` (default 100; the first step is sampled).
        optimizer: if given, swamping is measured around its ``step()`` on sampled steps. accelerate's
            ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer`` are unwrapped (by type) to the
            ``torch.optim.Optimizer`` inside, whose steps they run.
        scaler: a :class:`lossscale.LossScaler` or ``torch.amp.GradScaler``: the scale in use is recorded
            with each sampled step, read as ``scaler.scale(1)`` (a device tensor, no sync).
        counters: the :class:`lossscale.RoundingCounters` passed to :func:`lossscale.autocast` in an emulated
            low-precision run: the statistics are then marked ``source="emulated"`` and :meth:`read` reports
            the counters (what the rounding sites really did) beside the per-layer tables.
        weights, activations, history: see :class:`MonitorConfig`.
        exclude: ``{parameter name: bool mask of its shape}``: elements whose gradients are measured as exact
            zeros (what :func:`lossscale.diagnose` does with gradients it found to be rounding noise, see
            :func:`lossscale.noise.numerically_zero_masks`). The training itself is not changed.

    Call :meth:`step` once per training step, after the optimizer step (and ``scaler.update()``). Hooks are
    removed by :meth:`remove` or on leaving a ``with`` block. Only :meth:`read` synchronises.

    Warnings:
        On a sampled step the activation gradients are kept alive until 1M elements have gathered (then
        measured and released) and the weight gradients are copied: extra memory of at most one copy of the
        weight gradients plus a 1M-element chunk. A step with several backward passes (gradient
        accumulation) accumulates activation statistics over all of them and measures the weight gradients
        as they are after the last one. Activation checkpointing runs forward twice and counts activation
        gradients once per recomputation.

    Example:
        >>> import torch
        >>> from lossscale import GradientMonitor
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> monitor = GradientMonitor(model, formats=("bf16", "fp16"), every=1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> monitor.step()
        >>> stats = monitor.read()                      # syncs: copies the tables to the host
        >>> [e.name for e in stats.entries][:3], stats.source
        (['0.weight', '0.bias', '2.weight'], 'fp32')
        >>> monitor.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        formats: Iterable[FormatLike] | str = ("bf16", "fp16", "e5m2"),
        every: int = 100,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: _Scaler | None = None,
        counters: _Counters | None = None,
        weights: bool = True,
        activations: bool = True,
        history: int | None = 1000,
        exclude: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_not_meta(model)
        optimizer = unwrap_optimizer(optimizer)  # accelerate's / Lightning's wrappers, recognised by type
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer (or accelerate's AcceleratedOptimizer, Lightning's "
                f"LightningOptimizer around one) or None, got {type(optimizer).__name__}"
            )
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError("scaler must have a scale(tensor) method (LossScaler, torch.amp.GradScaler) or be None")
        if counters is not None and not callable(getattr(counters, "read", None)):
            raise TypeError("counters must be a lossscale.RoundingCounters or None")
        self.config = MonitorConfig.make(
            formats, every=every, weights=weights, activations=activations, history=history
        )
        self._tab = _tables(self.config.formats)
        self._cols = self._tab.cols
        self._scaler = scaler
        self._counters = counters
        self._step = 0
        self._sampled = 0
        self._handles: list[Any] = []
        self._removed = False
        entries: list[Entry] = []
        self._param_index: dict[int, int] = {}
        self._params: dict[int, torch.Tensor] = {}
        self._hook_sites: list[tuple[str, Any, int]] = []  # (kind, param or module, row)
        if self.config.weights:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    self._param_index[id(p)] = len(entries)
                    self._params[id(p)] = p
                    self._hook_sites.append(("weight", p, len(entries)))
                    entries.append(Entry(name, "weight"))
        if self.config.activations:
            for name, mod in model.named_modules():
                # Leaf modules that compute something (a ParameterDict/List only holds parameters: Keras 3
                # keeps its variables in one, its layers are not torch submodules).
                if next(mod.children(), None) is None and not isinstance(mod, _HOLDERS):
                    self._hook_sites.append(("activation", mod, len(entries)))
                    entries.append(Entry(name or type(mod).__name__, "activation"))
        self.entries: tuple[Entry, ...] = tuple(entries)
        self._exclude = _exclude_masks(model, exclude, self._param_index)
        self._optimizer = optimizer
        self._attach()  # step 0 is sampled
        self._buf: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._pending_w: dict[int, torch.Tensor] = {}
        self._pending_a: list[tuple[int, torch.Tensor]] = []
        self._pending_n = 0
        self._snap: list[tuple[list[tuple[int, torch.Tensor]], torch.Tensor]] = []
        self._seg_cache: dict[tuple[torch.device, tuple[tuple[int, int], ...]], tuple[torch.Tensor, ...]] = {}
        self._records: collections.deque[tuple[int, torch.Tensor, torch.Tensor | None]] = collections.deque(
            maxlen=self.config.history
        )
        self._total: torch.Tensor | None = None

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def step_index(self) -> int:
        """Index of the current training step (number of :meth:`step` calls so far)."""
        return self._step

    @property
    def sampling(self) -> bool:
        """Whether the current step is measured."""
        return self._step % self.config.every == 0

    @property
    def formats(self) -> tuple[FloatFormat, ...]:
        return self.config.formats

    # -- measuring -----------------------------------------------------------------------------------------
    def _table(self, device: torch.device) -> torch.Tensor:
        if self._buf is None:
            buf = torch.zeros(len(self.entries), self._cols.width, dtype=torch.float64, device=device)
            buf[:, self._cols.MIN_ABS] = math.inf
            self._buf = buf
        return self._buf

    def _note_scale(self, device: torch.device) -> None:
        if self._scaler is not None and self._scale is None:
            # The scale in use this step as a device tensor: scale(1) = 1 * scale, no sync.
            one = torch.ones((), dtype=torch.float32, device=device)
            self._scale = self._scaler.scale(one).detach().reshape(()).to(torch.float64)

    def _segments(
        self, chunk: list[tuple[int, torch.Tensor]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a packed chunk: the row of every element (int64), its histogram key offset (int32) and the row
        of every piece (int64), cached by layout (no sync: built on the host, copied asynchronously from
        pinned memory on accelerators)."""
        layout = tuple((idx, t.numel()) for idx, t in chunk)
        key = (device, layout)
        got = self._seg_cache.get(key)
        if got is None:
            ids = torch.tensor([i for i, _ in layout], dtype=torch.int64)
            lens = torch.tensor([n for _, n in layout], dtype=torch.int64)
            if device.type != "cpu":
                ids = ids.pin_memory().to(device, non_blocking=True)
                lens = lens.pin_memory().to(device, non_blocking=True)
            seg = torch.repeat_interleave(ids, lens, output_size=sum(n for _, n in layout))
            got = (seg, (seg * self._tab.stride).to(torch.int32), ids)
            if len(self._seg_cache) > 256:
                self._seg_cache.clear()
            self._seg_cache[key] = got
        return got[0], got[1], got[2]

    def _measure(self, pieces: Sequence[tuple[int, torch.Tensor]]) -> None:
        c = self._cols
        n_rows = len(self.entries)
        for chunk in _pack(pieces):
            dev = chunk[0][1].device
            flat = chunk[0][1] if len(chunk) == 1 else torch.cat([t.float() for _, t in chunk])
            seg, key_off, run_rows = self._segments(chunk, dev)
            lengths = [t.numel() for _, t in chunk]
            rows = _segment_stats(flat, seg, n_rows, self._tab, key_off, (lengths, run_rows))
            buf = self._table(dev)
            rows = rows.to(buf.device, non_blocking=True)
            buf[:, c.NUMEL : c.updated] += rows[:, c.NUMEL : c.updated]
            torch.maximum(buf[:, c.MAX_ABS], rows[:, c.MAX_ABS], out=buf[:, c.MAX_ABS])
            torch.minimum(buf[:, c.MIN_ABS], rows[:, c.MIN_ABS], out=buf[:, c.MIN_ABS])

    def _flush(self, *, weights: bool) -> None:
        pieces = self._pending_a
        self._pending_a, self._pending_n = [], 0
        if weights:
            pieces = pieces + sorted(self._pending_w.items())
            self._pending_w = {}
        if pieces:
            self._measure(pieces)

    def _weight_hook(self, idx: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if self.sampling and p.grad is not None:
                g = p.grad.detach()
                if g.layout != torch.strided:  # sparse (nn.Embedding(sparse=True)): counted like dense
                    g = g.to_dense()
                self._note_scale(g.device)
                # A copy: .grad may still be unscaled, clipped or accumulated into before step().
                mask = self._exclude.get(idx)
                g = g.clone() if mask is None else g.masked_fill(mask, 0.0)
                self._pending_w[idx] = g.reshape(-1)

        return hook

    def _forward_hook(self, idx: int) -> Callable[[nn.Module, Any, Any], None]:
        def grad_hook(grad: torch.Tensor) -> None:
            g = grad.detach()
            self._note_scale(g.device)
            self._pending_a.append((idx, g.reshape(-1)))
            self._pending_n += g.numel()
            if self._pending_n >= _CHUNK:
                self._flush(weights=False)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.sampling or not torch.is_grad_enabled():
                return
            for t in _tensors(output):
                if t.requires_grad and t.is_floating_point():
                    t.register_hook(grad_hook)  # type: ignore[no-untyped-call]

        return hook

    def _swamp_pieces(self, optimizer: torch.optim.Optimizer) -> list[tuple[int, torch.Tensor]]:
        return [
            (self._param_index[id(p)], p.detach().reshape(-1))
            for group in optimizer.param_groups
            for p in group["params"]
            if id(p) in self._param_index
        ]

    def _opt_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.sampling:
            return
        self._snap = [
            (chunk, torch.cat([t.float() for _, t in chunk])) for chunk in _pack(self._swamp_pieces(optimizer))
        ]

    def _opt_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.sampling or not self._snap:
            return
        c = self._cols
        n_rows = len(self.entries)
        # Re-read the parameters (packed exactly as before the step): a flattened non-contiguous parameter
        # (e.g. a channels_last convolution weight) is a copy, which the step did not update.
        fresh = _pack(self._swamp_pieces(optimizer))
        for (chunk, old), now in zip(self._snap, fresh, strict=True):
            dev = old.device
            new = torch.cat([t.float() for _, t in now])
            counts = _swamping_counts(old, new, self._segments(chunk, dev)[0], n_rows, self.config.formats)
            buf = self._table(dev)
            buf[:, c.updated :] += counts.to(buf.device, non_blocking=True)
        self._snap = []

    # -- stepping and reading ------------------------------------------------------------------------------
    def step(self) -> None:
        """End the current training step (call after the optimizer step). Does not sync."""
        if self.sampling:
            self._sampled += 1
            self._flush(weights=True)
            if self._buf is not None:
                buf = self._buf
                self._records.append((self._step, buf, self._scale))
                if self._total is None:
                    self._total = buf.clone()
                else:
                    self._total = _combine_tables(self._total, buf.to(self._total.device), self._cols)
        self._buf = None
        self._scale = None
        self._pending_w, self._pending_a, self._pending_n, self._snap = {}, [], 0, []
        self._step += 1
        if self.sampling:
            self._attach()
        else:
            self._detach()

    def read(self) -> MonitorStats:
        """Copy the kept tables and the totals to the host. **Synchronises** (one copy per call)."""
        c = self._cols
        e = len(self.entries)
        if self._records:
            dev = self._records[0][1].device
            nan = torch.full((), math.nan, dtype=torch.float64, device=dev)
            scales = torch.stack([s.to(dev) if s is not None else nan for _, _, s in self._records])
            tables = torch.stack([t.to(dev) for _, t, _ in self._records])
            total = self._total if self._total is not None else tables.sum(0)
            flat = torch.cat([scales, tables.reshape(-1), total.to(dev).reshape(-1)]).cpu().numpy()
            r = len(self._records)
            scale_arr = flat[:r]
            tab_arr = flat[r : r + r * e * c.width].reshape(r, e, c.width)
            total_arr = flat[r + r * e * c.width :].reshape(e, c.width)
        else:
            scale_arr = np.zeros(0)
            tab_arr = np.zeros((0, e, c.width))
            total_arr = np.zeros((e, c.width))
            total_arr[:, c.MIN_ABS] = math.inf
            if self._total is not None:
                total_arr = self._total.cpu().numpy()
        emulation = None
        if self._counters is not None:
            # The emulation's own counts at its rounding sites (cumulative since the counters were reset).
            emulation = {
                key: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v)
                for key, v in self._counters.read().items()
            }
        return MonitorStats(
            source="emulated" if emulation is not None else "fp32",
            formats=self.config.formats,
            entries=self.entries,
            steps=np.array([s for s, _, _ in self._records], dtype=np.int64),
            scales=scale_arr,
            tables=tab_arr,
            total=total_arr,
            sampled=self._sampled,
            emulation=emulation,
        )

    def reset(self) -> None:
        """Forget every measurement (the step counter too). Does not sync."""
        self._records.clear()
        self._total = None
        self._buf = None
        self._scale = None
        self._pending_w, self._pending_a, self._pending_n, self._snap = {}, [], 0, []
        self._step = 0
        self._sampled = 0
        self._attach()

    def _attach(self) -> None:
        # Hooks live only during sampled steps: an unsampled step runs without any (module hooks would send
        # every forward through nn.Module's slow path).
        if self._handles or self._removed:
            return
        for kind, obj, idx in self._hook_sites:
            if kind == "weight":
                hook = self._weight_hook(idx)
                self._handles.append(obj.register_post_accumulate_grad_hook(hook))
            else:
                self._handles.append(obj.register_forward_hook(self._forward_hook(idx)))
        if self._optimizer is not None:
            self._handles.append(self._optimizer.register_step_pre_hook(self._opt_pre))
            self._handles.append(self._optimizer.register_step_post_hook(self._opt_post))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def remove(self) -> None:
        """Remove every hook from the model and the optimizer, for good."""
        self._detach()
        self._removed = True

    def __enter__(self) -> GradientMonitor:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _exclude_masks(
    model: nn.Module, exclude: Mapping[str, torch.Tensor] | None, index: Mapping[int, int]
) -> dict[int, torch.Tensor]:
    if exclude is None:
        return {}
    if not isinstance(exclude, Mapping):
        raise TypeError(f"exclude must be a mapping of parameter name to bool mask, got {type(exclude).__name__}")
    params = dict(model.named_parameters())
    out: dict[int, torch.Tensor] = {}
    for name, mask in exclude.items():
        p = params.get(name)
        if p is None or id(p) not in index:
            raise ValueError(f"exclude: {name!r} is not a monitored parameter of the model")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != p.shape:
            raise ValueError(f"exclude[{name!r}] must be a bool tensor of shape {tuple(p.shape)}")
        out[index[id(p)]] = mask.to(p.device)
    return out


def _combine_tables(a: torch.Tensor, b: torch.Tensor, cols: Columns) -> torch.Tensor:
    out = a.clone()
    out[:, cols.NUMEL :] += b[:, cols.NUMEL :]
    out[:, cols.MAX_ABS] = torch.maximum(a[:, cols.MAX_ABS], b[:, cols.MAX_ABS])
    out[:, cols.MIN_ABS] = torch.minimum(a[:, cols.MIN_ABS], b[:, cols.MIN_ABS])
    return out
