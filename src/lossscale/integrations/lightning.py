"""Lightning with lossscale: :class:`LossScalePrecision`, a precision plugin for ``Trainer(plugins=[...])``.

What plain Lightning does on CPU: ``Trainer(precision="16-mixed")`` warns and trains in BF16 autocast
instead; ``MixedPrecision("16-mixed", "cpu", scaler=LossScaler())`` runs ``torch.autocast("cpu", float16)``
(torch's native CPU FP16 kernels, not what a GPU rounds); ``Trainer(precision="fp8-hybrid")`` or a
``lossscale.Precision`` is rejected. This plugin runs the recipe through :func:`lossscale.autocast` (native
on CUDA where possible, emulated elsewhere) with a :class:`lossscale.LossScaler`:

    training_step       under lossscale.autocast (the backward stays rounded after the step returns)
    backward            scaler.scale(loss).backward()
    optimizer step      closure (forward + backward), scaler.unscale_(optimizer), then Lightning's
                        on_before_optimizer_step hooks and ``gradient_clip_val`` clipping on the unscaled
                        gradients, then scaler.step(optimizer) and scaler.update()
    checkpoints         the scaler's state under the plugin's key (``"LossScalePrecision"``), restored by
                        ``Trainer.fit(ckpt_path=...)``
    logging             ``lossscale/loss_scale``, ``lossscale/skipped_steps``, ``lossscale/grad_norm`` (when
                        clipping by norm) and, with ``monitor=``, ``grad_health/<format>/...`` through
                        ``LightningModule.log``

Lightning steps LR schedulers whether or not the optimizer step was skipped (unlike the Hugging Face
Trainer); ``lossscale/skipped_steps`` shows how many were. Requires ``pip install 'lossscale[lightning]'``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from typing import Any

import torch

from ..monitor import GradientMonitor
from ..precision import Precision
from ..scaler import LossScaler
from ._common import (
    MonitorSpec,
    ScalerSpec,
    import_framework,
    make_monitor,
    monitor_summary,
    recipe_context,
    resolve_precision,
    resolve_scaler,
    scaler_metrics,
    validate_monitor_spec,
)

_pl: Any = import_framework("lightning.pytorch", "lightning")
_PrecisionBase: Any = import_framework("lightning.pytorch.plugins.precision", "lightning").Precision
_LightningOptimizer: Any = import_framework("lightning.pytorch.core.optimizer", "lightning").LightningOptimizer
_GradClip: Any = import_framework("lightning.pytorch.utilities", "lightning").GradClipAlgorithmType

__all__ = ["LossScalePrecision", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a ``LightningOptimizer`` (unwrapped by type). No sync."""
    while isinstance(optimizer, _LightningOptimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer or a LightningOptimizer, got {type(optimizer).__name__}")
    return optimizer


def _lightning_name(recipe: Precision) -> str:
    """The Lightning precision flag that describes the parameters and outputs Lightning sees (FP32 master
    weights, FP32 outputs under emulation): "bf16-mixed"/"16-mixed" for those presets, else "32-true"."""
    if recipe.name == "bf16-mixed":
        return "bf16-mixed"
    if recipe.name == "fp16-mixed":
        return "16-mixed"
    return "32-true"


class LossScalePrecision(_PrecisionBase):  # type: ignore[misc]
    """A Lightning precision plugin running a lossscale recipe with a :class:`LossScaler`.

    Args:
        precision: a :class:`lossscale.Precision` or preset name (``"bf16-mixed"`` (default),
            ``"fp16-mixed"``, ``"fp8-hybrid"``, Lightning's ``"16-mixed"``, a custom ``"compute=e5m2,..."``
            recipe with FP32 master weights).
        scaler: None (default: a ``LossScaler()`` for FP16/FP8 recipes, none for BF16/FP32), a
            :class:`LossScaler` with your options, or False.
        emulate: passed to :func:`lossscale.autocast` (None: native on CUDA where possible, else emulated).
        monitor: None, True (default formats, every 100 steps), a format list (``"fp16,e5m2"``), a dict of
            :class:`GradientMonitor` keywords, or a :class:`GradientMonitor`. Built at ``connect`` on the
            model and its (first) torch optimizer; its per-format summary is logged on sampled steps (one
            sync per sampled step); ``plugin.monitor.read()`` gives the full statistics after ``fit``.

    Attributes:
        recipe: the :class:`lossscale.Precision`; ``precision``: the Lightning flag string
            (``"16-mixed"``, ``"bf16-mixed"`` or ``"32-true"``); scaler; monitor (after ``connect``);
        grad_norm: the total norm of the unscaled gradients at the last norm clipping (a 0-d tensor), or None.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lossscale.integrations.lightning import LossScalePrecision
        >>> plugin = LossScalePrecision("fp16-mixed")
        >>> trainer = pl.Trainer(plugins=[plugin], accelerator="cpu", logger=False, enable_progress_bar=False)
        >>> plugin.scaler.get_scale()
        65536.0
    """

    def __init__(
        self,
        precision: Precision | str = "bf16-mixed",
        scaler: ScalerSpec = None,
        emulate: bool | None = None,
        monitor: MonitorSpec = None,
    ) -> None:
        super().__init__()
        if emulate is not None and not isinstance(emulate, bool):
            raise TypeError(f"emulate must be a bool or None, got {type(emulate).__name__}")
        validate_monitor_spec(monitor)
        self.recipe = resolve_precision(precision)
        self.precision = _lightning_name(self.recipe)
        self.scaler: LossScaler | None = resolve_scaler(self.recipe, scaler)
        self.emulate = emulate
        self._monitor_spec = monitor
        self.monitor: GradientMonitor | None = None
        self.grad_norm: torch.Tensor | None = None
        # Set by on_load_checkpoint: the checkpoint has no scaler state but this plugin scales (see there).
        self._missing_scaler_state = False

    # -- setup ---------------------------------------------------------------------------------------------
    def connect(self, model: torch.nn.Module, optimizers: list[Any], lr_schedulers: list[Any]) -> Any:
        """Lightning's hook after the optimizers exist: builds the monitor (a fresh one per ``fit``) on the
        model and the first torch optimizer (unwrapped from ``LightningOptimizer`` by type). No sync."""
        if isinstance(self._monitor_spec, GradientMonitor):
            self.monitor = self._monitor_spec
        elif self._monitor_spec is not None and self._monitor_spec is not False:
            opt = unwrap_optimizer(optimizers[0]) if optimizers else None
            self.monitor = make_monitor(self._monitor_spec, model, opt, self.scaler)
        return super().connect(model, optimizers, lr_schedulers)

    # -- forward -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """:func:`lossscale.autocast` for the recipe, around training/validation/test/predict steps."""
        with recipe_context(self.recipe, self.emulate):
            yield

    # -- backward and step ---------------------------------------------------------------------------------
    def pre_backward(self, tensor: torch.Tensor, module: Any) -> torch.Tensor:
        if self.scaler is not None:
            tensor = self.scaler.scale(tensor)
        result: torch.Tensor = super().pre_backward(tensor, module)
        return result

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """Closure, unscale, hooks and clipping, then the scaler's step and update (Lightning's AMP order).

        Syncs once per step (``scaler.step`` decides whether to step), plus one read of the monitor on its
        sampled steps.
        """
        if self._missing_scaler_state:
            raise ValueError(
                "LossScalePrecision: resuming training from a checkpoint that holds no loss-scaler state (no "
                f"{type(self).__qualname__!r} key: saved by a run without scaler, e.g. BF16/FP32 or scaler=False) "
                "but this plugin has a scaler: the run would not resume as it was. Resume with the recipe that "
                "saved it, or load only the weights (LightningModule.load_from_checkpoint) to start a new run"
            )
        if self.scaler is None or not self.scaler.is_enabled():
            out = super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
            self._after_step(model)
            return out
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("LossScalePrecision: loss scaling and the LBFGS optimizer (closure re-evaluation) "
                             "are not compatible")
        closure_result = closure()
        # Lightning's rule: a training_step returning None skips the step (automatic optimization).
        skip = closure_result is None and getattr(model, "automatic_optimization", True)
        torch_opt = unwrap_optimizer(optimizer)
        if not skip and not getattr(torch_opt, "_step_supports_amp_scaling", False):
            self.scaler.unscale_(torch_opt)  # before the hooks and clipping: they see the true gradients
        self._after_closure(model, optimizer)
        if skip:
            return closure_result
        out = self.scaler.step(torch_opt, **kwargs)
        self.scaler.update()
        self._after_step(model)
        return out

    def _after_step(self, model: Any) -> None:
        metrics: dict[str, Any] = {f"lossscale/{k}": v for k, v in scaler_metrics(self.scaler).items()}
        if self.grad_norm is not None:
            metrics["lossscale/grad_norm"] = self.grad_norm
        if self.monitor is not None:
            sampled = self.monitor.sampling
            self.monitor.step()
            if sampled:
                metrics.update(monitor_summary(self.monitor.read()))  # syncs, on sampled steps only
        log = getattr(model, "log", None)
        if metrics and callable(log) and getattr(model, "_current_fx_name", None) is not None:
            for name, value in metrics.items():
                log(name, value, on_step=True, on_epoch=False, batch_size=1)

    # -- clipping ------------------------------------------------------------------------------------------
    def clip_gradients(
        self, optimizer: Any, clip_val: int | float = 0.0, gradient_clip_algorithm: Any = None
    ) -> None:
        if gradient_clip_algorithm is None:
            gradient_clip_algorithm = _GradClip.NORM
        if clip_val > 0 and getattr(unwrap_optimizer(optimizer), "_step_supports_amp_scaling", False) and (
            self.scaler is not None and self.scaler.is_enabled()
        ):
            raise RuntimeError(
                f"{type(optimizer).__qualname__} unscales gradients inside its step (a fused optimizer), so its "
                "gradients are still scaled when clipped: use a non-fused optimizer to clip"
            )
        super().clip_gradients(optimizer, clip_val=clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        """Clip by total norm; keeps the norm (of the unscaled gradients) in :attr:`grad_norm`. No sync."""
        parameters = self.main_params(optimizer)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_val).detach()

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The scaler's :meth:`LossScaler.state_dict` (empty without a scaler). Syncs."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning's hook with the whole checkpoint (it calls :meth:`load_state_dict` only when the
        checkpoint has this plugin's key). A checkpoint without scaler state, loaded into a plugin with a
        scaler, is noted here and refused with ValueError at the first optimizer step: resuming training
        would not continue the run as it was, while validating or testing from it needs no scaler state."""
        super().on_load_checkpoint(checkpoint)
        self._missing_scaler_state = (
            self.scaler is not None and self.scaler.is_enabled() and type(self).__qualname__ not in checkpoint
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the scaler. A scaler state in a checkpoint of a run without scaler raises ValueError (the
        run would not resume as it was); so does an empty state here. The reverse, a checkpoint without scaler
        state resumed with a scaler, is caught by :meth:`on_load_checkpoint` (Lightning does not call this
        method then)."""
        if self.scaler is None or not self.scaler.is_enabled():
            if state_dict:
                raise ValueError("LossScalePrecision: the checkpoint holds a loss-scaler state but this plugin has "
                                 "no scaler (scaler=False or a BF16/FP32 recipe)")
            return
        if not state_dict:
            raise ValueError("LossScalePrecision: the checkpoint holds no loss-scaler state but this plugin has a "
                             "scaler")
        self.scaler.load_state_dict(state_dict)

    def teardown(self) -> None:
        """Remove the hooks of a monitor built by the plugin; ``plugin.monitor.read()`` still works after fit."""
        if self.monitor is not None and not isinstance(self._monitor_spec, GradientMonitor):
            self.monitor.remove()
        self._missing_scaler_state = False  # per run: a later fit without ckpt_path starts clean
        super().teardown()

    def __repr__(self) -> str:
        return f"LossScalePrecision({self.recipe.name!r}, scaler={self.scaler!r}, emulate={self.emulate!r})"
