"""The study's and the recipe advisor's figures use the Figure API (lossscale.plots.new_figure): drawing
them neither imports pyplot nor switches the caller's matplotlib backend (a notebook's inline backend, say)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, tempfile, matplotlib
    matplotlib.use("svg")
    from lossscale import plots
    from lossscale.study import report, sweeps
    out = tempfile.mkdtemp()
    run = dict(task="cnn", config="fp16-mixed:dynamic", scaling="dynamic", seed=0, loss_curve=[2.0, 1.0, 0.5],
               scale_trajectory=[65536.0, 32768.0, 32768.0], skipped_at=[1],
               grad_exponent_histogram={"min_log2": -40, "counts": [0] * 30 + [5, 9, 3]})
    fp32 = dict(run, config="fp32", scaling="none")
    doc = {"runs": [fp32, run]}
    for draw in (plots.study_loss_figure, plots.study_scale_figure, plots.study_gradient_figure):
        name = report.save_figure(draw(doc, "cnn"), out, draw.__name__ + ".png")
        assert open(out + "/" + name, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n", name
    cfg = sweeps.SWEEP_CONFIGS[0]
    runs = [dict(task="rnn", config=cfg, sweep_value=v, metric=0.5, grad_format="fp16",
                 underflow_fraction={"fp16": 0.1}) for v in (64, 256)]
    report.save_figure(sweeps.sweep_figure("seq-len", runs), out, "sweep.png")
    assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
    assert "matplotlib.pyplot" not in sys.modules
    print("ok")
    """
)


def test_study_figures_do_not_touch_pyplot_or_the_backend() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
