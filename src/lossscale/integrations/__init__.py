"""Use lossscale from the training frameworks: Lightning, the Hugging Face ``Trainer`` and ``accelerate``.

Each submodule imports its framework when it is imported (and only then), so ``import lossscale`` never needs
them; install them with the extras ``lossscale[lightning]``, ``lossscale[transformers]`` or
``lossscale[accelerate]`` (all three: ``lossscale[integrations]``)::

    from lossscale.integrations.lightning import LossScalePrecision        # Trainer(plugins=[...])
    from lossscale.integrations.transformers import LossScaleTrainer        # a transformers.Trainer
    from lossscale.integrations.accelerate import Accelerator               # an accelerate.Accelerator

Each one runs the recipe asked for (native ``torch.autocast`` where the hardware has it, the emulation
elsewhere, FP16/FP8 on CPU included), a :class:`lossscale.LossScaler` (a default one for FP16/FP8 recipes),
unscales before clipping, counts skipped steps and keeps the scaler in the framework's own checkpoints.
See docs/integrations.md.
"""

from __future__ import annotations

__all__: list[str] = []
