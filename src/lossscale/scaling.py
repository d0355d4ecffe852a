"""Loss-scaling rules as data: frozen configs, a state, and a pure update function.

The rule (dynamic scaling, as in torch.amp.GradScaler, with Megatron-LM/DeepSpeed hysteresis and clamps)::

    found = any gradient of this iteration was inf or NaN
    if found:                                   # the optimizer step was skipped
        growth_tracker = 0
        if hysteresis_tracker <= 0:             # no overflow left to tolerate: back off
            scale = max(fp32(scale * backoff_factor), min_scale)   # (never above the old scale)
        hysteresis_tracker = max(hysteresis_tracker - 1, 0)
        consecutive_skips += 1;  skipped_steps += 1
    else:
        growth_tracker += 1
        if consecutive_hysteresis: hysteresis_tracker = hysteresis - 1
        if growth_tracker >= growth_interval:
            grown = fp32(scale * growth_factor)
            if isfinite(grown): scale = min(grown, max_scale)     # (never below the old scale);
                                                                  # growth refused at FP32 overflow (torch)
            growth_tracker = 0;  hysteresis_tracker = hysteresis - 1
        consecutive_skips = 0
    scale = max(scale, SCALE_FLOOR)             # 2^-127: the smallest power of two whose reciprocal is
                                                # finite in FP32 (torch has no floor: its scale reaches 0)
    steps += 1

``hysteresis_tracker`` counts the overflows still tolerated before a backoff (it starts at
``hysteresis - 1``). This is Megatron-LM's counter minus one: Megatron decrements first and backs off when
the result is <= 0; so with ``hysteresis=2`` the first overflow is tolerated and every further one backs off
until a growth refills the counter. With ``hysteresis=1`` the counter stays 0 and every overflow backs off.

There is one tensor form of this rule, :func:`update_scale`: it works on tensors (:class:`ScalingState`) on
the gradients' device, without a host sync, and is what :class:`lossscale.LossScaler` and
:class:`lossscale.LayerwiseScaler` run every step. With the defaults (``hysteresis=1``, no clamps) the rule
is exactly ``torch._amp_update_scale_`` followed by the floor, and :func:`update_scale` then calls that
kernel (through :mod:`lossscale._compat`) as a shortcut: one op instead of about twenty small ones
(``benchmarks/scaler_overhead.py`` prints the difference; the tests check that both give the same bits).
``growth_tracker`` always stays below ``growth_interval``, so torch's ``==`` test and the ``>=`` above
agree, and the floor changes nothing until torch's rule would first take the scale below 2^-127 (there
torch's ``1/scale`` overflows FP32, unscaling turns finite gradients into inf/NaN and the weights follow).
Products are formed in FP64 and rounded once to FP32, as torch's CPU kernel does (a float times a double
in C++), so that non-power-of-two factors give the same bits. :class:`PyScalingState` is the state in
Python numbers: the form in which it is checkpointed.

Sources: torch ``aten/src/ATen/native/cpu/AmpGradScalerKernels.cpp`` semantics (growth only if finite);
hysteresis from Megatron-LM ``DynamicGradScaler`` and DeepSpeed ``DynamicLossScaler``
(``consecutive_hysteresis``); the scale floor asked for in pytorch#99640; a budget of consecutive skips from
optax ``apply_if_finite(max_consecutive_errors)`` and gpt-neox#291.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np
import torch

from . import _compat
from ._compat import KernelImpl

__all__ = [
    "DynamicScaling",
    "NoScaling",
    "PyScalingState",
    "SCALE_FLOOR",
    "ScalingConfig",
    "ScalingState",
    "StaticScaling",
    "config_from_dict",
    "config_kind",
    "config_to_dict",
    "init_state",
    "init_state_py",
    "state_from_py",
    "state_to_py",
    "update_scale",
]

_FP32_MAX = float(np.finfo(np.float32).max)
SCALE_FLOOR = 2.0**-127
"""The smallest power of two whose FP32 reciprocal is finite (1/2^-128 = 2^128 overflows FP32).

The dynamic rule never takes the scale below it; a scale below it (set by hand or loaded) makes every step a
counted skip, since unscaling would multiply finite gradients by inf."""
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


def _fp32(x: float) -> float:
    """Round a Python float (FP64) to the nearest FP32 value, overflowing to inf like a C++ cast."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def _fp32_scale(name: str, value: float, *, zero_ok: bool = False) -> float:
    """``value`` (finite, >= 0) rounded to the FP32 value a scale tensor will hold; ValueError naming ``name``
    when FP32 cannot hold it: a value that overflows to inf (torch would raise deep inside ``torch.full``) or
    a positive one that flushes to 0 (``zero_ok`` admits an exact 0)."""
    v32 = _fp32(value)
    if math.isfinite(v32) and (v32 > 0.0 or (zero_ok and value == 0.0)):
        return v32
    low = "0 or 2^-149" if zero_ok else "2^-149"
    raise ValueError(f"{name} must be representable in FP32 ({low} .. {_FP32_MAX:.6g}), got {value!r}")


def _check_scale_value(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        allowed = "a positive finite float or None" if optional else "a positive finite float"
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    _fp32_scale(name, v)


def _check_int(name: str, value: object, minimum: int, maximum: int = _INT64_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value > maximum:
        # The counters live in int32/int64 tensors: a larger value cannot be held (torch would raise deep
        # inside a kernel, or wrap around).
        raise ValueError(f"{name} must be an int <= {maximum} (it is held in a fixed-width tensor), got {value!r}")


def _check_skips(value: object) -> None:
    if value is not None:
        _check_int("max_consecutive_skips", value, 1)


@dataclasses.dataclass(frozen=True)
class DynamicScaling:
    """Dynamic loss scaling (torch.amp.GradScaler's rule plus hysteresis, clamps and a skip budget).

    Args:
        init_scale: the first scale, default 2^16 (torch).
        growth_factor: multiply the scale by this after ``growth_interval`` finite steps; >= 1 (1 freezes
            growth, as ``GradScaler.set_growth_factor(1.0)`` does). Default 2.
        backoff_factor: multiply the scale by this on a non-finite step; in (0, 1] (1 freezes backoff).
            Default 0.5.
        growth_interval: finite steps between growths; int in [1, 2^63 - 1]. Default 2000.
        hysteresis: int in [1, 2^31]; ``hysteresis - 1`` overflows are tolerated (no backoff) after each growth;
            1 (the default) backs off on every overflow, as torch does; Megatron-LM and DeepSpeed use 2.
        consecutive_hysteresis: refill the hysteresis counter on every finite step (DeepSpeed's option)
            instead of only when the scale grows.
        min_scale: floor for the scale after a backoff, or None.
        max_scale: ceiling for the scale after a growth, or None.
        max_consecutive_skips: budget of consecutive skipped steps, or None (no budget). The scaler's
            ``step()`` raises on the skip that exceeds the budget.

    Example:
        >>> DynamicScaling(init_scale=1024.0, hysteresis=2).growth_interval
        2000
        >>> DynamicScaling(growth_factor=0.5)
        Traceback (most recent call last):
        ...
        ValueError: growth_factor must be >= 1 and finite, got 0.5
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    hysteresis: int = 1
    consecutive_hysteresis: bool = False
    min_scale: float | None = None
    max_scale: float | None = None
    max_consecutive_skips: int | None = None

    def __post_init__(self) -> None:
        _check_scale_value("init_scale", self.init_scale)
        for name in ("growth_factor", "backoff_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(v).__name__} {v!r}")
        # 1.0 is a frozen scale (GradScaler accepts it through its setters and checkpoints); below 1 "growth"
        # would shrink the scale, above 1 "backoff" would grow it: refused as meaningless.
        if not (math.isfinite(self.growth_factor) and self.growth_factor >= 1.0):
            raise ValueError(f"growth_factor must be >= 1 and finite, got {self.growth_factor!r}")
        if not (0.0 < self.backoff_factor <= 1.0):
            raise ValueError(f"backoff_factor must be in the interval (0, 1], got {self.backoff_factor!r}")
        _check_int("growth_interval", self.growth_interval, 1)
        # hysteresis - 1 is held in an int32 tensor.
        _check_int("hysteresis", self.hysteresis, 1, _INT32_MAX + 1)
        if not isinstance(self.consecutive_hysteresis, bool):
            raise TypeError(f"consecutive_hysteresis must be a bool, got {type(self.consecutive_hysteresis).__name__}")
        _check_scale_value("min_scale", self.min_scale, optional=True)
        _check_scale_value("max_scale", self.max_scale, optional=True)
        lo = self.min_scale if self.min_scale is not None else 0.0
        hi = self.max_scale if self.max_scale is not None else math.inf
        if lo > hi:
            raise ValueError(f"min_scale ({self.min_scale!r}) must be <= max_scale ({self.max_scale!r})")
        if not (lo <= self.init_scale <= hi):
            raise ValueError(
                f"init_scale ({self.init_scale!r}) must lie in [min_scale, max_scale] = "
                f"[{self.min_scale!r}, {self.max_scale!r}]"
            )
        _check_skips(self.max_consecutive_skips)

    @property
    def is_torch_rule(self) -> bool:
        """True when the rule is exactly torch.amp.GradScaler's (no hysteresis, no clamps)."""
        return self.hysteresis == 1 and self.min_scale is None and self.max_scale is None


@dataclasses.dataclass(frozen=True)
class StaticScaling:
    """A constant loss scale; non-finite steps are still skipped and counted.

    Args:
        init_scale: the scale, default 1.0 (only the non-finite check, e.g. for BF16 training).
        max_consecutive_skips: as in :class:`DynamicScaling`.

    Example:
        >>> StaticScaling(128.0).init_scale
        128.0
    """

    init_scale: float = 1.0
    max_consecutive_skips: int | None = None

    def __post_init__(self) -> None:
        _check_scale_value("init_scale", self.init_scale)
        _check_skips(self.max_consecutive_skips)


@dataclasses.dataclass(frozen=True)
class NoScaling:
    """No loss scaling and no non-finite check: a :class:`lossscale.LossScaler` built from it is disabled."""

    @property
    def init_scale(self) -> float:
        return 1.0

    @property
    def max_consecutive_skips(self) -> None:
        return None


ScalingConfig = DynamicScaling | StaticScaling | NoScaling
_KINDS: dict[str, type[DynamicScaling | StaticScaling | NoScaling]] = {
    "dynamic": DynamicScaling,
    "static": StaticScaling,
    "none": NoScaling,
}


def config_kind(config: ScalingConfig) -> Literal["dynamic", "static", "none"]:
    """The name of a config's kind: ``"dynamic"``, ``"static"`` or ``"none"``."""
    if isinstance(config, DynamicScaling):
        return "dynamic"
    if isinstance(config, StaticScaling):
        return "static"
    if isinstance(config, NoScaling):
        return "none"
    raise TypeError(f"config must be DynamicScaling, StaticScaling or NoScaling, got {type(config).__name__}")


def config_to_dict(config: ScalingConfig) -> dict[str, Any]:
    """The config's fields (derived with :func:`dataclasses.fields`) plus its ``kind``."""
    out: dict[str, Any] = {"kind": config_kind(config)}
    for f in dataclasses.fields(config):
        out[f.name] = getattr(config, f.name)
    return out


def config_from_dict(data: dict[str, Any]) -> ScalingConfig:
    """Inverse of :func:`config_to_dict`; raises ValueError/TypeError naming a bad or missing field."""
    if not isinstance(data, dict):
        raise TypeError(f"scaling config must be a dict, got {type(data).__name__}")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in _KINDS:  # (a list would raise "unhashable" from the lookup)
        raise ValueError(f"scaling config 'kind' must be one of {sorted(_KINDS)}, got {kind!r}")
    cls = _KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names - {"kind"}
    if unknown:
        raise ValueError(f"unknown field(s) for {cls.__name__}: {sorted(unknown)}")
    missing = names - set(data)
    if missing:
        raise ValueError(f"missing field(s) for {cls.__name__}: {sorted(missing)}")
    return cls(**{n: data[n] for n in names})


# ----------------------------------------------------------------------------------------------------------
# State


@dataclasses.dataclass(frozen=True)
class ScalingState:
    """The scaler's state as 0-d tensors on the gradients' device (read them only when logging: it syncs).

    Fields: ``scale`` (float32), ``growth_tracker`` (int32, consecutive finite steps since the last growth or
    overflow), ``hysteresis_tracker`` (int32, overflows still tolerated before a backoff), ``consecutive_skips``
    (int32), ``skipped_steps`` (int64, total), ``steps`` (int64, number of updates).
    """

    scale: torch.Tensor
    growth_tracker: torch.Tensor
    hysteresis_tracker: torch.Tensor
    consecutive_skips: torch.Tensor
    skipped_steps: torch.Tensor
    steps: torch.Tensor


@dataclasses.dataclass(frozen=True)
class PyScalingState:
    """The plain-Python twin of :class:`ScalingState` (``scale`` holds an FP32 value in a Python float)."""

    scale: float
    growth_tracker: int = 0
    hysteresis_tracker: int = 0
    consecutive_skips: int = 0
    skipped_steps: int = 0
    steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"scale must be a float, got {type(self.scale).__name__} {self.scale!r}")
        # A long run of overflows may drive the scale to 0 (torch lets it); that state must stay readable.
        if not (math.isfinite(self.scale) and self.scale >= 0.0):
            raise ValueError(f"scale must be finite and >= 0, got {self.scale!r}")
        _fp32_scale("scale", float(self.scale), zero_ok=True)  # it is materialised as an FP32 tensor
        for f in dataclasses.fields(self):
            if f.name != "scale":
                dtype = _STATE_DTYPES[f.name]
                _check_int(f.name, getattr(self, f.name), 0, _INT32_MAX if dtype == torch.int32 else _INT64_MAX)


_STATE_DTYPES: dict[str, torch.dtype] = {
    "scale": torch.float32,
    "growth_tracker": torch.int32,
    "hysteresis_tracker": torch.int32,
    "consecutive_skips": torch.int32,
    "skipped_steps": torch.int64,
    "steps": torch.int64,
}


def _tolerance(config: ScalingConfig) -> int:
    """Overflows tolerated after a refill: ``hysteresis - 1`` (0 for static scaling)."""
    return config.hysteresis - 1 if isinstance(config, DynamicScaling) else 0


def init_state_py(config: ScalingConfig) -> PyScalingState:
    """The state before the first step: ``scale = fp32(init_scale)``, counters zero, hysteresis full."""
    return PyScalingState(scale=_fp32(config.init_scale), hysteresis_tracker=_tolerance(config))


def state_from_py(state: PyScalingState, device: torch.device | str | None = None) -> ScalingState:
    """Materialise a :class:`PyScalingState` as tensors on ``device`` (no sync: a host-to-device copy)."""
    return ScalingState(
        **{
            f.name: torch.full((), getattr(state, f.name), dtype=_STATE_DTYPES[f.name], device=device)
            for f in dataclasses.fields(ScalingState)
        }
    )


def state_to_py(state: ScalingState) -> PyScalingState:
    """Read a :class:`ScalingState` back to Python numbers. Syncs (one device-to-host copy)."""
    values = [getattr(state, f.name) for f in dataclasses.fields(ScalingState)]
    # One copy: stack in float64, which holds every int32 and every int64 count below 2^53 exactly.
    host = torch.stack([v.to(torch.float64) for v in values]).tolist()
    kw: dict[str, Any] = {}
    for f, v in zip(dataclasses.fields(ScalingState), host, strict=True):
        kw[f.name] = float(v) if f.name == "scale" else int(v)
    return PyScalingState(**kw)


def init_state(config: ScalingConfig, device: torch.device | str | None = None) -> ScalingState:
    """The initial :class:`ScalingState` for ``config`` on ``device``."""
    return state_from_py(init_state_py(config), device)


def update_scale(
    state: ScalingState, found_inf: torch.Tensor, config: ScalingConfig, *, impl: KernelImpl = "auto"
) -> ScalingState:
    """One step of the scaling rule on tensors. Pure (returns a new state) and free of host syncs.

    Args:
        state: the state before this step.
        found_inf: a 0-d tensor, > 0 when a gradient of this step was inf or NaN (torch sums one flag per
            optimizer, so any positive value counts).
        config: the rule.
        impl: ``"auto"`` runs torch's fused update kernel for torch's rule (hysteresis 1, no clamps) when this
            torch has it, and the tensor formula of the rule otherwise; ``"fallback"`` always runs the tensor
            formula; ``"fused"`` requires torch's rule and the kernel. All give the same bits.

    Example:
        >>> cfg = DynamicScaling(init_scale=8.0, growth_interval=2)
        >>> s = init_state(cfg)
        >>> for bad in [0.0, 0.0, 1.0, 0.0]:
        ...     s = update_scale(s, torch.tensor(bad), cfg)
        >>> float(s.scale), int(s.growth_tracker), int(s.skipped_steps)
        (8.0, 1, 1)
    """
    if impl not in ("auto", "fused", "fallback"):
        raise ValueError(f"impl must be one of ('auto', 'fused', 'fallback'), got {impl!r}")
    if found_inf.device != state.scale.device or found_inf.dtype != torch.float32:
        found_inf = found_inf.to(state.scale.device, torch.float32, non_blocking=True)
    found = found_inf > 0
    # Accounting: 4 small ops, shared by every rule (bool * int32 stays int32; int64 + bool stays int64).
    consecutive = (state.consecutive_skips + 1) * found
    skipped = state.skipped_steps + found
    steps = state.steps + 1
    if not isinstance(config, DynamicScaling):
        # Static (or no) scaling: the scale never moves; only the accounting does.
        return dataclasses.replace(state, consecutive_skips=consecutive, skipped_steps=skipped, steps=steps)

    if impl == "fused":
        if not config.is_torch_rule:
            raise ValueError("update_scale(impl='fused') needs torch's rule: hysteresis=1 and no min/max clamps")
        if not _compat.update_scale_available():
            raise RuntimeError("update_scale(impl='fused') needs torch._amp_update_scale_, which this torch lacks")
    if impl == "fused" or (impl == "auto" and config.is_torch_rule and _compat.update_scale_available()):
        # torch's kernel on copies (the function stays pure). hysteresis_tracker stays 0 under this rule.
        # One op instead of the ~20 of _dynamic_rule: about 3x faster per update on CPU (36 us against
        # 100-164 us, benchmarks/scaler_overhead.py), 15-25% of the scaler's whole step at 1M parameters.
        scale = state.scale.clone()
        growth_tracker = state.growth_tracker.clone()
        _compat.update_scale_(
            scale, growth_tracker, found_inf, config.growth_factor, config.backoff_factor, config.growth_interval
        )
        hysteresis = state.hysteresis_tracker
    else:
        scale, growth_tracker, hysteresis = _dynamic_rule(state, found, config)
    return ScalingState(
        scale=scale.clamp_(min=SCALE_FLOOR),  # the floor (module docstring), in place on our new tensor
        growth_tracker=growth_tracker,
        hysteresis_tracker=hysteresis,
        consecutive_skips=consecutive,
        skipped_steps=skipped,
        steps=steps,
    )


def _dynamic_rule(
    state: ScalingState, found: torch.Tensor, config: DynamicScaling
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensor form of the dynamic rule (module docstring) before the floor: the new scale (a new tensor),
    growth tracker and hysteresis tracker."""
    not_found = ~found
    tracker = state.growth_tracker + 1
    grow = not_found & (tracker >= config.growth_interval)
    # Products in FP64, rounded once to FP32, as torch's kernel (float * double in C++).
    scale64 = state.scale.to(torch.float64)
    backoff = found & (state.hysteresis_tracker <= 0)
    backed = (scale64 * config.backoff_factor).to(torch.float32)
    if config.min_scale is not None:
        # The floor never raises a scale that already sits below it (set by update(new_scale) or loaded).
        backed = torch.minimum(torch.clamp(backed, min=_fp32(config.min_scale)), state.scale)
    grown = (scale64 * config.growth_factor).to(torch.float32)
    # Growth is refused when the result overflows FP32 (torch), and the scale stays put.
    grow_ok = grow & torch.isfinite(grown)
    if config.max_scale is not None:
        # Likewise the ceiling never lowers a scale above it.
        grown = torch.maximum(torch.clamp(grown, max=_fp32(config.max_scale)), state.scale)
    scale = torch.where(backoff, backed, torch.where(grow_ok, grown, state.scale))

    growth_tracker = torch.where(found | grow, torch.zeros_like(tracker), tracker)
    hyst_down = torch.clamp(state.hysteresis_tracker - 1, min=0)
    refill = grow | not_found if config.consecutive_hysteresis else grow
    full = torch.full_like(hyst_down, config.hysteresis - 1)
    hysteresis = torch.where(found, hyst_down, torch.where(refill, full, state.hysteresis_tracker))
    return scale, growth_tracker, hysteresis
