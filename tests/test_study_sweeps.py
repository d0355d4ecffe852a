"""Sweeps (--sweep seq-len / batch / label-noise): the budget overrides, and each sweep's table and plot in
tiny mode through the CLI."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from lossscale.cli import study as cli_study
from lossscale.study import data as D
from lossscale.study import ledger as L
from lossscale.study import schema as SC
from lossscale.study import sweeps as SW
from lossscale.study import tasks as TK
from lossscale.study.runner import RunSpec, run_one


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lossscale")
    cli_study.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", *argv])
    return int(args.func(args))


def test_sweep_cli_refuses_tasks_outside_the_sweep(tmp_path: pytest.TempPathFactory) -> None:
    from lossscale.cli import CLIError

    with pytest.raises(CLIError, match="must be among rnn, lm-lstm"):
        _main(["--sweep", "seq-len", "--tasks", "cnn", "--tiny", "--out", str(tmp_path)])


def test_overrides_change_the_budget_and_refuse_bad_values() -> None:
    assert TK.budget_for("cnn", "quick", {"batch_size": 1024}).batch_size == 1024
    assert TK.budget_for("lm-lstm", "quick", {"seq_len": 256}).model["context"] == 256
    assert TK.budget_for("rnn", "quick", {"seq_len": 1024}).model["seq_len"] == 1024
    with pytest.raises(ValueError, match="square"):
        TK.budget_for("rnn", "quick", {"seq_len": 200})
    with pytest.raises(ValueError, match="applies to tasks"):
        TK.budget_for("cnn", "quick", {"seq_len": 256})
    with pytest.raises(ValueError, match="unknown override"):
        TK.budget_for("cnn", "quick", {"lr": 1})
    with pytest.raises(ValueError, match="unknown sweep"):
        SW.plan_sweep("depth", [0], mode="tiny", device="cpu")


def test_rnn_reads_upsampled_sequences() -> None:
    inst = TK.build("rnn", "tiny", overrides={"seq_len": 256})
    x, _ = next(inst.batches)
    assert x.shape[1:] == (256, 1) and "256 steps" in inst.data_source
    # Bilinear upsampling of the same images: the 16x16 mean is close to the 8x8 mean, image by image.
    small = D.digits_images(limit=256).x_train
    big = TK._upsampled_sequences(D.digits_images(limit=256), 256).x_train
    assert torch.allclose(big.reshape(big.shape[0], -1).mean(1), small.flatten(1).mean(1), atol=0.15)


def test_label_noise_flips_exactly_that_fraction_of_training_labels() -> None:
    clean = D.digits_images()
    noisy = TK._noisy_labels(clean, 0.2)
    changed = (noisy.y_train != clean.y_train).sum().item()
    assert changed == round(0.2 * clean.y_train.shape[0])  # every chosen label moved to another class
    assert torch.equal(noisy.y_test, clean.y_test) and torch.equal(noisy.x_train, clean.x_train)
    assert torch.equal(TK._noisy_labels(clean, 0.2).y_train, noisy.y_train)  # fixed, seed-independent


def test_seq_len_override_in_a_run_records_the_value() -> None:
    rec = run_one(RunSpec("rnn", "fp16-mixed:none", 0, "tiny", overrides=(("seq_len", 256),)))
    assert rec["overrides"] == {"seq_len": 256} and rec["budget"]["model"]["seq_len"] == 256
    assert rec["underflow_fraction"]["fp16"] is not None and rec["activation_grad_elements"] > 0


@pytest.mark.slow
def test_label_noise_and_batch_sweeps_tiny_cli(tmp_path: pytest.TempPathFactory) -> None:
    out = str(tmp_path)
    base = ["--tiny", "--workers", "1", "--no-progress", "--out", out]
    # The configurations the ledger's rows need (every SWEEP_CONFIGS by default; --configs narrows a sweep).
    assert _main(["--sweep", "label-noise", "--configs", "bf16-mixed:none,bf16-mixed:dynamic", *base]) == 0
    assert _main(["--sweep", "batch", "--configs", "fp16-mixed:none,fp16-mixed:dynamic", *base]) == 0
    doc = SC.load_results(os.path.join(out, "results.json"))
    ln = doc["sweeps"]["label-noise"]["runs"]
    assert sorted({r["sweep_value"] for r in ln}) == [0.0, 0.2, 0.4]
    assert len(ln) == 3 * 2 and {r["config"] for r in ln} == {"bf16-mixed:none", "bf16-mixed:dynamic"}
    bt = doc["sweeps"]["batch"]["runs"]
    assert sorted({r["sweep_value"] for r in bt}) == [16, 64, 256, 1024]
    assert {r["budget"]["batch_size"] for r in bt} == {16, 64, 256, 1024}
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "## Sweeps" in md and "### Sweep `label-noise`" in md and "### Sweep `batch`" in md
    assert md.count("| " + " | ".join(SW.SWEEP_TABLE_HEADER) + " |") == 2
    for name in ("label-noise", "batch"):
        with open(os.path.join(out, f"sweep_{name}.png"), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # The ledger now measures the claims that need them (a verdict, not "not measured").
    rows = {r["claim"]: r for r in L.ledger(doc)}
    assert rows["noisy-data"]["verdict"] != L.NOT_MEASURED and rows["batch"]["verdict"] != L.NOT_MEASURED
    # Resuming the sweep runs nothing again.
    n = len(ln)
    assert _main(["--sweep", "label-noise", "--configs", "bf16-mixed:none,bf16-mixed:dynamic", *base]) == 0
    with open(os.path.join(out, "results.json")) as fh:
        assert len(json.load(fh)["sweeps"]["label-noise"]["runs"]) == n


def test_plans() -> None:
    specs = SW.plan_sweep("seq-len", [0], mode="quick", device="cpu")
    assert len(specs) == 3 * 2 * 4 and {s.config for s in specs} == set(SW.SWEEPS["seq-len"].configs)
    assert all(dict(s.overrides)["steps"] == 4 and dict(s.overrides)["batch_size"] == 16 for s in specs)
    assert TK.budget_for("rnn", "quick", dict(specs[-1].overrides)).steps == 4
    assert dict(specs[-1].overrides)["seq_len"] == 1024
    batch = SW.plan_sweep("batch", [0, 1], mode="quick", device="cpu", configs=["fp32"])
    assert [dict(s.overrides) for s in batch] == [{"batch_size": b} for b in (16, 64, 256, 1024) for _ in (0, 1)]
    with pytest.raises(ValueError, match="not cnn"):
        SW.plan_sweep("seq-len", [0], mode="quick", device="cpu", tasks=["cnn"])
