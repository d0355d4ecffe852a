"""What the three integrations share: resolving the recipe, the scaler and the monitor options.

Framework-free (only lossscale and torch), so that it is tested and type-checked without the frameworks.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

import torch

from ..emulate import autocast
from ..formats import FP32, FloatFormat
from ..monitor import GradientMonitor, MonitorStats
from ..precision import Precision
from ..scaler import LossScaler

__all__ = [
    "MonitorSpec",
    "ScalerSpec",
    "autocast_forward",
    "import_framework",
    "make_monitor",
    "monitor_summary",
    "needs_loss_scaling",
    "resolve_precision",
    "resolve_scaler",
    "scaler_metrics",
]

ScalerSpec = LossScaler | bool | None
MonitorSpec = GradientMonitor | bool | str | Sequence[Any] | Mapping[str, Any] | None


def import_framework(module: str, extra: str) -> ModuleType:
    """Import a framework module, or raise ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"lossscale.integrations.{extra} needs the {module.split('.')[0]!r} package: "
            f"pip install 'lossscale[{extra}]'"
        ) from exc


def resolve_precision(precision: Precision | str) -> Precision:
    """The recipe from a :class:`Precision` or a preset name; rejects recipes the integrations cannot run.

    Low-precision stored weights ("pure" recipes) need :func:`lossscale.low_precision_weights` around the
    optimizer, which the frameworks' optimizer wrappers do not give us a place for: ValueError, not a
    silently FP32-weights run.
    """
    recipe = Precision.parse(precision)
    if recipe.weights != FP32:
        raise ValueError(
            f"precision={recipe.name!r}: recipes with low-precision stored weights (weights="
            f"{recipe.weights.name}) are not supported by the framework integrations; use a mixed recipe "
            "(FP32 master weights), e.g. 'bf16-mixed', 'fp16-mixed' or 'fp8-hybrid'"
        )
    return recipe


def needs_loss_scaling(recipe: Precision) -> bool:
    """Whether the recipe's gradient format has less range than FP32/BF16 (FP16, FP8 E5M2, ...).

    BF16 keeps FP32's 8 exponent bits, so gradients do not underflow it any more than FP32.
    """
    grad: FloatFormat = recipe.grad_format
    return grad != FP32 and grad.exponent_bits < 8


def resolve_scaler(recipe: Precision, scaler: ScalerSpec) -> LossScaler | None:
    """``None``: a default :class:`LossScaler` for recipes that need one (FP16, FP8), none otherwise;
    ``False``: no scaler; ``True``: a default scaler whatever the recipe; a :class:`LossScaler`: that one."""
    if scaler is None:
        return LossScaler() if needs_loss_scaling(recipe) else None
    if scaler is False:
        return None
    if scaler is True:
        return LossScaler()
    if isinstance(scaler, LossScaler):
        return scaler
    raise TypeError(
        f"scaler must be a lossscale.LossScaler, None (default for the recipe), True or False, "
        f"got {type(scaler).__name__}"
    )


def autocast_forward(
    forward: Callable[..., Any], recipe: Precision, emulate: bool | None
) -> Callable[..., Any]:
    """``forward`` run under :func:`lossscale.autocast` (the backward stays rounded after the context exits)."""

    @functools.wraps(forward)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with autocast(recipe, emulate=emulate):
            return forward(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def recipe_context(recipe: Precision, emulate: bool | None) -> Iterator[None]:
    """:func:`lossscale.autocast` for the recipe (nothing for FP32)."""
    if recipe.is_fp32:
        yield
        return
    with autocast(recipe, emulate=emulate):
        yield


def make_monitor(
    spec: MonitorSpec, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, scaler: LossScaler | None
) -> GradientMonitor | None:
    """A :class:`GradientMonitor` from the ``monitor=`` option.

    ``None``/``False``: none. ``True``: default formats, every 100 steps. A string or sequence: the formats.
    A mapping: :class:`GradientMonitor` keyword arguments. A :class:`GradientMonitor`: used as given.
    ``optimizer`` must be the torch optimizer itself (unwrapped from the framework's wrapper).
    """
    if spec is None or spec is False:
        return None
    if isinstance(spec, GradientMonitor):
        return spec
    kwargs: dict[str, Any]
    if spec is True:
        kwargs = {}
    elif isinstance(spec, (str, Sequence)):
        kwargs = {"formats": spec}
    elif isinstance(spec, Mapping):
        kwargs = dict(spec)
    else:
        raise TypeError(
            "monitor must be None, a bool, a format list (e.g. 'fp16,e5m2'), a dict of GradientMonitor "
            f"arguments or a GradientMonitor, got {type(spec).__name__}"
        )
    for key in ("optimizer", "scaler"):
        if key in kwargs:
            raise ValueError(f"monitor: {key!r} is supplied by the integration; do not pass it")
    return GradientMonitor(model, optimizer=optimizer, scaler=scaler, **kwargs)


def validate_monitor_spec(spec: MonitorSpec) -> None:
    """TypeError early (at construction) for a ``monitor=`` value :func:`make_monitor` would reject."""
    if spec is None or isinstance(spec, (bool, str, Sequence, Mapping, GradientMonitor)):
        return
    raise TypeError(
        "monitor must be None, a bool, a format list (e.g. 'fp16,e5m2'), a dict of GradientMonitor "
        f"arguments or a GradientMonitor, got {type(spec).__name__}"
    )


def monitor_summary(stats: MonitorStats, prefix: str = "grad_health") -> dict[str, float]:
    """Per-format fractions of the last sampled step, over every measured gradient element (weights and
    activations): ``{prefix}/{format}/underflow``, ``.../subnormal``, ``.../overflow``, plus
    ``{prefix}/nonfinite``. Empty before the first sampled step. Reads host data only (no sync)."""
    if stats.tables.shape[0] == 0:
        return {}
    cols = stats.columns
    last = stats.tables[-1]
    numel = float(last[:, cols.NUMEL].sum())
    if numel == 0.0:
        return {}
    out: dict[str, float] = {}
    for f, fmt in enumerate(stats.formats):
        out[f"{prefix}/{fmt.name}/underflow"] = float(last[:, cols.underflow(f)].sum()) / numel
        out[f"{prefix}/{fmt.name}/subnormal"] = float(last[:, cols.subnormal(f)].sum()) / numel
        out[f"{prefix}/{fmt.name}/overflow"] = float(last[:, cols.overflow(f)].sum()) / numel
    out[f"{prefix}/nonfinite"] = float(last[:, cols.INF].sum() + last[:, cols.NAN].sum()) / numel
    return out


def scaler_metrics(scaler: LossScaler | None) -> dict[str, torch.Tensor]:
    """The scale and the skipped-step count as 0-d device tensors (no sync); empty without a scaler."""
    if scaler is None or not scaler.is_enabled():
        return {}
    state = scaler.state
    return {"loss_scale": state.scale, "skipped_steps": state.skipped_steps.to(torch.float32)}
