"""diagnose_gradients(): exported gradient arrays give the same Diagnosis as diagnose() on the same
gradients; swamping from weights and updates; the .npz layout; bad input named."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from lossscale import diagnose, diagnose_gradients
from lossscale.gradients import load_npz, save_npz

Batch = tuple[torch.Tensor, torch.Tensor]


def setup() -> tuple[nn.Module, Any, list[Batch]]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(8):
        layers += [nn.Linear(12 if i else 6, 12), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(12, 3))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]

    def loss_fn(m: nn.Module, b: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    return model, loss_fn, data


def export_run(model: nn.Module, loss_fn: Any, data: list[Batch], steps: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """A plain torch training run (SGD lr 0.01, as diagnose's default) that exports, per step, every weight
    gradient, every leaf module's output gradient, and the weights before and after the step, as numpy."""
    ref = copy.deepcopy(model).float().train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.01)
    out: dict[str, list[dict[str, np.ndarray]]] = {"gradients": [], "activations": [], "weights": [],
                                                   "new_weights": []}
    acts: dict[str, np.ndarray] = {}

    def hook_for(name: str) -> Any:
        def fwd(_m: nn.Module, _a: Any, y: torch.Tensor) -> None:
            y.register_hook(lambda g: acts.__setitem__(name, g.detach().numpy().copy()))
        return fwd

    for name, mod in ref.named_modules():
        if next(mod.children(), None) is None:
            mod.register_forward_hook(hook_for(name))
    for s in range(steps):
        acts.clear()
        opt.zero_grad(set_to_none=True)
        loss_fn(ref, data[s % len(data)]).backward()
        out["gradients"].append({n: p.grad.numpy().copy() for n, p in ref.named_parameters()})
        out["activations"].append({n: acts[n] for n, m in ref.named_modules() if next(m.children(), None) is None})
        out["weights"].append({n: p.detach().numpy().copy() for n, p in ref.named_parameters()})
        opt.step()
        out["new_weights"].append({n: p.detach().numpy().copy() for n, p in ref.named_parameters()})
    return out


def _comparable(d: Any) -> dict[str, Any]:
    x = d.to_dict()
    return {k: v for k, v in x.items() if k not in ("meta", "covers")}


def test_exported_arrays_give_the_same_diagnosis_as_diagnose(tmp_path: Path) -> None:
    model, loss_fn, data = setup()
    want = diagnose(model, loss_fn, data, steps=3, zero_check=False)
    assert want.format("e5m2").needs_scaling and want.format("fp16").subnormal_fraction > 0  # something to find
    run = export_run(model, loss_fn, data, 3)
    got = diagnose_gradients(**run)
    assert _comparable(got) == _comparable(want)
    assert got.format("bf16").swamping_fraction == want.format("bf16").swamping_fraction is not None
    # Through an .npz file, the way out of TensorFlow or JAX.
    path = save_npz(tmp_path / "g.npz", **run)
    assert _comparable(diagnose_gradients(**load_npz(path))) == _comparable(want)
    assert "diagnose_gradients" == got.meta["entry"] and "named gradient arrays" in got.to_markdown()


def test_weight_gradients_only_match_diagnose_without_activations() -> None:
    model, loss_fn, data = setup()
    want = diagnose(model, loss_fn, data, steps=2, activations=False, zero_check=False)
    run = export_run(model, loss_fn, data, 2)
    got = diagnose_gradients(run["gradients"], weights=run["weights"], new_weights=run["new_weights"])
    assert _comparable(got) == _comparable(want)


def test_swamping_from_weights_and_updates_hand_made() -> None:
    w = {"w": np.ones(4, np.float32)}
    # bf16 spacing at 1 is 2^-7, fp16's 2^-10: 1 + 2^-10 is lost in bf16, kept in fp16; 2^-7 kept in both;
    # 2^-12 lost in both; 0 is no update.
    u = {"w": np.array([2.0**-10, 2.0**-7, 2.0**-12, 0.0], np.float32)}
    d = diagnose_gradients({"w": np.ones(4, np.float32)}, weights=w, updates=u, formats=("bf16", "fp16"))
    assert d.format("bf16").swamping_fraction == 2 / 3
    assert d.format("fp16").swamping_fraction == 1 / 3
    assert "weights and their updates as given" in d.to_markdown()


def test_any_array_type_and_widths() -> None:
    g32 = np.array([1e-9, 1e-3, 0.0, 7e4], np.float32)
    ref = diagnose_gradients({"g": g32}, formats=("fp16",))
    for other in (g32.astype(np.float64), torch.from_numpy(g32), g32.tolist()):
        assert _comparable(diagnose_gradients({"g": other}, formats=("fp16",))) == _comparable(ref)
    d = ref.format("fp16")
    assert d.underflow_fraction == 0.25 and d.overflow_fraction == 0.25 and ref.zeros == 1
    bf = np.array([2.0**-30, 1.0], dtype=ml_dtypes.bfloat16)  # exact in bf16 and fp32
    d2 = diagnose_gradients({"g": bf}, formats=("fp16",))
    assert d2.format("fp16").underflow_fraction == 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"gradients": {"g": np.arange(3)}}, TypeError, "gradient 'g' .*floating-point"),
        ({"gradients": []}, ValueError, "at least one step"),
        ({"gradients": "g"}, TypeError, "mapping of name to array"),
        ({"gradients": {"g": np.ones(2)}, "weights": {"g": np.ones(2)}}, ValueError, "needs both"),
        ({"gradients": {"g": np.ones(2)}, "weights": {"h": np.ones(2)}, "updates": {"h": np.ones(2)}},
         ValueError, "'h', which has no gradient"),
        ({"gradients": {"g": np.ones(2)}, "weights": {"g": np.ones(2)}, "updates": {"g": np.ones(3)}},
         ValueError, "2 elements, its update 3"),
        ({"gradients": [{"g": np.ones(2)}] * 2, "activations": [{"a": np.ones(2)}]}, ValueError,
         "one mapping per step"),
        ({"gradients": {"g": np.ones(2)}, "formats": ("fp99",)}, ValueError, "unknown format"),
        ({"gradients": {"g": np.ones(2)}, "threshold": 2.0}, ValueError, "threshold"),
    ],
)
def test_bad_input_is_named(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        diagnose_gradients(**kwargs)


def test_npz_layout_with_free_text_names(tmp_path: Path) -> None:
    path = tmp_path / "tf.npz"
    np.savez(path, **{"dense/kernel:0": np.full((2, 2), 1e-9, np.float32), "activation::dense/Relu:0": np.ones(3),
                      "step1::dense/kernel:0": np.ones((2, 2), np.float32)})
    args = load_npz(path)
    assert args["gradients"] is not None and len(args["gradients"]) == 2
    assert list(args["gradients"][0]) == ["dense/kernel:0"] and args["weights"] is None
    d = diagnose_gradients(**args, formats=("fp16",))
    assert [(x.name, x.kind) for x in d.layers] == [("dense/kernel:0", "weight"), ("dense/Relu:0", "activation")]
    assert d.steps == 2 and d.numel == 4 + 4 + 3
    np.savez(tmp_path / "none.npz", **{"activation::a": np.ones(2)})
    with pytest.raises(ValueError, match="holds no gradient"):
        load_npz(tmp_path / "none.npz")
