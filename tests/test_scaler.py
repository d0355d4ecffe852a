"""LossScaler, the torch shell: equivalence with torch.amp.GradScaler, skips, checkpoints, bad input."""

from __future__ import annotations

import copy
import dataclasses
import doctest
import gc
import io
import logging
import math
import pickle
import random
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lossscale import _compat
from lossscale import scaler as scaler_mod
from lossscale.scaler import LossScaler, NonFiniteGrad, SkipBudgetExceeded, SkipEvent
from lossscale.scaling import (
    DynamicScaling,
    NoScaling,
    PyScalingState,
    StaticScaling,
    init_state_py,
)

from .integration_utils import sgd_reusing_id
from .oracle import update_scale_py

INF, NAN = math.inf, math.nan
OptFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a tensor (so that NaN == NaN and -0.0 != 0.0)."""
    t = t.detach().contiguous()
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def tensors_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of tensors and of nested optimizer states."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def snapshot(model: nn.Module, opts: list[torch.optim.Optimizer]) -> Any:
    return (
        [p.detach().clone() for p in model.parameters()],
        [copy.deepcopy(o.state_dict()) for o in opts],
    )


def split_params(model: nn.Module, n_opts: int) -> list[list[nn.Parameter]]:
    params = list(model.parameters())
    if n_opts == 1:
        return [params]
    return [params[:2], params[2:]]


# ---------------------------------------------------------------------------------------------------------
# Equivalence oracle: LossScaler vs torch.amp.GradScaler("cpu")


def run_training(
    scaler: Any,
    opt_factories: list[OptFactory],
    *,
    steps: int,
    seed: int,
    clip: bool = False,
    accum: int = 1,
    inject_prob: float = 0.15,
    model_seed: int = 0,
) -> tuple[nn.Module, list[torch.optim.Optimizer], list[float]]:
    model = make_model(model_seed)
    groups = split_params(model, len(opt_factories))
    opts = [f(ps) for f, ps in zip(opt_factories, groups, strict=True)]
    params = list(model.parameters())
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    scale_seq = []
    for _ in range(steps):
        xs = [torch.randn(5, 6, generator=gen) for _ in range(accum)]
        ys = [torch.randn(5, 4, generator=gen) for _ in range(accum)]
        inject = None
        if rng.random() < inject_prob:
            i = rng.randrange(len(params))
            inject = (i, rng.randrange(params[i].numel()), rng.choice([INF, -INF, NAN]))
        for o in opts:
            o.zero_grad()
        for x, y in zip(xs, ys, strict=True):
            loss = ((model(x) - y) ** 2).mean() / accum
            scaler.scale(loss).backward()
        if inject is not None:
            i, j, v = inject
            params[i].grad.view(-1)[j] = v  # type: ignore[union-attr]
        if clip:
            for o, ps in zip(opts, groups, strict=True):
                scaler.unscale_(o)
                # Per optimizer: an inf in one optimizer's gradients must not turn the other's into NaN.
                torch.nn.utils.clip_grad_norm_(ps, 0.5)
        for o in opts:
            scaler.step(o)
        scaler.update()
        scale_seq.append(scaler.get_scale())
    return model, opts, scale_seq


SGD_M: OptFactory = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
ADAM: OptFactory = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
ADAM_FUSED: OptFactory = lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True)  # noqa: E731
ADAMW_FOREACH: OptFactory = lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True)  # noqa: E731


@pytest.mark.parametrize(
    ("name", "factories", "clip", "accum"),
    [
        ("sgd-momentum", [SGD_M], False, 1),
        ("adam", [ADAM], False, 1),
        ("two-optimizers", [SGD_M, ADAM], False, 1),
        ("adam-clip-accumulate", [ADAM], True, 3),
        ("two-optimizers-clip", [ADAMW_FOREACH, SGD_M], True, 1),
        ("fused-adam", [ADAM_FUSED], False, 1),
        ("fused-adam-clip", [ADAM_FUSED], True, 2),
    ],
)
def test_equivalent_to_torch_grad_scaler(name: str, factories: list[OptFactory], clip: bool, accum: int) -> None:
    kwargs: dict[str, Any] = {"init_scale": 2.0**12, "growth_interval": 7}
    ours = LossScaler(**kwargs)
    ref = torch.amp.GradScaler("cpu", **kwargs)
    m1, o1, s1 = run_training(ours, factories, steps=220, seed=1, clip=clip, accum=accum)
    m2, o2, s2 = run_training(ref, factories, steps=220, seed=1, clip=clip, accum=accum)
    assert s1 == s2
    # The run must exercise both directions of the rule.
    assert any(b > a for a, b in zip(s1, s1[1:], strict=False)) and any(b < a for a, b in zip(s1, s1[1:], strict=False))
    assert ours.skipped_steps >= 15
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b in zip(o1, o2, strict=True):
        assert tensors_equal(a.state_dict()["state"], b.state_dict()["state"])
    sd = ours.state_dict()["state"]
    ref_sd = ref.state_dict()
    assert (sd["scale"], sd["growth_tracker"]) == (ref_sd["scale"], ref_sd["_growth_tracker"])


def test_equivalent_with_non_power_of_two_factors() -> None:
    kwargs: dict[str, Any] = {"init_scale": 1000.0, "growth_factor": 3.0, "backoff_factor": 0.3, "growth_interval": 5}
    _, o1, s1 = run_training(LossScaler(**kwargs), [SGD_M], steps=200, seed=3, inject_prob=0.25)
    _, o2, s2 = run_training(torch.amp.GradScaler("cpu", **kwargs), [SGD_M], steps=200, seed=3, inject_prob=0.25)
    assert s1 == s2
    assert tensors_equal(o1[0].state_dict()["state"], o2[0].state_dict()["state"])


def test_equivalence_negative_control() -> None:
    """The oracle notices a different rule: hysteresis=2 changes the scale sequence.

    The FP32 weights still agree: power-of-two scales unscale exactly, and every injected overflow is
    skipped under both rules; only the scale differs.
    """
    kwargs: dict[str, Any] = {"init_scale": 2.0**12, "growth_interval": 7}
    m1, _, s1 = run_training(LossScaler(**kwargs, hysteresis=2), [SGD_M], steps=100, seed=1)
    m2, _, s2 = run_training(torch.amp.GradScaler("cpu", **kwargs), [SGD_M], steps=100, seed=1)
    assert s1 != s2
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------------
# Skips: each gradient tensor in turn, events, budget


def one_step(
    model: nn.Module, scaler: LossScaler, opt: torch.optim.Optimizer, inject: tuple[int, float] | None
) -> None:
    opt.zero_grad()
    loss = model(torch.ones(3, 6)).square().mean()
    scaler.scale(loss).backward()
    if inject is not None:
        i, v = inject
        list(model.parameters())[inject[0]].grad.view(-1)[-1] = v  # type: ignore[union-attr]
        del i
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("factory", [SGD_M, ADAM, ADAM_FUSED], ids=["sgd", "adam", "fused-adam"])
@pytest.mark.parametrize("value", [INF, -INF, NAN], ids=["inf", "-inf", "nan"])
def test_nonfinite_in_each_gradient_skips(factory: OptFactory, value: float) -> None:
    model = make_model()
    opt = factory(list(model.parameters()))
    scaler = LossScaler(init_scale=2.0**8)
    one_step(model, scaler, opt, None)
    one_step(model, scaler, opt, None)
    n_params = len(list(model.parameters()))
    for i in range(n_params):
        before = snapshot(model, [opt])
        scale = scaler.get_scale()
        one_step(model, scaler, opt, (i, value))
        after = snapshot(model, [opt])
        assert tensors_equal(before, after), f"parameter {i} changed"
        assert scaler.get_scale() == scale / 2
        assert scaler.skipped_steps == i + 1
        assert scaler.consecutive_skips == i + 1
    # Negative control: a finite step does change the parameters.
    before = snapshot(model, [opt])
    one_step(model, scaler, opt, None)
    assert not tensors_equal(before[0], snapshot(model, [opt])[0])
    assert scaler.consecutive_skips == 0 and scaler.skipped_steps == n_params


def test_skip_events_logged_and_hooked(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model()
    opt = SGD_M(list(model.parameters()))
    events: list[SkipEvent] = []
    scaler = LossScaler(init_scale=64.0, on_skip=events.append)
    extra: list[SkipEvent] = []
    handle = scaler.register_skip_hook(extra.append)
    with caplog.at_level(logging.INFO, logger="lossscale"):
        one_step(model, scaler, opt, None)
        one_step(model, scaler, opt, (0, NAN))
        one_step(model, scaler, opt, (1, INF))
        handle.remove()
        one_step(model, scaler, opt, None)
        one_step(model, scaler, opt, (2, INF))
    p = "param_groups[0].params"
    assert events == [
        SkipEvent(1, 64.0, 1, 1, "nonfinite_grads", (NonFiniteGrad(f"{p}[0]", (16, 6), 96, 0, 0, 1),)),
        SkipEvent(2, 32.0, 2, 2, "nonfinite_grads", (NonFiniteGrad(f"{p}[1]", (16,), 16, 1, 0, 0),)),
        SkipEvent(4, 16.0, 1, 3, "nonfinite_grads", (NonFiniteGrad(f"{p}[2]", (4, 16), 64, 1, 0, 0),)),
    ]
    assert extra == events[:2]
    records = [r for r in caplog.records if r.name == "lossscale"]
    assert len(records) == 3
    assert "iteration 2" in records[1].getMessage() and "scale 32" in records[1].getMessage()


def test_max_consecutive_skips() -> None:
    model = make_model()
    opt = SGD_M(list(model.parameters()))
    scaler = LossScaler(init_scale=1024.0, max_consecutive_skips=2)
    one_step(model, scaler, opt, (0, INF))
    one_step(model, scaler, opt, (0, INF))
    one_step(model, scaler, opt, None)  # a finite step resets the budget
    one_step(model, scaler, opt, (0, INF))
    one_step(model, scaler, opt, (0, NAN))
    assert scaler.consecutive_skips == 2 and scaler.get_scale() == 1024.0 / 16
    with pytest.raises(SkipBudgetExceeded, match=r"3 consecutive.*max_consecutive_skips=2.*iteration 5.*scale 64"):
        one_step(model, scaler, opt, (1, INF))
    # Negative control: without a budget the same run goes on.
    scaler = LossScaler(init_scale=1024.0)
    for _ in range(6):
        one_step(model, scaler, opt, (0, INF))
    assert scaler.consecutive_skips == 6


def test_hysteresis_through_the_shell() -> None:
    model = make_model()
    opt = SGD_M(list(model.parameters()))
    scaler = LossScaler(init_scale=8.0, growth_interval=3, hysteresis=2)
    seq = []
    for bad in [1, 1, 1, 0, 1, 0, 0, 0, 1, 1]:
        one_step(model, scaler, opt, (0, INF) if bad else None)
        seq.append(scaler.get_scale())
    assert seq == [8, 4, 2, 2, 1, 1, 1, 2, 2, 1]


def test_clamps_through_the_shell() -> None:
    model = make_model()
    opt = SGD_M(list(model.parameters()))
    scaler = LossScaler(init_scale=8.0, growth_interval=1, min_scale=2.0, max_scale=16.0)
    seq = []
    for bad in [0, 0, 1, 1, 1, 1, 0]:
        one_step(model, scaler, opt, (0, INF) if bad else None)
        seq.append(scaler.get_scale())
    assert seq == [16, 16, 8, 4, 2, 2, 4]


def test_static_scaling() -> None:
    model = make_model()
    opt = SGD_M(list(model.parameters()))
    scaler = LossScaler(init_scale=128.0, growth_interval=1, dynamic=False)
    for bad in [0, 1, 0, 1, 1]:
        before = snapshot(model, [opt])
        one_step(model, scaler, opt, (0, NAN) if bad else None)
        assert scaler.get_scale() == 128.0
        assert tensors_equal(before, snapshot(model, [opt])) == bool(bad)
    assert scaler.skipped_steps == 3
    assert scaler.get_growth_factor() == 1.0 and scaler.get_growth_interval() == 0
    with pytest.raises(TypeError, match="static"):
        scaler.set_growth_factor(4.0)


# ---------------------------------------------------------------------------------------------------------
# Dtypes, sparse, accumulation, disabled


def test_bf16_gradients_accepted() -> None:
    model = make_model(dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**10)
    loss = model(torch.ones(3, 6, dtype=torch.bfloat16)).float().square().mean()
    scaler.scale(loss).backward()
    scaled = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    scaler.unscale_(opt)
    for g, p in zip(scaled, model.parameters(), strict=True):
        assert p.grad.dtype == torch.bfloat16  # type: ignore[union-attr]
        assert torch.equal(p.grad, g * 2.0**-10)  # power-of-two unscale is exact  # type: ignore[union-attr]
    scaler.step(opt)
    scaler.update()
    one_step_bf16 = model(torch.ones(3, 6, dtype=torch.bfloat16)).float().square().mean()
    opt.zero_grad()
    scaler.scale(one_step_bf16).backward()
    next(iter(model.parameters())).grad.view(-1)[0] = INF  # type: ignore[union-attr]
    before = snapshot(model, [opt])
    scaler.step(opt)
    scaler.update()
    assert tensors_equal(before, snapshot(model, [opt])) and scaler.skipped_steps == 1


def test_fp16_gradients_refused_scaler_unchanged() -> None:
    model = make_model()
    model[2].half()  # FP32 first layer, FP16 last: the FP32 gradients must not be unscaled either
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    scaler.scale(torch.ones(()))
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    sd = scaler.state_dict()
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.unscale_(opt)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert scaler.state_dict() == sd
    assert scaler._per_optimizer_states == {}


def test_sparse_gradients_match_torch() -> None:
    def run(scaler: Any) -> tuple[torch.Tensor, list[float]]:
        torch.manual_seed(0)
        emb = nn.Embedding(20, 3, sparse=True)
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        seq = []
        for step in range(12):
            opt.zero_grad()
            idx = torch.tensor([[1, 2, 2, 5], [7, 1, 9, 2]])  # repeated indices: an uncoalesced gradient
            scaler.scale(emb(idx).square().sum()).backward()
            if step % 4 == 1:
                emb.weight.grad._values().view(-1)[step] = INF  # type: ignore[union-attr]
            scaler.step(opt)
            scaler.update()
            seq.append(scaler.get_scale())
        return emb.weight.detach().clone(), seq

    w1, s1 = run(LossScaler(init_scale=2.0**8, growth_interval=2))
    w2, s2 = run(torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2))
    assert s1 == s2 and torch.equal(w1, w2)
    assert s1[1] == 2.0**7


def test_gradient_accumulation_unscales_once() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**6)
    ref = make_model()
    for _ in range(3):
        scaler.scale(model(torch.ones(2, 6)).sum() / 3).backward()
        (ref(torch.ones(2, 6)).sum() / 3).backward()
    scaler.unscale_(opt)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_disabled_is_a_no_op() -> None:
    model = make_model()
    opt = SGD_M(list(model.parameters()))
    scaler = LossScaler(enabled=False)
    loss = model(torch.ones(2, 6)).sum()
    assert scaler.scale(loss) is loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    scaler.unscale_(opt)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    before = snapshot(model, [opt])
    scaler.step(opt)  # steps even though nothing was scaled
    assert not tensors_equal(before[0], snapshot(model, [opt])[0])
    scaler.update()
    scaler.update(123.0)
    assert scaler.get_scale() == 1.0 and not scaler.is_enabled()
    assert scaler.state_dict() == {} and scaler.skipped_steps == 0
    scaler.load_state_dict({"anything": 1})
    assert LossScaler.from_config(NoScaling()).is_enabled() is False


def test_cuda_device_without_cuda_disables_like_torch() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        assert not LossScaler("cuda").is_enabled()


def test_scale_nested_outputs() -> None:
    scaler = LossScaler(init_scale=4.0)
    a, b, c = torch.tensor(1.0), torch.tensor([2.0, 3.0]), torch.tensor([0.5], dtype=torch.bfloat16)
    out = scaler.scale([a, (b, [c])])
    assert isinstance(out, list) and isinstance(out[1], tuple) and isinstance(out[1][1], list)
    assert out[0].item() == 4.0 and out[1][0].tolist() == [8.0, 12.0]
    assert out[1][1][0].dtype == torch.bfloat16 and out[1][1][0].tolist() == [2.0]
    # dtypes follow torch's promotion exactly as GradScaler (a 0-d bf16 loss becomes fp32 in both).
    ref = torch.amp.GradScaler("cpu", init_scale=4.0)
    loss = torch.tensor(0.5, dtype=torch.bfloat16)
    assert scaler.scale(loss).dtype == ref.scale(loss).dtype
    with pytest.raises(TypeError, match="Tensor"):
        scaler.scale([a, 3.0])


def test_no_host_sync_on_meta_device() -> None:
    """scale, unscale_ and update run on meta tensors, which refuse .item(): none of them syncs."""
    model = nn.Linear(4, 3, device="meta")
    opts = [torch.optim.SGD([model.weight], lr=0.1), torch.optim.Adam([model.bias])]
    scaler = LossScaler(hysteresis=2, min_scale=1.0, max_consecutive_skips=3)
    scaler.scale(model(torch.ones(2, 4, device="meta")).sum()).backward()
    for o in opts:
        scaler.unscale_(o)
    scaler.update()
    scaler.scale(model(torch.ones(2, 4, device="meta")).sum()).backward()
    with pytest.raises(RuntimeError, match="meta"):
        scaler.step(opts[0])  # the step decision is the one sync


def test_fallback_path_gives_same_training(monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs: dict[str, Any] = {"init_scale": 2.0**12, "growth_interval": 7}
    m1, _, s1 = run_training(LossScaler(**kwargs), [ADAM], steps=60, seed=5, clip=True)
    calls = {"n": 0}
    real = _compat.non_finite_check_and_unscale_

    def forced(grads: list[torch.Tensor], found: torch.Tensor, inv: torch.Tensor, *, impl: str = "auto") -> bool:
        calls["n"] += 1
        return real(grads, found, inv, impl="fallback")

    monkeypatch.setattr(_compat, "non_finite_check_and_unscale_", forced)
    m2, _, s2 = run_training(LossScaler(**kwargs), [ADAM], steps=60, seed=5, clip=True)
    assert calls["n"] >= 60
    assert s1 == s2 and all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------------
# _compat: fused and fallback agree


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("inv", [2.0**-16, 1.0, 0.3, 1024.0])
@pytest.mark.parametrize("bad", [None, INF, -INF, NAN])
def test_compat_unscale_paths_agree(dtype: torch.dtype, inv: float, bad: float | None) -> None:
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(n, generator=gen).to(dtype) * 1e3 for n in (1, 7, 300)]
    base.append(torch.full((5,), 3e38).to(dtype))  # finite values that overflow after inv=1024
    if bad is not None:
        base[1][3] = bad
    out = {}
    for impl in ("fused", "fallback"):
        grads = [b.clone() for b in base]
        found = torch.zeros(())
        reduced = _compat.non_finite_check_and_unscale_(grads, found, torch.tensor(inv), impl=impl)  # type: ignore[arg-type]
        assert reduced is False
        out[impl] = (found.item(), grads)
    assert out["fused"][0] == out["fallback"][0] == (0.0 if bad is None else 1.0)
    assert tensors_equal(out["fused"][1], out["fallback"][1])


def test_compat_found_inf_is_sticky() -> None:
    for impl in ("fused", "fallback"):
        found = torch.ones(())
        _compat.non_finite_check_and_unscale_([torch.ones(3)], found, torch.tensor(0.5), impl=impl)  # type: ignore[arg-type]
        assert found.item() == 1.0
        assert _compat.non_finite_check_and_unscale_([], found, torch.tensor(0.5), impl=impl) is False  # type: ignore[arg-type]


def test_compat_sparse_values() -> None:
    s = torch.sparse_coo_tensor(torch.tensor([[0, 0, 2]]), torch.tensor([1.0, 2.0, 3.0]), (4,), check_invariants=True)
    assert _compat.sparse_values(s).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="coalesced"):
        _compat.sparse_values(s, impl="fallback")
    c = s.coalesce()
    v = _compat.sparse_values(c, impl="fallback")
    v.mul_(2)
    assert c.to_dense().tolist() == [6.0, 0.0, 6.0, 0.0]
    with pytest.raises(ValueError, match="impl"):
        _compat.sparse_values(c, impl="magic")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def non_default_scaler() -> LossScaler:
    return LossScaler(
        init_scale=2.0**10,
        growth_factor=4.0,
        backoff_factor=0.25,
        growth_interval=5,
        hysteresis=3,
        consecutive_hysteresis=True,
        min_scale=2.0**-3,
        max_scale=2.0**20,
        max_consecutive_skips=50,
    )


def test_state_dict_round_trip_every_field_non_default() -> None:
    scaler = non_default_scaler()
    model = make_model()
    opt = SGD_M(list(model.parameters()))
    for bad in [1, 1, 1, 0, 0, 1, 0, 1]:
        one_step(model, scaler, opt, (0, INF) if bad else None)
    sd = scaler.state_dict()
    # No reachable state has both consecutive_skips > 0 and growth_tracker > 0: set one by hand.
    sd["state"] = {
        "scale": 3.0,
        "growth_tracker": 3,
        "hysteresis_tracker": 1,
        "consecutive_skips": 4,
        "skipped_steps": 2**40,
        "steps": 2**41,
    }
    sd["scale"], sd["_growth_tracker"] = 3.0, 3  # GradScaler's view of the state must agree with it
    scaler.load_state_dict(sd)
    assert scaler.state_dict() == sd
    cfg_defaults = {f.name: f.default for f in dataclasses.fields(DynamicScaling)}
    for name, value in sd["config"].items():
        if name != "kind":
            assert value != cfg_defaults[name], name
    st_defaults = dataclasses.asdict(PyScalingState(scale=2.0**10, hysteresis_tracker=2))  # the initial state
    for name, value in sd["state"].items():
        assert value != st_defaults[name], name
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = LossScaler()
    with pytest.warns(UserWarning, match="overrides") as rec:
        fresh.load_state_dict(loaded)
    assert len(rec) == 1
    for name in ("growth_factor", "backoff_factor", "growth_interval", "hysteresis 1 -> 3", "min_scale"):
        assert name in str(rec[0].message)
    assert fresh.state_dict() == sd
    assert fresh.config == scaler.config
    # Also into a scaler whose state tensors already exist.
    used = non_default_scaler()
    used.scale(torch.ones(()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same settings: no warning
        used.load_state_dict(loaded)
    assert used.state_dict() == sd and used.state.scale.item() == sd["state"]["scale"]


def test_mid_run_resume_is_bit_exact() -> None:
    kwargs: dict[str, Any] = {"init_scale": 2.0**12, "growth_interval": 4, "hysteresis": 2}
    rng = random.Random(7)
    plan = [rng.random() < 0.3 for _ in range(60)]
    xs = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(60)]

    def train(model: nn.Module, opt: torch.optim.Optimizer, scaler: LossScaler, steps: range) -> None:
        for t in steps:
            opt.zero_grad()
            scaler.scale(model(xs[t]).square().mean()).backward()
            if plan[t]:
                next(iter(model.parameters())).grad.view(-1)[t % 5] = NAN  # type: ignore[union-attr]
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()

    model, scaler = make_model(), LossScaler(**kwargs)
    opt = ADAM(list(model.parameters()))
    train(model, opt, scaler, range(60))

    model_a, scaler_a = make_model(), LossScaler(**kwargs)
    opt_a = ADAM(list(model_a.parameters()))
    train(model_a, opt_a, scaler_a, range(30))
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "scaler": scaler_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b, scaler_b = make_model(seed=99), LossScaler(**kwargs)
    opt_b = ADAM(list(model_b.parameters()))
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    scaler_b.load_state_dict(ckpt["scaler"])
    train(model_b, opt_b, scaler_b, range(30, 60))
    assert scaler_b.state_dict() == scaler.state_dict()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_b.parameters(), strict=True))
    # Negative control: resuming without the scaler state diverges.
    model_c, scaler_c = make_model(), LossScaler(**kwargs)
    opt_c = ADAM(list(model_c.parameters()))
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    train(model_c, opt_c, scaler_c, range(30, 60))
    assert scaler_c.state_dict() != scaler.state_dict()


def test_loads_torch_grad_scaler_state_dict() -> None:
    kwargs: dict[str, Any] = {"init_scale": 2.0**12, "growth_factor": 3.0, "backoff_factor": 0.25, "growth_interval": 7}
    ref = torch.amp.GradScaler("cpu", **kwargs)
    model_t, opts_t, _ = run_training(ref, [SGD_M], steps=25, seed=2)
    sd = ref.state_dict()
    ours = LossScaler()
    with pytest.warns(UserWarning, match="overrides") as rec:
        ours.load_state_dict(sd)
    assert len(rec) == 1
    assert str(rec[0].message).endswith(
        "growth_factor 2.0 -> 3.0, backoff_factor 0.5 -> 0.25, growth_interval 2000 -> 7"
    )
    assert ours.get_scale() == sd["scale"] and ours._get_growth_tracker() == sd["_growth_tracker"]
    assert (ours.get_growth_factor(), ours.get_backoff_factor(), ours.get_growth_interval()) == (3.0, 0.25, 7)
    # Continue both in lockstep: identical scales.
    model_o = copy.deepcopy(model_t)
    opt_o = SGD_M(list(model_o.parameters()))
    opt_o.load_state_dict(copy.deepcopy(opts_t[0].state_dict()))  # no shared momentum buffers
    for t in range(30):
        for m, o, s in ((model_t, opts_t[0], ref), (model_o, opt_o, ours)):
            o.zero_grad()
            s.scale(m(torch.ones(2, 6) * t).sum()).backward()
            if t % 6 == 0:
                next(iter(m.parameters())).grad.view(-1)[0] = INF  # type: ignore[union-attr]
            s.step(o)
            s.update()
        assert ours.get_scale() == ref.get_scale()
    assert all(torch.equal(p, q) for p, q in zip(model_t.parameters(), model_o.parameters(), strict=True))


def test_pickle_round_trip() -> None:
    scaler = non_default_scaler()
    model = make_model()
    opt = SGD_M(list(model.parameters()))
    one_step(model, scaler, opt, (0, INF))
    clone = pickle.loads(pickle.dumps(scaler))
    assert clone.state_dict() == scaler.state_dict()


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error and the scaler unchanged


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"growth_factor": 1.0}, ValueError, "growth_factor"),
        ({"backoff_factor": 1.5}, ValueError, "backoff_factor"),
        ({"backoff_factor": 0.0}, ValueError, "backoff_factor"),
        ({"growth_interval": 0}, ValueError, "growth_interval"),
        ({"hysteresis": 0}, ValueError, "hysteresis"),
        ({"init_scale": math.inf}, ValueError, "init_scale"),
        ({"init_scale": -2.0}, ValueError, "init_scale"),
        ({"min_scale": 8.0, "max_scale": 4.0, "init_scale": 6.0}, ValueError, "min_scale"),
        ({"init_scale": 2.0**20, "max_scale": 2.0**10}, ValueError, "init_scale"),
        ({"init_scale": "big"}, TypeError, "init_scale"),
        ({"enabled": 1}, TypeError, "enabled"),
        ({"dynamic": "no"}, TypeError, "dynamic"),
        ({"dynamic": False, "growth_factor": 0.5}, ValueError, "growth_factor"),
        ({"dynamic": False, "min_scale": 1.0}, ValueError, "min_scale"),
        ({"device": 3}, TypeError, "device"),
        ({"on_skip": "print"}, TypeError, "on_skip"),
        ({"max_consecutive_skips": -1}, ValueError, "max_consecutive_skips"),
    ],
)
def test_constructor_rejects(kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        LossScaler(**kwargs)


def started_scaler() -> tuple[LossScaler, nn.Module, torch.optim.Optimizer]:
    model = make_model()
    opt = SGD_M(list(model.parameters()))
    scaler = non_default_scaler()
    one_step(model, scaler, opt, (0, INF))
    one_step(model, scaler, opt, None)
    return scaler, model, opt


@pytest.mark.parametrize(
    ("setter", "value", "exc"),
    [
        ("set_growth_factor", 0.5, ValueError),
        ("set_growth_factor", "2", TypeError),
        ("set_backoff_factor", 1.5, ValueError),
        ("set_backoff_factor", 0.0, ValueError),
        ("set_growth_interval", 0, ValueError),
        ("set_growth_interval", 2.5, TypeError),
    ],
)
def test_setters_reject_and_leave_unchanged(setter: str, value: Any, exc: type[Exception]) -> None:
    scaler, _, _ = started_scaler()
    sd = scaler.state_dict()
    with pytest.raises(exc, match=setter.removeprefix("set_")):
        getattr(scaler, setter)(value)
    assert scaler.state_dict() == sd


def test_setters_apply() -> None:
    scaler, model, opt = started_scaler()
    scaler.set_growth_factor(8.0)
    scaler.set_backoff_factor(0.125)
    assert (scaler.get_growth_factor(), scaler.get_backoff_factor()) == (8.0, 0.125)
    # Lowering the interval below the tracker: grows at the next finite step.
    assert scaler._get_growth_tracker() == 1
    scale = scaler.get_scale()
    scaler.set_growth_interval(1)
    one_step(model, scaler, opt, None)
    assert scaler.get_scale() == scale * 8.0


def test_unscale_twice_raises_and_leaves_grads() -> None:
    scaler, model, opt = started_scaler()
    opt.zero_grad()
    scaler.scale(model(torch.ones(2, 6)).sum()).backward()
    scaler.unscale_(opt)
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        scaler.unscale_(opt)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(opt)
    scaler.update()


def test_call_order_errors() -> None:
    model = make_model()
    opt = SGD_M(list(model.parameters()))
    scaler = LossScaler()
    for call in (lambda: scaler.unscale_(opt), lambda: scaler.step(opt), scaler.update):
        with pytest.raises(RuntimeError, match="before scale"):
            call()
    scaler.scale(torch.ones(()))
    with pytest.raises(RuntimeError, match="No inf checks were recorded prior to update"):
        scaler.update()
    with pytest.raises(RuntimeError, match="[Cc]losure"):
        scaler.step(opt, closure=lambda: 0.0)
    with pytest.raises(TypeError, match="Optimizer"):
        scaler.unscale_(object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "exc"),
    [
        (math.inf, ValueError),
        (0.0, ValueError),
        (-1.0, ValueError),
        ("8", TypeError),
        (True, TypeError),
        (torch.tensor([1.0, 2.0]), TypeError),
        (torch.tensor(math.nan), ValueError),
        (torch.tensor(2.0, requires_grad=True), TypeError),
        # Finite in FP64 but not an FP32 scale: 1e39 would overflow the FP32 scale tensor, 1e-50 flush to 0.
        (1e39, ValueError),
        (1e-50, ValueError),
        (torch.tensor(1e39, dtype=torch.float64), ValueError),
    ],
)
def test_update_new_scale_rejects(value: Any, exc: type[Exception]) -> None:
    scaler, model, opt = started_scaler()
    sd = scaler.state_dict()
    with pytest.raises(exc, match="new_scale"):
        scaler.update(value)
    assert scaler.state_dict() == sd


def test_update_new_scale() -> None:
    scaler, model, opt = started_scaler()
    scaler.update(512.0)
    assert scaler.get_scale() == 512.0
    scaler.update(torch.tensor(3.0, dtype=torch.float64))
    assert scaler.get_scale() == 3.0
    skipped = scaler.skipped_steps
    opt.zero_grad()
    scaler.scale(model(torch.ones(2, 6)).sum()).backward()
    next(iter(model.parameters())).grad.view(-1)[0] = NAN  # type: ignore[union-attr]
    scaler.step(opt)
    scaler.update(7.0)  # overrides the backoff, still counts the skip
    assert scaler.get_scale() == 7.0 and scaler.skipped_steps == skipped + 1


def _bad_state_dicts() -> list[tuple[str, Callable[[dict[str, Any]], Any], type[Exception], str]]:
    def edit(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], Any]:
        def f(sd: dict[str, Any]) -> Any:
            sd = copy.deepcopy(sd)
            d = sd
            for k in path[:-1]:
                d = d[k]
            if value is KeyError:
                del d[path[-1]]
            else:
                d[path[-1]] = value
            return sd

        return f

    return [
        ("not-a-dict", lambda sd: [1, 2], TypeError, "dict"),
        ("empty", lambda sd: {}, RuntimeError, "empty"),
        ("version", edit(("version",), 99), ValueError, "version"),
        ("format", edit(("format",), "other"), ValueError, "format"),
        ("extra-key", edit(("extra",), 1), ValueError, "keys"),
        ("kind", edit(("config", "kind"), "adaptive"), ValueError, "kind"),
        ("kind-unhashable", edit(("config", "kind"), ["dynamic"]), ValueError, "kind"),
        ("config-value", edit(("config", "growth_factor"), 0.5), ValueError, "growth_factor"),
        ("config-missing", edit(("config", "hysteresis"), KeyError), ValueError, "hysteresis"),
        ("state-missing", edit(("state", "steps"), KeyError), ValueError, "steps"),
        ("state-scale", edit(("state", "scale"), math.nan), ValueError, "scale"),
        # Finite, but overflows the FP32 scale tensor (else scale() fails later, deep inside torch).
        ("state-scale-fp32", edit(("state", "scale"), 1e39), ValueError, "scale"),
        ("state-type", edit(("state", "skipped_steps"), 1.5), TypeError, "skipped_steps"),
        ("tracker-range", edit(("state", "growth_tracker"), 5), ValueError, "growth_tracker"),
        ("hysteresis-range", edit(("state", "hysteresis_tracker"), 3), ValueError, "hysteresis_tracker"),
        ("torch-missing", lambda sd: {"scale": 1.0, "growth_factor": 2.0}, ValueError, "_growth_tracker"),
        (
            "torch-bad-factor",
            lambda sd: {
                "scale": 1.0,
                "growth_factor": 2.0,
                "backoff_factor": 2.0,
                "growth_interval": 5,
                "_growth_tracker": 0,
            },
            ValueError,
            "backoff_factor",
        ),
        (
            "torch-bad-scale",
            lambda sd: {
                "scale": "x",
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 5,
                "_growth_tracker": 0,
            },
            TypeError,
            "scale",
        ),
        (
            "torch-scale-fp32",
            lambda sd: {
                "scale": 1e39,
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 5,
                "_growth_tracker": 0,
            },
            ValueError,
            "scale",
        ),
    ]


@pytest.mark.parametrize(
    ("name", "make", "exc", "match"), _bad_state_dicts(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_malformed_state_dict_rejected_scaler_unchanged(
    name: str, make: Callable[[dict[str, Any]], Any], exc: type[Exception], match: str
) -> None:
    scaler, _, _ = started_scaler()
    sd = scaler.state_dict()
    with pytest.raises(exc, match=match):
        scaler.load_state_dict(make(sd))
    assert scaler.state_dict() == sd


def test_static_scaler_refuses_torch_state_dict() -> None:
    scaler = LossScaler(dynamic=False, init_scale=8.0)
    with pytest.raises(ValueError, match="static"):
        scaler.load_state_dict(torch.amp.GradScaler("cpu").state_dict())
    assert scaler.get_scale() == 8.0


def test_doctests() -> None:
    result = doctest.testmod(scaler_mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_static_config_via_from_config() -> None:
    scaler = LossScaler.from_config(StaticScaling(32.0, max_consecutive_skips=1))
    assert scaler.get_scale() == 32.0 and scaler.is_enabled()
    with pytest.raises(TypeError):
        LossScaler.from_config("dynamic")  # type: ignore[arg-type]


def test_compat_routes_cuda_bf16_to_fallback() -> None:
    """torch's CUDA kernel rejects BF16 (pytorch#127176): auto must pick the fallback there, not on CPU."""
    from types import SimpleNamespace

    def fake(dtype: torch.dtype, device: str) -> Any:
        return SimpleNamespace(dtype=dtype, device=torch.device(device))

    assert _compat._fused_accepts([fake(torch.bfloat16, "cuda")]) is False
    assert _compat._fused_accepts([fake(torch.bfloat16, "cpu")]) is True
    assert _compat._fused_accepts([fake(torch.float32, "cuda")]) is True
    assert _compat._fused_accepts([fake(torch.float16, "cuda")]) is True


@settings(max_examples=25, deadline=None)
@given(
    hysteresis=st.integers(1, 3),
    consecutive=st.booleans(),
    clamps=st.sampled_from([(None, None), (2.0**6, None), (None, 2.0**11), (2.0**7, 2.0**10)]),
    flags=st.lists(st.booleans(), min_size=1, max_size=30),
)
def test_shell_follows_python_twin(
    hysteresis: int, consecutive: bool, clamps: tuple[float | None, float | None], flags: list[bool]
) -> None:
    """Through scale/backward/step/update, the state after each iteration is the Python twin's."""
    cfg = DynamicScaling(
        init_scale=2.0**8,
        growth_interval=2,
        hysteresis=hysteresis,
        consecutive_hysteresis=consecutive,
        min_scale=clamps[0],
        max_scale=clamps[1],
    )
    scaler = LossScaler.from_config(cfg)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    twin = init_state_py(cfg)
    for bad in flags:
        one_step(model, scaler, opt, (1, NAN) if bad else None)
        twin = update_scale_py(twin, bad, cfg)
        assert scaler.state_dict()["state"] == dataclasses.asdict(twin)


# ---------------------------------------------------------------------------------------------------------
# Per-optimizer records: keyed by id (GradScaler's view), owned weakly


def test_freed_optimizer_id_reused_by_a_new_one_inherits_nothing() -> None:
    """An optimizer that overflowed and stepped, then was freed before update(): a new optimizer at the same
    id starts fresh (GradScaler would raise "step() has already been called" or use the freed one's flags),
    and the freed one's overflow still counts at update(), as GradScaler counts it."""
    model = make_model()
    params = list(model.parameters())
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    scaler = LossScaler(init_scale=2.0**10)
    old = torch.optim.SGD(params, lr=0.1)
    scaler.scale(model(x).square().sum()).backward()
    params[0].grad[0, 0] = INF  # type: ignore[index]
    scaler.step(old)
    assert scaler.last_step_skipped is True
    owner = weakref.ref(old)
    old_id = id(old)
    del old
    gc.collect()
    assert owner() is None  # the scaler did not keep it alive
    new = sgd_reusing_id(old_id, params)
    if new is None:
        pytest.skip("CPython did not reuse the freed optimizer's address")
    assert id(new) == old_id
    for p in params:
        p.grad = None
    scaler.scale(model(x).square().sum()).backward()
    before = [p.detach().clone() for p in params]
    scaler.step(new)  # its own record: READY, its own (finite) gradients
    assert scaler.last_step_skipped is False
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
    assert scaler._per_optimizer_states[id(new)]["stage"] is _compat.OptState.STEPPED  # GradScaler's view, by id
    scaler.update()
    assert scaler.get_scale() == 2.0**9 and scaler.skipped_steps == 1  # the freed one's overflow counted
    # The next iteration: the new optimizer alone, finite, no stale record left.
    scaler.scale(model(x).square().sum()).backward()
    scaler.step(new)
    scaler.update()
    assert scaler.last_step_skipped is False and scaler.get_scale() == 2.0**9 and scaler.consecutive_skips == 0


def test_per_optimizer_records_hold_no_optimizer_alive() -> None:
    """Between step and update the scaler holds its optimizers weakly; a pickled scaler is unaffected."""
    model = make_model()
    scaler = LossScaler()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = weakref.ref(opt)
    scaler.scale(model(torch.ones(2, 6)).sum()).backward()
    scaler.step(opt)
    del opt
    gc.collect()
    assert ref() is None
    scaler.update()
    assert pickle.loads(pickle.dumps(scaler)).get_scale() == scaler.get_scale()
