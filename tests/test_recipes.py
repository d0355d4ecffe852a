"""Scaling recipes: Transformer Engine's delayed-scaling rule against a plain-Python oracle, rowwise against
torchao's float8, block/MX/NVFP4 operands along each GEMM's reduction dimension, and training on deep-mlp."""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

import lossscale
from lossscale import E4M3, E5M2, Precision, RecipeState, ScalingRecipe, quantize
from lossscale.emulate.recipes import recipe_operand

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import LinearMMConfig


def _te_delayed_oracle(
    amaxes: list[float], length: int, algo: str, margin: int, fmt_max: float
) -> tuple[list[float], list[bool], list[list[float]]]:
    """Transformer Engine's documented delayed-scaling rule, in plain Python with FP32 arithmetic (numpy):
    the step's scale comes from the amaxes recorded before it (scale 1 at the first step); after the step
    its amax joins a window of the last `length` amaxes; the next scale is (fp8_max / amax) / 2^margin with
    amax the window's max ("max") or the newest ("most_recent"), kept when amax is 0.
    Returns the scale used per step, whether amax * scale overflowed, and TE's history buffer after each
    step ([0] + the last length-1 amaxes, oldest first)."""
    f32 = np.float32
    window: collections.deque[float] = collections.deque(maxlen=length)
    scale = f32(1.0)
    used, over, hists = [], [], []
    for a in amaxes:
        used.append(float(scale))
        over.append(float(f32(a) * scale) > fmt_max)
        window.append(a)
        amax = max(window) if algo == "max" else window[-1]
        if amax > 0:
            scale = (f32(fmt_max) / f32(amax)) / f32(2.0**margin)
        past = list(window)[-(length - 1):] if length > 1 else []
        hists.append([0.0] * (length - len(past)) + past)
    return used, over, hists


AMAXES = [1.0, 1.0, 0.5, 2.0**10, 2.0**10, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 3.0]


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize(("length", "margin"), [(4, 1), (1, 0), (16, 2)])
def test_delayed_scaling_matches_transformer_engine_rule(algo: str, length: int, margin: int) -> None:
    recipe = ScalingRecipe("delayed", amax_history_len=length, amax_compute_algo=algo, margin=margin)  # type: ignore[arg-type]
    state = RecipeState()
    pattern = torch.tensor([1.0, -0.5, 0.3, -0.0, 0.01, 1e-6])
    scales, outs = [], []
    for a in AMAXES:
        x = pattern * a
        out = recipe_operand(x, op="linear", role="input", phase="fwd", dim=-1, recipe=recipe, fmt=E4M3,
                             state=state, site="fc")
        scales.append(float(state.delayed["fc.input"].last_scale))
        outs.append(out)
        hist = state.delayed["fc.input"].history.tolist()
        if a == 0.0:
            assert torch.equal(out, x)
    used, over, hists = _te_delayed_oracle(AMAXES, length, algo, margin, E4M3.max)
    assert scales == used
    assert hist == hists[-1]
    for a, s, out in zip(AMAXES, used, outs, strict=True):
        s_t = torch.tensor(s)
        assert torch.equal(out, quantize(pattern * a * s_t, E4M3, saturate=True) * torch.reciprocal(s_t))
    counts = state.read()[("fc.input", "fwd")]
    assert counts.stale_overflow == sum(over) and counts.calls == len(AMAXES)
    # The 2^10 jump overflows for exactly one step (the stale scale), as TE documents.
    jump = AMAXES.index(2.0**10)
    assert over[jump] and not over[jump + 1]
    assert counts.saturated >= 1


def test_delayed_power_of_two_and_phases() -> None:
    recipe = ScalingRecipe("delayed", amax_history_len=2, power_of_two=True)
    state = RecipeState()
    for a in (3.0, 3.0):
        recipe_operand(torch.tensor([a]), op="linear", role="grad_output", phase="dgrad", dim=-1, recipe=recipe,
                       fmt=E5M2, state=state, site="fc")
        # wgrad reuses dgrad's scale and records nothing.
        recipe_operand(torch.tensor([a * 100]), op="linear", role="grad_output", phase="wgrad", dim=-2,
                       recipe=recipe, fmt=E5M2, state=state, site="fc")
    h = state.delayed["fc.grad_output"]
    assert float(h.last_scale) == 2.0**14  # 57344 / 3 = 19114.7, rounded down to a power of two
    assert h.history.tolist() == [0.0, 3.0]


def test_rowwise_matches_torchao_float8_axiswise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g) * torch.exp2(torch.randint(-20, 20, (32, 1), generator=g).float())
    x[3] = 0.0
    x[5] *= 1e-14  # below torchao's amax floor 1e-12
    for pow2 in (True, False):
        recipe = ScalingRecipe("rowwise", power_of_two=pow2)
        for dim in (-1, 0):
            ours = recipe_operand(x, op="linear", role="input", phase="fwd", dim=dim, recipe=recipe, fmt=E4M3,
                                  state=RecipeState(), site="fc")
            ref = hp_tensor_to_float8_dynamic(
                x, torch.float8_e4m3fn, LinearMMConfig(), scaling_granularity=ScalingGranularity.AXISWISE,
                axiswise_dim=dim, round_scales_to_power_of_2=pow2,
            ).to_original_precision()
            assert torch.equal(ours, ref), (pow2, dim)


def test_block_tiles_1x128_and_weights_128x128() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 256, generator=g)
    x[0, :128] *= 1e-6  # its own tile: scaled up on its own
    recipe = ScalingRecipe("block")
    out = recipe_operand(x, op="linear", role="input", phase="fwd", dim=-1, recipe=recipe, fmt=E4M3,
                         state=RecipeState(), site="fc")
    for r in range(4):
        for c in (0, 128):
            tile = x[r, c:c + 128]
            s = E4M3.max / tile.abs().amax()
            assert torch.equal(out[r, c:c + 128], quantize(tile * s, E4M3, saturate=True) * torch.reciprocal(s))
    w = torch.randn(200, 130, generator=g)  # ragged 128x128 tiles: (128 + 72) x (128 + 2)
    wq = recipe_operand(w, op="linear", role="weight", phase="fwd", dim=1, recipe=recipe, fmt=E4M3,
                        state=RecipeState(), site="fc")
    for r0, r1, c0, c1 in ((0, 128, 0, 128), (128, 200, 128, 130), (0, 128, 128, 130)):
        tile = w[r0:r1, c0:c1]
        s = E4M3.max / tile.abs().amax()
        assert torch.equal(wq[r0:r1, c0:c1], quantize(tile * s, E4M3, saturate=True) * torch.reciprocal(s))


@pytest.mark.parametrize("name", ["mxfp8", "nvfp4"])
def test_gemms_requantize_along_their_reduction_dims(name: str) -> None:
    """Forward, dgrad and wgrad each quantize their operands from FP32 along their own reduction dim."""
    p = Precision.parse(name)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(48, 64, generator=g) * torch.exp2(torch.randint(-8, 8, (48, 64), generator=g).float()))
    w = torch.randn(32, 64, generator=g).requires_grad_()
    x.requires_grad_()
    gy = torch.randn(48, 32, generator=g) * torch.exp2(torch.randint(-8, 8, (48, 32), generator=g).float())
    with lossscale.autocast(name, recipe_state=RecipeState()):
        y = torch.nn.functional.linear(x, w)
    y.backward(gy)
    c, gr = p.compute, p.grad

    def q(t: torch.Tensor, fmt: lossscale.FloatFormat, dim: int) -> torch.Tensor:
        bf = lossscale.BlockFormat(fmt, "e8m0", 32) if name == "mxfp8" else lossscale.BlockFormat(fmt, "e4m3", 16, True)
        return quantize(t.detach(), bf, dim=dim)

    bf16 = lossscale.BF16
    assert torch.equal(y, quantize(q(x, c, 1) @ q(w, c, 1).t(), bf16))
    assert torch.equal(x.grad, quantize(q(gy, gr, 1) @ q(w, c, 0), bf16))
    assert torch.equal(w.grad, quantize(q(gy, gr, 0).t() @ q(x, c, 0), bf16))
    # Negative control: reusing the forward blocks of w (along dim 1) gives a different dgrad.
    assert not torch.equal(x.grad, quantize(q(gy, gr, 1) @ q(w, c, 1), bf16))


def test_presets_and_parse() -> None:
    assert Precision.parse("fp8-delayed").recipe == ScalingRecipe("delayed")
    assert Precision.parse("fp8-rowwise").recipe == ScalingRecipe("rowwise", power_of_two=True)
    assert Precision.parse("mxfp4").compute == lossscale.E2M1
    assert Precision.parse("fp8-hybrid").recipe is None and Precision.parse("fp8-hybrid").scaling == "current"
    p = Precision.parse("compute=e4m3,grad=e5m2,recipe=mx")
    assert p.recipe == ScalingRecipe("mx") and Precision.parse(p.name) == p
    custom = dataclasses.replace(Precision.parse("fp8-delayed"), recipe=ScalingRecipe("delayed", amax_history_len=16))
    assert custom.name.endswith("recipe=delayed")
    with pytest.raises(ValueError, match="exclude each other"):
        Precision(compute=E4M3, scaling="current", recipe=ScalingRecipe("mx"))
    with pytest.raises(ValueError, match="amax_compute_algo"):
        ScalingRecipe("delayed", amax_compute_algo="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="enabled=False"):
        ScalingRecipe("mx", enabled=False)
    with pytest.warns(UserWarning, match="recipe_state"):
        lossscale.autocast("fp8-delayed")


# ----------------------------------------------------------------------------------------------------
# Training on deep-mlp (the study's task): the recipes' counters tell them apart.


def _train(precision: Precision | str, steps: int = 20) -> tuple[lossscale.RecipeCounts, lossscale.RecipeCounts]:
    """Counts over all operands, and over the gradients entering dgrad GEMMs."""
    from lossscale.study import tasks

    torch.manual_seed(0)
    inst = tasks.build("deep-mlp", "tiny", seed=0)
    opt = torch.optim.AdamW(inst.model.parameters(), lr=1e-3)
    state = RecipeState()
    for step in range(steps):
        if step == 1:
            state.reset_counts()  # step 0 runs at scale 1 under every history length: count from step 1
        batch = next(inst.batches)
        with lossscale.autocast(precision, recipe_state=state, model=inst.model):
            loss = inst.loss_fn(inst.model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert math.isfinite(float(loss.detach()))
    counts = state.read()
    grads = [c for (key, phase), c in counts.items() if key.endswith(".grad_output") and phase == "dgrad"]
    return sum(counts.values(), lossscale.RecipeCounts()), sum(grads, lossscale.RecipeCounts())


def _delayed(length: int, enabled: bool = True) -> Precision:
    return dataclasses.replace(
        Precision.parse("fp8-delayed"), recipe=ScalingRecipe("delayed", amax_history_len=length, enabled=enabled)
    )


def test_training_delayed_history_nvfp4_vs_mxfp4_and_negative_control() -> None:
    (h1, _), (h256, g256), (_, g_off) = _train(_delayed(1)), _train(_delayed(256)), _train(_delayed(256, False))
    # A longer history keeps the scale of the largest amax seen: fewer stale-scale overflows than a history of
    # one step (the gradients grow during the run, so history 1 overflows on many steps). Underflow comes
    # from each tensor's own dynamic range (values 2^-17.8 below its amax vanish in E4M3 whatever the scale),
    # the same to 0.1% under both (the runs' trajectories differ by a few elements either way).
    assert h1.stale_overflow > 0
    assert h256.stale_overflow < h1.stale_overflow
    assert h256.underflow >= 0.999 * h1.underflow
    # Negative control: FP8 without scales loses the small gradients (loss weight 2^-14) to underflow: every
    # nonzero gradient entering a dgrad GEMM vanishes (the layers below then see exact zeros).
    assert g_off.underflow_fraction > 0.99 and g256.underflow_fraction < 0.2 and g256.nonzero > 10 * g_off.nonzero
    # NVFP4's finer blocks (16, E4M3 scales) underflow no more than MXFP4's (32, power-of-two scales).
    (nv, _), (mx4, _) = _train("nvfp4"), _train("mxfp4")
    assert nv.underflow_fraction <= mx4.underflow_fraction
    assert mx4.underflow > 0


def test_other_ops_fall_back_loudly_and_attention_projections_use_the_recipe() -> None:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
    conv = torch.nn.Conv1d(4, 8, 3)
    x = torch.randn(2, 16, 64, requires_grad=True)  # so that the in-projection has a dgrad GEMM
    state = RecipeState()
    with pytest.warns(UserWarning, match="mha operands are quantized along their last dimension"):
        with lossscale.autocast("mxfp8", recipe_state=state, model=layer):
            y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    phases = {(k.split(":")[-1], ph) for k, ph in state.read()}
    # linear1/linear2 and the in/out projections: all three GEMMs quantize (grad_output in dgrad and wgrad).
    assert {("linear.grad_output", "dgrad"), ("linear.grad_output", "wgrad"), ("mha.weight", "dgrad")} <= phases
    with pytest.warns(UserWarning, match="conv1d operands"):
        with lossscale.autocast("nvfp4", recipe_state=RecipeState()):
            conv(torch.randn(2, 4, 10))


def test_composite_op_pieces_take_the_recipe_along_their_reduction_dims() -> None:
    # einsum reaches the emulation as aten bmm pieces (lossscale.emulate.aten); under mxfp8 every piece's
    # operand must hold MX-quantized values along that GEMM's reduction dim (a: -1, b: -2), in an aten-level
    # audit independent of the emulation's bookkeeping. Negative control: the same audit without the recipe.
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Audit(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten.bmm.default:
                seen.append((args[0].detach().clone(), args[1].detach().clone()))
            return func(*args, **(kwargs or {}))

    def mx_valued(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a, lossscale.quantize(a, "mxfp8_e4m3", dim=-1)) and torch.equal(
            b, lossscale.quantize(b, "mxfp8_e4m3", dim=-2)
        )

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 8, 64, generator=gen) * torch.exp2(torch.randint(-8, 8, (2, 8, 64), generator=gen))
    b = torch.randn(2, 64, 16, generator=gen)
    state = lossscale.emulate.RecipeState()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Audit(), lossscale.autocast("mxfp8", emulate=True, recipe_state=state):
            torch.einsum("bij,bjk->bik", a, b)
    assert seen and all(mx_valued(x, y) for x, y in seen)
    counts = state.read()
    assert any(k[0].startswith("einsum.bmm") and k[1] == "fwd" for k in counts)
    seen.clear()
    with Audit():
        torch.einsum("bij,bjk->bik", a, b)
    assert seen and not any(mx_valued(x, y) for x, y in seen)


@pytest.mark.filterwarnings("ignore:.*keyed by op name only")
def test_delayed_gives_each_operand_of_an_activation_gemm_its_own_history() -> None:
    # matmul(a * 1e-3, b * 1e3) with both operands activations: one shared history would give b the scale of
    # a's (tiny) amax and saturate it. Each operand slot has its own history: after the first step (scale 1)
    # nothing saturates and the product matches FP32 to E4M3's precision.
    gen = torch.Generator().manual_seed(0)
    a0 = torch.randn(2, 8, 16, generator=gen)
    b0 = torch.randn(2, 16, 4, generator=gen)
    state = RecipeState()
    for step in range(3):
        if step == 1:
            state.reset_counts()
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        with lossscale.autocast("fp8-delayed", emulate=True, recipe_state=state):
            y = torch.matmul(a * 1e-3, b * 1e3)  # activations, not leaves
        y.sum().backward()
    counts = state.read()
    assert sum(c.saturated for c in counts.values()) == 0
    ref = torch.matmul(a0 * 1e-3, b0 * 1e3)
    assert ((y.detach() - ref).abs().max() / ref.abs().max()).item() < 0.1
    assert {"matmul.input", "matmul.mat2.input"} <= {k for k, _ in counts}


@pytest.mark.filterwarnings("ignore:.*keyed by op name only")
def test_composite_pieces_give_each_operand_slot_its_own_delayed_history() -> None:
    gen = torch.Generator().manual_seed(0)
    a0 = torch.randn(2, 8, 16, generator=gen)
    b0 = torch.randn(2, 16, 4, generator=gen)
    state = RecipeState()
    for step in range(3):
        if step == 1:
            state.reset_counts()
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        with lossscale.autocast("fp8-delayed", emulate=True, recipe_state=state):
            y = torch.einsum("bij,bjk->bik", a * 1e-3, b * 1e3)  # activations, not leaves
        y.sum().backward()
    counts = state.read()
    assert sum(c.saturated for (_, ph), c in counts.items() if ph == "fwd") == 0
    assert any(k.endswith(".mat2.input") for k, _ in counts)


def test_delayed_without_model_warns_once_per_state() -> None:
    state = RecipeState()
    with pytest.warns(UserWarning, match="keyed by op name only.*model="):
        lossscale.autocast("fp8-delayed", emulate=True, recipe_state=state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lossscale.autocast("fp8-delayed", emulate=True, recipe_state=state)  # once per RecipeState
        lossscale.autocast("fp8-delayed", emulate=True, recipe_state=RecipeState(), model=torch.nn.Linear(2, 2))


def test_delayed_first_layer_records_grad_output_in_wgrad() -> None:
    # A first layer (its input needs no gradient) has no dgrad GEMM: grad_output's amax must be recorded in
    # wgrad, else its scale stays 1 and gradients of ~1e-6 all underflow in E5M2 (min subnormal 2^-16).
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64)
    c = torch.randn(16, 32) * 1e-6
    state = RecipeState()
    for step in range(3):
        if step == 2:
            state.reset_counts()
        layer.zero_grad()
        with lossscale.autocast("fp8-delayed", emulate=True, recipe_state=state, model=layer):
            y = layer(x)
        (y * c).sum().backward()
    ref = c.t() @ x  # the FP32 weight gradient
    grads = [cnt for (k, ph), cnt in state.read().items() if k.endswith("grad_output") and ph == "wgrad"]
    assert grads and sum(g.nonzero for g in grads) > 0
    assert sum(g.underflow for g in grads) < 0.01 * sum(g.nonzero for g in grads)
    assert ((layer.weight.grad - ref).abs().max() / ref.abs().max()).item() < 0.15  # E4M3/E5M2 operands


def test_composite_backward_pieces_take_the_recipe_along_their_reduction_dims() -> None:
    # einsum's backward runs aten bmm pieces (dgrad: g @ b^T, wgrad: a^T @ g): under mxfp8 both operands of
    # every one of them, the gradient included, must hold MX-quantized E4M3 values along that GEMM's
    # reduction dim, in an aten-level audit. Negative control: the same audit of the unemulated backward.
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Audit(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten.bmm.default:
                seen.append((args[0].detach().clone(), args[1].detach().clone()))
            return func(*args, **(kwargs or {}))

    def mx_valued(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a, lossscale.quantize(a, "mxfp8_e4m3", dim=-1)) and torch.equal(
            b, lossscale.quantize(b, "mxfp8_e4m3", dim=-2)
        )

    gen = torch.Generator().manual_seed(1)
    a = (torch.randn(2, 32, 64, generator=gen) * 3).requires_grad_()
    b = torch.randn(2, 64, 32, generator=gen).requires_grad_()
    g = torch.randn(2, 32, 32, generator=gen) * torch.exp2(torch.randint(-8, 8, (2, 32, 32), generator=gen))
    state = RecipeState()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with lossscale.autocast("mxfp8", emulate=True, recipe_state=state):
            y = torch.einsum("bij,bjk->bik", a, b)
    with Audit():
        y.backward(g)
    assert len(seen) == 2, [(x.shape, w.shape) for x, w in seen]
    assert all(mx_valued(x, w) for x, w in seen)
    phases = {(k, ph) for k, ph in state.read()}
    assert {("einsum.bmm.grad_output", "dgrad"), ("einsum.bmm.grad_output", "wgrad")} <= phases
    seen.clear()
    a.grad = b.grad = None
    y = torch.einsum("bij,bjk->bik", a, b)
    with Audit():
        y.backward(g)
    assert len(seen) == 2 and not any(mx_valued(x, w) for x, w in seen)


def test_quantize_count_false_is_not_counted_under_a_recipe() -> None:
    # count=False marks a recomputation of a rounding already counted (flash attention's P in backward): the
    # recipe path must neither count it nor record it, and must return the same values as the counted call.
    from lossscale.emulate._core import Emulator, Operand

    state = RecipeState(record_amax=True)
    emu = Emulator(Precision.parse("mxfp8"), None, state)
    p = torch.rand(2, 8, 64, generator=torch.Generator().manual_seed(2))
    info = Operand("sdpa", "probs", "forward", (-1,), True)
    counted = emu.quantize(p, emu.compute, "", info)
    again = emu.quantize(p, emu.compute, "", info, count=False)
    assert torch.equal(counted, again)
    counts = state.read()
    assert sum(c.calls for c in counts.values()) == 1
    assert sum(len(v) for v in state.amax.values()) == 1
