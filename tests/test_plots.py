"""Figures: the format windows where they belong, the skipped steps marked, PNGs written, no global state."""

from __future__ import annotations

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
from lossscale.diagnose import ScaleInterval

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
    assert [p.name for p in paths] == ["gradient_histogram.png", "layer_underflow.png"]
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
