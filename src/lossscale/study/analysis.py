"""What a study's numbers say: the seeds of each (task, configuration) combined (:func:`summarise`), and the
"Findings" of the report (:func:`findings`): each question answered from this run's numbers, with the
published results (:data:`PUBLISHED`, cited: the paper or project) beside them. Plain functions of a
results document (:mod:`lossscale.study.schema`); no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._metrics import MATCH_TOLERANCE, RELATIVE_TOLERANCE, fmt_gap, fmt_metric, fmt_scales, pct
from .configs import CONFIG_NAMES

__all__ = ["summarise", "findings", "PUBLISHED", "LOSS_RATIO_TOLERANCE"]


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
        return "n/a" if r is None else fmt_metric(r["metric_name"], r["metric_mean"])

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
        line += f"; BF16 activation-gradient underflow {pct(u, 3)}"
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
            f"{' (diverged)' if r['diverged'] else ''}, activation-gradient underflow {pct(u, 2)}"
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
            line += f" (FP32 gradients that would underflow in FP16: {pct(rows['fp32']['underflow']['fp16'], 2)})"
        ev.append(line)
        for other in ("fp16-mixed:static", "fp16-mixed:dynamic"):
            c = _cmp(task, rows, other, "fp16-mixed:none")
            if c is not None and c[0] < -c[1]:
                hurt.append(f"{other.split(':')[1]} scaling on {task} ({fmt_gap(r['metric_name'], c[0])})")
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
            f"per run, final scale {fmt_scales(rd)}) vs static {metric_str(task, 'fp16-mixed:static')} "
            f"(scale {fmt_scales(rs)}, {rs['skipped_steps']:.3g} skipped)"
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
        line += f" (swamped updates {pct(sw, 1)})"
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
                f" although {pct(min(sw), 0)} to {pct(max(sw), 0)} of its weight updates were swamped" if sw else ""
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
            f"{' (diverged)' if r['diverged'] else ''}, E5M2 gradient underflow {pct(r['underflow'].get('e5m2'), 2)}"
        )
        if "fp8-hybrid:dynamic" in rows:
            rd = rows["fp8-hybrid:dynamic"]
            line += (
                f"; with dynamic scaling {metric_str(task, 'fp8-hybrid:dynamic')}, underflow "
                f"{pct(rd['underflow'].get('e5m2'), 2)}, {rd['skipped_steps']:.3g} skipped steps per run"
            )
            c = _cmp(task, rows, "fp8-hybrid:dynamic", "fp8-hybrid:none")
            if r["diverged"] or (c is not None and c[0] > c[1]):
                needs.append(task)
        if "fp32" in rows:
            c = _cmp(task, rows, "fp8-hybrid:dynamic" if "fp8-hybrid:dynamic" in rows else "fp8-hybrid:none",
                     "fp32")
            if c is not None:
                line += f"; best FP8 gap to FP32 {fmt_gap(r['metric_name'], c[0])}"
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

