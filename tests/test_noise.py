"""Numerically zero gradients: the GPT-2-style attention key bias (softmax is invariant to it) is rounding
noise in FP32 and must not be reported as underflow; a genuinely tiny gradient (1e-30) still is."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lossscale import Diagnosis, diagnose
from lossscale.noise import FP64RecomputationError, numerically_zero_masks, to_double

D, HEADS, T, VOCAB = 16, 2, 6, 11
Batch = tuple[torch.Tensor, torch.Tensor]


class Block(nn.Module):
    """GPT-2's attention: one fused q,k,v projection with bias (``c_attn``), causal softmax attention."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(self.ln(x)).split(D, dim=-1)
        q, k, v = (z.view(b, t, HEADS, D // HEADS).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return x + self.c_proj((att @ v).transpose(1, 2).reshape(b, t, D))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.h = nn.Sequential(Block(), Block())
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.h(self.wte(ids)))


def gpt() -> tuple[nn.Module, Callable[..., torch.Tensor], list[Batch]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, VOCAB, (4, T), generator=g), torch.randint(0, VOCAB, (4, T), generator=g))
            for _ in range(2)]

    def loss_fn(m: nn.Module, b: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]).reshape(-1, VOCAB), b[1].reshape(-1))

    return TinyGPT(), loss_fn, data


def test_key_bias_is_rounding_noise_and_exactly_the_key_third() -> None:
    model, loss_fn, data = gpt()
    masks = numerically_zero_masks(model, loss_fn, data[0])
    assert sorted(masks) == ["h.0.c_attn.bias", "h.1.c_attn.bias"]
    key_third = torch.zeros(3 * D, dtype=torch.bool)
    key_third[D : 2 * D] = True
    assert next(model.parameters()).dtype == torch.float32  # the model itself was not changed
    # The oracle: recompute by hand in FP32 and FP64 from the same weights. The key third's FP32 gradient is
    # noise (~1e-10; now and then an exact 0), its FP64 gradient ~1e9 times smaller; q and v thirds agree.
    m32, m64 = TinyGPT(), TinyGPT().double()
    m32.load_state_dict(model.state_dict())
    m64.load_state_dict(model.state_dict())
    loss_fn(m32, data[0]).backward()
    loss_fn(m64, data[0]).backward()
    for i, name in enumerate(["h.0.c_attn.bias", "h.1.c_attn.bias"]):
        g32, g64 = m32.h[i].c_attn.bias.grad, m64.h[i].c_attn.bias.grad.float()
        assert torch.equal(masks[name], key_third & (g32 != 0))  # exactly the nonzero key-bias elements
        assert int(masks[name].sum()) >= D - 2
        assert float(g32[D : 2 * D].abs().max()) < 1e-7
        assert float(g64[D : 2 * D].abs().max()) < 1e-6 * float(g32[D : 2 * D].abs().max())
        rel = ((g32 - g64).abs() / g64.abs())[~key_third]
        assert float(rel.max()) < 1e-3  # the q and v biases: genuine gradients, FP32 agrees with FP64


def _layer(d: Diagnosis, name: str) -> Any:
    return next(x for x in d.layers if x.name == name and x.kind == "weight")


def test_diagnose_reports_the_key_bias_as_numerically_zero_not_underflow() -> None:
    model, loss_fn, data = gpt()
    on = diagnose(model, loss_fn, data, steps=2, formats=("fp16", "bf16"))
    off = diagnose(model, loss_fn, data, steps=2, formats=("fp16", "bf16"), zero_check=False)
    # Without the check the key third of c_attn.bias (noise ~1e-9) underflows in FP16: the false alarm.
    bias_off = _layer(off, "h.0.c_attn.bias")
    assert bias_off.formats["fp16"]["underflow_fraction"] >= 0.3
    masks = numerically_zero_masks(model, loss_fn, data[0])  # from the first batch, as diagnose does
    bias_on = _layer(on, "h.0.c_attn.bias")
    # At most an element that was an exact FP32 zero on the first batch (so not masked) is noise on the 2nd.
    assert bias_on.formats["fp16"]["underflow_fraction"] <= 1 / (2 * 3 * D)
    assert bias_on.numerically_zero == 2 * int(masks["h.0.c_attn.bias"].sum())  # on both steps
    assert on.numerically_zero == 2 * sum(int(m.sum()) for m in masks.values())
    assert on.format("fp16").underflow_fraction < off.format("fp16").underflow_fraction
    # Everything else is the same measurement.
    for a, b in zip(on.layers, off.layers, strict=True):
        if a.name not in ("h.0.c_attn.bias", "h.1.c_attn.bias"):
            assert a.to_dict() == b.to_dict()
    md = on.to_markdown()
    assert "Numerically zero" in md and "h.0.c_attn.bias" in md
    n = sum(int(m.sum()) for m in masks.values())
    assert on.meta["numerically_zero_check"] == f"on: {n} elements per step in 2 parameters"
    assert Diagnosis.from_dict(on.to_dict()).numerically_zero == on.numerically_zero


class Tiny(nn.Module):
    """out = x @ w + 1e-30 * (x @ v): v's gradient is genuinely ~1e-30 (a normal FP32 number)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2))
        self.v = nn.Parameter(torch.randn(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + 1e-30 * (x @ self.v)


def test_a_genuinely_tiny_gradient_is_still_underflow_in_fp16() -> None:
    torch.manual_seed(0)
    model = Tiny()
    data = [torch.randn(8, 4) + 2.0]

    def loss_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x).sum()

    assert numerically_zero_masks(model, loss_fn, data[0]) == {}
    d = diagnose(model, loss_fn, data, steps=1, formats=("fp16", "bf16"), activations=False)
    v = _layer(d, "v")
    assert v.numerically_zero == 0 and v.zeros == 0
    assert v.formats["fp16"]["underflow_fraction"] == 1.0  # 1e-30 << 2^-25
    assert v.formats["bf16"]["underflow_fraction"] == 0.0  # bf16 holds 1e-30
    assert 1e-31 < v.max_abs < 1e-28


class Float32Only(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.float() @ torch.eye(3, dtype=torch.float32))  # hard-coded FP32: fails in FP64


def test_model_that_cannot_run_in_fp64_warns_and_is_measured_without_the_check() -> None:
    model = Float32Only()
    data = [torch.randn(5, 3)]
    fn = lambda m, x: m(x).sum()  # noqa: E731
    with pytest.raises(FP64RecomputationError):
        numerically_zero_masks(model, fn, data[0])
    with pytest.warns(RuntimeWarning, match="numerically-zero check skipped: the FP64 recomputation failed"):
        d = diagnose(model, fn, data, steps=1)
    assert d.meta["numerically_zero_check"].startswith("skipped")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diagnose(model, fn, data, steps=1, zero_check=False)


def test_to_double_converts_floating_tensors_only() -> None:
    batch = {"x": torch.ones(2), "ids": torch.ones(2, dtype=torch.long), "nested": [(torch.zeros(1),)]}
    out = to_double(batch)
    assert out["x"].dtype == torch.float64 and out["ids"].dtype == torch.long
    assert out["nested"][0][0].dtype == torch.float64


def test_real_transformers_gpt2_key_bias_is_numerically_zero() -> None:
    """The case of the issue, on the real Hugging Face GPT-2 (tiny config, random weights, no download):
    its fused c_attn.bias had a third of its elements flagged as FP16 underflow."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(2)]

    def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]

    masks = numerically_zero_masks(model, loss_fn, data[0])
    key_third = torch.zeros(96, dtype=torch.bool)
    key_third[32:64] = True
    assert sorted(masks) == ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]
    assert all(torch.equal(m, key_third) for m in masks.values())
    on = diagnose(model, loss_fn, data, steps=2)
    off = diagnose(model, loss_fn, data, steps=2, zero_check=False)
    bias_on, bias_off = _layer(on, "transformer.h.0.attn.c_attn.bias"), _layer(off, "transformer.h.0.attn.c_attn.bias")
    assert bias_off.formats["fp16"]["underflow_fraction"] == pytest.approx(1 / 3)  # the false alarm
    assert bias_on.formats["fp16"]["underflow_fraction"] == 0.0 and bias_on.numerically_zero == 2 * 32
    assert on.numerically_zero == 2 * 2 * 32
