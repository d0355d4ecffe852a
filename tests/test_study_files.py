"""Durable studies: one study per output folder (a lock naming its holder, stale locks taken over), atomic
result files under a many-process writer/reader race, and no worker outliving a SIGKILLed parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from lossscale.cli import main
from lossscale.study import files as F
from lossscale.study import schema as SC
from lossscale.study import runner as RN

SRC = str(Path(__file__).resolve().parents[1] / "src")
ARGS = ["study", "--tiny", "--tasks", "deep-mlp", "--configs", "fp32", "--workers", "1", "--no-progress"]


def _env(extra_path: str | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, extra_path, env.get("PYTHONPATH")) if p)
    return env


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _no_runs(specs: Any, **kw: Any) -> list[dict[str, Any]]:
    return []


# ------------------------------------------------------------------------------------------------------
# The lock


def test_lock_refuses_a_second_holder_naming_the_pid(tmp_path: Path) -> None:
    with F.OutputLock(tmp_path) as first:
        assert first.stale_pid is None
        assert (tmp_path / F.LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(F.LockHeldError) as err:
            F.OutputLock(tmp_path).acquire()  # another open file description: refused, even in one process
        assert err.value.pid == os.getpid() and f"process {os.getpid()}" in str(err.value)
    assert (tmp_path / F.LOCK_NAME).read_text() == ""  # released: no PID left behind
    with F.OutputLock(tmp_path) as again:
        assert again.stale_pid is None


def test_stale_lock_of_a_dead_process_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = _dead_pid()
    (tmp_path / F.LOCK_NAME).write_text(f"{dead}\n")  # what a SIGKILLed study leaves behind
    monkeypatch.setattr(RN, "run_study", _no_runs)
    assert main([*ARGS, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"locked by process {dead}, which is gone; taking it over" in err
    assert SC.load_results(tmp_path / "results.json")["runs"] == []
    assert (tmp_path / F.LOCK_NAME).read_text() == ""


def test_cli_refuses_a_locked_out_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(RN, "run_study", _no_runs)
    with F.OutputLock(tmp_path):
        assert main([*ARGS, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lossscale study: error: ")
    assert f"in use by process {os.getpid()}" in err
    assert not (tmp_path / "results.json").exists()


def test_a_sweep_into_a_locked_out_is_refused_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sweep adds to the study's results.json, so it takes the same lock (it once wrote without one)."""
    monkeypatch.setattr(RN, "run_study", _no_runs)
    with F.OutputLock(tmp_path):
        assert main(["study", "--sweep", "batch", "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"in use by process {os.getpid()}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [F.LOCK_NAME]


SLOW_STUDY = textwrap.dedent(
    """
    import sys, time
    from lossscale.study import runner as RN

    def slow(specs, **kw):
        time.sleep(6.0)
        return []

    RN.run_study = slow
    from lossscale.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_two_studies_into_one_out_exactly_one_runs(tmp_path: Path) -> None:
    script = tmp_path / "slow_study.py"
    script.write_text(SLOW_STUDY)
    out = tmp_path / "out"
    procs = [
        subprocess.Popen([sys.executable, str(script), *ARGS, "--out", str(out)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.pid, *p.communicate(timeout=120), p.returncode) for p in procs]
    codes = sorted(r[3] for r in results)
    assert codes == [0, 2], results
    (winner,) = [r for r in results if r[3] == 0]
    (loser,) = [r for r in results if r[3] == 2]
    err = loser[2]
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lossscale study: error: ") and f"in use by process {winner[0]}" in err
    assert SC.load_results(out / "results.json")["runs"] == []


# ------------------------------------------------------------------------------------------------------
# Atomic writes


def _doc(tag: str) -> dict[str, Any]:
    return {
        "schema_version": SC.SCHEMA_VERSION,
        "command": tag,
        "config": {"mode": "tiny", "tasks": [], "configs": [], "seeds": [], "device": "cpu", "workers": 1,
                   "threads": 1, "task_details": {}},
        "environment": {"torch": "x", "device": "cpu", "threads_per_run": 1},
        "runs": [],
        "padding": "x" * 50_000,  # large enough that a partial file would be visible to a reader
    }


WRITER = textwrap.dedent(
    """
    import json, os, sys, time
    from lossscale.study import schema as SC
    doc = json.loads(sys.stdin.readline())
    open(sys.argv[1] + "." + sys.argv[3] + ".ready", "w").close()
    while not os.path.exists(sys.argv[4]):  # all writers start together, once imported
        time.sleep(0.01)
    for i in range(int(sys.argv[2])):
        doc["command"] = f"{sys.argv[3]}-{i}"
        SC.write_results(sys.argv[1], doc)
    """
)

READER = textwrap.dedent(
    """
    import json, os, sys
    bad = reads = 0
    while not os.path.exists(sys.argv[2]):
        try:
            with open(sys.argv[1], encoding="utf-8") as fh:
                json.load(fh)
        except FileNotFoundError:
            continue
        except ValueError:
            bad += 1
        reads += 1
    print(reads, bad)
    """
)


@pytest.mark.slow  # five processes, three of which import torch
def test_many_writers_and_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    stop = tmp_path / "stop"
    go = tmp_path / "go"
    SC.write_results(path, _doc("start"))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), "40", f"w{k}", str(go)], env=_env(),
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(3)]
    payload = json.dumps(_doc("w")) + "\n"
    for w in writers:
        assert w.stdin is not None
        w.stdin.write(payload)
        w.stdin.close()
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*.ready"))) < 3:
        assert time.monotonic() < deadline and all(w.poll() is None for w in writers)
        time.sleep(0.05)
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(path), str(stop)], env=_env(),
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.2)
    go.write_text("")
    errs = [w.stderr.read() if w.wait(timeout=300) else "" for w in writers]  # type: ignore[union-attr]
    stop.write_text("")
    counts = [tuple(int(v) for v in r.communicate(timeout=60)[0].split()) for r in readers]
    assert [w.returncode for w in writers] == [0, 0, 0], errs
    assert all(bad == 0 for _, bad in counts), counts
    assert sum(reads for reads, _ in counts) > 0
    final = SC.load_results(path)
    assert final["command"].split("-")[1] == "39"  # the last write of some writer
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    F.atomic_write(path, "old")

    class Boom(str):
        def encode(self, *a: Any, **k: Any) -> bytes:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        F.atomic_write(path, Boom("new"))
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


# ------------------------------------------------------------------------------------------------------
# Workers die with their parent

SLEEPY = textwrap.dedent(
    """
    import os, time

    def sleepy(spec):
        with open(os.path.join(os.environ["PIDDIR"], str(os.getpid())), "w") as fh:
            fh.write("")
        time.sleep(300)
        return {}
    """
)

PARENT = textwrap.dedent(
    """
    from lossscale.study import runner as RN
    import sleepymod

    if __name__ == "__main__":
        specs = [RN.RunSpec("cnn", "fp32", s, "tiny") for s in (0, 1)]
        RN.run_study(specs, workers=2, progress=False, run=sleepymod.sleepy)
    """
)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (re-parented to an init that has not reaped it yet)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process trees from /proc (Linux)")
def test_workers_exit_when_the_parent_is_sigkilled(tmp_path: Path) -> None:
    (tmp_path / "sleepymod.py").write_text(SLEEPY)
    (tmp_path / "parent.py").write_text(PARENT)
    piddir = tmp_path / "pids"
    piddir.mkdir()
    env = _env(str(tmp_path))
    env["PIDDIR"] = str(piddir)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(piddir)) < 2:
            assert parent.poll() is None, "the study ended early"
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        workers = sorted(int(p) for p in os.listdir(piddir))
        children = _children(parent.pid)
        assert set(workers) <= set(children)  # the workers, and multiprocessing's resource tracker
        assert all(_alive(p) for p in children)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in children if _alive(p)]
    for p in left:  # do not leak them into the rest of the test session
        os.kill(p, signal.SIGKILL)
    assert left == [], f"still alive 10 s after the parent's SIGKILL: {left}"
