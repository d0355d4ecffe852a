"""Figures of gradient health (PNG, matplotlib's Agg canvas; matplotlib is imported only when plotting).

* :func:`exponent_histogram`: the histogram of ``log2|g|`` over all gradients with each format's normal and
  subnormal windows shaded, at scale 1 and shifted by the recommended loss scale, in the style of Figure 3
  of Micikevicius et al., "Mixed Precision Training" (arXiv:1710.03740).
* :func:`layer_heatmap` (also ``layer_underflow``): per-module underflow fractions at scale 1 as a heatmap
  (modules x format and gradient kind), folded by module-name prefix past 60 rows so that a 400-layer model
  stays readable; :func:`top_layers_plot`: the layers closest to underflow and to overflow, per format.
* :func:`scale_trajectory`: the loss scale of a monitored run with the skipped steps marked.
* :func:`study_loss_figure`, :func:`study_scale_figure`, :func:`study_gradient_figure`: a case study's loss
  curves, loss-scale trajectories and gradient exponents against the format windows, per task
  (:mod:`lossscale.study.report` writes them).

Figures are drawn on a ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so plotting
changes no global matplotlib state (the user's backend stays as it is).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .diagnose import Diagnosis, LayerDiagnosis, ScaleInterval
from .formats import FloatFormat, FormatLike
from .monitor import HIST_MIN_LOG2, MonitorStats, thresholds

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "format_windows",
    "display_shift",
    "exponent_histogram",
    "histogram_figure",
    "trajectory_figure",
    "layer_underflow",
    "layer_heatmap",
    "heatmap_figure",
    "layer_groups",
    "LayerGroup",
    "top_layers",
    "top_layers_figure",
    "top_layers_plot",
    "TopLayer",
    "scale_trajectory",
    "trajectory_points",
    "save_all",
    "study_loss_figure",
    "study_scale_figure",
    "study_gradient_figure",
]

PathLike = str | os.PathLike[str]
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib ``Figure`` with its own Agg canvas: never pyplot, never ``matplotlib.use`` (the caller's
    backend and open figures stay as they are). Every lossscale figure is made here."""
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
    fig = new_figure(10, 4 + 0.55 * len(names))
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
        head = ""
        if d.max_abs > 0 and math.isfinite(d.max_abs):
            h = math.log2(thresholds(fmt).finite) - math.log2(d.max_abs)
            head = f"\noverflow headroom at 1: {h:.1f} binades"
        label += f"\nunderflow at 1: {fd.underflow_fraction:.2%}{head}"
        band.text(1.005, 0.5, label, transform=band.transAxes, fontsize=7, va="center")
        if i < len(names) - 1:
            band.tick_params(labelbottom=False)
    ax.tick_params(labelbottom=False)
    # Both ends: the smallest and largest gradient, and each format's limits within 40 binades of them (the
    # band labels give the overflow headroom of formats whose max lies further out, such as bf16's 2^128).
    if nz.size:
        top = math.log2(d.max_abs) if d.max_abs > 0 and math.isfinite(d.max_abs) else float(hi_c)
        mins = [x.min_abs_nonzero for x in d.layers if x.min_abs_nonzero]
        low = math.log2(min(mins)) if mins else float(lo_c - 1)
        for c, what in ((low, "smallest nonzero |g| "), (top, " max |g|")):
            ax.axvline(c, color="black", lw=0.8, ls="--")
            ax.text(c, 0.02, f"{what}\n 2^{c:.1f}", transform=ax.get_xaxis_transform(), fontsize=7,
                    va="bottom", ha="left" if what == " max |g|" else "right")
    ax.set_xlim(max(min(xs), lo_c - 40), min(max(xs), hi_c + 40))
    fig.axes[-1].set_xlabel("log2 |gradient|  (band: outlined = format window at scale 1, filled = shifted)")
    fig.subplots_adjust(left=0.09, right=0.8, top=0.93, bottom=0.1)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Per-layer pictures that scale to real models: a heatmap folded by module prefix, and the top-k layers

MAX_ROWS = 60  # beyond this many modules the heatmap groups them (labels stay readable, the PNG < 2000 px)
_ROW_IN = 0.16  # inches per heatmap row: 16 px at 100 dpi, for 7-point labels (~10 px tall)


def _module_of(layer: LayerDiagnosis) -> str:
    """The module a monitored gradient belongs to: ``a.b`` for the parameter ``a.b.weight`` and for the
    output gradient of the module ``a.b``."""
    if layer.kind == "weight":
        return layer.name.rpartition(".")[0] or layer.name
    return layer.name


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """One heatmap row: consecutive modules sharing a name prefix (or one module).

    ``underflow[kind][format]``: the element-weighted underflow fraction at scale 1 of the group's gradients
    of that kind (``"weight"``/``"activation"``), NaN when the group has none of that kind.
    """

    label: str
    modules: tuple[str, ...]
    numel: Mapping[str, int]
    underflow: Mapping[str, Mapping[str, float]]


def _short(text: str, width: int = 48) -> str:
    if len(text) <= width:
        return text
    keep = width - 1
    return text[: keep // 2] + "\u2026" + text[-(keep - keep // 2) :]


def _model_order(d: Diagnosis) -> list[str]:
    """Modules in model order: the leaf modules in the order of the activation entries (``named_modules``),
    with each module that only has weight entries placed after the module of the weight entry before it."""
    acts = list(dict.fromkeys(_module_of(x) for x in d.layers if x.kind == "activation"))
    weights = list(dict.fromkeys(_module_of(x) for x in d.layers if x.kind == "weight"))
    order = list(acts)
    seen = set(order)
    prev: str | None = None
    for m in weights:
        if m not in seen:
            at = order.index(prev) + 1 if prev is not None else 0
            order.insert(at, m)
            seen.add(m)
        prev = m
    return order


def _keyed(modules: list[str], depth: int) -> list[str]:
    return [".".join(m.split(".")[:depth]) for m in modules]


def layer_groups(d: Diagnosis, *, max_rows: int = MAX_ROWS, formats: list[str] | None = None) -> list[LayerGroup]:
    """The rows of :func:`layer_heatmap`: one per module when there are at most ``max_rows``, else modules
    folded by the deepest name prefix that leaves at most ``max_rows`` groups (``h.3.attn.*``); when even
    the first name component leaves more (a flat ``nn.Sequential`` of 400 layers), runs of consecutive
    modules (``12 \u2026 17``). Every monitored gradient is in exactly one row; order is the model's."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 2:
        raise ValueError(f"max_rows must be an int >= 2, got {max_rows!r}")
    names = list(d.formats) if formats is None else formats
    modules = _model_order(d)
    if len(modules) <= max_rows:
        keys, labels = modules, {m: m for m in modules}
    else:
        depth = max((m.count(".") + 1 for m in modules), default=1)
        keys = []
        while depth >= 1:
            keys = _keyed(modules, depth)
            if len(dict.fromkeys(keys)) <= max_rows:
                break
            depth -= 1
        if depth >= 1:
            labels = {}
            for k in dict.fromkeys(keys):
                n = keys.count(k)
                labels[k] = k if n == 1 and k in modules else f"{k}.* ({n})"
        else:  # fold runs of consecutive modules
            size = math.ceil(len(modules) / max_rows)
            keys, labels = [], {}
            for i in range(0, len(modules), size):
                run = modules[i : i + size]
                key = f"#{i}"
                keys += [key] * len(run)
                labels[key] = run[0] if len(run) == 1 else f"{run[0]} \u2026 {run[-1]} ({len(run)})"
    group_of = dict(zip(modules, keys, strict=True))
    members: dict[str, list[str]] = {}
    for m, k in group_of.items():
        members.setdefault(k, []).append(m)
    num: dict[str, dict[str, dict[str, float]]] = {}  # key -> kind -> format -> underflowing elements
    den: dict[str, dict[str, int]] = {}
    for layer in d.layers:
        k = group_of[_module_of(layer)]
        den.setdefault(k, {}).setdefault(layer.kind, 0)
        den[k][layer.kind] += layer.numel
        per = num.setdefault(k, {}).setdefault(layer.kind, {})
        for f in names:
            per[f] = per.get(f, 0.0) + float(layer.formats[f]["underflow_fraction"] or 0.0) * layer.numel
    out = []
    for k, mods in members.items():
        under = {
            kind: {f: (num[k][kind][f] / den[k][kind] if den[k].get(kind) else math.nan) for f in names}
            if kind in den[k]
            else {f: math.nan for f in names}
            for kind in ("weight", "activation")
        }
        out.append(LayerGroup(labels[k], tuple(mods), {kind: den[k].get(kind, 0) for kind in under}, under))
    return out


def layer_heatmap(
    d: Diagnosis, path: PathLike, *, formats: list[str] | None = None, max_rows: int = MAX_ROWS
) -> Path:
    """Heatmap of the underflow fraction at scale 1: rows are modules (folded by name prefix past
    ``max_rows``, see :func:`layer_groups`), columns each format's weight and activation gradients. PNG."""
    return _save(heatmap_figure(d, formats=formats, max_rows=max_rows), path)


def heatmap_figure(d: Diagnosis, *, formats: list[str] | None = None, max_rows: int = MAX_ROWS) -> Figure:
    """The figure of :func:`layer_heatmap` (one axes, plus its colour bar)."""
    from matplotlib.colors import LogNorm

    names = list(d.formats) if formats is None else formats
    groups = layer_groups(d, max_rows=max_rows, formats=names)
    cols = [(f, kind) for f in names for kind in ("weight", "activation")]
    vals = np.array([[g.underflow[kind][f] for f, kind in cols] for g in groups], dtype=np.float64)
    n = len(groups)
    fig = new_figure(3.6 + 1.0 * len(cols), 2.2 + _ROW_IN * n)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))  # placed below, once the label width is known
    floor = min(d.threshold / 10, 1e-4) if d.threshold > 0 else 1e-6
    cmap = _colormap()
    shown = np.ma.masked_where(~(vals > 0), np.clip(vals, floor, 1.0))
    im = ax.imshow(shown, aspect="auto", cmap=cmap, norm=LogNorm(vmin=floor, vmax=1.0), interpolation="nearest")
    missing = np.isnan(vals)
    if missing.any():
        ax.imshow(np.ma.masked_where(~missing, np.ones_like(vals)), aspect="auto", cmap="Greys", vmin=0, vmax=4,
                  interpolation="nearest")
    if n <= max_rows:
        for i in range(n):
            for j in range(len(cols)):
                v = vals[i, j]
                if v > 0:
                    ax.text(j, i, f"{v:.1%}" if v >= 0.001 else f"{v:.0e}", ha="center", va="center", fontsize=6,
                            color="white" if v > 0.05 else "black")
    ax.set_yticks(range(n))
    ax.set_yticklabels([_short(g.label) for g in groups], fontsize=7)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{f}\n{'weights' if k == 'weight' else 'activations'}" for f, k in cols], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(len(cols) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    for j in range(2, len(cols), 2):
        ax.axvline(j - 0.5, color="black", linewidth=1.0)
    folded = sum(len(g.modules) for g in groups)
    title = f"Underflow at scale 1, per module  [{d.source}]"
    if folded > n:
        title += f"\n{folded} modules folded into {n} rows by name prefix (element-weighted)"
    W, H = fig.get_size_inches() * fig.dpi
    fig.text(0.5, 1 - 6 / H, title, ha="center", va="top", fontsize=9)
    # Room for the labels: measured, not guessed.
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    label_w = max((t.get_window_extent(renderer).width for t in ax.get_yticklabels()), default=0.0)
    left = (label_w + 12) / W
    top_px, bottom_px = 66.0 + (14 if folded > n else 0), 46.0
    cbar_w = 0.9 * fig.dpi / W
    ax.set_position((left, bottom_px / H, max(0.1, 1 - left - cbar_w - 0.02), 1 - (top_px + bottom_px) / H))
    cax = fig.add_axes((1 - cbar_w + 0.15 * fig.dpi / W, bottom_px / H, 0.12 * fig.dpi / W,
                        1 - (top_px + bottom_px) / H))
    cb = fig.colorbar(im, cax=cax)
    cb.ax.tick_params(labelsize=7)
    cb.ax.axhline(max(d.threshold, floor), color="black", linewidth=1.5)
    cb.set_label(f"underflow fraction (line: threshold {d.threshold:g}; white: none; grey: no gradient)", fontsize=7)
    fig.text(left, 8 / H, "rows: modules in model order; each cell: the share of that module's gradient elements "
             "that round to 0 in the format at loss scale 1", fontsize=6)
    return fig


def _colormap() -> Any:
    from matplotlib import colormaps

    return colormaps["magma_r"].with_extremes(bad="white")


def layer_underflow(d: Diagnosis, path: PathLike, *, formats: list[str] | None = None) -> Path:
    """The per-layer underflow picture (``layer_underflow.png``): :func:`layer_heatmap`, readable at any
    depth. Writes a PNG."""
    return layer_heatmap(d, path, formats=formats)


@dataclasses.dataclass(frozen=True)
class TopLayer:
    """A monitored gradient and how close it is to each end of a format at scale 1."""

    name: str
    kind: str
    underflow_fraction: float
    headroom_binades: float | None  # log2(T_fin / max|g|): factor-of-two steps before max|g| overflows


def top_layers(d: Diagnosis, fmt: str, k: int = 15) -> tuple[list[TopLayer], list[TopLayer]]:
    """The ``k`` gradients with the largest underflow fraction at scale 1 in ``fmt`` (nonzero ones only), and
    the ``k`` with the least overflow headroom (``log2(T_fin / max|g|)``, negative when they overflow)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if fmt not in d.formats:
        raise ValueError(f"fmt must be one of the diagnosed formats {list(d.formats)}, got {fmt!r}")
    fin = thresholds(fmt).finite
    rows = []
    for x in d.layers:
        head = None
        if x.max_abs > 0 and math.isfinite(x.max_abs):
            head = math.log2(fin) - math.log2(x.max_abs)
        rows.append(TopLayer(x.name, x.kind, float(x.formats[fmt]["underflow_fraction"] or 0.0), head))
    under = sorted((r for r in rows if r.underflow_fraction > 0), key=lambda r: -r.underflow_fraction)[:k]
    over = sorted((r for r in rows if r.headroom_binades is not None), key=lambda r: r.headroom_binades or 0.0)[:k]
    return under, over


def top_layers_figure(d: Diagnosis, *, formats: list[str] | None = None, k: int = 15) -> Figure:
    """Per format, the ``k`` gradients closest to underflow (largest underflow fraction at scale 1) and the
    ``k`` closest to overflow (least headroom), as bars (figure of :func:`top_layers_plot`)."""
    names = list(d.formats) if formats is None else formats
    k = max(1, min(k, int((17.0 / max(len(names), 1) - 0.9) / _ROW_IN)))  # keeps the PNG under ~1900 px
    fig = new_figure(13, len(names) * (0.9 + _ROW_IN * k) + 0.6)
    for i, name in enumerate(names):
        under, over = top_layers(d, name, k)
        for j, (rows, what) in enumerate(((under, "underflow"), (over, "overflow"))):
            ax = fig.add_subplot(len(names), 2, 2 * i + j + 1)
            labels = [_short(f"{r.name} [{'w' if r.kind == 'weight' else 'a'}]", 44) for r in rows]
            y = np.arange(len(rows))
            if what == "underflow":
                ax.barh(y, [r.underflow_fraction for r in rows], color="#d62728")
                for yy, r in zip(y, rows, strict=True):  # the value just past the end of its bar
                    ax.text(r.underflow_fraction, float(yy), f" {r.underflow_fraction:.2%}", ha="left",
                            va="center", fontsize=6)
                over_t = sum(1 for x in d.layers if float(x.formats[name]["underflow_fraction"] or 0) > d.threshold)
                ax.set_xlabel(f"underflow fraction ({over_t} of {len(d.layers)} gradients above the threshold)",
                              fontsize=7)
                ax.set_xlim(0, 1.18)
                ax.axvline(d.threshold, color="black", lw=0.8, ls="--")
                ax.set_title(f"{name}: highest underflow at scale 1" + ("" if rows else " (none underflow)"),
                             fontsize=8)
            else:
                heads = [float(r.headroom_binades or 0.0) for r in rows]
                ax.barh(y, heads, color=["#d62728" if h < 0 else "#1f77b4" for h in heads])
                for yy, h in zip(y, heads, strict=True):
                    ax.text(max(h, 0.0), float(yy), f" {h:+.1f}", ha="left", va="center", fontsize=6)
                if heads:
                    ax.set_xlim(min(0.0, min(heads)) * 1.1, max(max(heads), 1.0) * 1.15)
                ax.set_xlabel("log2(largest finite value / max|g|) at scale 1; < 0 overflows", fontsize=7)
                ax.axvline(0, color="black", lw=0.8)
                ax.set_title(f"{name}: least overflow headroom (binades = factors of 2 to max)", fontsize=8)
            ax.set_yticks(y)
            ax.set_yticklabels(labels, fontsize=6.5)
            ax.set_ylim(k - 0.5, -0.5)
            ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"Layers closest to underflow / overflow  [{d.source}]  ([w] weight, [a] activation gradient)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def top_layers_plot(d: Diagnosis, path: PathLike, *, formats: list[str] | None = None, k: int = 15) -> Path:
    """Write :func:`top_layers_figure` as a PNG."""
    return _save(top_layers_figure(d, formats=formats, k=k), path)


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
    fig = new_figure(9, 3.5)
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
    """Write ``gradient_histogram.png``, ``layer_underflow.png`` (the heatmap), ``top_layers.png`` and, given a
    monitored run with a scaler, ``scale_trajectory.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    paths = [
        exponent_histogram(d, out / "gradient_histogram.png"),
        layer_underflow(d, out / "layer_underflow.png"),
        top_layers_plot(d, out / "top_layers.png"),
    ]
    if stats is not None and stats.scales.size and not np.all(np.isnan(stats.scales)):
        paths.append(scale_trajectory(stats, out / "scale_trajectory.png"))
    return paths


# ----------------------------------------------------------------------------------------------------------
# Case-study figures (from a study's results document, lossscale.study.schema)

_STUDY_WINDOWS: tuple[tuple[str, str], ...] = (("bf16", "tab:blue"), ("fp16", "tab:orange"), ("e5m2", "tab:red"))


def _study_runs(doc: Mapping[str, Any], task: str) -> tuple[list[Mapping[str, Any]], list[str]]:
    from .study.configs import CONFIG_NAMES

    runs = [r for r in doc["runs"] if r["task"] == task]
    order = {c: i for i, c in enumerate(CONFIG_NAMES)}
    return runs, sorted({r["config"] for r in runs}, key=lambda c: order.get(c, 99))


def _tab20(i: int) -> Any:
    import matplotlib

    return matplotlib.colormaps["tab20"](i % 20)


def study_loss_figure(doc: Mapping[str, Any], task: str) -> Figure:
    """A study task's training-loss curves, one per configuration (mean over seeds, moving average)."""
    runs, configs = _study_runs(doc, task)
    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    for i, cfg in enumerate(configs):
        curves = [r["loss_curve"] for r in runs if r["config"] == cfg]
        n = min(len(c) for c in curves)
        ys = []
        for t in range(n):
            vals = [c[t] for c in curves]
            ys.append(math.nan if any(v is None for v in vals) else statistics.fmean(vals))
        w = max(1, n // 30)
        sm = []
        for t in range(n):
            window = ys[max(0, t - w + 1) : t + 1]
            sm.append(math.nan if any(math.isnan(v) for v in window) else statistics.fmean(window))
        style = "-" if cfg.endswith(("dynamic", "kahan")) or cfg == "fp32" else "--" if cfg.endswith("none") else ":"
        ax.plot(range(n), sm, style, color=_tab20(i), label=cfg, lw=1.5 if cfg == "fp32" else 1.0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title(f"{task}: loss curves per configuration")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def study_scale_figure(doc: Mapping[str, Any], task: str) -> Figure:
    """A study task's loss-scale trajectories (log2, lowest seed per scaled configuration), skipped steps x."""
    runs, configs = _study_runs(doc, task)
    fig = new_figure(8, 4)
    ax = fig.subplots()
    any_scaled = False
    for i, cfg in enumerate(configs):
        rs = [r for r in runs if r["config"] == cfg and r["scaling"] != "none"]
        if not rs:
            continue
        any_scaled = True
        r = min(rs, key=lambda r: r["seed"])
        traj = [math.log2(s) if s > 0 else math.nan for s in r["scale_trajectory"]]
        ax.step(range(len(traj)), traj, where="post", color=_tab20(i), label=f"{cfg} (seed {r['seed']})")
        sk = [s for s in r["skipped_at"] if s < len(traj)]
        if sk:
            ax.scatter(sk, [traj[s] for s in sk], marker="x", color=_tab20(i), s=25, zorder=3)
    ax.set_xlabel("step (x: skipped step)")
    ax.set_ylabel("log2(loss scale)")
    ax.set_title(f"{task}: loss-scale trajectory" + ("" if any_scaled else " (no scaled configuration run)"))
    if any_scaled:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def study_gradient_figure(doc: Mapping[str, Any], task: str) -> Figure:
    """A study task's FP32 activation-gradient exponent histogram against the BF16, FP16 and E5M2 windows."""
    runs, _ = _study_runs(doc, task)
    fig = new_figure(8, 4)
    ax = fig.subplots()
    ref = [r for r in runs if r["config"] == "fp32"] or runs
    h = min(ref, key=lambda r: r["seed"])["grad_exponent_histogram"]
    counts = h["counts"]
    total = float(sum(counts)) or 1.0
    xs = [h["min_log2"] + i for i in range(len(counts))]
    ax.bar(xs, [c / total for c in counts], width=1.0, color="0.35", label=f"{ref[0]['config']} activation gradients")
    for k, (name, color) in enumerate(_STUDY_WINDOWS):
        f = FloatFormat.parse(name)
        lo_sub, lo_norm, hi = math.log2(f.min_subnormal), math.log2(f.min_normal), math.log2(f.max)
        ax.axvspan(lo_norm, hi, ymin=0.9 - 0.07 * k, ymax=0.96 - 0.07 * k, color=color, alpha=0.6,
                   label=f"{name} normal [2^{lo_norm:.0f}, 2^{hi:.0f}]")
        ax.axvspan(lo_sub, lo_norm, ymin=0.9 - 0.07 * k, ymax=0.96 - 0.07 * k, color=color, alpha=0.2)
        ax.axvline(lo_sub - 1, color=color, ls=":", lw=0.8)
    if xs:
        ax.set_xlim(min(xs[0], -30) - 2, max(xs[-1], 17) + 2)
    ax.set_xlabel("ceil(log2 |gradient|)   (light: subnormal range; dotted: rounds to zero below)")
    ax.set_ylabel("fraction of nonzero gradients")
    ax.set_title(f"{task}: gradient exponents vs format windows (scale 1)")
    ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    return fig
