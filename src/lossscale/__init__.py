"""lossscale: low-precision training for PyTorch, correct to the bit.

Public API, re-exported by hand. See README.md for a tour.
"""

from .formats import BF16, E2M1, E2M3, E3M2, E4M3, E5M2, FP16, FP32, PRESETS, FloatFormat
from .quantize import quantize

__version__ = "0.1.0"

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
]
