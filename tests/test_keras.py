"""Keras 3 models on Keras' torch backend are torch modules: diagnose() and autocast() work on them.

Checked on a keras.Sequential and a functional keras.Model: diagnose's weight-gradient statistics equal
diagnose_gradients() on the same model's gradients taken by plain torch autograd; under autocast every Dense
matmul is emulated (the output equals the same ops written in torch under the same autocast, bit for bit, and
differs from FP32).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

if "keras" in sys.modules and os.environ.get("KERAS_BACKEND", "tensorflow") != "torch":  # pragma: no cover
    pytest.skip("keras was already imported with another backend in this process", allow_module_level=True)
os.environ["KERAS_BACKEND"] = "torch"  # must be set before keras is imported
keras = pytest.importorskip("keras", reason="keras is not installed (pip install keras); CI installs it")

import copy  # noqa: E402

import torch  # noqa: E402

import lossscale  # noqa: E402
from lossscale import diagnose, diagnose_gradients  # noqa: E402

# Keras' own torch backend converts its variables with np.array(x) (keras/src/backend/torch/core.py), which
# numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def sequential() -> Any:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)]
    )


def functional() -> Any:
    keras.utils.set_random_seed(1)
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="tanh")(inp)
    h2 = keras.layers.Dense(16, activation="tanh")(h)
    out = keras.layers.Dense(3)(keras.layers.Add()([h, h2]))
    return keras.Model(inp, out)


_ce = None


def loss_fn(m: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    global _ce
    if _ce is None:
        _ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = b
    return _ce(y, m(x))  # type: ignore[no-any-return]


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 8, generator=g) * 1e-7, torch.randint(0, 3, (32,), generator=g)) for _ in range(2)]


@pytest.mark.parametrize("make", [sequential, functional], ids=["sequential", "functional"])
def test_diagnose_on_a_keras_model_equals_its_own_gradients(make: Any) -> None:
    model = make()
    assert isinstance(model, torch.nn.Module)
    batches = data()
    d = diagnose(model, loss_fn, batches, steps=2, formats=("bf16", "fp16", "e5m2"))
    assert {x.kind for x in d.layers} == {"weight"}  # Keras layers are not torch submodules: no activation rows
    assert d.meta["numerically_zero_check"].startswith("on:")
    # The oracle: the same training in plain torch autograd, gradients and weights exported.
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.01)
    names = [n for n, _ in ref.named_parameters()]
    grads, before, after = [], [], []
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(ref, b).backward()
        grads.append({n: p.grad.numpy().copy() for n, p in ref.named_parameters()})
        before.append({n: p.detach().numpy().copy() for n, p in ref.named_parameters()})
        opt.step()
        after.append({n: p.detach().numpy().copy() for n, p in ref.named_parameters()})
    want = diagnose_gradients(grads, weights=before, new_weights=after, formats=("bf16", "fp16", "e5m2"))
    assert d.to_dict()["formats"] == want.to_dict()["formats"]
    assert [x.numel for x in d.layers] == [x.numel for x in want.layers] and len(names) == len(d.layers)
    assert d.format("fp16").underflow_fraction > 0  # inputs scaled by 1e-7: the kernels' gradients are tiny
    assert d.format("bf16").swamping_fraction is not None  # the torch optimizer did update the Keras variables


@pytest.mark.parametrize("make", [sequential, functional], ids=["sequential", "functional"])
def test_autocast_emulates_every_keras_dense_layer(make: Any) -> None:
    model = make()
    x = data()[0][0] * 1e7
    kernels = {p.shape: p for p in model.parameters()}
    n_dense = sum(1 for p in model.parameters() if p.dim() == 2)
    with torch.no_grad():
        fp32 = model(x)
    counters = lossscale.RoundingCounters()
    with lossscale.autocast("bf16-mixed", counters=counters):
        emulated = model(x)
    assert counters.gemms.get("matmul", 0) + counters.gemms.get("linear", 0) == n_dense
    assert not torch.equal(emulated.float(), fp32)
    torch.testing.assert_close(emulated.float(), fp32, rtol=5e-2, atol=5e-2)
    assert kernels  # the model has its variables as torch parameters


def test_keras_dense_under_autocast_equals_the_same_torch_ops_bit_for_bit() -> None:
    model = sequential()
    k1, b1, k2, b2 = (v.value for v in model.weights)  # Keras variables: torch tensors on this backend
    assert k1.shape == (8, 16) and b2.shape == (3,)
    x = data()[0][0] * 1e7
    with lossscale.autocast("bf16-mixed"):
        got = model(x)
        want = torch.tanh(x @ k1 + b1) @ k2 + b2
    assert torch.equal(got, want)
    with torch.no_grad():
        plain = torch.tanh(x @ k1 + b1) @ k2 + b2
    assert not torch.equal(want.float(), plain)  # and the emulation did round

