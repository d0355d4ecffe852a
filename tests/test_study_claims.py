"""The study's claims, trained for real: the deep MLP's FP16 underflow, the BF16 scaling law, FP32 learning
each task within the quick budgets, determinism and workers."""

from __future__ import annotations

from typing import Any

import pytest

from lossscale.study.runner import RunSpec, run_one, run_study


@pytest.fixture(scope="module")
def deep_mlp() -> dict[str, dict[str, Any]]:
    configs = ("fp16-mixed:none", "fp16-mixed:dynamic", "bf16-mixed:none", "bf16-mixed:dynamic")
    return {c: run_one(RunSpec("deep-mlp", c, 0, "tiny")) for c in configs}


def test_deep_mlp_fp16_without_scaling_underflows_and_loses(deep_mlp: dict[str, dict[str, Any]]) -> None:
    none, dyn = deep_mlp["fp16-mixed:none"], deep_mlp["fp16-mixed:dynamic"]
    # Measured at the emulation's rounding sites (activation gradients rounded to FP16).
    assert none["underflow_fraction"]["fp16"] > 0.10
    assert dyn["underflow_fraction"]["fp16"] < 1e-3  # negative control: the scale removes the underflow
    assert none["activation_grad_elements"] > 0 and dyn["activation_grad_elements"] > 0
    assert none["final_loss"] > dyn["final_loss"]
    assert dyn["final_scale"] > 2.0**16 and dyn["scaling"] == "dynamic"


def test_deep_mlp_bf16_scaling_changes_nothing(deep_mlp: dict[str, dict[str, Any]]) -> None:
    none, dyn = deep_mlp["bf16-mixed:none"], deep_mlp["bf16-mixed:dynamic"]
    assert dyn["final_scale"] != 1.0 and none["final_scale"] is None  # the scale really was applied
    assert none["loss_curve"] == dyn["loss_curve"]  # bit-identical, every step
    assert none["metrics"] == dyn["metrics"]
    assert none["underflow_fraction"]["bf16"] == 0.0
    # Negative control: FP16 is not scale-invariant here (the curves differ).
    assert deep_mlp["fp16-mixed:none"]["loss_curve"] != deep_mlp["fp16-mixed:dynamic"]["loss_curve"]


def test_swamping_is_measured_where_bf16_storage_loses_updates() -> None:
    nearest = run_one(RunSpec("cnn", "bf16-pure:none", 0, "tiny"))
    kahan = run_one(RunSpec("cnn", "bf16-pure:kahan", 0, "tiny"))
    fp32 = run_one(RunSpec("cnn", "fp32", 0, "tiny"))
    # Nearest rounding into BF16 storage drops updates (measured before storage rounds them) ...
    assert nearest["swamping_fraction"]["bf16"] > 0.05
    # ... Kahan defers them instead (nothing lost), and FP32 master weights would lose a similar share.
    assert kahan["swamping_fraction"]["bf16"] == 0.0
    assert fp32["swamping_fraction"]["bf16"] > 0.05
    assert nearest["loss_curve"] != kahan["loss_curve"]


def test_runs_are_deterministic() -> None:
    a = run_one(RunSpec("cnn", "bf16-pure:stochastic", 3, "tiny"))
    b = run_one(RunSpec("cnn", "bf16-pure:stochastic", 3, "tiny"))
    c = run_one(RunSpec("cnn", "bf16-pure:stochastic", 4, "tiny"))
    assert a["loss_curve"] == b["loss_curve"] and a["metric"] == b["metric"]
    assert a["loss_curve"] != c["loss_curve"]  # the seed matters


@pytest.mark.parametrize(
    ("task", "floor"),
    [("cnn", 0.90), ("rnn", 0.40), ("transformer", 40.0), ("deep-mlp", 0.80)],
)
def test_fp32_learns_each_task_within_the_quick_budget(task: str, floor: float) -> None:
    r = run_one(RunSpec(task, "fp32", 0, "quick"))
    # Chance: 10% accuracy (10 classes); BLEU ~0 for a model that has not learned French numbers.
    assert r["metric"] >= floor, (task, r["metrics"])
    if task == "transformer":
        assert r["metrics"]["exact_match"] >= 0.3


@pytest.mark.slow
def test_two_workers_match_one() -> None:
    specs = [RunSpec("cnn", "fp32", 0, "tiny"), RunSpec("deep-mlp", "fp16-mixed:dynamic", 0, "tiny")]
    one = run_study(specs, workers=1, progress=False)
    two = run_study(specs, workers=2, progress=False)
    key = lambda r: (r["task"], r["config"])  # noqa: E731
    for a, b in zip(sorted(one, key=key), sorted(two, key=key), strict=True):
        assert a["loss_curve"] == b["loss_curve"] and a["metric"] == b["metric"]
