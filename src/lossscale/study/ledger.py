"""The claims ledger: each claim of the article this product answers ("Understanding the Need for Loss Scaling
in BF16 Deep Networks"), quoted in a few words, beside what a study measured and a verdict computed from its
results.json alone.

Verdicts (:func:`verdict`), with the effect signed so that positive is the claimed direction:

- *supported* / *contradicted*: the effect has the claimed / the opposite sign and exceeds both a floor
  (1 accuracy point, 1 BLEU, 2% of the loss, one evaluation interval of steps, 5% of the step time, 1
  percentage point of underflow) and 2 standard deviations over seeds (the larger of the two configurations'
  standard deviations);
- *inconclusive* otherwise;
- *not measured here*, with the command that would measure it, when a configuration, sweep or device the claim
  needs was not run.

Two refinements, both stated in the report: when every seed of the two configurations ended bit-identical
(same loss curve and metric), the effect is exactly zero, not noise, and a claim that scaling changes
something is *contradicted*; a claim of equivalence ("consistent with FP32", "comparable BLEU") is
*supported* when the difference stays inside the floor with a spread that can resolve it (2 sd <= floor),
*contradicted* when it falls short by more than the threshold, and *inconclusive* otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .targets import run_targets

__all__ = [
    "SUPPORTED",
    "CONTRADICTED",
    "INCONCLUSIVE",
    "NOT_MEASURED",
    "CLAIMS",
    "verdict",
    "equivalence_verdict",
    "ledger",
    "LEDGER_HEADER",
    "ledger_rows",
    "ledger_summary",
]

Verdict = Literal["supported", "contradicted", "inconclusive", "not measured here"]
SUPPORTED: Verdict = "supported"
CONTRADICTED: Verdict = "contradicted"
INCONCLUSIVE: Verdict = "inconclusive"
NOT_MEASURED: Verdict = "not measured here"

# Floors of the metric effects (accuracy as a fraction; BLEU in points; losses relative).
METRIC_FLOOR: dict[str, float] = {"accuracy": 0.01, "bleu": 1.0}
RELATIVE_METRIC_FLOOR: dict[str, float] = {"heldout_loss": 0.02}
UNDERFLOW_FLOOR = 0.01  # 1 percentage point of activation gradients
SPEED_FLOOR = 0.05  # 5% of the FP32 step time

CLAIMS: dict[str, str] = {
    "bf16-underflow": "BF16 training needs loss scaling \"to avoid gradient underflow\"",
    "fewer-iterations": "loss scaling brings \"more rapid convergence ... fewer iterations\"",
    "noisy-data": "loss scaling brings \"robustness ... against noisy data\"",
    "generalize": "loss-scaled models \"generalize better\"",
    "resnet-speed": "ResNet: \"speed by approximately 30%\"",
    "resnet-accuracy": "ResNet: accuracy \"consistent with\" FP32",
    "rnn-underflow": "RNNs on \"long sequence\" data: \"reduction in gradient underflow\"",
    "rnn-accuracy": "RNNs: \"accuracy by approximately 5%\"",
    "transformer-bleu": "Transformer: \"comparable, if not superior, BLEU\"",
    "transformer-time": "Transformer: \"reductions in training time\"",
    "batch": "dynamic scaling matters most with \"large batch sizes\"",
    "high-dim": "dynamic scaling matters most with \"high-dimensional data\"",
}


def verdict(effect: float, sd: float, floor: float, *, identical: bool = False) -> Verdict:
    """The verdict on an effect signed so that positive is the claimed direction: beyond ``max(floor,
    2 sd)`` one way or the other, else inconclusive; ``identical`` (exactly zero effect, every seed
    bit-identical) contradicts a claim that something changes."""
    if not (math.isfinite(effect) and math.isfinite(sd)) or floor < 0 or sd < 0:
        raise ValueError(f"effect and sd must be finite, sd and floor >= 0; got {effect}, {sd}, {floor}")
    if identical:
        return CONTRADICTED
    threshold = max(floor, 2.0 * sd)
    if effect > threshold:
        return SUPPORTED
    if effect < -threshold:
        return CONTRADICTED
    return INCONCLUSIVE


def equivalence_verdict(effect: float, sd: float, floor: float) -> Verdict:
    """The verdict on "A is consistent with / comparable to B" (``effect`` = A - B, positive = A better):
    contradicted when A falls short by more than ``max(floor, 2 sd)``; supported when A is no worse than
    ``-floor`` and the spread resolves the floor (2 sd <= floor); inconclusive otherwise."""
    if not (math.isfinite(effect) and math.isfinite(sd)) or floor < 0 or sd < 0:
        raise ValueError(f"effect and sd must be finite, sd and floor >= 0; got {effect}, {sd}, {floor}")
    if effect < -max(floor, 2.0 * sd):
        return CONTRADICTED
    if effect >= -floor and 2.0 * sd <= floor:
        return SUPPORTED
    return INCONCLUSIVE


# ----------------------------------------------------------------------------------------------------------
# Reading results.json


def _runs(doc: Mapping[str, Any], task: str, config: str) -> list[Mapping[str, Any]]:
    return sorted((r for r in doc["runs"] if r["task"] == task and r["config"] == config), key=lambda r: r["seed"])


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _identical(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
    ma, mb = {r["seed"]: r for r in a}, {r["seed"]: r for r in b}
    seeds = set(ma) & set(mb)
    return bool(seeds) and all(
        ma[s]["loss_curve"] == mb[s]["loss_curve"] and ma[s]["metric"] == mb[s]["metric"] for s in seeds
    )


def _metric_floor(name: str, *values: float) -> float:
    if name in RELATIVE_METRIC_FLOOR:
        return RELATIVE_METRIC_FLOOR[name] * max(abs(v) for v in values)
    return METRIC_FLOOR.get(name, 0.01)


def _fmt(name: str, x: float) -> str:
    if name == "accuracy":
        return f"{100 * x:.1f}%"
    if name in RELATIVE_METRIC_FLOOR:
        return f"{x:.3f}"
    return f"{x:.1f}"


def _fmt_diff(name: str, x: float) -> str:
    if name == "accuracy":
        return f"{100 * x:+.1f} pt"
    if name in RELATIVE_METRIC_FLOOR:
        return f"{x:+.3f}"
    return f"{x:+.1f}"


def _scaled_config(doc: Mapping[str, Any], task: str, precision: str) -> str | None:
    for v in ("dynamic", "static"):
        if _runs(doc, task, f"{precision}:{v}"):
            return f"{precision}:{v}"
    return None


def _row(claim: str, task: str, measured: str, v: str, how: str = "") -> dict[str, Any]:
    return {"claim": claim, "quote": CLAIMS[claim], "task": task, "measured": measured, "verdict": v,
            "to_measure": how}


def _not_run(claim: str, task: str, how: str) -> dict[str, Any]:
    return _row(claim, task, "not run", NOT_MEASURED, how)


def _metric_effect(
    a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]
) -> tuple[float, float, float, str, float, float] | None:
    """(effect of a over b, positive = a better; sd; floor; metric name; mean a; mean b) or None."""
    ma = [float(r["metric"]) for r in a if r["metric"] is not None]
    mb = [float(r["metric"]) for r in b if r["metric"] is not None]
    if not ma or not mb:
        return None
    name = a[0]["metric_name"]
    hib = bool(a[0].get("higher_is_better", True))
    mean_a, mean_b = statistics.fmean(ma), statistics.fmean(mb)
    effect = (mean_a - mean_b) if hib else (mean_b - mean_a)
    return effect, max(_sd(ma), _sd(mb)), _metric_floor(name, mean_a, mean_b), name, mean_a, mean_b


def _underflow(rs: Sequence[Mapping[str, Any]], fmt: str) -> list[float]:
    return [float(r["underflow_fraction"][fmt]) for r in rs if r["underflow_fraction"].get(fmt) is not None]


def _compare_metric(doc: Mapping[str, Any], claim: str, task: str, a: str, b: str, *, equivalence: bool = False,
                    how: str = "") -> dict[str, Any]:
    ra, rb = _runs(doc, task, a), _runs(doc, task, b)
    if not ra or not rb:
        return _not_run(claim, task, how or f"lossscale study --tasks {task} --configs {a},{b}")
    e = _metric_effect(ra, rb)
    if e is None:
        return _row(claim, task, f"{a} or {b} has no finite metric", INCONCLUSIVE)
    effect, sd, floor, name, mean_a, mean_b = e
    same = _identical(ra, rb)
    measured = (
        f"{name}: {a} {_fmt(name, mean_a)} vs {b} {_fmt(name, mean_b)} ({_fmt_diff(name, mean_a - mean_b)}; "
        f"threshold {_fmt_diff(name, max(floor, 2 * sd)).lstrip('+')}; {len(ra)} seed(s))"
        + (" (bit-identical)" if same else "")
    )
    v = equivalence_verdict(effect, sd, floor) if equivalence else verdict(effect, sd, floor, identical=same)
    return _row(claim, task, measured, v)


def _compare_underflow(doc: Mapping[str, Any], claim: str, task: str, fmt: str, how: str) -> dict[str, Any]:
    precision = "bf16-mixed" if fmt == "bf16" else "fp16-mixed"
    none = _runs(doc, task, f"{precision}:none")
    scaled_cfg = _scaled_config(doc, task, precision)
    if not none or scaled_cfg is None:
        return _not_run(claim, task, how)
    scaled = _runs(doc, task, scaled_cfg)
    un, us = _underflow(none, fmt), _underflow(scaled, fmt)
    if not un or not us:
        return _row(claim, task, "underflow not measured (native runs have no rounding sites)", NOT_MEASURED,
                    "the CPU emulation: lossscale study --device cpu")
    effect = statistics.fmean(un) - statistics.fmean(us)
    # The measure is the underflow itself: runs whose training ended bit-identical can still differ in it
    # (values far below anything that changed the result); only equal underflow too is an exact zero.
    training_same = _identical(none, scaled)
    same = training_same and un == us
    measured = (
        f"{fmt.upper()} activation-gradient underflow: without scaling {100 * statistics.fmean(un):.3f}%, "
        f"{scaled_cfg.split(':')[1]} {100 * statistics.fmean(us):.3f}%"
        + (" (runs bit-identical)" if same else " (training bit-identical)" if training_same else "")
    )
    return _row(claim, task, measured, verdict(effect, max(_sd(un), _sd(us)), UNDERFLOW_FLOOR, identical=same))


def _speed(doc: Mapping[str, Any], claim: str, task: str) -> dict[str, Any]:
    how = f"lossscale study --device cuda --tasks {task} --configs fp32,bf16-mixed:dynamic (native BF16 autocast)"
    fp32 = _runs(doc, task, "fp32")
    cfg = _scaled_config(doc, task, "bf16-mixed") or ("bf16-mixed:none" if _runs(doc, task, "bf16-mixed:none")
                                                      else None)
    if not fp32 or cfg is None:
        return _not_run(claim, task, how)
    bf = _runs(doc, task, cfg)
    if not all(r.get("native") for r in bf) or not all(str(r.get("device", "cpu")).startswith("cuda") for r in fp32):
        return _row(claim, task, "only emulated BF16 was run (emulation measures numerics, not speed)",
                    NOT_MEASURED, how)
    tf = [float(r["step_seconds"]) for r in fp32 if r.get("step_seconds")]
    tb = [float(r["step_seconds"]) for r in bf if r.get("step_seconds")]
    if not tf or not tb:
        return _row(claim, task, "no step time recorded", NOT_MEASURED, how)
    mf, mb = statistics.fmean(tf), statistics.fmean(tb)
    effect = mf / mb - 1.0  # relative speed-up of BF16 over FP32
    sd = math.hypot(_sd(tf) / mf, _sd(tb) / mb) * (mf / mb)
    mem = [r.get("peak_memory_bytes") for r in (*fp32, *bf)]
    mem_txt = ""
    if all(m is not None for m in mem):
        pf = statistics.fmean(float(r["peak_memory_bytes"]) for r in fp32)
        pb = statistics.fmean(float(r["peak_memory_bytes"]) for r in bf)
        mem_txt = f"; peak memory {pf / 2**20:.1f} vs {pb / 2**20:.1f} MiB"
    measured = (
        f"step time fp32 {1e3 * mf:.2f} ms vs {cfg} (native) {1e3 * mb:.2f} ms: {100 * effect:+.0f}% speed{mem_txt}"
    )
    return _row(claim, task, measured, verdict(effect, sd, SPEED_FLOOR))


def _fewer_iterations(doc: Mapping[str, Any], task: str, targets: Mapping[str, Any]) -> dict[str, Any]:
    claim = "fewer-iterations"
    scaled = _scaled_config(doc, task, "bf16-mixed")
    rows = targets.get(task, {})
    if scaled is None or "bf16-mixed:none" not in rows or scaled not in rows:
        return _not_run(claim, task, f"lossscale study --tasks {task} --configs fp32,bf16-mixed:none,"
                                     "bf16-mixed:dynamic")
    tn, ts = rows["bf16-mixed:none"], rows[scaled]
    # A run that never reaches the target counts as one interval past its budget.
    pen = [s if s is not None else tn["budget"] + tn["every"] for s in tn["steps"]]
    pes = [s if s is not None else ts["budget"] + ts["every"] for s in ts["steps"]]
    same = _identical(_runs(doc, task, "bf16-mixed:none"), _runs(doc, task, scaled))
    effect = statistics.fmean(pen) - statistics.fmean(pes)

    def show(t: Mapping[str, Any]) -> str:
        return "never" if t["mean_steps"] is None and not t["reached"] else (
            f"{t['mean_steps']:.0f}" if t["mean_steps"] is not None else f"{t['reached']}/{len(t['steps'])} seeds")

    measured = (
        f"steps to target ({'95% of' if tn['higher_is_better'] else '1.05x'} FP32's final {tn['metric_name']}): "
        f"without scaling {show(tn)}, {scaled.split(':')[1]} {show(ts)} of {tn['budget']} (evaluated every "
        f"{tn['every']})" + (" (bit-identical)" if same else "")
    )
    return _row(claim, task, measured, verdict(effect, max(_sd(pen), _sd(pes)), float(tn["every"]), identical=same))


def _sweep_effect(doc: Mapping[str, Any], sweep: str, value_pick: str) -> tuple[Any, list[Mapping[str, Any]]] | None:
    sw = (doc.get("sweeps") or {}).get(sweep)
    if not sw or not sw.get("runs"):
        return None
    values = sorted({r["sweep_value"] for r in sw["runs"]})
    v = values[-1] if value_pick == "max" else values[0]
    return v, [r for r in sw["runs"] if r["sweep_value"] == v]


def _sweep_compare(doc: Mapping[str, Any], claim: str, sweep: str, task: str, how: str) -> dict[str, Any]:
    """Loss scaling (bf16-mixed:dynamic) vs none at the sweep's largest value."""
    picked = _sweep_effect(doc, sweep, "max")
    if picked is None:
        return _not_run(claim, task, how)
    value, runs = picked
    sub = {"runs": [r for r in runs if r["task"] == task]}
    row = _compare_metric(sub, claim, task, "bf16-mixed:dynamic", "bf16-mixed:none", how=how)
    row["measured"] = f"{sweep} {value}: " + row["measured"]
    return row


def _batch(doc: Mapping[str, Any]) -> dict[str, Any]:
    claim, how = "batch", "lossscale study --sweep batch"
    sw = (doc.get("sweeps") or {}).get("batch")
    if not sw or not sw.get("runs"):
        return _not_run(claim, "cnn", how)
    task = sw["runs"][0]["task"]
    values = sorted({r["sweep_value"] for r in sw["runs"]})
    effects = {}
    for v in (values[0], values[-1]):
        sub = {"runs": [r for r in sw["runs"] if r["sweep_value"] == v]}
        a, b = _runs(sub, task, "fp16-mixed:dynamic"), _runs(sub, task, "fp16-mixed:none")
        e = _metric_effect(a, b) if a and b else None
        if e is None:
            return _row(claim, task, f"batch {v}: fp16-mixed:dynamic or :none missing", NOT_MEASURED, how)
        effects[v] = e
    small, large = effects[values[0]], effects[values[-1]]
    name = small[3]
    effect = large[0] - small[0]
    measured = (
        f"gain of dynamic over no scaling (FP16): batch {values[0]} {_fmt_diff(name, small[0])}, batch {values[-1]} "
        f"{_fmt_diff(name, large[0])}"
    )
    return _row(claim, task, measured, verdict(effect, math.hypot(small[1], large[1]), small[2]))


def ledger(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every claim's rows: ``{"claim", "quote", "task", "measured", "verdict", "to_measure"}``."""
    tasks = list(doc["config"]["tasks"])
    have = {r["task"] for r in doc["runs"]}
    tasks = [t for t in tasks if t in have] or sorted(have)
    targets = run_targets(doc)
    out: list[dict[str, Any]] = []
    for t in tasks:
        out.append(_compare_underflow(doc, "bf16-underflow", t, "bf16",
                                      f"lossscale study --tasks {t} --configs bf16-mixed:none,bf16-mixed:dynamic"))
    for t in tasks:
        out.append(_fewer_iterations(doc, t, targets))
    out.append(_sweep_compare(doc, "noisy-data", "label-noise", "cnn", "lossscale study --sweep label-noise"))
    for t in tasks:
        scaled = _scaled_config(doc, t, "bf16-mixed") or "bf16-mixed:dynamic"
        out.append(_compare_metric(doc, "generalize", t, scaled, "bf16-mixed:none"))
    out.append(_speed(doc, "resnet-speed", "cnn"))
    out.append(_compare_metric(doc, "resnet-accuracy", "cnn", _scaled_config(doc, "cnn", "bf16-mixed")
                               or "bf16-mixed:dynamic", "fp32", equivalence=True))
    for t in ("rnn", "lm-lstm"):
        out.append(_compare_underflow(doc, "rnn-underflow", t, "bf16",
                                      f"lossscale study --tasks {t} --configs bf16-mixed:none,bf16-mixed:dynamic"))
    for t in ("rnn", "lm-lstm"):
        picked = _sweep_effect(doc, "seq-len", "max")
        if picked is not None and any(r["task"] == t for r in picked[1]):
            value, runs = picked
            sub = {"runs": [r for r in runs if r["task"] == t]}
            row = _compare_underflow(sub, "rnn-underflow", t, "bf16", "lossscale study --sweep seq-len")
            row["measured"] = f"sequence length {value}: " + row["measured"]
            out.append(row)
    for t in ("rnn", "lm-lstm"):
        out.append(_compare_metric(doc, "rnn-accuracy", t, _scaled_config(doc, t, "bf16-mixed")
                                   or "bf16-mixed:dynamic", "bf16-mixed:none"))
    out.append(_compare_metric(doc, "transformer-bleu", "transformer", _scaled_config(doc, "transformer", "bf16-mixed")
                               or "bf16-mixed:dynamic", "fp32", equivalence=True))
    out.append(_speed(doc, "transformer-time", "transformer"))
    out.append(_batch(doc))
    out.append(_row("high-dim", "-", "no high-dimensional input here (8x8 digits, short text windows)", NOT_MEASURED,
                    "a CIFAR-scale image task (lossscale.study.data.load_cifar10) under fp16-mixed:none/dynamic"))
    return out


LEDGER_HEADER = ["claim (the article)", "task", "measured (this run)", "verdict"]


def ledger_rows(doc: Mapping[str, Any]) -> list[list[str]]:
    """The ledger as table rows (:data:`LEDGER_HEADER`); a not-measured verdict names what would measure it."""
    rows = []
    for r in ledger(doc):
        v = r["verdict"] if r["verdict"] != NOT_MEASURED else f"not measured here: {r['to_measure']}"
        if r["verdict"] == NOT_MEASURED and r["measured"] not in ("not run",):
            v = f"not measured here ({r['measured']}): {r['to_measure']}"
            rows.append([r["quote"], r["task"], "-", v])
            continue
        rows.append([r["quote"], r["task"], r["measured"] if r["measured"] != "not run" else "-", v])
    return rows


def ledger_summary(doc: Mapping[str, Any]) -> list[list[str]]:
    """One row per claim (README's condensed ledger): the quote and its verdicts with the tasks of each,
    e.g. ``["...", "contradicted (cnn, rnn); not measured here (lm-lstm)"]``."""
    by: dict[str, dict[str, list[str]]] = {}
    for r in ledger(doc):
        by.setdefault(r["claim"], {}).setdefault(r["verdict"], []).append(r["task"])
    return [
        [CLAIMS[c], "; ".join(f"{v} ({', '.join(dict.fromkeys(ts))})" for v, ts in vs.items())]
        for c, vs in by.items()
    ]
