"""README.md tells the truth: its example runs, and its Quick start matches the Makefile and .ci/run."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ten_line_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    block = re.search(r"## In ten lines\n\n```python\n(.*?)```", README, re.S)
    assert block is not None
    exec(compile(block.group(1), "README.md", "exec"), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "fp16" in out and "bf16" in out


def test_quick_start_commands_exist_in_makefile_and_ci() -> None:
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make (\w[\w-]*)", quick, re.M)
    assert commands == ["run", "test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in commands:
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "lossscale study --quick" in makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0] or \
        "-m lossscale study --quick" in makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
