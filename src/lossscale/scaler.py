"""LossScaler: a drop-in for ``torch.amp.GradScaler`` with hysteresis, clamps, a skip budget and
distributed agreement.

The stateful shell around :mod:`lossscale.scaling`: it holds a :class:`~lossscale.scaling.ScalingState` of
0-d tensors on the loss's device, unscales gradients through :mod:`lossscale._compat`, decides whether to
step, and calls :func:`~lossscale.scaling.update_scale` once per iteration.

Host syncs: ``scale``, ``unscale_`` and ``update`` never sync; ``step`` syncs once to decide (as torch does),
and again on a skipped step only, to read the scale for the skip event; ``get_scale``, ``skipped_steps``,
``consecutive_skips`` and ``state_dict`` sync.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, overload

import torch
from torch.utils.hooks import RemovableHandle

from . import _compat
from .scaling import (
    DynamicScaling,
    NoScaling,
    PyScalingState,
    ScalingConfig,
    ScalingState,
    StaticScaling,
    _fp32,
    config_from_dict,
    config_kind,
    config_to_dict,
    init_state_py,
    state_from_py,
    state_to_py,
    update_scale,
)

__all__ = ["STATE_DICT_VERSION", "LossScaler", "SkipBudgetExceeded", "SkipEvent"]

logger = logging.getLogger("lossscale")

STATE_DICT_VERSION = 1
_STATE_DICT_FORMAT = "lossscale.LossScaler"
_TORCH_KEYS = frozenset({"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"})
# Counters only: used when update(new_scale=...) overrides the scale but skips must still be counted.
_ACCOUNTING_ONLY = StaticScaling()


class _Stage(enum.Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


@dataclasses.dataclass
class _OptimizerRecord:
    stage: _Stage = _Stage.READY
    found_inf: torch.Tensor | None = None  # 0-d float32 on the scale's device, already agreed across ranks


@dataclasses.dataclass(frozen=True)
class SkipEvent:
    """A skipped optimizer step, passed to skip hooks and logged to the ``lossscale`` logger.

    Attributes:
        step: index of the iteration (the number of ``update()`` calls before it).
        scale: the loss scale the gradients were computed with.
        consecutive_skips: skipped iterations in a row, this one included.
        skipped_steps: skipped iterations since the start, this one included.
    """

    step: int
    scale: float
    consecutive_skips: int
    skipped_steps: int


class SkipBudgetExceeded(RuntimeError):
    """Raised by ``LossScaler.step`` when more than ``max_consecutive_skips`` steps in a row were skipped."""


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_max(t: torch.Tensor, group: Any) -> None:
    """found_inf = MAX over ranks, so every rank skips together (pytorch#136009). No host sync on NCCL."""
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)


class LossScaler:
    """Loss scaling with ``torch.amp.GradScaler``'s interface and, by default, its exact behaviour.

    Migrating is one line: ``scaler = torch.amp.GradScaler("cuda")`` becomes ``scaler = LossScaler()``.

    Algorithm per iteration::

        scaler.scale(loss).backward()    # loss * S                        (no sync)
        scaler.unscale_(opt)             # g *= 1/S, found = any non-finite (no sync; optional; then clip)
        scaler.step(opt)                 # opt.step() unless found          (one sync to decide)
        scaler.update()                  # S, counters <- update_scale(...) (no sync)

    Under torch.distributed, ``found`` is all-reduced (MAX) over ``process_group`` so all ranks skip together;
    DTensor (FSDP2) gradients already get that reduction inside torch's fused check, and no second
    collective is issued for them.

    Args:
        device: accepted for compatibility with GradScaler; the state is created on the device of the first
            tensor passed to :meth:`scale`. ``"cuda"`` without CUDA disables the scaler with a warning, as
            torch does. Default None.
        init_scale: initial scale, default 2^16.
        growth_factor: default 2.0; must be > 1.
        backoff_factor: default 0.5; must lie in (0, 1).
        growth_interval: default 2000; int >= 1.
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

    Example:
        >>> import torch
        >>> from lossscale import LossScaler
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = LossScaler(init_scale=1024.0)
        >>> loss = model(torch.ones(2, 4)).sum()
        >>> scaler.scale(loss).backward()
        >>> scaler.unscale_(opt)                      # gradients are now true gradients
        >>> _ = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        >>> scaler.step(opt)
        >>> scaler.update()
        >>> scaler.get_scale(), scaler.skipped_steps
        (1024.0, 0)

    Warning:
        As with GradScaler: call ``unscale_`` at most once per optimizer between updates, only after all
        gradients are accumulated; call ``update`` once per iteration after every ``step``.
    """

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
    ) -> None:
        for name, flag in (("enabled", enabled), ("dynamic", dynamic)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
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
        self._init(config, device=device, enabled=enabled, process_group=process_group, on_skip=on_skip)

    @classmethod
    def from_config(
        cls,
        config: ScalingConfig,
        *,
        device: str | torch.device | None = None,
        process_group: Any = None,
        on_skip: Callable[[SkipEvent], None] | None = None,
    ) -> LossScaler:
        """Build a scaler from a :class:`DynamicScaling`, :class:`StaticScaling` or :class:`NoScaling`.

        ``NoScaling()`` gives a disabled scaler (every method a no-op). No sync.
        """
        config_kind(config)  # TypeError for anything else
        self = cls.__new__(cls)
        enabled = not isinstance(config, NoScaling)
        self._init(config, device=device, enabled=enabled, process_group=process_group, on_skip=on_skip)
        return self

    def _init(
        self,
        config: ScalingConfig,
        *,
        device: str | torch.device | None,
        enabled: bool,
        process_group: Any,
        on_skip: Callable[[SkipEvent], None] | None,
    ) -> None:
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a str, torch.device or None, got {type(device).__name__}")
        if on_skip is not None and not callable(on_skip):
            raise TypeError(f"on_skip must be callable or None, got {type(on_skip).__name__}")
        self._device = None if device is None else torch.device(device).type
        if enabled and self._device == "cuda" and not torch.cuda.is_available():
            warnings.warn("LossScaler is enabled, but CUDA is not available.  Disabling.", stacklevel=3)
            enabled = False
        self._enabled = enabled
        self._config: ScalingConfig = config
        self._process_group = process_group
        # Host-side state before the first scale() (or after load_state_dict before it).
        self._pending: PyScalingState = init_state_py(config)
        self._state: ScalingState | None = None
        self._records: dict[int, _OptimizerRecord] = {}
        # An OrderedDict, as torch's hooks: RemovableHandle keeps a weak reference to it.
        self._skip_hooks: OrderedDict[int, Callable[[SkipEvent], None]] = OrderedDict()
        if on_skip is not None:
            self.register_skip_hook(on_skip)

    # ------------------------------------------------------------------------------------------------------
    # Introspection

    @property
    def config(self) -> ScalingConfig:
        """The scaling rule (a frozen dataclass; change it with the setters or :meth:`load_state_dict`). No sync."""
        return self._config

    @property
    def state(self) -> ScalingState:
        """The current state as 0-d tensors (no sync; before the first ``scale`` a fresh CPU copy)."""
        if self._state is None:
            return state_from_py(self._pending)
        return self._state

    def is_enabled(self) -> bool:
        """Whether scaling is enabled. No sync."""
        return self._enabled

    def get_scale(self) -> float:
        """The current scale as a Python float, 1.0 when disabled. Syncs."""
        if not self._enabled:
            return 1.0
        if self._state is None:
            return self._pending.scale
        return float(self._state.scale.item())

    def _get_scale_async(self) -> torch.Tensor | None:
        """The scale tensor (no sync), or None before the first ``scale``; GradScaler's private accessor."""
        return self._state.scale if (self._enabled and self._state is not None) else None

    def _get_growth_tracker(self) -> int:
        """GradScaler's private accessor. Syncs."""
        if not self._enabled:
            return 0
        return self._py_state().growth_tracker

    @property
    def skipped_steps(self) -> int:
        """Iterations whose optimizer steps were skipped for non-finite gradients, since the start. Syncs."""
        return self._py_state().skipped_steps if self._enabled else 0

    @property
    def consecutive_skips(self) -> int:
        """Skipped iterations in a row up to the last ``update``. Syncs."""
        return self._py_state().consecutive_skips if self._enabled else 0

    def _py_state(self) -> PyScalingState:
        return self._pending if self._state is None else state_to_py(self._state)

    def _dynamic_config(self, what: str) -> DynamicScaling:
        if not isinstance(self._config, DynamicScaling):
            raise TypeError(f"{what}: this LossScaler uses {config_kind(self._config)} scaling, not dynamic")
        return self._config

    def get_growth_factor(self) -> float:
        """The growth factor (1.0 for static scaling: the scale never grows). No sync."""
        return self._config.growth_factor if isinstance(self._config, DynamicScaling) else 1.0

    def set_growth_factor(self, new_factor: float) -> None:
        """Set the growth factor (> 1). No sync. Raises and leaves the scaler unchanged on a bad value."""
        self._config = dataclasses.replace(self._dynamic_config("set_growth_factor"), growth_factor=new_factor)

    def get_backoff_factor(self) -> float:
        """The backoff factor (1.0 for static scaling: the scale never shrinks). No sync."""
        return self._config.backoff_factor if isinstance(self._config, DynamicScaling) else 1.0

    def set_backoff_factor(self, new_factor: float) -> None:
        """Set the backoff factor (in (0, 1)). No sync. Raises and leaves the scaler unchanged on a bad value."""
        cfg = self._dynamic_config("set_backoff_factor")
        self._config = dataclasses.replace(cfg, backoff_factor=new_factor)

    def get_growth_interval(self) -> int:
        """The growth interval (0 for static scaling: never grows). No sync."""
        return self._config.growth_interval if isinstance(self._config, DynamicScaling) else 0

    def set_growth_interval(self, new_interval: int) -> None:
        """Set the growth interval (int >= 1). No sync. Raises and leaves the scaler unchanged on a bad value."""
        cfg = self._dynamic_config("set_growth_interval")
        self._config = dataclasses.replace(cfg, growth_interval=new_interval)
        # Keep growth_tracker < growth_interval (the update rule relies on it): a tracker already past the
        # new interval grows at the next finite step. No sync.
        limit = new_interval - 1
        self._pending = dataclasses.replace(self._pending, growth_tracker=min(self._pending.growth_tracker, limit))
        if self._state is not None:
            self._state = dataclasses.replace(
                self._state, growth_tracker=torch.clamp(self._state.growth_tracker, max=limit)
            )

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

    def _lazy_state(self, device: torch.device) -> ScalingState:
        if self._state is None:
            self._state = state_from_py(self._pending, device)
        return self._state

    def _require_state(self, funcname: str) -> ScalingState:
        if self._state is None:
            raise RuntimeError(
                f"LossScaler.{funcname}() was called before scale(): scale the loss first "
                "(scaler.scale(loss).backward())."
            )
        return self._state

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
            state = self._lazy_state(outputs.device)
            return outputs * state.scale.to(device=outputs.device, non_blocking=True)

        per_device: dict[torch.device, torch.Tensor] = {}

        def apply(val: Any) -> Any:
            if isinstance(val, torch.Tensor):
                scale = per_device.get(val.device)
                if scale is None:
                    scale = self._lazy_state(val.device).scale.to(device=val.device, non_blocking=True)
                    per_device[val.device] = scale
                return val * scale
            if isinstance(val, (list, tuple)):
                return type(val)(apply(v) for v in val)
            if isinstance(val, Iterable) and not isinstance(val, (str, bytes, Mapping)):
                return map(apply, val)
            raise TypeError(f"scale() takes a Tensor or (nested) lists/tuples of Tensors, got {type(val).__name__}")

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
                    raise TypeError(f"optimizer parameters must be tensors, got {type(param).__name__}")
                dt = dtensor_cls is not None and isinstance(param, dtensor_cls)
                all_dtensor = all_dtensor and dt
                grad = param.grad
                if grad is None:
                    continue
                if grad.dtype == fp16 and not allow_fp16:
                    raise ValueError(
                        "LossScaler cannot unscale FP16 gradients in place: the unscaled values would underflow "
                        "FP16 again. Keep parameters (hence gradients) in FP32 and compute in FP16 with "
                        "torch.autocast, or use BF16, whose gradients keep FP32's range."
                    )
                if grad.is_sparse:
                    values = _compat.sparse_values(grad)
                else:
                    values = grad
                key = (values.device, values.dtype, dt)
                bucket = groups.get(key)
                if bucket is None:
                    if not values.is_floating_point():
                        raise TypeError(f"gradients must be floating point, got {values.dtype}")
                    groups[key] = [values]
                else:
                    bucket.append(values)
        return groups, all_dtensor

    def _check_and_unscale(
        self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, allow_fp16: bool
    ) -> torch.Tensor:
        """Unscale in place and return found_inf (0-d float32 on the scale's device, agreed across ranks)."""
        state = self._require_state("unscale_")
        groups, all_dtensor = self._gather_grads(optimizer, allow_fp16)
        scale_device = state.scale.device
        found_per_device: dict[torch.device, torch.Tensor] = {}
        inv_per_device: dict[torch.device, torch.Tensor] = {}
        reduced_everywhere = True
        with torch.no_grad():
            for (device, _dtype, _dt), grads in groups.items():
                if device not in found_per_device:
                    found_per_device[device] = torch.zeros((), dtype=torch.float32, device=device)
                    inv_per_device[device] = inv_scale.to(device, non_blocking=True)
                reduced = _compat.non_finite_check_and_unscale_(grads, found_per_device[device], inv_per_device[device])
                reduced_everywhere = reduced_everywhere and reduced
        if not found_per_device:
            found = torch.zeros((), dtype=torch.float32, device=scale_device)
        else:
            flags = [f.to(scale_device, non_blocking=True) for f in found_per_device.values()]
            found = flags[0] if len(flags) == 1 else torch.stack(flags).amax()
        if _dist_initialized() and not (all_dtensor and groups and reduced_everywhere):
            _all_reduce_max(found, self._process_group)
        return found

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place and record whether any is inf/NaN. No sync.

        Optional: ``step`` calls it when you did not. Call it to clip or inspect the true gradients::

            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            scaler.step(optimizer)
            scaler.update()

        The reciprocal is taken in FP64 and rounded to FP32 (torch); with power-of-two scales it is exact.
        BF16 and FP32 gradients are accepted on every device; FP16 gradients raise ValueError (unscaling
        them in place would underflow again). Sparse gradients are unscaled through their stored values.
        Under torch.distributed the found-inf flag is all-reduced (MAX) over ``process_group``.

        Raises:
            RuntimeError: when called twice for one optimizer before ``update``, after ``step``, or before
                ``scale``. Nothing is changed then.
        """
        if not self._enabled:
            return
        state = self._require_state("unscale_")
        record = self._records.get(id(optimizer))
        if record is not None and record.stage is _Stage.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if record is not None and record.stage is _Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        # FP32 division may be inexact under some compile options; the reciprocal in FP64 is exact for
        # powers of two and correctly rounded otherwise (torch does the same).
        inv_scale = state.scale.double().reciprocal().float()
        found = self._check_and_unscale(optimizer, inv_scale, allow_fp16=False)
        self._records[id(optimizer)] = _OptimizerRecord(_Stage.UNSCALED, found)

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (if not yet done) and call ``optimizer.step(*args, **kwargs)`` unless a gradient is inf/NaN.

        Syncs once to decide (as torch does); a skipped step also reads the scale and counters (a second
        sync, on the skip path only), logs a :class:`SkipEvent` to the ``lossscale`` logger at INFO level and
        calls the skip hooks. A skipped step leaves parameters and optimizer state untouched.

        Returns what ``optimizer.step`` returns, or None when skipped.

        Raises:
            SkipBudgetExceeded: on a skip that makes more than ``max_consecutive_skips`` skipped
                iterations in a row.
            RuntimeError: for a ``closure`` keyword (unsupported, as in torch), a second ``step`` before
                ``update``, or a call before ``scale``.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if LossScaler is enabled.")
        state = self._require_state("step")
        record = self._records.get(id(optimizer))
        if record is not None and record.stage is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return self._step_amp_aware(optimizer, record, state, *args, **kwargs)

        if record is None or record.stage is _Stage.READY:
            self.unscale_(optimizer)
            record = self._records[id(optimizer)]
        assert record.found_inf is not None
        if record.found_inf.item() == 0.0:  # the one sync: decide whether to step
            retval = optimizer.step(*args, **kwargs)
            record.stage = _Stage.STEPPED
            return retval
        record.stage = _Stage.STEPPED
        self._on_skip(state)
        return None

    def _step_amp_aware(
        self,
        optimizer: torch.optim.Optimizer,
        record: _OptimizerRecord | None,
        state: ScalingState,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """torch's protocol for optimizers that unscale and skip inside step (e.g. ``Adam(fused=True)``).

        The optimizer gets ``grad_scale`` and ``found_inf`` attributes for the duration of its step. No sync.
        """
        if record is None or record.stage is _Stage.READY:
            one = torch.ones((), dtype=torch.float32, device=state.scale.device)
            found = self._check_and_unscale(optimizer, one, allow_fp16=True)
            record = _OptimizerRecord(_Stage.READY, found)
            self._records[id(optimizer)] = record
            optimizer.grad_scale = state.scale * getattr(optimizer, "grad_scale", 1)  # type: ignore[attr-defined]
        else:  # already unscaled by unscale_(): the optimizer must not unscale again
            optimizer.grad_scale = getattr(optimizer, "grad_scale", None)  # type: ignore[attr-defined]
        optimizer.found_inf = record.found_inf  # type: ignore[attr-defined]
        try:
            retval = optimizer.step(*args, **kwargs)
        finally:
            del optimizer.grad_scale  # type: ignore[attr-defined]
            del optimizer.found_inf  # type: ignore[attr-defined]
        record.stage = _Stage.STEPPED
        return retval

    def _on_skip(self, state: ScalingState) -> None:
        before = state_to_py(state)  # the skip path's extra sync
        event = SkipEvent(
            step=before.steps,
            scale=before.scale,
            consecutive_skips=before.consecutive_skips + 1,
            skipped_steps=before.skipped_steps + 1,
        )
        logger.info(
            "lossscale: skipped optimizer step at iteration %d: non-finite gradients at loss scale %g "
            "(%d in a row, %d in total)",
            event.step,
            event.scale,
            event.consecutive_skips,
            event.skipped_steps,
        )
        for hook in list(self._skip_hooks.values()):
            hook(event)
        budget = self._config.max_consecutive_skips
        if budget is not None and event.consecutive_skips > budget:
            raise SkipBudgetExceeded(
                f"LossScaler: {event.consecutive_skips} consecutive skipped steps exceed "
                f"max_consecutive_skips={budget} at iteration {event.step} (loss scale {event.scale:g}). "
                "The gradients keep overflowing or are NaN: check the loss and data for NaN/inf, lower the "
                "learning rate, or set min_scale."
            )

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Update the scale and counters from this iteration's found-inf flags. No sync.

        With ``new_scale`` the scale is set to it instead (the growth and hysteresis counters are left as
        they are, as in torch; skips of this iteration are still counted). A tensor ``new_scale`` is read
        once to validate it (a sync).

        Raises:
            RuntimeError: before ``scale``, or when no optimizer was unscaled or stepped since the last update.
            TypeError/ValueError: for a ``new_scale`` that is not a positive finite number or 1-element tensor.
        """
        if not self._enabled:
            return
        state = self._require_state("update")
        flags = [r.found_inf for r in self._records.values() if r.found_inf is not None]
        found: torch.Tensor | None = None
        if flags:
            # found_inf already lives on the scale's device (unscale_ puts it there); sum as torch does.
            found = flags[0]
            for f in flags[1:]:
                found = found + f
        if new_scale is not None:
            value = self._validate_new_scale(new_scale, state.scale.device)
            if found is not None:
                state = update_scale(state, found, _ACCOUNTING_ONLY)
            self._state = dataclasses.replace(state, scale=value)
        else:
            if found is None:
                raise RuntimeError(
                    "update() found no inf checks: call scaler.step(optimizer) (or unscale_) for at least one "
                    "optimizer since the last update()."
                )
            self._state = update_scale(state, found, self._config)
        self._records = {}

    def _validate_new_scale(self, new_scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
        if isinstance(new_scale, torch.Tensor):
            if new_scale.numel() != 1 or new_scale.requires_grad or not new_scale.is_floating_point():
                raise TypeError(
                    "new_scale must be a float or a 1-element floating-point tensor with requires_grad=False"
                )
            value = float(new_scale.item())
        elif isinstance(new_scale, (int, float)) and not isinstance(new_scale, bool):
            value = float(new_scale)
        else:
            raise TypeError(f"new_scale must be a float or a 1-element tensor, got {type(new_scale).__name__}")
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"new_scale must be positive and finite, got {value!r}")
        value32 = _fp32(value)  # the FP32 value the scale tensor will hold (host-side, no sync)
        if not (math.isfinite(value32) and value32 > 0.0):
            # The scale is an FP32 tensor: 1e39 would overflow it (a RuntimeError deep in torch), 1e-50 flush to 0.
            raise ValueError(f"new_scale must be representable in FP32 (2^-149 .. 3.40282e+38), got {value!r}")
        return torch.full((), value32, dtype=torch.float32, device=device)

    # ------------------------------------------------------------------------------------------------------
    # Checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The complete state: format name, version, config fields and state fields (plain Python). Syncs.

        Derived from the dataclass fields of the config and of :class:`~lossscale.scaling.PyScalingState`;
        safe for ``torch.load(weights_only=True)``. Empty when disabled (as GradScaler). Call it after
        ``update``.
        """
        if not self._enabled:
            return {}
        return {
            "format": _STATE_DICT_FORMAT,
            "version": STATE_DICT_VERSION,
            "config": config_to_dict(self._config),
            "state": dataclasses.asdict(self._py_state()),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, or from a ``torch.amp.GradScaler`` state dict (migration).

        A GradScaler dict sets the scale, growth tracker and the three factors; the hysteresis counter is
        refilled and the skip counters start at zero. Validates everything first: on a malformed dict it
        raises ValueError/TypeError/RuntimeError naming the problem and the scaler is left unchanged.
        A no-op when disabled. No sync (a host-to-device copy of the new state).
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
        self._config = config
        self._pending = pending
        if self._state is not None:
            self._state = state_from_py(pending, self._state.scale.device)

    def _parse_own(self, sd: Mapping[str, Any]) -> tuple[ScalingConfig, PyScalingState]:
        expected = {"format", "version", "config", "state"}
        if set(sd) != expected:
            raise ValueError(f"LossScaler state dict must have keys {sorted(expected)}, got {sorted(sd)}")
        if sd["format"] != _STATE_DICT_FORMAT:
            raise ValueError(f"state dict 'format' must be {_STATE_DICT_FORMAT!r}, got {sd['format']!r}")
        if sd["version"] != STATE_DICT_VERSION:
            raise ValueError(
                f"unsupported LossScaler state dict version {sd['version']!r} (this lossscale reads "
                f"version {STATE_DICT_VERSION})"
            )
        config = config_from_dict(dict(sd["config"]) if isinstance(sd["config"], Mapping) else sd["config"])
        if config_kind(config) == "none":
            raise ValueError("state dict describes NoScaling (a disabled scaler); this scaler is enabled")
        raw = sd["state"]
        if not isinstance(raw, Mapping):
            raise TypeError(f"state dict 'state' must be a dict, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(PyScalingState)}
        if set(raw) != names:
            raise ValueError(f"state dict 'state' must have keys {sorted(names)}, got {sorted(raw)}")
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
        return config, pending

    def _parse_torch(self, sd: Mapping[str, Any]) -> tuple[ScalingConfig, PyScalingState]:
        if set(sd) != _TORCH_KEYS:
            raise ValueError(
                "not a LossScaler state dict (no 'version') nor a torch.amp.GradScaler one: expected keys "
                f"{sorted(_TORCH_KEYS)}, got {sorted(sd)}"
            )
        current = self._config
        if config_kind(current) != "dynamic":
            raise ValueError("a torch.amp.GradScaler state dict describes dynamic scaling; this LossScaler is static")
        assert isinstance(current, DynamicScaling)
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
        pending = PyScalingState(
            scale=float(scale),
            # torch never grows once its tracker passes the interval (it tests ==); we grow at the next
            # finite step instead, and keep the invariant tracker < interval.
            growth_tracker=min(tracker, config.growth_interval - 1) if tracker >= 0 else tracker,
            hysteresis_tracker=config.hysteresis - 1,
        )
        return config, pending

    def __getstate__(self) -> dict[str, Any]:
        if self._records:
            raise RuntimeError("A LossScaler may only be pickled at the start of an iteration or after update().")
        state = self.__dict__.copy()
        if self._enabled:
            state["_pending"] = self._py_state()
            state["_state"] = None
        state["_process_group"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"LossScaler({self._config!r}, enabled={self._enabled})"
