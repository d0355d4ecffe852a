"""The claims ledger and steps to target, on synthetic results.json documents whose every verdict is known."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest

from lossscale.study import configs as C
from lossscale.study import ledger as L
from lossscale.study import analysis as FI
from lossscale.study import report as R
from lossscale.study import schema as SC
from lossscale.study import targets as T

# ------------------------------------------------------------------------------------------------------
# Steps to target on constructed curves


def test_steps_to_target_reached_at_k_and_never() -> None:
    pts = [(5, 0.2), (10, 0.5), (15, 0.9), (20, 0.96)]
    assert T.steps_to_target(pts, 0.9, True) == 15  # reached exactly at step 15 (>=)
    assert T.steps_to_target(pts, 0.95, True) == 20
    assert T.steps_to_target(pts, 0.97, True) is None
    losses = [(5, 3.0), (10, None), (15, 2.1), (20, 1.9)]
    assert T.steps_to_target(losses, 2.1, False) == 15  # a loss reaches its target from above (<=)
    assert T.steps_to_target(losses, 1.0, False) is None
    assert T.steps_to_target([(5, math.nan), (10, 0.99)], 0.9, True) == 10  # NaN never reaches it
    with pytest.raises(ValueError, match="increasing step"):
        T.steps_to_target([(10, 0.1), (5, 0.2)], 0.9, True)


def test_target_value_and_loss_fractions() -> None:
    assert T.target_value(0.9, True) == pytest.approx(0.855)
    assert T.target_value(2.0, False) == pytest.approx(2.1)
    curve = [float(i) for i in range(1, 41)]  # 40 steps, window 2
    got = T.loss_at_fractions(curve)
    assert got == {"0.25": 9.5, "0.5": 19.5, "0.75": 29.5, "1": 39.5}
    assert T.loss_at_fractions([1.0, None, 3.0, 4.0], window=2)["0.5"] is None
    with pytest.raises(ValueError):
        T.loss_at_fractions([])


# ------------------------------------------------------------------------------------------------------
# Synthetic results


def _rec(task: str, config: str, seed: int, metric: float, **kw: Any) -> dict[str, Any]:
    c = C.StudyConfig.parse(config)
    name = kw.pop("metric_name", "accuracy")
    curve = kw.pop("curve", [2.0, 1.0, 0.5, 0.4])
    rec = {
        "task": task, "config": c.name, "precision": c.precision, "scaling": c.scaling,
        "compensation": c.compensation, "seed": seed, "metric_name": name, "metric": metric,
        "metrics": {name: metric}, "final_loss": curve[-1], "diverged": False, "skipped_steps": 0,
        "skipped_at": [], "final_scale": None, "underflow_fraction": {c.grad_format or "bf16": 0.0},
        "swamping_fraction": {"bf16": 0.0}, "seconds": 1.0, "loss_curve": curve, "steps": 20,
        "higher_is_better": name != "heldout_loss", "device": "cpu", "native": False, "eval_every": 5,
        "eval_curve": [{"step": s, name: metric} for s in (5, 10, 15, 20)], "test_size": 1000,
    }
    rec.update(kw)
    return rec


def _doc(runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    return {"config": {"tasks": tasks, "mode": "tiny", "task_details": {}}, "runs": runs, **extra}


def _rows(doc: dict[str, Any], claim: str, task: str | None = None) -> list[dict[str, Any]]:
    return [r for r in L.ledger(doc) if r["claim"] == claim and (task is None or r["task"] == task)]


def _one(doc: dict[str, Any], claim: str, task: str) -> dict[str, Any]:
    rows = _rows(doc, claim, task)
    assert len(rows) == 1, rows
    return rows[0]


def test_verdict_rules() -> None:
    assert L.verdict(0.02, 0.0, 0.01) == L.SUPPORTED
    assert L.verdict(-0.02, 0.0, 0.01) == L.CONTRADICTED
    assert L.verdict(0.005, 0.0, 0.01) == L.INCONCLUSIVE
    assert L.verdict(0.03, 0.02, 0.01) == L.INCONCLUSIVE  # inside 2 sd
    assert L.verdict(0.05, 0.02, 0.01) == L.SUPPORTED
    assert L.verdict(0.0, 0.0, 0.01, identical=True) == L.CONTRADICTED
    assert L.equivalence_verdict(-0.005, 0.0, 0.01) == L.SUPPORTED
    assert L.equivalence_verdict(0.05, 0.0, 0.01) == L.SUPPORTED  # superior counts as consistent
    assert L.equivalence_verdict(-0.02, 0.0, 0.01) == L.CONTRADICTED
    assert L.equivalence_verdict(-0.005, 0.01, 0.01) == L.INCONCLUSIVE  # spread too wide to say
    with pytest.raises(ValueError):
        L.verdict(math.nan, 0.0, 0.01)


def _three(task: str, config: str, metrics: tuple[float, ...], **kw: Any) -> list[dict[str, Any]]:
    return [_rec(task, config, s, m, curve=[2.0, 1.0, 0.5, 0.4 + 0.01 * s + (0.001 if "dynamic" in config else 0)],
                 **kw) for s, m in enumerate(metrics)]


def test_generalize_supported_contradicted_inconclusive_not_run() -> None:
    N, D = "bf16-mixed:none", "bf16-mixed:dynamic"
    runs = _three("cnn", N, (0.90, 0.91, 0.90)) + _three("cnn", D, (0.95, 0.95, 0.96))
    assert _one(_doc(runs), "generalize", "cnn")["verdict"] == L.SUPPORTED
    runs = _three("cnn", N, (0.95, 0.95, 0.96)) + _three("cnn", D, (0.90, 0.91, 0.90))
    assert _one(_doc(runs), "generalize", "cnn")["verdict"] == L.CONTRADICTED
    # 2 points better but seeds spread 3 points: inconclusive.
    runs = _three("cnn", N, (0.90, 0.90, 0.90)) + _three("cnn", D, (0.89, 0.92, 0.95))
    assert _one(_doc(runs), "generalize", "cnn")["verdict"] == L.INCONCLUSIVE
    row = _one(_doc(_three("cnn", "fp32", (0.9, 0.9, 0.9))), "generalize", "cnn")
    assert row["verdict"] == L.NOT_MEASURED and "bf16-mixed:none" in row["to_measure"]


def test_bit_identical_contradicts_a_claimed_change() -> None:
    none = _three("cnn", "bf16-mixed:none", (0.9, 0.9, 0.9))
    dyn = [dict(r, config="bf16-mixed:dynamic", scaling="dynamic") for r in none]
    row = _one(_doc(none + dyn), "generalize", "cnn")
    assert row["verdict"] == L.CONTRADICTED and "bit-identical" in row["measured"]
    assert _one(_doc(none + dyn), "bf16-underflow", "cnn")["verdict"] == L.CONTRADICTED


def test_underflow_claim() -> None:
    none = _three("rnn", "bf16-mixed:none", (0.9, 0.9, 0.9), underflow_fraction={"bf16": 0.20})
    dyn = _three("rnn", "bf16-mixed:dynamic", (0.9, 0.9, 0.9), underflow_fraction={"bf16": 0.001})
    doc = _doc(none + dyn)
    assert _one(doc, "bf16-underflow", "rnn")["verdict"] == L.SUPPORTED
    assert _one(doc, "rnn-underflow", "rnn")["verdict"] == L.SUPPORTED
    assert "20.000%" in _one(doc, "rnn-underflow", "rnn")["measured"]
    # The LSTM language model was not run: said so, with the command.
    row = _one(doc, "rnn-underflow", "lm-lstm")
    assert row["verdict"] == L.NOT_MEASURED and "--tasks lm-lstm" in row["to_measure"]
    dyn = _three("rnn", "bf16-mixed:dynamic", (0.9, 0.9, 0.9), underflow_fraction={"bf16": 0.195})
    assert _one(_doc(none + dyn), "bf16-underflow", "rnn")["verdict"] == L.INCONCLUSIVE
    # Training bit-identical but less underflow with scaling: the underflow claim is still measured (supported).
    same = [dict(r, config="bf16-mixed:dynamic", scaling="dynamic", underflow_fraction={"bf16": 0.05}) for r in none]
    row = _one(_doc(none + same), "rnn-underflow", "rnn")
    assert row["verdict"] == L.SUPPORTED and "(training bit-identical)" in row["measured"]


def test_lower_is_better_loss_metric() -> None:
    kw: dict[str, Any] = {"metric_name": "heldout_loss"}
    none = _three("lm", "bf16-mixed:none", (2.20, 2.21, 2.20), **kw)
    dyn = _three("lm", "bf16-mixed:dynamic", (2.00, 2.01, 2.00), **kw)
    assert _one(_doc(none + dyn), "generalize", "lm")["verdict"] == L.SUPPORTED  # lower loss is better
    dyn = _three("lm", "bf16-mixed:dynamic", (2.18, 2.19, 2.18), **kw)  # 1% better: below the 2% floor
    assert _one(_doc(none + dyn), "generalize", "lm")["verdict"] == L.INCONCLUSIVE
    dyn = _three("lm", "bf16-mixed:dynamic", (2.40, 2.41, 2.40), **kw)
    assert _one(_doc(none + dyn), "generalize", "lm")["verdict"] == L.CONTRADICTED


def test_equivalence_claims_resnet_and_transformer() -> None:
    runs = _three("cnn", "fp32", (0.99, 0.99, 0.99)) + _three("cnn", "bf16-mixed:dynamic", (0.985, 0.99, 0.99))
    assert _one(_doc(runs), "resnet-accuracy", "cnn")["verdict"] == L.SUPPORTED
    runs = _three("cnn", "fp32", (0.99, 0.99, 0.99)) + _three("cnn", "bf16-mixed:dynamic", (0.90, 0.91, 0.90))
    assert _one(_doc(runs), "resnet-accuracy", "cnn")["verdict"] == L.CONTRADICTED
    kw: dict[str, Any] = {"metric_name": "bleu"}
    runs = _three("transformer", "fp32", (80.0, 80.0, 80.0), **kw) + _three(
        "transformer", "bf16-mixed:dynamic", (75.0, 75.5, 75.0), **kw)
    assert _one(_doc(runs), "transformer-bleu", "transformer")["verdict"] == L.CONTRADICTED
    runs = _three("transformer", "fp32", (80.0, 80.0, 80.0), **kw) + _three(
        "transformer", "bf16-mixed:dynamic", (80.2, 80.0, 80.1), **kw)
    assert _one(_doc(runs), "transformer-bleu", "transformer")["verdict"] == L.SUPPORTED


def test_speed_needs_native_cuda_runs() -> None:
    fp32 = _three("cnn", "fp32", (0.99,) * 3, step_seconds=0.010)
    bf = _three("cnn", "bf16-mixed:dynamic", (0.99,) * 3, step_seconds=0.007)
    row = _one(_doc(fp32 + bf), "resnet-speed", "cnn")  # CPU emulation
    assert row["verdict"] == L.NOT_MEASURED and "--device cuda" in row["to_measure"]
    gpu: dict[str, Any] = {"device": "cuda", "peak_memory_bytes": 2**20}
    fp32 = _three("cnn", "fp32", (0.99,) * 3, step_seconds=0.010, **gpu)
    bf = _three("cnn", "bf16-mixed:dynamic", (0.99,) * 3, step_seconds=0.007, native=True, **gpu)
    row = _one(_doc(fp32 + bf), "resnet-speed", "cnn")
    assert row["verdict"] == L.SUPPORTED and "+43% speed" in row["measured"] and "MiB" in row["measured"]
    bf = _three("cnn", "bf16-mixed:dynamic", (0.99,) * 3, step_seconds=0.013, native=True, **gpu)
    assert _one(_doc(fp32 + bf), "resnet-speed", "cnn")["verdict"] == L.CONTRADICTED
    assert _one(_doc(fp32 + bf), "transformer-time", "transformer")["verdict"] == L.NOT_MEASURED


def _curve_runs(config: str, reach: int) -> list[dict[str, Any]]:
    out = []
    for s in range(3):
        r = _rec("cnn", config, s, 0.9, curve=[2.0, 1.0, 0.5, 0.4 + 0.01 * s + (0.001 if "dynamic" in config else 0)])
        r["eval_curve"] = [{"step": k, "accuracy": 0.9 if k >= reach else 0.3} for k in (5, 10, 15, 20)]
        out.append(r)
    return out


def test_fewer_iterations_from_steps_to_target() -> None:
    fp32 = _curve_runs("fp32", 5)
    doc = _doc(fp32 + _curve_runs("bf16-mixed:none", 20) + _curve_runs("bf16-mixed:dynamic", 10))
    row = _one(doc, "fewer-iterations", "cnn")
    assert row["verdict"] == L.SUPPORTED and "without scaling 20, dynamic 10 of 20" in row["measured"]
    doc = _doc(fp32 + _curve_runs("bf16-mixed:none", 10) + _curve_runs("bf16-mixed:dynamic", 15))
    assert _one(doc, "fewer-iterations", "cnn")["verdict"] == L.INCONCLUSIVE  # one interval: not beyond the floor
    doc = _doc(fp32 + _curve_runs("bf16-mixed:none", 5) + _curve_runs("bf16-mixed:dynamic", 99))  # never
    row = _one(doc, "fewer-iterations", "cnn")
    assert row["verdict"] == L.CONTRADICTED and "dynamic never" in row["measured"]
    t = T.run_targets(doc)["cnn"]
    assert t["bf16-mixed:dynamic"]["steps"] == [None, None, None] and t["bf16-mixed:none"]["steps"] == [5, 5, 5]
    assert t["fp32"]["target"] == pytest.approx(0.855)


def test_sweep_claims_not_measured_then_measured() -> None:
    base = _doc(_three("cnn", "fp32", (0.9,) * 3))
    for claim in ("noisy-data", "batch", "high-dim"):
        (row,) = _rows(base, claim)
        assert row["verdict"] == L.NOT_MEASURED and row["to_measure"]
    sweep_runs = []
    for v, (none, dyn) in {0.0: (0.95, 0.95), 0.4: (0.70, 0.80)}.items():
        sweep_runs += [dict(r, sweep_value=v) for r in _three("cnn", "bf16-mixed:none", (none, none + 0.001, none))]
        sweep_runs += [dict(r, sweep_value=v) for r in _three("cnn", "bf16-mixed:dynamic", (dyn, dyn, dyn + 0.001))]
    doc = dict(base, sweeps={"label-noise": {"runs": sweep_runs}})
    (row,) = _rows(doc, "noisy-data")
    assert row["verdict"] == L.SUPPORTED and row["measured"].startswith("label-noise 0.4")
    batch_runs = []
    for v, (none, dyn) in {16: (0.95, 0.95), 1024: (0.95, 0.85)}.items():
        batch_runs += [dict(r, sweep_value=v) for r in _three("cnn", "fp16-mixed:none", (none, none, none + 0.001))]
        batch_runs += [dict(r, sweep_value=v) for r in _three("cnn", "fp16-mixed:dynamic", (dyn, dyn, dyn + 0.001))]
    doc = dict(base, sweeps={"batch": {"runs": batch_runs}})
    (row,) = _rows(doc, "batch")
    assert row["verdict"] == L.CONTRADICTED  # scaling hurt at the large batch: the opposite of "matters most"


def test_report_has_ledger_and_targets(tmp_path: Any) -> None:
    runs = _curve_runs("fp32", 5) + _curve_runs("bf16-mixed:none", 20) + _curve_runs("bf16-mixed:dynamic", 10)
    for r in runs:
        r.update({"optimizer": "x", "final_scale": None, "grad_exponent_histogram": {"min_log2": -20, "counts": [1]},
                  "scale_trajectory": [1.0] * 4, "skipped_at": []})
    doc = {
        "schema_version": SC.SCHEMA_VERSION, "created": "now", "command": "x",
        "config": {"mode": "tiny", "tasks": ["cnn"], "configs": ["fp32"], "seeds": [0, 1, 2], "device": "cpu",
                   "workers": 1, "threads": 1, "task_details": {}},
        "environment": {"torch": "2", "device": "cpu", "threads_per_run": 1}, "runs": runs,
    }
    R.write_report(doc, str(tmp_path))
    md = open(os.path.join(tmp_path, "report.md"), encoding="utf-8").read()
    assert "## Claims ledger" in md and "| claim (the article) | task | measured (this run) | verdict |" in md
    assert "fewer iterations" in md and "| supported |" in md and "not measured here" in md
    assert "| bf16-mixed:none | 20, 20, 20 (of 20) |" in md
    assert "Claims ledger" in open(os.path.join(tmp_path, "report.html"), encoding="utf-8").read()


# ------------------------------------------------------------------------------------------------------
# Findings whose premise was not run


def _findings(runs: list[dict[str, Any]], chance: float = 0.1) -> dict[str, dict[str, Any]]:
    doc = _doc(runs)
    doc["config"]["task_details"] = {t: {"chance": chance} for t in doc["config"]["tasks"]}
    return {f["question"]: f for f in FI.findings(doc)}


def test_fp8_at_chance_alone_does_not_claim_it_trained() -> None:
    f = _findings([_rec("mlp", "fp8-hybrid:none", 0, 0.078)])["What does FP8 need?"]
    assert "trained without loss scaling" not in f["answer"]
    assert "did not train on mlp" in f["answer"] and "run fp8-hybrid:dynamic" in f["answer"]
    # With FP32 beside it and FP8 matching it, the claim is made (positive control).
    f = _findings([_rec("mlp", "fp32", 0, 0.96), _rec("mlp", "fp8-hybrid:none", 0, 0.955)])["What does FP8 need?"]
    assert "trained without loss scaling on mlp" in f["answer"]
    # Far below FP32 but above chance: not trained either.
    f = _findings([_rec("mlp", "fp32", 0, 0.96), _rec("mlp", "fp8-hybrid:none", 0, 0.5)])["What does FP8 need?"]
    assert "trained without" not in f["answer"] and "did not train on mlp" in f["answer"]
    # No FP32 run and above chance: says there is nothing to compare with.
    f = _findings([_rec("mlp", "fp8-hybrid:none", 0, 0.9)])["What does FP8 need?"]
    assert "trained without" not in f["answer"] and "no FP32 run" in f["answer"]


def test_findings_do_not_claim_unrun_comparisons() -> None:
    got = _findings([_rec("cnn", "fp32", 0, 0.9), _rec("cnn", "bf16-mixed:none", 0, 0.9),
                     _rec("cnn", "fp16-mixed:none", 0, 0.9), _rec("cnn", "bf16-pure:none", 0, 0.8)])
    bf16 = got["Does BF16 need loss scaling here?"]["answer"]
    assert bf16.startswith("Not measured") and "as good as with it" not in bf16
    fp16 = got["Does FP16 need loss scaling here?"]["answer"]
    assert "within tolerance" not in fp16 and fp16.startswith("Not compared")
    pure = got["Does Kahan summation or stochastic rounding close the pure-BF16 gap?"]["answer"]
    assert "falls short of FP32 on cnn" in pure and "kahan" not in pure and "stochastic" not in pure


def test_speed_table_only_for_cuda_runs() -> None:
    cpu = _three("cnn", "fp32", (0.9,) * 3, step_seconds=0.01)
    assert R.speed_table(_doc(cpu), "cnn") == []
    gpu: dict[str, Any] = {"device": "cuda", "peak_memory_bytes": 3 * 2**20}
    runs = _three("cnn", "fp32", (0.9,) * 3, step_seconds=0.010, **gpu) + _three(
        "cnn", "bf16-mixed:dynamic", (0.9,) * 3, step_seconds=0.005, native=True, **gpu)
    assert R.speed_table(_doc(runs), "cnn") == [
        ["fp32", "no", "10.00", "1.00x speed", "3.0"], ["bf16-mixed:dynamic", "yes", "5.00", "2.00x speed", "3.0"],
    ]


def test_ledger_summary_groups_tasks_by_verdict() -> None:
    none = _three("cnn", "bf16-mixed:none", (0.9,) * 3) + _three("rnn", "bf16-mixed:none", (0.9,) * 3)
    dyn = [dict(r, config="bf16-mixed:dynamic", scaling="dynamic") for r in none]  # bit-identical
    rows = {q: v for q, v in L.ledger_summary(_doc(none + dyn))}
    assert rows[L.CLAIMS["generalize"]] == "contradicted (cnn, rnn)"
    assert rows[L.CLAIMS["noisy-data"]] == "not measured here (cnn)"
