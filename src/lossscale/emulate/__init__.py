"""Emulated low-precision compute: FP32 arithmetic rounded where GPU hardware rounds.

Public API: :func:`autocast` (:class:`Autocast`), :class:`RoundingCounters` (:class:`SiteCounts`),
:func:`low_precision_weights` (:class:`LowPrecisionWeights`), :class:`UnemulatedOpError`,
:func:`covered_ops`. See docs/emulation.md.
"""

from __future__ import annotations

from .counters import RoundingCounters, SiteCounts
from .mode import Autocast, UnemulatedOpError, autocast, covered_ops
from .recipes import RecipeCounts, RecipeState
from .weights import LowPrecisionWeights, low_precision_weights

__all__ = [
    "autocast",
    "Autocast",
    "RoundingCounters",
    "SiteCounts",
    "low_precision_weights",
    "LowPrecisionWeights",
    "RecipeState",
    "RecipeCounts",
    "UnemulatedOpError",
    "covered_ops",
]
