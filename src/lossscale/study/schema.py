"""``results.json``: its JSON Schema (:data:`RESULTS_SCHEMA`), the validator, and atomic reading and writing.

``results.json`` is self-describing: ``schema_version``, the resolved configuration (tasks, configurations,
seeds, budgets, recipes), the environment, and one record per (task, configuration, seed) in ``runs``
(:data:`RESULTS_SCHEMA` lists every field; :func:`validate` checks a document against it). Everything the
report says is computed from this file alone (:mod:`lossscale.study.analysis`, :mod:`lossscale.study.report`),
so ``lossscale study --resume`` and a re-render give the same report.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping
from typing import Any, get_args

from .configs import CONFIG_NAMES, Compensation, PrecisionName, Scaling
from .files import atomic_write

__all__ = [
    "SCHEMA_VERSION",
    "RESULTS_SCHEMA",
    "RUN_SCHEMA",
    "SchemaError",
    "validate",
    "check_names",
    "load_results",
    "write_results",
    "now_iso",
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
        # The enums are the configuration types' own (one source: a new variant cannot be refused here).
        "precision": {"type": "string", "enum": list(get_args(PrecisionName))},
        "scaling": {"type": "string", "enum": list(get_args(Scaling))},
        "compensation": {"type": "string", "enum": list(get_args(Compensation))},
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



def now_iso() -> str:
    """UTC timestamp for results.json."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
