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

The counting kernels (thresholds, the packed histogram kernel, the swamping counts) live in
:mod:`lossscale.monitor._kernel`, which knows nothing of modules or hooks; this module hooks a model and an
optimizer, gathers the gradients and keeps the tables.

With an ``optimizer`` it also measures **swamping**: around each sampled ``optimizer.step()`` (optimizer step
pre/post hooks, the public ``torch.optim.Optimizer`` API), an element is *updated* when its FP32 value
changed, and *swamped in F* when it changed but ``round_F(w_new) == round_F(w_old)``: the update would be
lost if the weights were stored in ``F`` (Zamirai et al. 2020, "Revisiting BFloat16 Training", arXiv:2010.06192).

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
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from .._optimizers import check_not_meta, unwrap_optimizer
from ..formats import FloatFormat, FormatLike
from . import _native
from ._kernel import (
    HIST_MAX_LOG2,
    HIST_MIN_LOG2,
    Columns,
    FormatThresholds,
    _combine_rows,
    _combine_tables,
    _Raw,
    _swamping_counts,
    _tables,
    gradient_stats,
    thresholds,
)

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
# Gradients (and parameters, for swamping) at least this large are measured on their own as they come, without
# the copy that packing (or keeping a weight gradient until step()) costs; the per-tensor overhead of about
# ten small kernels is then well amortised.
_DIRECT = 1 << 17


def _pack(pieces: Sequence[tuple[int, torch.Tensor]], chunk: int | None = None) -> list[list[tuple[int, torch.Tensor]]]:
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

        during backward:   each activation gradient (hook on each leaf module's output) and each weight
                           gradient (post-accumulate-grad hook, so before any unscale_): a large one
                           (>= 128K elements) is counted at once; small ones are kept (weights: a copy)
                           and counted in packed chunks (many small gradients in one pass)
        counting:          a histogram of integer keys of |g|'s bit pattern per row (on the device),
                           raw; max|g| and min nonzero |g| as bit patterns (on the CPU, one fused C pass
                           per element, built on first use: see lossscale.monitor._native)
        around optimizer.step():  swamped(f) = #(w changed and round_f(w_new) == round_f(w_old))
        monitor.step():    count the last small ones; turn the histograms into the step's table (zeros /
                           underflow / subnormal / overflow per format, histogram of ceil(log2|g|)), keep
                           it, add it to the running totals

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
        On a sampled step the small activation gradients are kept alive until 1M elements have gathered
        (then measured and released) and the small weight gradients are copied: extra memory of at most
        the small weight gradients plus a 1M-element chunk, and the temporaries of counting one large
        gradient (about 12 bytes per element). A step with several backward passes (gradient
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
        self._raw: _Raw | None = None
        self._swamp: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._pending_w: dict[int, torch.Tensor] = {}
        self._pending_a: list[tuple[int, torch.Tensor]] = []
        self._pending_n = 0
        self._snap: list[tuple[list[tuple[int, torch.Tensor]], torch.Tensor]] = []
        self._snap_big: list[tuple[int, torch.Tensor]] = []
        self._snap_native: list[tuple[int, torch.Tensor]] = []
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
    def _raw_on(self, device: torch.device) -> _Raw:
        """This step's raw accumulators (on the device of the first gradient seen)."""
        if self._raw is None:
            self._raw = _Raw(len(self.entries), self._tab, device)
        return self._raw

    def _step_table(self) -> torch.Tensor | None:
        """This step's statistics rows, or None when nothing was measured."""
        if self._raw is None and self._swamp is None:
            return None
        if self._raw is not None:
            buf = self._raw.rows()
        else:
            assert self._swamp is not None
            buf = torch.zeros(len(self.entries), self._cols.width, dtype=torch.float64, device=self._swamp.device)
            buf[:, self._cols.MIN_ABS] = math.inf
        if self._swamp is not None:
            buf[:, self._cols.updated :] += self._swamp.to(buf.device, non_blocking=True)
        return buf

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
        if pieces and self._native_ok(t for _, t in pieces):
            lib = _native.library()
            if lib is not None:  # the fused CPU kernel: every piece in place, no packing copy
                self._raw_on(torch.device("cpu")).add_native(lib, pieces)
                return
        for chunk in _pack(pieces):
            dev = chunk[0][1].device
            flat = chunk[0][1] if len(chunk) == 1 else torch.cat([t.float() for _, t in chunk])
            seg, key_off, run_rows = self._segments(chunk, dev)
            lengths = [t.numel() for _, t in chunk]
            self._raw_on(dev).add_segments(flat, seg, key_off, (lengths, run_rows))

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
                mask = self._exclude.get(idx)
                if mask is not None:
                    g = g.masked_fill(mask, 0.0)
                if g.numel() >= _DIRECT:
                    # Measured now, replacing the row: with several backward passes the last one (the
                    # accumulated gradient) is what counts, as for the packed ones below.
                    self._raw_on(g.device).add(g.reshape(-1), idx, assign=True)
                else:
                    # A copy: .grad may still be unscaled, clipped or accumulated into before step().
                    self._pending_w[idx] = (g.clone() if mask is None else g).reshape(-1)

        return hook

    def _forward_hook(self, idx: int) -> Callable[[nn.Module, Any, Any], None]:
        def grad_hook(grad: torch.Tensor) -> None:
            g = grad.detach()
            self._note_scale(g.device)
            if g.numel() >= _DIRECT:
                self._raw_on(g.device).add(g.reshape(-1), idx)
                return
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

    def _native_ok(self, tensors: Iterable[torch.Tensor]) -> bool:
        """Whether these tensors (and this step's accumulators) are on the CPU, where the fused kernel runs."""
        if self._raw is not None and self._raw.counts.device.type != "cpu":
            return False
        return all(t.device.type == "cpu" for t in tensors)

    def _opt_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.sampling:
            return
        pieces = self._swamp_pieces(optimizer)
        if (
            pieces and _native.native_formats(self.config.formats) and self._native_ok(t for _, t in pieces)
            and _native.library() is not None
        ):
            # The fused CPU kernel compares each parameter in place after the step: a contiguous FP32 copy now.
            self._snap_native = [
                (idx, t.float() if t.dtype != torch.float32 else t.clone(memory_format=torch.contiguous_format))
                for idx, t in pieces
            ]
            return
        # Large parameters are compared one by one (no packing copy); the small ones packed into chunks.
        self._snap_big = [(idx, t.float() if t.dtype != torch.float32 else t.clone()) for idx, t in pieces
                          if t.numel() >= _DIRECT]  # fmt: skip
        small = [(idx, t) for idx, t in pieces if t.numel() < _DIRECT]
        self._snap = [(chunk, torch.cat([t.float() for _, t in chunk])) for chunk in _pack(small)]

    def _swamp_add(self, row: int | None, counts: torch.Tensor) -> None:
        if self._swamp is None:
            dev = self._raw.counts.device if self._raw is not None else counts.device
            self._swamp = torch.zeros(len(self.entries), 1 + len(self.formats), dtype=torch.float64, device=dev)
        counts = counts.to(self._swamp.device, non_blocking=True)
        if row is None:
            self._swamp += counts
        else:
            self._swamp[row] += counts

    def _opt_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.sampling and self._snap_native:
            lib = _native.library()
            assert lib is not None  # checked before the step
            now = self._swamp_pieces(optimizer)
            olds = [t for _, t in self._snap_native]
            news = [t if _native.usable(t) else t.float().contiguous() for _, t in now]
            if [i for i, _ in now] != [i for i, _ in self._snap_native] or any(
                a.numel() != b.numel() for a, b in zip(olds, news, strict=True)
            ):
                raise RuntimeError("GradientMonitor: the optimizer's parameters changed during its step()")
            counts = torch.zeros(len(self.entries), 1 + len(self.formats), dtype=torch.int64)
            _native.swamp(lib, olds, news, [i for i, _ in now], self.config.formats, counts)
            self._swamp_add(None, counts.to(torch.float64))
            self._snap_native = []
            return
        if not self.sampling or not (self._snap or self._snap_big):
            return
        n_rows = len(self.entries)
        # Re-read the parameters (split and packed exactly as before the step): a flattened non-contiguous
        # parameter (e.g. a channels_last convolution weight) is a copy, which the step did not update.
        pieces = self._swamp_pieces(optimizer)
        fresh_big = [(idx, t) for idx, t in pieces if t.numel() >= _DIRECT]
        for (idx, old), (_, new) in zip(self._snap_big, fresh_big, strict=True):
            self._swamp_add(idx, _swamping_counts(old, new, None, 1, self.config.formats)[0])
        fresh = _pack([(idx, t) for idx, t in pieces if t.numel() < _DIRECT])
        for (chunk, old), now in zip(self._snap, fresh, strict=True):
            new = torch.cat([t.float() for _, t in now])
            counts = _swamping_counts(old, new, self._segments(chunk, old.device)[0], n_rows, self.config.formats)
            self._swamp_add(None, counts)
        self._snap, self._snap_big = [], []

    # -- stepping and reading ------------------------------------------------------------------------------
    def _clear_step(self) -> None:
        self._raw = None
        self._swamp = None
        self._scale = None
        self._pending_w, self._pending_a, self._pending_n = {}, [], 0
        self._snap, self._snap_big = [], []
        self._snap_native = []

    def step(self) -> None:
        """End the current training step (call after the optimizer step). Does not sync."""
        if self.sampling:
            self._sampled += 1
            self._flush(weights=True)
            buf = self._step_table()
            if buf is not None:
                self._records.append((self._step, buf, self._scale))
                if self._total is None:
                    self._total = buf.clone()
                else:
                    self._total = _combine_tables(self._total, buf.to(self._total.device), self._cols)
        self._clear_step()
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
        self._clear_step()
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
