"""``lossscale study``: the case studies (argument parsing only; the work is in :mod:`lossscale.study`)."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from typing import Any

from . import CLIError, prepare_out_dir

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
  lossscale study                                  full mode: every configuration, 3 seeds (~70 min on 2 cores)
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
        from ..study import session as S
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
    device = _check_device(args.device)
    workers = _workers(args.workers, device)
    out = prepare_out_dir(args.out)
    t0 = time.perf_counter()
    try:
        doc, paths = S.run_in(
            out, mode=mode, tasks=tasks, configs=configs, seeds=seeds, device=device, workers=workers,
            resume=args.resume, command=_command_line(args, mode), progress=not args.no_progress,
            log=lambda text: print(text, flush=True),
        )
    except S.StudyError as err:
        raise CLIError(str(err)) from None
    _print_summary(doc)
    print(f"\n{len(doc['runs'])} run(s) in {time.perf_counter() - t0:.0f} s. "
          f"Results: {os.path.join(out, 'results.json')}")
    print(f"Report: {paths['md']} (HTML: {paths['html']})")
    return 0


def _workers(requested: int | None, device: str) -> int:
    """--workers, checked; the default is 2 with 2+ CPUs, else 1; one process owns a GPU."""
    workers = requested if requested is not None else (2 if (os.cpu_count() or 1) >= 2 else 1)
    if not 1 <= workers <= MAX_WORKERS:
        raise CLIError(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}")
    return 1 if device.startswith("cuda") else workers


def _run_sweep(args: argparse.Namespace) -> int:
    """``lossscale study --sweep NAME``: the sweep's runs not yet in OUT/results.json (a study there is
    kept), then the report (:func:`lossscale.study.session.sweep_in`)."""
    from ..study import configs as C
    from ..study import session as S

    mode = args.mode or "quick"
    seeds = _parse_seeds(args.seeds, "quick" if args.seeds is None else mode)
    device = _check_device(args.device)
    workers = _workers(args.workers, device)
    try:
        configs = [c.name for c in C.parse_configs(args.configs)] if args.configs else None
    except ValueError as err:
        raise CLIError(str(err)) from None
    tasks = None if args.tasks is None else tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    out = prepare_out_dir(args.out)
    t0 = time.perf_counter()
    try:
        _, paths, n = S.sweep_in(out, args.sweep, mode=mode, seeds=seeds, device=device, workers=workers,
                                 configs=configs, tasks=tasks, progress=not args.no_progress,
                                 log=lambda text: print(text, flush=True))
    except S.StudyError as err:
        raise CLIError(str(err)) from None
    print(f"sweep {args.sweep}: {n} run(s) in {time.perf_counter() - t0:.0f} s. Report: {paths['md']}")
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
