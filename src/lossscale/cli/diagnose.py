"""``lossscale diagnose``: does a model lose gradients in BF16/FP16/FP8, and what loss scale fixes it."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..diagnose import DEFAULT_STEPS, Diagnosis, diagnose
from ..formats import FloatFormat
from . import CLIError, UserCodeError, describe, prepare_out_dir

# Names of the built-in examples (lossscale.study.tasks.example); listed here so that parsing the command
# line imports nothing of the study.
EXAMPLES = ("cnn", "rnn", "transformer", "deep-mlp")

_EPILOG = f"""\
examples:
  lossscale diagnose --example deep-mlp                  30-layer tanh MLP: fp16 and e5m2 need a loss scale
  lossscale diagnose --example cnn --formats bf16,fp16,e4m3,e5m2 --steps 16 --out runs/cnn
  lossscale diagnose --model mypkg.models:make_diag      your own model
  lossscale diagnose --model mypkg.models:make_diag --optimizer adamw --lr 1e-4 --optimizer-arg weight_decay=0.1
  lossscale diagnose --gradients grads.npz               arrays exported from TensorFlow/JAX (np.savez)

--model PACKAGE.MODULE:FACTORY IMPORTS AND RUNS the named module (looked up from the current directory first,
as `python -m` does), like the app specs of uvicorn or gunicorn: name only code you trust. FACTORY is a
function taking no arguments that returns (model, loss_fn, batches):
an nn.Module, loss_fn(model, batch) -> scalar loss tensor, and an iterable of batches. The steps run in FP32
on a copy of the model with --optimizer (default SGD, lr 0.01; swamping depends on it, so name the optimizer
you train with: any torch.optim class, case-insensitive, or PACKAGE.MODULE:CLASS); the format columns say
what rounding those FP32 gradients to each format would do. Writes diagnosis.json, diagnosis.md and PNG
figures into --out (default ./lossscale-diagnosis). Default steps: {DEFAULT_STEPS}. Exit status: 0, 1 when
the model's own code raises (one line; --debug prints its traceback), 2 for any other error.
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "diagnose",
        help="per-layer gradient underflow/overflow/swamping per format, and a recommended loss scale",
        description="Measure, per layer, how much of a model's gradients would underflow, overflow or be "
        "swamped in each format, and recommend a loss scale.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY",
                     help="import PACKAGE.MODULE (from the current directory first) and call FACTORY() for "
                     "(model, loss_fn, batches); this runs the module's code")
    src.add_argument("--example", choices=EXAMPLES, help="a built-in example (small, CPU)")
    src.add_argument("--gradients", type=Path, metavar="FILE.npz",
                     help="gradient arrays exported from any framework (TensorFlow, JAX, ...): keys "
                     "[step<k>::][grad|activation|weight|update|new_weight::]name (see docs/diagnostics.md)")
    p.add_argument("--formats", default="bf16,fp16,e5m2", metavar="F[,F...]",
                   help="comma-separated formats (default: bf16,fp16,e5m2)")
    p.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, metavar="N", help=f"training steps (default {DEFAULT_STEPS})"
    )
    p.add_argument("--threshold", type=float, default=1e-3, metavar="T",
                   help="acceptable underflow fraction (default 1e-3)")
    p.add_argument("--optimizer", default=None, metavar="NAME",
                   help="optimizer of the steps: a torch.optim class (adamw, sgd, ...) or PACKAGE.MODULE:CLASS "
                   "(default sgd with lr 0.01)")
    p.add_argument("--lr", type=float, default=None, metavar="X",
                   help="learning rate (default: 0.01 for the default SGD, else the optimizer's own default)")
    p.add_argument("--optimizer-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="another optimizer keyword argument, a Python literal (repeatable): weight_decay=0.1, "
                   "betas=(0.9,0.95)")
    p.add_argument("--zero-check", action=argparse.BooleanOptionalAction, default=True,
                   help="count gradients that are FP32 rounding noise (attention key biases) as numerically zero, "
                   "from one FP32 and one FP64 recomputation (default on)")
    p.add_argument("--seed", type=_seed, default=0, help=f"seed for --example and torch, 0..{MAX_SEED} (default 0)")
    p.add_argument("--out", type=Path, default=Path("lossscale-diagnosis"), metavar="DIR",
                   help="output folder (default ./lossscale-diagnosis)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write PNG figures")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    p.add_argument("--recipe", nargs="?", const="default", default=None, metavar="R[,R...]",
                   help="instead: the FP8/FP4 recipe advisor (fp8-delayed, fp8-rowwise, fp8-block, mxfp8, mxfp4, "
                   "nvfp4; default all); --steps defaults to 200 then")
    p.set_defaults(func=run)


# torch.manual_seed takes a 64-bit seed; larger ones overflow inside torch.
MAX_SEED = 2**63 - 1


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text[:40]!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1], got {text[:40]}")
    return value


def _user_failed(what: str, err: BaseException) -> UserCodeError:
    return UserCodeError(f"{what} raised {describe(err)}")


def _load_factory(spec: str) -> Callable[[], Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".")):
        raise CLIError(f"--model must look like PACKAGE.MODULE:FACTORY, got {spec!r}")
    # As `python -m` does: the current directory comes first, so that a project's own package is found by
    # the console script too (whose sys.path[0] is the script's folder).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise CLIError(
                f"--model: cannot import {module_name!r}: no module of that name (looked in the current directory "
                "and on sys.path)"
            ) from None
        raise _user_failed(f"--model: cannot import {module_name!r}: its code", err) from err
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the module's own code failed: one line
        raise _user_failed(f"--model: cannot import {module_name!r}: its code", err) from err
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise CLIError(f"--model: {module_name!r} has no callable {attr!r}")
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise CLIError(
            f"--model: {spec} must be callable with no arguments, but its signature is "
            f"{inspect.signature(factory)}; name a function that builds (model, loss_fn, batches)"
        ) from None
    except ValueError:  # no signature to read (some builtins): let the call decide
        pass
    return factory  # type: ignore[no-any-return]


def _guard_loss(loss_fn: Callable[..., Any], where: str) -> Callable[..., Any]:
    """``loss_fn`` whose exceptions become :class:`UserCodeError` (exit 1, one line)."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return loss_fn(*args, **kwargs)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's code failed
            raise _user_failed(f"{where}'s loss_fn", err) from err

    return guarded


def _guard_batches(batches: Iterable[Any], where: str) -> Iterable[Any]:
    """``batches`` whose iteration errors become :class:`UserCodeError`."""

    class Guarded:
        def __iter__(self) -> Any:
            try:
                it = iter(batches)
            except (Exception, SystemExit) as err:  # noqa: BLE001
                raise _user_failed(f"{where}'s batches", err) from err
            while True:
                try:
                    item = next(it)
                except StopIteration:
                    return
                except (Exception, SystemExit) as err:  # noqa: BLE001
                    raise _user_failed(f"{where}'s batches", err) from err
                yield item

    return Guarded()


def _check_triple(obj: Any, where: str) -> tuple[Any, Callable[..., Any], Iterable[Any]]:
    import torch

    if not isinstance(obj, (tuple, list)) or len(obj) != 3:
        raise CLIError(f"{where} must return (model, loss_fn, batches), got {type(obj).__name__}")
    model, loss_fn, batches = obj
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{where} returned a model that is not a torch.nn.Module: {type(model).__name__}")
    if not callable(loss_fn):
        raise CLIError(f"{where} returned a loss_fn that is not callable: {type(loss_fn).__name__}")
    if not isinstance(batches, Iterable):
        raise CLIError(f"{where} returned batches that are not iterable: {type(batches).__name__}")
    return model, loss_fn, batches


def _parse_formats(text: str) -> list[FloatFormat]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CLIError("--formats must name at least one format, e.g. bf16,fp16,e5m2")
    try:
        fmts = [FloatFormat.parse(n) for n in names]
    except (ValueError, TypeError) as err:
        raise CLIError(f"--formats: {err}") from None
    if len({f.name for f in fmts}) != len(fmts):
        raise CLIError(f"--formats must not repeat a format, got {text!r}")
    return fmts


def _optimizer(args: argparse.Namespace) -> Callable[..., Any]:
    import ast

    from ..diagnose import optimizer_factory

    kwargs: dict[str, Any] = {}
    for item in args.optimizer_arg:
        key, sep, text = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise CLIError(f"--optimizer-arg must look like KEY=VALUE, got {item!r}")
        try:
            kwargs[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise CLIError(f"--optimizer-arg {key.strip()}: {text!r} is not a Python literal") from None
    name = args.optimizer if args.optimizer is not None else "sgd"
    if args.lr is not None:
        kwargs["lr"] = args.lr
    elif args.optimizer is None:
        kwargs.setdefault("lr", 0.01)
    try:
        return optimizer_factory(name, **kwargs)
    except (ValueError, TypeError) as err:
        raise CLIError(f"--optimizer: {err}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    fmts = _parse_formats(args.formats)
    args.optimizer_factory = _optimizer(args)
    if args.recipe is not None and args.steps == DEFAULT_STEPS:
        args.steps = 200  # the recipe advisor's default run length
    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 <= args.threshold < 1.0:
        raise CLIError(f"--threshold must be in [0, 1), got {args.threshold}")
    prepare_out_dir(args.out)  # before the computation: an unwritable --out fails now
    torch.manual_seed(args.seed)
    if args.gradients is not None:
        from ..gradients import diagnose_gradients, load_npz

        if args.optimizer is not None or args.lr is not None or args.optimizer_arg:
            raise CLIError(
                "--optimizer, --lr and --optimizer-arg run a model; with --gradients the updates for swamping "
                "come from the file (weight:: and update:: or new_weight:: keys)"
            )
        try:
            d = diagnose_gradients(**load_npz(args.gradients), formats=fmts, threshold=args.threshold)
        except (OSError, ValueError, TypeError) as err:
            raise CLIError(f"--gradients {args.gradients}: {type(err).__name__}: {err}") from None
        source = f"gradients:{args.gradients}"
        _write(dataclasses.replace(d, meta={**d.meta, "model": source}), args, source)
        return 0
    if args.example is not None:
        try:
            from ..study.tasks import example  # the study sits above diagnose: imported only here
        except ImportError as err:
            raise CLIError(f"--example needs the 'study' extra: pip install 'lossscale[study]' ({err})") from None

        model, loss_fn, batches = _check_triple(example(args.example, seed=args.seed), f"example {args.example!r}")
        source = f"example:{args.example}"
    else:
        factory = _load_factory(args.model)
        try:
            got = factory()
        except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's factory failed: one line, exit 1
            raise _user_failed(f"--model: {args.model}()", err) from err
        model, loss_fn, batches = _check_triple(got, f"--model {args.model}")
        loss_fn = _guard_loss(loss_fn, args.model)
        batches = _guard_batches(batches, args.model)
        source = args.model

    if args.recipe is not None:
        from .recipe_advisor import run_advisor

        return run_advisor(model, loss_fn, batches, args, source)
    try:
        d = _run_with_progress(model, loss_fn, batches, fmts, args)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CLIError(f"diagnosis failed: {type(err).__name__}: {err}") from None
    d = dataclasses.replace(d, meta={**d.meta, "model": source, "seed": args.seed})
    _write(d, args, source)
    return 0


def _write(d: Diagnosis, args: argparse.Namespace, source: str) -> None:
    out: Path = Path(prepare_out_dir(args.out))
    try:
        (out / "diagnosis.json").write_text(json.dumps(d.to_dict(), indent=2) + "\n")
        (out / "diagnosis.md").write_text(d.to_markdown())
        written = [out / "diagnosis.json", out / "diagnosis.md"]
        if args.plots:
            try:
                from ..plots import save_all

                written += save_all(d, out)
            except ImportError as err:
                print(f"note: no figures ({err})", file=sys.stderr)
    except OSError as err:
        raise CLIError(f"--out {out}: cannot write the results ({describe(err)})") from None
    _print_summary(d, source)
    for path in written:
        print(f"wrote {path}")


def _run_with_progress(
    model: Any, loss_fn: Callable[..., Any], batches: Iterable[Any], fmts: list[FloatFormat], args: argparse.Namespace
) -> Diagnosis:
    if not args.progress:
        return diagnose(model, loss_fn, batches, formats=fmts, steps=args.steps, threshold=args.threshold,
                        optimizer=args.optimizer_factory, zero_check=args.zero_check)
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # the [cli] extra is optional
        return diagnose(model, loss_fn, batches, formats=fmts, steps=args.steps, threshold=args.threshold,
                        optimizer=args.optimizer_factory, zero_check=args.zero_check)
    with Progress(
        TextColumn("measuring gradients"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    ) as bar:
        task = bar.add_task("steps", total=args.steps)
        return diagnose(
            model, loss_fn, batches, formats=fmts, steps=args.steps, threshold=args.threshold,
            optimizer=args.optimizer_factory, zero_check=args.zero_check,
            progress=lambda done, total: bar.update(task, completed=done),
        )


def _print_summary(d: Diagnosis, source: str) -> None:
    header = ["format", "underflow", "subnormal", "overflow", "needs scaling", "recommended scale", "swamping"]
    rows = []
    for name, fd in d.formats.items():
        rows.append([
            name,
            f"{fd.underflow_fraction:.3%}",
            f"{fd.subnormal_fraction:.3%}",
            f"{fd.overflow_fraction:.3%}",
            "yes" if fd.needs_scaling else "no",
            "none" if fd.recommended_scale is None else str(fd.recommended_scale),
            "n/a" if fd.swamping_fraction is None else f"{fd.swamping_fraction:.2%}",
        ])
    title = f"Gradient diagnosis of {source}: {d.steps} FP32 steps, {d.numel:,} gradient values"
    if d.meta.get("entry") == "diagnose_gradients":
        title = f"Gradient diagnosis of {source}: {d.steps} steps of exported arrays, {d.numel:,} gradient values"
    note = "FP32 reference: what rounding these gradients to each format WOULD do, at loss scale 1."
    basis = f"Swamping: {d.swamping_basis()}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        print(note)
        print(basis)
        for name, fd in d.formats.items():
            print(f"{name}: {fd.recommendation}")
        return
    table = Table(title=title, caption=note)
    for h in header:
        table.add_column(h, justify="left" if h in ("format", "needs scaling", "recommended scale") else "right",
                         no_wrap=True)
    for r in rows:
        table.add_row(*r)
    console = Console(width=max(120, len(title) + 4))
    console.print(table)
    from rich.markup import escape

    console.print(escape(basis), highlight=False, soft_wrap=True)

    for name, fd in d.formats.items():
        console.print(f"[bold]{name}[/bold]: {escape(fd.recommendation)}", highlight=False)
