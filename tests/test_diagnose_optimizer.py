"""diagnose() with the user's optimizer: by name or factory, swamping checked against a brute-force count,
the report naming the optimizer; trainer frameworks' wrapped optimizers unwrapped by type."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from lossscale import diagnose
from lossscale.diagnose import optimizer_factory

Batch = tuple[torch.Tensor, torch.Tensor]


def small_model(seed: int = 0) -> tuple[nn.Module, Callable[..., torch.Tensor], list[Batch]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(3)]

    def loss_fn(m: nn.Module, b: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    return model, loss_fn, data


def brute_force_swamping(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: list[Batch], make: Callable[..., Any], steps: int
) -> dict[str, float]:
    """Train a copy in FP32 with the same optimizer; count, element by element, updates that change the FP32
    weight but not its bf16/fp16 rounding (ml_dtypes casts: an oracle independent of lossscale)."""
    ref = copy.deepcopy(model).float().train()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = make(params)
    updated = 0
    swamped = {"bf16": 0, "fp16": 0}
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(ref, data[i % len(data)]).backward()
        old = np.concatenate([p.detach().numpy().ravel().copy() for p in params])
        opt.step()
        new = np.concatenate([p.detach().numpy().ravel() for p in params])
        changed = old != new
        updated += int(changed.sum())
        for name, dt in (("bf16", ml_dtypes.bfloat16), ("fp16", np.float16)):
            same = old.astype(dt).astype(np.float32) == new.astype(dt).astype(np.float32)
            swamped[name] += int((changed & same).sum())
    return {k: v / updated for k, v in swamped.items()}


def test_adamw_and_sgd_swamping_differ_and_each_matches_brute_force() -> None:
    model, loss_fn, data = small_model()
    steps = 3
    got, want = {}, {}
    for label, make in (
        ("adamw", optimizer_factory("adamw", lr=1e-4)),
        ("sgd", optimizer_factory("SGD", lr=0.01)),
    ):
        d = diagnose(model, loss_fn, data, steps=steps, formats=("bf16", "fp16"), optimizer=make)
        got[label] = {f: d.format(f).swamping_fraction for f in ("bf16", "fp16")}
        want[label] = brute_force_swamping(model, loss_fn, data, make, steps)
        assert got[label] == pytest.approx(want[label], rel=0, abs=0)  # the same counts, exactly
    # The default (no optimizer named) is SGD at lr 0.01, and the report says so.
    d_default = diagnose(model, loss_fn, data, steps=steps, formats=("bf16", "fp16"))
    assert {f: d_default.format(f).swamping_fraction for f in ("bf16", "fp16")} == got["sgd"]
    assert d_default.meta["optimizer_description"].startswith("SGD(lr=0.01")
    # AdamW's normalised steps of ~1e-4 against SGD's lr * g: a different share of updates is lost.
    assert abs(got["adamw"]["bf16"] - got["sgd"]["bf16"]) > 0.05


def test_named_optimizer_with_keywords_and_the_report_names_it() -> None:
    model, loss_fn, data = small_model()
    d = diagnose(model, loss_fn, data, steps=1, optimizer="AdamW", optimizer_kwargs={"lr": 1e-4, "weight_decay": 0.1})
    assert d.meta["optimizer"] == "AdamW"
    assert d.meta["optimizer_defaults"]["lr"] == 1e-4 and d.meta["optimizer_defaults"]["weight_decay"] == 0.1
    desc = d.meta["optimizer_description"]
    assert desc.startswith("AdamW(lr=0.0001,") and "weight_decay=0.1" in desc and "betas=(0.9, 0.999)" in desc
    md = d.to_markdown()
    assert f"weight updates of {desc}" in md
    # Same as passing the factory.
    d2 = diagnose(model, loss_fn, data, steps=1, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.1))
    assert d2.to_dict()["formats"] == d.to_dict()["formats"]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("adamz",), {}, ValueError, "torch.optim class name .* got 'adamz'"),
        (("adamw",), {"learning_rate": 1.0}, ValueError, "AdamW takes no argument 'learning_rate'"),
        (("nosuchmodule.x:Opt",), {}, ValueError, "cannot import"),
        (("torch.nn:Linear",), {}, ValueError, "not a torch.optim.Optimizer class"),
        (("",), {}, TypeError, "non-empty str"),
    ],
)
def test_optimizer_factory_rejects_bad_names(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        optimizer_factory(*args, **kwargs)


def test_optimizer_kwargs_need_a_name() -> None:
    model, loss_fn, data = small_model()
    with pytest.raises(ValueError, match="optimizer_kwargs needs optimizer given by name"):
        diagnose(
            model, loss_fn, data, steps=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), optimizer_kwargs={"lr": 1}
        )
