"""lossscale: low-precision training for PyTorch, correct to the bit.

Public API, re-exported by hand. See README.md for a tour.
"""

from .formats import BF16, E2M1, E2M3, E3M2, E4M3, E5M2, FP16, FP32, PRESETS, FloatFormat
from .quantize import RoundingInfo, explain, quantize
from .blockformats import (
    BLOCK_PRESETS,
    MXFP4,
    MXFP6_E2M3,
    MXFP6_E3M2,
    MXFP8_E4M3,
    MXFP8_E5M2,
    NVFP4,
    BlockFormat,
    BlockInfo,
    explain_block,
)
from .precision import Precision
from .emulate import RecipeCounts, RecipeState
from .scaling_recipes import ScalingRecipe
from .emulate import Autocast, LowPrecisionWeights, RoundingCounters, SiteCounts, autocast, low_precision_weights
from .scaler import LossScaler, NonFiniteGrad, SkipBudgetExceeded, SkipEvent, SkipWarning
from .layerwise import LayerSkipEvent, LayerwiseScaler
from . import optim
from .scaling import DynamicScaling, NoScaling, ScalingConfig, ScalingState, StaticScaling, update_scale
from .monitor import GradientMonitor
from .diagnose import Diagnosis, diagnose
from .gradients import diagnose_gradients

__version__ = "0.3.0"  # the one version source: pyproject.toml reads it (CHANGELOG.md)

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
    "BlockFormat",
    "BlockInfo",
    "explain_block",
    "BLOCK_PRESETS",
    "MXFP8_E4M3",
    "MXFP8_E5M2",
    "MXFP6_E2M3",
    "MXFP6_E3M2",
    "MXFP4",
    "NVFP4",
    "LossScaler",
    "SkipEvent",
    "SkipBudgetExceeded",
    "SkipWarning",
    "NonFiniteGrad",
    "LayerwiseScaler",
    "LayerSkipEvent",
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
    "ScalingRecipe",
    "RecipeState",
    "RecipeCounts",
    "autocast",
    "Autocast",
    "RoundingCounters",
    "SiteCounts",
    "low_precision_weights",
    "LowPrecisionWeights",
    "GradientMonitor",
    "diagnose",
    "diagnose_gradients",
    "Diagnosis",
]
