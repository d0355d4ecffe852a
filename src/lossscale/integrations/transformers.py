"""The Hugging Face ``Trainer`` with lossscale: :class:`LossScaleTrainer` and :class:`GradientMonitorCallback`.

What the plain Trainer does on CPU: ``TrainingArguments(fp16=True, use_cpu=True)`` trains in FP32 without a
word (accelerate sets no autocast and no scaler on CPU), and a scaler injected into its accelerator is not
unscaled before ``max_grad_norm`` clipping, so the logged ``grad_norm`` is the scaled one. The Trainer
delegates autocast, backward, clipping, the optimizer step and the scaler checkpoint to its ``accelerator``;
:class:`LossScaleTrainer` gives it a :class:`lossscale.integrations.accelerate.Accelerator`, so that:

    forward      the model's forward runs under lossscale.autocast (native where the hardware has it)
    backward     scaler.scale(loss).backward()
    clipping     max_grad_norm acts on unscaled gradients; the logged ``grad_norm`` is the true norm
    skips        a step with inf/NaN gradients is skipped by the scaler, and the Trainer then does not step
                 the LR scheduler (its own rule, via ``accelerator.optimizer_step_was_skipped``); the logs
                 carry ``loss_scale`` and ``skipped_steps``
    checkpoints  ``scaler.pt`` in every checkpoint, restored by ``train(resume_from_checkpoint=...)``

Requires ``pip install 'lossscale[transformers]'``.
"""

from __future__ import annotations

import functools
import inspect
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
    resolve_precision,
    resolve_scaler,
    validate_monitor_spec,
)

_transformers: Any = import_framework("transformers", "transformers")
import_framework("accelerate", "transformers")
from .accelerate import Accelerator, unwrap_optimizer  # noqa: E402  (after the framework check)

__all__ = ["GradientMonitorCallback", "LossScaleTrainer"]


class GradientMonitorCallback(_transformers.TrainerCallback):  # type: ignore[misc]
    """A ``TrainerCallback`` running a :class:`lossscale.GradientMonitor` on the Trainer's model.

    The monitor is built at ``on_train_begin`` on the model and on the torch optimizer inside the Trainer's
    ``AcceleratedOptimizer`` (unwrapped by type), with the accelerator's scaler, so its statistics are at the
    scale in use. ``monitor.step()`` runs at every ``on_step_end``; on a sampled step the statistics are read
    (one sync) and :attr:`latest` holds the per-format summary (``grad_health/<format>/underflow``,
    ``/subnormal``, ``/overflow``, ``grad_health/nonfinite``: fractions of the gradient elements of that
    step). :class:`LossScaleTrainer` adds :attr:`latest` to every log; with a plain ``Trainer`` it is added to
    the ``logs`` dict passed to later callbacks and read from :attr:`latest`.

    Args:
        formats, every, and any other :class:`GradientMonitor` keyword (``weights``, ``activations``,
        ``history``); or ``monitor=`` an already built :class:`GradientMonitor`.
    """

    def __init__(self, monitor: MonitorSpec = True, **kwargs: Any) -> None:
        if kwargs:
            if monitor is not True:
                raise ValueError("pass either monitor= or GradientMonitor keyword arguments, not both")
            monitor = kwargs
        validate_monitor_spec(monitor)
        self._spec = monitor
        self.monitor: GradientMonitor | None = None
        self.latest: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            return
        model = kwargs.get("model")
        wrapped = kwargs.get("optimizer")
        if not isinstance(model, torch.nn.Module):
            raise TypeError("GradientMonitorCallback: the Trainer passed no model to on_train_begin")
        optimizer = unwrap_optimizer(wrapped) if wrapped is not None else None
        scaler = getattr(wrapped, "scaler", None)
        self.monitor = make_monitor(self._spec, model, optimizer, scaler if isinstance(scaler, LossScaler) else None)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        sampled = self.monitor.sampling
        self.monitor.step()
        if sampled:
            self.latest = monitor_summary(self.monitor.read())  # the one sync, on sampled steps only

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            for key, value in self.latest.items():
                logs.setdefault(key, value)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.remove()


class LossScaleTrainer(_transformers.Trainer):  # type: ignore[misc]
    """A ``transformers.Trainer`` that trains in a lossscale recipe with a :class:`LossScaler`.

    Args:
        precision: a :class:`lossscale.Precision` or preset name (``"fp16-mixed"``, ``"bf16-mixed"``,
            ``"fp8-hybrid"``, ...). Default None: taken from the arguments (``fp16=True`` gives
            ``"fp16-mixed"``, ``bf16=True`` ``"bf16-mixed"``, else FP32), so that ``fp16=True`` on CPU is
            really FP16 (emulated). Giving both ``precision=`` and ``fp16``/``bf16`` raises ValueError.
        scaler: None (default: a ``LossScaler()`` for FP16/FP8 recipes, none for BF16/FP32), a
            :class:`LossScaler` with your options, or False.
        emulate: passed to :func:`lossscale.autocast` (None: native on CUDA where possible, else emulated).
        monitor: None, True (default formats, every 100 steps), a format list, a dict of
            :class:`GradientMonitor` keywords, or a :class:`GradientMonitorCallback`: adds a
            :class:`GradientMonitorCallback` whose per-format summary goes into the logs.
        *args, **kwargs: ``transformers.Trainer`` arguments.

    Logged with every training log: ``loss_scale`` and ``skipped_steps`` (with a scaler; one sync per log),
    the true ``grad_norm``, and with ``monitor=`` the ``grad_health/...`` fractions.
    DeepSpeed and FSDP are not supported (ValueError): they scale the loss themselves. Nor are
    ``nn.DataParallel`` (``args.n_gpu > 1`` without torch.distributed: the forward would bypass the recipe)
    and tensor parallelism (the Trainer clips without unscaling): ValueError at construction.
    """

    def __init__(
        self,
        *args: Any,
        precision: Precision | str | None = None,
        scaler: ScalerSpec = None,
        emulate: bool | None = None,
        monitor: MonitorSpec | GradientMonitorCallback = None,
        **kwargs: Any,
    ) -> None:
        if emulate is not None and not isinstance(emulate, bool):
            raise TypeError(f"emulate must be a bool or None, got {type(emulate).__name__}")
        # Set before Trainer.__init__, which builds the accelerator.
        self._ls_precision_arg = precision
        self._ls_scaler_arg = scaler
        self._ls_emulate = emulate
        self._ls_accelerator_args: dict[str, Any] | None = None
        callback: GradientMonitorCallback | None
        if isinstance(monitor, GradientMonitorCallback):
            callback = monitor
        elif monitor is None or monitor is False:
            callback = None
        else:
            callback = GradientMonitorCallback(monitor)
        super().__init__(*args, **kwargs)
        self.monitor_callback = callback
        if callback is not None:
            self.add_callback(callback)

    # -- the accelerator -----------------------------------------------------------------------------------
    def _resolve_recipe(self) -> Precision:
        args = self.args
        fp16, bf16 = bool(getattr(args, "fp16", False)), bool(getattr(args, "bf16", False))
        if self._ls_precision_arg is not None:
            if fp16 or bf16:
                raise ValueError(
                    "LossScaleTrainer: give either precision= or TrainingArguments(fp16=/bf16=), not both "
                    f"(precision={self._ls_precision_arg!r}, fp16={fp16}, bf16={bf16})"
                )
            return resolve_precision(self._ls_precision_arg)
        if fp16:
            return resolve_precision("fp16-mixed")
        if bf16:
            return resolve_precision("bf16-mixed")
        return resolve_precision("fp32")

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        args: dict[str, Any] = super()._build_accelerator_args(**kwargs)
        # The recipe replaces accelerate's mixed precision (which is FP32 on CPU and a GradScaler elsewhere).
        args["mixed_precision"] = "no"
        self._ls_accelerator_args = dict(args)
        return args

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's setup, then its accelerator replaced by lossscale's (same arguments). No sync.

        ``Trainer.create_accelerator_and_postprocess`` builds an ``accelerate.Accelerator`` by name; we let it
        run (it also validates DeepSpeed/FSDP options) and then build ours from the same arguments. Both share
        accelerate's process-wide state, which these arguments leave identical.
        """
        self._refuse_unsupported_parallelism()
        recipe = self._resolve_recipe()
        scaler = resolve_scaler(recipe, self._ls_scaler_arg)
        super().create_accelerator_and_postprocess()
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("LossScaleTrainer does not support DeepSpeed or FSDP: they scale the loss themselves")
        assert self._ls_accelerator_args is not None  # set by _build_accelerator_args above
        self.accelerator = Accelerator(
            precision=recipe, scaler=scaler if scaler is not None else False, emulate=self._ls_emulate,
            **self._ls_accelerator_args,
        )
        self.gather_function = self.accelerator.gather_for_metrics
        if "use_gather_object" in inspect.signature(self.gather_function).parameters:
            self.gather_function = functools.partial(
                self.gather_function, use_gather_object=self.args.eval_use_gather_object
            )

    def _refuse_unsupported_parallelism(self) -> None:
        """ValueError for the two Trainer set-ups that would bypass the recipe or the scaler silently.

        - ``args.n_gpu > 1`` (several GPUs, no torch.distributed): the Trainer wraps the model in
          ``nn.DataParallel`` and skips ``accelerator.prepare``, so the forward never runs under the recipe.
        - tensor parallelism (a model with ``tp_size``/``_tp_size`` > 1, or ``parallelism_config.tp_size`` > 1):
          the Trainer clips DTensor gradients on several meshes itself (``_mixed_mesh_grad_norm``) without
          unscaling them first.
        """
        args, model = self.args, self.model
        n_gpu = int(getattr(args, "n_gpu", 0) or 0)
        quantized = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
        if n_gpu > 1 and not quantized:
            raise ValueError(
                f"LossScaleTrainer does not support nn.DataParallel (args.n_gpu={n_gpu} without torch.distributed):"
                " the Trainer would wrap the model in DataParallel and skip accelerator.prepare, so the forward "
                "would not run in the recipe. Launch with torchrun (DDP) or make one GPU visible "
                "(CUDA_VISIBLE_DEVICES)."
            )
        config = getattr(args, "parallelism_config", None)
        sizes = {
            "model.tp_size": getattr(model, "tp_size", None),
            "model._tp_size": getattr(model, "_tp_size", None),
            "args.parallelism_config.tp_size": getattr(config, "tp_size", None),
        }
        for where, size in sizes.items():
            if isinstance(size, int) and size > 1:
                raise ValueError(
                    f"LossScaleTrainer does not support tensor parallelism ({where}={size}): the Trainer clips "
                    "gradients on several device meshes itself (_mixed_mesh_grad_norm) without unscaling them"
                )

    @property
    def precision(self) -> Precision:
        """The recipe in use."""
        recipe: Precision = self.accelerator.precision
        return recipe

    @property
    def scaler(self) -> LossScaler | None:
        """The :class:`LossScaler` in use, or None."""
        scaler: LossScaler | None = self.accelerator.scaler
        return scaler

    # -- logging -------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log`` plus ``loss_scale``, ``skipped_steps`` (one sync) and the monitor's summary, on
        training logs (those with ``"loss"``)."""
        if "loss" in logs:
            scaler = self.scaler
            if scaler is not None and scaler.is_enabled():
                logs["loss_scale"] = scaler.get_scale()
                logs["skipped_steps"] = scaler.skipped_steps
            if self.monitor_callback is not None:
                for key, value in self.monitor_callback.latest.items():
                    logs.setdefault(key, value)
        super().log(logs, *args, **kwargs)
