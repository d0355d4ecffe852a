"""`lossscale diagnose`: files written, the table printed, and one clear line for each kind of bad input."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lossscale.cli import main

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn


    def _data(n_in):
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(32, n_in, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(3)]


    def _loss(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])


    def deep():
        torch.manual_seed(0)
        layers = []
        for i in range(30):
            layers += [nn.Linear(16, 16), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(16, 3)), _loss, _data(16)


    def shallow():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)), _loss, _data(8)


    def wrong_shape():
        return nn.Linear(2, 2), _loss


    def not_a_model():
        return "model", _loss, []


    def raises():
        raise RuntimeError("no data here")


    def bad_loss():
        m, _, d = shallow()
        return m, (lambda m, b: m(b[0])), d

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = tmp_path / "diagpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(FACTORIES)
    (pkg / "broken.py").write_text("import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "diagpkg"


def test_deep_model_writes_json_markdown_and_figures(
    factories: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["diagnose", "--model", f"{factories}.models:deep", "--steps", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "│ fp16" in printed and "WOULD" in printed and "loss scaling needed" in printed
    d = json.loads((out / "diagnosis.json").read_text())
    assert d["schema_version"] == 1 and d["steps"] == 2 and d["source"] == "fp32"
    assert d["formats"]["fp16"]["needs_scaling"] is True
    assert d["formats"]["bf16"]["needs_scaling"] is False
    assert d["meta"]["model"] == f"{factories}.models:deep"
    assert (out / "diagnosis.md").read_text().startswith("# Gradient diagnosis")
    for png in ("gradient_histogram.png", "layer_underflow.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_formats_flag_and_progress_bar(factories: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o2"
    argv = ["diagnose", "--model", f"{factories}.models:shallow", "--steps", "1", "--formats", "fp16,e4m3",
            "--out", str(out), "--no-plots"]
    assert main(argv) == 0
    d = json.loads((out / "diagnosis.json").read_text())
    assert list(d["formats"]) == ["fp16", "e4m3"]
    assert d["formats"]["fp16"]["needs_scaling"] is False
    assert not (out / "gradient_histogram.png").exists()


@pytest.mark.parametrize(
    ("model", "message", "code"),
    [
        ("diagpkg.models", "PACKAGE.MODULE:FACTORY", 2),
        ("diagpkg.nothere:f", "cannot import 'diagpkg.nothere'", 2),
        ("diagpkg.broken:f", "cannot import 'diagpkg.broken'", 1),  # the module's own import fails: user code
        ("diagpkg.models:missing", "has no callable 'missing'", 2),
        ("diagpkg.models:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'", 2),
        ("diagpkg.models:wrong_shape", "must return (model, loss_fn, batches)", 2),
        ("diagpkg.models:not_a_model", "not a torch.nn.Module", 2),
        ("diagpkg.models:raises", "raised RuntimeError: no data here", 1),
        ("diagpkg.models:bad_loss", "scalar loss", 2),
    ],
)
def test_bad_model_gets_one_clear_line(
    factories: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, message: str, code: int
) -> None:
    argv = ["diagnose", "--model", model, "--steps", "1", "--out", str(tmp_path / "x"), "--no-progress"]
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("lossscale diagnose: error: ") and message in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--formats", "fp17"], "unknown format name 'fp17'"),
        (["--formats", "fp16,half"], "must not repeat"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--threshold", "2"], "--threshold must be in [0, 1)"),
    ],
)
def test_bad_options_get_one_clear_line(
    factories: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["diagnose", "--model", "diagpkg.models:shallow", "--out", str(tmp_path / "x"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_model_or_example_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose"]) == 2
    assert main(["diagnose", "--example", "resnet152"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_example_deep_mlp(tmp_path: Path) -> None:
    out = tmp_path / "ex"
    assert main(["diagnose", "--example", "deep-mlp", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    d = json.loads((out / "diagnosis.json").read_text())
    assert d["meta"]["model"] == "example:deep-mlp"
    assert d["formats"]["fp16"]["needs_scaling"] is True and d["formats"]["bf16"]["underflow_fraction"] == 0.0


def test_optimizer_flags_reach_the_run_and_the_report(
    factories: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "opt"
    argv = ["diagnose", "--model", f"{factories}.models:shallow", "--steps", "2", "--out", str(out), "--no-plots",
            "--no-progress", "--optimizer", "adamw", "--lr", "1e-4", "--optimizer-arg", "betas=(0.8, 0.95)"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "AdamW(lr=0.0001, betas=(0.8, 0.95)" in printed.replace("\n", "")
    d = json.loads((out / "diagnosis.json").read_text())
    assert d["meta"]["optimizer"] == "AdamW"
    assert d["meta"]["optimizer_defaults"]["lr"] == 1e-4 and d["meta"]["optimizer_defaults"]["betas"] == [0.8, 0.95]
    assert "weight updates of AdamW(lr=0.0001" in (out / "diagnosis.md").read_text()
    # Without --optimizer: SGD at lr 0.01, said so.
    out2 = tmp_path / "sgd"
    argv = ["diagnose", "--model", f"{factories}.models:shallow", "--steps", "2", "--out", str(out2), "--no-plots",
            "--no-progress"]
    assert main(argv) == 0
    d2 = json.loads((out2 / "diagnosis.json").read_text())
    assert d2["meta"]["optimizer_description"].startswith("SGD(lr=0.01")
    assert d2["meta"]["numerically_zero_check"].startswith("on:")
    assert d["meta"]["numerically_zero_check"].startswith("on:")
    out3 = tmp_path / "nozero"
    assert main([*argv[:-4], "--out", str(out3), "--no-plots", "--no-progress", "--no-zero-check"]) == 0
    assert json.loads((out3 / "diagnosis.json").read_text())["meta"]["numerically_zero_check"] == "off"
    assert d2["formats"]["bf16"]["swamping_fraction"] != d["formats"]["bf16"]["swamping_fraction"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--optimizer", "adamz"], "--optimizer: optimizer must be a torch.optim class name"),
        (["--optimizer", "sgd", "--optimizer-arg", "momentum"], "--optimizer-arg must look like KEY=VALUE"),
        (["--optimizer", "sgd", "--optimizer-arg", "momentum=fast"], "is not a Python literal"),
        (["--optimizer", "sgd", "--optimizer-arg", "speed=1"], "SGD takes no argument 'speed'"),
    ],
)
def test_bad_optimizer_flags_get_one_clear_line(
    factories: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["diagnose", "--model", "diagpkg.models:shallow", "--out", str(tmp_path / "x"), "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_gradients_npz_from_another_framework(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from lossscale import diagnose_gradients

    g = np.random.default_rng(0)
    arrays = {"dense/kernel:0": (g.standard_normal((8, 8)) * 1e-8).astype(np.float32),
              "dense/bias:0": g.standard_normal(8).astype(np.float32)}
    np.savez(tmp_path / "grads.npz", **arrays)
    out = tmp_path / "npz"
    argv = ["diagnose", "--gradients", str(tmp_path / "grads.npz"), "--formats", "bf16,fp16", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "exported arrays" in printed and "│ fp16" in printed
    d = json.loads((out / "diagnosis.json").read_text())
    want = diagnose_gradients(arrays, formats=("bf16", "fp16")).to_dict()
    assert d["formats"] == json.loads(json.dumps(want["formats"]))
    assert [x["name"] for x in d["layers"]] == ["dense/kernel:0", "dense/bias:0"]
    assert d["meta"]["model"].startswith("gradients:") and d["formats"]["fp16"]["needs_scaling"] is True
    for png in ("gradient_histogram.png", "layer_underflow.png", "top_layers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_gradients_file_gets_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    np.savez(tmp_path / "ints.npz", w=np.arange(4))
    np.savez(tmp_path / "ok.npz", w=np.ones(4))
    for path, message, extra in (
        (tmp_path / "missing.npz", "FileNotFoundError", []),
        (tmp_path / "ints.npz", "floating-point", []),
        (tmp_path / "ok.npz", "the updates for swamping come from the file", ["--optimizer", "adamw"]),
    ):
        assert main(["diagnose", "--gradients", str(path), "--out", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lossscale diagnose: error: --") and "--gradients" in err and message in err
        assert len(err.splitlines()) == 1
