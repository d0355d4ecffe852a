"""LossScaler as a torch.amp.GradScaler: private internals, the amp-scaling optimizer protocol, exception types,
checkpoints both ways, the scale floor, skip forensics. The oracle is torch.amp.GradScaler("cpu") run in
lockstep; where GradScaler writes inf into the weights, it is the negative control."""

from __future__ import annotations

import copy
import io
import math
import pickle
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from lossscale import LossScaler
from lossscale.scaler import (
    NonFiniteGrad,
    ScalerTypeError,
    ScalerUsageError,
    ScalerValueError,
    SkipEvent,
    SkipWarning,
    StateDictKeyError,
)
from lossscale.scaling import SCALE_FLOOR

INF, NAN = math.inf, math.nan


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def params_equal(m1: nn.Module, m2: nn.Module) -> bool:
    return all(bits_equal(p.detach(), q.detach()) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))


def finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train_step(
    model: nn.Module,
    scaler: Any,
    opt: torch.optim.Optimizer,
    inject: tuple[int, float] | None = None,
    *,
    x: torch.Tensor | None = None,
) -> None:
    opt.zero_grad()
    loss = model(torch.ones(3, 6) if x is None else x).square().mean()
    scaler.scale(loss).backward()
    if inject is not None:
        i, v = inject
        list(model.parameters())[i].grad.view(-1)[-1] = v  # type: ignore[union-attr]
    scaler.step(opt)
    scaler.update()


# ---------------------------------------------------------------------------------------------------------
# A GradScaler: type, private attributes and methods with GradScaler's meaning


def test_is_a_grad_scaler() -> None:
    assert isinstance(LossScaler(), torch.amp.GradScaler)
    assert isinstance(LossScaler(enabled=False), torch.amp.GradScaler)


def test_private_attributes_match_grad_scaler_in_lockstep() -> None:
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    ours = LossScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for s in (ref, ours):
        assert s._scale is None and s._growth_tracker is None
        assert s._init_scale == 2.0**10 and s._init_growth_tracker == 0
        assert (s._growth_factor, s._backoff_factor, s._growth_interval) == (2.0, 0.5, 3)
        assert s._device == "cpu"
    models = [make_model(), make_model()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for t, inject in enumerate([None, (0, INF), None, None, None, (2, NAN), None]):
        states = []
        for m, o, s in zip(models, opts, (ref, ours), strict=True):
            o.zero_grad()
            s.scale(m(torch.ones(3, 6) * t).square().mean()).backward()
            if inject is not None:
                list(m.parameters())[inject[0]].grad.view(-1)[0] = inject[1]  # type: ignore[union-attr]
            s.unscale_(o)
            per_opt = s._per_optimizer_states[id(o)]
            assert per_opt["stage"] is torch.amp.grad_scaler.OptState.UNSCALED
            found = s._found_inf_per_device(o)
            assert list(found) == [torch.device("cpu")]
            states.append(float(found[torch.device("cpu")]))
            s.step(o)
            assert per_opt["stage"] is torch.amp.grad_scaler.OptState.STEPPED
            s.update()
            assert isinstance(s._per_optimizer_states, dict) and len(s._per_optimizer_states) == 0
        assert states[0] == states[1] == (0.0 if inject is None else 1.0)
        assert ref._scale is not None and ours._scale is not None
        assert bits_equal(ref._scale, ours._scale) and ours._scale.shape == ()
        assert ref._growth_tracker is not None and ours._growth_tracker is not None
        assert ours._growth_tracker.dtype == torch.int32 and torch.equal(ref._growth_tracker, ours._growth_tracker)
        assert params_equal(*models)
    # Setting GradScaler's attributes goes through to the rule.
    for s in (ref, ours):
        s._growth_factor = 4.0
        s._backoff_factor = 0.25
        s._growth_interval = 5
        assert (s.get_growth_factor(), s.get_backoff_factor(), s.get_growth_interval()) == (4.0, 0.25, 5)


def test_check_inf_per_device_and_unscale_grads_match() -> None:
    results = []
    for cls in (torch.amp.GradScaler, LossScaler):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        s = cls("cpu", init_scale=8.0)
        s.scale(model(torch.ones(3, 6)).sum()).backward()
        model[0].bias.grad[3] = INF  # type: ignore[index]
        found = s._check_inf_per_device(opt)  # checks without unscaling
        grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
        inv = torch.full((), 0.125)
        per_device = s._unscale_grads_(opt, inv, torch.zeros(()), False)
        results.append((float(found[torch.device("cpu")]), grads, float(per_device[torch.device("cpu")])))
        results.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
    (f0, g0, u0), after0, (f1, g1, u1), after1 = results  # type: ignore[misc]
    assert f0 == f1 == 1.0 and u0 == u1 == 1.0
    assert all(bits_equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert all(bits_equal(a, b) for a, b in zip(after0, after1, strict=True))  # type: ignore[arg-type]


def test_accelerate_style_lazy_init_then_load() -> None:
    """accelerate's FSDP2 loading: ``scaler._lazy_init_scale_growth_tracker(scaler._device)``, then load."""
    src = torch.amp.GradScaler("cpu", init_scale=2.0**5, growth_interval=4)
    sd = src.state_dict()
    results = []
    for cls in (torch.amp.GradScaler, LossScaler):
        s = cls("cpu", growth_interval=4)
        s._lazy_init_scale_growth_tracker(s._device)
        with pytest.raises(AssertionError):
            s._lazy_init_scale_growth_tracker(s._device)  # twice: GradScaler's AssertionError
        s.load_state_dict(sd)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for inject in [None, (1, INF), None]:
            train_step(model, s, opt, inject)
        results.append((s.get_scale(), s._get_growth_tracker(), [p.detach().clone() for p in model.parameters()]))
    assert results[0][:2] == results[1][:2] == (16.0, 1)
    assert all(bits_equal(a, b) for a, b in zip(results[0][2], results[1][2], strict=True))


# ---------------------------------------------------------------------------------------------------------
# The _step_supports_amp_scaling protocol


class KwargSGD(torch.optim.Optimizer):
    """An optimizer written to GradScaler's deprecated ``grad_scaler=`` protocol: it unscales and skips itself."""

    _step_supports_amp_scaling = True

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None, grad_scaler: Any = None) -> None:  # type: ignore[override]
        inv = None
        if grad_scaler is not None:
            found = grad_scaler._check_inf_per_device(self)
            if sum(v.item() for v in found.values()):
                return
            inv = grad_scaler._get_scale_async().double().reciprocal().float()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad if inv is None else p.grad * inv
                    p.add_(g, alpha=-group["lr"])


class AttrSGD(torch.optim.Optimizer):
    """An optimizer of the newer protocol: reads ``self.grad_scale`` and ``self.found_inf`` in its step."""

    _step_supports_amp_scaling = True

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if grad_scale is None else p.grad / grad_scale
                step = torch.where(found_inf > 0, torch.zeros_like(g), g) if found_inf is not None else g
                p.add_(step, alpha=-group["lr"])


def test_issue_example_grad_scaler_kwarg() -> None:
    """The issue's numbers: GradScaler gives [-0.1, -0.2, -0.3]; LossScaler gave [-inf, -409.6, -614.4]."""
    out = []
    for cls in (torch.amp.GradScaler, LossScaler):
        w = nn.Parameter(torch.zeros(3))
        opt = KwargSGD([w], lr=0.1)
        s = cls("cpu", init_scale=1024.0)
        with pytest.warns(FutureWarning, match="GradScaler is going to stop passing itself"):
            s.scale((w * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
            s.step(opt)
        s.update()
        out.append(w.detach().clone())
    assert out[0].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert bits_equal(out[0], out[1])


@pytest.mark.parametrize(
    ("opt_cls", "unscale_first"),
    [(KwargSGD, False), (AttrSGD, False), (AttrSGD, True), (torch.optim.Adam, False), (torch.optim.Adam, True)],
    ids=["kwarg", "attrs", "attrs-unscale-first", "fused-adam", "fused-adam-unscale-first"],
)
def test_amp_scaling_protocol_bit_identical(opt_cls: Any, unscale_first: bool) -> None:
    # (A grad_scaler= optimizer unscales itself: unscale_ before its step would unscale twice, with either.)
    runs = []
    for cls in (torch.amp.GradScaler, LossScaler):
        model = make_model()
        if opt_cls is torch.optim.Adam:
            opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
        else:
            opt = opt_cls(model.parameters(), lr=0.05)
        s = cls("cpu", init_scale=2.0**12, growth_interval=2)
        skipped = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t, inject in enumerate([None, (0, INF), None, None, (3, NAN), None]):
                opt.zero_grad()
                s.scale(model(torch.ones(3, 6) * (t + 1)).square().mean()).backward()
                if inject is not None:
                    list(model.parameters())[inject[0]].grad.view(-1)[1] = inject[1]  # type: ignore[union-attr]
                if unscale_first:
                    s.unscale_(opt)
                s.step(opt)
                if isinstance(s, LossScaler):
                    skipped.append(s.last_step_skipped)
                s.update()
        kinds = sorted({(w.category.__name__, str(w.message)) for w in caught})
        runs.append((model, s.get_scale(), skipped, kinds))
    (m0, scale0, _, warn0), (m1, scale1, skipped1, warn1) = runs
    assert params_equal(m0, m1) and finite(m1)
    assert scale0 == scale1
    assert warn0 == warn1  # the same FutureWarning (or none)
    assert skipped1 == [False, True, False, False, True, False]


def test_amp_protocol_forensics_name_the_culprit() -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    s = LossScaler(init_scale=8.0)
    s.watch(model)
    train_step(model, s, opt, (3, NAN))
    assert s.last_step_skipped is True and s.last_skip is not None
    assert s.last_skip.culprits == (NonFiniteGrad("2.bias", (4,), 4, 0, 0, 1),)


# ---------------------------------------------------------------------------------------------------------
# Exception types: ours is an instance of GradScaler's


def _no_grad_step(s: Any) -> None:
    model = make_model()
    unused = nn.Linear(2, 2)
    s.scale(model(torch.ones(3, 6)).sum()).backward()
    s.step(torch.optim.SGD(unused.parameters(), lr=0.1))


def _update_without_step(s: Any) -> None:
    s.scale(torch.ones(()))
    s.update()


def _unscale_twice(s: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s.scale(model(torch.ones(3, 6)).sum()).backward()
    s.unscale_(opt)
    s.unscale_(opt)


def _step_twice(s: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s.scale(model(torch.ones(3, 6)).sum()).backward()
    s.step(opt)
    s.step(opt)


def _closure(s: Any) -> None:
    model = make_model()
    s.scale(model(torch.ones(3, 6)).sum()).backward()
    s.step(torch.optim.SGD(model.parameters(), lr=0.1), closure=lambda: 0.0)


def _fp16_unscale(s: Any) -> None:
    p = nn.Parameter(torch.ones(3, dtype=torch.float16))
    p.grad = torch.ones(3, dtype=torch.float16)
    s.scale(torch.ones(()))
    s.unscale_(torch.optim.SGD([p], lr=0.1))


def _pickle_mid_iteration(s: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s.scale(model(torch.ones(3, 6)).sum()).backward()
    s.unscale_(opt)
    pickle.dumps(s)


def _bad_new_scale(s: Any) -> None:
    _update_with = torch.tensor([1.0, 2.0])
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s.scale(model(torch.ones(3, 6)).sum()).backward()
    s.step(opt)
    s.update(_update_with)


ERROR_CASES: list[tuple[str, Callable[[Any], Any], str]] = [
    ("step-without-grads", _no_grad_step, "No inf checks were recorded for this optimizer."),
    ("update-without-step", _update_without_step, "No inf checks were recorded prior to update"),
    ("unscale-before-scale", lambda s: s.unscale_(torch.optim.SGD(make_model().parameters(), lr=0.1)), "_scale"),
    ("step-before-scale", lambda s: s.step(torch.optim.SGD(make_model().parameters(), lr=0.1)), "_scale"),
    ("update-before-scale", lambda s: s.update(), "_scale"),
    ("unscale-twice", _unscale_twice, "already been called"),
    ("step-twice", _step_twice, "already been called"),
    ("closure", _closure, "Closure"),
    ("fp16-grads", _fp16_unscale, "FP16 gradients"),
    ("pickle-mid-iteration", _pickle_mid_iteration, "pickled"),
    ("scale-non-tensor", lambda s: s.scale([torch.ones(()), 4.0]), ""),
    ("new-scale-2-elements", _bad_new_scale, "new_scale"),
    ("load-empty", lambda s: s.load_state_dict({}), "empty"),
    ("load-missing-key", lambda s: s.load_state_dict({"scale": 1.0}), ""),
]


@pytest.mark.parametrize(("name", "call", "match"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_exception_types_are_grad_scalers(name: str, call: Callable[[Any], Any], match: str) -> None:
    with pytest.raises(Exception) as ref_info:
        call(torch.amp.GradScaler("cpu"))
    ref_type = type(ref_info.value)
    with pytest.raises(ref_type) as ours_info:
        call(LossScaler())
    assert match in str(ours_info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"growth_factor": 1.0}, "growth_factor"), ({"backoff_factor": 1.0}, "backoff_factor")]
)
def test_constructor_refusals_are_grad_scalers(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(AssertionError):
        torch.amp.GradScaler("cpu", **kwargs)
    with pytest.raises(ScalerValueError, match=match) as info:
        LossScaler(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, AssertionError) and isinstance(info.value, ValueError)


def test_exception_classes_derive_from_both() -> None:
    assert issubclass(ScalerUsageError, RuntimeError) and issubclass(ScalerUsageError, AssertionError)
    assert issubclass(ScalerTypeError, TypeError) and issubclass(ScalerTypeError, ValueError)
    assert issubclass(StateDictKeyError, KeyError) and issubclass(StateDictKeyError, ValueError)
    assert str(StateDictKeyError("no key 'scale'")) == "no key 'scale'"


def test_frozen_scale_via_setters_like_grad_scaler() -> None:
    """growth_factor = backoff_factor = 1.0: a frozen scale, accepted by both through the setters."""
    runs = []
    for cls in (torch.amp.GradScaler, LossScaler):
        s = cls("cpu", init_scale=64.0, growth_interval=1)
        s.set_growth_factor(1.0)
        s.set_backoff_factor(1.0)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scales = []
        for inject in [None, (0, INF), None, (1, NAN), None]:
            train_step(model, s, opt, inject)
            scales.append(s.get_scale())
        runs.append((scales, model))
    assert runs[0][0] == runs[1][0] == [64.0] * 5
    assert params_equal(runs[0][1], runs[1][1])


def test_device_nonsense_is_a_value_error() -> None:
    """Issue 15, point 8: an unknown device is bad input, not a RuntimeError from deep in torch."""
    with pytest.raises(ValueError, match="device.*'nonsense'"):
        LossScaler(device="nonsense")
    with pytest.raises(TypeError, match="device"):
        LossScaler(device=3)  # type: ignore[arg-type]
    assert LossScaler(device="cpu")._device == "cpu"


# ---------------------------------------------------------------------------------------------------------
# Deliberate differences (docs/scaler.md, "Deliberate differences")


def test_difference_device_default_is_the_loss_device() -> None:
    s = LossScaler()
    assert s._device is None
    s.scale(torch.ones((), device="meta"))
    assert s._scale is not None and s._scale.device.type == "meta" and s._device == "meta"
    with pytest.warns(UserWarning, match="CUDA is not available"):
        assert torch.amp.GradScaler()._device == "cuda"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"growth_interval": 0}, "growth_interval"),
        ({"backoff_factor": 0.0}, "backoff_factor"),
        ({"init_scale": INF}, "init_scale"),
        ({"init_scale": NAN}, "init_scale"),
        ({"growth_interval": 2**63}, "growth_interval"),
        ({"hysteresis": 2**40}, "hysteresis"),
        ({"hysteresis": 2**64}, "hysteresis"),
        ({"warn_after_skips": 0}, "warn_after_skips"),
    ],
)
def test_difference_meaningless_or_unholdable_values_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LossScaler(**kwargs)


def test_difference_lowered_growth_interval_grows_at_next_finite_step() -> None:
    traj = []
    for cls in (torch.amp.GradScaler, LossScaler):
        s = cls("cpu", init_scale=4.0, growth_interval=10)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(5):
            train_step(model, s, opt)
        s.set_growth_interval(3)
        scales = []
        for _ in range(4):
            train_step(model, s, opt)
            scales.append(s.get_scale())
        traj.append(scales)
    assert traj[0] == [4.0, 4.0, 4.0, 4.0]  # GradScaler tests tracker == interval: never again
    assert traj[1] == [8.0, 8.0, 8.0, 16.0]


def test_difference_update_new_scale_counts_skips() -> None:
    s = LossScaler(init_scale=64.0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    s.scale(model(torch.ones(3, 6)).sum()).backward()
    model[0].weight.grad[0, 0] = INF  # type: ignore[index]
    s.step(opt)
    s.update(new_scale=16.0)
    assert s.get_scale() == 16.0 and s.skipped_steps == 1 and s.consecutive_skips == 1


# ---------------------------------------------------------------------------------------------------------
# Never inf in the weights


def _floor_case(name: str, cls: Any) -> Any:
    if name == "init-2^-128":
        return cls("cpu", init_scale=2.0**-128)
    if name == "init-2^-149":
        return cls("cpu", init_scale=2.0**-149)
    s = cls("cpu", init_scale=1024.0)
    if name == "checkpoint-2^-140":
        sd = {"scale": 2.0**-140, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 0}  # fmt: skip
        s.load_state_dict(sd)
    return s


@pytest.mark.parametrize("name", ["init-2^-128", "init-2^-149", "checkpoint-2^-140", "new-scale-2^-140"])
def test_scale_floor_skips_and_counts(name: str) -> None:
    results = []
    for cls in (torch.amp.GradScaler, LossScaler):
        s = _floor_case(name, cls)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if name == "new-scale-2^-140":
            train_step(model, s, opt)
            opt.zero_grad()
            s.scale(model(torch.ones(3, 6)).square().mean()).backward()
            s.step(opt)
            s.update(new_scale=2.0**-140)
        train_step(model, s, opt)
        results.append((s, model))
    (ref, ref_model), (ours, model) = results
    assert not finite(ref_model)  # the negative control: GradScaler writes inf/NaN into the weights
    assert finite(model)
    assert ours.last_step_skipped is True and ours.skipped_steps >= 1
    assert ours.last_skip is not None and ours.last_skip.reason == "scale_floor"
    # The next update brings the scale back to the floor, and training resumes with finite weights.
    assert ours.get_scale() == SCALE_FLOOR
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, ours, torch.optim.SGD(model.parameters(), lr=0.1))
    assert ours.last_step_skipped is False and finite(model)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_backoff_1e_30_never_reaches_zero() -> None:
    runs = []
    for cls in (torch.amp.GradScaler, LossScaler):
        s = cls("cpu", init_scale=2.0**16, backoff_factor=1e-30)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for inject in [(0, INF), (0, INF), None, None]:
            train_step(model, s, opt, inject)
        runs.append((s.get_scale(), model))
    assert runs[0][0] == 0.0 and not finite(runs[0][1])
    assert runs[1][0] == SCALE_FLOOR and finite(runs[1][1])


def test_unscale_overflow_below_scale_one_is_skipped() -> None:
    """Scale 2^-100: a finite scaled gradient of 1e9 becomes inf when unscaled; GradScaler steps on it."""
    results = []
    for cls in (torch.amp.GradScaler, LossScaler):
        s = cls("cpu", init_scale=2.0**-100)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad()
        s.scale(model(torch.ones(3, 6)).sum()).backward()
        model[2].bias.grad[0] = 1e9  # type: ignore[index]
        s.step(opt)
        s.update()
        results.append((s, model))
    assert not finite(results[0][1])
    ours, model = results[1]
    assert finite(model) and ours.last_step_skipped is True
    assert ours.last_skip is not None and ours.last_skip.reason == "unscale_overflow"
    assert ours.last_skip.culprits[0].name == "param_groups[0].params[3]" and ours.last_skip.culprits[0].posinf == 1
    assert ours.get_scale() == 2.0**-101 and ours.skipped_steps == 1


def soak(steps: int, *, init_scale: float, growth_interval: int, seed: int) -> dict[str, Any]:
    """LossScaler and GradScaler in lockstep with 5% of steps injected with inf or NaN."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    models = [make_model(seed), make_model(seed)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]
    ref = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    ours = LossScaler("cpu", init_scale=init_scale, growth_interval=growth_interval, warn_after_skips=None)
    n_params = len(list(models[0].parameters()))
    diverged_at = None  # the first update after which GradScaler's scale is below the floor
    injected = skipped_injected = 0
    for t in range(steps):
        x = torch.randn(8, 6, generator=gen)
        inject = (rng.randrange(n_params), rng.choice([INF, -INF, NAN])) if rng.random() < 0.05 else None
        for m, o, s in zip(models, opts, (ref, ours), strict=True):
            train_step(m, s, o, inject, x=x)
        injected += inject is not None
        skipped_injected += inject is not None and ours.last_step_skipped is True
        assert finite(models[1]), f"LossScaler let a non-finite weight through at step {t}"
        if diverged_at is None:
            if ref.get_scale() < SCALE_FLOOR:
                diverged_at = t
                assert ours.get_scale() == SCALE_FLOOR
            else:
                assert ref.get_scale() == ours.get_scale(), t
                assert params_equal(*models), t
    return {
        "diverged_at": diverged_at,
        "injected": injected,
        "skipped_injected": skipped_injected,
        "ref_finite": finite(models[0]),
        "ours": ours,
    }


def test_soak_1000_steps_never_inf_in_weights() -> None:
    # Starts at 2^-90 so that GradScaler crosses the floor within 1,000 steps (benchmarks/scaler_soak.py runs
    # 10,000 steps from 2^16).
    out = soak(1000, init_scale=2.0**-90, growth_interval=50, seed=3)
    assert out["diverged_at"] is not None  # the soak did reach the floor
    assert out["injected"] > 30 and out["skipped_injected"] == out["injected"]
    assert not out["ref_finite"]  # negative control: GradScaler's weights went non-finite
    assert out["ours"].get_scale() >= SCALE_FLOOR


# ---------------------------------------------------------------------------------------------------------
# Forensics


def test_forensics_name_the_layer_inf_vs_nan_and_counts() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = LossScaler(init_scale=2.0**8)
    s.watch(model)
    train_step(model, s, opt)
    assert s.last_step_skipped is False and s.last_skip is None
    opt.zero_grad()
    s.scale(model(torch.ones(3, 6)).square().mean()).backward()
    model[2].weight.grad[0, :3] = INF  # type: ignore[index]
    model[2].weight.grad[1, 0] = -INF  # type: ignore[index]
    model[0].bias.grad[5] = NAN  # type: ignore[index]
    s.step(opt)
    s.update()
    assert s.last_step_skipped is True
    assert s.last_skip == SkipEvent(
        step=1,
        scale=256.0,
        consecutive_skips=1,
        skipped_steps=1,
        reason="nonfinite_grads",
        culprits=(
            NonFiniteGrad("0.bias", (16,), 16, 0, 0, 1),
            NonFiniteGrad("2.weight", (4, 16), 64, 3, 1, 0),
        ),
    )
    assert [c.kind for c in s.last_skip.culprits] == ["nan", "inf"]
    train_step(model, s, opt)
    assert s.last_step_skipped is False  # last_skip keeps the last skip
    assert s.last_skip.step == 1


def test_forensics_without_watch_use_param_group_positions() -> None:
    model = make_model()
    opt = torch.optim.SGD([{"params": [model[0].weight]}, {"params": [model[0].bias, model[2].weight]}], lr=0.1)
    s = LossScaler(init_scale=8.0)
    opt.zero_grad()
    s.scale(model(torch.ones(3, 6)).sum()).backward()
    model[2].weight.grad[0, 0] = NAN  # type: ignore[index]
    s.step(opt)
    assert s.last_skip is not None
    assert [c.name for c in s.last_skip.culprits] == ["param_groups[1].params[1]"]


def test_skip_warning_at_threshold_not_before() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = LossScaler(init_scale=2.0**10, warn_after_skips=3)
    s.watch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, s, opt, (1, INF))
        train_step(model, s, opt, (1, INF))
    with pytest.warns(SkipWarning) as rec:
        train_step(model, s, opt, (1, INF))
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "3 optimizer steps in a row were skipped" in msg
    assert "iteration 2" in msg and "loss scale 256" in msg and "0.bias (1 inf, 0 NaN of 16 elements)" in msg
    assert rec[0].filename == __file__  # points at the caller of step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, s, opt, (1, INF))  # the 4th: no repeat
        train_step(model, s, opt)  # a finite step resets the count
        train_step(model, s, opt, (1, INF))
        train_step(model, s, opt, (1, INF))
    with pytest.warns(SkipWarning):
        train_step(model, s, opt, (1, INF))


def test_skip_warning_default_10_and_none_disables() -> None:
    for warn_after, expected in ((10, 1), (None, 0)):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        s = LossScaler(init_scale=2.0**30, warn_after_skips=warn_after) if warn_after is None else LossScaler()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(12):
                train_step(model, s, opt, (0, NAN))
        assert sum(issubclass(w.category, SkipWarning) for w in caught) == expected


class _SyncCounter:
    def __init__(self) -> None:
        self.n = 0


@contextmanager
def count_host_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[_SyncCounter]:
    """Count the Python-level device-to-host reads (item, tolist, bool, float, int) of tensors."""
    counter = _SyncCounter()
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def wrapped(self: torch.Tensor, *a: Any, _orig: Any = original, **k: Any) -> Any:
            counter.n += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    yield counter
    monkeypatch.undo()


def test_no_extra_host_sync_on_a_finite_step(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {}
    for cls in (torch.amp.GradScaler, LossScaler):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        s = cls("cpu", init_scale=2.0**8)
        if isinstance(s, LossScaler):
            s.watch(model)
        train_step(model, s, opt)  # warm-up (lazy init)
        opt.zero_grad()
        loss = model(torch.ones(3, 6)).square().mean()
        with count_host_syncs(monkeypatch) as c:
            scaled = s.scale(loss)
        scaled.backward()
        with count_host_syncs(monkeypatch) as c2:
            s.unscale_(opt)
        with count_host_syncs(monkeypatch) as c3:
            s.step(opt)
        with count_host_syncs(monkeypatch) as c4:
            s.update()
        counts[cls.__name__] = (c.n, c2.n, c3.n, c4.n)
    assert counts["GradScaler"] == (0, 0, 1, 0)
    assert counts["LossScaler"] == counts["GradScaler"]


def test_skipped_step_syncs_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = LossScaler(init_scale=2.0**8)
    train_step(model, s, opt)
    opt.zero_grad()
    s.scale(model(torch.ones(3, 6)).square().mean()).backward()
    model[0].weight.grad[0, 0] = INF  # type: ignore[index]
    with count_host_syncs(monkeypatch) as c:
        s.step(opt)
    assert c.n == 3  # decide, read the counters, count the culprits (one device)
    s.update()


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def _saved_loaded(sd: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    out: dict[str, Any] = torch.load(buf, weights_only=True)
    return out


def test_round_trip_loss_scaler_grad_scaler_loss_scaler() -> None:
    model_o = make_model()
    opt_o = torch.optim.SGD(model_o.parameters(), lr=0.05)
    ours = LossScaler(init_scale=2.0**10, growth_factor=4.0, backoff_factor=0.25, growth_interval=3)
    for inject in [None, (0, INF), None, None, None]:
        train_step(model_o, ours, opt_o, inject)
    sd = _saved_loaded(ours.state_dict())
    assert {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} <= set(sd)
    ref = torch.amp.GradScaler("cpu")
    ref.load_state_dict(sd)
    assert ref.get_scale() == ours.get_scale() and ref._get_growth_tracker() == ours._get_growth_tracker()
    assert (ref.get_growth_factor(), ref.get_backoff_factor(), ref.get_growth_interval()) == (4.0, 0.25, 3)
    # Continue both in lockstep from the checkpoint: identical scales and weights.
    model_r = copy.deepcopy(model_o)
    opt_r = torch.optim.SGD(model_r.parameters(), lr=0.05)
    for inject in [None, None, (2, NAN), None, None, None]:
        train_step(model_o, ours, opt_o, inject)
        train_step(model_r, ref, opt_r, inject)
        assert ref.get_scale() == ours.get_scale()
    assert params_equal(model_o, model_r)
    # And back.
    back = LossScaler(init_scale=2.0**10, growth_factor=4.0, backoff_factor=0.25, growth_interval=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same settings: no override warning
        back.load_state_dict(_saved_loaded(ref.state_dict()))
    assert back.get_scale() == ours.get_scale() and back._get_growth_tracker() == ours._get_growth_tracker()
    assert back.config == ours.config


def test_static_scaler_state_dict_keeps_grad_scaler_fixed() -> None:
    ours = LossScaler(dynamic=False, init_scale=32.0)
    ref = torch.amp.GradScaler("cpu")
    ref.load_state_dict(ours.state_dict())
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for inject in [None, (0, INF), None]:
        train_step(model, ref, opt, inject)
    assert ref.get_scale() == 32.0


def _bad_dicts() -> list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], type[Exception]]]:
    def st(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def f(sd: dict[str, Any]) -> dict[str, Any]:
            sd = copy.deepcopy(sd)
            sd["state"][key] = value
            return sd

        return f

    def top(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def f(sd: dict[str, Any]) -> dict[str, Any]:
            sd = copy.deepcopy(sd)
            if value is KeyError:
                del sd[key]
            else:
                sd[key] = value
            return sd

        return f

    def torch_dict(**kw: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
        base = {"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 5, "_growth_tracker": 0}
        return lambda sd: {**base, **kw}

    return [
        ("tracker-2^40", st("growth_tracker", 2**40), ValueError),
        ("consecutive-2^40", st("consecutive_skips", 2**40), ValueError),
        ("skipped-2^70", st("skipped_steps", 2**70), ValueError),
        ("steps-2^70", st("steps", 2**70), ValueError),
        ("top-scale-disagrees", top("scale", 3.0), ValueError),
        ("top-tracker-disagrees", top("_growth_tracker", 1), ValueError),
        ("top-key-missing", top("growth_interval", KeyError), KeyError),
        ("version-3", top("version", 3), ValueError),
        ("torch-tracker-2^40", torch_dict(_growth_tracker=2**40), ValueError),
        ("torch-tracker-2^70", torch_dict(_growth_tracker=2**70), ValueError),
        ("torch-interval-2^70", torch_dict(growth_interval=2**70), ValueError),
        ("torch-scale-inf", torch_dict(scale=INF), ValueError),
        ("torch-growth-0.5", torch_dict(growth_factor=0.5), ValueError),
    ]


@pytest.mark.parametrize(("name", "make", "exc"), _bad_dicts(), ids=[c[0] for c in _bad_dicts()])
def test_out_of_range_state_dict_rejected_atomically(
    name: str, make: Callable[[dict[str, Any]], dict[str, Any]], exc: type[Exception]
) -> None:
    scaler = LossScaler(init_scale=2.0**10, growth_interval=5)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for inject in [(0, INF), None, None]:
        train_step(model, scaler, opt, inject)
    sd = scaler.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no override warning from a refused dict
        with pytest.raises(exc):
            scaler.load_state_dict(make(sd))
    assert scaler.state_dict() == sd


def test_version_1_state_dict_still_loads() -> None:
    src = LossScaler(init_scale=2.0**10, hysteresis=2)
    sd = src.state_dict()
    v1 = {"format": sd["format"], "version": 1, "config": sd["config"], "state": sd["state"]}
    dst = LossScaler(init_scale=2.0**10, hysteresis=2)
    dst.load_state_dict(v1)
    assert dst.state_dict() == sd


def test_frozen_factors_load_from_a_grad_scaler_checkpoint() -> None:
    ref = torch.amp.GradScaler("cpu", init_scale=32.0)
    ref.set_growth_factor(1.0)
    ref.set_backoff_factor(1.0)
    ours = LossScaler(init_scale=32.0)
    with pytest.warns(UserWarning, match="growth_factor 2.0 -> 1.0, backoff_factor 0.5 -> 1.0"):
        ours.load_state_dict(_saved_loaded(ref.state_dict()))
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for inject in [(0, INF), None, None]:
        train_step(model, ours, opt, inject)
    assert ours.get_scale() == 32.0 and ours.skipped_steps == 1


@pytest.mark.parametrize("unscale_first", [False, True], ids=["fused-adam", "fused-adam-unscale-first"])
def test_amp_protocol_scale_below_one_unscale_overflow_is_skipped(unscale_first: bool) -> None:
    """A finite scaled gradient that the fused optimizer's own unscale (x 2^10) would overflow: skipped,
    counted, reason "unscale_overflow", weights untouched (GradScaler puts NaN in them)."""
    results = []
    for cls in (torch.amp.GradScaler, LossScaler):
        p = nn.Parameter(torch.ones(3))
        opt = torch.optim.Adam([p], lr=0.1, fused=True)
        s = cls("cpu", init_scale=2.0**-10)
        s.scale((p * torch.tensor([3e38, 1.0, 1.0])).sum() * 4).backward()
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())  # scaled: finite
        if unscale_first:
            s.unscale_(opt)
        s.step(opt)
        s.update()
        results.append((p.detach().clone(), s))
    (p_torch, _), (p_ours, ours) = results
    assert bool(torch.isnan(p_torch).any())  # the oracle shows the defect this guards against
    assert p_ours.tolist() == [1.0, 1.0, 1.0]
    assert isinstance(ours, LossScaler)
    assert ours.last_step_skipped is True and ours.skipped_steps == 1
    assert ours.last_skip is not None and ours.last_skip.reason == "unscale_overflow"
    assert ours.get_scale() == 2.0**-11  # backed off


def test_amp_protocol_scale_below_one_no_overflow_bit_identical() -> None:
    """Below 1 without overflow the fused step is GradScaler's, bit for bit, and not a skip."""
    runs = []
    for cls in (torch.amp.GradScaler, LossScaler):
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
        s = cls("cpu", init_scale=2.0**-6, growth_interval=2)
        for t in range(4):
            opt.zero_grad()
            s.scale(model(torch.ones(3, 6) * (t + 1)).square().mean()).backward()
            s.step(opt)
            if isinstance(s, LossScaler):
                assert s.last_step_skipped is False
            s.update()
        runs.append((model, s.get_scale()))
    assert params_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1] == 2.0**-4
