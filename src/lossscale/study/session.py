"""A study's lifecycle in one output folder: start, resume, merge, sweeps (``lossscale study`` calls these).

* :func:`run_in` runs a study into ``OUT``: it takes the folder's lock (one study per folder), starts a new
  ``results.json`` or resumes the one there (``resume=True``: its finished runs are kept, runs outside the
  new selection too, so that a narrower resume loses nothing), writes the file after every finished run
  (atomically, :mod:`lossscale.study.files`), and renders the report.
* :func:`sweep_in` adds one sweep's runs to ``OUT/results.json`` (a study there is kept; an interrupted sweep
  resumes) under the same lock, and re-renders the report.
* :func:`new_document` is the results document before any run: the resolved selection, each task's
  description, budget, recipe and scaling rule (derived from the rule's own config with
  :func:`lossscale.scaling.config_to_dict`, the same description each run records), and the environment.

Every refusal (a folder in use, a results file of another mode, a file that does not validate) is a
:class:`StudyError` whose message names the file and what to do.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import files as F
from . import runner as RN
from .configs import StudyConfig
from .schema import SCHEMA_VERSION, load_results, now_iso, write_results

__all__ = ["StudyError", "new_document", "run_in", "sweep_in", "run_key"]

Log = Callable[[str], None]


class StudyError(ValueError):
    """A study that cannot start or continue here; the message says why and what to do."""


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_key(record: dict[str, Any]) -> tuple[str, str, int]:
    """The identity of a run record: (task, configuration, seed)."""
    return record["task"], record["config"], int(record["seed"])


def task_details(task: str, mode: str) -> dict[str, Any]:
    """What results.json says of a task before any run: description, metric, chance, recipe, budget and
    the dynamic scaling rule its ``:dynamic`` runs use (:func:`lossscale.study.runner.dynamic_scaling`)."""
    from ..scaling import config_to_dict
    from .tasks import TASKS

    t = TASKS[task]
    budget = t.budget(mode)
    return {
        "description": t.description,
        "metric_name": t.metric_name,
        "chance": t.chance,
        "recipe": t.recipe.describe(),
        "budget": budget.to_dict(),
        "dynamic_scaling": config_to_dict(RN.dynamic_scaling(budget.steps)),
        "data": None,
    }


def new_document(
    *, mode: str, tasks: Sequence[str], configs: Sequence[str], seeds: Sequence[int], device: str, workers: int,
    command: str, threads: int = 1,
) -> dict[str, Any]:
    """The results document of a study before any run (``runs`` empty)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": now_iso(),
        "command": command,
        "config": {
            "mode": mode,
            "tasks": list(tasks),
            "configs": list(configs),
            "seeds": sorted(seeds),
            "device": device,
            "workers": workers,
            "threads": threads,
            "task_details": {t: task_details(t, mode) for t in tasks},
            "monitor_formats": list(RN.MONITOR_FORMATS),
        },
        "environment": RN.environment(device, threads, workers),
        "runs": [],
    }


def _load(path: str, what: str) -> dict[str, Any]:
    try:
        return load_results(path)
    except (ValueError, OSError) as err:
        raise StudyError(f"cannot {what} {path}: {_describe(err)}") from None


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


class _Locked:
    """The output folder's lock as a context manager that raises :class:`StudyError` when it is held."""

    def __init__(self, out: str, log: Log) -> None:
        self.lock = F.OutputLock(out)
        self.out = out
        self.log = log

    def __enter__(self) -> None:
        try:
            self.lock.acquire()
        except F.LockHeldError as err:
            raise StudyError(str(err)) from None
        except OSError as err:
            raise StudyError(f"--out {self.out}: cannot lock it ({_describe(err)})") from None
        if self.lock.stale_pid is not None:
            self.log(f"note: {self.out} was locked by process {self.lock.stale_pid}, which is gone; taking it over")

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def run_in(
    out: str, *, mode: str, tasks: Sequence[str], configs: Sequence[StudyConfig], seeds: Sequence[int],
    device: str = "cpu", workers: int = 1, resume: bool = False, command: str = "lossscale study",
    progress: bool = True, log: Log = print, warn: Log = _stderr,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Run a study into the existing folder ``out``; returns the results document and the report's paths
    (``{"md": ..., "html": ...}``). ``log`` gets the one-line plan, ``warn`` the notes (stale lock)."""
    with _Locked(out, warn):
        return _run_locked(out, mode=mode, tasks=tasks, configs=configs, seeds=seeds, device=device,
                           workers=workers, resume=resume, command=command, progress=progress, log=log)


def _run_locked(
    out: str, *, mode: str, tasks: Sequence[str], configs: Sequence[StudyConfig], seeds: Sequence[int],
    device: str, workers: int, resume: bool, command: str, progress: bool, log: Log,
) -> tuple[dict[str, Any], dict[str, str]]:
    from .report import write_report

    results_path = os.path.join(out, "results.json")
    done: list[dict[str, Any]] = []
    sweeps: dict[str, Any] | None = None
    if os.path.exists(results_path):
        if not resume:
            raise StudyError(f"{results_path} exists: pass --resume to continue it, or choose another --out")
        old = _load(results_path, "resume from")
        if old["config"]["mode"] != mode:
            raise StudyError(f"{results_path} holds a {old['config']['mode']}-mode study; resume it with the same mode")
        done = list(old["runs"])
        sweeps = old.get("sweeps")  # sweeps added to the folder are kept (a resume once dropped them)

    specs = RN.plan_runs(list(tasks), list(configs), list(seeds), mode=mode, device=device)
    wanted = {s.key for s in specs}
    # Runs of the old file outside this selection are kept too, so resuming with a narrower selection loses
    # nothing; the report covers what the file holds.
    extra = [r for r in done if run_key(r) not in wanted]
    doc = new_document(
        mode=mode,
        tasks=list(dict.fromkeys([*tasks, *(r["task"] for r in extra)])),
        configs=list(dict.fromkeys([*(c.name for c in configs), *(r["config"] for r in extra)])),
        seeds=sorted(set(seeds) | {int(r["seed"]) for r in extra}),
        device=device, workers=workers, command=command,
    )
    if sweeps:
        doc["sweeps"] = sweeps
    records: list[dict[str, Any]] = list(done)

    def save() -> None:
        doc["runs"] = records
        for r in records:
            doc["config"]["task_details"][r["task"]]["data"] = r.get("data")
        write_results(results_path, doc)

    have = {run_key(r) for r in done}
    n_todo = sum(1 for s in specs if s.key not in have)
    log(
        f"lossscale study ({mode}): {len(tasks)} task(s) x {len(configs)} configuration(s) x {len(seeds)} seed(s); "
        f"{n_todo} run(s) to do, {len(done) - len(extra)} already done; {workers} worker(s); output in {out}"
    )

    def on_record(rec: dict[str, Any]) -> None:
        records.append(rec)
        save()

    try:
        RN.run_study(specs, workers=workers, threads=1, done=done, on_record=on_record, progress=progress)
    finally:
        if records:
            save()
    save()
    try:
        paths = write_report(doc, out)
    except (ValueError, OSError) as err:
        raise StudyError(f"cannot write the report into {out}: {_describe(err)}") from None
    return doc, paths


def sweep_in(
    out: str, name: str, *, mode: str = "quick", seeds: Sequence[int] = (0,), device: str = "cpu", workers: int = 1,
    configs: Sequence[str] | None = None, tasks: Sequence[str] | None = None, progress: bool = True,
    log: Log = print, warn: Log = _stderr,
) -> tuple[dict[str, Any], dict[str, str], int]:
    """Run the sweep ``name``'s runs not yet in ``out/results.json`` (a study there is kept; without one, a
    document holding only the sweep is written), under the folder's lock, then rewrite the report. Returns
    the document, the report's paths and the number of runs done now."""
    from . import sweeps as SW

    if name not in SW.SWEEPS:
        raise StudyError(f"unknown sweep {name!r}; sweeps: {', '.join(SW.SWEEPS)}")
    sweep = SW.SWEEPS[name]
    chosen_tasks = tuple(sweep.tasks if tasks is None else tasks)
    if not chosen_tasks or any(t not in sweep.tasks for t in chosen_tasks):
        raise StudyError(
            f"--tasks for sweep {name} must be among {', '.join(sweep.tasks)}, got {','.join(chosen_tasks)!r}"
        )
    chosen_configs = list(sweep.configs if configs is None else configs)
    with _Locked(out, warn):
        return _sweep_locked(out, name, sweep, mode=mode, seeds=seeds, device=device, workers=workers,
                             configs=chosen_configs, tasks=chosen_tasks, progress=progress, log=log)


def _sweep_locked(
    out: str, name: str, sweep: Any, *, mode: str, seeds: Sequence[int], device: str, workers: int,
    configs: list[str], tasks: tuple[str, ...], progress: bool, log: Log,
) -> tuple[dict[str, Any], dict[str, str], int]:
    from . import sweeps as SW
    from .report import write_report

    results_path = os.path.join(out, "results.json")
    if os.path.exists(results_path):
        doc = _load(results_path, "add a sweep to")
    else:
        doc = new_document(mode=mode, tasks=[], configs=[], seeds=seeds, device=device, workers=workers,
                           command="lossscale study --sweep")
    entry = doc.setdefault("sweeps", {}).setdefault(name, {"runs": []})
    entry.update({"override": sweep.override, "values": list(sweep.values), "tasks": list(sweep.tasks),
                  "mode": mode, "command": f"lossscale study --sweep {name} --out {shlex.quote(out)}"})
    have = {SW.record_key(r) for r in entry["runs"] if r.get("mode") == mode}
    specs = [
        s for s in SW.plan_sweep(name, list(seeds), mode=mode, device=device, configs=configs, tasks=tasks)
        if SW.spec_key(s) not in have
    ]
    log(f"lossscale study --sweep {name} ({mode} budgets): {len(specs)} run(s) to do, {len(have)} done; "
        f"{workers} worker(s); output in {out}")

    def on_record(rec: dict[str, Any]) -> None:
        rec["sweep_value"] = rec["overrides"][sweep.override]
        entry["runs"].append(rec)
        write_results(results_path, doc)

    RN.run_study(specs, workers=workers, threads=1, on_record=on_record, progress=progress)
    write_results(results_path, doc)
    try:
        paths = write_report(doc, out)
    except (ValueError, OSError) as err:
        raise StudyError(f"cannot write the report into {out}: {_describe(err)}") from None
    return doc, paths, len(specs)
