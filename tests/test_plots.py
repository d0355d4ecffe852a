"""Figures: the format windows where they belong, the skipped steps marked, PNGs written, no global state."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle
from torch import nn

import lossscale
from lossscale import GradientMonitor, diagnose, plots
from lossscale.diagnose import LayerDiagnosis, ScaleInterval

PNG = b"\x89PNG\r\n\x1a\n"


def small_diagnosis(depth: int = 12) -> lossscale.Diagnosis:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(8, 2))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 8, generator=g), torch.randint(0, 2, (16,), generator=g))]
    return diagnose(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), data, steps=2)


def test_format_windows_exact() -> None:
    w = plots.format_windows("fp16")
    assert w == {"subnormal": (-24.0, -14.0), "normal": (-14.0, math.log2(65504.0))}
    w = plots.format_windows("bf16", 10)
    assert w["subnormal"] == (-143.0, -136.0) and w["normal"][0] == -136.0
    assert plots.format_windows("fp16-ftz")["subnormal"] is None
    assert plots.format_windows("e4m3", -2)["normal"] == (-4.0, math.log2(448.0) + 2)


def test_display_shift() -> None:
    assert plots.display_shift(None) is None
    assert plots.display_shift(ScaleInterval(-3, 40)) == 0  # scale 1 works: no shift
    assert plots.display_shift(ScaleInterval(9, 20)) == 9  # the least scaling up that works
    assert plots.display_shift(ScaleInterval(-20, -4)) == -4  # the least scaling down that works


def _spans(ax: matplotlib.axes.Axes) -> list[tuple[float, float, bool]]:
    """(x0, x1, filled) of the axvspan rectangles on an axes."""
    out = []
    for p in ax.patches:
        if isinstance(p, Rectangle):
            out.append((round(p.get_x(), 6), round(p.get_x() + p.get_width(), 6), bool(p.get_fill())))
    return sorted(out)


def test_histogram_bands_are_the_windows_shifted_by_the_recommended_scale() -> None:
    d = small_diagnosis()
    fig = plots.histogram_figure(d)
    assert len(fig.axes) == 1 + len(d.formats)
    hist_ax = fig.axes[0]
    # Bars: one per histogram bin, stacked activation then weight, bin c drawn over (c-1, c].
    heights = [p.get_height() for p in hist_ax.patches]
    assert sum(heights) == pytest.approx(d.hist.sum())
    for ax, name in zip(fig.axes[1:], d.formats, strict=False):
        fd = d.formats[name]
        shift = plots.display_shift(fd.recommended_scale)
        expected = []
        base = plots.format_windows(name, 0)
        for key in ("subnormal", "normal"):
            w = base[key]
            if w is not None:
                expected.append((round(w[0], 6), round(w[1], 6), False))
        if shift is not None:
            moved = plots.format_windows(name, shift)
            for key in ("subnormal", "normal"):
                w = moved[key]
                if w is not None:
                    expected.append((round(w[0], 6), round(w[1], 6), True))
        assert _spans(ax) == sorted(expected), name


def test_files_are_pngs_and_the_backend_is_untouched(tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    d = small_diagnosis()
    paths = plots.save_all(d, tmp_path / "figs")
    assert [p.name for p in paths] == ["gradient_histogram.png", "layer_underflow.png", "top_layers.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 5000
    assert matplotlib.get_backend() == backend


def _monitored_run_with_a_skip() -> lossscale.monitor.MonitorStats:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = lossscale.LossScaler(init_scale=2.0**8, growth_interval=2)
    mon = GradientMonitor(model, formats=("fp16",), every=1, scaler=scaler, optimizer=opt)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for i in range(6):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if i == 3:
            loss = loss * math.inf
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        mon.step()
    return mon.read()


def test_scale_trajectory_marks_the_skipped_steps(tmp_path: Path) -> None:
    stats = _monitored_run_with_a_skip()
    steps, scales, skipped = plots.trajectory_points(stats)
    assert list(steps) == [0, 1, 2, 3, 4, 5]
    # growth every 2 finite steps, backoff on the inf step
    assert list(np.log2(scales)) == [8, 8, 9, 9, 8, 8]
    assert list(skipped) == [False, False, False, True, False, False]
    fig = plots.trajectory_figure(stats)
    marks = [c for c in fig.axes[0].collections if len(c.get_offsets())]
    assert len(marks) == 1 and np.array_equal(np.asarray(marks[0].get_offsets()), [[3, 9]])
    paths = plots.save_all(lossscale.Diagnosis.from_stats(stats), tmp_path, stats)
    assert [p.name for p in paths][-1] == "scale_trajectory.png"
    assert paths[-1].read_bytes()[:8] == PNG


def test_trajectory_needs_a_scaler() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    mon = GradientMonitor(model, formats=("fp16",), every=1)
    model(torch.randn(2, 3)).sum().backward()
    mon.step()
    with pytest.raises(ValueError, match="scaler="):
        plots.trajectory_points(mon.read())


# ------------------------------------------------------------------------------------------------------
# Pictures that scale: a 400-layer model


def flat_400() -> lossscale.Diagnosis:
    """200 Linear + 200 Tanh leaf modules in one flat nn.Sequential: 400 layers, 800 monitored gradients."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(200):
        layers += [nn.Linear(4, 4), nn.Tanh()]
    model = nn.Sequential(*layers)
    data = [torch.randn(4, 4, generator=torch.Generator().manual_seed(0))]
    return diagnose(model, lambda m, x: m(x).square().mean(), data, steps=1, zero_check=False)


@pytest.fixture(scope="module")
def d400() -> lossscale.Diagnosis:
    return flat_400()


def _label_boxes(fig: matplotlib.figure.Figure) -> list[tuple[float, float, float, float]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    ax = fig.axes[0]
    return [tuple(t.get_window_extent(renderer).extents) for t in ax.get_yticklabels() if t.get_text()]


def test_heatmap_of_400_layers_is_short_and_its_labels_do_not_overlap(d400: lossscale.Diagnosis,
                                                                       tmp_path: Path) -> None:
    import matplotlib.image

    assert len({plots._module_of(x) for x in d400.layers}) == 400
    path = plots.layer_heatmap(d400, tmp_path / "heat.png")
    height, width = matplotlib.image.imread(str(path)).shape[:2]
    assert height < 2000 and width < 2000
    groups = plots.layer_groups(d400)
    assert len(groups) <= plots.MAX_ROWS
    # Every module in exactly one row, in model order (0, 1, 2, ... as named by nn.Sequential).
    flat = [m for g in groups for m in g.modules]
    assert flat == [str(i) for i in range(400)]
    fig = plots.heatmap_figure(d400)
    boxes = sorted(_label_boxes(fig), key=lambda b: b[1])
    assert len(boxes) == len(groups)
    for (_, _, _, y1a), (_, y0b, _, _) in zip(boxes, boxes[1:], strict=False):
        assert y1a <= y0b, "row labels overlap"
    fig_w = fig.get_size_inches()[0] * fig.dpi
    assert all(x0 >= 0 and x1 <= fig_w for x0, _, x1, _ in boxes)  # and none is cut off


def test_top_k_view_and_its_png(d400: lossscale.Diagnosis, tmp_path: Path) -> None:
    import matplotlib.image

    under, over = plots.top_layers(d400, "fp16", k=10)
    fracs = [float(x.formats["fp16"]["underflow_fraction"] or 0.0) for x in d400.layers]
    assert [r.underflow_fraction for r in under] == sorted(fracs, reverse=True)[:10]
    fin = lossscale.monitor.thresholds("fp16").finite
    heads = sorted(math.log2(fin) - math.log2(x.max_abs) for x in d400.layers if x.max_abs > 0)
    assert [r.headroom_binades for r in over] == pytest.approx(heads[:10], abs=0)
    path = plots.top_layers_plot(d400, tmp_path / "top.png")
    assert matplotlib.image.imread(str(path)).shape[0] < 2000
    with pytest.raises(ValueError, match="k must be"):
        plots.top_layers(d400, "fp16", k=0)
    with pytest.raises(ValueError, match="diagnosed formats"):
        plots.top_layers(d400, "e4m3")


def _synthetic(d: lossscale.Diagnosis, names: list[tuple[str, str, int, float]]) -> lossscale.Diagnosis:
    layers = tuple(
        LayerDiagnosis(
            name=n, kind=k, numel=numel, zeros=0, max_abs=1.0, min_abs_nonzero=1e-3,
            formats={f: {"underflow_fraction": u, "subnormal_fraction": 0.0, "overflow_fraction": 0.0}
                     for f in d.formats},
        )
        for n, k, numel, u in names
    )
    return dataclasses.replace(d, layers=layers)


def test_groups_fold_by_the_deepest_prefix_that_fits_and_weight_by_elements() -> None:
    base = small_diagnosis(depth=1)
    rows = []
    for b in range(20):
        for j in range(10):
            rows.append((f"blocks.{b}.{j}.weight", "weight", 10 * (j + 1), 0.5 if j == 0 else 0.0))
            rows.append((f"blocks.{b}.{j}", "activation", 7, 1.0 if b == 3 else 0.0))
    rows.append(("head.weight", "weight", 5, 0.2))
    d = _synthetic(base, rows)
    groups = plots.layer_groups(d, max_rows=60)
    # 201 modules: "blocks.b.j" (depth 3) is too many, "blocks.b" (depth 2) gives 21 rows.
    assert [g.label for g in groups] == [f"blocks.{b}.* (10)" for b in range(20)] + ["head"]
    g0 = groups[0]
    assert g0.numel == {"weight": 550, "activation": 70}
    assert g0.underflow["weight"]["fp16"] == 0.5 * 10 / 550  # element-weighted
    assert groups[3].underflow["activation"]["fp16"] == 1.0
    assert math.isnan(groups[-1].underflow["activation"]["fp16"])  # head has no activation entry
    assert len(plots.layer_groups(d, max_rows=300)) == 201  # few enough: one row per module
    with pytest.raises(ValueError, match="max_rows"):
        plots.layer_groups(d, max_rows=1)


def test_histogram_shows_both_ends() -> None:
    d = small_diagnosis()
    fig = plots.histogram_figure(d)
    lo, hi = fig.axes[0].get_xlim()
    assert hi >= math.log2(65504)  # fp16's overflow end, within 40 binades of max|g|
    assert lo <= math.log2(min(x.min_abs_nonzero for x in d.layers if x.min_abs_nonzero))
    texts = [t.get_text() for ax in fig.axes[1:] for t in ax.texts]
    fin = lossscale.monitor.thresholds("fp16").finite
    want = f"overflow headroom at 1: {math.log2(fin) - math.log2(d.max_abs):.1f} binades"
    assert any(want in t for t in texts)
