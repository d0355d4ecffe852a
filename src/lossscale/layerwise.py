"""LayerwiseScaler: a loss scale per layer, for models whose gradients span more binades than the format holds.

One global loss scale is bounded above by the layer with the largest gradients (overflow) and below by the
layer with the smallest (underflow). When a model's activation gradients spread over more binades than the
gradient format holds (FP16 about 40 with subnormals, E5M2 about 32), no single scale works. Per-layer
scaling gives each layer its own scale ``s_l``:

    the loss is multiplied by the loss scale S (get_scale()); between layers gradients carry S
    at the output of layer l (backward):   g <- g * (s_l / S)      inside l, gradients carry s_l
    at the inputs of layer l (backward):   g <- g * (S / s_l)      back to S for the code around the layers
    before the optimizer:                  grad(p) *= 1 / s_l     for the parameters that layer l uses

The rescaling is inserted at module boundaries by forward hooks (an identity ``autograd.Function`` on the
layer's tensor inputs and outputs, the same mechanism as ``register_full_backward_hook``), so it works on any
graph: every gradient that leaves a layer is brought back to the one scale S before autograd sums it with
anything else (a branch sum, a residual connection, a tensor used twice), and every gradient entering a layer
is brought from S to that layer's scale. With power-of-two scales every conversion is exact.

Two rules choose the per-layer scales:

* ``mode="adaptive"`` (Zhao et al. 2019, "Adaptive Loss Scaling for Mixed Precision Training",
  arXiv:1910.12385): a scale per layer computed from statistics of the gradient entering the layer, so that
  the probability that one of its elements falls below the format's smallest normal number is at most
  ``underflow_prob`` (elements modelled as Gaussian, as in the paper), capped so that the largest element
  times the layer's gain stays ``headroom`` binades below the format's maximum. No overflow-driven search, so
  no skipped steps are needed. By default (one process) the scale is computed during backward from the
  gradient as it arrives, as in the paper; under torch.distributed it comes from the previous iteration's
  statistics, all-reduced, because DDP all-reduces gradients during backward and every rank must use the same
  scales. The layer's gain (largest gradient leaving / largest entering, measured on the previous iteration)
  stands in for the paper's analytic bound from the weights, so that any module is covered, not only GEMMs.
* ``mode="dynamic"`` (fairscale's layer-wise gradient scaler, ``fairscale.optim.layerwise_gradient_scaler``):
  torch.amp.GradScaler's growth/backoff rule (:func:`lossscale.scaling.update_scale`) run per layer: a layer
  where an overflow originates backs off, the others grow every ``growth_interval`` finite iterations.

An overflow anywhere skips the optimizer step for every parameter, and the skip names the layer where it
originated (the layer whose incoming gradient was finite while what it produced was not).

Tied weights and the code around the layers: a parameter's gradient must carry one scale. On the first
forward the scaler walks each layer's autograd graph (from its outputs back to its own input boundaries) to
find the parameters each layer really uses; layers that share a parameter are given one scale, and a layer
sharing a parameter with the code outside the layers (e.g. a GPT-2 head ``h @ wte.weight.T`` written in the
model's ``forward``) is held at S. A layer that reads a tensor which did not enter through its forward
arguments (a closure, a cached attribute produced by another layer) is refused with a RuntimeError naming it.

Host syncs: ``scale``, the backward hooks, ``unscale_`` and ``update`` never sync; ``step`` syncs once to
decide (and once more on a skip, to name the culprit); ``layer_scales``, ``layer_stats`` and ``state_dict`` sync;
``get_scale`` does not (the loss scale is a constant). The few small index tensors built from host lists go
to an accelerator through pinned memory, non-blocking, and the group indices are cached after tracing, so
that none of them waits for the device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.autograd.function import once_differentiable
from torch.utils.hooks import RemovableHandle

from . import _compat
from .formats import FP16, FloatFormat
from .scaler import SkipBudgetExceeded, _Owners
from .scaling import (
    DynamicScaling,
    PyScalingState,
    ScalingState,
    StaticScaling,
    _check_int,
    _check_scale_value,
    _fp32,
    init_state_py,
    state_from_py,
    state_to_py,
    update_scale,
)

__all__ = [
    "LayerSkipEvent",
    "LayerwiseScaler",
    "adaptive_log2_scales",
    "recommend_layer_scales",
    "recommend_layer_scales_from_histograms",
    "select_layers",
]

logger = logging.getLogger("lossscale")

STATE_DICT_VERSION = 1
_STATE_DICT_FORMAT = "lossscale.LayerwiseScaler"
Mode = Literal["adaptive", "dynamic"]
Stats = Literal["auto", "current", "previous"]
_MODES = ("adaptive", "dynamic")
_STATS = ("auto", "current", "previous")
AMBIENT = "<outside layers>"  # the name used for the code around the layers (loss, residual sums, ...)
# Per-layer scales are kept within 2^-100 .. 2^100 and the loss scale within 2^-20 .. 2^20, so that every
# conversion factor s/S and S/s is a normal FP32 number (multiplying by a power of two is then exact).
_LOG2_LIMIT = 100
_LOSS_LOG2_LIMIT = 20


@dataclasses.dataclass(frozen=True)
class LayerSkipEvent:
    """A skipped optimizer step of a :class:`LayerwiseScaler`, passed to skip hooks and logged.

    Attributes:
        step: index of the iteration (the number of ``update()`` calls before it).
        scale: the loss scale S.
        consecutive_skips: skipped iterations in a row, this one included.
        skipped_steps: skipped iterations since the start, this one included.
        culprits: names of the layers where the non-finite gradient originated (their incoming gradient was
            finite, what they produced was not), or ``("<outside layers>",)`` when it came from the code
            around the layers (the loss, a residual sum) or from a parameter used there.
        layer_scales: the per-layer scales the gradients were computed with, by layer name.
    """

    step: int
    scale: float
    consecutive_skips: int
    skipped_steps: int
    culprits: tuple[str, ...]
    layer_scales: Mapping[str, float]


# ----------------------------------------------------------------------------------------------------------
# Pure functions


def select_layers(model: torch.nn.Module) -> list[str]:
    """The default layers: from the root down, every module that registers a parameter itself, not descending
    below one (so layers never nest). The root's own parameters belong to the code around the layers.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.MultiheadAttention(2, 1))
        >>> select_layers(m)
        ['0', '2']
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out: list[str] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if any(True for _ in child.parameters(recurse=False)):
                out.append(full)
            else:
                visit(full, child)

    visit("", model)
    return out


def _small_tensor(values: Sequence[float] | Sequence[int] | Sequence[bool], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """A small tensor of host values on ``device`` without a host sync. ``torch.tensor(values, device=cuda)``
    copies from pageable memory, which waits for the device; here the values are built on the CPU and, for
    another device, copied from pinned memory with ``non_blocking=True`` (the caching host allocator keeps
    the pinned block alive until the copy has run)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _erfinv(p: float) -> float:
    return float(torch.erfinv(torch.tensor(p, dtype=torch.float64)))


def _rule_constants(fmt: FloatFormat, underflow_prob: float, headroom: int) -> tuple[float, float]:
    """``(log2(min_normal / (sqrt(2) erfinv(p))), log2(max) - headroom)`` of the adaptive rule."""
    lo = math.log2(fmt.min_normal) - math.log2(math.sqrt(2.0) * _erfinv(underflow_prob))
    return lo, math.log2(fmt.max) - headroom


def adaptive_log2_scales(
    amax: torch.Tensor,
    rms: torch.Tensor,
    gain: torch.Tensor,
    fmt: FloatFormat,
    *,
    underflow_prob: float,
    headroom: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaptive rule (Zhao et al. 2019), elementwise over layers: ``(k, valid)`` with scale ``2^k``.

    From the largest magnitude ``amax`` and the root mean square ``rms`` of the gradient entering each layer
    (true units; over all elements, zeros included, which errs towards a larger scale), and the layer's gain
    ``gain`` (largest gradient it produced / largest it received)::

        sigma = rms                                  # the elements modelled as N(0, sigma^2)
        k_lo  = ceil(log2(min_normal / (sigma * min(gain, 1) * sqrt(2) * erfinv(underflow_prob))))
                                                     # P(|x * 2^k| < min_normal) <= underflow_prob
        k_hi  = floor(log2(max / (amax * max(gain, 1))) - headroom)     # no overflow, with headroom
        k     = clamp(min(k_lo, k_hi), -100, 100)    # overflow wins when both cannot hold

    ``valid`` is False where the statistics say nothing (no nonzero or a non-finite gradient); callers keep
    the previous scale there. Pure; no sync.

    Example:
        >>> import torch
        >>> from lossscale import FP16
        >>> k, ok = adaptive_log2_scales(torch.tensor([2.0**-30]), torch.tensor([2.0**-33]), torch.tensor([1.0]),
        ...                              FP16, underflow_prob=2**-10, headroom=4)
        >>> int(k), bool(ok)
        (29, True)
    """
    amax = amax.float()
    rms = rms.float()
    gain = gain.float()
    valid = torch.isfinite(amax) & (amax > 0) & torch.isfinite(rms) & (rms > 0)
    one = torch.ones_like(amax)
    safe_amax = torch.where(valid, amax, one)
    safe_mean = torch.where(valid, rms, one)
    g = torch.where(torch.isfinite(gain) & (gain > 0), gain, one)
    lo, hi = _rule_constants(fmt, underflow_prob, headroom)
    k_lo = torch.ceil(lo - torch.log2(safe_mean * torch.clamp(g, max=1.0)))
    k_hi = torch.floor(hi - torch.log2(safe_amax * torch.clamp(g, min=1.0)))
    k = torch.clamp(torch.minimum(k_lo, k_hi), -_LOG2_LIMIT, _LOG2_LIMIT)
    return k, valid


def recommend_layer_scales(
    amax: Mapping[str, float],
    rms: Mapping[str, float],
    fmt: FloatFormat,
    *,
    underflow_prob: float = 2.0**-10,
    headroom: int = 4,
) -> dict[str, float]:
    """Per-layer power-of-two scales from per-layer gradient statistics (true units), by layer name.

    The adaptive rule of :func:`adaptive_log2_scales` with unit gain, for reports (``diagnose``): layers
    whose statistics say nothing (all-zero or non-finite gradients) are left out. Host-side.

    Example:
        >>> from lossscale import FP16
        >>> recommend_layer_scales({"fc1": 2.0**-2, "fc9": 2.0**-40}, {"fc1": 2.0**-5, "fc9": 2.0**-43}, FP16)
        {'fc1': 2.0, 'fc9': 549755813888.0}
    """
    names = [n for n in amax if n in rms]
    if not names:
        return {}
    a = torch.tensor([float(amax[n]) for n in names], dtype=torch.float64)
    m = torch.tensor([float(rms[n]) for n in names], dtype=torch.float64)
    k, valid = adaptive_log2_scales(
        a, m, torch.ones_like(a), fmt, underflow_prob=underflow_prob, headroom=headroom
    )
    return {n: math.ldexp(1.0, int(kk)) for n, kk, ok in zip(names, k.tolist(), valid.tolist(), strict=True) if ok}


def recommend_layer_scales_from_histograms(
    layers: Iterable[tuple[str, Sequence[float], float, float]],
    hist_min_log2: int,
    fmt: FloatFormat,
    *,
    underflow_prob: float = 2.0**-10,
    headroom: int = 4,
) -> dict[str, float]:
    """:func:`recommend_layer_scales` from per-layer histograms of ``ceil(log2|g|)`` (what ``diagnose`` keeps).

    ``layers`` holds ``(name, histogram, elements, max_abs)``: bin ``i`` counts ``2^(c-1) < |g| <= 2^c`` with
    ``c = hist_min_log2 + i``, ``elements`` counts every element (zeros included). The RMS is estimated from
    the bins' geometric centres (``|g| ~ 2^(c - 1/2)``), within a factor ``sqrt(2)``. Host-side.

    Example:
        >>> from lossscale import FP16
        >>> hist = [0.0] * 10; hist[2] = 100.0          # 100 values in (2^-32, 2^-31]
        >>> recommend_layer_scales_from_histograms([("fc", hist, 100.0, 2.0**-31)], -33, FP16)
        {'fc': 268435456.0}
    """
    amax: dict[str, float] = {}
    rms: dict[str, float] = {}
    for name, hist, elements, max_abs in layers:
        counts = np.asarray(hist, dtype=np.float64)
        if elements <= 0 or counts.sum() <= 0 or not math.isfinite(max_abs):
            continue
        centres = np.arange(counts.size, dtype=np.float64) + hist_min_log2 - 0.5
        amax[name] = float(max_abs)
        rms[name] = math.sqrt(float((counts * np.exp2(2.0 * centres)).sum()) / float(elements))
    return recommend_layer_scales(amax, rms, fmt, underflow_prob=underflow_prob, headroom=headroom)


# ----------------------------------------------------------------------------------------------------------
# The boundary: an identity in forward that rescales the gradient in backward


class _Boundary(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, owner: LayerwiseScaler, layer: int, is_output: bool, *xs: torch.Tensor) -> Any:
        ctx.ls_owner, ctx.ls_layer, ctx.ls_is_output = owner, layer, is_output
        # An alias, not a view: in-place ops on a layer's output (``ReLU(inplace=True)``) then work as they do
        # without the scaler (a view made inside a custom Function may not be modified in place).
        return tuple(x.detach() for x in xs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *gs: torch.Tensor | None) -> Any:
        owner: LayerwiseScaler = ctx.ls_owner
        return (None, None, None, *owner._rescale(ctx.ls_layer, ctx.ls_is_output, gs))


def _flatten(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        if value.requires_grad and value.is_floating_point():
            out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _flatten(v, out)
    elif isinstance(value, Mapping):
        for v in value.values():
            _flatten(v, out)


def _rebuild(value: Any, it: Iterable[torch.Tensor]) -> Any:
    """``value`` with its grad-requiring float tensors replaced, in :func:`_flatten`'s order."""
    iterator = iter(it)

    def go(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return next(iterator) if (v.requires_grad and v.is_floating_point()) else v
        if isinstance(v, tuple) and hasattr(v, "_fields"):  # NamedTuple
            return type(v)(*(go(x) for x in v))
        if isinstance(v, (list, tuple)):
            return type(v)(go(x) for x in v)
        if isinstance(v, Mapping):
            items = {k: go(x) for k, x in v.items()}
            try:
                rebuilt: Any = type(v)  # a dict subclass (e.g. an OrderedDict) built from a dict
                return rebuilt(items)
            except TypeError:
                return items
        return v

    return go(value)


def _has_hidden_tensor(value: Any) -> bool:
    """Whether ``value`` holds a grad-requiring tensor somewhere :func:`_flatten` does not look (an object)."""
    if isinstance(value, (torch.Tensor, str, bytes, int, float, bool, type(None))):
        return False
    if isinstance(value, (list, tuple)):
        return any(_has_hidden_tensor(v) for v in value)
    if isinstance(value, Mapping):
        return any(_has_hidden_tensor(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(
            isinstance(getattr(value, f.name), torch.Tensor) and getattr(value, f.name).requires_grad
            for f in dataclasses.fields(value)
        )
    return False


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The lower index wins, so that the ambient slot (index L) never represents a real layer.
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


# ----------------------------------------------------------------------------------------------------------
# The scaler


class LayerwiseScaler:
    """Per-layer loss scaling with :class:`lossscale.LossScaler`'s protocol (one line to switch).

    Per iteration::

        scaler.scale(loss).backward()   # loss * S; layer boundaries rescale to s_l and back   (no sync)
        scaler.unscale_(opt)            # grad(p) *= 1/s_l per layer; found = any non-finite   (no sync)
        scaler.step(opt)                # opt.step() unless found                             (one sync)
        scaler.update()                 # per-layer scales for the next iteration             (no sync)

    Args:
        model: the model whose layers get scales. Hooks are installed at construction; :meth:`remove`
            takes them out.
        mode: ``"adaptive"`` (default; Zhao et al. 2019) or ``"dynamic"`` (fairscale-style growth/backoff
            per layer). See the module docstring.
        layers: names of the modules that get a scale (``dict(model.named_modules())`` keys; none may
            contain another), or None for :func:`select_layers` (every module that registers a parameter
            itself, outermost first).
        grad_format: the format the layers' gradients are rounded to (a :class:`~lossscale.FloatFormat` or
            preset name): FP16 (default) for ``fp16-mixed``, ``"e5m2"`` for ``fp8-hybrid``.
        loss_scale: S, the scale of the loss and of gradients between layers (constant), default 1.0. It
            must lie in 2^-20 .. 2^20.
        init_scale: the layers' initial scales: a float for all, or a mapping from layer name to scale
            (missing layers get ``loss_scale``). Default: ``loss_scale`` in adaptive mode, 2^16 in dynamic
            mode.
        stats: adaptive mode only. ``"current"`` computes each layer's scale during backward from the
            gradient as it arrives; ``"previous"`` from the previous iteration's statistics (all-reduced under
            torch.distributed; the first iteration uses ``init_scale``); ``"auto"`` (default) is
            ``"previous"`` when torch.distributed is initialized at the first ``scale``, else ``"current"``.
        underflow_prob: adaptive mode: bound on the probability that a gradient element entering a layer
            falls below the format's smallest normal number; in (0, 0.5). Default 2^-10.
        headroom: adaptive mode: binades kept free below the format's maximum; int >= 0. Default 4.
        growth_factor, backoff_factor, growth_interval, min_scale, max_scale: dynamic mode, per layer, as
            in :class:`~lossscale.scaling.DynamicScaling` (defaults 2.0, 0.5, 2000, None, None).
        max_consecutive_skips: raise :class:`~lossscale.SkipBudgetExceeded` from ``step`` on the skip that
            makes more than this many skipped iterations in a row (default None: never).
        enabled: False makes every method a no-op and installs no hooks.
        process_group: group for the all-reduces under torch.distributed (default: the world group).
        on_skip: a callable receiving a :class:`LayerSkipEvent` per skipped ``step``.

    Example:
        >>> import torch
        >>> from lossscale import LayerwiseScaler
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = LayerwiseScaler(model)
        >>> loss = model(torch.ones(2, 4)).square().mean()
        >>> scaler.scale(loss).backward()
        >>> scaler.step(opt)
        >>> scaler.update()
        >>> sorted(scaler.layer_scales()), scaler.get_scale()
        (['0', '2'], 1.0)

    Warning:
        Every backward through the model must start from ``scaler.scale(loss)`` (else RuntimeError), and
        tensors must enter a layer through its forward arguments.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        mode: Mode = "adaptive",
        layers: Sequence[str] | None = None,
        grad_format: FloatFormat | str = FP16,
        loss_scale: float = 1.0,
        init_scale: float | Mapping[str, float] | None = None,
        stats: Stats = "auto",
        underflow_prob: float = 2.0**-10,
        headroom: int = 4,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float | None = None,
        max_scale: float | None = None,
        max_consecutive_skips: int | None = None,
        enabled: bool = True,
        process_group: Any = None,
        on_skip: Callable[[LayerSkipEvent], None] | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if stats not in _STATS:
            raise ValueError(f"stats must be one of {_STATS}, got {stats!r}")
        if mode == "dynamic" and stats != "auto":
            raise ValueError(f"stats applies to mode='adaptive' only; got stats={stats!r} with mode='dynamic'")
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
        if isinstance(grad_format, str):
            try:
                grad_format = FloatFormat.parse(grad_format)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"grad_format: {exc}") from None
        if not isinstance(grad_format, FloatFormat):
            raise TypeError(f"grad_format must be a FloatFormat or a format name, got {type(grad_format).__name__}")
        _check_scale_value("loss_scale", loss_scale)
        if not (2.0**-_LOSS_LOG2_LIMIT <= float(loss_scale) <= 2.0**_LOSS_LOG2_LIMIT):
            raise ValueError(f"loss_scale must lie in 2^-20 .. 2^20, got {loss_scale!r}")
        if isinstance(underflow_prob, bool) or not isinstance(underflow_prob, (int, float)):
            raise TypeError(f"underflow_prob must be a float, got {type(underflow_prob).__name__}")
        if not (0.0 < underflow_prob < 0.5):
            raise ValueError(f"underflow_prob must lie in the open interval (0, 0.5), got {underflow_prob!r}")
        _check_int("headroom", headroom, 0)
        default_init = float(loss_scale) if mode == "adaptive" else 2.0**16
        # Validates the dynamic rule's arguments in both modes, so that a typo is never silently ignored.
        self._rule = DynamicScaling(
            init_scale=default_init if (init_scale is None or isinstance(init_scale, Mapping)) else init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            min_scale=min_scale,
            max_scale=max_scale,
        )
        self._accounting = StaticScaling(max_consecutive_skips=max_consecutive_skips)
        if on_skip is not None and not callable(on_skip):
            raise TypeError(f"on_skip must be callable or None, got {type(on_skip).__name__}")

        modules = dict(model.named_modules())
        if layers is None:
            names = select_layers(model)
        else:
            if isinstance(layers, str) or not isinstance(layers, Sequence):
                raise TypeError(f"layers must be a sequence of module names or None, got {type(layers).__name__}")
            names = list(layers)
            for n in names:
                if not isinstance(n, str) or n not in modules:
                    raise ValueError(f"layers: {n!r} is not a submodule name of the model (see named_modules())")
                if n == "":
                    raise ValueError("layers: the root module cannot be a layer (its scale would be the loss scale)")
            if len(set(names)) != len(names):
                raise ValueError(f"layers: names must be unique, got {names}")
            for a in names:
                for b in names:
                    if a != b and b.startswith(a + "."):
                        raise ValueError(f"layers: {a!r} contains {b!r}; layers must not nest")
        self._names: list[str] = names
        self._index = {n: i for i, n in enumerate(names)}
        init_values = [default_init] * len(names)
        if isinstance(init_scale, Mapping):
            for n, v in init_scale.items():
                if n not in self._index:
                    raise ValueError(f"init_scale: {n!r} is not one of the layers {names}")
                _check_scale_value(f"init_scale[{n!r}]", v)
                init_values[self._index[n]] = float(v)
        elif init_scale is not None:
            init_values = [float(init_scale)] * len(names)
        for n, v in zip(names, init_values, strict=True):
            if not (2.0**-_LOG2_LIMIT <= v <= 2.0**_LOG2_LIMIT):
                raise ValueError(f"init_scale for layer {n!r} must lie in 2^-100 .. 2^100, got {v!r}")

        self._model = model
        self._mode: Mode = mode
        self._stats_setting: Stats = stats
        self._stats: Literal["current", "previous"] | None = None  # resolved at the first scale()
        self._fmt = grad_format
        self._loss_scale_value = _fp32(float(loss_scale))
        self._underflow_prob = float(underflow_prob)
        self._headroom = headroom
        self._enabled = enabled
        self._process_group = process_group
        # Host-side per-layer state (before the first scale or after load_state_dict).
        self._pending_scales = [_fp32(v) for v in init_values]
        self._pending_trackers = [0] * len(names)
        self._pending_gains = [1.0] * len(names)
        self._pending_accounting: PyScalingState = init_state_py(self._accounting)
        # Device state (created lazily on the loss's device).
        self._device: torch.device | None = None
        self._S: torch.Tensor | None = None
        self._scales: torch.Tensor | None = None  # [L] float32
        self._trackers: torch.Tensor | None = None  # [L] int32
        self._gains: torch.Tensor | None = None  # [L] float32
        self._acct: ScalingState | None = None
        # Groups: layers sharing a parameter share a scale; slot L is the code around the layers (scale S).
        self._uf = _UnionFind(len(names) + 1)
        self._rep: list[int] = list(range(len(names)))
        # Index tensors derived from _rep, on the state's device (built once after tracing; see _rep_tensor).
        self._rep_tensors: dict[str, torch.Tensor] = {}
        self._param_scope: dict[int, int] = {}  # id(param) -> layer index or L (ambient)
        self._params: dict[int, torch.Tensor] = {}  # keeps traced parameters alive (ids stay unique)
        self._tracing = True
        self._traced: set[int] = set()  # layers whose graph was walked
        self._in_nodes: list[Any] = []  # the input boundaries created while tracing (for the ambient walk)
        # Per-iteration state.
        self._armed = False
        self._set: list[bool] = [False] * len(names)
        self._out_factor: list[torch.Tensor] = []
        self._in_factor: list[torch.Tensor] = []
        # Statistics of this iteration's backward, as recorded (reduced per layer at unscale_/update):
        # at a layer's output: amax, 2-norm, elements (at S)
        self._rec_in: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []
        self._rec_out: list[tuple[int, torch.Tensor]] = []  # at a layer's inputs: amax (at s_l)
        self._k_lo: list[torch.Tensor] = []
        self._k_hi: list[torch.Tensor] = []
        self._prev: list[torch.Tensor] = []
        self._new: list[torch.Tensor] = []
        self._last_stats: dict[str, torch.Tensor] | None = None
        self._records: dict[int, tuple[str, torch.Tensor | None, torch.Tensor | None]] = {}  # by id(optimizer)
        self._owners = _Owners()  # who owns each record, held weakly (a freed optimizer's id may be reused)
        self._last_skip: LayerSkipEvent | None = None
        self._last_step_skipped = False
        self._skip_hooks: OrderedDict[int, Callable[[LayerSkipEvent], None]] = OrderedDict()
        if on_skip is not None:
            self.register_skip_hook(on_skip)
        self._hooks: list[RemovableHandle] = []
        if enabled:
            for i, n in enumerate(names):
                module = modules[n]
                self._hooks.append(module.register_forward_pre_hook(self._make_pre_hook(i), with_kwargs=True))
                self._hooks.append(module.register_forward_hook(self._make_post_hook(i)))

    # ------------------------------------------------------------------------------------------------------
    # Introspection

    @property
    def mode(self) -> Mode:
        """``"adaptive"`` or ``"dynamic"``. No sync."""
        return self._mode

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The names of the layers that get a scale, in model order. No sync."""
        return tuple(self._names)

    @property
    def grad_format(self) -> FloatFormat:
        """The format the per-layer scales target. No sync."""
        return self._fmt

    def is_enabled(self) -> bool:
        """Whether scaling is enabled. No sync."""
        return self._enabled

    def get_scale(self) -> float:
        """The loss scale S (the scale of the loss and of gradients between layers); 1.0 when disabled. No sync
        (S is constant)."""
        return self._loss_scale_value if self._enabled else 1.0

    def _effective(self, scales: list[float]) -> list[float]:
        return [self._loss_scale_value if self._rep[i] == len(self._names) else scales[self._rep[i]]
                for i in range(len(self._names))]

    def layer_scales(self) -> dict[str, float]:
        """The per-layer scales by layer name (after ``update``: the scales of the next iteration; in adaptive
        ``stats="current"`` mode, those of the last backward). Layers tied to the code around them report S.
        Syncs."""
        if not self._enabled:
            return {n: 1.0 for n in self._names}
        current = None if self._scales is None else self._scales_in_use()
        values = self._pending_scales if current is None else [float(v) for v in current.tolist()]
        return dict(zip(self._names, self._effective(values), strict=True))

    def layer_stats(self) -> dict[str, dict[str, float]]:
        """The last iteration's statistics per layer (empty before the first ``update``), in true units:
        ``scale`` (the layer's scale that iteration), ``amax`` and ``rms`` of the gradient entering the
        layer, ``amax_out`` of the gradient it produced for its inputs, and ``gain`` (as used next iteration).
        Syncs."""
        if self._last_stats is None:
            return {}
        keys = list(self._last_stats)
        host = torch.stack([self._last_stats[k].double() for k in keys]).tolist()
        return {n: {k: float(host[j][i]) for j, k in enumerate(keys)} for i, n in enumerate(self._names)}

    def layer_groups(self) -> list[tuple[str, ...]]:
        """Layers that share one scale (tied parameters), as found on the first forward; a group holding
        ``"<outside layers>"`` is held at S. No sync."""
        groups: dict[int, list[str]] = {}
        for i, n in enumerate(self._names):
            groups.setdefault(self._uf.find(i), []).append(n)
        ambient = self._uf.find(len(self._names))
        out = []
        for root, members in groups.items():
            out.append(tuple(members) + ((AMBIENT,) if root == ambient else ()))
        return out

    @property
    def skipped_steps(self) -> int:
        """Iterations whose optimizer steps were skipped, since the start. Syncs."""
        return self._py_accounting().skipped_steps if self._enabled else 0

    @property
    def consecutive_skips(self) -> int:
        """Skipped iterations in a row up to the last ``update``. Syncs."""
        return self._py_accounting().consecutive_skips if self._enabled else 0

    @property
    def last_skip(self) -> LayerSkipEvent | None:
        """The event of the last skipped ``step`` (None if none yet). No sync."""
        return self._last_skip

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last ``step`` was skipped. No sync."""
        return self._last_step_skipped

    def _py_accounting(self) -> PyScalingState:
        return self._pending_accounting if self._acct is None else state_to_py(self._acct)

    def register_skip_hook(self, hook: Callable[[LayerSkipEvent], None]) -> RemovableHandle:
        """Call ``hook(event)`` on every skipped ``step``; ``handle.remove()`` unregisters it. No sync."""
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._skip_hooks)
        self._skip_hooks[handle.id] = hook
        return handle

    def remove(self) -> None:
        """Take the hooks out of the model (the scaler then does nothing to its backward). No sync."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------------------------------------------
    # Forward hooks: wrap inputs and outputs; trace which parameters each layer uses

    def _make_pre_hook(self, layer: int) -> Callable[..., Any]:
        def pre(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not torch.is_grad_enabled():
                return None
            flat: list[torch.Tensor] = []
            _flatten((args, kwargs), flat)
            if not flat:
                return None
            # One boundary output per distinct tensor, so that ``query is key is value`` still holds inside the
            # layer (nn.MultiheadAttention takes its packed self-attention path only then).
            unique = list({id(t): t for t in flat}.values())
            wrapped = self._wrap(layer, False, unique)
            if self._tracing:
                self._in_nodes.extend(w.grad_fn for w in wrapped)
            by_id = {id(t): w for t, w in zip(unique, wrapped, strict=True)}
            new_args, new_kwargs = _rebuild((args, kwargs), [by_id[id(t)] for t in flat])
            return tuple(new_args), dict(new_kwargs)

        return pre

    def _make_post_hook(self, layer: int) -> Callable[..., Any]:
        def post(_m: torch.nn.Module, _args: Any, output: Any) -> Any:
            if not torch.is_grad_enabled():
                return None
            flat: list[torch.Tensor] = []
            _flatten(output, flat)
            if not flat:
                if _has_hidden_tensor(output):
                    raise TypeError(
                        f"LayerwiseScaler: layer {self._names[layer]!r} returned a {type(output).__name__} holding "
                        "tensors; only tensors and (nested) lists, tuples and dicts of them can be rescaled. Pass "
                        "layers= naming its submodules instead."
                    )
                return None
            if self._tracing or layer not in self._traced:
                # (a layer first called after the first iteration is traced then, and the groups refreshed)
                self._trace(layer, flat)
                if not self._tracing:
                    self._fix_groups()
            return _rebuild(output, self._wrap(layer, True, flat))

        return post

    def _wrap(self, layer: int, is_output: bool, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        # One node per tensor: a node with several outputs would run (and call tensor hooks with None) for
        # outputs that receive no gradient, such as an LSTM's unused final state.
        return [_Boundary.apply(self, layer, is_output, t)[0] for t in tensors]  # type: ignore[no-untyped-call]

    def _trace(self, layer: int, outputs: list[torch.Tensor]) -> None:
        """Walk the layer's graph from its outputs to its own input boundaries; record the parameters used."""
        seen: set[int] = set()
        stack: list[Any] = [t.grad_fn for t in outputs if t.grad_fn is not None]
        params: list[torch.Tensor] = []
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            owner = getattr(node, "ls_owner", None)
            if owner is self:
                if node.ls_layer == layer and not node.ls_is_output:
                    continue  # this layer's own input boundary
                raise RuntimeError(
                    f"LayerwiseScaler: layer {self._names[layer]!r} uses a tensor from layer "
                    f"{self._names[node.ls_layer]!r} that did not enter through its forward arguments; its "
                    "gradient would carry the wrong scale. Pass it as an argument, or choose layers= that "
                    "contain both."
                )
            var = getattr(node, "variable", None)
            if isinstance(var, torch.Tensor):
                params.append(var)
                continue
            stack.extend(fn for fn, _ in node.next_functions)
        self._record_params(layer, params)
        self._traced.add(layer)

    def _record_params(self, scope: int, params: Iterable[torch.Tensor]) -> None:
        for p in params:
            prev = self._param_scope.get(id(p))
            self._params[id(p)] = p
            if prev is None:
                self._param_scope[id(p)] = scope
            elif prev != scope:
                self._uf.union(prev, scope)

    def _finish_trace(self, losses: list[torch.Tensor]) -> None:
        """At the first ``scale``: walk the code around the layers (from the loss, and from every tensor
        entering a layer, down to the layers' outputs) and record the parameters it uses; a layer sharing a
        parameter with it is held at S. Then fix the groups."""
        ambient = len(self._names)
        seen: set[int] = set()
        stack: list[Any] = [t.grad_fn for t in losses if t.grad_fn is not None]
        for node in self._in_nodes:
            stack.extend(fn for fn, _ in node.next_functions)
        params: list[torch.Tensor] = []
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if getattr(node, "ls_owner", None) is self:
                continue  # a layer boundary: the layer's own walk covered what lies behind it
            var = getattr(node, "variable", None)
            if isinstance(var, torch.Tensor):
                params.append(var)
                continue
            stack.extend(fn for fn, _ in node.next_functions)
        self._record_params(ambient, params)
        self._in_nodes = []
        self._fix_groups()
        self._tracing = False

    def _fix_groups(self) -> None:
        ambient = len(self._names)
        root_ambient = self._uf.find(ambient)
        self._rep = []
        for i in range(len(self._names)):
            r = self._uf.find(i)
            self._rep.append(ambient if r == root_ambient else r)
        self._rep_tensors = {}

    def _rep_tensor(self, kind: Literal["rep", "rep_min", "rep_self", "ambient"], device: torch.device) -> torch.Tensor:
        """The group index tensors, built once per device after tracing (no per-step host-to-device copy).

        ``rep``: each layer's representative (L: the code around the layers); ``rep_min``: the same, capped at
        L; ``rep_self``: the representative, or the layer itself when it is held at S; ``ambient``: held at S.
        """
        key = f"{kind}@{device}"
        cached = self._rep_tensors.get(key)
        if cached is not None:
            return cached
        L = len(self._names)
        t: torch.Tensor
        if kind == "rep":
            t = _small_tensor(self._rep, torch.int64, device)
        elif kind == "rep_min":
            t = _small_tensor([min(r, L) for r in self._rep], torch.int64, device)
        elif kind == "rep_self":
            t = _small_tensor([r if r < L else i for i, r in enumerate(self._rep)], torch.int64, device)
        else:
            t = _small_tensor([r == L for r in self._rep], torch.bool, device)
        self._rep_tensors[key] = t
        return t

    # ------------------------------------------------------------------------------------------------------
    # Backward: rescale at the boundaries, gather statistics

    def _rescale(self, layer: int, is_output: bool, gs: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
        if not self._armed:
            raise RuntimeError(
                f"LayerwiseScaler: backward reached layer {self._names[layer]!r} without scaler.scale(loss) in "
                "this iteration; start every backward through the model from scaler.scale(loss)."
            )
        r = self._rep[layer]
        L = len(self._names)
        present = [g for g in gs if g is not None and g.numel() > 0]
        if present:
            # The largest magnitude (overflow, culprit, gain) from aminmax, which writes no |g| temporary; entering
            # a layer in adaptive mode also the 2-norm (the rule's RMS). NaN propagates through both.
            amaxes = []
            for g in present:
                mn, mx = torch.aminmax(g)
                amaxes.append(torch.maximum(mx, -mn))
            amax = amaxes[0] if len(amaxes) == 1 else torch.stack(amaxes).amax()
            if is_output:
                n = sum(g.numel() for g in present)
                if self._mode == "adaptive":
                    norms = [torch.linalg.vector_norm(g) for g in present]
                    norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
                else:
                    norm = amax
                self._rec_in.append((layer, amax, norm, n))
                if r != L and self._stats == "current" and not self._set[r]:
                    self._set_current_scale(r, amax, norm, n)
            else:
                self._rec_out.append((layer, amax))
        if r == L:
            return list(gs)
        factor = self._out_factor[r] if is_output else self._in_factor[r]
        return [None if g is None else g * (factor if g.dtype == factor.dtype else factor.to(g.dtype)) for g in gs]

    def _set_current_scale(self, r: int, amax: torch.Tensor, norm: torch.Tensor, n: int) -> None:
        """Adaptive, current statistics: the group's scale for this iteration, from the gradient arriving now.

        :func:`adaptive_log2_scales` with the per-layer constants folded in at the start of the iteration
        (``_k_lo``, ``_k_hi``: thresholds, log2 S and the gain), so that it costs a dozen scalar ops. No sync."""
        assert self._S is not None
        # log2(rms) = log2(norm) - log2(n) / 2 (the rms in units of S; _k_lo holds log2 S)
        k_lo = torch.ceil((self._k_lo[r] + 0.5 * math.log2(n)) - torch.log2(norm.float()))
        k_hi = torch.floor(self._k_hi[r] - torch.log2(amax.float()))
        k = torch.minimum(k_lo, k_hi)
        # log2(0) = -inf and a non-finite amax make k non-finite: keep the previous scale then.
        new = torch.where(torch.isfinite(k), torch.exp2(torch.clamp(k, -_LOG2_LIMIT, _LOG2_LIMIT)), self._prev[r])
        self._new[r] = new
        self._out_factor[r] = new / self._S
        self._in_factor[r] = self._S / new
        self._set[r] = True

    # ------------------------------------------------------------------------------------------------------
    # The per-step protocol

    def _lazy_state(self, device: torch.device) -> None:
        if self._S is not None:
            return
        self._device = device
        self._S = torch.full((), self._loss_scale_value, dtype=torch.float32, device=device)
        self._scales = _small_tensor(self._pending_scales, torch.float32, device)
        self._trackers = _small_tensor(self._pending_trackers, torch.int32, device)
        self._gains = _small_tensor(self._pending_gains, torch.float32, device)
        self._acct = state_from_py(self._pending_accounting, device)

    def _begin_iteration(self) -> None:
        """Conversion factors for this iteration (one small kernel each for the whole vector). No sync."""
        assert self._scales is not None and self._S is not None
        if self._stats is None:
            dist = _compat_dist_initialized()
            if self._mode == "adaptive" and self._stats_setting == "current" and dist:
                raise ValueError(
                    "stats='current' cannot be used under torch.distributed: each rank would pick its own "
                    "scales during backward; use stats='previous' (the default 'auto' does)"
                )
            if self._mode == "dynamic":
                self._stats = "previous"
            elif self._stats_setting == "auto":
                self._stats = "previous" if dist else "current"
            else:
                self._stats = self._stats_setting
        # Powers of two divide exactly; otherwise FP32 division is correctly rounded.
        self._out_factor = list((self._scales / self._S).unbind())
        self._in_factor = list((self._S / self._scales).unbind())
        self._set = [False] * len(self._names)
        if self._stats == "current" and self._names:
            assert self._gains is not None
            log_s = torch.log2(self._S)
            g = torch.where(torch.isfinite(self._gains) & (self._gains > 0), self._gains, torch.ones_like(self._gains))
            lo, hi = _rule_constants(self._fmt, self._underflow_prob, self._headroom)
            self._k_lo = list((lo + log_s - torch.log2(torch.clamp(g, max=1.0))).unbind())
            self._k_hi = list((hi + log_s - torch.log2(torch.clamp(g, min=1.0))).unbind())
            self._prev = list(self._scales.unbind())
            self._new = list(self._prev)
        self._armed = True

    def scale(self, outputs: Any) -> Any:
        """Multiply a loss (a tensor or nested lists/tuples of tensors) by S and arm the layer boundaries for
        this iteration's backward. No sync. Returns ``outputs`` unchanged when disabled."""
        if not self._enabled:
            return outputs
        first: torch.Tensor | None = None
        probe: list[torch.Tensor] = []
        _flatten_any(outputs, probe)
        if not probe:
            raise TypeError(f"scale() takes a Tensor or (nested) lists/tuples of Tensors, got {type(outputs).__name__}")
        first = probe[0]
        self._lazy_state(first.device)
        if self._tracing and any(t.grad_fn is not None for t in probe):
            # (a constant, e.g. a monitor's scale(1), is no loss: the trace ends at the first real one)
            self._finish_trace(probe)
        if not self._armed:
            self._begin_iteration()
        assert self._S is not None
        S = self._S

        def apply(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v * S.to(v.device)
            if isinstance(v, (list, tuple)):
                return type(v)(apply(x) for x in v)
            raise TypeError(f"scale() takes a Tensor or (nested) lists/tuples of Tensors, got {type(v).__name__}")

        return apply(outputs)

    def _require_state(self, what: str) -> None:
        if self._S is None:
            raise RuntimeError(f"LayerwiseScaler.{what}() was called before scale(): scale the loss first.")

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide each parameter's gradient by the scale of the layer that used it (S outside the layers) and
        record whether any gradient, or any activation gradient at a layer boundary, is inf/NaN. No sync.

        Per (layer group, device, dtype) one fused check-and-unscale (:mod:`lossscale._compat`); reciprocals
        are taken in FP64 and rounded to FP32, exact for powers of two. Under torch.distributed the flags are
        all-reduced (MAX). Raises RuntimeError when called twice for one optimizer before ``update``, after
        ``step``, or before ``scale``; TypeError/ValueError for non-tensor parameters or FP16 gradients.
        """
        if not self._enabled:
            return
        self._require_state("unscale_")
        rec = self._records.get(self._owners.key(self._records, optimizer))
        if rec is not None and rec[0] == "unscaled":
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if rec is not None and rec[0] == "stepped":
            raise RuntimeError("unscale_() is being called after step().")
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        assert self._scales is not None and self._S is not None
        L = len(self._names)
        buckets: dict[tuple[int, torch.device, torch.dtype], list[torch.Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"optimizer parameters must be tensors, got {type(p).__name__}")
                g = p.grad
                if g is None:
                    continue
                if g.dtype == torch.float16:
                    raise ValueError(
                        "LayerwiseScaler cannot unscale FP16 gradients in place (they would underflow again): "
                        "keep parameters, hence gradients, in FP32."
                    )
                if g.is_sparse:
                    g = _compat.sparse_values(g)
                if not g.is_floating_point():
                    raise TypeError(f"gradients must be floating point, got {g.dtype}")
                scope = self._param_scope.get(id(p), L)
                r = self._rep[scope] if scope < L else L
                buckets.setdefault((r, g.device, g.dtype), []).append(g)
        dev = self._S.device
        # Per group (L + 1 slots, the last for the code around the layers): was a weight gradient non-finite.
        weight_bad = torch.zeros(L + 1, dtype=torch.float32, device=dev)
        with torch.no_grad():
            inv_all = (1.0 / self._scales_in_use().double()).float()
            inv_S = (1.0 / self._S.double()).float()
            for (r, device, _dtype), grads in buckets.items():
                inv = inv_S if r == L else inv_all[r]
                found = torch.zeros((), dtype=torch.float32, device=device)
                _compat.non_finite_check_and_unscale_(grads, found, inv.to(device))
                weight_bad[r] = torch.maximum(weight_bad[r], found.to(dev))
        # Activation gradients at the boundaries count too (a frozen layer's overflow has no weight gradient).
        flags = torch.cat([weight_bad, self._boundary_bad().reshape(1)])
        if _compat_dist_initialized():
            _all_reduce(flags, torch.distributed.ReduceOp.MAX, self._process_group)
        self._records[self._owners.key(self._records, optimizer)] = ("unscaled", flags.amax(), flags[: L + 1])

    def _scales_in_use(self) -> torch.Tensor:
        """The per-layer scales of this iteration's backward (in ``stats="current"`` mode, as set during it)."""
        assert self._scales is not None
        if self._stats == "current" and self._armed and self._new:
            return torch.stack(self._new)
        return self._scales

    def _boundary_bad(self) -> torch.Tensor:
        assert self._S is not None
        vals = [rec[1] for rec in self._rec_in] + [a for _, a in self._rec_out]
        if not vals:
            return torch.zeros((), dtype=torch.float32, device=self._S.device)
        return (~torch.isfinite(torch.stack(vals))).any().float()

    def _per_layer_stats(self) -> dict[str, torch.Tensor]:
        """This iteration's statistics per layer: amax/sum/nnz entering (at S), amax leaving (at s_l). No sync."""
        assert self._S is not None
        L, dev = len(self._names), self._S.device
        amax_in = torch.zeros(L, device=dev)
        sum_in = torch.zeros(L, device=dev)
        count_in = torch.zeros(L, device=dev)
        amax_out = torch.zeros(L, device=dev)
        if self._rec_in:
            idx = _small_tensor([rec[0] for rec in self._rec_in], torch.int64, dev)
            amax_in = amax_in.scatter_reduce(0, idx, torch.stack([rec[1] for rec in self._rec_in]).float(), "amax",
                                             include_self=False)
            sum_in = sum_in.index_add(0, idx, torch.stack([rec[2] for rec in self._rec_in]).float().square())
            counts = _small_tensor([float(rec[3]) for rec in self._rec_in], torch.float32, dev)
            count_in = count_in.index_add(0, idx, counts)
        if self._rec_out:
            idx = _small_tensor([i for i, _ in self._rec_out], torch.int64, dev)
            amax_out = amax_out.scatter_reduce(0, idx, torch.stack([a for _, a in self._rec_out]).float(), "amax",
                                             include_self=False)
        stats = {"amax_in": amax_in, "sum_in": sum_in, "count_in": count_in, "amax_out": amax_out}
        if _compat_dist_initialized():
            mx = torch.stack([amax_in, amax_out])
            sm = torch.stack([sum_in, count_in])
            mx = torch.nan_to_num(mx, nan=math.inf)  # MAX over ranks must not drop a NaN
            _all_reduce(mx, torch.distributed.ReduceOp.MAX, self._process_group)
            _all_reduce(sm, torch.distributed.ReduceOp.SUM, self._process_group)
            stats = {"amax_in": mx[0], "amax_out": mx[1], "sum_in": sm[0], "count_in": sm[1]}
        return stats

    def _culprits(self, stats: Mapping[str, torch.Tensor], weight_bad: torch.Tensor) -> torch.Tensor:
        """Per layer (plus the last slot for the code around the layers): where the overflow originated."""
        L = len(self._names)
        bad_in = ~torch.isfinite(stats["amax_in"])
        bad_out = ~torch.isfinite(stats["amax_out"])
        wbad = weight_bad[:L] > 0
        # Weight flags are per group: a group's flag falls on its members.
        if L:
            rep_idx = self._rep_tensor("rep_min", weight_bad.device)
            wbad = weight_bad.index_select(0, rep_idx) > 0
        layer = (bad_out | wbad) & ~bad_in
        any_bad = bad_in.any() | bad_out.any() | (weight_bad > 0).any()
        ambient = any_bad & ~layer.any()
        return torch.cat([layer, ambient.reshape(1)])

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (if not yet done) and call ``optimizer.step(*args, **kwargs)`` unless a gradient is inf/NaN.

        Syncs once to decide; a skip syncs again to build a :class:`LayerSkipEvent` naming the culprit layers,
        logs it at INFO level to the ``lossscale`` logger and calls the skip hooks. Returns what
        ``optimizer.step`` returns, or None when skipped. Raises :class:`~lossscale.SkipBudgetExceeded` past
        ``max_consecutive_skips``; RuntimeError for a ``closure``, a second ``step`` before ``update``, or a
        call before ``scale``.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not supported while LayerwiseScaler is enabled.")
        self._require_state("step")
        rec = self._records.get(self._owners.key(self._records, optimizer))
        if rec is not None and rec[0] == "stepped":
            raise RuntimeError("step() has already been called since the last update().")
        if rec is None:
            self.unscale_(optimizer)
            rec = self._records[self._owners.key(self._records, optimizer)]
        _, found, weight_bad = rec
        assert found is not None and weight_bad is not None
        self._records[self._owners.key(self._records, optimizer)] = ("stepped", found, weight_bad)
        if found.item() == 0.0:  # the one sync: decide whether to step
            self._last_step_skipped = False
            return optimizer.step(*args, **kwargs)
        self._last_step_skipped = True
        self._on_skip(weight_bad)
        return None

    def _on_skip(self, weight_bad: torch.Tensor) -> None:
        before = self._py_accounting()
        culprit = self._culprits(self._per_layer_stats(), weight_bad).tolist()  # the skip path's extra sync
        names = [n for n, c in zip([*self._names, AMBIENT], culprit, strict=True) if c]
        event = LayerSkipEvent(
            step=before.steps,
            scale=self._loss_scale_value,
            consecutive_skips=before.consecutive_skips + 1,
            skipped_steps=before.skipped_steps + 1,
            culprits=tuple(names),
            layer_scales=self.layer_scales(),
        )
        self._last_skip = event
        logger.info(
            "lossscale: skipped optimizer step at iteration %d: non-finite gradients originating in %s "
            "(%d in a row, %d in total)",
            event.step,
            ", ".join(event.culprits) or "?",
            event.consecutive_skips,
            event.skipped_steps,
        )
        for hook in list(self._skip_hooks.values()):
            hook(event)
        budget = self._accounting.max_consecutive_skips
        if budget is not None and event.consecutive_skips > budget:
            raise SkipBudgetExceeded(
                f"LayerwiseScaler: {event.consecutive_skips} consecutive skipped steps exceed "
                f"max_consecutive_skips={budget} at iteration {event.step}; the overflow originates in "
                f"{', '.join(event.culprits)}."
            )

    def update(self) -> None:
        """Per-layer scales for the next iteration and the skip counters. No sync.

        Dynamic mode: :func:`~lossscale.scaling.update_scale` on the vector of layer scales, a layer's overflow
        flag being "the overflow originated here"; layers that received a non-finite gradient from elsewhere
        keep their state. Adaptive mode: with ``stats="previous"`` the scales come from this iteration's
        statistics (all-reduced under torch.distributed); with ``"current"`` they were set during backward.
        Both update each layer's measured gain. Raises RuntimeError before ``scale`` or when no optimizer was
        unscaled or stepped since the last ``update``.
        """
        if not self._enabled:
            return
        self._require_state("update")
        records = [*self._records.values(), *self._owners.retired]
        flags = [rec[1] for rec in records if rec[1] is not None]
        if not flags:
            raise RuntimeError(
                "update() found no inf checks: call scaler.step(optimizer) (or unscale_) for at least one "
                "optimizer since the last update()."
            )
        assert self._scales is not None and self._S is not None and self._acct is not None
        assert self._gains is not None and self._trackers is not None
        found = flags[0] if len(flags) == 1 else torch.stack(flags).amax()
        weight_bad = torch.stack([rec[2] for rec in records if rec[2] is not None]).amax(0)
        self._acct = update_scale(self._acct, found, self._accounting)
        stats = self._per_layer_stats()
        L = len(self._names)
        S = self._S
        if self._stats == "current" and L and self._new:
            self._scales = torch.stack(self._new)  # the scales this backward used (set as gradients arrived)
        # Gain of each layer, in true units: (amax leaving / s_l) / (amax entering / S).
        eff = self._effective_tensor()
        gain = (stats["amax_out"] / eff) / (stats["amax_in"] / S)
        ok = torch.isfinite(gain) & (gain > 0)
        self._gains = torch.where(ok, gain, self._gains)
        self._last_stats = {
            "scale": eff,
            "amax": stats["amax_in"] / S,
            "rms": torch.sqrt(stats["sum_in"] / torch.clamp(stats["count_in"], min=1.0)) / S,
            "amax_out": stats["amax_out"] / eff,
            "gain": self._gains,
        }
        if self._mode == "dynamic" and L:
            culprit = self._culprits(stats, weight_bad)[:L]
            hold = ~torch.isfinite(stats["amax_in"]) & found.bool()
            group_culprit = torch.zeros(L + 1, dtype=torch.float32, device=S.device)
            rep_idx = self._rep_tensor("rep", S.device)
            group_culprit = group_culprit.scatter_reduce(0, rep_idx, culprit.float(), "amax")[:L]
            state = ScalingState(
                scale=self._scales,
                growth_tracker=self._trackers,
                hysteresis_tracker=torch.zeros_like(self._trackers),
                consecutive_skips=torch.zeros_like(self._trackers),
                skipped_steps=torch.zeros(L, dtype=torch.int64, device=S.device),
                steps=torch.zeros(L, dtype=torch.int64, device=S.device),
            )
            new = update_scale(state, group_culprit, self._rule, impl="fallback")
            self._scales = torch.where(hold, self._scales, new.scale)
            self._trackers = torch.where(hold, self._trackers, new.growth_tracker)
        elif self._stats == "previous" and L:
            amax = stats["amax_in"] / S
            mean = torch.sqrt(stats["sum_in"] / torch.clamp(stats["count_in"], min=1.0)) / S
            k, valid = adaptive_log2_scales(
                amax, mean, self._gains, self._fmt, underflow_prob=self._underflow_prob, headroom=self._headroom
            )
            self._scales = torch.where(valid, torch.exp2(k), self._scales)
        if L:
            # Tied layers share their representative's scale.
            rep = self._rep_tensor("rep_self", S.device)
            self._scales = self._scales.index_select(0, rep)
        self._records = {}
        self._owners.clear()
        self._rec_in = []
        self._rec_out = []
        self._new = []
        self._armed = False

    def _effective_tensor(self) -> torch.Tensor:
        assert self._scales is not None and self._S is not None
        ambient = self._rep_tensor("ambient", self._S.device)
        return torch.where(ambient, self._S, self._scales)

    # ------------------------------------------------------------------------------------------------------
    # Checkpointing

    def _host_layer_state(self) -> tuple[list[float], list[int], list[float]]:
        if self._scales is None or self._trackers is None or self._gains is None:
            return list(self._pending_scales), list(self._pending_trackers), list(self._pending_gains)
        host = torch.stack([self._scales.double(), self._trackers.double(), self._gains.double()]).tolist()
        return [float(v) for v in host[0]], [int(v) for v in host[1]], [float(v) for v in host[2]]

    def state_dict(self) -> dict[str, Any]:
        """The complete state (plain Python, safe for ``torch.load(weights_only=True)``): format, version, the
        configuration, the skip counters and, per layer, scale, growth tracker and gain. Empty when disabled.
        Call it after ``update``. Syncs."""
        if not self._enabled:
            return {}
        scales, trackers, gains = self._host_layer_state()
        return {
            "format": _STATE_DICT_FORMAT,
            "version": STATE_DICT_VERSION,
            "config": self._config_dict(),
            "state": dataclasses.asdict(self._py_accounting()),
            "layers": {
                n: {"scale": s, "growth_tracker": t, "gain": g}
                for n, s, t, g in zip(self._names, scales, trackers, gains, strict=True)
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state from :meth:`state_dict`. The configuration must match this scaler's (mode, format, loss
        scale, rule) and the layer names must be the same; everything is validated first and, on a bad dict,
        ValueError/TypeError names the problem and the scaler is left unchanged. No sync."""
        if not self._enabled:
            return
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        expected = {"format", "version", "config", "state", "layers"}
        if set(state_dict) != expected:
            raise ValueError(f"LayerwiseScaler state dict must have keys {sorted(expected)}, got {sorted(state_dict)}")
        if state_dict["format"] != _STATE_DICT_FORMAT:
            raise ValueError(f"state dict 'format' must be {_STATE_DICT_FORMAT!r}, got {state_dict['format']!r}")
        if state_dict["version"] != STATE_DICT_VERSION:
            raise ValueError(f"unsupported LayerwiseScaler state dict version {state_dict['version']!r}")
        mine = self._config_dict()
        if dict(state_dict["config"]) != mine:
            diff = sorted(k for k in set(mine) | set(state_dict["config"])
                          if mine.get(k) != state_dict["config"].get(k))
            raise ValueError(f"state dict config differs from this scaler's in {diff}")
        raw = state_dict["state"]
        if not isinstance(raw, Mapping):
            raise TypeError(f"state dict 'state' must be a dict, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(PyScalingState)}
        if set(raw) != names:
            raise ValueError(f"state dict 'state' must have keys {sorted(names)}, got {sorted(raw)}")
        acct = PyScalingState(**raw)
        layers = state_dict["layers"]
        if not isinstance(layers, Mapping) or list(layers) != self._names:
            got = list(layers) if isinstance(layers, Mapping) else type(layers).__name__
            raise ValueError(f"state dict 'layers' must name the layers {self._names}, got {got}")
        scales, trackers, gains = [], [], []
        for n, entry in layers.items():
            if not isinstance(entry, Mapping) or set(entry) != {"scale", "growth_tracker", "gain"}:
                raise ValueError(f"state dict layer {n!r} must have keys ['gain', 'growth_tracker', 'scale']")
            _check_scale_value(f"state dict layer {n!r} scale", entry["scale"])
            _check_int(f"state dict layer {n!r} growth_tracker", entry["growth_tracker"], 0)
            if entry["growth_tracker"] >= self._rule.growth_interval:
                raise ValueError(f"state dict layer {n!r} growth_tracker must be < growth_interval")
            _check_scale_value(f"state dict layer {n!r} gain", entry["gain"])
            scales.append(_fp32(float(entry["scale"])))
            trackers.append(int(entry["growth_tracker"]))
            gains.append(_fp32(float(entry["gain"])))
        self._pending_scales, self._pending_trackers, self._pending_gains = scales, trackers, gains
        self._pending_accounting = acct
        if self._S is not None:
            dev = self._S.device
            self._scales = torch.tensor(scales, dtype=torch.float32, device=dev)
            self._trackers = torch.tensor(trackers, dtype=torch.int32, device=dev)
            self._gains = torch.tensor(gains, dtype=torch.float32, device=dev)
            self._acct = state_from_py(acct, dev)

    def _config_dict(self) -> dict[str, Any]:
        return {
            "mode": self._mode,
            "grad_format": self._fmt.name,
            "loss_scale": self._loss_scale_value,
            "underflow_prob": self._underflow_prob,
            "headroom": self._headroom,
            **{f.name: getattr(self._rule, f.name) for f in dataclasses.fields(DynamicScaling)},
            "max_consecutive_skips": self._accounting.max_consecutive_skips,
        }

    def __repr__(self) -> str:
        return (
            f"LayerwiseScaler(mode={self._mode!r}, layers={len(self._names)}, grad_format={self._fmt.name!r}, "
            f"loss_scale={self._loss_scale_value:g}, enabled={self._enabled})"
        )


def _flatten_any(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _flatten_any(v, out)


def _all_reduce(t: torch.Tensor, op: Any, group: Any) -> None:
    """In place over ``group`` (no host sync on NCCL); the one place the scaler communicates."""
    torch.distributed.all_reduce(t, op=op, group=group)


def _compat_dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()

