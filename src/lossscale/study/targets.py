"""Steps to target: how many optimizer steps a run needed to get within reach of FP32's final result.

Every run evaluates its metric every ``budget/20`` steps (``eval_curve`` in results.json). Against the FP32
run of the same task and seed (the FP32 mean over seeds when that seed has none), the target is

- 95% of FP32's final value for a higher-is-better metric (accuracy, BLEU),
- 1.05x FP32's final value for a loss (the language models' held-out loss),

and a run's steps-to-target is the first evaluation step at which it reaches the target (``None``: never
within the budget). Beside it, the training loss at fixed fractions of the budget (the mean over the
``budget/20`` steps ending there), so "fewer iterations" can be read off either way.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "TARGET_FRACTION",
    "TARGET_LOSS_RATIO",
    "LOSS_FRACTIONS",
    "target_value",
    "steps_to_target",
    "loss_at_fractions",
    "run_targets",
]

TARGET_FRACTION = 0.95
TARGET_LOSS_RATIO = 1.05
LOSS_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)


def target_value(fp32_final: float, higher_is_better: bool) -> float:
    """95% of FP32's final value (higher is better) or 1.05x it (a loss)."""
    if not math.isfinite(fp32_final):
        raise ValueError(f"fp32_final must be finite, got {fp32_final}")
    return TARGET_FRACTION * fp32_final if higher_is_better else TARGET_LOSS_RATIO * fp32_final


def steps_to_target(
    points: Iterable[tuple[int, float | None]], target: float, higher_is_better: bool
) -> int | None:
    """The first step of ``points`` (``(step, value)`` in step order) whose value reaches ``target``
    (``>=`` when higher is better, ``<=`` for a loss); ``None`` if none does. ``None`` values (a
    non-finite evaluation) never reach it."""
    last = -1
    for step, value in points:
        if step <= last:
            raise ValueError(f"points must be in increasing step order; step {step} follows {last}")
        last = step
        if value is None or not math.isfinite(value):
            continue
        if (value >= target) if higher_is_better else (value <= target):
            return int(step)
    return None


def loss_at_fractions(
    loss_curve: Sequence[float | None], fractions: Sequence[float] = LOSS_FRACTIONS, window: int | None = None
) -> dict[str, float | None]:
    """``{"0.25": mean loss of the window ending at 25% of the steps, ...}``: the mean of the ``window``
    steps (default ``len/20``, at least 1) ending at step ``ceil(f * len)``; ``None`` if any is non-finite."""
    n = len(loss_curve)
    if n == 0:
        raise ValueError("loss_curve must not be empty")
    w = window if window is not None else max(1, n // 20)
    out: dict[str, float | None] = {}
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fractions must be in (0, 1], got {f}")
        end = max(1, math.ceil(f * n))
        vals = loss_curve[max(0, end - w) : end]
        ok = all(v is not None and math.isfinite(v) for v in vals)
        out[f"{f:g}"] = statistics.fmean(v for v in vals if v is not None) if ok else None
    return out


def run_targets(doc: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {config: {"target", "steps": [per seed], "mean_steps", "reached", "seeds", "every",
    "budget", "loss_at": {fraction: mean over seeds}}}}`` for every run that has an ``eval_curve``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    runs = [r for r in doc["runs"] if r.get("eval_curve")]
    for task in dict.fromkeys(r["task"] for r in runs):
        trs = [r for r in runs if r["task"] == task]
        fp32 = {r["seed"]: r for r in trs if r["config"] == "fp32" and r["metric"] is not None}
        if not fp32:
            continue
        fp32_mean = statistics.fmean(float(r["metric"]) for r in fp32.values())
        rows: dict[str, dict[str, Any]] = {}
        for cfg in dict.fromkeys(r["config"] for r in trs):
            rs = sorted((r for r in trs if r["config"] == cfg), key=lambda r: r["seed"])
            hib = bool(rs[0].get("higher_is_better", True))
            name = rs[0]["metric_name"]
            steps: list[int | None] = []
            targets: list[float] = []
            for r in rs:
                ref = float(fp32[r["seed"]]["metric"]) if r["seed"] in fp32 else fp32_mean
                tgt = target_value(ref, hib)
                targets.append(tgt)
                steps.append(steps_to_target(((p["step"], p.get(name)) for p in r["eval_curve"]), tgt, hib))
            reached = [s for s in steps if s is not None]
            loss_at: dict[str, float | None] = {}
            per_run = [loss_at_fractions(r["loss_curve"]) for r in rs]
            for k in per_run[0]:
                vals = [p[k] for p in per_run]
                loss_at[k] = None if any(v is None for v in vals) else statistics.fmean(
                    float(v) for v in vals if v is not None
                )
            rows[cfg] = {
                "target": statistics.fmean(targets),
                "steps": steps,
                "mean_steps": statistics.fmean(reached) if len(reached) == len(steps) else None,
                "reached": len(reached),
                "seeds": [r["seed"] for r in rs],
                "every": int(rs[0].get("eval_every", 1)),
                "budget": int(rs[0]["steps"]),
                "loss_at": loss_at,
                "metric_name": name,
                "higher_is_better": hib,
            }
        out[task] = rows
    return out
