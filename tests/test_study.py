"""The study: configuration names, results schema, report and findings, CLI (tiny studies, seconds)."""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lossscale.cli import CLIError
from lossscale.cli import study as cli_study
from lossscale.study import configs as C
from lossscale.study import analysis as FI
from lossscale.study import report as R
from lossscale.study import schema as SC
from lossscale.study import runner as RN
from lossscale.study.tasks import build

# ------------------------------------------------------------------------------------------------------
# Configuration names


def test_every_name_parses_and_round_trips() -> None:
    assert C.CONFIG_NAMES == (
        "fp32",
        "bf16-mixed:none", "bf16-mixed:static", "bf16-mixed:dynamic",
        "fp16-mixed:none", "fp16-mixed:static", "fp16-mixed:dynamic", "fp16-mixed:layerwise",
        "bf16-pure:none", "bf16-pure:kahan", "bf16-pure:stochastic",
        "fp8-hybrid:none", "fp8-hybrid:dynamic", "fp8-hybrid:layerwise",
        "fp8-delayed:none", "fp8-rowwise:none", "mxfp8:none", "mxfp4:none", "nvfp4:none",
    )
    assert {"fp8-delayed:none", "nvfp4:none"} <= set(C.QUICK_CONFIG_NAMES)
    assert C.StudyConfig.parse("nvfp4:none").grad_format == "e2m1"
    with pytest.raises(ValueError, match="valid configurations"):
        C.StudyConfig.parse("mxfp8:dynamic")
    for name in C.CONFIG_NAMES:
        assert C.StudyConfig.parse(name).name == name
    c = C.StudyConfig.parse("bf16-pure:stochastic")
    assert (c.precision, c.scaling, c.compensation, c.weight_format, c.grad_format) == (
        "bf16-pure", "none", "stochastic", "bf16", "bf16"
    )
    assert C.StudyConfig.parse("fp8-hybrid:dynamic").grad_format == "e5m2"
    assert C.StudyConfig.parse(" FP16-Mixed:Dynamic ").name == "fp16-mixed:dynamic"
    assert C.StudyConfig.parse("fp32:none").name == "fp32"


@pytest.mark.parametrize("bad", ["fp16", "bf16-mixed:kahan", "bf16-pure:dynamic", "fp8-hybrid:static", "tf32", ""])
def test_bad_name_lists_valid_names(bad: str) -> None:
    with pytest.raises(ValueError) as err:
        C.StudyConfig.parse(bad)
    msg = str(err.value)
    assert "valid configurations:" in msg
    assert all(n in msg for n in C.CONFIG_NAMES)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="does not combine"):
        C.StudyConfig("fp16-mixed", "none", "kahan")
    with pytest.raises(ValueError, match="precision must be one of"):
        C.StudyConfig("fp64")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        C.StudyConfig.parse(3)  # type: ignore[arg-type]


def test_parse_configs_lists() -> None:
    assert [c.name for c in C.parse_configs("fp32, fp16-mixed:none,fp32")] == ["fp32", "fp16-mixed:none"]
    assert [c.name for c in C.parse_configs("all")] == list(C.CONFIG_NAMES)
    quick = [c.name for c in C.parse_configs("quick")]
    for required in ("fp32", "bf16-mixed:none", "bf16-mixed:dynamic", "fp16-mixed:none", "fp16-mixed:dynamic",
                     "bf16-pure:none", "bf16-pure:kahan"):
        assert required in quick
    with pytest.raises(ValueError, match="no configuration"):
        C.parse_configs(" , ")


def test_activation_grad_sites() -> None:
    yes = ["linear.output.grad", "enc.layers.0.self_attn:mha.in_proj.grad", "lstm.gates_hh.grad",
           "conv2d.input.grad", "lstm.hidden.grad", "sdpa.scores.grad", "m:mha.query.grad"]
    no = ["linear.weight.grad", "linear.bias.grad", "mha.in_proj_weight.grad", "lstm.weight_hh.grad",
          "lstm.bias_ih.grad", "linear.output", "mha.attn_mask.grad", "linear.input"]
    assert all(RN.is_activation_grad_site(s) for s in yes)
    assert not any(RN.is_activation_grad_site(s) for s in no)


# ------------------------------------------------------------------------------------------------------
# Schema, summary, findings on hand-made records (no training)


def _record(task: str, config: str, seed: int, metric: float, **kw: Any) -> dict[str, Any]:
    c = C.StudyConfig.parse(config)
    curve = kw.pop("curve", [2.0, 1.0, 0.5])
    rec = {
        "task": task, "config": c.name, "precision": c.precision, "scaling": c.scaling,
        "compensation": c.compensation, "optimizer": "lossscale.optim.AdamW", "optimizer_recipe": "AdamW",
        "weight_format": c.weight_format, "grad_format": c.grad_format, "seed": seed, "mode": "tiny",
        "device": "cpu", "steps": len(curve), "batch_size": 8, "metric_name": "accuracy", "metric": metric,
        "metrics": {"accuracy": metric, "test_loss": 0.5}, "final_loss": curve[-1], "diverged": False,
        "skipped_steps": 0, "skipped_at": [], "final_scale": None if c.scaling == "none" else 1024.0,
        "scaler": {"kind": c.scaling}, "underflow_fraction": {"fp16": 0.0}, "underflow_source": "x",
        "activation_grad_elements": None, "swamping_fraction": {"bf16": 0.01}, "swamping_source": "x",
        "monitor_underflow_fraction": {"bf16": 0.0}, "monitor_swamping_fraction": {"bf16": 0.0},
        "grad_exponent_histogram": {"min_log2": -20, "counts": [1, 3, 2]},
        "seconds": 1.0, "train_seconds": 0.9, "loss_curve": curve, "test_size": 359,
        "scale_trajectory": [1.0] * len(curve),
    }
    rec.update(kw)
    return rec


def _doc(runs: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    return {
        "schema_version": SC.SCHEMA_VERSION,
        "created": "now",
        "command": "lossscale study --tiny",
        "config": {
            "mode": "tiny", "tasks": tasks, "configs": sorted({r["config"] for r in runs}),
            "seeds": sorted({r["seed"] for r in runs}), "device": "cpu", "workers": 1, "threads": 1,
            "task_details": {t: {"description": t, "metric_name": "accuracy"} for t in tasks},
        },
        "environment": {"torch": "2.13", "device": "cpu", "threads_per_run": 1},
        "runs": runs,
    }


def test_schema_accepts_and_rejects() -> None:
    doc = _doc([_record("cnn", "fp32", 0, 0.9), _record("cnn", "fp16-mixed:dynamic", 0, 0.9)])
    SC.validate(doc)
    for mutate, where in [
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d["runs"][0].pop("skipped_steps"), "skipped_steps"),
        (lambda d: d["runs"][0].update(metric=float("nan")), "metric"),
        (lambda d: d["runs"][0].update(config="fp16"), "config"),
        (lambda d: d["runs"][1].update(seed=-1), "seed"),
        (lambda d: d["runs"][1].update(skipped_steps=True), "skipped_steps"),
        (lambda d: d["runs"][1]["underflow_fraction"].update(fp16="lots"), "underflow_fraction"),
        (lambda d: d["runs"][0]["loss_curve"].append("x"), "loss_curve"),
        (lambda d: d["config"].update(mode="huge"), "mode"),
        (lambda d: d["environment"].pop("torch"), "torch"),
    ]:
        bad = copy.deepcopy(doc)
        mutate(bad)
        with pytest.raises(SC.SchemaError, match=where):
            SC.validate(bad)


def test_summary_mean_std_gap() -> None:
    runs = [
        _record("cnn", "fp32", 0, 0.90), _record("cnn", "fp32", 1, 0.94),
        _record("cnn", "fp16-mixed:none", 0, 0.50), _record("cnn", "fp16-mixed:none", 1, 0.60),
    ]
    s = FI.summarise(_doc(runs))["cnn"]
    assert s["fp32"]["metric_mean"] == pytest.approx(0.92)
    assert s["fp32"]["metric_std"] == pytest.approx(0.0282842712)
    assert s["fp16-mixed:none"]["gap"] == pytest.approx(-0.37)
    header, rows = R.summary_rows(_doc(runs))
    assert header == ["config", "cnn (accuracy)"]
    assert rows[0] == ["fp32", "92.0% +- 2.8"]
    assert rows[1] == ["fp16-mixed:none", "55.0% +- 7.1 (-37.0 pt)"]


def test_findings_follow_the_numbers() -> None:
    same = [2.0, 1.0, 0.5]
    runs = [
        _record("mlp", "fp32", 0, 0.95),
        _record("mlp", "bf16-mixed:none", 0, 0.95, curve=same, underflow_fraction={"bf16": 0.0}),
        _record("mlp", "bf16-mixed:dynamic", 0, 0.95, curve=same, underflow_fraction={"bf16": 0.0}),
        _record("mlp", "fp16-mixed:none", 0, 0.30, underflow_fraction={"fp16": 0.4}),
        _record("mlp", "fp16-mixed:dynamic", 0, 0.95, underflow_fraction={"fp16": 0.0}),
        _record("cnn", "fp32", 0, 0.99),
        _record("cnn", "fp16-mixed:none", 0, 0.99, underflow_fraction={"fp16": 0.001}),
        _record("cnn", "fp16-mixed:dynamic", 0, 0.99),
        _record("cnn", "bf16-pure:none", 0, 0.90, swamping_fraction={"bf16": 0.4}),
        _record("cnn", "bf16-pure:kahan", 0, 0.99, swamping_fraction={"bf16": 0.0}),
    ]
    f = {x["question"]: x for x in FI.findings(_doc(runs))}
    bf16 = f["Does BF16 need loss scaling here?"]
    assert bf16["answer"].startswith("No") and "bit-identical" in bf16["evidence"][0]
    fp16 = f["Does FP16 need loss scaling here?"]
    assert fp16["answer"].startswith("Yes on mlp") and "not on cnn" in fp16["answer"]
    assert any("does not hold" in c for c in fp16["contradicts"])  # cnn contradicts the common rule
    assert "67%" in fp16["published"]
    pure = f["Does Kahan summation or stochastic rounding close the pure-BF16 gap?"]
    assert "kahan closes it on cnn" in pure["answer"]
    # Negative control: make FP16 without scaling as good as dynamic on mlp too -> no task needs it.
    runs[3] = _record("mlp", "fp16-mixed:none", 0, 0.95)
    fp16 = {x["question"]: x for x in FI.findings(_doc(runs))}["Does FP16 need loss scaling here?"]
    assert fp16["answer"].startswith("No task here needed it")
    # Same metric, but gradients lost and a higher final loss: "partly".
    runs[3] = _record("mlp", "fp16-mixed:none", 0, 0.95, curve=[2.0, 1.0, 1.0], underflow_fraction={"fp16": 0.3})
    fp16 = {x["question"]: x for x in FI.findings(_doc(runs))}["Does FP16 need loss scaling here?"]
    assert fp16["answer"].startswith("Partly on mlp") and "2.00x" in fp16["evidence"][0]


# ------------------------------------------------------------------------------------------------------
# The CLI on a tiny study


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lossscale")
    sub = parser.add_subparsers(dest="command")
    cli_study.register(sub)
    return parser.parse_args(["study", *argv])


def _main(argv: list[str]) -> int:
    args = _args(argv)
    return int(args.func(args))


TINY = ["--tiny", "--tasks", "cnn,rnn", "--configs", "fp32,fp16-mixed:dynamic,bf16-pure:kahan",
        "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("study"))
    assert _main([*TINY, "--out", out]) == 0
    return out


def test_tiny_study_outputs(tiny_study: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny_study
    doc = SC.load_results(os.path.join(out, "results.json"))  # validates against the schema
    assert doc["schema_version"] == 1 and doc["config"]["mode"] == "tiny"
    assert doc["environment"]["threads_per_run"] == 1 and doc["environment"]["torch"]
    keys = sorted((r["task"], r["config"], r["seed"]) for r in doc["runs"])
    assert keys == sorted((t, c, 0) for t in ("cnn", "rnn") for c in ("fp32", "fp16-mixed:dynamic", "bf16-pure:kahan"))
    for r in doc["runs"]:
        assert len(r["loss_curve"]) == r["steps"] == len(r["scale_trajectory"])
        assert r["optimizer"] in ("lossscale.optim.SGD", "lossscale.optim.AdamW")
        if r["config"] == "fp32":
            assert set(r["underflow_fraction"]) == {"bf16", "fp16"}  # what would underflow, both formats
        elif r["config"] == "fp16-mixed:dynamic":
            assert set(r["underflow_fraction"]) == {"fp16"} and r["activation_grad_elements"] > 0
            assert r["final_scale"] is not None and r["scale_trajectory"][0] == 2.0**16
        else:
            assert r["compensation"] == "kahan" and r["weight_format"] == "bf16"
    with open(os.path.join(out, "results.schema.json")) as fh:
        assert json.load(fh)["properties"]["schema_version"]["enum"] == [1]

    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    html = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert "## Summary" in md and "## Findings" in md
    for task in ("cnn", "rnn"):
        assert f"## Task `{task}`" in md
        for kind in ("loss", "scale", "grad_hist"):
            png = f"{task}_{kind}.png"
            assert f"]({png})" in md
            with open(os.path.join(out, png), "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert md.count("| " + " | ".join(R.TASK_TABLE_HEADER) + " |") == 2
    for cfg in ("fp32", "fp16-mixed:dynamic", "bf16-pure:kahan"):
        assert md.count(f"| {cfg} |") == 5  # summary table + one row in each task table and steps-to-target table
    assert html.count("data:image/png;base64,") == 6 and "<table>" in html
    assert "Does FP16 need loss scaling here?" in md and "Published:" in md


def test_resume_skips_completed_runs(tiny_study: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = SC.load_results(os.path.join(tiny_study, "results.json"))

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a completed run was run again")

    monkeypatch.setattr(RN, "run_one", boom)
    assert _main([*TINY, "--out", tiny_study, "--resume"]) == 0
    after = SC.load_results(os.path.join(tiny_study, "results.json"))
    assert after["runs"] == before["runs"]
    # Without --resume an existing study is not overwritten.
    with pytest.raises(CLIError, match="--resume"):
        _main([*TINY, "--out", tiny_study])
    # Resuming with a new configuration runs only that one.
    called: list[str] = []

    def fake(spec: RN.RunSpec, **k: Any) -> dict[str, Any]:
        called.append(spec.config)
        rec = copy.deepcopy(next(r for r in before["runs"] if r["task"] == spec.task and r["config"] == "fp32"))
        rec.update(config=spec.config, precision="fp16-mixed", scaling="none", grad_format="fp16")
        return rec

    monkeypatch.setattr(RN, "run_one", fake)
    extra = TINY.copy()
    extra[extra.index("--configs") + 1] = "fp32,fp16-mixed:none"
    assert _main([*extra, "--out", tiny_study, "--resume"]) == 0
    assert called == ["fp16-mixed:none", "fp16-mixed:none"]
    final = SC.load_results(os.path.join(tiny_study, "results.json"))
    assert len(final["runs"]) == len(before["runs"]) + 2


def test_resume_keeps_the_sweeps_of_the_folder(tiny_study: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep added to a study's folder survives resuming the study (a resume once rebuilt the document from
    its runs alone and dropped every sweep)."""
    path = os.path.join(tiny_study, "results.json")
    doc = SC.load_results(path)
    run = copy.deepcopy(doc["runs"][0])
    run.update(sweep_value=16, overrides={"batch_size": 16})
    doc["sweeps"] = {"batch": {"runs": [run], "override": "batch_size", "values": [16], "mode": "tiny"}}
    SC.write_results(path, doc)

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a completed run was run again")

    monkeypatch.setattr(RN, "run_one", boom)
    assert _main([*TINY, "--out", tiny_study, "--resume"]) == 0
    after = SC.load_results(path)
    assert after["sweeps"] == doc["sweeps"] and after["runs"] == doc["runs"]
    assert "Sweep `batch`" in open(os.path.join(tiny_study, "report.md"), encoding="utf-8").read()
    del after["sweeps"]
    SC.write_results(path, after)  # leave the module's fixture as it was


def test_bad_configs_refused_with_valid_names(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(CLIError) as err:
        _main(["--tiny", "--configs", "fp32,fp16-mixed:kahan", "--out", str(tmp_path)])
    assert "unknown configuration 'fp16-mixed:kahan'" in str(err.value)
    assert all(n in str(err.value) for n in C.CONFIG_NAMES)
    with pytest.raises(CLIError, match="valid tasks"):
        _main(["--tiny", "--tasks", "cnn,gan", "--out", str(tmp_path)])
    with pytest.raises(CLIError, match="--seeds"):
        _main(["--tiny", "--seeds", "a,b", "--out", str(tmp_path)])
    assert not os.path.exists(os.path.join(str(tmp_path), "results.json"))


def test_cli_main_refuses_bad_configs(tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    from lossscale import cli

    assert "study" in cli._COMMANDS
    code = cli.main(["study", "--quick", "--configs", "fp8-hybrid:static", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    expected = "lossscale study: error: unknown configuration 'fp8-hybrid:static'; valid configurations: fp32,"
    assert err.startswith(expected)
    assert err.count("\n") == 1  # one line


@pytest.mark.parametrize("name", C.CONFIG_NAMES)
def test_every_configuration_fits_the_run_schema(name: str) -> None:
    """Each configuration's precision, scaling and compensation are values the run schema accepts (a full
    study once died at its first layerwise run: the schema's enum lacked "layerwise")."""
    (cfg,) = C.parse_configs(name)
    props = SC.RUN_SCHEMA["properties"]
    for field in ("precision", "scaling", "compensation"):
        SC.validate(getattr(cfg, field), props[field], f"$.{field}")
    with pytest.raises(SC.SchemaError, match="scaling"):
        SC.validate("per-tensor", props["scaling"], "$.scaling")


@pytest.mark.slow
def test_tiny_study_of_every_configuration_writes_a_valid_file(tmp_path: Path) -> None:
    """Every configuration (full mode's set, which --quick never runs) through the session on one task: the
    file validates, each run is there once, and the records describe their scaler from its own config."""
    from lossscale.scaling import config_from_dict
    from lossscale.study import session

    configs = C.parse_configs("all")
    doc, paths = session.run_in(str(tmp_path), mode="tiny", tasks=["deep-mlp"], configs=configs, seeds=[0],
                                workers=1, progress=False, log=lambda s: None)
    on_disk = SC.load_results(tmp_path / "results.json")
    assert on_disk["runs"] == doc["runs"] and len(doc["runs"]) == len(C.CONFIG_NAMES)
    assert sorted(r["config"] for r in doc["runs"]) == sorted(C.CONFIG_NAMES)
    for r in doc["runs"]:
        desc = dict(r["scaler"])
        if desc["kind"] == "layerwise":
            continue
        extra = {k: desc.pop(k) for k in list(desc) if k not in ("kind",) and k not in _config_fields(desc["kind"])}
        rule = config_from_dict(desc)  # the record names exactly a rule's fields (plus the static provenance)
        assert (r["scaling"] == "none") == (desc["kind"] == "none")
        if desc["kind"] == "dynamic":
            assert rule == RN.dynamic_scaling(r["steps"]) and not extra
        if desc["kind"] == "static":
            assert extra["chosen_by"] == "lossscale.diagnose" and r["scale_trajectory"][0] == rule.init_scale
    dyn = doc["config"]["task_details"]["deep-mlp"]["dynamic_scaling"]
    assert config_from_dict(dyn) == RN.dynamic_scaling(doc["config"]["task_details"]["deep-mlp"]["budget"]["steps"])
    assert os.path.exists(paths["md"]) and os.path.exists(paths["html"])


def _config_fields(kind: str) -> set[str]:
    import dataclasses

    from lossscale import scaling

    cls = {"dynamic": scaling.DynamicScaling, "static": scaling.StaticScaling, "none": scaling.NoScaling}[kind]
    return {f.name for f in dataclasses.fields(cls)}


def test_session_refuses_a_results_file_of_another_mode(tmp_path: Path) -> None:
    """Resuming a quick-mode file in tiny mode is refused by the session (StudyError naming the file), and
    without resume an existing file is never overwritten; nothing in the file changes."""
    from lossscale.study import session

    doc = session.new_document(mode="quick", tasks=["cnn"], configs=["fp32"], seeds=[0], device="cpu", workers=1,
                               command="test")
    SC.write_results(tmp_path / "results.json", doc)
    before = (tmp_path / "results.json").read_bytes()
    configs = C.parse_configs("fp32")
    with pytest.raises(session.StudyError, match="quick-mode study"):
        session.run_in(str(tmp_path), mode="tiny", tasks=["cnn"], configs=configs, seeds=[0], resume=True,
                       progress=False, log=lambda s: None)
    with pytest.raises(session.StudyError, match="--resume"):
        session.run_in(str(tmp_path), mode="quick", tasks=["cnn"], configs=configs, seeds=[0],
                       progress=False, log=lambda s: None)
    assert (tmp_path / "results.json").read_bytes() == before


def test_fp8_delayed_study_runs_keep_one_history_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The study's fp8-delayed runs name rounding sites by module (autocast model=), so each linear of the deep
    MLP keeps its own amax history, as Transformer Engine does; they once shared one history per op name."""
    import warnings

    import lossscale.emulate as E

    states: list[Any] = []

    class Recording(E.RecipeState):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            states.append(self)

    monkeypatch.setattr(E, "RecipeState", Recording)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without model=.*")
        RN.run_one(RN.RunSpec("deep-mlp", "fp8-delayed:none", 0, "tiny"))
    (state,) = states
    inputs = {k for k in state.delayed if k.endswith(".input")}
    model = build("deep-mlp", "tiny", seed=0).model
    n_linear = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert n_linear > 2 and len(inputs) == n_linear, sorted(state.delayed)[:6]


def test_static_scale_when_no_scale_meets_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scaling needed but no interval recommended (gradients spanning more binades than E5M2): the largest
    power of two leaving one binade of headroom under the format's max, not 1 (which the full study's `lm`
    fp8-hybrid:layerwise runs once got, leaving 24% of E5M2 gradients underflowing); nothing needed: 1."""
    import sys

    D = sys.modules["lossscale.diagnose"]  # (the package attribute `lossscale.diagnose` is the function)

    class Stub:
        def __init__(self, needs: bool) -> None:
            self.needs = needs

        def to_dict(self) -> dict[str, Any]:
            return {"max_abs": 3.0, "formats": {"e5m2": {"recommended_scale": None, "needs_scaling": self.needs,
                                                         "underflow_fraction": 0.5}}}

    monkeypatch.setattr(D, "diagnose", lambda *a, **k: Stub(True))
    scale, info = RN.static_scale("deep-mlp", "tiny", 0, "e5m2", "cpu")
    assert scale == 2.0**13 and info["fallback"]  # 57344 / 3 = 2^14.2: 2^14 fits, one binade of headroom: 2^13
    assert 3.0 * scale * 2 <= 57344.0 < 3.0 * scale * 4
    monkeypatch.setattr(D, "diagnose", lambda *a, **k: Stub(False))
    scale, info = RN.static_scale("deep-mlp", "tiny", 0, "e5m2", "cpu")
    assert scale == 1.0 and "fallback" not in info
