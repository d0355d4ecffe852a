"""LossScaler: a ``torch.amp.GradScaler`` with hysteresis, clamps, a skip budget, a scale floor, skip forensics
and distributed agreement.

The stateful shell around :mod:`lossscale.scaling`. It *is* a ``torch.amp.GradScaler`` (a subclass), and
its state lives in GradScaler's own attributes (``_scale``, ``_growth_tracker``, ``_per_optimizer_states``,
...) with GradScaler's meaning, plus four counters of ours beside them; the scale rule is
:func:`~lossscale.scaling.update_scale`, called once per iteration.

Host syncs: ``scale``, ``unscale_`` and ``update`` never sync; ``step`` syncs once to decide (as torch does);
a skipped step syncs twice more, on the skip path only, to read the counters and to count the non-finite
elements per parameter (forensics). For optimizers that take GradScaler's ``_step_supports_amp_scaling``
protocol, where GradScaler's ``step`` does not sync, ``step`` adds one sync after the optimizer's step to
learn whether it skipped. ``get_scale``, ``skipped_steps``, ``consecutive_skips`` and ``state_dict`` sync.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import warnings
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, Literal, cast, overload

import torch
from torch.utils.hooks import RemovableHandle

from . import _compat
from ._compat import OptState
from .scaling import (
    DynamicScaling,
    NoScaling,
    PyScalingState,
    ScalingConfig,
    ScalingState,
    StaticScaling,
    _fp32,
    _fp32_scale,
    config_from_dict,
    config_kind,
    config_to_dict,
    init_state_py,
    state_from_py,
    state_to_py,
    update_scale,
)

__all__ = [
    "STATE_DICT_VERSION",
    "LossScaler",
    "NonFiniteGrad",
    "ScalerTypeError",
    "ScalerUsageError",
    "ScalerValueError",
    "SkipBudgetExceeded",
    "SkipEvent",
    "SkipWarning",
    "StateDictKeyError",
]

logger = logging.getLogger("lossscale")

STATE_DICT_VERSION = 2
_STATE_DICT_FORMAT = "lossscale.LossScaler"
_TORCH_KEYS = frozenset({"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"})
_OWN_KEYS = frozenset({"format", "version", "config", "state"})
# Counters only: used when update(new_scale=...) overrides the scale but skips must still be counted.
_ACCOUNTING_ONLY = StaticScaling()
# The tensors that hold the state: GradScaler's two, then ours (the fields of ScalingState, in order).
_STATE_ATTRS = (
    ("scale", "_scale"),
    ("growth_tracker", "_growth_tracker"),
    ("hysteresis_tracker", "_hysteresis_tracker"),
    ("consecutive_skips", "_consecutive_skips"),
    ("skipped_steps", "_skipped_steps"),
    ("steps", "_steps"),
)
# GradScaler's own warning for the deprecated ``grad_scaler=`` keyword protocol, word for word (code that
# filters it by message keeps working).
_GRAD_SCALER_KWARG_WARNING = (
    "GradScaler is going to stop passing itself as a keyword argument to the passed "
    "optimizer. In the near future GradScaler registers `grad_scale: Tensor` and "
    "`found_inf: Tensor` to the passed optimizer and let the optimizer use them directly."
)


# ----------------------------------------------------------------------------------------------------------
# Exceptions: where torch.amp.GradScaler raises one type and we raise another, ours derive from both.


class ScalerUsageError(RuntimeError, AssertionError):
    """A call out of order (before ``scale``, no inf checks, pickled mid-iteration, ...).

    GradScaler raises ``AssertionError`` or ``RuntimeError`` in these places; this is both.
    """


class ScalerValueError(ValueError, AssertionError):
    """A value GradScaler refuses with ``AssertionError`` (``growth_factor <= 1``, ``backoff_factor >= 1`` at
    construction); this is also a ``ValueError``."""


class ScalerTypeError(TypeError, ValueError, AssertionError):
    """An argument of the wrong kind where GradScaler raises ``ValueError`` (``scale`` of a non-tensor) or
    ``AssertionError`` (a ``new_scale`` tensor that is not a 1-element float, a non-tensor parameter)."""


class StateDictKeyError(ValueError, KeyError):
    """A state dict with missing or unknown keys (GradScaler raises ``KeyError`` for a missing one)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class SkipBudgetExceeded(RuntimeError):
    """Raised by ``LossScaler.step`` when more than ``max_consecutive_skips`` steps in a row were skipped."""


class SkipWarning(RuntimeWarning):
    """Warned by ``LossScaler.step`` after ``warn_after_skips`` consecutive skipped iterations."""


# ----------------------------------------------------------------------------------------------------------
# Skip events


SkipReason = Literal["nonfinite_grads", "scale_floor", "unscale_overflow", "external"]


@dataclasses.dataclass(frozen=True)
class NonFiniteGrad:
    """One parameter whose gradient held inf or NaN on a skipped step.

    Attributes:
        name: the parameter's name in the model given to :meth:`LossScaler.watch`, else its position in the
            optimizer, ``"param_groups[g].params[i]"``.
        shape: the gradient's shape.
        numel: the number of elements checked (the stored values of a sparse gradient, the local shard of a
            DTensor).
        posinf / neginf / nan: how many of them were +inf, -inf, NaN.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    posinf: int
    neginf: int
    nan: int

    @property
    def inf(self) -> int:
        """Elements that were +inf or -inf."""
        return self.posinf + self.neginf

    @property
    def kind(self) -> Literal["inf", "nan", "inf+nan"]:
        """``"inf"``, ``"nan"`` or ``"inf+nan"``."""
        if self.inf and self.nan:
            return "inf+nan"
        return "inf" if self.inf else "nan"

    def __str__(self) -> str:
        return f"{self.name} ({self.inf} inf, {self.nan} NaN of {self.numel} elements)"


@dataclasses.dataclass(frozen=True)
class SkipEvent:
    """A skipped optimizer step: passed to skip hooks, kept as ``scaler.last_skip``, logged to ``lossscale``.

    Attributes:
        step: index of the iteration (the number of ``update()`` calls before it).
        scale: the loss scale the gradients were computed with.
        consecutive_skips: skipped iterations in a row, this one included.
        skipped_steps: skipped iterations since the start, this one included.
        reason: why the step was skipped: ``"nonfinite_grads"`` (a gradient held inf/NaN), ``"scale_floor"``
            (1/scale is not a finite FP32 number: unscaling would have turned every gradient into inf/NaN),
            ``"unscale_overflow"`` (a scale below 1: unscaling made a finite gradient overflow), or
            ``"external"`` (the flag came from elsewhere: another rank, or code that set it).
        culprits: the parameters whose gradients held inf/NaN on this rank, in optimizer order.
    """

    step: int
    scale: float
    consecutive_skips: int
    skipped_steps: int
    reason: SkipReason = "nonfinite_grads"
    culprits: tuple[NonFiniteGrad, ...] = ()

    def describe(self) -> str:
        """One line: the reason and the first culprit."""
        if self.reason == "scale_floor":
            why = f"the loss scale {self.scale:g} is below the floor 2^-127 (1/scale overflows FP32)"
        elif self.reason == "unscale_overflow":
            why = "unscaling by 1/scale > 1 made a finite gradient overflow"
        elif self.reason == "external":
            why = "non-finite gradients were reported by another rank or by a caller"
        else:
            why = "non-finite gradients"
        if self.culprits:
            more = f" and {len(self.culprits) - 1} more" if len(self.culprits) > 1 else ""
            why += f"; first in {self.culprits[0]}{more}"
        return why


class _Owners:
    """Which optimizer each ``id(optimizer)``-keyed record of the current iteration belongs to, held weakly.

    GradScaler keys its per-optimizer records by ``id(optimizer)`` alone: an optimizer freed after ``step``
    and before ``update``, whose id Python then gives to a new optimizer, would hand the new one its record
    (its stage, its found-inf flags). Here the owner of each record is remembered through a weak reference
    (nothing is kept alive); a record under an id whose owner is gone is set aside for the new optimizer
    (``retired``: its flags still count at ``update``, as they would in GradScaler) and the new one starts
    fresh. Cleared at every ``update``.
    """

    def __init__(self) -> None:
        self._refs: dict[int, Callable[[], object]] = {}
        self.retired: list[Any] = []

    def key(self, records: MutableMapping[int, Any], optimizer: object) -> int:
        """``id(optimizer)``, after setting aside a record under it that belongs to another (freed) optimizer."""
        k = id(optimizer)
        ref = self._refs.get(k)
        if ref is None or ref() is not optimizer:
            if ref is not None and k in records:
                self.retired.append(records.pop(k))
            try:
                self._refs[k] = weakref.ref(optimizer)
            except TypeError:  # no weakref support: held until update(), which also keeps its id from reuse
                self._refs[k] = lambda: optimizer
        return k

    def clear(self) -> None:
        self._refs.clear()
        self.retired.clear()


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_max(t: torch.Tensor, group: Any) -> None:
    """found_inf = MAX over ranks, so every rank skips together (pytorch#136009). No host sync on NCCL."""
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)


def _check_device(device: object) -> str | None:
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, torch.device or None, got {type(device).__name__}")
    try:
        return torch.device(device).type
    except RuntimeError:
        raise ValueError(
            f"device must be a torch device type such as 'cpu', 'cuda', 'mps', 'xpu' or 'meta' (or None: the "
            f"loss's device), got {device!r}"
        ) from None


def _sum_found(found_infs: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """Sum the found-inf flags on ``device`` (as GradScaler: any positive value means a skip). No sync."""
    total: torch.Tensor | None = None
    for f in found_infs:
        if f.device != device:
            f = f.to(device=device, non_blocking=True)
        total = f if total is None else total + f
    return total


class LossScaler(torch.amp.GradScaler):
    """Loss scaling that is a ``torch.amp.GradScaler`` and, by default, behaves exactly like one.

    Migrating is one line: ``scaler = torch.amp.GradScaler("cuda")`` becomes ``scaler = LossScaler()``.
    ``isinstance(scaler, torch.amp.GradScaler)`` holds, GradScaler's private attributes and methods exist with
    their meaning, and :meth:`state_dict` loads into a GradScaler. The differences, each deliberate, are
    listed in docs/scaler.md.

    Algorithm per iteration::

        scaler.scale(loss).backward()    # loss * S                        (no sync)
        scaler.unscale_(opt)             # g *= 1/S, found = any non-finite (no sync; optional; then clip)
        scaler.step(opt)                 # opt.step() unless found          (one sync to decide)
        scaler.update()                  # S, counters <- update_scale(...) (no sync)

    Never inf in the weights: when ``1/S`` is not a finite FP32 number (``S`` below about 2^-128, set by hand
    or loaded) the step is skipped and counted, and the dynamic rule never takes ``S`` below 2^-127. When
    ``S < 1``, ``step`` also checks the unscaled gradients (an extra pass, only then), since ``1/S > 1`` may
    make a finite gradient overflow.

    Under torch.distributed, ``found`` is all-reduced (MAX) over ``process_group`` so all ranks skip together;
    DTensor (FSDP2) gradients already get that reduction inside torch's fused check, and no second
    collective is issued for them.

    Args:
        device: a device type ("cpu", "cuda", ...) or None (default): the state is created on the device of
            the first tensor passed to :meth:`scale`. ``"cuda"`` without CUDA disables the scaler with a
            warning, as torch does; an unknown device raises ValueError.
        init_scale: initial scale, default 2^16.
        growth_factor: default 2.0; must be > 1 here (as GradScaler); ``set_growth_factor(1.0)`` freezes growth.
        backoff_factor: default 0.5; must lie in (0, 1) here; ``set_backoff_factor(1.0)`` freezes backoff.
        growth_interval: default 2000; int in [1, 2^63 - 1].
        enabled: False makes every method a no-op (``step`` just calls ``optimizer.step()``).
        dynamic: False keeps ``init_scale`` fixed (static scaling; non-finite steps are still skipped).
        hysteresis: overflows tolerated before a backoff (default 1: every overflow backs off, as torch).
        consecutive_hysteresis: refill the hysteresis counter on every finite step (DeepSpeed's option).
        min_scale / max_scale: clamps on the scale (default None).
        max_consecutive_skips: raise :class:`SkipBudgetExceeded` from ``step`` on the skip that makes more
            than this many skipped iterations in a row (default None: never).
        process_group: group for the found-inf all-reduce (default: the world group).
        on_skip: a callable receiving a :class:`SkipEvent` per skipped ``step`` (see also
            :meth:`register_skip_hook`).
        warn_after_skips: warn (:class:`SkipWarning`) when this many iterations in a row were skipped,
            naming the scale, the iteration and the first parameter with a non-finite gradient (default 10;
            None disables).

    Example:
        >>> import torch
        >>> from lossscale import LossScaler
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = LossScaler(init_scale=1024.0)
        >>> isinstance(scaler, torch.amp.GradScaler)
        True
        >>> scaler.watch(model)                       # optional: name parameters in skip events
        >>> loss = model(torch.ones(2, 4)).sum()
        >>> scaler.scale(loss).backward()
        >>> scaler.unscale_(opt)                      # gradients are now true gradients
        >>> _ = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        >>> scaler.step(opt)
        >>> scaler.update()
        >>> scaler.get_scale(), scaler.skipped_steps, scaler.last_step_skipped
        (1024.0, 0, False)

    Warning:
        As with GradScaler: call ``unscale_`` at most once per optimizer between updates, only after all
        gradients are accumulated; call ``update`` once per iteration after every ``step``.
    """

    # Ours, beside GradScaler's ``_scale`` and ``_growth_tracker`` (0-d tensors on the scale's device).
    _hysteresis_tracker: torch.Tensor | None
    _consecutive_skips: torch.Tensor | None
    _skipped_steps: torch.Tensor | None
    _steps: torch.Tensor | None

    def __init__(
        self,
        device: str | torch.device | None = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        dynamic: bool = True,
        hysteresis: int = 1,
        consecutive_hysteresis: bool = False,
        min_scale: float | None = None,
        max_scale: float | None = None,
        max_consecutive_skips: int | None = None,
        process_group: Any = None,
        on_skip: Callable[[SkipEvent], None] | None = None,
        warn_after_skips: int | None = 10,
    ) -> None:
        # Deliberately no super().__init__(): GradScaler's attributes are set (with the same meaning) in _init.
        for name, flag in (("enabled", enabled), ("dynamic", dynamic)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        # GradScaler refuses these two at construction with AssertionError; ours is also a ValueError.
        if isinstance(growth_factor, (int, float)) and not isinstance(growth_factor, bool) and growth_factor <= 1.0:
            raise ScalerValueError(
                f"growth_factor must be > 1.0, got {growth_factor!r} (as torch.amp.GradScaler; to freeze growth, "
                "call set_growth_factor(1.0) after construction)"
            )
        if isinstance(backoff_factor, (int, float)) and not isinstance(backoff_factor, bool) and backoff_factor >= 1.0:
            raise ScalerValueError(
                f"backoff_factor must be < 1.0, got {backoff_factor!r} (as torch.amp.GradScaler; to freeze "
                "backoff, call set_backoff_factor(1.0) after construction)"
            )
        config: ScalingConfig
        if dynamic:
            config = DynamicScaling(
                init_scale=init_scale,
                growth_factor=growth_factor,
                backoff_factor=backoff_factor,
                growth_interval=growth_interval,
                hysteresis=hysteresis,
                consecutive_hysteresis=consecutive_hysteresis,
                min_scale=min_scale,
                max_scale=max_scale,
                max_consecutive_skips=max_consecutive_skips,
            )
        else:
            # Validate the dynamic-only arguments anyway, so a typo is not silently ignored.
            DynamicScaling(
                growth_factor=growth_factor,
                backoff_factor=backoff_factor,
                growth_interval=growth_interval,
                hysteresis=hysteresis,
                consecutive_hysteresis=consecutive_hysteresis,
            )
            if min_scale is not None or max_scale is not None:
                raise ValueError("min_scale/max_scale apply to dynamic scaling only; got dynamic=False")
            config = StaticScaling(init_scale=init_scale, max_consecutive_skips=max_consecutive_skips)
        self._init(
            config,
            device=device,
            enabled=enabled,
            process_group=process_group,
            on_skip=on_skip,
            warn_after_skips=warn_after_skips,
        )

    @classmethod
    def from_config(
        cls,
        config: ScalingConfig,
        *,
        device: str | torch.device | None = None,
        process_group: Any = None,
        on_skip: Callable[[SkipEvent], None] | None = None,
        warn_after_skips: int | None = 10,
    ) -> LossScaler:
        """Build a scaler from a :class:`DynamicScaling`, :class:`StaticScaling` or :class:`NoScaling`.

        ``NoScaling()`` gives a disabled scaler (every method a no-op). No sync.
        """
        config_kind(config)  # TypeError for anything else
        self = cls.__new__(cls)
        enabled = not isinstance(config, NoScaling)
        self._init(
            config,
            device=device,
            enabled=enabled,
            process_group=process_group,
            on_skip=on_skip,
            warn_after_skips=warn_after_skips,
        )
        return self

    def _init(
        self,
        config: ScalingConfig,
        *,
        device: str | torch.device | None,
        enabled: bool,
        process_group: Any,
        on_skip: Callable[[SkipEvent], None] | None,
        warn_after_skips: int | None,
    ) -> None:
        device_type = _check_device(device)
        if on_skip is not None and not callable(on_skip):
            raise TypeError(f"on_skip must be callable or None, got {type(on_skip).__name__}")
        if warn_after_skips is not None and (
            isinstance(warn_after_skips, bool) or not isinstance(warn_after_skips, int) or warn_after_skips < 1
        ):
            raise ValueError(f"warn_after_skips must be an int >= 1 or None, got {warn_after_skips!r}")
        if enabled and device_type == "cuda" and not torch.cuda.is_available():
            warnings.warn("LossScaler is enabled, but CUDA is not available.  Disabling.", stacklevel=3)
            enabled = False
        # GradScaler's attributes, with its meaning. _device is the device type given, or None until the
        # first scale() decides it.
        self._device = device_type  # type: ignore[assignment]
        self._enabled = enabled
        self._scale = None
        self._growth_tracker = None
        self._per_optimizer_states = defaultdict(_compat.refresh_per_optimizer_state)
        # Ours.
        self._owners = _Owners()  # who owns each record of _per_optimizer_states, held weakly
        self._config: ScalingConfig = config
        self._process_group = process_group
        # Host-side state before the first scale() (GradScaler's _init_scale and _init_growth_tracker are views
        # of it).
        self._pending: PyScalingState = init_state_py(config)
        self._hysteresis_tracker = None
        self._consecutive_skips = None
        self._skipped_steps = None
        self._steps = None
        # An OrderedDict, as torch's hooks: RemovableHandle keeps a weak reference to it.
        self._skip_hooks: OrderedDict[int, Callable[[SkipEvent], None]] = OrderedDict()
        self._warn_after_skips = warn_after_skips
        self._watched: weakref.ref[torch.nn.Module] | None = None
        self._last_skip: SkipEvent | None = None
        self._last_step_skipped: bool | None = None
        self._warned_at: int = -1
        if on_skip is not None:
            self.register_skip_hook(on_skip)

    # ------------------------------------------------------------------------------------------------------
    # GradScaler's private attributes that are views of our state

    @property
    def _init_scale(self) -> float:
        """The scale the state starts from at the first ``scale()`` (GradScaler's attribute). No sync."""
        return self._pending.scale

    @_init_scale.setter
    def _init_scale(self, value: float) -> None:
        self._pending = dataclasses.replace(self._pending, scale=_fp32(float(value)))

    @property
    def _init_growth_tracker(self) -> int:
        """The growth tracker the state starts from (GradScaler's attribute). No sync."""
        return self._pending.growth_tracker

    @_init_growth_tracker.setter
    def _init_growth_tracker(self, value: int) -> None:
        self._pending = dataclasses.replace(self._pending, growth_tracker=value)

    @property
    def _growth_factor(self) -> float:
        return self.get_growth_factor()

    @_growth_factor.setter
    def _growth_factor(self, value: float) -> None:
        self.set_growth_factor(value)

    @property
    def _backoff_factor(self) -> float:
        return self.get_backoff_factor()

    @_backoff_factor.setter
    def _backoff_factor(self, value: float) -> None:
        self.set_backoff_factor(value)

    @property
    def _growth_interval(self) -> int:
        return self.get_growth_interval()

    @_growth_interval.setter
    def _growth_interval(self, value: int) -> None:
        self.set_growth_interval(value)

    @property
    def _state(self) -> ScalingState | None:
        """The state tensors as a :class:`ScalingState`, or None before the first ``scale``. No sync."""
        if self._scale is None or self._growth_tracker is None or self._steps is None:
            return None
        return ScalingState(*(cast(torch.Tensor, getattr(self, attr)) for _, attr in _STATE_ATTRS))

    def _set_state(self, state: ScalingState) -> None:
        for field, attr in _STATE_ATTRS:
            setattr(self, attr, getattr(state, field))

    # ------------------------------------------------------------------------------------------------------
    # Introspection

    @property
    def config(self) -> ScalingConfig:
        """The scaling rule (a frozen dataclass; change it with the setters or :meth:`load_state_dict`). No sync."""
        return self._config

    @property
    def state(self) -> ScalingState:
        """The current state as 0-d tensors (no sync; before the first ``scale`` a fresh CPU copy)."""
        state = self._state
        return state_from_py(self._pending) if state is None else state

    @property
    def last_skip(self) -> SkipEvent | None:
        """The :class:`SkipEvent` of the last skipped step (None before any). No sync."""
        return self._last_skip

    @property
    def last_step_skipped(self) -> bool | None:
        """Whether the last ``step()`` skipped the optimizer step (None before any step, or when disabled, or
        when an optimizer of the ``grad_scaler=`` protocol recorded no inf check). No sync."""
        return self._last_step_skipped

    def watch(self, model: torch.nn.Module) -> None:
        """Name parameters in skip events by their names in ``model`` (``model.named_parameters()``).

        Keeps a weak reference; without it, parameters are named by their position in the optimizer. No sync.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch() takes a torch.nn.Module, got {type(model).__name__}")
        self._watched = weakref.ref(model)

    def is_enabled(self) -> bool:
        """Whether scaling is enabled. No sync."""
        return self._enabled

    def get_scale(self) -> float:
        """The current scale as a Python float, 1.0 when disabled. Syncs."""
        if not self._enabled:
            return 1.0
        if self._scale is None:
            return self._pending.scale
        return float(self._scale.item())

    def _get_scale_async(self) -> torch.Tensor | None:
        """The scale tensor (no sync), or None before the first ``scale``; GradScaler's private accessor."""
        return self._scale if self._enabled else None

    def _get_growth_tracker(self) -> int:
        """GradScaler's private accessor. Syncs."""
        if not self._enabled:
            return 0
        if self._growth_tracker is None:
            return self._pending.growth_tracker
        return int(self._growth_tracker.item())

    @property
    def skipped_steps(self) -> int:
        """Iterations whose optimizer steps were skipped for non-finite gradients, since the start. Syncs."""
        return self._py_state().skipped_steps if self._enabled else 0

    @property
    def consecutive_skips(self) -> int:
        """Skipped iterations in a row up to the last ``update``. Syncs."""
        return self._py_state().consecutive_skips if self._enabled else 0

    def _py_state(self) -> PyScalingState:
        state = self._state
        return self._pending if state is None else state_to_py(state)

    def _dynamic_config(self, what: str) -> DynamicScaling:
        if not isinstance(self._config, DynamicScaling):
            raise TypeError(f"{what}: this LossScaler uses {config_kind(self._config)} scaling, not dynamic")
        return self._config

    def get_growth_factor(self) -> float:
        """The growth factor (1.0 for static scaling: the scale never grows). No sync."""
        return self._config.growth_factor if isinstance(self._config, DynamicScaling) else 1.0

    def set_growth_factor(self, new_factor: float) -> None:
        """Set the growth factor (>= 1; 1 freezes growth). No sync. Raises and leaves the scaler unchanged on
        a bad value."""
        self._config = dataclasses.replace(self._dynamic_config("set_growth_factor"), growth_factor=new_factor)

    def get_backoff_factor(self) -> float:
        """The backoff factor (1.0 for static scaling: the scale never shrinks). No sync."""
        return self._config.backoff_factor if isinstance(self._config, DynamicScaling) else 1.0

    def set_backoff_factor(self, new_factor: float) -> None:
        """Set the backoff factor (in (0, 1]; 1 freezes backoff). No sync. Raises and leaves the scaler
        unchanged on a bad value."""
        cfg = self._dynamic_config("set_backoff_factor")
        self._config = dataclasses.replace(cfg, backoff_factor=new_factor)

    def get_growth_interval(self) -> int:
        """The growth interval (0 for static scaling: never grows). No sync."""
        return self._config.growth_interval if isinstance(self._config, DynamicScaling) else 0

    def set_growth_interval(self, new_interval: int) -> None:
        """Set the growth interval (int >= 1). No sync. Raises and leaves the scaler unchanged on a bad value.

        A growth tracker at or past the new interval grows at the next finite step (GradScaler, which tests
        ``==``, would never grow again).
        """
        cfg = self._dynamic_config("set_growth_interval")
        self._config = dataclasses.replace(cfg, growth_interval=new_interval)
        # Keep growth_tracker < growth_interval (the update rule relies on it). In place: GradScaler's tensor.
        limit = min(new_interval - 1, 2**31 - 1)
        self._pending = dataclasses.replace(self._pending, growth_tracker=min(self._pending.growth_tracker, limit))
        if self._growth_tracker is not None:
            self._growth_tracker.clamp_(max=limit)

    def register_skip_hook(self, hook: Callable[[SkipEvent], None]) -> RemovableHandle:
        """Call ``hook(event)`` on every skipped ``step``; returns a handle whose ``remove()`` unregisters it.

        No sync.
        """
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._skip_hooks)
        self._skip_hooks[handle.id] = hook
        return handle

    # ------------------------------------------------------------------------------------------------------
    # The per-step path

    def _lazy_init_scale_growth_tracker(self, dev: torch.device | str | None) -> None:
        """Create the state tensors on ``dev`` from the pending state (GradScaler's private method). No sync."""
        if self._growth_tracker is not None:
            raise ScalerUsageError("_growth_tracker initialized before _scale")
        self._set_state(state_from_py(self._pending, dev))
        if self._device is None:
            assert self._scale is not None
            self._device = self._scale.device.type

    def _check_scale_growth_tracker(self, funcname: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scale is None or self._growth_tracker is None:
            raise ScalerUsageError(
                f"Attempted {funcname} but _scale is None: LossScaler.{funcname}() was called before scale(). "
                "Scale the loss first (scaler.scale(loss).backward())."
            )
        return self._scale, self._growth_tracker

    def _require_state(self, funcname: str) -> ScalingState:
        self._check_scale_growth_tracker(funcname)
        state = self._state
        if state is None:  # GradScaler's two tensors were set by hand; create ours beside them
            assert self._scale is not None and self._growth_tracker is not None
            fresh = state_from_py(self._pending, self._scale.device)
            self._set_state(dataclasses.replace(fresh, scale=self._scale, growth_tracker=self._growth_tracker))
            state = self._state
            assert state is not None
        return state

    @overload
    def scale(self, outputs: torch.Tensor) -> torch.Tensor: ...

    @overload
    def scale(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]: ...

    @overload
    def scale(self, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]: ...

    @overload
    def scale(self, outputs: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]: ...

    def scale(self, outputs: Any) -> Any:
        """Multiply a tensor, or nested lists/tuples of tensors, by the scale. No sync.

        Returns ``outputs`` unchanged when disabled. The state is created on the device of the first tensor.
        """
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            if self._scale is None:
                self._lazy_init_scale_growth_tracker(outputs.device)
            assert self._scale is not None
            return outputs * self._scale.to(device=outputs.device, non_blocking=True)

        per_device: dict[torch.device, torch.Tensor] = {}

        def apply(val: Any) -> Any:
            if isinstance(val, torch.Tensor):
                scale = per_device.get(val.device)
                if scale is None:
                    if self._scale is None:
                        self._lazy_init_scale_growth_tracker(val.device)
                    assert self._scale is not None
                    scale = self._scale.to(device=val.device, non_blocking=True)
                    per_device[val.device] = scale
                return val * scale
            if isinstance(val, (list, tuple)):
                return type(val)(apply(v) for v in val)
            if isinstance(val, Iterable) and not isinstance(val, (str, bytes, Mapping)):
                return map(apply, val)
            raise ScalerTypeError(
                f"scale() takes a Tensor or (nested) lists/tuples of Tensors, got {type(val).__name__}"
            )

        return apply(outputs)

    def _gather_grads(
        self, optimizer: torch.optim.Optimizer, allow_fp16: bool
    ) -> tuple[dict[tuple[torch.device, torch.dtype, bool], list[torch.Tensor]], bool]:
        """Group gradients by (device, dtype, is DTensor), validating all of them before anything changes.

        Also returns whether every parameter is a DTensor (decided on parameters, not on which gradients
        happen to exist, so that every rank takes the same collective path).
        """
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        groups: dict[tuple[torch.device, torch.dtype, bool], list[torch.Tensor]] = {}
        dtensor_cls = _compat.dtensor_type()
        all_dtensor = dtensor_cls is not None
        fp16 = torch.float16
        for group in optimizer.param_groups:
            for param in group["params"]:
                if not isinstance(param, torch.Tensor):
                    raise ScalerTypeError(f"optimizer parameters must be tensors, got {type(param).__name__}")
                dt = dtensor_cls is not None and isinstance(param, dtensor_cls)
                all_dtensor = all_dtensor and dt
                grad = param.grad
                if grad is None:
                    continue
                dtype = grad.dtype
                if dtype == fp16 and not allow_fp16:
                    raise ValueError(
                        "LossScaler cannot unscale FP16 gradients in place (GradScaler: 'Attempting to unscale "
                        "FP16 gradients.'): the unscaled values would underflow FP16 again. Keep parameters "
                        "(hence gradients) in FP32 and compute in FP16 with torch.autocast, or use BF16, whose "
                        "gradients keep FP32's range."
                    )
                if grad.is_sparse:
                    if dtype == fp16:
                        # As GradScaler: duplicate indices of a scaled FP16 gradient may overflow when summed,
                        # so check the coalesced values (this replaces ``param.grad``, with the same values).
                        param.grad = grad = grad.coalesce()
                    values = _compat.sparse_values(grad)
                else:
                    values = grad
                key = (values.device, dtype, dt)
                bucket = groups.get(key)
                if bucket is None:
                    if not values.is_floating_point():
                        raise TypeError(f"gradients must be floating point, got {values.dtype}")
                    groups[key] = [values]
                else:
                    bucket.append(values)
        return groups, all_dtensor

    def _unscale_grads_impl(
        self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor, allow_fp16: bool
    ) -> tuple[dict[torch.device, torch.Tensor], bool]:
        """Unscale in place; the found-inf flag per device (each starting as a copy of ``found_inf``), and
        whether torch's fused op has already agreed them across ranks (all parameters DTensors). No sync."""
        groups, all_dtensor = self._gather_grads(optimizer, allow_fp16)
        found_per_device: dict[torch.device, torch.Tensor] = {}
        inv_per_device: dict[torch.device, torch.Tensor] = {}
        reduced_everywhere = True
        with torch.no_grad():
            for (device, _dtype, _dt), grads in groups.items():
                if device not in found_per_device:
                    found_per_device[device] = found_inf.to(device, torch.float32, non_blocking=True, copy=True)
                    inv_per_device[device] = inv_scale.to(device, non_blocking=True)
                reduced = _compat.non_finite_check_and_unscale_(grads, found_per_device[device], inv_per_device[device])
                reduced_everywhere = reduced_everywhere and reduced
        return found_per_device, bool(all_dtensor and groups and reduced_everywhere)

    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor, allow_fp16: bool
    ) -> dict[torch.device, torch.Tensor]:
        """GradScaler's private method: unscale in place, return ``{device: found_inf}``. No sync.

        Like GradScaler's, it does not all-reduce across ranks (``unscale_`` and ``step`` do) and does not
        apply the scale floor (``inv_scale`` is the caller's).
        """
        return self._unscale_grads_impl(optimizer, inv_scale, found_inf, allow_fp16)[0]

    def _inv_scale_and_floor(self, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1/scale, found_inf)``: the reciprocal in FP64 rounded to FP32 (exact for powers of two; torch does
        the same, since FP32 division may be inexact under some compile options), and a found-inf flag (bool;
        the per-device copies are FP32) that starts set when that reciprocal is inf: the scale floor.
        Multiplying finite gradients by inf would put inf/NaN in the weights; the step is skipped and counted
        instead. (A NaN scale makes the scaled loss, hence every gradient, NaN: the check finds those.) As many
        ops as GradScaler's zero flag, no sync."""
        inv = scale.double().reciprocal().float()
        return inv, torch.isinf(inv)

    def _key(self, optimizer: torch.optim.Optimizer) -> int:
        """The key of ``optimizer``'s record in ``_per_optimizer_states`` (its id), never a freed one's record."""
        return self._owners.key(self._per_optimizer_states, optimizer)

    def _record_found(
        self, optimizer: torch.optim.Optimizer, per_device: dict[torch.device, torch.Tensor], reduced: bool
    ) -> dict[str, Any]:
        """Store the found-inf flags in GradScaler's per-optimizer record, agreed across ranks. No sync."""
        if _dist_initialized() and not reduced:
            assert self._scale is not None
            found = _sum_found(per_device.values(), self._scale.device)
            if found is None:  # no gradient here; take part in the collective anyway (other ranks wait)
                found = torch.zeros((), dtype=torch.float32, device=self._scale.device)
            _all_reduce_max(found, self._process_group)
            per_device = {found.device: found} if per_device else {}
        record = self._per_optimizer_states[self._key(optimizer)]
        record["found_inf_per_device"] = per_device
        return record

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place and record whether any is inf/NaN. No sync.

        Optional: ``step`` calls it when you did not. Call it to clip or inspect the true gradients::

            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            scaler.step(optimizer)
            scaler.update()

        The reciprocal is taken in FP64 and rounded to FP32 (torch); with power-of-two scales it is exact.
        When it is not finite (scale below the floor) the step will be skipped and counted (the gradients,
        multiplied by inf as GradScaler would, are not used). BF16 and FP32 gradients are accepted on every
        device; FP16 gradients raise ValueError (unscaling them in place would underflow again). Sparse
        gradients are unscaled through their stored values. Under torch.distributed the found-inf flag is
        all-reduced (MAX) over ``process_group``.

        Raises:
            RuntimeError: when called twice for one optimizer before ``update``, after ``step``, or before
                ``scale`` (then a :class:`ScalerUsageError`, also an AssertionError as GradScaler's). Nothing is
                changed then.
        """
        if not self._enabled:
            return
        scale, _ = self._check_scale_growth_tracker("unscale_")
        record = self._per_optimizer_states.get(self._key(optimizer))
        if record is not None and record["stage"] is OptState.UNSCALED:
            raise ScalerUsageError("unscale_() has already been called on this optimizer since the last update().")
        if record is not None and record["stage"] is OptState.STEPPED:
            raise ScalerUsageError("unscale_() is being called after step().")
        inv_scale, found_inf = self._inv_scale_and_floor(scale)
        per_device, reduced = self._unscale_grads_impl(optimizer, inv_scale, found_inf, allow_fp16=False)
        self._record_found(optimizer, per_device, reduced)["stage"] = OptState.UNSCALED

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[Any, Any]:
        """GradScaler's private method for optimizers that unscale themselves: check (without unscaling, FP16
        allowed) and record the found-inf flags; they include the scale floor (the optimizer would divide by
        a scale whose reciprocal overflows). No sync."""
        scale, _ = self._check_scale_growth_tracker("_check_inf_per_device")
        one = torch.ones((), dtype=torch.float32, device=scale.device)
        _, found_inf = self._inv_scale_and_floor(scale)
        per_device, reduced = self._unscale_grads_impl(optimizer, one, found_inf, allow_fp16=True)
        found: dict[Any, Any] = self._record_found(optimizer, per_device, reduced)["found_inf_per_device"]
        return found

    def _found_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[Any, Any]:
        """GradScaler's private accessor: ``{device: found_inf}`` recorded for ``optimizer``. No sync."""
        found: dict[Any, Any] = self._per_optimizer_states[self._key(optimizer)]["found_inf_per_device"]
        return found

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (if not yet done) and call ``optimizer.step(*args, **kwargs)`` unless a gradient is inf/NaN.

        Syncs once to decide (as torch does). When the scale is below 1 and nothing was found, the unscaled
        gradients are checked again (one more pass and sync, only then). A skipped step leaves parameters and
        optimizer state untouched, reads the counters and counts the non-finite elements per parameter (two
        more syncs, on the skip path only), records a :class:`SkipEvent` (``last_skip``), logs it to the
        ``lossscale`` logger at INFO level, calls the skip hooks, and warns (:class:`SkipWarning`) when the
        skip makes ``warn_after_skips`` skipped iterations in a row.

        Optimizers with ``_step_supports_amp_scaling = True`` get GradScaler's protocol, unchanged: a
        ``grad_scaler=`` keyword (with GradScaler's FutureWarning) when their ``step`` takes one, else
        ``grad_scale`` and ``found_inf`` attributes for the duration of their step. GradScaler does not sync
        there; we add one sync after their step, to know whether it skipped. With the attribute protocol we
        also check, on the device, that the optimizer's own unscale cannot overflow a finite gradient (a
        scale below 1): if it would, ``found_inf`` is set before its step (skipped and counted,
        ``"unscale_overflow"``); otherwise the step is GradScaler's, bit for bit.

        Returns what ``optimizer.step`` returns, or None when skipped.

        Raises:
            SkipBudgetExceeded: on a skip that makes more than ``max_consecutive_skips`` skipped
                iterations in a row.
            ScalerUsageError: (a RuntimeError and an AssertionError) for a ``closure`` keyword (unsupported,
                as in torch), a second ``step`` before ``update``, a call before ``scale``, or an optimizer
                without any gradient ("No inf checks were recorded for this optimizer.").
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise ScalerUsageError("Closure use is not currently supported if LossScaler is enabled.")
        self._check_scale_growth_tracker("step")
        record = self._per_optimizer_states.get(self._key(optimizer))
        if record is not None and record["stage"] is OptState.STEPPED:
            raise ScalerUsageError("step() has already been called since the last update().")

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return self._step_amp_aware(optimizer, *args, **kwargs)

        if record is None or record["stage"] is OptState.READY:
            self.unscale_(optimizer)
        record = self._per_optimizer_states[self._key(optimizer)]
        if len(record["found_inf_per_device"]) == 0:
            raise ScalerUsageError(
                "No inf checks were recorded for this optimizer. (None of its parameters has a gradient: was "
                "backward() called on the scaled loss, and are these the model's parameters?)"
            )
        retval = self._maybe_opt_step(optimizer, record, *args, **kwargs)
        record["stage"] = OptState.STEPPED
        return retval

    def _maybe_opt_step(
        self, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any], *args: Any, **kwargs: Any
    ) -> Any:
        """GradScaler's private method: step unless a found-inf flag is set. The one sync of ``step``."""
        scale, _ = self._check_scale_growth_tracker("step")
        flags = list(optimizer_state["found_inf_per_device"].values())
        found = _sum_found(flags, scale.device)
        if found is None:
            raise ScalerUsageError("No inf checks were recorded for this optimizer.")
        # One read for both: the flag decides; the scale says whether unscaling could have overflowed.
        found_host, scale_host = torch.stack([found, scale]).tolist()
        overflow = False
        if found_host == 0.0 and scale_host < 1.0:
            # 1/scale > 1: a finite scaled gradient may have become inf when unscaled. Check the unscaled
            # gradients (an extra pass, only while the scale is below 1) and count it as a skip if so.
            overflow = self._unscaled_overflow(optimizer, scale.device)
            if overflow:
                for f in flags:
                    f.fill_(1.0)  # so that update() backs off and counts the skip
        if found_host == 0.0 and not overflow:
            self._last_step_skipped = False
            return optimizer.step(*args, **kwargs)
        self._last_step_skipped = True
        self._on_skip(optimizer, overflow=overflow)
        return None

    def _unscaled_overflow(self, optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
        """Whether an (already unscaled) gradient is non-finite, agreed across ranks. Reads only; syncs once."""
        groups, _ = self._gather_grads(optimizer, allow_fp16=True)
        with torch.no_grad():
            ok = [torch.isfinite(_compat.to_local(g)).all().to(device) for grads in groups.values() for g in grads]
            found = torch.logical_not(torch.stack(ok).all()).float() if ok else torch.zeros((), device=device)
        if _dist_initialized():
            _all_reduce_max(found, self._process_group)
        return bool(found.item())

    def _step_amp_aware(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """GradScaler's protocol for optimizers that unscale and skip inside their step (``Adam(fused=True)``,
        or a ``step(..., grad_scaler=None)``), honoured as GradScaler honours it; then one sync to learn
        whether the optimizer skipped (forensics). For the attribute protocol, a gradient that its unscale
        would overflow (scale below 1) is folded into ``found_inf`` before its step (one more read pass over
        the gradients, on the device; no sync): the step is skipped and counted, reason
        ``"unscale_overflow"``."""
        record = self._per_optimizer_states[self._key(optimizer)]
        has_grad_scaler_kwarg = "grad_scaler" in inspect.signature(optimizer.step).parameters
        overflow: torch.Tensor | None = None
        if has_grad_scaler_kwarg:
            warnings.warn(_GRAD_SCALER_KWARG_WARNING, FutureWarning, stacklevel=3)
            kwargs["grad_scaler"] = self
        else:
            if record["stage"] is OptState.READY:
                self._check_inf_per_device(optimizer)
            scale = self._scale
            assert scale is not None
            # GradScaler's sum: 0 + each flag (0 when no gradient was checked).
            found_inf = sum([t.to(scale.device, non_blocking=True) for t in record["found_inf_per_device"].values()])
            # The product of the scales, if the caller already set ``optimizer.grad_scale`` (GradScaler).
            optimizer.grad_scale = (  # type: ignore[attr-defined]
                getattr(optimizer, "grad_scale", None)
                if record["stage"] is OptState.UNSCALED
                else scale * getattr(optimizer, "grad_scale", 1)
            )
            # The optimizer checks before it unscales: with S < 1 a finite gradient may overflow (class doc).
            divisor = optimizer.grad_scale  # type: ignore[attr-defined]
            overflow = self._amp_unscale_overflow(optimizer, record, found_inf, divisor)
            if overflow is not None:
                found_inf = found_inf + overflow
            optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            retval = optimizer.step(*args, **kwargs)
        finally:
            if not has_grad_scaler_kwarg:
                del optimizer.grad_scale  # type: ignore[attr-defined]
                del optimizer.found_inf  # type: ignore[attr-defined]
        record["stage"] = OptState.STEPPED
        assert self._scale is not None
        found = _sum_found(record["found_inf_per_device"].values(), self._scale.device)
        if found is None:  # the optimizer recorded no check (a grad_scaler= optimizer may not)
            self._last_step_skipped = None
            return retval
        if overflow is None:
            overflow = torch.zeros((), dtype=torch.float32, device=found.device)
        found_host, overflow_host = torch.stack([found, overflow.to(found.device)]).tolist()  # the extra sync
        if found_host != 0.0:
            self._last_step_skipped = True
            self._on_skip(optimizer, overflow=overflow_host != 0.0)
        else:
            self._last_step_skipped = False
        return retval

    def _amp_unscale_overflow(
        self, optimizer: torch.optim.Optimizer, record: dict[str, Any], found_inf: Any, divisor: Any
    ) -> torch.Tensor | None:
        """For an optimizer that unscales inside its step: 1.0 when its unscale (``grad / divisor``) would turn a
        finite gradient into inf while nothing else was found, else 0.0, folded into the recorded found-inf
        flags (so that ``update`` backs off and counts the skip); agreed across ranks. None when no flag was
        recorded. One read pass over the gradients (their max magnitudes), on the device; no sync.

        The optimizer's own check looks at the gradients before it divides (as GradScaler's does), so with a
        scale below 1 (``1/S > 1``) a finite gradient could reach the weights as inf/NaN; the max magnitude
        divided as the optimizer divides overflows exactly when some element does (division rounds
        monotonically). With ``S >= 1`` the quotient is never larger than the gradient: nothing changes.
        """
        flags = list(record["found_inf_per_device"].values())
        if not flags or self._scale is None:
            return None
        device = self._scale.device
        groups, _ = self._gather_grads(optimizer, allow_fp16=True)
        with torch.no_grad():
            maxima: list[torch.Tensor] = []
            for grads in groups.values():
                local = [g for g in (_compat.to_local(t) for t in grads) if g.numel() > 0]
                if local:
                    norms = torch._foreach_norm(local, ord=math.inf)
                    maxima.append(torch.stack([n.float() for n in norms]).amax().to(device, non_blocking=True))
            if not maxima:
                return None
            biggest = torch.stack(maxima).amax()
            quotient = biggest if divisor is None else biggest / divisor
            nothing_found = (found_inf == 0) if isinstance(found_inf, torch.Tensor) else torch.tensor(found_inf == 0)
            overflow = torch.logical_and(torch.logical_not(torch.isfinite(quotient)), nothing_found.to(device))
            overflow = overflow.float()
            if _dist_initialized():
                _all_reduce_max(overflow, self._process_group)
            flags[0].add_(overflow.to(flags[0].device, non_blocking=True))
        return overflow

    def _param_names(self) -> dict[int, str]:
        model = self._watched() if self._watched is not None else None
        return {} if model is None else {id(p): n for n, p in model.named_parameters()}

    def _find_culprits(self, optimizer: torch.optim.Optimizer) -> tuple[NonFiniteGrad, ...]:
        """Count +inf, -inf and NaN per gradient (one sync per device). Runs on skipped steps only."""
        names = self._param_names()
        entries: dict[torch.device, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        with torch.no_grad():
            for gi, group in enumerate(optimizer.param_groups):
                for pi, param in enumerate(group["params"]):
                    grad = getattr(param, "grad", None)
                    if grad is None:
                        continue
                    values = _compat.to_local(_compat.sparse_values(grad) if grad.is_sparse else grad)
                    if not values.is_floating_point():
                        continue
                    counts = torch.stack(
                        [torch.isposinf(values).sum(), torch.isneginf(values).sum(), torch.isnan(values).sum()]
                    )
                    name = names.get(id(param), f"param_groups[{gi}].params[{pi}]")
                    entries.setdefault(values.device, []).append((name, values, counts))
        found: list[tuple[int, NonFiniteGrad]] = []
        order = 0
        for items in entries.values():
            host = torch.stack([c for _, _, c in items]).tolist()
            for (name, values, _), (posinf, neginf, nan) in zip(items, host, strict=True):
                order += 1
                if posinf or neginf or nan:
                    culprit = NonFiniteGrad(name, tuple(values.shape), values.numel(), posinf, neginf, nan)
                    found.append((order, culprit))
        return tuple(c for _, c in sorted(found, key=lambda oc: oc[0]))

    def _on_skip(self, optimizer: torch.optim.Optimizer, *, overflow: bool) -> None:
        state = self._require_state("step")
        before = state_to_py(state)  # the skip path's extra syncs: the counters, then the culprits
        inv = _fp32(1.0 / before.scale) if before.scale > 0.0 else math.inf
        floor = not math.isfinite(inv)
        # Below the floor, unscaling multiplied every gradient by inf: there is nothing left to point at.
        culprits = () if floor else self._find_culprits(optimizer)
        reason: SkipReason
        if floor:
            reason = "scale_floor"
        elif overflow:
            reason = "unscale_overflow"
        elif culprits:
            reason = "nonfinite_grads"
        else:
            reason = "external"
        event = SkipEvent(
            step=before.steps,
            scale=before.scale,
            consecutive_skips=before.consecutive_skips + 1,
            skipped_steps=before.skipped_steps + 1,
            reason=reason,
            culprits=culprits,
        )
        self._last_skip = event
        logger.info(
            "lossscale: skipped optimizer step at iteration %d at loss scale %g (%d in a row, %d in total): %s",
            event.step,
            event.scale,
            event.consecutive_skips,
            event.skipped_steps,
            event.describe(),
        )
        for hook in list(self._skip_hooks.values()):
            hook(event)
        threshold = self._warn_after_skips
        if threshold is not None and event.consecutive_skips == threshold and self._warned_at != event.step:
            self._warned_at = event.step  # once per iteration, even with several optimizers
            warnings.warn(
                f"LossScaler: {event.consecutive_skips} optimizer steps in a row were skipped (iteration "
                f"{event.step}, loss scale {event.scale:g}): {event.describe()}. The scale keeps backing off: "
                "check the data and the loss for inf/NaN, lower the learning rate, or look at the layer named "
                "(scaler.last_skip has the details; warn_after_skips=None silences this).",
                SkipWarning,
                stacklevel=4,
            )
        budget = self._config.max_consecutive_skips
        if budget is not None and event.consecutive_skips > budget:
            raise SkipBudgetExceeded(
                f"LossScaler: {event.consecutive_skips} consecutive skipped steps exceed "
                f"max_consecutive_skips={budget} at iteration {event.step} (loss scale {event.scale:g}): "
                f"{event.describe()}. The gradients keep overflowing or are NaN: check the loss and data for "
                "NaN/inf, lower the learning rate, or set min_scale."
            )

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Update the scale and counters from this iteration's found-inf flags. No sync.

        With ``new_scale`` the scale is set to it instead (the growth and hysteresis counters are left as
        they are, as in torch; skips of this iteration are still counted). A tensor ``new_scale`` is read
        once to validate it (a sync). A ``new_scale`` below the floor is accepted: the next step is skipped
        and counted, and the next ``update`` brings the scale back to 2^-127.

        Raises:
            ScalerUsageError: before ``scale``, or when no optimizer was unscaled or stepped since the last
                update ("No inf checks were recorded prior to update.").
            TypeError/ValueError: for a ``new_scale`` that is not a positive finite number or 1-element tensor.
        """
        if not self._enabled:
            return
        state = self._require_state("update")
        records = [*self._per_optimizer_states.values(), *self._owners.retired]
        flags = (f for record in records for f in record["found_inf_per_device"].values())
        found = _sum_found(flags, state.scale.device)
        if new_scale is not None:
            value = self._validate_new_scale(new_scale, state.scale.device)
            if found is not None:
                state = update_scale(state, found, _ACCOUNTING_ONLY)
            self._set_state(dataclasses.replace(state, scale=value))
        else:
            if found is None:
                raise ScalerUsageError(
                    "No inf checks were recorded prior to update(): call scaler.step(optimizer) (or unscale_) "
                    "for at least one optimizer since the last update()."
                )
            self._set_state(update_scale(state, found, self._config))
        self._per_optimizer_states = defaultdict(_compat.refresh_per_optimizer_state)
        self._owners.clear()

    def _validate_new_scale(self, new_scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
        if isinstance(new_scale, torch.Tensor):
            if new_scale.numel() != 1 or new_scale.requires_grad or not new_scale.is_floating_point():
                raise ScalerTypeError(
                    "new_scale must be a float or a 1-element floating-point tensor with requires_grad=False"
                )
            value = float(new_scale.item())
        elif isinstance(new_scale, (int, float)) and not isinstance(new_scale, bool):
            value = float(new_scale)
        else:
            raise TypeError(f"new_scale must be a float or a 1-element tensor, got {type(new_scale).__name__}")
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"new_scale must be positive and finite, got {value!r}")
        value32 = _fp32_scale("new_scale", value)  # the FP32 value the scale tensor will hold (no sync)
        return torch.full((), value32, dtype=torch.float32, device=device)

    # ------------------------------------------------------------------------------------------------------
    # Checkpointing

    def _torch_view(self, config: ScalingConfig, state: PyScalingState) -> dict[str, Any]:
        """GradScaler's five keys for a config and state (static scaling: factors 1.0, interval 0, so that a
        GradScaler that loads them keeps the scale fixed)."""
        dynamic = isinstance(config, DynamicScaling)
        return {
            "scale": state.scale,
            "growth_factor": config.growth_factor if isinstance(config, DynamicScaling) else 1.0,
            "backoff_factor": config.backoff_factor if isinstance(config, DynamicScaling) else 1.0,
            "growth_interval": config.growth_interval if isinstance(config, DynamicScaling) else 0,
            "_growth_tracker": state.growth_tracker if dynamic else 0,
        }

    def state_dict(self) -> dict[str, Any]:
        """The complete state, loadable by ``torch.amp.GradScaler.load_state_dict`` too. Syncs.

        GradScaler's five keys (``scale``, ``growth_factor``, ``backoff_factor``, ``growth_interval``,
        ``_growth_tracker``) at the top level, and ours beside them: ``format``, ``version``, ``config`` (the
        config's dataclass fields) and ``state`` (the fields of :class:`~lossscale.scaling.PyScalingState`).
        Plain Python numbers and strings: safe for ``torch.load(weights_only=True)``. Empty when disabled
        (as GradScaler). Call it after ``update``.
        """
        if not self._enabled:
            return {}
        state = self._py_state()
        return {
            **self._torch_view(self._config, state),
            "format": _STATE_DICT_FORMAT,
            "version": STATE_DICT_VERSION,
            "config": config_to_dict(self._config),
            "state": dataclasses.asdict(state),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (version 1 or 2), or from a ``torch.amp.GradScaler`` one.

        A GradScaler dict sets the scale, growth tracker and the three factors; the hysteresis counter is
        refilled and the skip counters start at zero. Atomic: everything is validated first, and on a
        malformed or out-of-range dict it raises ValueError/TypeError/RuntimeError (a missing key: a
        :class:`StateDictKeyError`, also a KeyError as GradScaler's) naming the problem, leaving the scaler
        unchanged. Where the checkpoint's settings differ from the scaler's, one UserWarning lists each
        overridden setting. A no-op when disabled. No sync (a host-to-device copy of the new state).
        """
        if not self._enabled:
            return
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled scaler.")
        config: ScalingConfig
        if "version" in state_dict:
            config, pending = self._parse_own(state_dict)
        else:
            config, pending = self._parse_torch(state_dict)
        new_state = None if self._scale is None else state_from_py(pending, self._scale.device)
        overridden = [
            f"{f.name} {getattr(self._config, f.name, None)!r} -> {getattr(config, f.name)!r}"
            for f in dataclasses.fields(config)
            if f.name != "init_scale" and getattr(self._config, f.name, None) != getattr(config, f.name)
        ]
        if config_kind(config) != config_kind(self._config):
            overridden.insert(0, f"kind {config_kind(self._config)!r} -> {config_kind(config)!r}")
        # Commit: nothing below can fail.
        self._config = config
        self._pending = pending
        if new_state is not None:
            state = self._state
            if state is None:
                self._set_state(new_state)
            else:
                with torch.no_grad():  # in place, as GradScaler fills its tensors
                    for field, _ in _STATE_ATTRS:
                        getattr(state, field).copy_(getattr(new_state, field))
        if overridden:
            warnings.warn(
                "LossScaler.load_state_dict: the checkpoint overrides these settings of this scaler: "
                + ", ".join(overridden),
                UserWarning,
                stacklevel=2,
            )

    def _parse_own(self, sd: Mapping[str, Any]) -> tuple[ScalingConfig, PyScalingState]:
        version = sd["version"]
        if version not in (1, STATE_DICT_VERSION) or isinstance(version, bool):
            raise ValueError(
                f"unsupported LossScaler state dict version {version!r} (this lossscale reads versions 1 and "
                f"{STATE_DICT_VERSION})"
            )
        expected = _OWN_KEYS if version == 1 else _OWN_KEYS | _TORCH_KEYS
        if set(sd) != expected:
            raise StateDictKeyError(
                f"LossScaler state dict (version {version}) must have keys {sorted(expected)}, got {sorted(sd)}"
            )
        if sd["format"] != _STATE_DICT_FORMAT:
            raise ValueError(f"state dict 'format' must be {_STATE_DICT_FORMAT!r}, got {sd['format']!r}")
        config = config_from_dict(dict(sd["config"]) if isinstance(sd["config"], Mapping) else sd["config"])
        if config_kind(config) == "none":
            raise ValueError("state dict describes NoScaling (a disabled scaler); this scaler is enabled")
        raw = sd["state"]
        if not isinstance(raw, Mapping):
            raise TypeError(f"state dict 'state' must be a dict, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(PyScalingState)}
        if set(raw) != names:
            raise StateDictKeyError(f"state dict 'state' must have keys {sorted(names)}, got {sorted(raw)}")
        pending = PyScalingState(**raw)
        if isinstance(config, DynamicScaling):
            if pending.growth_tracker >= config.growth_interval:
                raise ValueError(
                    f"state dict growth_tracker ({pending.growth_tracker}) must be < growth_interval "
                    f"({config.growth_interval})"
                )
            if pending.hysteresis_tracker > config.hysteresis - 1:
                raise ValueError(
                    f"state dict hysteresis_tracker ({pending.hysteresis_tracker}) must be <= hysteresis - 1 "
                    f"({config.hysteresis - 1})"
                )
        if version != 1:
            # GradScaler's keys are a view of ours: they must agree (an edit of one alone is refused, not
            # resolved silently one way or the other).
            for key, value in self._torch_view(config, pending).items():
                if sd[key] != value or isinstance(sd[key], bool):
                    raise ValueError(
                        f"state dict key {key!r} ({sd[key]!r}) disagrees with its 'config'/'state' entries "
                        f"({value!r}): edit both or neither"
                    )
        return config, pending

    def _parse_torch(self, sd: Mapping[str, Any]) -> tuple[ScalingConfig, PyScalingState]:
        if set(sd) != _TORCH_KEYS:
            raise StateDictKeyError(
                "not a LossScaler state dict (no 'version') nor a torch.amp.GradScaler one: expected keys "
                f"{sorted(_TORCH_KEYS)}, got {sorted(sd)}"
            )
        current = self._config
        if not isinstance(current, DynamicScaling):
            raise ValueError("a torch.amp.GradScaler state dict describes dynamic scaling; this LossScaler is static")
        config = dataclasses.replace(
            current,
            growth_factor=sd["growth_factor"],
            backoff_factor=sd["backoff_factor"],
            growth_interval=sd["growth_interval"],
        )
        scale = sd["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"state dict 'scale' must be a float, got {type(scale).__name__}")
        tracker = sd["_growth_tracker"]
        if isinstance(tracker, bool) or not isinstance(tracker, int):
            raise TypeError(f"state dict '_growth_tracker' must be an int, got {type(tracker).__name__}")
        # Validates the scale and the tracker's range (int32) before the tracker is brought below the interval.
        PyScalingState(scale=float(scale), growth_tracker=tracker)
        pending = PyScalingState(
            scale=float(scale),
            # torch never grows once its tracker passes the interval (it tests ==); we grow at the next
            # finite step instead, and keep the invariant tracker < interval.
            growth_tracker=min(tracker, config.growth_interval - 1),
            hysteresis_tracker=config.hysteresis - 1,
        )
        return config, pending

    def __getstate__(self) -> dict[str, Any]:
        if self._per_optimizer_states or self._owners.retired:
            raise ScalerUsageError("A LossScaler may only be pickled at the start of an iteration or after update().")
        state = self.__dict__.copy()
        state["_owners"] = _Owners()  # weak references do not pickle; empty at this point anyway
        if self._enabled:
            # As GradScaler: the tensors are re-created lazily from the host-side state on the next scale().
            state["_pending"] = self._py_state()
            for _, attr in _STATE_ATTRS:
                state[attr] = None
        state["_process_group"] = None
        state["_watched"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_owners" not in state:  # pickled by a version without it
            self._owners = _Owners()

    def __repr__(self) -> str:
        return f"LossScaler({self._config!r}, enabled={self._enabled})"
