"""The study's report: ``report.md`` and ``report.html`` (figures inline) rendered from a results document.

Per task the report has a table of every configuration (metric mean +- std over seeds and its gap to FP32,
final loss, skipped steps, final scale, underflow and swamping fractions, time), the steps to target, the
speed on a GPU, and three figures (:mod:`lossscale.plots`): the loss curves, the loss-scale trajectories with
skipped steps marked, and the FP32 activation-gradient exponent histogram against each format's window. The
claims ledger (:mod:`lossscale.study.ledger`), the sweeps (:mod:`lossscale.study.sweeps`) and the findings
(:mod:`lossscale.study.analysis`) follow. The results file and its schema are :mod:`lossscale.study.schema`.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._metrics import RELATIVE_TOLERANCE, fmt_fractions, fmt_gap, fmt_metric, fmt_scales, pct
from .configs import CONFIG_NAMES
from .files import atomic_write, contained
from .analysis import findings, summarise
from .schema import check_names

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "summary_rows",
    "task_table",
    "speed_table",
    "targets_table",
    "TASK_TABLE_HEADER",
    "SPEED_HEADER",
    "TARGETS_HEADER",
    "write_report",
    "save_figure",
]


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
            m = fmt_metric(r["metric_name"], r["metric_mean"])
            if len(r["metrics"]) > 1:
                sd = r["metric_std"] or 0.0
                m += f" +- {100 * sd:.1f}" if r["metric_name"] == "accuracy" else (
                    f" +- {sd:.3f}" if r["metric_name"] in RELATIVE_TOLERANCE else f" +- {sd:.1f}")
            if c != "fp32" and r["gap"] is not None:
                m += f" ({fmt_gap(r['metric_name'], r['gap'])})"
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
        m = fmt_metric(name, r["metric_mean"])
        if len(r["metrics"]) > 1:
            sd = r["metric_std"] or 0.0
            m += f" +- {100 * sd:.1f}" if name == "accuracy" else (
                f" +- {sd:.3f}" if name in RELATIVE_TOLERANCE else f" +- {sd:.1f}")
        extra = {k: v for k, v in r["extra"].items() if k not in (name, "test_loss")}
        if extra:
            m += " (" + ", ".join(f"{k} {pct(v) if v <= 1 else f'{v:.2f}'}" for k, v in extra.items()) + ")"
        out.append([
            cfg,
            m,
            "-" if cfg == "fp32" else fmt_gap(name, r["gap"]),
            "diverged" if r["final_loss"] is None else f"{r['final_loss']:.4g}",
            f"{r['skipped_steps']:.3g}",
            fmt_scales(r),
            fmt_fractions(r["underflow"]),
            pct(r["swamping"].get("bf16"), 2),
            f"{r['seconds']:.1f}",
        ])
    return out



def save_figure(fig: Figure, outdir: str, fname: str) -> str:
    """Save a figure as PNG inside ``outdir`` (the path checked to resolve inside it), atomically; returns
    ``fname``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write(contained(outdir, fname), buf.getvalue())
    return fname


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
        from .. import plots

        image(save_figure(plots.study_loss_figure(doc, task), outdir, f"{task}_loss.png"),
              f"{task}: loss curves per configuration")
        image(save_figure(plots.study_scale_figure(doc, task), outdir, f"{task}_scale.png"),
              f"{task}: loss-scale trajectory, skipped steps marked x")
        image(save_figure(plots.study_gradient_figure(doc, task), outdir, f"{task}_grad_hist.png"),
              f"{task}: FP32 activation-gradient exponents against the BF16, FP16 and E5M2 windows")

    sweeps = doc.get("sweeps") or {}
    if sweeps:
        from .sweeps import SWEEP_TABLE_HEADER, SWEEPS, sweep_figure, sweep_table

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
            table(SWEEP_TABLE_HEADER, sweep_table(sw["runs"], fmt_metric))
            image(save_figure(sweep_figure(name, sw["runs"]), outdir, f"sweep_{name}.png"),
                  f"sweep {name}: metric and underflow against {name}")

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

