"""The statistics kernels of :mod:`lossscale.monitor`: exact per-format thresholds, the packed
counting/histogram kernel over FP32 bit patterns, and the swamping counts. Plain tensor functions: no
``torch.nn``, no hooks, no host syncs (see :mod:`lossscale.monitor` for what the columns mean).

How (the kernel, :func:`_segment_stats`): the FP32 bit pattern of ``|g|`` is an integer in the same order as
``|g|``, and its exponent field names the binade. Every region edge is either a binade edge or lies inside
one binade, so one integer key per element, ``binade * (K + 1) + #(edges inside its binade below |g|)``
(the edges looked up per binade), and one histogram of (row, key) give every count above by cumulative sums.
Many gradients are packed into one flat chunk with a row index per element, so the number of kernels per
step does not grow with the number of layers.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..formats import FP32, FloatFormat, FormatLike
from ..quantize import quantize
from . import _native

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
# _MIN_NOTE: the smallest nonzero |x| is found as min((bits - 1) & INT32_MAX): 0 goes to INT32_MAX (ignored by
# the min), every other pattern keeps its order; adding 1 to the min gives the pattern back.


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
        self.lut_cpu = torch.tensor(luts, dtype=torch.int32) if luts else torch.zeros(0, dtype=torch.int32)
        # The same edges as (edge pattern, pattern of the top of its binade) pairs, for the fused kernel.
        self.edge_pairs = [(e, b << 23) for lst in luts for b, e in enumerate(lst) if e != _SIGN_OFF]

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


class _Raw:
    """Raw per-row accumulators of the statistics kernel on one device: the key histogram ``counts``
    (int64, ``[n_rows, tab.stride]``) and the extremes as FP32 magnitude bit patterns, ``mx`` (largest, NaN as
    inf; 0 when empty) and ``mn`` (smallest nonzero; INT32_MAX when none), int32 ``[n_rows]``. Adding into
    them is a handful of element-wise passes per tensor; :meth:`rows` turns them into :class:`Columns` rows
    once (a fixed few dozen small kernels, however many tensors were added)."""

    def __init__(self, n_rows: int, tab: _Tables, device: torch.device) -> None:
        self.tab = tab
        self.n_rows = n_rows
        self.counts = torch.zeros(n_rows, tab.stride, dtype=torch.int64, device=device)
        self.mx = torch.zeros(n_rows, dtype=torch.int32, device=device)
        self.mn = torch.full((n_rows,), _SIGN_OFF, dtype=torch.int32, device=device)

    def add(self, x: torch.Tensor, row: int, *, assign: bool = False) -> None:
        """Count the flat tensor ``x`` into ``row`` (``assign``: replace what the row held). No sync."""
        if self.counts.device.type == "cpu" and x.device.type == "cpu" and (lib := _native.library()) is not None:
            if assign:
                self.counts[row].zero_()
                self.mx[row] = 0
                self.mn[row] = _SIGN_OFF
            self.add_native(lib, [(row, x)])
            return
        bits = _abs_bits(x)
        key, p = _keys(bits, self.tab)
        counts = _bincount(key, self.tab.stride)
        if bits.numel():
            mx = bits.amax().clamp_(max=_INF_BITS)
            mn = p.bitwise_and_(_SIGN_OFF).amin()  # see _MIN_NOTE
        else:
            mx = torch.zeros((), dtype=torch.int32, device=x.device)
            mn = torch.full((), _SIGN_OFF, dtype=torch.int32, device=x.device)
        dev = self.counts.device
        if x.device != dev:
            counts, mx, mn = (t.to(dev, non_blocking=True) for t in (counts, mx, mn))
        if assign:
            self.counts[row] = counts
            self.mx[row] = mx
            self.mn[row] = mn
        else:
            self.counts[row] += counts
            torch.maximum(self.mx[row], mx, out=self.mx[row])
            torch.minimum(self.mn[row], mn, out=self.mn[row])

    def add_native(self, lib: Any, pieces: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Count CPU tensors (row, flat tensor) with the fused kernel (:mod:`._native`): one pass per element,
        no packing copy; bf16/fp16 convert exactly to FP32 first, fp64 is judged by its FP32 rounding."""
        ready = [(row, t if _native.usable(t) else t.detach().float().contiguous()) for row, t in pieces]
        tab = self.tab
        _native.hist(lib, ready, tab.lut_cpu, tab.k, tab.edge_pairs, tab.stride, self.counts, self.mx, self.mn)

    def add_segments(
        self,
        x: torch.Tensor,
        seg: torch.Tensor | None,
        key_off: torch.Tensor | None = None,
        pieces: tuple[Sequence[int], torch.Tensor] | None = None,
    ) -> None:
        """Count a flat tensor whose element ``i`` belongs to row ``seg[i]`` (row 0 when None). Optional
        precomputed layout: ``key_off`` (int32, ``seg * tab.stride``) and ``pieces`` (the lengths of the
        consecutive runs of equal ``seg`` and, on the device, each run's row), which lets the extremes be
        reduced run by run. No sync."""
        if seg is None:
            self.add(x, 0)
            return
        tab = self.tab
        dev = x.device
        bits = _abs_bits(x)
        key, p = _keys(bits, tab)
        key.add_(key_off if key_off is not None else (seg * tab.stride).to(torch.int32))
        counts = _bincount(key, self.n_rows * tab.stride).view(self.n_rows, tab.stride)
        big = bits.clamp(max=_INF_BITS)
        small = p.bitwise_and_(_SIGN_OFF)  # see _MIN_NOTE
        if pieces is not None and len(pieces[0]) * 4096 <= big.numel():
            # Few long runs: a plain reduction per run, then per row (much cheaper than a scatter per element).
            lengths, run_rows = pieces
            mx_runs = torch.stack([t.amax() for t in torch.split(big, list(lengths))])
            mn_runs = torch.stack([t.amin() for t in torch.split(small, list(lengths))])
            mx = torch.zeros(self.n_rows, dtype=torch.int32, device=dev).scatter_reduce_(0, run_rows, mx_runs, "amax")
            mn = torch.full((self.n_rows,), _SIGN_OFF, dtype=torch.int32, device=dev)
            mn = mn.scatter_reduce_(0, run_rows, mn_runs, "amin")
        else:
            mx = torch.zeros(self.n_rows, dtype=torch.int32, device=dev).scatter_reduce_(0, seg, big, "amax")
            mn = torch.full((self.n_rows,), _SIGN_OFF, dtype=torch.int32, device=dev)
            mn = mn.scatter_reduce_(0, seg, small, "amin")
        out = self.counts.device
        if dev != out:
            counts, mx, mn = (t.to(out, non_blocking=True) for t in (counts, mx, mn))
        self.counts += counts
        torch.maximum(self.mx, mx, out=self.mx)
        torch.minimum(self.mn, mn, out=self.mn)

    def rows(self) -> torch.Tensor:
        """The statistics rows ``[n_rows, Columns.width]`` (float64; swamping columns zero). No sync."""
        return _rows(self.counts, self.mx, self.mn, self.tab)


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as FP32 bit patterns (int32, ordered like |x|), flat. bf16/fp16 convert exactly; fp64 is judged by
    its FP32 rounding."""
    if x.dtype == torch.float32:
        return x.contiguous().view(torch.int32).bitwise_and(_SIGN_OFF).reshape(-1)
    return x.float().view(torch.int32).bitwise_and_(_SIGN_OFF).reshape(-1)  # a fresh copy: in place


def _keys(bits: torch.Tensor, tab: _Tables) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element (int32): ``#(edges inside its binade below |x|) * 257 + binade``, and ``bits - 1``
    (which the caller may overwrite). int32 arithmetic throughout; ``bits > edge`` is taken as the sign bit
    of ``edge - bits`` (both in [0, 2^31), so the difference cannot overflow), which keeps every pass in one
    dtype."""
    p = bits.sub(1)
    # binade index, see above. (The operator form: torch 2.13's out-of-place ``Tensor.bitwise_right_shift(int)``
    # runs a scalar loop on the CPU, 20-30x slower than ``>>`` or the in-place method; measured on 1.6M int32.)
    b = (p >> 23).add_(1)
    # -1 where |x| is above the k-th edge of its binade, else 0 (all gathered before b is reused as the key)
    above = [lut.index_select(0, b).sub_(bits).bitwise_right_shift_(31) for lut in tab.on(bits.device)[2:]]
    # The key is stored edge-count-major, c * 257 + binade (a fused multiply-add, no multiplication pass);
    # _rows reorders the (small) histogram to binade-major before its cumulative sum.
    for t in above:
        b.sub_(t, alpha=_NB_BINADES)
    return b, p


def _bincount(key: torch.Tensor, size: int) -> torch.Tensor:
    """Histogram (int64) of int32 keys in [0, size). On the CPU torch.bincount (fastest there); elsewhere a
    scatter-add, because bincount on an accelerator reads the largest key back to the host (a sync)."""
    if key.device.type == "cpu":
        return torch.bincount(key, minlength=size)
    counts = torch.zeros(size, dtype=torch.int64, device=key.device)
    return counts.scatter_add_(0, key.long(), torch.ones(1, dtype=torch.int64, device=key.device).expand(key.numel()))


def _rows(counts: torch.Tensor, mx: torch.Tensor, mn: torch.Tensor, tab: _Tables) -> torch.Tensor:
    """Statistics rows from raw accumulators (see :class:`_Raw`)."""
    cols = tab.cols
    n_seg = counts.shape[0]
    dev = counts.device
    hi, lo = tab.on(dev)[:2]
    # Keys are edge-count-major (see _keys): reorder each row's histogram to binade-major, the order of |x|.
    counts = counts.view(n_seg, tab.k + 1, _NB_BINADES).transpose(1, 2).reshape(n_seg, tab.stride)
    cum = counts.cumsum(1).to(torch.float64)
    numel = cum[:, -1:]
    per_format = cum[:, hi] - cum[:, lo]
    zeros = cum[:, tab.zero_pos : tab.zero_pos + 1]
    n_inf = cum[:, tab.inf_pos : tab.inf_pos + 1] - cum[:, tab.max_pos : tab.max_pos + 1]
    n_nan = numel - cum[:, tab.inf_pos : tab.inf_pos + 1]
    hist = counts.view(n_seg, _NB_BINADES, tab.k + 1)[:, 1:256].sum(2).to(torch.float64)  # ceil(log2|x|)
    hist[:, -1:] -= n_inf
    max_abs = mx.view(torch.float32).to(torch.float64).view(n_seg, 1)
    none = mn >= _INF_BITS  # nothing nonzero and finite-or-inf: min undefined
    min_abs = torch.where(none, _INF_BITS, mn + 1).view(torch.float32).to(torch.float64).view(n_seg, 1)
    swamp = torch.zeros(n_seg, 1 + cols.n_formats, dtype=torch.float64, device=dev)
    return torch.cat([max_abs, min_abs, numel, zeros, n_inf, n_nan, per_format, hist, swamp], dim=1)


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
    one histogram, however many gradients were packed into ``x``; no sync. ``key_off``, ``pieces``: see
    :meth:`_Raw.add_segments`."""
    raw = _Raw(n_seg, tab, x.device)
    raw.add_segments(x.reshape(-1), seg, key_off, pieces)
    return raw.rows()


def _round_eq(a: torch.Tensor, b: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``round_fmt(a) == round_fmt(b)`` elementwise (no sync). For bf16, fp16 and e5m2 the comparison is made
    in the narrow dtype itself, whose cast is the same round-to-nearest-even, overflowing to inf, as
    :func:`quantize`'s (which uses these casts itself); e4m3fn's native cast saturates, so it goes through
    :func:`quantize`."""
    dtype = fmt.torch_dtype
    if dtype in _NATIVE_EQ and a.dtype == torch.float32:
        return a.to(dtype) == b.to(dtype)
    return quantize(a, fmt) == quantize(b, fmt)


_NATIVE_EQ = (torch.bfloat16, torch.float16, torch.float8_e5m2)


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
    if seg is None:  # everything in row 0: a count per column, no histogram
        # An unchanged element (old == new, so not NaN) always has round_f(new) == round_f(old), hence
        # #(changed and same rounding) = #(same rounding) - #(unchanged): one pass fewer per format.
        updated = (new != old).count_nonzero()
        unchanged = old.numel() - updated
        got = [updated] + [_round_eq(new, old, f).count_nonzero() - unchanged for f in formats]
        out = torch.zeros(n_seg, 1 + len(formats), dtype=torch.float64, device=old.device)
        out[0] = torch.stack(got).to(torch.float64)
        return out
    dev = old.device
    n_codes = 1 << (1 + len(formats))
    code = (new != old).to(torch.uint8)
    for i, f in enumerate(formats):
        code.bitwise_or_(_round_eq(new, old, f).to(torch.uint8) << (i + 1))
    key = code.to(torch.int64)
    if seg is not None:
        key.add_(seg, alpha=n_codes)
    hist = torch.zeros(n_seg * n_codes, dtype=torch.int64, device=dev)
    hist.scatter_add_(0, key, torch.ones(1, dtype=torch.int64, device=dev).expand(key.numel()))
    masks = _swamp_masks(len(formats), dev)
    return hist.view(n_seg, n_codes).to(torch.float64) @ masks


def _combine_rows(rows: np.ndarray, cols: Columns) -> np.ndarray:
    out = np.zeros(cols.width, dtype=np.float64)
    if rows.shape[0] == 0:
        out[cols.MIN_ABS] = math.inf
        return out
    out[cols.NUMEL :] = rows[:, cols.NUMEL :].sum(axis=0)
    out[cols.MAX_ABS] = rows[:, cols.MAX_ABS].max()
    out[cols.MIN_ABS] = rows[:, cols.MIN_ABS].min()
    return out


def _combine_tables(a: torch.Tensor, b: torch.Tensor, cols: Columns) -> torch.Tensor:
    out = a.clone()
    out[:, cols.NUMEL :] += b[:, cols.NUMEL :]
    out[:, cols.MAX_ABS] = torch.maximum(a[:, cols.MAX_ABS], b[:, cols.MAX_ABS])
    out[:, cols.MIN_ABS] = torch.minimum(a[:, cols.MIN_ABS], b[:, cols.MIN_ABS])
    return out
