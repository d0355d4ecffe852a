"""``lossscale study``: the case studies (argument parsing only; the work is in :mod:`lossscale.study`)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import CLIError, describe, prepare_out_dir

# Refused up front: more seeds than any study could run, seeds beyond what every seeded generator takes, more
# worker processes than a machine can usefully hold.
MAX_SEEDS = 1000
MAX_SEED = 2**32 - 1
MAX_WORKERS = 512
# Devices a study can run on: CPU (every precision emulated) and CUDA (native mixed precision where torch has it).
DEVICE_TYPES = ("cpu", "cuda")

_EPILOG = """\
examples:
  lossscale study --quick                          all six tasks, one seed, the quick configurations (< 10 min)
  lossscale study                                  full mode: every configuration, 3 seeds (about 2 h on 2 cores)
  lossscale study --quick --tasks deep-mlp --configs fp16-mixed:none,fp16-mixed:dynamic
  lossscale study --out study-out --resume         continue an interrupted study
  lossscale study --sweep batch --out study-out    a sweep (seq-len, batch, label-noise), added to the study
  lossscale study --device cuda --quick            native BF16/FP16 on a GPU: step time and peak memory
configurations: fp32; bf16-mixed:none|static|dynamic; fp16-mixed:none|static|dynamic;
  bf16-pure:none|kahan|stochastic; fp8-hybrid:none|dynamic; fp8-delayed, fp8-rowwise, mxfp8, mxfp4, nvfp4
  (variant none) ("all" = every one, "quick" = the quick set)
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "study",
        help="train a CNN, an LSTM, a Transformer and a deep MLP under every precision and scaling strategy",
        description=(
            "Case studies: each task trained under FP32, BF16, FP16 and FP8 (emulated on CPU) with and without "
            "loss scaling and optimizer compensation; writes results.json, report.md and report.html."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="small budgets, one seed, the quick configuration set (under 10 minutes on 2 cores)")
    mode.add_argument("--full", action="store_const", const="full", dest="mode",
                      help="larger budgets, every configuration, 3 seeds (the default)")
    mode.add_argument("--tiny", action="store_const", const="tiny", dest="mode", help=argparse.SUPPRESS)
    p.add_argument("--tasks", default=None,
                   help="comma-separated tasks (default: cnn,rnn,transformer,deep-mlp,lm,lm-lstm)")
    p.add_argument("--configs", default=None,
                   help="comma-separated PRECISION:VARIANT names, 'all' or 'quick' (default: by mode)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, or a count N meaning 0..N-1 (default: 0 quick, 0,1,2 full)")
    p.add_argument("--out", default="study-out",
                   help="output directory (default: study-out), locked for the study's lifetime: one study per folder")
    p.add_argument("--resume", action="store_true", help="keep the runs already in OUT/results.json, run the rest")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu; emulated there, native on CUDA)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel worker processes, 1 thread each (default: 2 if 2+ CPUs, else 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sweep", default=None, choices=("seq-len", "batch", "label-noise"),
                   help="run one sweep (not part of --quick) and add it to OUT/results.json and the report; "
                        "budgets of --quick unless --full is given")
    p.set_defaults(func=_run, mode=None)


def _parse_seeds(text: str | None, mode: str) -> list[int]:
    """``"0,1,2"`` or ``"n=3"`` (seeds 0..2); default: 0 (quick) or 0,1,2 (full). At most
    :data:`MAX_SEEDS` seeds, each in [0, :data:`MAX_SEED`], checked before any list is built."""
    if text is None:
        return [0] if mode in ("quick", "tiny") else [0, 1, 2]
    text = text.strip().lower()
    usage = f"--seeds must be comma-separated integers in [0, {MAX_SEED}] or n=COUNT, got {text[:40]!r}"
    try:
        if text.startswith("n="):
            count = int(text[2:])
            if not 1 <= count <= MAX_SEEDS:
                raise CLIError(f"--seeds n=COUNT needs 1 <= COUNT <= {MAX_SEEDS}, got {text[2:][:40]}")
            seeds = list(range(count))
        else:
            words = [s for s in text.split(",") if s.strip()]
            if len(words) > MAX_SEEDS:
                raise CLIError(f"--seeds lists {len(words)} seeds; at most {MAX_SEEDS}")
            seeds = [int(s) for s in words]
    except ValueError:  # not an integer (or one with thousands of digits)
        raise CLIError(usage) from None
    if not seeds or any(not 0 <= s <= MAX_SEED for s in seeds):
        raise CLIError(usage)
    return list(dict.fromkeys(seeds))


def _check_device(device: str) -> str:
    """A torch device string the study can run on, checked before anything starts."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise CLIError(f"--device {device!r} is not a torch device; use cpu or cuda[:N]") from None
    if dev.type not in DEVICE_TYPES:
        raise CLIError(f"--device {device}: the study runs on cpu (emulated) or cuda[:N] (native), not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def _run(args: argparse.Namespace) -> int:
    try:
        from ..study import configs as C
        from ..study import files as RF
        from ..study.tasks import TASK_NAMES, TASKS
    except ImportError as err:  # sklearn / num2words / sacrebleu missing
        raise CLIError(f"the study needs the 'study' extra: pip install 'lossscale[study]' ({err})") from None

    if getattr(args, "sweep", None):
        return _run_sweep(args)
    mode = args.mode or "full"
    tasks = list(TASK_NAMES) if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise CLIError(f"unknown task {', '.join(bad) or '(none)'}; valid tasks: {', '.join(TASK_NAMES)}")
    default_configs = "quick" if mode in ("quick", "tiny") else "all"
    try:
        configs = C.parse_configs(args.configs if args.configs is not None else default_configs)
    except ValueError as err:
        raise CLIError(str(err)) from None
    seeds = _parse_seeds(args.seeds, mode)
    workers = args.workers if args.workers is not None else (2 if (os.cpu_count() or 1) >= 2 else 1)
    if not 1 <= workers <= MAX_WORKERS:
        raise CLIError(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}")
    device = _check_device(args.device)
    if device.startswith("cuda"):
        workers = 1  # one process owns the GPU
    out = prepare_out_dir(args.out)
    # One study per output folder: held until this process ends, released by the OS if it is killed.
    lock = RF.OutputLock(out)
    try:
        lock.acquire()
    except RF.LockHeldError as err:
        raise CLIError(str(err)) from None
    except OSError as err:
        raise CLIError(f"--out {out}: cannot lock it ({describe(err)})") from None
    try:
        if lock.stale_pid is not None:
            print(f"note: {out} was locked by process {lock.stale_pid}, which is gone; taking it over",
                  file=sys.stderr, flush=True)
        return _run_locked(args, mode, tasks, configs, seeds, workers, device, out)
    finally:
        lock.release()


def _run_locked(
    args: argparse.Namespace, mode: str, tasks: list[str], configs: Sequence[Any], seeds: list[int], workers: int,
    device: str, out: str,
) -> int:
    from ..study import report as R
    from ..study import runner as RN
    from ..study.tasks import TASKS

    threads = 1
    results_path = os.path.join(out, "results.json")
    done: list[dict[str, Any]] = []
    if os.path.exists(results_path):
        if not args.resume:
            raise CLIError(f"{results_path} exists: pass --resume to continue it, or choose another --out")
        try:
            old = R.load_results(results_path)
        except (ValueError, OSError) as err:
            raise CLIError(f"cannot resume from {results_path}: {describe(err)}") from None
        if old["config"]["mode"] != mode:
            raise CLIError(
                f"{results_path} holds a {old['config']['mode']}-mode study; resume it with the same mode"
            )
        done = list(old["runs"])

    specs = RN.plan_runs(tasks, configs, seeds, mode=mode, device=device)
    wanted = {s.key for s in specs}
    kept = [r for r in done if (r["task"], r["config"], int(r["seed"])) in wanted]
    # Runs of the old file outside this selection are kept too, so resuming with a narrower selection loses
    # nothing; the report covers what the file holds.
    extra = [r for r in done if (r["task"], r["config"], int(r["seed"])) not in wanted]
    all_tasks = list(dict.fromkeys(tasks + [r["task"] for r in extra]))
    all_configs = list(dict.fromkeys([c.name for c in configs] + [r["config"] for r in extra]))
    all_seeds = sorted(set(seeds) | {int(r["seed"]) for r in extra})

    doc: dict[str, Any] = {
        "schema_version": R.SCHEMA_VERSION,
        "created": R.now_iso(),
        "command": _command_line(args, mode),
        "config": {
            "mode": mode,
            "tasks": all_tasks,
            "configs": all_configs,
            "seeds": all_seeds,
            "device": device,
            "workers": workers,
            "threads": threads,
            "task_details": {
                t: {
                    "description": TASKS[t].description,
                    "metric_name": TASKS[t].metric_name,
                    "chance": TASKS[t].chance,
                    "recipe": TASKS[t].recipe.describe(),
                    "budget": TASKS[t].budget(mode).to_dict(),
                    "dynamic_scaling": {
                        "init_scale": RN.DYNAMIC_INIT_SCALE, "growth_factor": 2.0, "backoff_factor": 0.5,
                        "growth_interval": RN.dynamic_growth_interval(TASKS[t].budget(mode).steps),
                    },
                    "data": None,
                }
                for t in all_tasks
            },
            "monitor_formats": list(RN.MONITOR_FORMATS),
        },
        "environment": RN.environment(device, threads, workers),
        "runs": [],
    }

    def save(records: list[dict[str, Any]]) -> None:
        doc["runs"] = records
        for r in records:
            doc["config"]["task_details"][r["task"]]["data"] = r.get("data")
        R.write_results(results_path, doc)

    records: list[dict[str, Any]] = list(done)
    n_todo = sum(1 for s in specs if s.key not in {(r["task"], r["config"], int(r["seed"])) for r in done})
    print(
        f"lossscale study ({mode}): {len(tasks)} task(s) x {len(configs)} configuration(s) x {len(seeds)} seed(s); "
        f"{n_todo} run(s) to do, {len(kept)} already done; {workers} worker(s); output in {out}",
        flush=True,
    )
    t0 = time.perf_counter()

    def on_record(rec: dict[str, Any]) -> None:
        records.append(rec)
        save(records)

    try:
        RN.run_study(specs, workers=workers, threads=threads, done=done, on_record=on_record,
                     progress=not args.no_progress)
    finally:
        if records:
            save(records)
    save(records)
    try:
        paths = R.write_report(doc, out)
    except (ValueError, OSError) as err:
        raise CLIError(f"cannot write the report into {out}: {describe(err)}") from None
    _print_summary(doc)
    print(f"\n{len(records)} run(s) in {time.perf_counter() - t0:.0f} s. Results: {results_path}")
    print(f"Report: {paths['md']} (HTML: {paths['html']})")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    """``lossscale study --sweep NAME``: run the sweep's runs not yet in OUT/results.json (a study there is
    kept; without one, a document holding only the sweep is written), then rewrite the report."""
    from ..study import report as R
    from ..study import runner as RN
    from ..study import sweeps as SW

    mode = args.mode or "quick"
    seeds = _parse_seeds(args.seeds, "quick" if args.seeds is None else mode)
    workers = args.workers if args.workers is not None else (2 if (os.cpu_count() or 1) >= 2 else 1)
    if workers < 1:
        raise CLIError(f"--workers must be >= 1, got {workers}")
    device = args.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: CUDA is not available here")
        workers = 1
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    if os.path.exists(results_path):
        try:
            doc = R.load_results(results_path)
        except (ValueError, OSError) as err:
            raise CLIError(f"cannot add a sweep to {results_path}: {err}") from None
    else:
        doc = {
            "schema_version": R.SCHEMA_VERSION, "created": R.now_iso(), "command": "lossscale study --sweep",
            "config": {"mode": mode, "tasks": [], "configs": [], "seeds": seeds, "device": device,
                       "workers": workers, "threads": 1, "task_details": {}},
            "environment": RN.environment(device, 1, workers), "runs": [],
        }
    sweep = SW.SWEEPS[args.sweep]
    entry = doc.setdefault("sweeps", {}).setdefault(args.sweep, {"runs": []})
    entry.update({"override": sweep.override, "values": list(sweep.values), "tasks": list(sweep.tasks),
                  "mode": mode, "command": f"lossscale study --sweep {args.sweep} --out {shlex.quote(args.out)}"})
    have = {SW.record_key(r) for r in entry["runs"] if r.get("mode") == mode}
    from ..study import configs as C

    try:
        configs = [c.name for c in C.parse_configs(args.configs)] if args.configs else list(sweep.configs)
    except ValueError as err:
        raise CLIError(str(err)) from None
    tasks = sweep.tasks if args.tasks is None else tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not tasks or any(t not in sweep.tasks for t in tasks):
        raise CLIError(f"--tasks for sweep {args.sweep} must be among {', '.join(sweep.tasks)}, got {args.tasks!r}")
    specs = [
        s for s in SW.plan_sweep(args.sweep, seeds, mode=mode, device=device, configs=configs, tasks=tasks)
        if SW.spec_key(s) not in have
    ]
    print(f"lossscale study --sweep {args.sweep} ({mode} budgets): {len(specs)} run(s) to do, {len(have)} done; "
          f"{workers} worker(s); output in {args.out}", flush=True)
    t0 = time.perf_counter()

    def on_record(rec: dict[str, Any]) -> None:
        rec["sweep_value"] = rec["overrides"][sweep.override]
        entry["runs"].append(rec)
        R.write_results(results_path, doc)

    RN.run_study(specs, workers=workers, threads=1, on_record=on_record, progress=not args.no_progress)
    R.write_results(results_path, doc)
    paths = R.write_report(doc, args.out)
    print(f"sweep {args.sweep}: {len(specs)} run(s) in {time.perf_counter() - t0:.0f} s. Report: {paths['md']}")
    return 0


def _command_line(args: argparse.Namespace, mode: str) -> str:
    """The command that reproduces this study (from the parsed arguments, not sys.argv)."""
    parts = ["lossscale", "study"] + ([f"--{mode}"] if mode != "full" else [])
    for flag in ("tasks", "configs", "seeds"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag}", shlex.quote(value)]
    parts += ["--out", shlex.quote(args.out)]
    if args.device != "cpu":
        parts += ["--device", args.device]
    if args.workers is not None:
        parts += ["--workers", str(args.workers)]
    return " ".join(parts)


def _print_summary(doc: dict[str, Any]) -> None:
    from ..study.report import summary_rows

    header, rows = summary_rows(doc)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(" | ".join(header))
        for r in rows:
            print(" | ".join(r))
        return
    table = Table(title="lossscale study: metric (gap to FP32)")
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    Console(width=max(120, 30 * len(header))).print(table)
