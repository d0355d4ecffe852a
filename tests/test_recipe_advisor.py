"""The recipe advisor: the replay of delayed scaling agrees with the emulation's own histories; the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lossscale import E4M3, RecipeState, ScalingRecipe
from lossscale.cli import main
from lossscale.diagnose import diagnose
from lossscale.emulate.recipes import recipe_operand
from lossscale.recipe_advisor import diagnose_recipes, plot_amax, replay_delayed

from .test_recipes import AMAXES, _te_delayed_oracle


@pytest.mark.parametrize("length", [1, 3, 16])
def test_replay_matches_emulation_and_te_oracle(length: int) -> None:
    recipe = ScalingRecipe("delayed", amax_history_len=length)
    state = RecipeState(record_amax=True)
    pattern = torch.tensor([1.0, -0.25, 2.0**-20, 2.0**-30])
    used = []
    for a in AMAXES:
        recipe_operand(pattern * a, op="linear", role="input", phase="fwd", dim=-1, recipe=recipe, fmt=E4M3,
                       state=state, site="fc")
        used.append(float(state.delayed["fc.input"].last_scale))
    seq, hists = state.amax_sequence("fc.input"), state.histograms("fc.input")
    assert seq == AMAXES
    scales, over, lost_over, lost_under = replay_delayed(seq, hists, E4M3, length)
    oracle_scales, oracle_over, _ = _te_delayed_oracle(AMAXES, length, "max", 0, E4M3.max)
    assert scales == used == oracle_scales
    counts = state.read()[("fc.input", "fwd")]
    assert over == counts.stale_overflow == sum(oracle_over)
    # The 2^-30 element is below E4M3's reach (2^-10 under the scaled max) at every step with a nonzero amax
    # and the 2^10 jump saturates its 1.0 element (at least) for one step.
    assert lost_under >= sum(1 for a in AMAXES if a > 0) and lost_over >= 1


def _tiny() -> tuple[torch.nn.Module, object, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    data = [(torch.randn(16, 32), torch.randint(0, 4, (16,))) for _ in range(3)]

    def loss_fn(m: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(b[0]), b[1]) * 2.0**-20  # small gradients

    return model, loss_fn, data


def test_diagnose_recipes_report(tmp_path: Path) -> None:
    model, loss_fn, data = _tiny()
    before = [p.clone() for p in model.parameters()]
    r = diagnose_recipes(model, loss_fn, data, recipes=["fp8-delayed", "mxfp4", "nvfp4"], steps=20)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # a copy trained
    assert list(r.totals) == ["fp8-delayed", "mxfp4", "nvfp4"]
    assert {k: h.longer_than_run for k, h in r.histories.items()} == {1: False, 16: False, 64: True, 256: True}
    assert all(len(seq) == 20 for seq in r.amax.values())
    # Sites: 2 linears x (input, weight, grad_output).
    assert len(r.recipes["mxfp4"]) == 6 and "2:linear.grad_output" in r.recipes["nvfp4"]
    mx4, nv = r.totals["mxfp4"], r.totals["nvfp4"]
    # MX's floor scale puts a block's amax in [4, 8): above E2M1's max 6 it saturates. NVFP4's E4M3 scale maps
    # amax to about 6 (within E4M3's rounding: never past the saturation midpoint 7).
    assert mx4.underflow > 0 and mx4.saturated > 0 and nv.saturated == 0
    assert r.recommendation.startswith("Recipe: ") and "amax_history_len=" in r.recommendation
    md = r.to_markdown()
    assert "| 256 |" in md and "longer than the run" in md
    json.dumps(r.to_dict())
    assert plot_amax(r, tmp_path / "a.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="not a scaling recipe"):
        diagnose_recipes(model, loss_fn, data, recipes=["bf16-mixed"], steps=1)  # type: ignore[arg-type]


def test_diagnose_hook_and_cli(tmp_path: Path) -> None:
    model, loss_fn, data = _tiny()
    d = diagnose(model, loss_fn, data, steps=2, recipes=["mxfp8"], recipe_steps=3)  # type: ignore[arg-type]
    assert d.meta["recipes"]["steps"] == 3 and "mxfp8" in d.meta["recipes"]["totals"]
    out = tmp_path / "out"
    rc = main(["diagnose", "--example", "deep-mlp", "--recipe", "fp8-delayed,nvfp4", "--steps", "3",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "recipes.json").read_text())
    assert set(rep["totals"]) == {"fp8-delayed", "nvfp4"} and set(rep["delayed_history"]) == {"1", "16", "64", "256"}
    assert (out / "recipes.md").exists() and (out / "recipes_amax.png").exists()


def test_longer_delayed_history_never_overflows_more_nor_underflows_less_on_one_sequence() -> None:
    # The claim, exact on one recorded amax sequence (the replay holds the data fixed; two training runs
    # do not, see test_recipes): with amax_compute_algo "max" a longer window's amax is >= a shorter one's at
    # every step, so its scale is <= : never more stale-scale overflows, never fewer underflowed values.
    recipe = ScalingRecipe("delayed", amax_history_len=1)
    state = RecipeState(record_amax=True)
    gen = torch.Generator().manual_seed(3)
    amaxes = [1.0, 0.5] * 20 + [2.0**12] + [1.0] * 10  # an oscillating amax, a jump, a drop
    for a in amaxes:
        x = torch.randn(256, generator=gen) * torch.exp2(torch.randint(-24, 0, (256,), generator=gen).float())
        x = x / x.abs().max() * a
        recipe_operand(x, op="linear", role="input", phase="fwd", dim=-1, recipe=recipe, fmt=E4M3, state=state,
                       site="fc")
    seq, hists = state.amax_sequence("fc.input"), state.histograms("fc.input")
    results = {n: replay_delayed(seq, hists, E4M3, n) for n in (1, 16, 256)}
    for short, long in ((1, 16), (16, 256)):
        _, over_s, _, under_s = results[short]
        _, over_l, _, under_l = results[long]
        assert over_l <= over_s and under_l >= under_s
    assert results[1][1] > results[256][1]  # history 1 overflows after every low step; 256 only at the jump
    assert results[256][3] > results[1][3]  # and the jump then keeps history 256's scale low: more underflow
