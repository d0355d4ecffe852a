"""Sweeps: one study parameter varied over the values the article's claims imply.

=================  ==================  ===================  ==================================================
sweep              tasks               values               question
=================  ==================  ===================  ==================================================
``seq-len``        rnn, lm-lstm        64, 256, 1024        does FP16 underflow grow with sequence length,
                                                            does BF16 ever underflow?
``batch``          cnn                 16, 64, 256, 1024    does dynamic scaling matter more at large batch
                                                            (skipped steps, final scale, metric)?
``label-noise``    cnn                 0, 0.2, 0.4          does loss scaling change generalisation under
                                                            noisy labels?
=================  ==================  ===================  ==================================================

Each sweep runs :data:`SWEEP_CONFIGS` (FP32, BF16 and FP16 mixed, without and with dynamic scaling; seq-len
drops fp16-mixed:dynamic) at every value, with the task's budget of the chosen mode (``--quick`` budgets by
default: a sweep multiplies the runs; seq-len runs 4 steps of batch 16, its measure being underflow), and stores
its records under ``results.json["sweeps"][name]`` (each with ``sweep_value``). The report gets one table
and one plot per sweep; the claims ledger reads them.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .runner import RunSpec

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["Sweep", "SWEEPS", "SWEEP_CONFIGS", "plan_sweep", "sweep_table", "sweep_figure", "SWEEP_TABLE_HEADER"]

SWEEP_CONFIGS: tuple[str, ...] = (
    "fp32", "bf16-mixed:none", "bf16-mixed:dynamic", "fp16-mixed:none", "fp16-mixed:dynamic",
)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep: its name, the budget override it varies (:data:`lossscale.study.tasks.OVERRIDES`), the tasks
    and values, and the question it answers."""

    name: str
    override: str
    tasks: tuple[str, ...]
    values: tuple[Any, ...]
    question: str
    configs: tuple[str, ...] = SWEEP_CONFIGS
    steps: int | None = None  # a fixed step count instead of the mode's budget (cost), or None
    batch_size: int | None = None  # a fixed batch size instead of the mode's budget (cost), or None


SWEEPS: dict[str, Sweep] = {
    # The emulated LSTMs are slow at 1024 steps (measured on a shared 2-core machine: one FP16-emulated step of
    # batch 16 took 2.8 s for rnn; one of batch 64 took 207 s under heavy load): the sweep measures underflow
    # (every step sampled) over a fixed 4 steps of batch 16.
    "seq-len": Sweep("seq-len", "seq_len", ("rnn", "lm-lstm"), (64, 256, 1024),
                     "Does FP16 underflow grow with sequence length; does BF16 ever underflow? (4 steps of batch 16 "
                     "per run: underflow, not the metric, is the measure here.)",
                     configs=("fp32", "bf16-mixed:none", "bf16-mixed:dynamic", "fp16-mixed:none"), steps=4,
                     batch_size=16),
    "batch": Sweep("batch", "batch_size", ("cnn",), (16, 64, 256, 1024),
                   "Does dynamic loss scaling matter more at large batch sizes (skipped steps, final scale, metric)?"),
    "label-noise": Sweep("label-noise", "label_noise", ("cnn",), (0.0, 0.2, 0.4),
                         "Does loss scaling change generalisation when training labels are noisy?"),
}


def plan_sweep(name: str, seeds: Sequence[int], *, mode: str, device: str,
               configs: Sequence[str] | None = None, tasks: Sequence[str] | None = None) -> list[RunSpec]:
    """Every (value, task, configuration, seed) run of sweep ``name``, value-major (``tasks``: a subset of
    the sweep's tasks)."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; valid sweeps: {', '.join(SWEEPS)}")
    sw = SWEEPS[name]
    chosen = sw.tasks if tasks is None else tuple(tasks)
    bad = [t for t in chosen if t not in sw.tasks]
    if bad:
        raise ValueError(f"sweep {name} runs on {', '.join(sw.tasks)}, not {', '.join(bad)}")
    fixed: tuple[tuple[str, Any], ...] = tuple(
        (k, v) for k, v in (("steps", sw.steps), ("batch_size", sw.batch_size)) if v is not None
    )
    return [
        RunSpec(t, c, s, mode, device, overrides=((sw.override, v), *fixed))
        for v in sw.values for t in chosen for s in seeds for c in (sw.configs if configs is None else configs)
    ]


def record_key(rec: Mapping[str, Any]) -> tuple[str, str, int, str]:
    """What identifies a sweep record (for resuming): task, configuration, seed, swept value."""
    return (rec["task"], rec["config"], int(rec["seed"]), repr(rec["sweep_value"]))


def spec_key(spec: RunSpec) -> tuple[str, str, int, str]:
    """:func:`record_key` of the record ``spec`` will produce (the swept value is its first override)."""
    return (*spec.key, repr(spec.overrides[0][1]))


SWEEP_TABLE_HEADER = ["task", "value", "config", "metric", "underflow", "skipped steps", "final scale", "seeds"]


def _mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def sweep_table(runs: Sequence[Mapping[str, Any]], fmt_metric: Callable[[str, float | None], str]) -> list[list[str]]:
    """One row per (task, value, configuration): metric mean over seeds, underflow of the gradient format
    (FP32: what would underflow in BF16 and FP16), skipped steps and final scale (means)."""
    rows = []
    order = {c: i for i, c in enumerate(SWEEP_CONFIGS)}
    keys = sorted({(r["task"], r["sweep_value"], r["config"]) for r in runs},
                  key=lambda k: (k[0], k[1], order.get(k[2], 99)))
    for task, value, cfg in keys:
        rs = [r for r in runs if (r["task"], r["sweep_value"], r["config"]) == (task, value, cfg)]
        name = rs[0]["metric_name"]
        m = _mean([float(r["metric"]) for r in rs if r["metric"] is not None])
        under: dict[str, list[float]] = {}
        for r in rs:
            for k, v in r["underflow_fraction"].items():
                if v is not None:
                    under.setdefault(k, []).append(float(v))
        under_txt = ", ".join(f"{k} {100 * statistics.fmean(v):.2f}%" for k, v in under.items()) or "n/a"
        scales = [float(r["final_scale"]) for r in rs if r["final_scale"] is not None]
        rows.append([
            task, f"{value:g}", cfg, fmt_metric(name, m), under_txt,
            f"{statistics.fmean(float(r['skipped_steps']) for r in rs):.3g}",
            "-" if not scales else f"{statistics.median(scales):.4g}", str(len(rs)),
        ])
    return rows


def sweep_figure(name: str, runs: Sequence[Mapping[str, Any]]) -> Figure:
    """The metric (left) and the gradient-format underflow (right) against the swept value, one line per
    (task, configuration); the report saves it as ``sweep_<name>.png``."""
    from ..plots import new_figure  # the Figure API: the user's pyplot state and backend stay untouched

    fig = new_figure(11, 4)
    ax_m, ax_u = fig.subplots(1, 2)
    tasks = sorted({r["task"] for r in runs})
    for task in tasks:
        for cfg in SWEEP_CONFIGS:
            rs = [r for r in runs if r["task"] == task and r["config"] == cfg]
            if not rs:
                continue
            values = sorted({r["sweep_value"] for r in rs})
            ms, us = [], []
            for v in values:
                vr = [r for r in rs if r["sweep_value"] == v]
                ms.append(_mean([float(r["metric"]) for r in vr if r["metric"] is not None]) or float("nan"))
                fmt = "fp16" if cfg == "fp32" else (vr[0].get("grad_format") or "fp16")
                u = [float(r["underflow_fraction"][fmt]) for r in vr if r["underflow_fraction"].get(fmt) is not None]
                us.append(100 * statistics.fmean(u) if u else float("nan"))
            label = f"{task} {cfg}" if len(tasks) > 1 else cfg
            style = "--" if cfg.endswith(":none") else "-"
            ax_m.plot(values, ms, style, marker="o", label=label)
            if cfg != "fp32":
                ax_u.plot(values, us, style, marker="o", label=label)
    sw = SWEEPS.get(name)
    for ax in (ax_m, ax_u):
        ax.set_xlabel(sw.override if sw else name)
        if name in ("seq-len", "batch"):
            ax.set_xscale("log", base=2)
    ax_m.set_ylabel("metric (held-out loss: lower is better)")
    ax_u.set_ylabel("activation-gradient underflow (%)")
    ax_m.set_title(f"sweep {name}: metric")
    ax_u.set_title(f"sweep {name}: underflow in the gradient format")
    ax_m.legend(fontsize=6)
    ax_u.legend(fontsize=6)
    fig.tight_layout()
    return fig
