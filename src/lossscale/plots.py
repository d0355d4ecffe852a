"""Figures of gradient health (PNG, matplotlib's Agg canvas; matplotlib is imported only when plotting).

* :func:`exponent_histogram`: the histogram of ``log2|g|`` over all gradients with each format's normal and
  subnormal windows shaded, at scale 1 and shifted by the recommended loss scale, in the style of Figure 3
  of Micikevicius et al., "Mixed Precision Training" (arXiv:1710.03740).
* :func:`layer_underflow`: per-layer underflow fractions at scale 1, one bar per format.
* :func:`scale_trajectory`: the loss scale of a monitored run with the skipped steps marked.

Figures are drawn on a ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so plotting
changes no global matplotlib state (the user's backend stays as it is).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .diagnose import Diagnosis, ScaleInterval
from .formats import FloatFormat, FormatLike
from .monitor import HIST_MIN_LOG2, MonitorStats

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "format_windows",
    "display_shift",
    "exponent_histogram",
    "histogram_figure",
    "trajectory_figure",
    "layer_underflow",
    "scale_trajectory",
    "trajectory_points",
    "save_all",
]

PathLike = str | os.PathLike[str]
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'lossscale[plot]'") from err
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def format_windows(fmt: FormatLike, log2_scale: int = 0) -> dict[str, tuple[float, float] | None]:
    """Where a format's values lie in ``log2|g|`` for gradients multiplied by ``2^log2_scale`` before rounding:
    ``{"subnormal": (log2 min_subnormal, log2 min_normal) - k or None if flushed,
    "normal": (log2 min_normal, log2 max) - k}``.

    Example:
        >>> format_windows("fp16", 3)["subnormal"], format_windows("fp16")["normal"][0]
        ((-27.0, -17.0), -14.0)
    """
    fmt = FloatFormat.parse(fmt)
    k = float(log2_scale)
    normal = (math.log2(fmt.min_normal) - k, math.log2(fmt.max) - k)
    sub = (math.log2(fmt.min_subnormal) - k, math.log2(fmt.min_normal) - k) if fmt.subnormals else None
    return {"subnormal": sub, "normal": normal}


def display_shift(interval: ScaleInterval | None) -> int | None:
    """The scale the histogram shows a format shifted by: 0 when scale 1 is inside the recommended interval,
    else the interval's end nearest to 1 (the least scaling that works); None when there is no interval."""
    if interval is None:
        return None
    if interval.log2_min <= 0 <= interval.log2_max:
        return 0
    return interval.log2_min if interval.log2_min > 0 else interval.log2_max


def exponent_histogram(d: Diagnosis, path: PathLike, *, formats: list[str] | None = None) -> Path:
    """Histogram of ``log2|g|`` (weights and activations stacked) with each format's windows; writes a PNG.

    For each format, a band below the histogram shows its subnormal (light) and normal (dark) windows in
    gradient units at scale 1 (outlined) and shifted by the recommended scale (filled; see
    :func:`display_shift`): a gradient under a filled window survives rounding at that scale.
    """
    return _save(histogram_figure(d, formats=formats), path)


def histogram_figure(d: Diagnosis, *, formats: list[str] | None = None) -> Figure:
    """The figure of :func:`exponent_histogram` (axes 0: histogram; axes 1..: one band per format)."""
    names = list(d.formats) if formats is None else formats
    nz = np.nonzero(d.hist)[0]
    if nz.size:
        lo_c, hi_c = int(nz[0]) + HIST_MIN_LOG2, int(nz[-1]) + HIST_MIN_LOG2
    else:
        lo_c, hi_c = -30, 10
    fig = _figure(10, 4 + 0.55 * len(names))
    heights = [4.0] + [0.55] * len(names)
    gs = fig.add_gridspec(1 + len(names), 1, height_ratios=heights, hspace=0.08)
    ax = fig.add_subplot(gs[0])
    centers = np.arange(len(d.hist)) + HIST_MIN_LOG2
    # Bin c holds 2^(c-1) < |g| <= 2^c: draw it over (c-1, c].
    left = centers - 1
    ax.bar(left, d.hist_activation, width=1.0, align="edge", color="#4c72b0", label="activation gradients")
    ax.bar(left, d.hist_weight, width=1.0, align="edge", bottom=d.hist_activation, color="#dd8452",
           label="weight gradients")
    if d.hist.sum() > 0:
        ax.set_yscale("log")
    ax.set_ylabel("count")
    title = "Gradient magnitudes"
    if d.zeros:
        title += f" ({d.zeros:,} exact zeros not shown)"
    ax.set_title(title + f"  [{d.source}]")
    ax.legend(loc="upper left", fontsize=8)
    xs: list[float] = [lo_c - 2.0, hi_c + 1.0]
    for i, name in enumerate(names):
        fd = d.formats[name]
        fmt = FloatFormat.parse(name)
        color = _COLORS[i % len(_COLORS)]
        band = fig.add_subplot(gs[1 + i], sharex=ax)
        band.set_yticks([])
        band.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
        base = format_windows(fmt, 0)
        for key, style in (("subnormal", ":"), ("normal", "-")):
            w = base[key]
            if w is not None:
                band.axvspan(w[0], w[1], ymin=0.55, ymax=0.95, fill=False, edgecolor=color, linestyle=style)
                xs += [w[0], w[1]]
        shift = display_shift(fd.recommended_scale)
        if shift is not None:
            moved = format_windows(fmt, shift)
            for key, alpha in (("subnormal", 0.25), ("normal", 0.6)):
                w = moved[key]
                if w is not None:
                    band.axvspan(w[0], w[1], ymin=0.05, ymax=0.45, color=color, alpha=alpha)
            label = "scale 1" if shift == 0 else f"scale 2^{shift}"
        else:
            label = "no single scale fits"
        band.text(1.005, 0.5, label, transform=band.transAxes, fontsize=8, va="center")
        if i < len(names) - 1:
            band.tick_params(labelbottom=False)
    ax.tick_params(labelbottom=False)
    ax.set_xlim(max(min(xs), lo_c - 12), min(max(xs), hi_c + 12))
    fig.axes[-1].set_xlabel("log2 |gradient|  (band: outlined = format window at scale 1, filled = shifted)")
    fig.subplots_adjust(left=0.09, right=0.88, top=0.93, bottom=0.1)
    return fig


def layer_underflow(d: Diagnosis, path: PathLike, *, formats: list[str] | None = None) -> Path:
    """Horizontal bars: per layer, the fraction of its gradient elements that underflow at scale 1 in each
    format; weight gradients on the left, activation gradients on the right. Writes a PNG."""
    names = list(d.formats) if formats is None else formats
    groups = [(kind, [x for x in d.layers if x.kind == kind]) for kind in ("weight", "activation")]
    groups = [(k, g) for k, g in groups if g]
    n = max((len(g) for _, g in groups), default=1)
    fig = _figure(6.0 * max(len(groups), 1), min(max(3.0, 0.09 * n * (1 + len(names)) + 1.5), 40.0))
    h = 0.8 / max(len(names), 1)
    for j, (kind, layers) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), j + 1)
        y = np.arange(len(layers))
        for i, name in enumerate(names):
            vals = [float(x.formats[name]["underflow_fraction"] or 0.0) for x in layers]
            ax.barh(y + i * h, vals, height=h, color=_COLORS[i % len(_COLORS)], label=name)
        ax.set_yticks(y + 0.4 - h / 2)
        ax.set_yticklabels([x.name for x in layers], fontsize=7)
        ax.set_ylim(len(layers), -1)
        ax.set_xlim(0, 1)
        ax.axvline(d.threshold, color="black", lw=0.8, ls="--")
        ax.set_xlabel(f"underflow fraction at scale 1 (dashed: {d.threshold:g})", fontsize=8)
        ax.set_title(f"{kind} gradients  [{d.source}]", fontsize=10)
        if j == 0:
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def trajectory_points(stats: MonitorStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, scales, skipped)`` of the kept sampled steps of a monitored run with a scaler."""
    scales = np.asarray(stats.scales, dtype=np.float64)
    if scales.size == 0 or np.all(np.isnan(scales)):
        raise ValueError("stats hold no loss scale: pass scaler= to the GradientMonitor")
    return np.asarray(stats.steps), scales, stats.skipped()


def scale_trajectory(stats: MonitorStats, path: PathLike) -> Path:
    """The loss scale (log2) at each sampled step, skipped steps (inf/NaN weight gradients) marked. PNG."""
    return _save(trajectory_figure(stats), path)


def trajectory_figure(stats: MonitorStats) -> Figure:
    """The figure of :func:`scale_trajectory`."""
    steps, scales, skipped = trajectory_points(stats)
    fig = _figure(9, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.step(steps, np.log2(scales), where="post", color="#1f77b4", label="loss scale")
    if skipped.any():
        ax.scatter(steps[skipped], np.log2(scales[skipped]), marker="x", color="#d62728", zorder=3,
                   label=f"skipped steps ({int(skipped.sum())})")
    ax.set_xlabel("step")
    ax.set_ylabel("log2 scale")
    ax.set_title(f"Loss scale over the run  [{stats.source}]")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def save_all(d: Diagnosis, out_dir: PathLike, stats: MonitorStats | None = None) -> list[Path]:
    """Write ``gradient_histogram.png``, ``layer_underflow.png`` and, given a monitored run with a scaler,
    ``scale_trajectory.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    paths = [exponent_histogram(d, out / "gradient_histogram.png"), layer_underflow(d, out / "layer_underflow.png")]
    if stats is not None and stats.scales.size and not np.all(np.isnan(stats.scales)):
        paths.append(scale_trajectory(stats, out / "scale_trajectory.png"))
    return paths
