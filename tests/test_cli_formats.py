"""`lossscale formats`: the table and the per-value explanation, through the real entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lossscale.cli import main


def test_table_lists_every_preset_with_its_constants(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in ("fp32", "bf16", "fp16", "e4m3", "e5m2", "e2m1", "e2m3", "e3m2"):
        assert f"│ {name} " in out
    assert "65504" in out and "57344" in out and "448" in out and "(2^-133)" in out


def test_value_shows_bits_and_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats", "--value", "1e-8", "--format", "fp16", "--format", "bf16"]) == 0
    out = capsys.readouterr().out
    fp16 = next(line for line in out.splitlines() if "│ fp16" in line)
    bf16 = next(line for line in out.splitlines() if "│ bf16" in line)
    assert "underflow" in fp16 and "0|00000|0000000000" in fp16
    assert "rounded" in bf16 and "0|01100100|0101100" in bf16


def test_saturate_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats", "--value", "500", "--format", "e4m3", "--saturate"]) == 0
    assert "saturated" in capsys.readouterr().out
    assert main(["formats", "--value", "500", "--format", "e4m3"]) == 0
    assert "overflow" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["formats", "--value", "abc"], "--value must be a number"),
        (["formats", "--format", "bf17"], "unknown format name 'bf17'"),
        (["formats", "--format", "e9m2"], "exponent_bits must be in 2..8"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_python_dash_m_and_help_examples() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lossscale", "formats", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "examples:" in out and "lossscale formats --value 1e-8" in out


def test_block_formats_listed_and_one_block_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "nvfp4"):
        assert f"│   {name} " in out or f"│ {name} " in out or f" {name} │" in out
    assert main(["formats", "--format", "nvfp4"]) == 0
    out = capsys.readouterr().out
    assert "nvfp4" in out and "Number formats" not in out and "4.5" in out
    assert main(["formats", "--block", "1,0.3,-5,100", "--format", "mxfp4"]) == 0
    out = capsys.readouterr().out
    assert "131 (2^4)" in out and "saturated" in out and "-8.0" in out and "96.0" in out
    assert main(["formats", "--block", "1,2", "--format", "e4m3"]) == 2
    assert "--block needs block formats" in capsys.readouterr().err
    assert main(["formats", "--value", "1", "--format", "mxfp4"]) == 2
