"""lossscale.optim refuses what it cannot use: non-finite hyper-parameters at construction, and a malformed
state dict at load_state_dict, leaving the optimizer exactly as it was (checked by stepping it on beside a
twin that never saw the bad dict: bit-identical weights and state)."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lossscale.optim import SGD, AdamW

NONFINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda p, v: SGD(p, lr=v), "lr"),
        (lambda p, v: SGD(p, lr=0.1, momentum=v), "momentum"),
        (lambda p, v: SGD(p, lr=0.1, momentum=0.9, dampening=v), "dampening"),
        (lambda p, v: SGD(p, lr=0.1, weight_decay=v), "weight_decay"),
        (lambda p, v: AdamW(p, lr=v), "lr"),
        (lambda p, v: AdamW(p, eps=v), "eps"),
        (lambda p, v: AdamW(p, betas=(v, 0.999)), "betas[0]"),
        (lambda p, v: AdamW(p, betas=(0.9, v)), "betas[1]"),
        (lambda p, v: AdamW(p, weight_decay=v), "weight_decay"),
    ],
)
def test_hyper_parameters_must_be_finite(make: Callable[[Any, float], Any], name: str, value: float) -> None:
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=rf"{re.escape(name)} must be finite, got {value!r}"):
        make([w], value)


def test_added_group_must_be_finite_too() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = SGD([a], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum must be finite, got nan"):
        opt.add_param_group({"params": [b], "momentum": math.nan})
    assert len(opt.param_groups) == 1  # the refused group is not kept
    with pytest.raises(ValueError, match="lr must be finite, got inf"):
        opt.add_param_group({"params": [b], "lr": math.inf})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "momentum": 0.5})  # b was not taken by the refused groups
    assert len(opt.param_groups) == 2


def _trained(kind: str) -> tuple[Any, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt: Any = SGD(params, lr=0.1, momentum=0.9) if kind == "sgd" else AdamW(params, lr=0.01)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt, params


def _bad(kind: str, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    opt, _ = _trained(kind)
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd)
    return sd


BUF = {"sgd": "momentum_buffer", "adamw": "exp_avg"}

MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("no param_groups", lambda sd: sd.pop("param_groups"), "no 'param_groups' entry"),
    ("no state", lambda sd: sd.pop("state"), "no 'state' entry"),
    ("two groups", lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])), "2 parameter group"),
    ("one param", lambda sd: sd["param_groups"][0]["params"].pop(), "has 1 parameter"),
    ("repeated id", lambda sd: sd["param_groups"][0].update(params=[0, 0]), "names parameter id 0 twice"),
    ("unknown id", lambda sd: sd["state"].update({7: {}}), "parameter id 7, which no group lists"),
    ("bad group", lambda sd: sd["param_groups"].__setitem__(0, 3), "must be a list of dicts"),
    ("lr nan", lambda sd: sd["param_groups"][0].update(lr=math.nan), "lr must be finite"),
    ("lr negative", lambda sd: sd["param_groups"][0].update(lr=-1.0), "Invalid learning rate"),
]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize(
    ("label", "mutate", "message"),
    [
        *MALFORMED,
        ("wrong shape", "shape", "has shape (2, 3); its parameter has (3, 2)"),
        ("negative step", "step-neg", "must be an integer >= 0"),
        ("fractional step", "step-frac", "must be an integer >= 0"),
        ("nan step tensor", "step-nan", "must be an integer >= 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_state_dict_raises_at_load_and_changes_nothing(
    kind: str, label: str, mutate: Any, message: str
) -> None:
    def apply(sd: dict[str, Any]) -> None:
        if mutate == "shape":
            sd["state"][0][BUF[kind]] = sd["state"][0][BUF[kind]].reshape(2, 3).clone()
        elif isinstance(mutate, str):
            value = {"step-neg": -1, "step-frac": 1.5, "step-nan": torch.tensor(math.nan)}[mutate]
            sd["state"][0]["step"] = value
        else:
            mutate(sd)

    bad = _bad(kind, apply)
    opt, params = _trained(kind)
    twin, twin_params = _trained(kind)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        opt.load_state_dict(bad)
    # Untouched: stepping on gives the twin's bits, weights and state alike.
    for _ in range(2):
        torch.manual_seed(1)
        for p in params:
            p.grad = torch.randn_like(p)
        torch.manual_seed(1)
        for p in twin_params:
            p.grad = torch.randn_like(p)
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)
    sd, tsd = opt.state_dict(), twin.state_dict()
    assert sd["param_groups"] == tsd["param_groups"]
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            other = tsd["state"][pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_a_good_state_dict_still_loads() -> None:
    opt, _ = _trained("adamw")
    sd = copy.deepcopy(opt.state_dict())
    fresh, _ = _trained("adamw")
    fresh.load_state_dict(sd)
    sd["state"][0]["step"] = torch.tensor(2.0)  # torch.optim saves step as a float tensor: accepted
    fresh.load_state_dict(sd)
    assert fresh.state[fresh.param_groups[0]["params"][0]]["step"] == 2

