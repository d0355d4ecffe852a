"""``lossscale diagnose --recipe``: the FP8/FP4 recipe advisor (:mod:`lossscale.recipe_advisor`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..recipe_advisor import DEFAULT_RECIPES, diagnose_recipes, plot_amax
from . import CLIError


def run_advisor(
    model: Any, loss_fn: Callable[..., Any], batches: Iterable[Any], args: argparse.Namespace, source: str
) -> int:
    names = list(DEFAULT_RECIPES) if args.recipe == "default" else [r for r in args.recipe.split(",") if r.strip()]
    try:
        report = diagnose_recipes(model, loss_fn, batches, recipes=names, steps=args.steps)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CLIError(f"recipe advisor failed: {type(err).__name__}: {err}") from None
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "recipes.json", out / "recipes.md"]
    d = report.to_dict() | {"model": source, "seed": args.seed}
    written[0].write_text(json.dumps(d, indent=2) + "\n")
    written[1].write_text(report.to_markdown())
    if args.plots and report.amax:
        try:
            written.append(plot_amax(report, out / "recipes_amax.png"))
        except ImportError as err:
            print(f"note: no figure ({err})", file=sys.stderr)
    print(f"Recipe advisor for {source}: {report.steps} steps per recipe")
    for name, c in report.totals.items():
        print(f"  {name:<12} underflow {c.underflow_fraction:8.3%}  saturated {c.saturated_fraction:8.4%}  "
              f"NaN blocks {c.nonfinite}  stale-scale overflows {c.stale_overflow}")
    for h in report.histories.values():
        note = "  (longer than the run)" if h.longer_than_run else ""
        print(f"  delayed, amax_history_len {h.length:>4}: {h.overflow_steps} overflow steps of {h.steps}, "
              f"overflow {h.overflow_rate:.4%}, underflow {h.underflow_rate:.4%}{note}")
    print(report.recommendation)
    for path in written:
        print(f"wrote {path}")
    return 0
