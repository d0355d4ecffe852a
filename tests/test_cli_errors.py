"""The CLI never answers with a traceback: every error is one `error:` line, exit 2 (1 for a failure inside the
user's own code, whose trace only --debug prints), checked before any long computation; negative numbers are
accepted as option values; --model finds modules in the current directory as `python -m` does.

A table over every case the adversarial review found, with a local model-factory package (no third-party
models), then a property-based test over generated argument lists per subcommand with the study and
diagnose runners stubbed, so that no real training starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossscale.cli import diagnose as cli_diagnose
from lossscale.cli import main
from lossscale.study import schema as SC
from lossscale.study import runner as RN

SRC = str(Path(__file__).resolve().parents[1] / "src")

FACTORIES = textwrap.dedent(
    """
    import os
    import torch
    from torch import nn

    MARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "factory-ran")


    def _batches():
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(2)]


    def _loss(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])


    def good():
        open(MARK, "w").close()  # so a test can tell that the factory ran
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), _loss, _batches()


    def loss_raises():
        m, _, b = good()

        def loss(model, batch):
            raise KeyError("label")

        return m, loss, b


    def batches_raise():
        m, loss, _ = good()

        def gen():
            yield from _batches()[:1]
            raise OSError("disk gone")

        return m, loss, gen()


    def exits():
        raise SystemExit(0)


    class NeedsArgs(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.lin = nn.Linear(width, 2)
    """
)

PKG = "errpkg"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project folder holding the factory package, made the current directory (and NOT put on sys.path:
    the CLI must find it there by itself)."""
    pkg = tmp_path / PKG
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        monkeypatch.delitem(sys.modules, name)
    yield tmp_path
    for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[name]


def _check_one_error_line(err: str) -> None:
    assert "Traceback" not in err, err
    error_lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(error_lines) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == error_lines[0]  # the error line ends the output
    # Our own errors are the only line; argparse's come after its usage line(s).
    if not err.startswith("usage:"):
        assert err.count("\n") == 1 and err.startswith("lossscale "), err


def _unknown_task_results(out: Path) -> None:
    out.mkdir()
    doc = {
        "schema_version": SC.SCHEMA_VERSION,
        "config": {"mode": "tiny", "tasks": ["mnist"], "configs": ["fp32"], "seeds": [0], "device": "cpu",
                   "workers": 1, "threads": 1, "task_details": {}},
        "environment": {"torch": "x", "device": "cpu", "threads_per_run": 1},
        "runs": [],
    }
    (out / "results.json").write_text(json.dumps(doc))


STUDY = ["study", "--tiny", "--tasks", "deep-mlp", "--configs", "fp32", "--workers", "1", "--no-progress"]
DIAG = ["diagnose", "--steps", "1", "--no-progress", "--no-plots"]

# (argv, exit status, text the error line must contain, setup(project) or None)
CASES: list[tuple[list[str], int, str, Any]] = [
    # point 3: --out an existing file or below one; diagnose refuses it before running anything
    ([*STUDY, "--out", "afile"], 2, "--out afile exists and is not a directory", "file"),
    ([*STUDY, "--out", "afile/sub"], 2, "--out afile/sub: cannot write there", "file"),
    ([*DIAG, "--model", f"{PKG}.models:good", "--out", "afile"], 2, "exists and is not a directory", "file"),
    ([*DIAG, "--model", f"{PKG}.models:good", "--out", "afile/sub"], 2, "cannot write there", "file"),
    # point 3: devices
    ([*STUDY, "--device", "bogus", "--out", "o"], 2, "--device 'bogus' is not a torch device", None),
    ([*STUDY, "--device", "meta", "--out", "o"], 2, "runs on cpu (emulated) or cuda[:N] (native), not meta", None),
    # point 3: seeds
    ([*DIAG, "--model", f"{PKG}.models:good", "--seed", "1180591620717411303424"], 2, "--seed: must be in", None),
    ([*DIAG, "--model", f"{PKG}.models:good", "--seed", "-1"], 2, "--seed: must be in", None),
    ([*STUDY, "--seeds", "n=10000000", "--out", "o"], 2, "--seeds n=COUNT needs 1 <= COUNT <= 1000", None),
    ([*STUDY, "--seeds", "1180591620717411303424", "--out", "o"], 2, "--seeds must be comma-separated", None),
    ([*STUDY, "--seeds", "9" * 5000, "--out", "o"], 2, "--seeds must be comma-separated", None),
    ([*STUDY, "--workers", "1000000", "--out", "o"], 2, "--workers must be between 1 and", None),
    # point 3: the user's own code fails: exit 1, one line
    ([*DIAG, "--model", f"{PKG}.models:loss_raises"], 1, "loss_fn raised KeyError: 'label'", None),
    ([*DIAG, "--model", f"{PKG}.models:batches_raise", "--steps", "3"], 1, "batches raised OSError: disk gone", None),
    ([*DIAG, "--model", f"{PKG}.models:exits"], 1, "exits() raised SystemExit: 0", None),
    # point 3: a class whose constructor needs arguments
    ([*DIAG, "--model", f"{PKG}.models:NeedsArgs"], 2, "must be callable with no arguments", None),
    # point 3: resuming a results.json that names an unknown task
    ([*STUDY, "--out", "old", "--resume"], 2, "unknown task(s) 'mnist'", "unknown-task"),
    # argparse's own errors: usage, then one error line
    ([*STUDY, "--workers", "two"], 2, "invalid int value", None),
    (["formats", "--value"], 2, "expected one argument", None),
    (["nonsense"], 2, "invalid choice", None),
]


@pytest.mark.parametrize(
    ("argv", "code", "message", "setup"), CASES, ids=[" ".join(c[0][:1] + c[0][-3:]) for c in CASES]
)
def test_every_error_is_one_line(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str], code: int, message: str, setup: str | None,
) -> None:
    if setup == "file":
        (project / "afile").write_text("not a folder")
    elif setup == "unknown-task":
        _unknown_task_results(project / "old")
    monkeypatch.setattr(RN, "run_study", lambda *a, **k: pytest.fail("a study started"))
    assert main(argv) == code
    err = capsys.readouterr().err
    _check_one_error_line(err)
    assert message in err, err
    if "afile" in argv:
        assert not (project / "errpkg" / "factory-ran").exists()  # refused before the model was built
        assert (project / "afile").read_text() == "not a folder"


def test_debug_adds_the_users_traceback(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", *DIAG, "--model", f"{PKG}.models:loss_raises"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise KeyError("label")' in err
    assert err.rstrip().splitlines()[-1].startswith("lossscale diagnose: error: ")
    assert main([*DIAG, "--model", f"{PKG}.models:loss_raises", "--debug"]) == 1  # after the subcommand too
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1e-8", "-inf", "-3", "-0.5", "-nan"])
def test_negative_numbers_are_values(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats", "--value", value, "--format", "fp16"]) == 0
    out = capsys.readouterr().out
    assert f"How {float(value)!r} rounds" in out


def test_negative_number_joins_only_value_options(capsys: pytest.CaptureFixture[str]) -> None:
    # `--saturate` takes no value: a number after it stays a separate (here: unexpected) argument.
    assert main(["formats", "--saturate", "-1"]) == 2
    _check_one_error_line(capsys.readouterr().err)


def test_model_resolves_from_the_current_directory_with_the_console_script(project: Path) -> None:
    # The console script's sys.path[0] is its own folder, not the current directory: reproduce that with a
    # script living elsewhere.
    bindir = Path(tempfile.mkdtemp())
    script = bindir / "lossscale_script.py"
    script.write_text("import sys\nfrom lossscale.cli import main\nsys.exit(main())\n")
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), *DIAG, "--model", f"{PKG}.models:good", "--out", "diag"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((project / "diag" / "diagnosis.json").read_text())["meta"]["model"] == f"{PKG}.models:good"


def test_help_says_model_imports_and_runs_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "IMPORTS AND RUNS the named module" in text and "current directory" in text


# ------------------------------------------------------------------------------------------------------
# Generated argument lists, runners stubbed

_NUMBERS = ["0", "1", "-1", "3", "-1e-8", "1e-8", "inf", "-inf", "nan", "1e400", "99999999999999999999999", "x", ""]
_COMMON_VALUES = [*_NUMBERS, "o", "o/sub", "afile", "afile/x", "../up", "é", "-", "--", "n=2", "n=10000000"]
_GRAMMAR: dict[str, dict[str, list[str] | None]] = {
    # option -> values it is given (None: a flag)
    "formats": {"--value": _NUMBERS, "--format": ["fp16", "bf16", "e4m3", "e6m9", "e0m0", "fp17", "", "x"],
                "--saturate": None},
    "study": {"--quick": None, "--full": None, "--tiny": None, "--tasks": ["cnn", "deep-mlp", "mnist", "", ",", "../x"],
              "--configs": ["fp32", "quick", "all", "fp16-mixed:kahan", "", "fp32,fp32"],
              "--seeds": ["0", "0,1", "n=2", "n=0", "n=10000000", "-1", "a,b", "1180591620717411303424"],
              "--out": ["o", "o2", "afile", "afile/x"], "--resume": None,
              "--device": ["cpu", "cuda", "cuda:7", "meta", "bogus", "", "cpu:0"],
              "--workers": ["1", "2", "0", "-3", "1000000", "x"], "--no-progress": None},
    "diagnose": {"--model": [f"{PKG}.models:good", f"{PKG}.models:loss_raises", f"{PKG}.models:exits",
                             f"{PKG}.models:NeedsArgs", f"{PKG}.nothere:f", "os:getcwd", ":", "a b:c"],
                 "--example": ["bogus"], "--formats": ["bf16", "fp16,e5m2", "fp16,fp16", "", "x"],
                 "--steps": ["1", "2", "0", "-1", "x"], "--threshold": ["0", "0.5", "1", "-1e-8", "nan", "inf"],
                 "--seed": ["0", "-1", "1180591620717411303424", "x"], "--out": ["o", "afile", "afile/x"],
                 "--plots": None, "--no-plots": None, "--progress": None, "--no-progress": None},
}


def _argv(draw: st.DrawFn, command: str) -> list[str]:
    grammar = _GRAMMAR[command]
    argv = [command]
    for _ in range(draw(st.integers(0, 6))):
        opt = draw(st.sampled_from([*grammar, "--bogus", "-x"]))
        argv.append(opt)
        values = grammar.get(opt)
        if values is not None or opt not in grammar:
            if draw(st.booleans()) or opt in grammar:
                argv.append(draw(st.sampled_from(values if values and draw(st.integers(0, 4)) else _COMMON_VALUES)))
    if command == "diagnose" and draw(st.integers(0, 3)):
        argv += ["--model", f"{PKG}.models:good"]  # mostly past the required source, to reach the checks
    if command != "formats" and "--progress" not in argv:
        argv.append("--no-progress")
    return argv


@st.composite
def _cli_argv(draw: st.DrawFn) -> list[str]:
    return _argv(draw, draw(st.sampled_from(sorted(_GRAMMAR))))


@pytest.fixture(scope="module")
def tiny_diagnosis() -> Any:
    import torch
    from torch import nn

    from lossscale.diagnose import diagnose

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    return diagnose(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), batches, steps=1)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=_cli_argv())
def test_generated_argument_lists_never_trace(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_diagnosis: Any,
    argv: list[str],
) -> None:
    (project / "afile").write_text("not a folder")
    monkeypatch.setattr(RN, "run_study", lambda *a, **k: [])  # no real training
    monkeypatch.setattr(cli_diagnose, "_run_with_progress", lambda *a, **k: tiny_diagnosis)
    import lossscale.plots

    monkeypatch.setattr(lossscale.plots, "save_all", lambda *a, **k: [])
    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err + out, argv
    if code != 0:
        _check_one_error_line(err)
        assert "internal error" not in err, (argv, err)
