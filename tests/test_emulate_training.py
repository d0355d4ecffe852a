"""Training under emulation: 50-step runs against native references, the loss-scaling laws, FP8 hybrid
scaling and underflow, low-precision weights."""

from __future__ import annotations

import copy
import importlib.util
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lossscale
from lossscale import BF16, LossScaler, Precision, RoundingCounters, quantize

STEPS = 50

# Tolerances for 50-step training runs: the largest loss difference over the run relative to the initial loss
# (measured values beside each; fixed seeds).
TOL = {
    # Linear/conv GEMMs match native CPU autocast bit for bit (test_emulate_ops), and ReLU, max-pooling and the
    # FP32 loss are exact on BF16 values: the runs are bit-identical (measured 0).
    "mlp": 1e-6,
    "cnn": 1e-6,
    # CPU autocast runs batch norm and average pooling in BF16 (an extra rounding per op that emulation,
    # following CUDA's FP32 list for norms, does not make), and the difference compounds over 50 momentum
    # steps: measured ~1e-2, the same size as the BF16-vs-FP32 difference itself. Bounded, not matched.
    "cnn-batchnorm": 0.05,
    # Attention: CPU's flash kernel blocks the softmax differently (98.7% of outputs within one ulp):
    # measured ~1e-3.
    "transformer": 0.01,
    # Against the unrolled BF16-GEMM oracle the LSTM is bit-identical in forward; the recurrent weights'
    # gradients are summed in BF16 by the oracle and in FP32 by emulation (test_emulate_layers).
    "lstm": 0.01,
}


def _data(shape: tuple[int, ...], classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)


class Block(nn.Module):
    """A pre-norm Transformer block with a classification head (d_model 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=1))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][-1])


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": (
        lambda: nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)),
        (32, 20),
        5,
    ),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5),
        ),
        (16, 3, 8, 8),
        5,
    ),
    "cnn-batchnorm": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
        ),
        (16, 3, 8, 8),
        5,
    ),
    "transformer": (Block, (8, 6, 32), 5),
}
LR = {"transformer": 0.01}


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: Callable[[], object], lr: float = 0.05
) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        with context():  # type: ignore[attr-defined]
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def rel_gap(a: list[float], b: list[float]) -> float:
    """Largest loss difference over the run, relative to the initial loss (late losses approach 0)."""
    return max(abs(u - v) for u, v in zip(a, b, strict=True)) / abs(b[0])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_50_steps_matches_native_autocast(name: str) -> None:
    make, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x, y = _data(shape, classes, seed=1)
    lr = LR.get(name, 0.05)
    native = train(copy.deepcopy(model), x, y, lambda: torch.autocast("cpu", dtype=torch.bfloat16), lr)
    emulated = train(copy.deepcopy(model), x, y, lambda: lossscale.autocast("bf16-mixed", emulate=True), lr)
    fp32 = train(copy.deepcopy(model), x, y, lambda: torch.autocast("cpu", enabled=False), lr)
    gap, control = rel_gap(emulated, native), rel_gap(fp32, native)
    print(f"{name}: loss {native[0]:.4f} -> {native[-1]:.4f}; emulated gap {gap:.2e}, fp32 gap {control:.2e}")
    assert native[-1] < 0.7 * native[0]  # it trains
    assert gap <= TOL[name]
    if TOL[name] < 1e-3:
        assert control > 100 * TOL[name]  # negative control: FP32 training is not BF16 training


def _sibling(name: str) -> types.ModuleType:
    """Import another test module of this directory (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_lossscale_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lstm_training_50_steps_matches_oracle() -> None:
    """The LSTM against the unrolled BF16-GEMM oracle (native CPU autocast cannot run nn.LSTM in BF16
    everywhere and leaves it in FP32 where it can't)."""
    oracle_rnn = _sibling("test_emulate_layers").oracle_rnn

    torch.manual_seed(0)
    model = LSTMClassifier()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)

    def oracle_forward(m: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        assert isinstance(m, LSTMClassifier)
        out, _ = oracle_rnn(m.lstm, inp)
        return F.linear(out[-1].bfloat16(), m.head.weight.bfloat16(), m.head.bias.bfloat16()).float()

    def run(
        forward: Callable[[nn.Module, torch.Tensor], torch.Tensor], ctx: Callable[[], object]
    ) -> tuple[list[float], torch.Tensor]:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.2)
        losses = []
        for _ in range(STEPS):
            with ctx():  # type: ignore[attr-defined]
                loss = F.cross_entropy(forward(m, x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, torch.cat([p.detach().flatten() for p in m.parameters()])

    oracle, w_o = run(oracle_forward, lambda: torch.autocast("cpu", enabled=False))
    emulated, w_e = run(lambda m, inp: m(inp), lambda: lossscale.autocast("bf16-mixed", emulate=True))
    fp32, w_f = run(lambda m, inp: m(inp), lambda: torch.autocast("cpu", enabled=False))
    gap, control = rel_gap(emulated, oracle), rel_gap(fp32, oracle)
    w_gap, w_control = ((w_e - w_o).norm() / w_o.norm()).item(), ((w_f - w_o).norm() / w_o.norm()).item()
    print(
        f"lstm: loss {oracle[0]:.4f} -> {oracle[-1]:.4f}; emulated gap {gap:.2e} (weights {w_gap:.2e}), "
        f"fp32 gap {control:.2e} (weights {w_control:.2e})"
    )
    assert oracle[-1] < 0.8 * oracle[0]
    assert gap <= TOL["lstm"]
    assert w_gap < w_control


# ------------------------------------------------------------------------------------------------------
# The loss-scaling laws


def _deep_mlp(depth: int, width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 4))
    return nn.Sequential(*layers)


def _train_scaled(
    model: nn.Module,
    precision: str,
    scale: float | None,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    counters: RoundingCounters | None = None,
    loss_factor: float = 1.0,
) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=scale, dynamic=False) if scale is not None else None
    for _ in range(steps):
        with lossscale.autocast(precision, emulate=True, counters=counters):
            loss = F.cross_entropy(model(x), y) * loss_factor
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    return model


def _params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_bf16_loss_scaling_law_power_of_two_scales_change_nothing() -> None:
    """Under emulated bf16-mixed, a power-of-two loss scale gives bit-identical weights, because every
    rounding commutes with 2^k while values stay in BF16's normal range (BF16 has FP32's exponent range)."""
    x, y = _data((32, 16), 4, seed=3)
    base = _deep_mlp(4, 16, seed=0)
    counters = RoundingCounters()
    unscaled = _train_scaled(copy.deepcopy(base), "bf16-mixed", None, x, y, steps=10, counters=counters)
    totals = counters.totals()["bf16"]
    assert totals.underflow == 0 and totals.subnormal == 0 and totals.overflow == 0  # the law's premise
    for k in (1, 8, 16, 40):
        scaled = _train_scaled(copy.deepcopy(base), "bf16-mixed", 2.0**k, x, y, steps=10)
        assert _params_equal(scaled, unscaled), f"scale 2^{k}"
    # The test can fail: a scale that is not a power of two changes the rounding, hence the weights.
    odd = _train_scaled(copy.deepcopy(base), "bf16-mixed", 1000.0, x, y, steps=10)
    assert not _params_equal(odd, unscaled)


def test_fp16_loss_scaling_changes_the_result_on_a_deep_net_with_small_gradients() -> None:
    """Under fp16-mixed, small activation gradients underflow FP16 without a loss scale; a scale of 2^12
    brings them back into range (Micikevicius et al., arXiv:1710.03740), so the weights differ."""
    x, y = _data((32, 16), 4, seed=3)
    base = _deep_mlp(8, 16, seed=0)
    small = 1e-4  # a small loss weight: gradients ~1e-4 smaller, many below FP16's 2^-24
    c_off, c_on = RoundingCounters(), RoundingCounters()
    unscaled = _train_scaled(copy.deepcopy(base), "fp16-mixed", None, x, y, 5, c_off, loss_factor=small)
    scaled = _train_scaled(copy.deepcopy(base), "fp16-mixed", 2.0**12, x, y, 5, c_on, loss_factor=small)
    off = c_off.totals(grad=True)["fp16"]
    on = c_on.totals(grad=True)["fp16"]
    print(
        f"fp16 gradient underflow: unscaled {off.underflow_fraction_of_nonzero:.2%}, "
        f"scale 2^12 {on.underflow_fraction_of_nonzero:.2%}"
    )
    assert off.underflow_fraction_of_nonzero > 0.05
    assert on.underflow_fraction_of_nonzero < off.underflow_fraction_of_nonzero / 10
    assert not _params_equal(scaled, unscaled)
    # And the scaled run is the one closer to FP32 training.
    fp32 = _train_scaled(copy.deepcopy(base), "fp32", None, x, y, 5, loss_factor=small)

    def dist(a: nn.Module) -> float:
        return sum((p - q).norm().item() for p, q in zip(a.parameters(), fp32.parameters(), strict=True))

    assert dist(scaled) < dist(unscaled) / 2


# ------------------------------------------------------------------------------------------------------
# FP8 hybrid


def _weight_counts(precision: Precision) -> lossscale.SiteCounts:
    torch.manual_seed(0)
    lin = nn.Linear(1024, 256)
    nn.init.normal_(lin.weight, std=0.02)
    counters = RoundingCounters()
    with lossscale.autocast(precision, counters=counters):
        lin(torch.randn(4, 1024))
    return counters.read()[("linear.weight", "e4m3")]


def test_fp8_current_scaling_keeps_weights_out_of_the_subnormal_range() -> None:
    scaled = _weight_counts(Precision.parse("fp8-hybrid"))
    unscaled = _weight_counts(Precision.parse("compute=e4m3,output=bf16,grad=e5m2,scaling=none"))
    print(
        f"E4M3 weights std 0.02: subnormal {unscaled.subnormal_fraction:.1%} / "
        f"zero {unscaled.underflow_fraction_of_nonzero:.1%}"
        f" unscaled; {scaled.subnormal_fraction:.3%} / {scaled.underflow_fraction_of_nonzero:.3%} with current scaling"
    )
    # Without scaling, |w| < 2^-6 (0.78 sigma) lies in E4M3's subnormal range: P = 56.5%. Of those,
    # |w| < 2^-10 (0.049 sigma, 3.9%) round to zero and the top ~3% round up to 2^-6, leaving ~50% subnormal
    # results.
    assert 0.53 < unscaled.subnormal_fraction + unscaled.underflow_fraction_of_nonzero < 0.57
    assert 0.46 < unscaled.subnormal_fraction < 0.53
    assert 0.030 < unscaled.underflow_fraction_of_nonzero < 0.048
    # With it, amax ~ 4.5 sigma maps into [224, 448]: subnormal needs |w| < 2^-6 / 2^12 ~ 2e-4 sigma.
    assert scaled.subnormal_fraction < 1e-3
    assert scaled.underflow_fraction_of_nonzero < 1e-4


def test_fp8_e5m2_gradient_underflow_is_counted_and_removed_by_a_loss_scale() -> None:
    x, y = _data((32, 64), 4, seed=3)
    base = _deep_mlp(3, 64, seed=0)
    c_off, c_on = RoundingCounters(), RoundingCounters()
    _train_scaled(copy.deepcopy(base), "fp8-hybrid", None, x, y, 1, c_off, loss_factor=1e-3)
    _train_scaled(copy.deepcopy(base), "fp8-hybrid", 2.0**14, x, y, 1, c_on, loss_factor=1e-3)
    off = c_off.read()
    on = c_on.read()
    grad_sites = [k for k in off if k[0].endswith("output.grad")]
    assert grad_sites and all(fmt == "e5m2" for _, fmt in grad_sites)
    under_off = sum(off[k].underflow for k in grad_sites) / sum(off[k].nonzero for k in grad_sites)
    under_on = sum(on[k].underflow for k in grad_sites) / sum(on[k].nonzero for k in grad_sites)
    print(f"E5M2 activation-gradient underflow: {under_off:.1%} unscaled, {under_on:.3%} with scale 2^14")
    assert under_off > 0.2
    assert under_on < 1e-3
    # Forward E4M3 operands are scaled per tensor: no forward underflow worth the name either way.
    assert off[("linear.input", "e4m3")].underflow_fraction_of_nonzero < 1e-3


# ------------------------------------------------------------------------------------------------------
# Low-precision weights


def test_low_precision_weights_bitwise_equal_to_native_bf16_sgd() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = _data((16, 16), 4, seed=2)

    native = copy.deepcopy(base)
    handle_n = lossscale.low_precision_weights(native, "bf16-pure", native=True)
    assert all(p.dtype == torch.bfloat16 for p in native.parameters())
    # torch's native BF16 add_ rounds alpha (-lr) to BF16, and its scalar tail rounds the product too: with a
    # power-of-two learning rate both do the same arithmetic as the FP32 update followed by one rounding.
    lr = 2.0**-4
    opt_n = torch.optim.SGD(native.parameters(), lr=lr)

    emulated = copy.deepcopy(base)
    opt_e = torch.optim.SGD(emulated.parameters(), lr=lr)
    handle_e = lossscale.low_precision_weights(emulated, "bf16-pure", optimizer=opt_e)
    assert all(p.dtype == torch.float32 for p in emulated.parameters())

    for step in range(20):
        with lossscale.autocast("bf16-pure", emulate=False, device_type="cpu"):
            F.cross_entropy(native(x).float(), y).backward()
        opt_n.step()
        opt_n.zero_grad()
        with lossscale.autocast("bf16-pure", emulate=True):
            F.cross_entropy(emulated(x), y).backward()
        opt_e.step()
        opt_e.zero_grad()
        for p_n, p_e in zip(native.parameters(), emulated.parameters(), strict=True):
            assert torch.equal(p_n.float(), p_e), f"step {step}"
    assert torch.equal(quantize(emulated[0].weight, BF16), emulated[0].weight)
    assert handle_n.native and not handle_e.native
    handle_e.remove()


def test_low_precision_weights_swamp_small_updates_and_fp32_control_does_not() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    x = torch.randn(8, 64)
    control = copy.deepcopy(lin)
    opt = torch.optim.SGD(lin.parameters(), lr=1e-5)
    lossscale.low_precision_weights(lin, BF16, optimizer=opt)
    start = lin.weight.detach().clone()
    opt_c = torch.optim.SGD(control.parameters(), lr=1e-5)
    for model, o in ((lin, opt), (control, opt_c)):
        model(x).square().mean().backward()
        o.step()
    changed = (lin.weight != start).double().mean().item()
    changed_control = (control.weight != quantize(control.weight, BF16)).double().mean().item()
    # Updates ~1e-5 * grad are far below half an ulp of |w| ~ 0.02 (2^-9 * 0.02 ~ 4e-5): all swamped.
    assert changed < 0.01
    assert changed_control > 0.5


def test_low_precision_weights_validation_and_manual_rounding() -> None:
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="native=True needs a weight format"):
        lossscale.low_precision_weights(lin, "e3m4", native=True)
    with pytest.raises(TypeError, match="model must be"):
        lossscale.low_precision_weights("lin", "bf16")  # type: ignore[arg-type]
    handle = lossscale.low_precision_weights(lin, "bf16")  # a format name: BF16 (not the bf16-mixed alias)
    assert handle.format == BF16
    with torch.no_grad():
        lin.weight.add_(2**-12)
    handle.round_()
    assert torch.equal(quantize(lin.weight, BF16), lin.weight)
    # A precision name means its weight format: bf16-mixed keeps FP32 master weights.
    assert lossscale.low_precision_weights(nn.Linear(2, 2), "bf16-mixed").format.name == "fp32"
