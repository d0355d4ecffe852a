"""``accelerate`` with lossscale: :class:`Accelerator`, an ``accelerate.Accelerator`` taking ``precision=``.

What plain accelerate does on CPU: ``Accelerator(mixed_precision="fp16", cpu=True)`` sets no autocast and no
scaler, so the run is FP32 without a word; and a scaler injected as ``accelerator.scaler`` is never used by
``unscale_gradients`` (which acts only for accelerate's own native FP16), so ``clip_grad_norm_`` clips the
still-scaled gradients. This subclass runs the recipe through :func:`lossscale.autocast` (native where the
hardware has it, emulated elsewhere) and routes every scaler call through a :class:`lossscale.LossScaler`:

    forward        model.forward wrapped in lossscale.autocast at prepare() (as accelerate wraps
                   torch.autocast); ``accelerator.autocast()`` enters the same context
    backward       scaler.scale(loss / gradient_accumulation_steps).backward()    (accelerate's own code)
    clip_grad_*    scaler.unscale_(optimizer) first, then clip: the returned norm is the true norm
    step           AcceleratedOptimizer: scaler.step + scaler.update; ``step_was_skipped`` says whether the
                   step was skipped (accelerate detects the skip by whether optimizer.step ran)
    save/load      save_state/load_state write and read the scaler's state_dict (accelerate's own code)

Requires ``pip install 'lossscale[accelerate]'``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..emulate import autocast
from ..precision import Precision
from ..scaler import LossScaler
from ._common import (
    ScalerSpec,
    autocast_forward,
    import_framework,
    recipe_context,
    resolve_precision,
    resolve_scaler,
    scaler_metrics,
)

_AcceleratorBase: Any = import_framework("accelerate", "accelerate").Accelerator
_AcceleratedOptimizer: Any = import_framework("accelerate.optimizer", "accelerate").AcceleratedOptimizer
_convert_outputs_to_fp32: Any = import_framework("accelerate.utils", "accelerate").convert_outputs_to_fp32

__all__ = ["Accelerator", "unwrap_optimizer"]

_WRAPPED_FLAG = "_lossscale_autocast_recipe"


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrappers (by type). No sync."""
    while isinstance(optimizer, _AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer or an AcceleratedOptimizer, got {type(optimizer).__name__}")
    return optimizer


class _ScaledOptimizer(_AcceleratedOptimizer):  # type: ignore[misc]
    """accelerate's ``AcceleratedOptimizer`` whose ``step_was_skipped`` is also right for optimizers that skip
    inside their own step (``_step_supports_amp_scaling``, e.g. ``AdamW(fused=True)``, the HF Trainer's
    default): accelerate infers a skip from ``optimizer.step`` not having been called, but those optimizers
    are always called, with ``found_inf``. For them the scaler's own count decides (one sync per step)."""

    def step(self, closure: Any = None) -> None:
        super().step(closure)
        scaler = self.scaler
        if (
            scaler is not None
            and scaler.is_enabled()
            and self.gradient_state.sync_gradients
            and getattr(self.optimizer, "_step_supports_amp_scaling", False)
        ):
            # After update(): consecutive_skips > 0 exactly when this iteration's step was skipped.
            self._is_overflow = scaler.consecutive_skips > 0


class Accelerator(_AcceleratorBase):  # type: ignore[misc]
    """An ``accelerate.Accelerator`` that trains in a lossscale recipe with a :class:`LossScaler`.

    Args:
        precision: a :class:`lossscale.Precision` or preset name: ``"fp32"``, ``"bf16-mixed"``,
            ``"fp16-mixed"``, ``"fp8-hybrid"``, a custom ``"compute=e5m2,..."`` recipe (FP32 master weights).
            Default ``"fp32"``.
        scaler: None (default): a ``LossScaler()`` for recipes whose gradient format is narrower than BF16
            (FP16, FP8), none for BF16/FP32; a :class:`LossScaler` with your options; False: none.
        emulate: passed to :func:`lossscale.autocast`: None (native on CUDA for bf16/fp16, emulated
            elsewhere), True (always emulate), False (native only; ValueError where impossible).
        *args, **kwargs: ``accelerate.Accelerator`` arguments; ``mixed_precision`` must be left unset or
            ``"no"`` (``precision=`` replaces it).

    Example:
        >>> import torch
        >>> from lossscale.integrations.accelerate import Accelerator
        >>> acc = Accelerator(precision="fp16-mixed", cpu=True)
        >>> model, opt = acc.prepare(torch.nn.Linear(4, 1), torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]))
        >>> acc.scaler.get_scale()
        65536.0
    """

    def __init__(
        self,
        *args: Any,
        precision: Precision | str = "fp32",
        scaler: ScalerSpec = None,
        emulate: bool | None = None,
        **kwargs: Any,
    ) -> None:
        recipe = resolve_precision(precision)
        if emulate is not None and not isinstance(emulate, bool):
            raise TypeError(f"emulate must be a bool or None, got {type(emulate).__name__}")
        chosen = resolve_scaler(recipe, scaler)
        mixed = kwargs.pop("mixed_precision", None)
        if mixed not in (None, "no"):
            raise ValueError(
                f"mixed_precision={mixed!r}: pass precision= instead (e.g. precision='fp16-mixed'); "
                "lossscale's Accelerator runs the recipe itself"
            )
        # accelerate reads ACCELERATE_MIXED_PRECISION when mixed_precision is None: pin "no" so that it never
        # adds its own autocast or GradScaler on top of ours.
        super().__init__(*args, mixed_precision="no", **kwargs)
        if self.distributed_type.value in ("DEEPSPEED", "MEGATRON_LM"):
            raise ValueError(
                f"lossscale's Accelerator does not support {self.distributed_type.value}: it scales the loss "
                "itself"
            )
        self.precision = recipe
        self.emulate = emulate
        # accelerate's backward(), AcceleratedOptimizer.step and save_state/load_state use self.scaler.
        self.scaler = chosen

    # -- forward -------------------------------------------------------------------------------------------
    def prepare_model(
        self, model: torch.nn.Module, device_placement: bool | None = None, evaluation_mode: bool = False
    ) -> Any:
        """accelerate's ``prepare_model``, with ``model.forward`` run under :func:`lossscale.autocast` (as
        accelerate wraps ``torch.autocast`` for its native mixed precision); outputs are returned in FP32.
        No sync."""
        if not self.precision.is_fp32 and getattr(model, _WRAPPED_FLAG, None) is None:
            forward = autocast_forward(model.forward, self.precision, self.emulate)
            setattr(model, "forward", _convert_outputs_to_fp32(forward))  # noqa: B010 (an instance attribute)
            setattr(model, _WRAPPED_FLAG, self.precision.name)
        return super().prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    @contextlib.contextmanager
    def autocast(self, autocast_handler: Any = None) -> Iterator[None]:
        """The recipe's :func:`lossscale.autocast`; an ``AutocastKwargs(enabled=False)`` handler runs FP32
        inside (accelerate's way to leave autocast for a block), also inside a prepared model's forward or
        another ``autocast()`` block: it enters ``lossscale.autocast("fp32")``, which switches the enclosing
        recipe off for the block. No sync."""
        if autocast_handler is not None and not getattr(autocast_handler, "enabled", True):
            with autocast(Precision(), emulate=self.emulate):
                yield
            return
        with recipe_context(self.precision, self.emulate):
            yield

    # -- optimizer and scaler ------------------------------------------------------------------------------
    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, device_placement: bool | None = None) -> Any:
        """Wrap ``optimizer`` as accelerate does (an ``AcceleratedOptimizer`` that calls ``scaler.step`` and
        ``scaler.update``), with ``step_was_skipped`` right for fused optimizers too. No sync."""
        if getattr(optimizer, "_is_accelerate_prepared", False) or isinstance(optimizer, _AcceleratedOptimizer):
            if optimizer not in self._optimizers:
                self._optimizers.append(optimizer)
            return optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if device_placement is None:
            device_placement = self.device_placement
        wrapped = _ScaledOptimizer(optimizer, device_placement=device_placement, scaler=self.scaler)
        self._optimizers.append(wrapped)
        return wrapped

    def unscale_gradients(self, optimizer: Any = None) -> None:
        """Unscale the gradients of ``optimizer`` (default: every prepared optimizer) with the scaler. A no-op
        without a scaler. Call at most once per step (``clip_grad_norm_`` calls it). No sync."""
        if self.scaler is None or not self.scaler.is_enabled():
            return
        if optimizer is None:
            optimizers = list(self._optimizers)
        elif isinstance(optimizer, (tuple, list)):
            optimizers = list(optimizer)
        else:
            optimizers = [optimizer]
        for opt in optimizers:
            self.scaler.unscale_(unwrap_optimizer(opt))

    def load_state(self, *args: Any, **kwargs: Any) -> Any:
        """accelerate's ``load_state`` (models, optimizers, RNG and ``scaler.pt`` into the scaler).

        Under FSDP2 accelerate calls the GradScaler-private ``_lazy_init_scale_growth_tracker`` on the scaler;
        a scaler without it raises NotImplementedError here rather than AttributeError deep inside.
        """
        if (
            self.scaler is not None
            and getattr(self, "is_fsdp2", False)
            and not hasattr(self.scaler, "_lazy_init_scale_growth_tracker")
        ):
            raise NotImplementedError(
                "load_state under FSDP2 needs a scaler with torch.amp.GradScaler's _lazy_init_scale_growth_tracker, "
                "which this LossScaler does not have"
            )
        return super().load_state(*args, **kwargs)

    def scaler_metrics(self) -> dict[str, torch.Tensor]:
        """``{"loss_scale", "skipped_steps"}`` as 0-d device tensors (no sync); empty without a scaler."""
        scaler: LossScaler | None = self.scaler
        return scaler_metrics(scaler)
