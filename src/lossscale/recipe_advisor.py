"""The recipe advisor: which FP8/FP4 scaling recipe a model needs, and which delayed-scaling history length.

:func:`diagnose_recipes` trains a copy of the user's model for N steps (default 200) under each recipe
(emulated, :func:`lossscale.autocast` with a :class:`~lossscale.RecipeState`) and reports, per recipe and per
layer, the fraction of nonzero GEMM operand values that underflowed to zero and that saturated. For delayed
scaling it records, during the ``fp8-delayed`` run, every site's amax and binade histogram per step and
replays Transformer Engine's rule on that one sequence for ``amax_history_len`` 1, 16, 64 and 256
(:func:`replay_delayed`): the steps where the stale scale overflowed, and the underflow and overflow rates
at binade resolution (a binade counts as lost when its lower edge, scaled, falls below half the smallest
subnormal or above the max: a lower bound). A history longer than the run is reported as such (it behaves as
an unbounded one). Transformer Engine users ask exactly this (TransformerEngine#1169).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .emulate.mode import autocast
from .emulate.recipes import HIST_MIN_LOG2, RecipeCounts, RecipeState
from .formats import FloatFormat
from .precision import Precision

__all__ = [
    "DEFAULT_RECIPES",
    "DEFAULT_HISTORY_LENGTHS",
    "HistoryReplay",
    "RecipeReport",
    "diagnose_recipes",
    "replay_delayed",
    "plot_amax",
]

DEFAULT_RECIPES: tuple[str, ...] = ("fp8-delayed", "fp8-rowwise", "fp8-block", "mxfp8", "mxfp4", "nvfp4")
DEFAULT_HISTORY_LENGTHS: tuple[int, ...] = (1, 16, 64, 256)
DEFAULT_RECIPE_STEPS = 200


@dataclasses.dataclass(frozen=True)
class HistoryReplay:
    """Delayed scaling replayed with one history length on one recorded sequence (all sites together).

    Attributes:
        length: ``amax_history_len``.
        steps: (site, step) pairs replayed.
        overflow_steps: (site, step) pairs whose stale scale overflowed (``amax * scale > max``).
        overflow_rate: fraction of nonzero values lost to saturation (binade resolution).
        underflow_rate: fraction of nonzero values lost to underflow (binade resolution).
        longer_than_run: the history is longer than the run (it never forgets anything here).
        scales: per site, the scale used at each step.
    """

    length: int
    steps: int
    overflow_steps: int
    overflow_rate: float
    underflow_rate: float
    longer_than_run: bool
    scales: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("scales")
        return d


def replay_delayed(
    amax: Sequence[float],
    hists: Sequence[Sequence[int]] | None,
    fmt: FloatFormat,
    length: int,
    *,
    algo: str = "max",
    margin: int = 0,
) -> tuple[list[float], int, float, float]:
    """Transformer Engine's delayed scaling on one site's recorded amax sequence: the scale each step used
    (from the history before its amax; 1 at the first step), the number of stale-scale overflows (``amax * scale``
    past the midpoint above max, where values start to saturate), and the
    values (counts, binade resolution) lost to overflow and to underflow. Pure Python (FP32 arithmetic)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if algo not in ("max", "most_recent"):
        raise ValueError(f"algo must be 'max' or 'most_recent', got {algo!r}")
    f32 = np.float32
    window: list[float] = []
    scale = f32(1.0)
    scales: list[float] = []
    over = 0
    lost_over = lost_under = 0.0
    half_sub = fmt.min_subnormal / 2
    # Scaled values up to the midpoint between max and the next value round to max: past it they saturate.
    past_max = fmt.max + math.ldexp(1.0, fmt.emax - fmt.mantissa_bits - 1)
    for t, a in enumerate(amax):
        s = float(scale)
        scales.append(s)
        if a * s > past_max:
            over += 1
        if hists is not None:
            for i, n in enumerate(hists[t]):
                if n:
                    lo = math.ldexp(s, i + HIST_MIN_LOG2)  # the binade's lower edge, scaled
                    if lo > past_max:
                        lost_over += n
                    elif math.ldexp(s, i + HIST_MIN_LOG2 + 1) <= half_sub:
                        lost_under += n
        window = (window + [a])[-length:]
        ref = max(window) if algo == "max" else window[-1]
        if ref > 0 and math.isfinite(ref):
            scale = (f32(fmt.max) / f32(ref)) / f32(2.0**margin)
    return scales, over, lost_over, lost_under


@dataclasses.dataclass(frozen=True)
class RecipeReport:
    """What :func:`diagnose_recipes` found.

    Attributes:
        steps: training steps per recipe.
        recipes: per recipe name, per site (``module:op.role``), the summed :class:`RecipeCounts`.
        totals: per recipe, counts over every site.
        histories: the delayed-scaling replays per history length (empty without ``fp8-delayed``).
        amax: per site, the recorded amax per step of the ``fp8-delayed`` run.
        recommendation: the advice in one paragraph, with its evidence.
    """

    steps: int
    recipes: dict[str, dict[str, RecipeCounts]]
    totals: dict[str, RecipeCounts]
    histories: dict[int, HistoryReplay]
    amax: dict[str, list[float]]
    recommendation: str

    def to_dict(self) -> dict[str, Any]:
        def counts(c: RecipeCounts) -> dict[str, Any]:
            return {**dataclasses.asdict(c), "underflow_fraction": c.underflow_fraction,
                    "saturated_fraction": c.saturated_fraction}

        return {
            "steps": self.steps,
            "totals": {r: counts(c) for r, c in self.totals.items()},
            "layers": {r: {s: counts(c) for s, c in sites.items()} for r, sites in self.recipes.items()},
            "delayed_history": {str(k): v.to_dict() for k, v in self.histories.items()},
            "recommendation": self.recommendation,
        }

    def to_markdown(self) -> str:
        lines = [f"# Recipe advisor ({self.steps} steps per recipe)", "",
                 "| recipe | underflow | saturated | NaN blocks | stale-scale overflows |", "|---|---|---|---|---|"]
        for r, c in self.totals.items():
            lines.append(f"| {r} | {c.underflow_fraction:.3%} | {c.saturated_fraction:.4%} | {c.nonfinite} | "
                         f"{c.stale_overflow} |")
        if self.histories:
            lines += ["", "## Delayed scaling: amax_history_len, replayed on one recorded amax sequence", "",
                      "| history | overflow steps | overflow rate | underflow rate | note |", "|---|---|---|---|---|"]
            for h in self.histories.values():
                note = "longer than the run" if h.longer_than_run else ""
                lines.append(f"| {h.length} | {h.overflow_steps} / {h.steps} | {h.overflow_rate:.4%} | "
                             f"{h.underflow_rate:.4%} | {note} |")
        lines += ["", "## Per layer", "", "| recipe | site | underflow | saturated |", "|---|---|---|---|"]
        for r, sites in self.recipes.items():
            for s, c in sites.items():
                lines.append(f"| {r} | {s} | {c.underflow_fraction:.3%} | {c.saturated_fraction:.4%} |")
        lines += ["", "## Recommendation", "", self.recommendation, ""]
        return "\n".join(lines)


def diagnose_recipes(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    recipes: Iterable[str | Precision] = DEFAULT_RECIPES,
    steps: int = DEFAULT_RECIPE_STEPS,
    history_lengths: Sequence[int] = DEFAULT_HISTORY_LENGTHS,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> RecipeReport:
    """Train a copy of ``model`` for ``steps`` steps under each recipe and report what each one loses.

    Each recipe starts from the same copy of the initial model and sees the same batches (``batches`` is
    materialised once: at most ``steps`` of them, cycled). The default optimizer is ``torch.optim.AdamW(lr=1e-3)``.
    Synchronises once per recipe (reading the counters).

    Example:
        >>> import torch
        >>> from lossscale.recipe_advisor import diagnose_recipes
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        >>> data = [(torch.randn(16, 32), torch.randint(0, 2, (16,)))]
        >>> loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        >>> r = diagnose_recipes(model, loss_fn, data, recipes=["fp8-delayed", "mxfp4"], steps=3)
        >>> sorted(r.totals), sorted(r.histories)
        (['fp8-delayed', 'mxfp4'], [1, 16, 64, 256])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(model, batch)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    for n in history_lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"history_lengths must be ints >= 1, got {list(history_lengths)!r}")
    precisions: dict[str, Precision] = {}
    for r in recipes:
        p = Precision.parse(r)
        if p.recipe is None:
            raise ValueError(
                f"recipes: {p.name!r} is not a scaling recipe; allowed: fp8-delayed, fp8-rowwise, fp8-block, "
                "mxfp8, mxfp4, nvfp4, or a Precision with recipe="
            )
        precisions[p.name if isinstance(r, Precision) else str(r)] = p
    if not precisions:
        raise ValueError("recipes must name at least one recipe")
    data: list[Any] = []
    for b in batches:
        data.append(b)
        if len(data) == steps:
            break
    if not data:
        raise ValueError("batches is empty")

    results: dict[str, dict[str, RecipeCounts]] = {}
    totals: dict[str, RecipeCounts] = {}
    amax: dict[str, list[float]] = {}
    hists: dict[str, list[list[int]]] = {}
    delayed_fmt: dict[str, FloatFormat] = {}
    for name, p in precisions.items():
        net = copy.deepcopy(model).float().train()
        params = [q for q in net.parameters() if q.requires_grad]
        opt = optimizer(params) if optimizer is not None else torch.optim.AdamW(params, lr=1e-3)
        delayed = p.recipe is not None and p.recipe.kind == "delayed"
        state = RecipeState(record_amax=delayed and not amax)
        for step in range(steps):
            with autocast(p, recipe_state=state, model=net):
                loss = loss_fn(net, data[step % len(data)])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            opt.zero_grad(set_to_none=True)
            if progress is not None:
                progress(name, step + 1, steps)
        per_site: dict[str, RecipeCounts] = {}
        for (key, _phase), c in state.read().items():
            per_site[key] = per_site.get(key, RecipeCounts()) + c
        results[name] = per_site
        totals[name] = sum(per_site.values(), RecipeCounts())
        if state.record_amax:
            for key in state.amax:
                amax[key] = state.amax_sequence(key)
                hists[key] = state.histograms(key)
                delayed_fmt[key] = p.grad_format if key.endswith(".grad_output") else p.compute_format

    histories: dict[int, HistoryReplay] = {}
    if amax:
        n_elems = sum(sum(sum(h) for h in hs) for hs in hists.values())
        for length in history_lengths:
            scales: dict[str, list[float]] = {}
            over = n_steps = 0
            lost_o = lost_u = 0.0
            for key, seq in amax.items():
                s, o, lo, lu = replay_delayed(seq, hists[key], delayed_fmt[key], length)
                scales[key] = s
                over += o
                n_steps += len(seq)
                lost_o += lo
                lost_u += lu
            histories[length] = HistoryReplay(
                length, n_steps, over, lost_o / n_elems if n_elems else 0.0, lost_u / n_elems if n_elems else 0.0,
                length > steps, scales,
            )
    return RecipeReport(steps, results, totals, histories, amax, _recommend(totals, histories))


def _recommend(totals: dict[str, RecipeCounts], histories: dict[int, HistoryReplay]) -> str:
    parts = []
    lost = {r: c.underflow_fraction + c.saturated_fraction + (c.nonfinite / c.elements if c.elements else 0.0)
            for r, c in totals.items()}
    best = min(lost, key=lambda r: lost[r])
    evidence = ", ".join(f"{r} {lost[r]:.3%}" for r in sorted(lost, key=lambda r: lost[r]))
    parts.append(f"Recipe: {best} loses the fewest GEMM operand values (underflow + saturation + NaN blocks: "
                 f"{evidence}).")
    if histories:
        # Fewest stale-scale overflows first, then least underflow, then the shorter history.
        h = min(histories.values(), key=lambda r: (r.overflow_steps, r.underflow_rate, r.length))
        ev = "; ".join(
            f"{r.length}: {r.overflow_steps} overflow steps, {r.underflow_rate:.3%} underflow"
            + (" (longer than the run)" if r.longer_than_run else "")
            for r in histories.values()
        )
        parts.append(f"Delayed scaling: amax_history_len={h.length} (fewest stale-scale overflows, then least "
                     f"underflow; replayed on the recorded amax sequence: {ev}).")
    return " ".join(parts)


def plot_amax(report: RecipeReport, path: str | Path, *, sites: int = 6) -> Path:
    """Per-layer amax over steps (from the ``fp8-delayed`` run) against the amax each history length's
    scale covers (``max / scale``): where the amax line rises above a scale's line, that step overflowed.
    Writes a PNG (matplotlib, imported here) and returns its path."""
    if not report.amax:
        raise ValueError("report has no recorded amax sequence (run diagnose_recipes with 'fp8-delayed')")
    from .plots import new_figure  # the Figure API: the user's pyplot state and backend stay untouched

    def spread(k: str) -> float:  # the sites whose amax moves most are the interesting ones
        pos = [a for a in report.amax[k] if a > 0]
        return max(pos) / min(pos) if pos else 0.0

    keys = sorted(report.amax, key=lambda k: -spread(k))[:sites]
    fig = new_figure(8, 2.2 * len(keys))
    axes = fig.subplots(len(keys), 1, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        seq = report.amax[key]
        ax.semilogy(range(len(seq)), [max(a, 1e-45) for a in seq], "k-", lw=1.5, label="amax")
        fmt_max = 57344.0 if key.endswith(".grad_output") else 448.0
        for length, h in report.histories.items():
            s = h.scales.get(key, [])
            ax.semilogy(range(len(s)), [fmt_max / v for v in s], lw=0.8, label=f"max/scale, history {length}")
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    return out
