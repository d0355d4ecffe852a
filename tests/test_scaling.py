"""The pure scaling rule: configs, exact trajectories, tensor vs Python twin vs torch's kernel."""

from __future__ import annotations

import dataclasses
import doctest
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lossscale import _compat, scaling
from lossscale.scaling import (
    DynamicScaling,
    NoScaling,
    PyScalingState,
    StaticScaling,
    config_from_dict,
    config_to_dict,
    init_state,
    init_state_py,
    state_from_py,
    state_to_py,
    update_scale,
)

from . import oracle
from .oracle import update_scale_py

FP32_MAX = torch.finfo(torch.float32).max


def run_py(cfg: scaling.ScalingConfig, flags: list[bool]) -> list[PyScalingState]:
    s = init_state_py(cfg)
    out = []
    for f in flags:
        s = update_scale_py(s, f, cfg)
        out.append(s)
    return out


def run_tensor(
    cfg: scaling.ScalingConfig, flags: list[bool], impl: _compat.KernelImpl = "auto"
) -> list[PyScalingState]:
    s = init_state(cfg)
    out = []
    for f in flags:
        s = update_scale(s, torch.tensor(float(f)), cfg, impl=impl)
        out.append(state_to_py(s))
    return out


def scales(cfg: scaling.ScalingConfig, flags: list[bool]) -> list[float]:
    """Scale after each step, from the Python twin; asserts both tensor paths give the same states."""
    py = run_py(cfg, flags)
    assert run_tensor(cfg, flags, "fallback") == py
    assert run_tensor(cfg, flags, "auto") == py
    return [s.scale for s in py]


T, F = True, False

# ---------------------------------------------------------------------------------------------------------
# Exact trajectories (worked by hand from the rule in scaling.py's docstring)


def test_torch_rule_trajectory() -> None:
    cfg = DynamicScaling(init_scale=8.0, growth_interval=3)
    assert scales(cfg, [F, F, F, T, F, F, F, F, T, T]) == [8, 8, 16, 8, 8, 8, 16, 16, 8, 4]


def test_hysteresis_trajectory() -> None:
    cfg = DynamicScaling(init_scale=8.0, growth_interval=3, hysteresis=2)
    # 1st overflow tolerated; then every overflow backs off until the growth at step 8 refills the counter.
    assert scales(cfg, [T, T, T, F, T, F, F, F, T, T]) == [8, 4, 2, 2, 1, 1, 1, 2, 2, 1]
    # Negative control: without hysteresis the first overflow already backs off.
    no_h = dataclasses.replace(cfg, hysteresis=1)
    assert scales(no_h, [T, T, T, F, T, F, F, F, T, T]) != scales(cfg, [T, T, T, F, T, F, F, F, T, T])


def test_hysteresis_three_tolerates_two() -> None:
    cfg = DynamicScaling(init_scale=64.0, growth_interval=1000, hysteresis=3)
    assert scales(cfg, [T, T, T, T]) == [64, 64, 32, 16]


def test_consecutive_hysteresis_trajectory() -> None:
    flags = [T, F, T, T, T, F, T]
    cfg = DynamicScaling(init_scale=8.0, growth_interval=100, hysteresis=2, consecutive_hysteresis=True)
    assert scales(cfg, flags) == [8, 8, 8, 4, 2, 2, 2]
    # Negative control: refilled only on growth, the finite step 2 does not restore the tolerance.
    assert scales(dataclasses.replace(cfg, consecutive_hysteresis=False), flags) == [8, 8, 4, 2, 1, 1, 0.5]


def test_min_scale_clamp() -> None:
    cfg = DynamicScaling(init_scale=8.0, min_scale=2.0)
    assert scales(cfg, [T, T, T, T]) == [4, 2, 2, 2]
    # Not a power of two: 8 -> 4 -> 3 (floor) -> 3.
    assert scales(dataclasses.replace(cfg, min_scale=3.0), [T, T, T]) == [4, 3, 3]


def test_max_scale_clamp() -> None:
    cfg = DynamicScaling(init_scale=4.0, growth_interval=1, max_scale=16.0)
    assert scales(cfg, [F, F, F, F]) == [8, 16, 16, 16]
    cfg = DynamicScaling(init_scale=8.0, growth_interval=1, max_scale=20.0)
    assert scales(cfg, [F, F, F, T]) == [16, 20, 20, 10]


def test_growth_refused_at_fp32_max() -> None:
    cfg = DynamicScaling(init_scale=2.0**126, growth_interval=1)
    traj = run_py(cfg, [F, F, F])
    assert [s.scale for s in traj] == [2.0**127, 2.0**127, 2.0**127]
    assert [s.growth_tracker for s in traj] == [0, 0, 0]  # the tracker resets even when growth is refused
    assert scales(cfg, [F, F, F]) == [2.0**127] * 3
    # growth 3 from 2^127 overflows too; 1.5 * 2^127 does not: it is finite.
    assert scales(DynamicScaling(init_scale=2.0**127, growth_factor=1.5, growth_interval=1), [F, F]) == [
        1.5 * 2.0**127,
        1.5 * 2.0**127,
    ]


def test_static_scaling_trajectory() -> None:
    cfg = StaticScaling(init_scale=128.0)
    traj = run_py(cfg, [T, F, T, T, F])
    assert [s.scale for s in traj] == [128.0] * 5
    assert [s.consecutive_skips for s in traj] == [1, 0, 1, 2, 0]
    assert [s.skipped_steps for s in traj] == [1, 1, 2, 3, 3]
    assert [s.steps for s in traj] == [1, 2, 3, 4, 5]
    assert run_tensor(cfg, [T, F, T, T, F]) == traj


def test_counters_trajectory() -> None:
    cfg = DynamicScaling(init_scale=2.0**10, growth_interval=2)
    traj = run_py(cfg, [T, T, F, T, F, F, F])
    assert [s.consecutive_skips for s in traj] == [1, 2, 0, 1, 0, 0, 0]
    assert [s.skipped_steps for s in traj] == [1, 2, 2, 3, 3, 3, 3]
    assert [s.growth_tracker for s in traj] == [0, 0, 1, 0, 1, 0, 1]
    assert run_tensor(cfg, [T, T, F, T, F, F, F]) == traj


def test_found_inf_counts_any_positive_value() -> None:
    cfg = DynamicScaling(init_scale=8.0)
    s = update_scale(init_state(cfg), torch.tensor(2.0), cfg)  # two optimizers both overflowed
    assert s.scale.item() == 4.0


def test_update_scale_is_pure() -> None:
    cfg = DynamicScaling(init_scale=8.0, growth_interval=1, hysteresis=2)
    for impl in ("auto", "fallback"):
        s0 = init_state(cfg)
        before = state_to_py(s0)
        update_scale(s0, torch.tensor(0.0), cfg, impl=impl)  # type: ignore[arg-type]
        update_scale(s0, torch.tensor(1.0), cfg, impl=impl)  # type: ignore[arg-type]
        assert state_to_py(s0) == before
    cfg = DynamicScaling(init_scale=8.0, growth_interval=1)
    s0 = init_state(cfg)
    update_scale(s0, torch.tensor(0.0), cfg, impl="fused")
    assert state_to_py(s0) == init_state_py(cfg)


def test_no_host_sync_meta_device() -> None:
    # Meta tensors have no values: any .item()/bool() in the update would raise.
    for cfg in (DynamicScaling(), DynamicScaling(hysteresis=2, min_scale=1.0, max_scale=2.0**20), StaticScaling()):
        for impl in ("auto", "fallback"):
            s = init_state(cfg, "meta")
            s = update_scale(s, torch.zeros((), device="meta"), cfg, impl=impl)  # type: ignore[arg-type]
            assert s.scale.device.type == "meta"


# ---------------------------------------------------------------------------------------------------------
# Tensor implementation == Python twin == torch's kernel


@st.composite
def dynamic_configs(draw: st.DrawFn) -> DynamicScaling:
    init = draw(st.sampled_from([1.0, 3.0, 2.0**-10, 2.0**16, 1234.5, 2.0**120]))
    lo = draw(st.one_of(st.none(), st.sampled_from([2.0**-12, 0.7, 1.0])))
    hi = draw(st.one_of(st.none(), st.sampled_from([2.0**121, 1e37, 5000.0])))
    if lo is not None and lo > init:
        lo = None
    if hi is not None and hi < init:
        hi = None
    return DynamicScaling(
        init_scale=init,
        growth_factor=draw(st.sampled_from([2.0, 1.5, 3.0, 1.0001, 10.0])),
        backoff_factor=draw(st.sampled_from([0.5, 0.3, 0.25, 0.9999, 0.1])),
        growth_interval=draw(st.integers(1, 5)),
        hysteresis=draw(st.integers(1, 4)),
        consecutive_hysteresis=draw(st.booleans()),
        min_scale=lo,
        max_scale=hi,
    )


@given(cfg=dynamic_configs(), flags=st.lists(st.booleans(), max_size=40))
def test_tensor_matches_python_twin(cfg: DynamicScaling, flags: list[bool]) -> None:
    py = run_py(cfg, flags)
    assert run_tensor(cfg, flags, "fallback") == py
    assert run_tensor(cfg, flags, "auto") == py


@given(
    init=st.sampled_from([1.0, 3.0, 2.0**16, 1234.5, 2.0**126, 1e-30]),
    growth=st.sampled_from([2.0, 1.5, 3.0, 1.0001, 10.0]),
    backoff=st.sampled_from([0.5, 0.3, 0.9999, 0.1]),
    interval=st.integers(1, 4),
    flags=st.lists(st.booleans(), max_size=40),
)
def test_torch_rule_matches_torch_kernel(
    init: float, growth: float, backoff: float, interval: int, flags: list[bool]
) -> None:
    """update_scale (the kernel shortcut and the tensor rule), the Python twin and torch._amp_update_scale_
    agree bit for bit: each step of the rule is one step of torch's kernel followed by the 2^-127 floor (which
    only acts where torch's scale would go below it). This is what lets update_scale take the kernel."""
    cfg = DynamicScaling(init_scale=init, growth_factor=growth, backoff_factor=backoff, growth_interval=interval)
    py = run_py(cfg, flags)
    assert run_tensor(cfg, flags, "fused") == py
    assert run_tensor(cfg, flags, "fallback") == py
    before = init_state_py(cfg)
    for f, expected in zip(flags, py, strict=True):
        scale = torch.full((), before.scale, dtype=torch.float32)
        tracker = torch.full((), before.growth_tracker, dtype=torch.int32)
        torch._amp_update_scale_(scale, tracker, torch.tensor(float(f)), growth, backoff, interval)
        assert max(scale.item(), scaling.SCALE_FLOOR) == expected.scale
        assert tracker.item() == expected.growth_tracker
        before = expected


def test_kernel_shortcut_is_taken_only_for_torch_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" calls torch's kernel for torch's rule, the tensor rule otherwise, and the tensor rule when this
    torch lacks the kernel; "fused" without the kernel is refused, naming it."""
    calls: list[int] = []
    real = _compat.update_scale_

    def counting(*args: object) -> None:
        calls.append(1)
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_compat, "update_scale_", counting)
    torch_rule, hyst = DynamicScaling(growth_interval=2), DynamicScaling(growth_interval=2, hysteresis=2)
    flags = [F, F, T, F, F, T, T, F]
    assert run_tensor(torch_rule, flags) == run_py(torch_rule, flags) and len(calls) == len(flags)
    assert run_tensor(hyst, flags) == run_py(hyst, flags) and len(calls) == len(flags)
    assert run_tensor(torch_rule, flags, "fallback") == run_py(torch_rule, flags) and len(calls) == len(flags)
    monkeypatch.setattr(_compat, "update_scale_available", lambda: False)
    assert run_tensor(torch_rule, flags) == run_py(torch_rule, flags) and len(calls) == len(flags)
    with pytest.raises(RuntimeError, match="_amp_update_scale_"):
        update_scale(init_state(torch_rule), torch.tensor(0.0), torch_rule, impl="fused")
    with pytest.raises(ValueError, match="impl must be one of"):
        update_scale(init_state(torch_rule), torch.tensor(0.0), torch_rule, impl="magic")  # type: ignore[arg-type]


def test_fused_impl_refuses_other_rules() -> None:
    cfg = DynamicScaling(hysteresis=2)
    with pytest.raises(ValueError, match="hysteresis=1"):
        update_scale(init_state(cfg), torch.tensor(0.0), cfg, impl="fused")


# ---------------------------------------------------------------------------------------------------------
# Configs: validation, round trips


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"growth_factor": 0.999}, ValueError, "growth_factor"),
        ({"growth_factor": 0.5}, ValueError, "growth_factor"),
        ({"growth_factor": math.inf}, ValueError, "growth_factor"),
        ({"growth_factor": "2"}, TypeError, "growth_factor"),
        ({"backoff_factor": 1.001}, ValueError, "backoff_factor"),
        ({"backoff_factor": 0.0}, ValueError, "backoff_factor"),
        ({"growth_interval": 2**63}, ValueError, "growth_interval"),
        ({"hysteresis": 2**31 + 1}, ValueError, "hysteresis"),
        ({"backoff_factor": -0.5}, ValueError, "backoff_factor"),
        ({"backoff_factor": math.nan}, ValueError, "backoff_factor"),
        ({"growth_interval": 0}, ValueError, "growth_interval"),
        ({"growth_interval": 2.0}, TypeError, "growth_interval"),
        ({"growth_interval": True}, TypeError, "growth_interval"),
        ({"hysteresis": 0}, ValueError, "hysteresis"),
        ({"hysteresis": 1.5}, TypeError, "hysteresis"),
        ({"consecutive_hysteresis": 1}, TypeError, "consecutive_hysteresis"),
        ({"init_scale": 0.0}, ValueError, "init_scale"),
        ({"init_scale": -1.0}, ValueError, "init_scale"),
        ({"init_scale": math.inf}, ValueError, "init_scale"),
        ({"init_scale": math.nan}, ValueError, "init_scale"),
        ({"init_scale": 1e39}, ValueError, "FP32"),
        ({"init_scale": "65536"}, TypeError, "init_scale"),
        ({"min_scale": 0.0}, ValueError, "min_scale"),
        ({"max_scale": math.inf}, ValueError, "max_scale"),
        ({"min_scale": 4.0, "max_scale": 2.0, "init_scale": 3.0}, ValueError, "min_scale"),
        ({"init_scale": 1.0, "min_scale": 2.0}, ValueError, "init_scale"),
        ({"init_scale": 2.0**20, "max_scale": 2.0**16}, ValueError, "init_scale"),
        ({"max_consecutive_skips": 0}, ValueError, "max_consecutive_skips"),
        ({"max_consecutive_skips": 2.0}, TypeError, "max_consecutive_skips"),
    ],
)
def test_dynamic_config_rejects(kwargs: dict[str, object], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        DynamicScaling(**kwargs)  # type: ignore[arg-type]


def test_static_config_rejects() -> None:
    with pytest.raises(ValueError, match="init_scale"):
        StaticScaling(0.0)
    with pytest.raises(TypeError, match="max_consecutive_skips"):
        StaticScaling(1.0, max_consecutive_skips="3")  # type: ignore[arg-type]


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DynamicScaling().init_scale = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "cfg",
    [
        DynamicScaling(),
        DynamicScaling(3.0, 1.5, 0.25, 7, 3, True, 0.5, 100.0, 9),
        StaticScaling(64.0, 3),
        NoScaling(),
    ],
)
def test_config_dict_round_trip(cfg: scaling.ScalingConfig) -> None:
    d = config_to_dict(cfg)
    assert set(d) == {"kind"} | {f.name for f in dataclasses.fields(cfg)}
    assert config_from_dict(d) == cfg


def test_config_from_dict_rejects() -> None:
    with pytest.raises(ValueError, match="kind"):
        config_from_dict({"kind": "adaptive"})
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({**config_to_dict(StaticScaling()), "hysteresis": 2})
    d = config_to_dict(DynamicScaling())
    del d["hysteresis"]
    with pytest.raises(ValueError, match="missing"):
        config_from_dict(d)
    with pytest.raises(TypeError):
        config_from_dict([("kind", "static")])  # type: ignore[arg-type]


def test_state_python_round_trip() -> None:
    py = PyScalingState(
        scale=3.5, growth_tracker=4, hysteresis_tracker=2, consecutive_skips=5, skipped_steps=2**40, steps=7
    )
    assert state_to_py(state_from_py(py)) == py
    s = state_from_py(py)
    assert s.scale.dtype == torch.float32 and s.growth_tracker.dtype == torch.int32
    assert s.skipped_steps.dtype == torch.int64
    with pytest.raises(ValueError, match="scale"):
        PyScalingState(scale=math.inf)
    with pytest.raises(ValueError, match="growth_tracker"):
        PyScalingState(scale=1.0, growth_tracker=-1)


def test_doctests() -> None:
    for mod in (scaling, oracle):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0


def test_clamps_never_move_the_scale_the_wrong_way() -> None:
    """A scale outside [min_scale, max_scale] (set by hand or loaded) is not pushed further by a clamp."""
    cfg = DynamicScaling(init_scale=8.0, growth_interval=1, min_scale=4.0, max_scale=16.0)
    below = PyScalingState(scale=1.0)
    above = PyScalingState(scale=64.0)
    for impl in ("auto", "fallback"):
        s = update_scale(state_from_py(below), torch.tensor(1.0), cfg, impl=impl)  # type: ignore[arg-type]
        assert s.scale.item() == 1.0  # an overflow does not raise it to the floor
        s = update_scale(state_from_py(above), torch.tensor(0.0), cfg, impl=impl)  # type: ignore[arg-type]
        assert s.scale.item() == 64.0  # a growth does not lower it to the ceiling
    assert update_scale_py(below, True, cfg).scale == 1.0
    assert update_scale_py(above, False, cfg).scale == 64.0


def test_scale_floor_2_pow_minus_127() -> None:
    """The rule never goes below 2^-127 (1/2^-128 overflows FP32); torch's kernel alone would reach 0."""
    assert scaling.SCALE_FLOOR == 2.0**-127 and math.isinf(float(torch.tensor(2.0**-128).double().reciprocal().float()))
    cfg = DynamicScaling(init_scale=2.0**-125, growth_interval=2)
    assert scales(cfg, [T, T, T, F, F]) == [2.0**-126, 2.0**-127, 2.0**-127, 2.0**-127, 2.0**-126]
    assert run_tensor(cfg, [T, T, T], "fused") == run_py(cfg, [T, T, T])
    # A huge backoff: torch's own kernel flushes to 0; the rule stops at the floor.
    cfg = DynamicScaling(init_scale=2.0**16, backoff_factor=1e-30)
    assert scales(cfg, [T, T, T]) == [scaling._fp32(2.0**16 * 1e-30), 2.0**-127, 2.0**-127]
    s, g = torch.tensor(2.0**16), torch.tensor(0, dtype=torch.int32)
    for _ in range(2):
        torch._amp_update_scale_(s, g, torch.tensor(1.0), 2.0, 1e-30, 2000)
    assert s.item() == 0.0  # the negative control
    # The general (hysteresis) path too, and a scale loaded below the floor comes back up to it.
    cfg = DynamicScaling(init_scale=2.0**-120, hysteresis=2, backoff_factor=2.0**-10)
    assert scales(cfg, [T, T, T]) == [2.0**-120, 2.0**-127, 2.0**-127]
    low = PyScalingState(scale=2.0**-140)
    assert update_scale_py(low, True, DynamicScaling()).scale == 2.0**-127
    assert state_to_py(update_scale(scaling.state_from_py(low), torch.tensor(1.0), DynamicScaling())).scale == 2.0**-127
