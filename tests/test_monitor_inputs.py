"""What GradientMonitor and diagnose accept: trainer frameworks' wrapped optimizers (the real accelerate and
Lightning classes, unwrapped by type), sparse gradients (counted like dense); and what they refuse by name:
meta-device parameters, a detached or non-floating loss, an LR scheduler passed as the optimizer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lossscale import GradientMonitor, diagnose

accelerate_optimizer = pytest.importorskip("accelerate.optimizer", reason="accelerate is not installed")
lightning_optimizer = pytest.importorskip("lightning.pytorch.core.optimizer", reason="lightning is not installed")


@pytest.fixture
def accelerator() -> Any:
    """A real CPU Accelerator (its optimizers need one), its global state reset afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def run(wrap: Any, steps: int = 3, step_inner: bool = False) -> np.ndarray:
    """Train with SGD (lr 1e-3) under a monitor given ``wrap(opt)``; returns the totals."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    wrapped = wrap(opt)
    mon = GradientMonitor(model, ("bf16", "fp16"), every=1, optimizer=wrapped)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        (opt if step_inner else wrapped).step()
        mon.step()
    total = mon.read().total
    mon.remove()
    return total


def test_accelerated_and_lightning_optimizers_are_unwrapped(accelerator: Any) -> None:
    plain = run(lambda o: o)
    updated = plain[:, -3]  # Columns: ..., updated, swamped(bf16), swamped(fp16)
    assert updated.sum() > 0
    acc = run(accelerator.prepare_optimizer)
    assert isinstance(accelerator.prepare_optimizer(torch.optim.SGD(mlp().parameters())),
                      accelerate_optimizer.AcceleratedOptimizer)
    assert np.array_equal(acc, plain)  # stepped through the wrapper: the same swamping counts
    # Lightning's wrapper steps through its strategy (a Trainer); the inner optimizer's step is what runs.
    lit = run(lambda o: lightning_optimizer.LightningOptimizer(o), step_inner=True)
    assert np.array_equal(lit, plain)
    # Nested wrappers, too.
    both = run(lambda o: lightning_optimizer.LightningOptimizer(accelerator.prepare_optimizer(o)), step_inner=True)
    assert np.array_equal(both, plain)


def test_diagnose_accepts_a_factory_returning_a_wrapped_optimizer(accelerator: Any) -> None:
    model = mlp()
    data = [torch.randn(4, 6)]
    fn = lambda m, x: m(x).square().mean()  # noqa: E731
    raw = diagnose(model, fn, data, steps=2, optimizer=lambda p: torch.optim.SGD(p, lr=1e-3))
    acc = diagnose(model, fn, data, steps=2,
                   optimizer=lambda p: accelerator.prepare_optimizer(torch.optim.SGD(p, lr=1e-3)))
    assert acc.to_dict()["formats"] == raw.to_dict()["formats"]
    assert acc.meta["optimizer"] == "SGD"


def test_an_lr_scheduler_is_not_taken_for_an_optimizer() -> None:
    model = mlp()
    sched = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), step_size=1)
    assert hasattr(sched, "optimizer")  # what an attribute-based unwrap would have followed
    with pytest.raises(TypeError, match="got StepLR"):
        GradientMonitor(model, optimizer=sched)  # type: ignore[arg-type]


def test_meta_device_parameters_are_refused_by_name() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"meta device \(no values\): 0.weight, 0.bias, 1.weight, 1.bias"):
        GradientMonitor(model)
    with pytest.raises(ValueError, match="meta device"):
        diagnose(model, lambda m, x: m(x).sum(), [torch.randn(2, 4)], steps=1)


def test_detached_or_non_floating_loss_is_refused_by_name() -> None:
    model = mlp()
    data = [torch.randn(4, 6)]
    with pytest.raises(ValueError, match="does not require grad"):
        diagnose(model, lambda m, x: m(x).sum().detach(), data, steps=1)
    with pytest.raises(TypeError, match="floating-point loss, got dtype torch.int64"):
        diagnose(model, lambda m, x: (m(x) > 0).sum(), data, steps=1)


def test_sparse_gradients_are_counted_like_dense_ones() -> None:
    torch.manual_seed(0)
    sparse = nn.Embedding(20, 4, sparse=True)
    dense = nn.Embedding(20, 4)
    dense.load_state_dict(sparse.state_dict())
    ids = torch.tensor([[1, 2, 2, 7], [3, 3, 3, 19]])  # repeated ids: the sparse gradient has duplicates
    totals = []
    for emb in (sparse, dense):
        opt = torch.optim.SGD(emb.parameters(), lr=1e-2)
        mon = GradientMonitor(emb, ("bf16", "fp16"), every=1, optimizer=opt)
        (emb(ids) * 1e-6).sum().backward()
        assert emb.weight.grad is not None and emb.weight.grad.is_sparse == (emb is sparse)
        opt.step()
        mon.step()
        totals.append(mon.read().total)
        mon.remove()
    c = GradientMonitor(dense, ("bf16", "fp16")).read().columns
    # The gradient statistics are identical. (Swamping columns are left out: sparse SGD adds a repeated
    # id's contributions one by one, dense SGD their sum, which can round differently.)
    assert np.array_equal(totals[0][:, : c.updated], totals[1][:, : c.updated])
    assert totals[0][0, c.updated] > 0  # and the sparse step was measured
    assert totals[0][0, c.NUMEL] == 80 and totals[0][0, c.ZEROS] == 80 - 4 * 5  # 5 distinct ids used


def test_exclude_masks_are_measured_as_zeros_and_checked() -> None:
    model = nn.Linear(3, 2)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 1] = True
    mon = GradientMonitor(model, ("fp16",), every=1, exclude={"weight": mask}, activations=False)
    model(torch.ones(4, 3)).sum().backward()
    mon.step()
    total = mon.read().total
    c = mon.read().columns
    assert total[0, c.ZEROS] == 1 and total[0, c.NUMEL] == 6  # the masked element only
    assert model.weight.grad is not None and bool((model.weight.grad != 0).all())  # training untouched
    with pytest.raises(ValueError, match="'nope' is not a monitored parameter"):
        GradientMonitor(model, exclude={"nope": mask})
    with pytest.raises(ValueError, match=r"bool tensor of shape \(2, 3\)"):
        GradientMonitor(model, exclude={"weight": mask.float()})
    with pytest.raises(TypeError, match="exclude must be a mapping"):
        GradientMonitor(model, exclude=[mask])  # type: ignore[arg-type]
