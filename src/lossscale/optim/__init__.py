"""Optimizers for low-precision weights: Kahan-compensated and stochastically rounded SGD, Adam, AdamW.

Each optimizer takes ``torch.optim``'s arguments and defaults plus ``compensation`` (``"none"`` |
``"kahan"`` | ``"stochastic"``), ``weight_format`` (the format the weights are kept in; ``"bf16"`` for FP32
tensors that emulate BF16 weights) and ``state_dtype`` (FP32 or BF16 moments), and comes as a class and as a
functional update. See ``docs/optim.md``.
"""

from .adamw import Adam, AdamW, adam, adamw
from .compensation import COMPENSATIONS, Compensation, StochasticRoundingRNG, apply_update_
from .sgd import SGD, sgd

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "sgd",
    "adam",
    "adamw",
    "Compensation",
    "COMPENSATIONS",
    "apply_update_",
    "StochasticRoundingRNG",
]
