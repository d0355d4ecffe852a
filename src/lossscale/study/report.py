"""The study's outputs: ``results.json`` (with its JSON Schema), ``report.md``, ``report.html`` and plots.

``results.json`` is self-describing: ``schema_version``, the resolved configuration (tasks, configurations,
seeds, budgets, recipes), the environment, and one record per (task, configuration, seed) in ``runs``
(:data:`RESULTS_SCHEMA` lists every field; :func:`validate` checks a document against it). The report is
built from that file alone, so ``lossscale study --resume`` and a re-render give the same report.

Per task the report has a table of every configuration (metric mean +- std over seeds and its gap to FP32,
final loss, skipped steps, final scale, underflow and swamping fractions, time) and three plots: the loss
curves, the loss-scale trajectories with skipped steps marked, and the FP32 activation-gradient exponent
histogram against each format's window. It ends with "Findings": each question answered from the numbers of
this run, with the published results (cited in each finding: the paper or project) beside them.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .configs import CONFIG_NAMES
from .files import atomic_write, contained

__all__ = [
    "SCHEMA_VERSION",
    "RESULTS_SCHEMA",
    "SchemaError",
    "validate",
    "load_results",
    "check_names",
    "write_results",
    "summarise",
    "summary_rows",
    "findings",
    "write_report",
    "PUBLISHED",
]

SCHEMA_VERSION = 1

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_FRACTIONS = {"type": "object", "additionalProperties": _NUM_OR_NULL}

RUN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "task", "config", "precision", "scaling", "optimizer", "compensation", "seed", "metric_name", "metric",
        "final_loss", "skipped_steps", "final_scale", "underflow_fraction", "swamping_fraction", "seconds",
        "loss_curve", "scale_trajectory", "steps", "metrics", "diverged", "skipped_at",
        "grad_exponent_histogram", "underflow_source", "swamping_source", "scaler", "test_size",
    ],
    "properties": {
        "task": {"type": "string"},
        "config": {"type": "string", "enum": list(CONFIG_NAMES)},
        "precision": {"type": "string", "enum": ["fp32", "bf16-mixed", "fp16-mixed", "bf16-pure", "fp8-hybrid",
                                                 "fp8-delayed", "fp8-rowwise", "mxfp8", "mxfp4", "nvfp4"]},
        "scaling": {"type": "string", "enum": ["none", "static", "dynamic"]},
        "compensation": {"type": "string", "enum": ["none", "kahan", "stochastic"]},
        "optimizer": {"type": "string"},
        "optimizer_recipe": {"type": "string"},
        "weight_format": {"type": "string"},
        "grad_format": {"type": ["string", "null"]},
        "seed": {"type": "integer", "minimum": 0},
        "mode": {"type": "string"},
        "device": {"type": "string"},
        "steps": {"type": "integer", "minimum": 1},
        "batch_size": {"type": "integer", "minimum": 1},
        "metric_name": {"type": "string"},
        "metric": _NUM_OR_NULL,
        "metrics": {"type": "object", "additionalProperties": _NUM_OR_NULL},
        "final_loss": _NUM_OR_NULL,
        "diverged": {"type": "boolean"},
        "skipped_steps": {"type": "integer", "minimum": 0},
        "skipped_at": {"type": "array", "items": {"type": "integer"}},
        "final_scale": _NUM_OR_NULL,
        "scaler": {"type": "object", "required": ["kind"]},
        "underflow_fraction": _FRACTIONS,
        "underflow_source": {"type": "string"},
        "activation_grad_elements": {"type": ["integer", "null"]},
        "swamping_fraction": _FRACTIONS,
        "swamping_source": {"type": "string"},
        "monitor_underflow_fraction": _FRACTIONS,
        "monitor_swamping_fraction": _FRACTIONS,
        "grad_exponent_histogram": {
            "type": "object",
            "required": ["min_log2", "counts"],
            "properties": {"min_log2": {"type": "integer"}, "counts": {"type": "array", "items": _NUM}},
        },
        "seconds": _NUM,
        "train_seconds": _NUM,
        "test_size": {"type": "integer", "minimum": 1},
        "loss_curve": {"type": "array", "items": _NUM_OR_NULL},
        "scale_trajectory": {"type": "array", "items": _NUM},
        # Added by issue 17 (optional, so older files still validate).
        "eval_every": {"type": "integer", "minimum": 1},
        "eval_curve": {"type": "array", "items": {"type": "object", "required": ["step"],
                                                  "properties": {"step": {"type": "integer", "minimum": 1}},
                                                  "additionalProperties": _NUM_OR_NULL}},
        "higher_is_better": {"type": "boolean"},
        "step_seconds": _NUM,
        "peak_memory_bytes": {"type": ["integer", "null"]},
        "data_info": {"type": ["object", "null"]},
    },
}

RESULTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "lossscale study results",
    "type": "object",
    "required": ["schema_version", "config", "environment", "runs"],
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "created": {"type": "string"},
        "command": {"type": "string"},
        "config": {
            "type": "object",
            "required": ["mode", "tasks", "configs", "seeds", "device", "workers", "threads", "task_details"],
            "properties": {
                "mode": {"type": "string", "enum": ["tiny", "quick", "full"]},
                "tasks": {"type": "array", "items": {"type": "string"}},
                "configs": {"type": "array", "items": {"type": "string", "enum": list(CONFIG_NAMES)}},
                "seeds": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "device": {"type": "string"},
                "workers": {"type": "integer", "minimum": 1},
                "threads": {"type": "integer", "minimum": 1},
                "task_details": {"type": "object"},
            },
        },
        "environment": {
            "type": "object",
            "required": ["torch", "device", "threads_per_run"],
            "properties": {"torch": {"type": "string"}, "device": {"type": "string"},
                           "threads_per_run": {"type": "integer"}},
        },
        "runs": {"type": "array", "items": RUN_SCHEMA},
        # lossscale study --sweep NAME: {name: {"override", "values", "mode", "runs": [run records with
        # "sweep_value"]}} (issue 17; optional).
        "sweeps": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["runs"],
            "properties": {"runs": {"type": "array", "items": RUN_SCHEMA}},
        }},
    },
}


class SchemaError(ValueError):
    """A results document that does not match :data:`RESULTS_SCHEMA` (the message names the path)."""


_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, _TYPES[name])


def validate(doc: Any, schema: Mapping[str, Any] = RESULTS_SCHEMA, path: str = "$") -> None:
    """Check ``doc`` against ``schema`` (the JSON Schema subset this module uses: ``type``, ``required``,
    ``properties``, ``additionalProperties`` as a schema, ``items``, ``enum``, ``minimum``). Raises
    :class:`SchemaError` naming the first offending path."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(doc, t) for t in names):
            raise SchemaError(f"{path}: expected {' or '.join(names)}, got {type(doc).__name__} {doc!r:.60}")
    if "enum" in schema and doc not in schema["enum"]:
        raise SchemaError(f"{path}: {doc!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is_type(doc, "number") and doc < schema["minimum"]:
        raise SchemaError(f"{path}: {doc!r} is below the minimum {schema['minimum']}")
    if isinstance(doc, dict):
        for key in schema.get("required", ()):
            if key not in doc:
                raise SchemaError(f"{path}: missing required field {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            if key in props:
                validate(value, props[key], f"{path}.{key}")
            elif isinstance(extra, Mapping):
                validate(value, extra, f"{path}.{key}")
    if isinstance(doc, list) and "items" in schema:
        for i, value in enumerate(doc):
            validate(value, schema["items"], f"{path}[{i}]")


def check_names(doc: Mapping[str, Any]) -> None:
    """Check that every task and configuration ``doc`` names is a known one and that no run appears twice;
    a :class:`SchemaError` naming the offenders otherwise. (A task name becomes part of the report's file
    names: an unknown one is refused before anything is written.)"""
    from .tasks import TASKS

    known_configs = set(CONFIG_NAMES)
    named_tasks = list(doc["config"]["tasks"]) + [r["task"] for r in doc["runs"]]
    bad_tasks = sorted({str(t) for t in named_tasks if t not in TASKS})
    if bad_tasks:
        raise SchemaError(
            f"unknown task(s) {', '.join(repr(t) for t in bad_tasks)}; known tasks: {', '.join(TASKS)}"
        )
    named_configs = list(doc["config"]["configs"]) + [r["config"] for r in doc["runs"]]
    bad_configs = sorted({str(c) for c in named_configs if c not in known_configs})
    if bad_configs:
        raise SchemaError(f"unknown configuration(s) {', '.join(repr(c) for c in bad_configs)}")
    seen: set[tuple[str, str, int]] = set()
    dups: list[str] = []
    for r in doc["runs"]:
        key = (r["task"], r["config"], int(r["seed"]))
        if key in seen:
            dups.append(f"{key[0]} {key[1]} seed {key[2]}")
        seen.add(key)
    if dups:
        raise SchemaError(f"duplicate run(s): {', '.join(dict.fromkeys(dups))} (each run must appear once)")


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results.json and check it: the schema (:func:`validate`), then known task and configuration
    names and no duplicate runs (:func:`check_names`)."""
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    validate(doc)
    check_names(doc)
    return dict(doc)


def write_results(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    """Validate and write atomically (a uniquely named temporary file renamed over the old one, so that a
    reader never sees a partial file), with the schema beside it as ``results.schema.json``."""
    validate(doc)
    path = os.fspath(path)
    atomic_write(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    schema_path = os.path.join(os.path.dirname(path) or ".", "results.schema.json")
    atomic_write(schema_path, json.dumps(RESULTS_SCHEMA, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Aggregation


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _merge_fractions(runs: Iterable[Mapping[str, Any]], field: str) -> dict[str, float | None]:
    by: dict[str, list[float]] = {}
    for r in runs:
        for k, v in (r.get(field) or {}).items():
            if v is not None:
                by.setdefault(k, []).append(float(v))
    return {k: statistics.fmean(v) for k, v in by.items()}


def summarise(doc: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {config: row}}`` with the seeds of each (task, config) combined: metric mean/std/gap to FP32,
    final loss (mean; None when any seed diverged), skipped steps and final scale (means), underflow and
    swamping fractions (means per format), seconds (mean), seeds, and whether all seeds ended bit-identical
    to the same seed of another configuration is left to :func:`findings`."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    order = {c: i for i, c in enumerate(CONFIG_NAMES)}
    for task in doc["config"]["tasks"]:
        runs = [r for r in doc["runs"] if r["task"] == task]
        rows: dict[str, dict[str, Any]] = {}
        for cfg in sorted({r["config"] for r in runs}, key=lambda c: order.get(c, 99)):
            rs = sorted((r for r in runs if r["config"] == cfg), key=lambda r: r["seed"])
            metrics = [float(r["metric"]) for r in rs if r["metric"] is not None]
            mean, std = _mean_std(metrics)
            losses = [r["final_loss"] for r in rs]
            scales = [r["final_scale"] for r in rs if r["final_scale"] is not None]
            rows[cfg] = {
                "config": cfg,
                "precision": rs[0]["precision"],
                "scaling": rs[0]["scaling"],
                "compensation": rs[0]["compensation"],
                "metric_name": rs[0]["metric_name"],
                "metric_mean": mean,
                "metric_std": std,
                "metrics": metrics,
                "final_loss": None if any(v is None for v in losses) else statistics.fmean(losses),
                "diverged": sum(1 for r in rs if r["diverged"]),
                "skipped_steps": statistics.fmean([r["skipped_steps"] for r in rs]),
                "final_scale": statistics.median(scales) if scales else None,
                "final_scales": scales,
                "underflow": _merge_fractions(rs, "underflow_fraction"),
                "swamping": _merge_fractions(rs, "swamping_fraction"),
                "seconds": statistics.fmean([r["seconds"] for r in rs]),
                "test_size": rs[0].get("test_size"),
                "higher_is_better": bool(rs[0].get("higher_is_better", True)),
                "seeds": [r["seed"] for r in rs],
                "extra": {
                    k: statistics.fmean([r["metrics"][k] for r in rs if r["metrics"].get(k) is not None] or [math.nan])
                    for k in rs[0]["metrics"]
                },
            }
        fp32 = rows.get("fp32")
        for row in rows.values():
            base = None if fp32 is None else fp32["metric_mean"]
            row["gap"] = None if base is None or row["metric_mean"] is None else row["metric_mean"] - base
        out[task] = rows
    return out


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def _fmt_metric(name: str, x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if name in RELATIVE_TOLERANCE:
        return f"{x:.3f}"
    return f"{100 * x:.1f}%" if name == "accuracy" else f"{x:.1f}"


def _fmt_gap(name: str, x: float | None) -> str:
    if x is None:
        return "n/a"
    if name in RELATIVE_TOLERANCE:
        return f"{x:+.3f}"
    return f"{100 * x:+.1f} pt" if name == "accuracy" else f"{x:+.1f}"


def _fmt_scale(x: float | None) -> str:
    if x is None:
        return "-"
    if x > 0 and math.log2(x).is_integer():
        return f"2^{int(math.log2(x))}"
    return f"{x:.3g}"


def _fmt_scales(row: Mapping[str, Any]) -> str:
    """A row's final scale: 2^k when every seed agrees, else the range over seeds."""
    scales = row.get("final_scales") or []
    if not scales:
        return _fmt_scale(row.get("final_scale"))
    lo, hi = min(scales), max(scales)
    return _fmt_scale(lo) if lo == hi else f"{_fmt_scale(lo)}..{_fmt_scale(hi)}"


def _fmt_fractions(d: Mapping[str, float | None]) -> str:
    if not d:
        return "n/a"
    return ", ".join(f"{k} {_pct(v, 2)}" for k, v in d.items())


def summary_rows(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The summary table (one row per configuration, one column per task: metric mean and gap to FP32)."""
    summ = summarise(doc)
    tasks = list(summ)
    configs = [c for c in CONFIG_NAMES if any(c in summ[t] for t in tasks)]
    header = ["config"] + [f"{t} ({next(iter(summ[t].values()))['metric_name']})" for t in tasks if summ[t]]
    rows = []
    for c in configs:
        row = [c]
        for t in tasks:
            if not summ[t]:
                continue
            r = summ[t].get(c)
            if r is None:
                row.append("-")
                continue
            m = _fmt_metric(r["metric_name"], r["metric_mean"])
            if len(r["metrics"]) > 1:
                sd = r["metric_std"] or 0.0
                m += f" +- {100 * sd:.1f}" if r["metric_name"] == "accuracy" else (
                    f" +- {sd:.3f}" if r["metric_name"] in RELATIVE_TOLERANCE else f" +- {sd:.1f}")
            if c != "fp32" and r["gap"] is not None:
                m += f" ({_fmt_gap(r['metric_name'], r['gap'])})"
            if r["diverged"]:
                m += " diverged"
            row.append(m)
        rows.append(row)
    return header, rows


TASK_TABLE_HEADER = [
    "config", "metric (mean +- std)", "gap to FP32", "final loss", "skipped steps", "final scale",
    "underflow", "swamping (bf16)", "time (s)",
]


SPEED_HEADER = ["config", "native", "step time (ms)", "vs FP32", "peak memory (MiB)"]


def speed_table(doc: Mapping[str, Any], task: str) -> list[list[str]]:
    """Step time and peak memory per configuration of ``task`` (CUDA runs only: empty without them)."""
    runs = [r for r in doc["runs"] if r["task"] == task and r.get("peak_memory_bytes") is not None
            and r.get("step_seconds")]
    if not runs:
        return []
    order = {c: i for i, c in enumerate(CONFIG_NAMES)}
    mean_t = {c: statistics.fmean(float(r["step_seconds"]) for r in runs if r["config"] == c)
              for c in {r["config"] for r in runs}}
    out = []
    for cfg in sorted(mean_t, key=lambda c: order.get(c, 99)):
        rs = [r for r in runs if r["config"] == cfg]
        mem = statistics.fmean(float(r["peak_memory_bytes"]) for r in rs) / 2**20
        rel = f"{mean_t['fp32'] / mean_t[cfg]:.2f}x speed" if "fp32" in mean_t else "-"
        out.append([cfg, "yes" if all(r.get("native") for r in rs) else "no", f"{1e3 * mean_t[cfg]:.2f}", rel,
                    f"{mem:.1f}"])
    return out


TARGETS_HEADER = ["config", "steps to target (per seed)", "loss at 25%", "50%", "75%", "100%"]


def targets_table(rows: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Rows of a task's steps-to-target table (:data:`TARGETS_HEADER`), from :func:`targets.run_targets`."""
    order = {c: i for i, c in enumerate(CONFIG_NAMES)}
    out = []
    for cfg in sorted(rows, key=lambda c: order.get(c, 99)):
        r = rows[cfg]
        steps = ", ".join("never" if s is None else str(s) for s in r["steps"])
        out.append([cfg, f"{steps} (of {r['budget']})"] + [
            "n/a" if v is None else f"{v:.4g}" for v in r["loss_at"].values()
        ])
    return out


def task_table(rows: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Rows of one task's table, in :data:`TASK_TABLE_HEADER` order."""
    out = []
    for cfg, r in rows.items():
        name = r["metric_name"]
        m = _fmt_metric(name, r["metric_mean"])
        if len(r["metrics"]) > 1:
            sd = r["metric_std"] or 0.0
            m += f" +- {100 * sd:.1f}" if name == "accuracy" else (
                f" +- {sd:.3f}" if name in RELATIVE_TOLERANCE else f" +- {sd:.1f}")
        extra = {k: v for k, v in r["extra"].items() if k not in (name, "test_loss")}
        if extra:
            m += " (" + ", ".join(f"{k} {_pct(v) if v <= 1 else f'{v:.2f}'}" for k, v in extra.items()) + ")"
        out.append([
            cfg,
            m,
            "-" if cfg == "fp32" else _fmt_gap(name, r["gap"]),
            "diverged" if r["final_loss"] is None else f"{r['final_loss']:.4g}",
            f"{r['skipped_steps']:.3g}",
            _fmt_scales(r),
            _fmt_fractions(r["underflow"]),
            _pct(r["swamping"].get("bf16"), 2),
            f"{r['seconds']:.1f}",
        ])
    return out


# ----------------------------------------------------------------------------------------------------------
# Findings


PUBLISHED: dict[str, str] = {
    "bf16": "Kalamkar et al. 2019 (arXiv:1905.12322): BF16 mixed precision matches FP32 with no loss scaling "
    "and no hyper-parameter changes across vision, speech, language, GANs and recommenders.",
    "fp16": "Micikevicius et al. 2018 (arXiv:1710.03740): in FP16, 67% of SSD's activation gradients become "
    "zero without scaling and training diverges; bigLSTM diverges without scaling; ImageNet CNNs needed none; "
    "a constant scale of 8 gives SSD 77.1 mAP vs 76.9 FP32.",
    "dynamic": "Zhao et al. 2020 (arXiv:1910.12385): on SSD512/VOC a static scale of 8 gave 78.83 mAP, "
    "dynamic scaling 75.04, FP32 78.94 (static beat dynamic there); with default dynamic scaling the "
    "steady-state skip rate is about 1 step in 2001.",
    "pure": "Zamirai et al. 2020 (arXiv:2010.06192): BF16 weights with nearest rounding cost up to 7% "
    "accuracy; Kahan summation or stochastic rounding on the update brings results within -0.1..+0.2% of "
    "FP32. Ozkara et al. 2025 (arXiv:2502.20566): BF16 + stochastic rounding in AdamW matched mixed precision "
    "up to 6.7B parameters.",
    "fp8": "Micikevicius et al. 2022 (arXiv:2209.05433) and Transformer Engine: E4M3 forward / E5M2 backward "
    "(HYBRID) with per-tensor scaling; E5M2 has FP16's exponent range, so gradients need a loss scale (or "
    "per-tensor scaling) as in FP16.",
}

# Below these gaps (absolute; accuracy as a fraction, BLEU in points) a configuration "matches" FP32 when the
# run has a single seed; with several seeds, the larger of this and 2 standard deviations.
MATCH_TOLERANCE: dict[str, float] = {"accuracy": 0.01, "bleu": 2.0}
# Lower-is-better loss metrics: the floor is this fraction of the compared values (2% of the loss).
RELATIVE_TOLERANCE: dict[str, float] = {"heldout_loss": 0.02}
# A final training loss more than this factor above the scaled run's counts as "loss lost to underflow".
LOSS_RATIO_TOLERANCE = 1.05


def _tol(metric: str, *rows: Mapping[str, Any] | None, test_size: int | None = None) -> float:
    """The smallest difference that counts: the metric's floor (1 accuracy point, 2 BLEU), 2 standard
    deviations over seeds, and for accuracy 2 binomial standard errors of the test set (a single seed's
    accuracy on 359 images varies by about 2.5 points at 65%)."""
    base = MATCH_TOLERANCE.get(metric, 0.01)
    if metric in RELATIVE_TOLERANCE:
        vals = [abs(float(r["metric_mean"])) for r in rows if r is not None and r["metric_mean"] is not None]
        base = RELATIVE_TOLERANCE[metric] * (max(vals) if vals else 0.0)
    sds = [float(r["metric_std"]) for r in rows if r is not None and r["metric_std"] is not None]
    tol = max([base] + [2.0 * s for s in sds])
    if metric == "accuracy" and test_size:
        for r in rows:
            if r is not None and r["metric_mean"] is not None:
                p = min(max(float(r["metric_mean"]), 0.0), 1.0)
                n_seeds = max(1, len(r["metrics"]))
                tol = max(tol, 2.0 * math.sqrt(p * (1.0 - p) / (test_size * n_seeds)))
    return tol


def _same_curves(doc: Mapping[str, Any], task: str, a: str, b: str) -> bool | None:
    """Whether every seed of configs a and b on task ended bit-identical (same loss curve and metric)."""
    ra = {r["seed"]: r for r in doc["runs"] if r["task"] == task and r["config"] == a}
    rb = {r["seed"]: r for r in doc["runs"] if r["task"] == task and r["config"] == b}
    seeds = set(ra) & set(rb)
    if not seeds:
        return None
    return all(
        ra[s]["loss_curve"] == rb[s]["loss_curve"] and ra[s]["metric"] == rb[s]["metric"] for s in seeds
    )


def _cmp(task: str, rows: Mapping[str, Mapping[str, Any]], a: str, b: str) -> tuple[float, float] | None:
    """(how much better a is than b, tolerance) or None if either is missing: metric of a - metric of b, with
    the sign flipped for a lower-is-better metric (a held-out loss), so positive always means a is better."""
    ra, rb = rows.get(a), rows.get(b)
    if ra is None or rb is None or ra["metric_mean"] is None or rb["metric_mean"] is None:
        return None
    diff = ra["metric_mean"] - rb["metric_mean"]
    if not ra.get("higher_is_better", True):
        diff = -diff
    return diff, _tol(ra["metric_name"], ra, rb, test_size=ra.get("test_size"))


def _fp8_state(doc: Mapping[str, Any], task: str, rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Whether ``fp8-hybrid:none`` trained on ``task``: "failed" (diverged, or its metric within tolerance of
    the task's chance level, or worse than FP32 beyond tolerance), "trained" (within tolerance of FP32, or
    no worse), "unknown" (no FP32 run and not at chance)."""
    r = rows["fp8-hybrid:none"]
    if r["diverged"] or r["metric_mean"] is None:
        return "failed"
    chance = (doc["config"].get("task_details", {}).get(task) or {}).get("chance")
    if chance is not None and r.get("higher_is_better", True):
        if r["metric_mean"] - float(chance) <= _tol(r["metric_name"], r, test_size=r.get("test_size")):
            return "failed"
    c = _cmp(task, rows, "fp8-hybrid:none", "fp32")
    if c is None:
        return "unknown"
    return "failed" if c[0] < -c[1] else "trained"


def findings(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each question answered from the numbers of this run: ``{"question", "answer", "evidence": [...],
    "published", "contradicts": [...]}`` (``contradicts`` lists where the data go against a common belief)."""
    summ = summarise(doc)
    out: list[dict[str, Any]] = []

    def metric_str(task: str, cfg: str) -> str:
        r = summ[task].get(cfg)
        return "n/a" if r is None else _fmt_metric(r["metric_name"], r["metric_mean"])

    def missing(question: str, needed: str, published: str) -> None:
        out.append({"question": question, "answer": f"Not measured in this study: run {needed}.",
                    "evidence": [], "published": published, "contradicts": []})

    # 1. BF16 and loss scaling.
    ev, contra, needs = [], [], []
    bf16_compared: list[str] = []
    for task, rows in summ.items():
        if "bf16-mixed:none" not in rows:
            continue
        if "bf16-mixed:dynamic" in rows or "bf16-mixed:static" in rows:
            bf16_compared.append(task)
        u = rows["bf16-mixed:none"]["underflow"].get("bf16")
        line = f"{task}: bf16-mixed without scaling {metric_str(task, 'bf16-mixed:none')}"
        for other in ("bf16-mixed:dynamic", "bf16-mixed:static"):
            if other in rows:
                same = _same_curves(doc, task, "bf16-mixed:none", other)
                line += f", {other.split(':')[1]} {metric_str(task, other)}"
                if same:
                    line += " (bit-identical)"
                else:
                    c = _cmp(task, rows, other, "bf16-mixed:none")
                    if c and c[0] > c[1]:
                        needs.append(task)
        if "fp32" in rows:
            line += f", FP32 {metric_str(task, 'fp32')}"
        line += f"; BF16 activation-gradient underflow {_pct(u, 3)}"
        ev.append(line)
    if ev and bf16_compared:
        answer = (
            "No: BF16 without loss scaling is as good as with it on every task here"
            + ("." if len(bf16_compared) == len(ev) else f" where both were run ({', '.join(bf16_compared)}).")
            if not needs
            else f"Yes on {', '.join(needs)}: scaling improved the BF16 result there."
        )
        if needs:
            contra.append(f"BF16 benefited from loss scaling on {', '.join(needs)}, against Kalamkar et al.")
        out.append({"question": "Does BF16 need loss scaling here?", "answer": answer, "evidence": ev,
                    "published": PUBLISHED["bf16"], "contradicts": contra})
    else:
        missing("Does BF16 need loss scaling here?", "bf16-mixed:none and bf16-mixed:dynamic", PUBLISHED["bf16"])

    # 2. FP16 and loss scaling.
    ev, contra, needs, loses_loss, fine = [], [], [], [], []
    hurt: list[str] = []
    for task, rows in summ.items():
        if "fp16-mixed:none" not in rows:
            continue
        r = rows["fp16-mixed:none"]
        u = r["underflow"].get("fp16")
        line = (
            f"{task}: fp16-mixed without scaling {metric_str(task, 'fp16-mixed:none')}"
            f"{' (diverged)' if r['diverged'] else ''}, activation-gradient underflow {_pct(u, 2)}"
        )
        best = None
        for other in ("fp16-mixed:static", "fp16-mixed:dynamic"):
            if other in rows:
                line += f"; {other.split(':')[1]} {metric_str(task, other)}"
                c = _cmp(task, rows, other, "fp16-mixed:none")
                if c is not None:
                    best = c if best is None or c[0] > best[0] else best
        rdyn = rows.get("fp16-mixed:dynamic")
        loss_ratio = None
        if rdyn is not None and r["final_loss"] is not None and rdyn["final_loss"]:
            loss_ratio = r["final_loss"] / rdyn["final_loss"]
            line += f"; final loss without scaling {loss_ratio:.2f}x that with dynamic scaling"
        if "fp32" in rows:
            line += f"; FP32 {metric_str(task, 'fp32')}"
        if "fp32" in rows and rows["fp32"]["underflow"].get("fp16") is not None:
            line += f" (FP32 gradients that would underflow in FP16: {_pct(rows['fp32']['underflow']['fp16'], 2)})"
        ev.append(line)
        for other in ("fp16-mixed:static", "fp16-mixed:dynamic"):
            c = _cmp(task, rows, other, "fp16-mixed:none")
            if c is not None and c[0] < -c[1]:
                hurt.append(f"{other.split(':')[1]} scaling on {task} ({_fmt_gap(r['metric_name'], c[0])})")
        if "fp16-mixed:static" not in rows and "fp16-mixed:dynamic" not in rows:
            if r["diverged"]:
                needs.append(task)
            continue  # nothing to compare with: no claim either way
        if r["diverged"] or (best is not None and best[0] > best[1]):
            needs.append(task)
        elif loss_ratio is not None and loss_ratio > LOSS_RATIO_TOLERANCE and (u or 0.0) > 0.01:
            loses_loss.append(task)
        else:
            fine.append(task)
    if ev:
        parts = []
        if needs:
            parts.append(f"yes on {', '.join(needs)} (the metric drops without scaling)")
        if loses_loss:
            parts.append(
                f"partly on {', '.join(loses_loss)}: without scaling a large share of activation gradients "
                "underflows and the final training loss is higher, though the metric holds within tolerance"
            )
        if fine:
            parts.append(f"not on {', '.join(fine)} (FP16 without scaling is within tolerance there)")
        if not parts:
            parts.append("not compared: no fp16-mixed:static or fp16-mixed:dynamic run beside fp16-mixed:none")
        answer = "; ".join(parts)
        answer = answer[0].upper() + answer[1:] + "."
        if not needs and not loses_loss and fine:
            answer = "No task here needed it; " + answer[0].lower() + answer[1:]
        if fine or loses_loss:
            contra.append(
                f"FP16 without loss scaling reached the same metric as with it on {', '.join(fine + loses_loss)}: "
                "the common rule 'FP16 always needs loss scaling' does not hold for these models and budgets "
                "(Micikevicius et al. also needed none for ImageNet CNNs); underflow costs loss before it costs "
                "accuracy."
            )
        if hurt:
            contra.append(
                "Loss scaling was worse than none beyond tolerance with " + "; ".join(hurt)
                + ": skipped steps and a moving scale are not free."
            )
        out.append({"question": "Does FP16 need loss scaling here?", "answer": answer, "evidence": ev,
                    "published": PUBLISHED["fp16"], "contradicts": contra})
    else:
        missing("Does FP16 need loss scaling here?", "fp16-mixed:none and fp16-mixed:dynamic", PUBLISHED["fp16"])
    # 3. Dynamic vs static.
    ev, contra = [], []
    dyn_better: list[str] = []
    stat_better: list[str] = []
    tie: list[str] = []
    for task, rows in summ.items():
        c = _cmp(task, rows, "fp16-mixed:dynamic", "fp16-mixed:static")
        if c is None:
            continue
        rd, rs = rows["fp16-mixed:dynamic"], rows["fp16-mixed:static"]
        ev.append(
            f"{task}: dynamic {metric_str(task, 'fp16-mixed:dynamic')} ({rd['skipped_steps']:.3g} skipped steps "
            f"per run, final scale {_fmt_scales(rd)}) vs static {metric_str(task, 'fp16-mixed:static')} "
            f"(scale {_fmt_scales(rs)}, {rs['skipped_steps']:.3g} skipped)"
        )
        (dyn_better if c[0] > c[1] else stat_better if c[0] < -c[1] else tie).append(task)
    if ev:
        parts = []
        if dyn_better:
            parts.append(f"dynamic better on {', '.join(dyn_better)}")
        if stat_better:
            parts.append(f"static better on {', '.join(stat_better)}")
        if tie:
            parts.append(f"no difference beyond tolerance on {', '.join(tie)}")
        answer = "; ".join(parts)
        answer = answer[0].upper() + answer[1:] + ". A static power of two from the diagnostics skips no steps."
        if dyn_better and not stat_better:
            contra.append("Zhao et al. found static beating dynamic on SSD; here dynamic won where they differ.")
        out.append({"question": "Does dynamic scaling beat static?", "answer": answer, "evidence": ev,
                    "published": PUBLISHED["dynamic"], "contradicts": contra})
    else:
        missing("Does dynamic scaling beat static?", "fp16-mixed:static and fp16-mixed:dynamic", PUBLISHED["dynamic"])

    # 4. Pure BF16: Kahan / stochastic rounding.
    ev, contra, gap_tasks = [], [], []
    closed: dict[str, list[str]] = {"kahan": [], "stochastic": []}
    for task, rows in summ.items():
        if "bf16-pure:none" not in rows or "fp32" not in rows:
            continue
        line = f"{task}: FP32 {metric_str(task, 'fp32')}, bf16-pure nearest {metric_str(task, 'bf16-pure:none')}"
        sw = rows["bf16-pure:none"]["swamping"].get("bf16")
        line += f" (swamped updates {_pct(sw, 1)})"
        c0 = _cmp(task, rows, "bf16-pure:none", "fp32")
        has_gap = c0 is not None and c0[0] < -c0[1]
        if has_gap:
            gap_tasks.append(task)
        for comp in ("kahan", "stochastic"):
            cfg = f"bf16-pure:{comp}"
            if cfg in rows:
                line += f", {comp} {metric_str(task, cfg)}"
                c = _cmp(task, rows, cfg, "fp32")
                if has_gap and c is not None and c[0] >= -c[1]:
                    closed[comp].append(task)
        ev.append(line)
    if ev:
        if not gap_tasks:
            answer = (
                "There is no pure-BF16 gap to close on these tasks and budgets: nearest rounding already "
                "matches FP32."
            )
            sw = [
                v for rows in summ.values() if "bf16-pure:none" in rows
                for v in [rows["bf16-pure:none"]["swamping"].get("bf16")] if v is not None
            ]
            lost = (
                f" although {_pct(min(sw), 0)} to {_pct(max(sw), 0)} of its weight updates were swamped" if sw else ""
            )
            contra.append(
                f"Pure BF16 with nearest rounding matched FP32 here{lost}, unlike Zamirai et al.'s loss of up to "
                "7%: at these budgets the lost updates did not cost accuracy."
            )
        else:
            bits = [f"pure BF16 with nearest rounding falls short of FP32 on {', '.join(gap_tasks)}"]
            ran = {c for rows in summ.values() for c in ("kahan", "stochastic") if f"bf16-pure:{c}" in rows}
            for comp, ts in closed.items():
                if comp not in ran:
                    continue
                bits.append(f"{comp} closes it on {', '.join(ts) if ts else 'none of them'}")
            answer = "; ".join(bits)
            answer = answer[0].upper() + answer[1:] + "."
        out.append({"question": "Does Kahan summation or stochastic rounding close the pure-BF16 gap?",
                    "answer": answer, "evidence": ev, "published": PUBLISHED["pure"], "contradicts": contra})
    else:
        missing("Does Kahan summation or stochastic rounding close the pure-BF16 gap?",
                "fp32, bf16-pure:none, bf16-pure:kahan and bf16-pure:stochastic", PUBLISHED["pure"])

    # 5. FP8.
    ev, contra, needs = [], [], []
    fp8_trained: list[str] = []
    fp8_failed: list[str] = []
    fp8_unknown: list[str] = []
    for task, rows in summ.items():
        if "fp8-hybrid:none" not in rows:
            continue
        r = rows["fp8-hybrid:none"]
        state = _fp8_state(doc, task, rows)
        {"trained": fp8_trained, "failed": fp8_failed, "unknown": fp8_unknown}[state].append(task)
        line = (
            f"{task}: fp8-hybrid without scaling {metric_str(task, 'fp8-hybrid:none')}"
            f"{' (diverged)' if r['diverged'] else ''}, E5M2 gradient underflow {_pct(r['underflow'].get('e5m2'), 2)}"
        )
        if "fp8-hybrid:dynamic" in rows:
            rd = rows["fp8-hybrid:dynamic"]
            line += (
                f"; with dynamic scaling {metric_str(task, 'fp8-hybrid:dynamic')}, underflow "
                f"{_pct(rd['underflow'].get('e5m2'), 2)}, {rd['skipped_steps']:.3g} skipped steps per run"
            )
            c = _cmp(task, rows, "fp8-hybrid:dynamic", "fp8-hybrid:none")
            if r["diverged"] or (c is not None and c[0] > c[1]):
                needs.append(task)
        if "fp32" in rows:
            c = _cmp(task, rows, "fp8-hybrid:dynamic" if "fp8-hybrid:dynamic" in rows else "fp8-hybrid:none",
                     "fp32")
            if c is not None:
                line += f"; best FP8 gap to FP32 {_fmt_gap(r['metric_name'], c[0])}"
        ev.append(line)
    if ev:
        parts = []
        if needs:
            parts.append(f"E5M2 gradients needed loss scaling on {', '.join(needs)}")
        failed_alone = [t for t in fp8_failed if t not in needs]
        if failed_alone:
            parts.append(
                f"FP8 without loss scaling did not train on {', '.join(failed_alone)} (at chance, diverged or far "
                "below FP32); whether scaling recovers it was not measured there: run fp8-hybrid:dynamic"
                if not any("fp8-hybrid:dynamic" in summ[t] for t in failed_alone)
                else f"FP8 without loss scaling did not train on {', '.join(failed_alone)}"
            )
        trained = [t for t in fp8_trained if t not in needs]
        if trained:
            parts.append(f"FP8 (E4M3 forward with per-tensor current scaling) trained without loss scaling on "
                         f"{', '.join(trained)} (within tolerance of FP32)")
        if fp8_unknown:
            parts.append(f"on {', '.join(fp8_unknown)} there is no FP32 run to compare with: run fp32")
        answer = "; ".join(parts) + (
            "; every FP8 run here used per-tensor current scaling of the E4M3 forward operands (not varied: "
            "without it typical weights fall into E4M3's subnormals)."
        )
        out.append({"question": "What does FP8 need?", "answer": answer, "evidence": ev,
                    "published": PUBLISHED["fp8"], "contradicts": contra})
    else:
        missing("What does FP8 need?", "fp8-hybrid:none and fp8-hybrid:dynamic", PUBLISHED["fp8"])
    return out


# ----------------------------------------------------------------------------------------------------------
# Plots


_FORMAT_WINDOWS: tuple[tuple[str, str], ...] = (("bf16", "tab:blue"), ("fp16", "tab:orange"), ("e5m2", "tab:red"))


def _savefig(fig: Any, outdir: str, fname: str) -> None:
    """Save a figure as PNG inside ``outdir`` (checked), atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write(contained(outdir, fname), buf.getvalue())


def _plots(doc: Mapping[str, Any], task: str, outdir: str) -> dict[str, str]:
    """Write the task's three PNGs into ``outdir``; returns {kind: file name}."""
    import matplotlib

    from ..formats import FloatFormat
    from ..plots import new_figure  # the Figure API: the user's pyplot state and backend stay untouched

    runs = [r for r in doc["runs"] if r["task"] == task]
    order = {c: i for i, c in enumerate(CONFIG_NAMES)}
    configs = sorted({r["config"] for r in runs}, key=lambda c: order.get(c, 99))
    files: dict[str, str] = {}
    cmap = matplotlib.colormaps["tab20"]

    # 1. Loss curves (mean over seeds, moving average for readability).
    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    for i, cfg in enumerate(configs):
        curves = [r["loss_curve"] for r in runs if r["config"] == cfg]
        n = min(len(c) for c in curves)
        ys = []
        for t in range(n):
            vals = [c[t] for c in curves]
            ys.append(math.nan if any(v is None for v in vals) else statistics.fmean(vals))
        w = max(1, n // 30)
        sm = []
        for t in range(n):
            window = ys[max(0, t - w + 1) : t + 1]
            sm.append(math.nan if any(math.isnan(v) for v in window) else statistics.fmean(window))
        style = "-" if cfg.endswith(("dynamic", "kahan")) or cfg == "fp32" else "--" if cfg.endswith("none") else ":"
        ax.plot(range(n), sm, style, color=cmap(i % 20), label=cfg, lw=1.5 if cfg == "fp32" else 1.0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title(f"{task}: loss curves per configuration")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    files["loss"] = f"{task}_loss.png"
    _savefig(fig, outdir, files["loss"])

    # 2. Loss-scale trajectories with skipped steps.
    fig = new_figure(8, 4)
    ax = fig.subplots()
    any_scaled = False
    for i, cfg in enumerate(configs):
        rs = [r for r in runs if r["config"] == cfg and r["scaling"] != "none"]
        if not rs:
            continue
        any_scaled = True
        r = min(rs, key=lambda r: r["seed"])
        traj = [math.log2(s) if s > 0 else math.nan for s in r["scale_trajectory"]]
        ax.step(range(len(traj)), traj, where="post", color=cmap(i % 20), label=f"{cfg} (seed {r['seed']})")
        sk = [s for s in r["skipped_at"] if s < len(traj)]
        if sk:
            ax.scatter(sk, [traj[s] for s in sk], marker="x", color=cmap(i % 20), s=25, zorder=3)
    ax.set_xlabel("step (x: skipped step)")
    ax.set_ylabel("log2(loss scale)")
    ax.set_title(f"{task}: loss-scale trajectory" + ("" if any_scaled else " (no scaled configuration run)"))
    if any_scaled:
        ax.legend(fontsize=7)
    fig.tight_layout()
    files["scale"] = f"{task}_scale.png"
    _savefig(fig, outdir, files["scale"])

    # 3. FP32 activation-gradient exponent histogram against each format's window.
    fig = new_figure(8, 4)
    ax = fig.subplots()
    ref = [r for r in runs if r["config"] == "fp32"] or runs
    h = min(ref, key=lambda r: r["seed"])["grad_exponent_histogram"]
    counts = h["counts"]
    total = float(sum(counts)) or 1.0
    xs = [h["min_log2"] + i for i in range(len(counts))]
    ax.bar(xs, [c / total for c in counts], width=1.0, color="0.35", label=f"{ref[0]['config']} activation gradients")
    for k, (name, color) in enumerate(_FORMAT_WINDOWS):
        f = FloatFormat.parse(name)
        lo_sub, lo_norm, hi = math.log2(f.min_subnormal), math.log2(f.min_normal), math.log2(f.max)
        ax.axvspan(lo_norm, hi, ymin=0.9 - 0.07 * k, ymax=0.96 - 0.07 * k, color=color, alpha=0.6,
                   label=f"{name} normal [2^{lo_norm:.0f}, 2^{hi:.0f}]")
        ax.axvspan(lo_sub, lo_norm, ymin=0.9 - 0.07 * k, ymax=0.96 - 0.07 * k, color=color, alpha=0.2)
        ax.axvline(lo_sub - 1, color=color, ls=":", lw=0.8)
    if xs:
        ax.set_xlim(min(xs[0], -30) - 2, max(xs[-1], 17) + 2)
    ax.set_xlabel("ceil(log2 |gradient|)   (light: subnormal range; dotted: rounds to zero below)")
    ax.set_ylabel("fraction of nonzero gradients")
    ax.set_title(f"{task}: gradient exponents vs format windows (scale 1)")
    ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    files["hist"] = f"{task}_grad_hist.png"
    _savefig(fig, outdir, files["hist"])
    return files


# ----------------------------------------------------------------------------------------------------------
# Report documents


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def write_report(doc: Mapping[str, Any], outdir: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``report.md``, ``report.html`` (images inline as data URIs) and the PNGs into ``outdir``;
    returns ``{"md": path, "html": path}``. Refuses (:class:`SchemaError`, before writing anything) a
    document naming an unknown task or configuration or holding a run twice; every file written is checked
    to resolve inside ``outdir``."""
    check_names(doc)
    outdir = os.fspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    cfg, env = doc["config"], doc["environment"]
    summ = summarise(doc)
    md: list[str] = []
    hb: list[str] = []

    def inline(text: str) -> str:
        out = html.escape(text)
        out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", out)

    def para(text: str) -> None:
        md.append(text + "\n")
        hb.append(f"<p>{inline(text)}</p>")

    def heading(level: int, text: str) -> None:
        md.append(f"{'#' * level} {text}\n")
        hb.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        md.append(_md_table(header, rows) + "\n")
        hb.append(_html_table(header, rows))

    def image(fname: str, alt: str) -> None:
        md.append(f"![{alt}]({fname})\n")
        with open(contained(outdir, fname), "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
        hb.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'
                  f"<figcaption>{html.escape(alt)}</figcaption></figure>")

    def bullets(items: Sequence[str]) -> None:
        md.append("\n".join(f"- {i}" for i in items) + "\n")
        hb.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")

    heading(1, f"lossscale case studies ({cfg['mode']} mode)")
    machine = f"{env.get('processor', '?')}, {env.get('cpu_count', '?')} CPUs" + (
        f", GPU {env['gpu']}" if env.get("gpu") else ""
    )
    para(
        f"Command: `{doc.get('command', 'lossscale study')}`. Machine: {machine}; device {env['device']}, "
        f"{cfg['workers']} worker(s) x {env['threads_per_run']} thread(s); torch {env['torch']}. "
        f"Seeds: {', '.join(str(s) for s in cfg['seeds'])}. Created {doc.get('created', '?')}."
    )
    para(
        "Low precision is emulated on CPU (FP32 arithmetic rounded where GPU hardware rounds, "
        "lossscale.autocast); underflow fractions of low-precision runs come from the emulation's rounding "
        "sites (activation gradients rounded to the gradient format, element-weighted over the run), those of "
        "FP32 runs say what would underflow in BF16/FP16 at scale 1 (lossscale.GradientMonitor). Final loss is "
        "the mean training loss over the last 10% of steps."
    )
    heading(2, "Summary")
    header, rows = summary_rows(doc)
    table(header, rows)

    from .ledger import LEDGER_HEADER, ledger_rows
    from .targets import run_targets

    heading(2, "Claims ledger")
    para(
        "Each claim of the article this product answers (\"Understanding the Need for Loss Scaling in BF16 Deep "
        "Networks\") beside what this run measured, with a verdict computed from results.json: supported or "
        "contradicted when the effect has the claimed or the opposite sign and exceeds both a floor (1 accuracy "
        "point, 1 BLEU, 2% of the loss, one evaluation interval of steps, 1 point of underflow, 5% of the step "
        "time) and 2 standard deviations over seeds; inconclusive otherwise; not measured here (with what would "
        "measure it) when the configuration, sweep or device was not run. Runs that ended bit-identical have an "
        "exactly zero effect: a claim that scaling changes something is then contradicted. Equivalence claims "
        "(\"consistent with\", \"comparable\") are supported when the gap stays inside the floor."
    )
    table(LEDGER_HEADER, ledger_rows(doc))
    targets = run_targets(doc)

    for task, rows_by_cfg in summ.items():
        if not rows_by_cfg:
            continue
        detail = cfg["task_details"].get(task, {})
        heading(2, f"Task `{task}`")
        para(
            f"{detail.get('description', '')}. Data: {detail.get('data', '?')}. Optimizer and schedule: "
            f"{detail.get('recipe', '?')}. Budget: {detail.get('budget', {}).get('steps', '?')} steps of batch "
            f"{detail.get('budget', {}).get('batch_size', '?')}. Metric: {detail.get('metric_name', '?')} "
            f"(chance {detail.get('chance', '?')})."
        )
        table(TASK_TABLE_HEADER, task_table(rows_by_cfg))
        if targets.get(task):
            para(
                "Steps to target: the first evaluation (every budget/20 steps) at which the metric reaches "
                + ("95% of" if next(iter(targets[task].values()))["higher_is_better"] else "1.05x")
                + " FP32's final value of the same seed (never: not within the budget); training loss at "
                "fractions of the budget (mean over the budget/20 steps ending there)."
            )
            table(TARGETS_HEADER, targets_table(targets[task]))
        speed = speed_table(doc, task)
        if speed:
            para("Speed and memory on the GPU: mean training step time (evaluations excluded) and peak allocated "
                 "memory (torch.cuda.max_memory_allocated) per configuration; native: torch.autocast kernels, "
                 "else emulated (FP32 arithmetic with rounding: slower than FP32 by construction).")
            table(SPEED_HEADER, speed)
        files = _plots(doc, task, outdir)
        image(files["loss"], f"{task}: loss curves per configuration")
        image(files["scale"], f"{task}: loss-scale trajectory, skipped steps marked x")
        image(files["hist"], f"{task}: FP32 activation-gradient exponents against the BF16, FP16 and E5M2 windows")

    sweeps = doc.get("sweeps") or {}
    if sweeps:
        from .sweeps import SWEEP_TABLE_HEADER, SWEEPS, sweep_plot, sweep_table

        heading(2, "Sweeps")
        for name, sw in sweeps.items():
            if not sw.get("runs"):
                continue
            heading(3, f"Sweep `{name}`")
            spec = SWEEPS.get(name)
            secs = sum(float(r["seconds"]) for r in sw["runs"])
            para(
                (spec.question + " " if spec else "")
                + f"{len(sw['runs'])} runs ({sw.get('mode', '?')} budgets), {secs / 60:.1f} CPU-minutes of runs. "
                "Underflow: activation gradients rounded to zero in the run's gradient format (FP32 runs: what "
                "would underflow in BF16 and FP16 at scale 1)."
            )
            table(SWEEP_TABLE_HEADER, sweep_table(sw["runs"], _fmt_metric))
            image(sweep_plot(name, sw["runs"], outdir), f"sweep {name}: metric and underflow against {name}")

    heading(2, "Findings")
    para(
        "Each question answered from the numbers above; the published results are quoted beside them. A "
        "difference counts when it exceeds the larger of 1 accuracy point (2 BLEU), 2 standard deviations over "
        "seeds and, for accuracy, 2 binomial standard errors of the test set; FP16 'loses loss' when its final "
        "training loss is more than 5% above the dynamically scaled run's."
    )
    for f in findings(doc):
        heading(3, f["question"])
        para(f"**Answer (this run):** {f['answer']}")
        bullets(f["evidence"])
        para(f"**Published:** {f['published']}")
        if f["contradicts"]:
            para("**Where the data contradict common belief:** " + " ".join(f["contradicts"]))

    md_path = os.path.join(outdir, "report.md")
    atomic_write(contained(outdir, "report.md"), "\n".join(md))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;"
        "font-size:90%}td,th{border:1px solid #bbb;padding:2px 6px;text-align:left}img{max-width:100%}"
    )
    html_path = os.path.join(outdir, "report.html")
    atomic_write(
        contained(outdir, "report.html"),
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lossscale study</title>"
        f"<style>{style}</style></head><body>{''.join(hb)}</body></html>\n",
    )
    return {"md": md_path, "html": html_path}


def now_iso() -> str:
    """UTC timestamp for results.json."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
