"""LayerwiseScaler: per-layer loss scaling.

Oracles: the same emulated run with one global scale (LossScaler), bit for bit, where the emulation's
counters show no underflow, subnormal or overflow in either run; an FP32 run for the deep "no single scale
fits" model; hand-built graphs (residual sums, tied weights, reuse, frozen layers).
"""

from __future__ import annotations

import copy
import gc
import io
import math
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import nn

import lossscale
from lossscale import FP16, LayerSkipEvent, LayerwiseScaler, LossScaler, RoundingCounters
from lossscale.layerwise import adaptive_log2_scales, recommend_layer_scales, select_layers

from .integration_utils import sgd_reusing_id

# ----------------------------------------------------------------------------------------------------------
# Models


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


class Residual(nn.Module):
    """A residual block and a sum of two branches with different scales."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.inp = nn.Linear(16, 32)
        self.f1 = nn.Linear(32, 32)
        self.f2 = nn.Linear(32, 32)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.f2(torch.tanh(self.f1(h)))  # residual connection
        h = torch.tanh(self.a(h)) + self.b(h)  # two branches summed
        return self.out(h)


class Tied(nn.Module):
    """An embedding tied to the output projection (both layers), plus a layer used twice and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(20, 16)
        self.mid = nn.Linear(16, 16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.act = nn.Tanh()  # a parameter-free module
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = self.act(self.mid(h))
        h = self.act(self.mid(h))  # the same layer twice
        h = self.frozen(h)
        return self.head(h)


class GPT2Head(nn.Module):
    """The output head written in the model's forward with the embedding's weight (code outside the layers)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.wte = nn.Embedding(20, 16)
        self.mid = nn.Linear(16, 16)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(self.wte(idx)))
        return h @ self.wte.weight.T


def _batch(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    if isinstance(model, (Tied, GPT2Head)):
        idx = torch.randint(0, 20, (8, 5), generator=g)
        return idx, torch.randn(8, 5, 20, generator=g)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _emulated_step(
    model: nn.Module, scaler: Any, precision: str = "fp16-mixed"
) -> tuple[dict[str, torch.Tensor], RoundingCounters]:
    counters = RoundingCounters()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    x, y = _batch(model)
    with lossscale.autocast(precision, counters=counters, emulate=True):
        out = model(x)
    loss = (out - y).square().mean()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    scaler.step(opt)
    scaler.update()
    return grads, counters


def _assert_clean(counters: RoundingCounters) -> None:
    """No underflow, subnormal result or overflow at any backward rounding site (so scaling is exact)."""
    for fmt, c in counters.totals(grad=True).items():
        assert c.nonzero > 0, fmt
        assert (c.underflow, c.subnormal, c.overflow) == (0, 0, 0), (fmt, c)


# ----------------------------------------------------------------------------------------------------------
# Exactness against one global scale


EXACT_CASES: list[tuple[str, Callable[[], nn.Module], Mapping[str, float]]] = [
    ("mlp", mlp, {"0": 2.0**9, "2": 2.0**12, "4": 2.0**7}),
    ("residual", Residual, {"inp": 2.0**9, "f1": 2.0**12, "f2": 2.0**6, "a": 2.0**11, "b": 2.0**5, "out": 2.0**8}),
    ("tied", Tied, {"emb": 2.0**9, "mid": 2.0**12, "frozen": 2.0**6, "head": 2.0**9}),
]


@pytest.mark.parametrize("name,build,scales", EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
@pytest.mark.parametrize("mode", ["dynamic", "adaptive-previous"])
def test_power_of_two_scales_match_one_global_scale_bit_for_bit(
    name: str, build: Callable[[], nn.Module], scales: Mapping[str, float], mode: str
) -> None:
    ref = build()
    lw = copy.deepcopy(ref)
    g_ref, c_ref = _emulated_step(ref, LossScaler(init_scale=2.0**10))
    kw: dict[str, Any] = {"mode": "dynamic"} if mode == "dynamic" else {"mode": "adaptive", "stats": "previous"}
    scaler = LayerwiseScaler(lw, loss_scale=2.0**8, init_scale=scales, **kw)
    g_lw, c_lw = _emulated_step(lw, scaler)
    _assert_clean(c_ref)
    _assert_clean(c_lw)
    used = scaler.layer_scales()
    assert len(set(used.values())) > 1  # the scales do differ per layer
    assert g_ref.keys() == g_lw.keys()
    for n in g_ref:
        assert torch.equal(g_ref[n], g_lw[n]), n


def test_tied_layers_share_one_scale_and_reuse_frozen_paramfree_work() -> None:
    model = Tied()
    scaler = LayerwiseScaler(model, mode="dynamic", init_scale={"emb": 2.0**9, "head": 2.0**3})
    _emulated_step(model, scaler)
    groups = {frozenset(g) for g in scaler.layer_groups()}
    assert frozenset({"emb", "head"}) in groups
    s = scaler.layer_scales()
    assert s["emb"] == s["head"]
    assert scaler.layer_names == ("emb", "mid", "frozen", "head")


def test_parameter_shared_with_code_outside_layers_is_held_at_loss_scale() -> None:
    ref = GPT2Head()
    lw = copy.deepcopy(ref)
    g_ref, _ = _emulated_step(ref, LossScaler(init_scale=2.0**8))
    scaler = LayerwiseScaler(lw, mode="dynamic", loss_scale=2.0**8, init_scale={"wte": 2.0**12, "mid": 2.0**11})
    g_lw, _ = _emulated_step(lw, scaler)
    assert scaler.layer_scales()["wte"] == 2.0**8
    assert ("wte", "<outside layers>") in scaler.layer_groups()
    for n in g_ref:
        assert torch.equal(g_ref[n], g_lw[n]), n


def test_layer_first_used_after_the_first_iteration_is_traced_then() -> None:
    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(4)
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.use_b = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h) if self.use_b else h

    model = Late()
    ref = copy.deepcopy(model)
    scaler = LayerwiseScaler(model, mode="dynamic", init_scale={"a": 4.0, "b": 256.0})
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(3, 4)
    for use_b in (False, True):
        model.use_b = ref.use_b = use_b
        opt.zero_grad()
        ref.zero_grad()
        scaler.scale(model(x).sum()).backward()
        ref(x).sum().backward()
        scaler.step(opt)
        scaler.update()
        for p, q in zip(ref.parameters(), model.parameters(), strict=True):
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad)


def test_tensor_not_passed_as_argument_is_refused() -> None:
    class Sneaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.cache: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.cache = self.a(x)
            return self.b(x)

    class B(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + owner.cache  # type: ignore[operator]

    owner = Sneaky()
    owner.b = B(4, 4)
    LayerwiseScaler(owner)
    with pytest.raises(RuntimeError, match="'b' uses a tensor from layer 'a'"):
        owner(torch.randn(2, 4, requires_grad=True))


def test_in_place_op_on_layer_output_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 1)
    )
    ref = copy.deepcopy(model)
    x = torch.randn(8, 4)
    ref(x).sum().backward()
    scaler = LayerwiseScaler(model, mode="dynamic", init_scale={"0": 8.0, "2": 1024.0, "4": 2.0})
    scaler.scale(model(x).sum()).backward()
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
    for p, q in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_backward_without_scale_is_refused() -> None:
    model = mlp()
    LayerwiseScaler(model)
    with pytest.raises(RuntimeError, match=r"without scaler.scale\(loss\)"):
        model(torch.randn(2, 16)).sum().backward()


# ----------------------------------------------------------------------------------------------------------
# No single scale fits


class _Shrink(torch.autograd.Function):
    """Identity forward; the gradient shrinks by a fixed power of two (a stand-in for layers whose backward
    attenuates, e.g. saturating units), so that activation gradients spread over many binades."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * 2.0**-2


class Shrink(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Shrink.apply(x)  # type: ignore[no-untyped-call]
        return out


DEPTH, WIDTH = 32, 32


def deep_mlp() -> nn.Module:
    torch.manual_seed(11)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        lin = nn.Linear(WIDTH, WIDTH, bias=False)
        nn.init.orthogonal_(lin.weight)  # gain 1: forward activations and backward gradients keep their size
        layers += [lin, Shrink()]
    return nn.Sequential(*layers)


def _deep_run(model: nn.Module, scaler: Any) -> RoundingCounters:
    torch.manual_seed(5)
    x = torch.randn(64, WIDTH)
    counters = RoundingCounters()
    model.zero_grad()
    with lossscale.autocast("fp16-mixed", counters=counters, emulate=True):
        out = model(x)
    loss = out.square().sum() * 0.5
    scaler.scale(loss).backward()
    return counters


def _activation_grad_loss(counters: RoundingCounters) -> tuple[float, int]:
    """Fraction of activation-gradient elements (entering each layer's GEMMs, site ``*.output.grad``) that are
    zero after rounding, and the overflow count over every backward site. The FP32 control run has no zero
    activation gradient (checked below), so every zero is a loss: an underflow here or upstream."""
    elements = nonzero_left = overflow = 0
    for (site, _fmt), c in counters.read().items():
        if site.endswith(".grad"):
            overflow += c.overflow
        if site.endswith("output.grad"):
            elements += c.elements
            nonzero_left += c.nonzero - c.underflow
    return 1.0 - nonzero_left / elements, overflow


class _Global:
    """One global scale: the loss times S (what LossScaler.scale does), no per-layer rescaling."""

    def __init__(self, scale: float) -> None:
        self.s = scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.s


def test_fp32_control_has_no_zero_activation_gradient_and_spans_over_45_binades() -> None:
    model = deep_mlp()
    grads: list[torch.Tensor] = []
    for m in model:
        if isinstance(m, nn.Linear):
            m.register_full_backward_hook(lambda _m, _gi, go: grads.append(go[0].detach().clone()))
    torch.manual_seed(5)
    x = torch.randn(64, WIDTH, requires_grad=True)
    (model(x).square().sum() * 0.5).backward()
    allg = torch.cat([g.abs().reshape(-1) for g in grads])
    assert bool((allg > 0).all())
    spread = math.log2(float(allg.max())) - math.log2(float(allg.min()))
    assert spread > 45


def test_no_single_scale_fits_but_layerwise_does() -> None:
    base = deep_mlp()
    results = {}
    for k in range(-40, 41):
        frac, overflow = _activation_grad_loss(_deep_run(copy.deepcopy(base), _Global(2.0**k)))
        results[k] = (frac, overflow)
        assert overflow > 0 or frac >= 0.20, (k, frac, overflow)
    # The sweep does reach both walls: small scales underflow, large ones overflow.
    assert results[40][1] > 0 and results[-40][0] > 0.5

    lw_model = copy.deepcopy(base)
    scaler = LayerwiseScaler(lw_model, mode="adaptive")
    frac, overflow = _activation_grad_loss(_deep_run(lw_model, scaler))
    assert overflow == 0
    assert frac < 0.01, frac
    scales = scaler.layer_scales()
    assert math.log2(max(scales.values()) / min(scales.values())) > 40  # the scales do spread

    # Negative control: the same scaler with every per-layer scale forced equal to the loss scale behaves as
    # one global scale (the same counts, to the element).
    for k in (-10, 0, 10, 20):
        ctrl_model = copy.deepcopy(base)
        forced = LayerwiseScaler(ctrl_model, mode="dynamic", loss_scale=2.0**k, init_scale=2.0**k)
        c_forced = _deep_run(ctrl_model, forced).read()
        c_global = _deep_run(copy.deepcopy(base), _Global(2.0**k)).read()
        assert c_forced == c_global


# ----------------------------------------------------------------------------------------------------------
# Training loop protocol, skips, culprits


def _train(model: nn.Module, scaler: LayerwiseScaler, steps: int, start: int = 0,
           inject: Mapping[int, str] | None = None) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return _train_with(model, scaler, opt, steps, start, inject)


def _train_with(model: nn.Module, scaler: LayerwiseScaler, opt: torch.optim.Optimizer, steps: int, start: int = 0,
                inject: Mapping[int, str] | None = None) -> list[torch.Tensor]:
    snapshots = []
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad()
        with lossscale.autocast("fp16-mixed", emulate=True):
            out = model(x)
        loss = (out - y).square().mean()
        scaler.scale(loss).backward()
        if inject and t in inject:
            dict(model.named_parameters())[inject[t]].grad[0, 0] = math.inf  # type: ignore[index]
        scaler.step(opt)
        scaler.update()
        snapshots.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return snapshots


def test_overflow_skips_for_all_and_names_the_culprit() -> None:
    model = mlp()
    events: list[LayerSkipEvent] = []
    scaler = LayerwiseScaler(model, mode="dynamic", init_scale=2.0**8, growth_interval=3, on_skip=events.append)
    before = scaler.layer_scales()
    snaps = _train(model, scaler, 2, inject={1: "2.weight"})
    assert torch.equal(snaps[0], snaps[1])  # skipped: nothing moved
    assert scaler.last_step_skipped and scaler.skipped_steps == 1
    assert len(events) == 1 and events[0].culprits == ("2",) and events[0].step == 1
    assert scaler.last_skip == events[0]
    after = scaler.layer_scales()
    # Only the culprit backs off; the others counted a finite iteration (growth at 3).
    assert after == {"0": before["0"], "2": before["2"] / 2, "4": before["4"]}


def test_activation_overflow_in_frozen_layer_is_named() -> None:
    model = mlp()
    model[4].requires_grad_(False)
    with torch.no_grad():
        nn.init.orthogonal_(model[4].weight, gain=1000.0)  # forward stays in FP16; its dgrad at 2^8 does not
    events: list[LayerSkipEvent] = []
    scaler = LayerwiseScaler(model, mode="dynamic", init_scale=2.0**8, on_skip=events.append)
    _train(model, scaler, 1)
    assert [e.culprits for e in events] == [("4",)]
    assert scaler.layer_scales() == {"0": 2.0**8, "2": 2.0**8, "4": 2.0**7}


def test_overflow_outside_the_layers_is_named_as_such() -> None:
    model = mlp()
    scaler = LayerwiseScaler(model, mode="dynamic", init_scale=2.0**4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = scaler.layer_scales()
    loss = model(torch.randn(4, 16)).sum() * math.inf  # the loss itself is not finite
    scaler.scale(loss).backward()
    assert scaler.step(opt) is None
    scaler.update()
    assert scaler.last_skip is not None and scaler.last_skip.culprits == ("<outside layers>",)
    assert scaler.layer_scales() == before  # no layer is blamed, none backs off


def test_dynamic_growth_trajectory_per_layer() -> None:
    model = mlp()
    scaler = LayerwiseScaler(model, mode="dynamic", init_scale=4.0, growth_interval=2)
    traj = []
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for t in range(5):
        _train_with(model, scaler, opt, 1, start=t, inject={2: "0.weight"} if t == 2 else None)
        traj.append(scaler.layer_scales()["0"])
    # flax-style exact trajectory: grow every 2 finite steps, back off on the culprit's overflow.
    assert traj == [4.0, 8.0, 4.0, 4.0, 8.0]


def test_skip_budget() -> None:
    model = mlp()
    scaler = LayerwiseScaler(model, mode="dynamic", max_consecutive_skips=1)
    _train(model, scaler, 1, inject={0: "4.weight"})
    with pytest.raises(lossscale.SkipBudgetExceeded, match="originates in 4"):
        _train(model, scaler, 1, start=1, inject={1: "4.weight"})


# ----------------------------------------------------------------------------------------------------------
# State


@pytest.mark.parametrize("mode", ["dynamic", "adaptive"])
def test_mid_run_resume_is_bit_exact(mode: str) -> None:
    kw: dict[str, Any] = {"growth_interval": 2} if mode == "dynamic" else {}
    inject = {2: "2.weight", 5: "0.weight"}
    full_model = mlp()
    full_scaler = LayerwiseScaler(full_model, mode=mode, **kw)
    full = _train(full_model, full_scaler, 8, inject=inject)

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = LayerwiseScaler(model, mode=mode, **kw)
    first = _train_with(model, scaler, opt, 4, inject=inject)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2 = mlp(seed=99)
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ckpt["opt"])
    scaler2 = LayerwiseScaler(model2, mode=mode, **kw)
    scaler2.load_state_dict(ckpt["scaler"])
    assert scaler2.state_dict() == scaler.state_dict()
    second = _train_with(model2, scaler2, opt2, 4, start=4, inject=inject)
    for a, b in zip(full, first + second, strict=True):
        assert torch.equal(a, b)
    assert scaler2.state_dict() == full_scaler.state_dict()
    assert scaler2.skipped_steps >= 2


def test_state_round_trip_with_every_field_non_default() -> None:
    model = mlp()
    kw: dict[str, Any] = dict(
        mode="dynamic", grad_format="e5m2", loss_scale=4.0, init_scale={"0": 8.0, "2": 16.0, "4": 32.0},
        growth_factor=4.0, backoff_factor=0.25, growth_interval=3, min_scale=2.0, max_scale=2.0**20,
        max_consecutive_skips=5, underflow_prob=0.01, headroom=2,
    )
    scaler = LayerwiseScaler(model, **kw)
    _train(model, scaler, 2, inject={1: "2.weight"})
    sd = scaler.state_dict()
    assert sd["state"]["skipped_steps"] == 1 and sd["layers"]["0"]["growth_tracker"] == 2
    assert sd["layers"]["2"]["scale"] == 4.0  # 16 * 0.25
    assert sd["layers"]["2"]["gain"] != 1.0 and sd["layers"]["4"]["gain"] != 1.0  # (layer 0 emits no dgrad)
    other = LayerwiseScaler(mlp(), **kw)
    other.load_state_dict(sd)
    assert other.state_dict() == sd
    assert other.layer_scales() == scaler.layer_scales()


def test_load_state_dict_rejects_bad_dicts_and_leaves_scaler_unchanged() -> None:
    model = mlp()
    scaler = LayerwiseScaler(model, mode="dynamic")
    sd = scaler.state_dict()
    before = copy.deepcopy(sd)
    bad_layers = copy.deepcopy(sd)
    bad_layers["layers"] = {"x": sd["layers"]["0"]}
    with pytest.raises(ValueError, match="must name the layers"):
        scaler.load_state_dict(bad_layers)
    bad_cfg = copy.deepcopy(sd)
    bad_cfg["config"]["mode"] = "adaptive"
    with pytest.raises(ValueError, match=r"differs from this scaler's in \['mode'\]"):
        scaler.load_state_dict(bad_cfg)
    bad_scale = copy.deepcopy(sd)
    bad_scale["layers"]["2"]["scale"] = -1.0
    with pytest.raises(ValueError, match="layer '2' scale"):
        scaler.load_state_dict(bad_scale)
    with pytest.raises(ValueError, match="keys"):
        scaler.load_state_dict({"scale": 1.0})
    assert scaler.state_dict() == before


# ----------------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"mode": "global"}, ValueError, "mode must be one of"),
        ({"stats": "now"}, ValueError, "stats must be one of"),
        ({"mode": "dynamic", "stats": "current"}, ValueError, "stats applies to mode='adaptive'"),
        ({"layers": ["0", "nope"]}, ValueError, "layers: 'nope'"),
        ({"layers": "0"}, TypeError, "layers must be a sequence"),
        ({"layers": ["0", "0"]}, ValueError, "layers: names must be unique"),
        ({"grad_format": "fp17"}, ValueError, "grad_format"),
        ({"grad_format": 16}, TypeError, "grad_format must be"),
        ({"loss_scale": 0.0}, ValueError, "loss_scale must be positive"),
        ({"loss_scale": 2.0**30}, ValueError, "loss_scale must lie in"),
        ({"init_scale": {"zz": 2.0}}, ValueError, "init_scale: 'zz'"),
        ({"init_scale": {"0": -2.0}}, ValueError, r"init_scale\['0'\]"),
        ({"init_scale": 2.0**120}, ValueError, "init_scale for layer"),
        ({"underflow_prob": 0.7}, ValueError, "underflow_prob must lie"),
        ({"underflow_prob": "x"}, TypeError, "underflow_prob must be a float"),
        ({"headroom": -1}, ValueError, "headroom must be an int >= 0"),
        ({"growth_factor": 0.5}, ValueError, "growth_factor"),
        ({"backoff_factor": 2.0}, ValueError, "backoff_factor"),
        ({"growth_interval": 0}, ValueError, "growth_interval"),
        ({"max_consecutive_skips": 0}, ValueError, "max_consecutive_skips"),
        ({"enabled": 1}, TypeError, "enabled must be a bool"),
        ({"on_skip": 3}, TypeError, "on_skip must be callable"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_argument(kwargs: dict[str, Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        LayerwiseScaler(mlp(), **kwargs)


def test_bad_model_and_nested_layers() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        LayerwiseScaler("model")  # type: ignore[arg-type]
    outer = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="'0' contains '0.0'"):
        LayerwiseScaler(outer, layers=["0", "0.0"])


def test_disabled_scaler_is_a_no_op_with_every_method() -> None:
    model = mlp()
    scaler = LayerwiseScaler(model, enabled=False)
    ref = mlp()
    a = _train(model, scaler, 2)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    b = []
    for t in range(2):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad()
        with lossscale.autocast("fp16-mixed", emulate=True):
            out = ref(x)
        (out - y).square().mean().backward()
        opt.step()
        b.append(torch.cat([p.detach().reshape(-1) for p in ref.parameters()]))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert scaler.state_dict() == {} and scaler.get_scale() == 1.0


# ----------------------------------------------------------------------------------------------------------
# Pure functions


def test_select_layers_top_down() -> None:
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.MultiheadAttention(2, 1)))
    assert select_layers(m) == ["0", "2.0", "2.1"]  # the MHA's out_proj stays inside it


def test_adaptive_rule_bounds_underflow_probability() -> None:
    """Gaussian gradients at many magnitudes: after scaling by the rule's 2^k, at most ~underflow_prob of the
    elements fall below FP16's smallest normal (3-sigma binomial bound, fixed seed) and none overflow."""
    torch.manual_seed(0)
    n, p = 200_000, 2.0**-10
    for log_sigma in (-60, -30, -5, 0, 10):
        g = torch.randn(n, dtype=torch.float64) * 2.0**log_sigma
        a = g.abs()
        k, ok = adaptive_log2_scales(
            a.max().reshape(1), a.square().mean().sqrt().reshape(1), torch.ones(1), FP16, underflow_prob=p, headroom=4
        )
        assert bool(ok)
        scaled = a * 2.0 ** float(k)
        below = float((scaled < FP16.min_normal).double().mean())
        assert below <= p + 3 * math.sqrt(p * (1 - p) / n), (log_sigma, below)
        assert float(scaled.max()) <= FP16.max / 2**4
        # Negative control: one binade less and the bound is broken.
        below_less = float((scaled / 2 < FP16.min_normal).double().mean())
        assert below_less > below


def test_recommend_layer_scales_skips_empty_layers() -> None:
    rec = recommend_layer_scales({"a": 1.0, "b": 0.0}, {"a": 0.25, "b": 0.0}, FP16)
    assert list(rec) == ["a"]
    k = math.log2(rec["a"])
    assert k == int(k)


# ----------------------------------------------------------------------------------------------------------
# diagnose and the FP8 recipe


def test_diagnose_recommends_per_layer_scales_that_fit() -> None:
    """diagnose finds no single FP16 scale for the deep model and recommends per-layer ones; used as the
    scales of a LayerwiseScaler (held fixed), they leave < 1% of activation gradients underflowing and no
    overflow in the emulated run. Where a single scale fits (the MLP), no per-layer scales are given."""
    base = deep_mlp()
    x = torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(5))
    d = lossscale.diagnose(base, lambda m, b: m(b).square().sum() * 0.5, [x], formats=["fp16"], steps=1,
                           optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0))
    f = d.format("fp16")
    assert f.recommended_scale is None and f.layer_scales is not None
    assert "lossscale.LayerwiseScaler" in f.recommendation
    assert lossscale.Diagnosis.from_dict(d.to_dict()).format("fp16").layer_scales == f.layer_scales
    model = copy.deepcopy(base)
    names = set(select_layers(model))
    scales = {n: v for n, v in f.layer_scales.items() if n in names}
    assert scales.keys() == names
    scaler = LayerwiseScaler(model, mode="dynamic", init_scale=scales, growth_interval=10**6)
    frac, overflow = _activation_grad_loss(_deep_run(model, scaler))
    assert overflow == 0 and frac < 0.01, frac

    small = mlp()
    data = [(torch.randn(8, 16), torch.randn(8, 4))]
    d2 = lossscale.diagnose(small, lambda m, b: (m(b[0]) - b[1]).square().mean(), data, formats=["fp16"], steps=1)
    assert d2.format("fp16").recommended_scale is not None and d2.format("fp16").layer_scales is None


def test_fp8_hybrid_deep_model_layerwise_keeps_e5m2_gradients() -> None:
    base = deep_mlp()

    def run(model: nn.Module, scaler: Any) -> tuple[float, int]:
        torch.manual_seed(5)
        x = torch.randn(64, WIDTH)
        counters = RoundingCounters()
        with lossscale.autocast("fp8-hybrid", counters=counters, emulate=True):
            out = model(x)
        scaler.scale(out.square().sum() * 0.5).backward()
        return _activation_grad_loss(counters)

    for k in range(-30, 31, 2):  # every other binade: no single scale works
        frac, overflow = run(copy.deepcopy(base), _Global(2.0**k))
        assert frac >= 0.2 or overflow > 0, (k, frac)
    model = copy.deepcopy(base)
    frac, overflow = run(model, LayerwiseScaler(model, grad_format="e5m2"))
    assert overflow == 0 and frac < 0.01, frac


@pytest.mark.parametrize("mode", ["current", "previous", "dynamic"])
def test_fp32_gradients_bit_exact_on_every_study_model(mode: str) -> None:
    """In FP32 (no rounding sites), power-of-two per-layer scales change no bit of any weight gradient, on the
    study's models: a ResNet with BatchNorm, an LSTM, an encoder-decoder Transformer (embeddings, attention,
    LayerNorm), a 30-layer MLP. Two iterations, so that the second runs with scales set by the first."""
    from lossscale.study.runner import build
    from lossscale.study.tasks import TASKS

    for task in TASKS:
        inst = build(task, "tiny", seed=0, device="cpu")
        ref = inst.model
        lw = copy.deepcopy(ref)
        varied = {n: 2.0 ** (i % 7 - 3) for i, n in enumerate(select_layers(lw))}
        kw: dict[str, Any] = {"mode": "dynamic", "init_scale": varied} if mode == "dynamic" else {"stats": mode}
        scaler = LayerwiseScaler(lw, **kw)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=1e-3)
        opt_lw = torch.optim.SGD(lw.parameters(), lr=1e-3)
        for _ in range(2):
            batch = next(inst.batches)
            opt_ref.zero_grad()
            opt_lw.zero_grad()
            inst.loss_fn(ref, batch).backward()
            scaler.scale(inst.loss_fn(lw, batch)).backward()
            scaler.unscale_(opt_lw)
            for (name, p), q in zip(ref.named_parameters(), lw.parameters(), strict=True):
                assert (p.grad is None) == (q.grad is None), (task, name)
                if p.grad is not None:
                    assert torch.equal(p.grad, q.grad), (task, name)
            opt_ref.step()
            scaler.step(opt_lw)
            scaler.update()
        assert len(set(scaler.layer_scales().values())) > 1, task  # the scales really differ per layer


@pytest.mark.slow
def test_study_deep_mlp_layerwise_configuration() -> None:
    """The study's fp16-mixed:layerwise on the deep MLP: the underflow that fp16-mixed:none suffers is gone
    (emulation counters) and training gets the loss down as far as dynamic scaling (same record shape)."""
    from lossscale.study.runner import RunSpec, run_one

    none = run_one(RunSpec("deep-mlp", "fp16-mixed:none", 0, "tiny"))
    lw = run_one(RunSpec("deep-mlp", "fp16-mixed:layerwise", 0, "tiny"))
    assert none["underflow_fraction"]["fp16"] > 0.10
    assert lw["underflow_fraction"]["fp16"] < 1e-3
    assert lw["final_loss"] < none["final_loss"]
    assert lw["scaler"]["kind"] == "layerwise" and len(lw["scaler"]["final_layer_scales"]) == 30
    assert lw["skipped_steps"] == 0 and lw["config"] == "fp16-mixed:layerwise"
    # The loss scale S between layers is the diagnosed static scale (clamped to LayerwiseScaler's range), not 1.
    assert lw["scaler"]["loss_scale"] == min(max(lw["scaler"]["chosen_scale"], 2.0**-20), 2.0**20) > 1.0
    from lossscale.study import schema

    schema.validate(lw, schema.RUN_SCHEMA)  # a full study once died here: "layerwise" was not in the enum


def test_freed_optimizer_id_reused_by_a_new_one_inherits_nothing() -> None:
    """As LossScaler: an optimizer that overflowed and stepped, then was freed before update(), hands no record
    to a new optimizer at its id; its overflow still counts at update()."""
    model = mlp()
    params = list(model.parameters())
    scaler = LayerwiseScaler(model, mode="dynamic", init_scale=2.0**8)
    scales = scaler.layer_scales()

    def backward(inject: bool) -> None:
        for p in params:
            p.grad = None
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        with lossscale.autocast("fp16-mixed", emulate=True):
            out = model(x)
        scaler.scale((out - y).square().mean()).backward()
        if inject:
            dict(model.named_parameters())["2.weight"].grad[0, 0] = math.inf  # type: ignore[index]

    old = torch.optim.SGD(params, lr=0.1)
    backward(inject=True)
    scaler.step(old)
    assert scaler.last_step_skipped
    old_id = id(old)
    del old
    gc.collect()
    new = sgd_reusing_id(old_id, params)
    if new is None:
        pytest.skip("CPython did not reuse the freed optimizer's address")
    backward(inject=False)
    before = [p.detach().clone() for p in params]
    scaler.step(new)  # GradScaler-style id keys would say "step() has already been called"
    assert not scaler.last_step_skipped
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
    scaler.update()
    assert scaler.skipped_steps == 1 and scaler.layer_scales()["2"] == scales["2"] / 2


def _plain_step(model: nn.Module, scaler: Any, opt: torch.optim.Optimizer) -> None:
    x, y = _batch(model)
    opt.zero_grad()
    scaler.scale((model(x) - y).square().mean()).backward()
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("mode", ["dynamic", "adaptive"])
@pytest.mark.parametrize("make", [mlp, Tied, GPT2Head], ids=["mlp", "tied", "gpt2-head"])
def test_per_step_path_builds_no_tensor_directly_on_the_device(
    mode: str, make: Callable[[], nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.tensor(host_list, device=cuda)`` copies from pageable memory and waits for the device (a host
    sync). After the first iteration, scale/backward/step/update create no tensor from host values with a
    device: index lists go through pinned non-blocking copies, the group indices are cached. (CPU check of
    the mechanism; the CUDA test below checks the sync itself with torch's sync debug mode.)"""
    model = make()
    scaler = LayerwiseScaler(model, mode=mode)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    _plain_step(model, scaler, opt)  # first iteration: tracing and state creation
    with_device: list[Any] = []
    real = torch.tensor

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("device") is not None:
            with_device.append(kwargs["device"])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", spy)
    for _ in range(2):
        _plain_step(model, scaler, opt)
    monkeypatch.undo()
    assert with_device == []
    assert scaler.skipped_steps == 0 and all(math.isfinite(v) for v in scaler.layer_scales().values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["dynamic", "adaptive"])
def test_update_does_not_sync_on_cuda(mode: str) -> None:
    model = Tied().cuda()
    scaler = LayerwiseScaler(model, mode=mode)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    x, y = (t.cuda() for t in _batch(model))
    for it in range(3):
        opt.zero_grad()
        scaler.scale((model(x) - y).square().mean()).backward()
        scaler.unscale_(opt)
        scaler.step(opt)  # syncs once, by design
        torch.cuda.set_sync_debug_mode("error" if it else "default")
        try:
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
