"""The framework-free core of lossscale.integrations: recipe and scaler defaults, monitor summary, imports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lossscale import GradientMonitor, LossScaler, Precision
from lossscale.integrations._common import (
    import_framework,
    make_monitor,
    monitor_summary,
    needs_loss_scaling,
    resolve_precision,
    resolve_scaler,
    scaler_metrics,
)


@pytest.mark.parametrize(
    ("name", "needs"),
    [
        ("fp32", False),
        ("bf16-mixed", False),
        ("fp16-mixed", True),
        ("fp8-hybrid", True),
        ("compute=e4m3,grad=e5m2", True),
        ("compute=e5m2", False),  # FP8 GEMMs output BF16: the gradients are BF16
        ("compute=fp16,grad=bf16", False),
    ],
)
def test_default_scaler_follows_the_gradient_format(name, needs):
    recipe = resolve_precision(name)
    assert needs_loss_scaling(recipe) is needs
    assert isinstance(resolve_scaler(recipe, None), LossScaler) is needs
    assert resolve_scaler(recipe, False) is None
    assert isinstance(resolve_scaler(recipe, True), LossScaler)
    mine = LossScaler(init_scale=8.0)
    assert resolve_scaler(recipe, mine) is mine


def test_bad_options_are_loud():
    with pytest.raises(ValueError, match="weights"):
        resolve_precision("fp16-pure")
    with pytest.raises(ValueError, match="unknown name"):
        resolve_precision("fp17")
    with pytest.raises(TypeError, match="scaler"):
        resolve_scaler(Precision.parse("fp16-mixed"), torch.amp.GradScaler("cpu"))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="monitor"):
        make_monitor(1.5, model, None, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="supplied by the integration"):
        make_monitor({"formats": "fp16", "scaler": None}, model, None, None)


def test_missing_framework_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'lossscale\[lightning\]'"):
        import_framework("lossscale_no_such_framework.pytorch", "lightning")


def test_monitor_summary_matches_the_tables():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    scaler = LossScaler(init_scale=2.0**-28)  # a tiny scale, so that gradients underflow FP16 and E5M2
    mon = make_monitor({"formats": "fp16,e5m2", "every": 1}, model, None, scaler)
    assert isinstance(mon, GradientMonitor)
    scaler.scale(model(torch.randn(16, 8)).square().mean()).backward()
    mon.step()
    stats = mon.read()
    out = monitor_summary(stats)
    # An independent count over the gradients themselves, for the weights' part of the table.
    last = stats.tables[-1]
    numel = last[:, stats.columns.NUMEL].sum()
    assert numel == sum(p.numel() for p in model.parameters()) + 16 * 8 + 16 * 8 + 16 * 1
    for f, fmt in enumerate(stats.formats):
        assert out[f"grad_health/{fmt.name}/underflow"] == last[:, stats.columns.underflow(f)].sum() / numel
    w_under = sum(
        int(((p.grad != 0) & (p.grad.half() == 0)).sum()) for p in model.parameters()
    )  # torch's own FP16 cast as the oracle for the weight rows
    weight_rows = np.array([e.kind == "weight" for e in stats.entries])
    assert last[weight_rows, stats.columns.underflow(0)].sum() == w_under > 0
    assert out["grad_health/e5m2/underflow"] >= out["grad_health/fp16/underflow"] > 0
    assert monitor_summary(GradientMonitor(model, formats="fp16").read()) == {}


def test_scaler_metrics_are_device_tensors():
    assert scaler_metrics(None) == {}
    assert scaler_metrics(LossScaler(enabled=False)) == {}
    m = scaler_metrics(LossScaler(init_scale=4.0))
    assert m["loss_scale"].item() == 4.0 and m["skipped_steps"].item() == 0.0
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in m.values())
