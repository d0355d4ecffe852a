"""Hostile files: a results.json whose names would write outside --out, duplicate or unknown runs, and a
crafted CIFAR-10 batch that would run code when unpickled. Each is refused, and the file system shows that
nothing was written or executed."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lossscale.cli import main
from lossscale.study import data as D
from lossscale.study import report as R
from lossscale.study import schema as SC
from lossscale.study import runner as RN

from .test_study import _doc, _record


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------------------------------------------
# Path traversal


def test_traversing_task_name_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    doc = _doc([_record("../../escape", "fp32", 0, 0.9)])
    SC.validate(doc)  # schema-valid: the name check is what refuses it
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    path = out / "results.json"
    path.write_text(json.dumps(doc))
    before = _tree(tmp_path)
    with pytest.raises(SC.SchemaError, match=r"unknown task\(s\) '../../escape'; known tasks: cnn"):
        SC.load_results(path)
    with pytest.raises(SC.SchemaError, match="'../../escape'"):
        R.write_report(doc, out)
    assert _tree(tmp_path) == before  # no PNG two folders up, no report


def test_report_file_behind_a_symlink_out_of_out_is_refused(tmp_path: Path) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside.png"
    out.mkdir()
    (out / "cnn_loss.png").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the output folder"):
        R.write_report(_doc([_record("cnn", "fp32", 0, 0.9)]), out)
    assert not outside.exists()
    assert not (out / "report.md").exists()


def test_contained() -> None:
    from lossscale.study.files import contained

    assert contained("/tmp/x", "a.png") == os.path.realpath("/tmp/x/a.png")
    for bad in ("../a.png", "/etc/passwd", "sub/../../a.png", "."):
        with pytest.raises(ValueError, match="outside the output folder"):
            contained("/tmp/x", bad)


# ------------------------------------------------------------------------------------------------------
# Duplicate and unknown runs (resume)


def test_duplicate_and_unknown_runs_are_refused_naming_them(tmp_path: Path) -> None:
    good = _doc([_record("cnn", "fp32", 0, 0.9), _record("cnn", "fp32", 1, 0.9)])
    SC.check_names(good)
    dup = copy.deepcopy(good)
    dup["runs"].append(copy.deepcopy(dup["runs"][0]))
    with pytest.raises(SC.SchemaError, match=r"duplicate run\(s\): cnn fp32 seed 0 \(each run must appear once\)"):
        SC.check_names(dup)
    unknown = copy.deepcopy(good)
    unknown["config"]["tasks"] = ["cnn", "mnist"]
    with pytest.raises(SC.SchemaError, match=r"unknown task\(s\) 'mnist'"):
        SC.check_names(unknown)


def test_resume_refuses_duplicate_runs_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _doc([_record("cnn", "fp32", 0, 0.9)] * 2)
    (tmp_path / "results.json").write_text(json.dumps(doc))
    monkeypatch.setattr(RN, "run_study", lambda *a, **k: pytest.fail("a study started"))
    argv = ["study", "--tiny", "--tasks", "cnn", "--configs", "fp32", "--out", str(tmp_path), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "duplicate run(s): cnn fp32 seed 0" in err
    assert json.loads((tmp_path / "results.json").read_text()) == doc  # untouched


# ------------------------------------------------------------------------------------------------------
# CIFAR-10 batches: a restricted unpickler


class _Payload:
    """Unpickling this object would create a folder (a stand-in for running any code)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.target,))


def _batch(n: int, seed: int) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(x) for x in rng.integers(0, 10, size=n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_load_with_every_protocol(tmp_path: Path, protocol: int) -> None:
    batch = _batch(5, protocol)
    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump(batch, fh, protocol=protocol)
    c = D.load_cifar10(tmp_path, test_fraction=0.2)
    assert c.x_train.shape[0] + c.x_test.shape[0] == 5
    got = sorted(c.y_train.tolist() + c.y_test.tolist())
    assert got == sorted(batch[b"labels"])


@pytest.mark.parametrize("where", ["labels", "top"])
def test_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path: Path, where: str) -> None:
    target = tmp_path / "pwned"
    batch: Any = _batch(3, 0)
    if where == "labels":
        batch[b"labels"] = [_Payload(str(target))]
    else:
        batch = _Payload(str(target))
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)
    pickle.loads(pickle.dumps(_Payload(str(tmp_path / "control"))))  # negative control: plain pickle runs it
    assert (tmp_path / "control").is_dir()
    with pytest.raises(ValueError) as err:
        D.load_cifar10(tmp_path)
    assert str(path) in str(err.value) and "refusing to unpickle posix.mkdir" in str(err.value).replace("nt.", "posix.")
    assert not target.exists()
