"""lossscale: low-precision training for PyTorch, correct to the bit.

Public API, re-exported by hand. See README.md for a tour.
"""

from .formats import BF16, E2M1, E2M3, E3M2, E4M3, E5M2, FP16, FP32, PRESETS, FloatFormat
from .quantize import RoundingInfo, explain, quantize
from .precision import Precision
from .emulate import Autocast, LowPrecisionWeights, RoundingCounters, SiteCounts, autocast, low_precision_weights
from .scaler import LossScaler, SkipBudgetExceeded, SkipEvent
from . import optim
from .scaling import DynamicScaling, NoScaling, ScalingConfig, ScalingState, StaticScaling, update_scale
from .monitor import GradientMonitor
from .diagnose import Diagnosis, diagnose

__version__ = "0.2.0"  # the one version source: pyproject.toml reads it (CHANGELOG.md)

__all__ = [
    "__version__",
    "FloatFormat",
    "PRESETS",
    "FP32",
    "BF16",
    "FP16",
    "E4M3",
    "E5M2",
    "E2M1",
    "E2M3",
    "E3M2",
    "quantize",
    "LossScaler",
    "SkipEvent",
    "SkipBudgetExceeded",
    "DynamicScaling",
    "StaticScaling",
    "NoScaling",
    "ScalingConfig",
    "ScalingState",
    "update_scale",
    "optim",
    "explain",
    "RoundingInfo",
    "Precision",
    "autocast",
    "Autocast",
    "RoundingCounters",
    "SiteCounts",
    "low_precision_weights",
    "LowPrecisionWeights",
    "GradientMonitor",
    "diagnose",
    "Diagnosis",
]
