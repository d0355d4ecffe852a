"""How metrics are compared and printed, shared by the findings, the ledger and the report (private)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Below these gaps (absolute; accuracy as a fraction, BLEU in points) a configuration "matches" FP32 when the
# run has a single seed; with several seeds, the larger of this and 2 standard deviations.
MATCH_TOLERANCE: dict[str, float] = {"accuracy": 0.01, "bleu": 2.0}
# Lower-is-better loss metrics: the floor is this fraction of the compared values (2% of the loss).
RELATIVE_TOLERANCE: dict[str, float] = {"heldout_loss": 0.02}


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def fmt_metric(name: str, x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if name in RELATIVE_TOLERANCE:
        return f"{x:.3f}"
    return f"{100 * x:.1f}%" if name == "accuracy" else f"{x:.1f}"


def fmt_gap(name: str, x: float | None) -> str:
    if x is None:
        return "n/a"
    if name in RELATIVE_TOLERANCE:
        return f"{x:+.3f}"
    return f"{100 * x:+.1f} pt" if name == "accuracy" else f"{x:+.1f}"


def fmt_scale(x: float | None) -> str:
    if x is None:
        return "-"
    if x > 0 and math.log2(x).is_integer():
        return f"2^{int(math.log2(x))}"
    return f"{x:.3g}"


def fmt_scales(row: Mapping[str, Any]) -> str:
    """A row's final scale: 2^k when every seed agrees, else the range over seeds."""
    scales = row.get("final_scales") or []
    if not scales:
        return fmt_scale(row.get("final_scale"))
    lo, hi = min(scales), max(scales)
    return fmt_scale(lo) if lo == hi else f"{fmt_scale(lo)}..{fmt_scale(hi)}"


def fmt_fractions(d: Mapping[str, float | None]) -> str:
    if not d:
        return "n/a"
    return ", ".join(f"{k} {pct(v, 2)}" for k, v in d.items())

