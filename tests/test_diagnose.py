"""diagnose(): the verdicts on a deep tanh MLP and a shallow one, the recommended scale, the schema."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lossscale import BF16, E5M2, FP16, Diagnosis, FloatFormat, GradientMonitor, diagnose
from lossscale.diagnose import ScaleInterval, recommend_scale, underflow_count_at
from lossscale.monitor import HIST_MAX_LOG2, HIST_MIN_LOG2, Columns, gradient_stats

NB = HIST_MAX_LOG2 - HIST_MIN_LOG2 + 1
Batch = tuple[torch.Tensor, torch.Tensor]


def tanh_mlp(depth: int, width: int = 32, seed: int = 0) -> tuple[nn.Module, Callable[..., torch.Tensor], list[Batch]]:
    """A tanh MLP without normalisation, default init: gradients shrink layer by layer going back."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width if i else 16, width), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 4))
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)) for _ in range(4)]

    def loss_fn(m: nn.Module, b: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    return model, loss_fn, data


@pytest.fixture(scope="module")
def deep() -> tuple[nn.Module, Callable[..., torch.Tensor], list[Batch], Diagnosis]:
    model, loss_fn, data = tanh_mlp(30)
    return model, loss_fn, data, diagnose(model, loss_fn, data, steps=1)


def test_deep_tanh_mlp_needs_fp16_and_e5m2_scaling_not_bf16(deep: Any) -> None:
    *_, d = deep
    assert d.source == "fp32"
    assert d.format("fp16").needs_scaling and d.format("e5m2").needs_scaling
    assert not d.format("bf16").needs_scaling
    assert d.format("bf16").underflow_fraction == 0.0
    assert d.format("fp16").underflow_fraction > 0.1  # the early layers' gradients are far below 2^-25
    assert d.format("fp16").recommended_scale is not None
    assert d.format("bf16").recommended_scale is not None and 1.0 in d.format("bf16").recommended_scale
    # Per layer: the first layer's weight gradient underflows entirely in FP16, the last layer's does not.
    layers = {(x.name, x.kind): x for x in d.layers}
    assert layers[("0.weight", "weight")].formats["fp16"]["underflow_fraction"] == 1.0
    assert layers[("60.weight", "weight")].formats["fp16"]["underflow_fraction"] == 0.0


def _measure_at_scale(model: nn.Module, loss_fn: Callable[..., torch.Tensor], batch: Batch, scale: float) -> np.ndarray:
    """All gradients (weights and activations) of one backward of ``loss * scale``, measured in fp16."""
    import copy

    m = copy.deepcopy(model)
    mon = GradientMonitor(m, formats=("fp16",), every=1)
    (loss_fn(m, batch) * scale).backward()
    mon.step()
    return mon.read().kind_total(None)


def test_recommended_fp16_scale_removes_the_underflow_when_applied(deep: Any) -> None:
    model, loss_fn, data, d = deep
    rs = d.format("fp16").recommended_scale
    c = Columns(1)
    for k in (rs.log2_min, rs.log2_max):
        row = _measure_at_scale(model, loss_fn, data[0], 2.0**k)
        assert row[c.underflow(0)] / row[c.NUMEL] <= d.threshold, k
        assert row[c.overflow(0)] == 0, k
        # The prediction from the scale-1 histogram is exact: power-of-two scaling commutes with FP32 rounding.
        assert row[c.underflow(0)] == underflow_count_at(d.hist, FP16, k)
    # Negative controls: one binade below the interval underflows too much; far above, something overflows.
    row = _measure_at_scale(model, loss_fn, data[0], 2.0 ** (rs.log2_min - 1))
    assert row[c.underflow(0)] / row[c.NUMEL] > d.threshold
    row = _measure_at_scale(model, loss_fn, data[0], 2.0 ** (rs.log2_max + 1))
    assert row[c.overflow(0)] > 0


def test_two_layer_mlp_needs_no_fp16_scaling() -> None:
    model, loss_fn, data = tanh_mlp(2)
    d = diagnose(model, loss_fn, data, steps=4)
    assert not d.format("fp16").needs_scaling
    assert not d.format("bf16").needs_scaling
    assert 1.0 in d.format("fp16").recommended_scale
    assert "no loss scaling needed" in d.format("fp16").recommendation


def test_diagnose_leaves_the_model_alone_and_counts_steps() -> None:
    model, loss_fn, data = tanh_mlp(2)
    before = [p.detach().clone() for p in model.parameters()]
    d = diagnose(model, loss_fn, data[:2], steps=5)  # a list is cycled
    assert d.steps == 5
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False))
    d = diagnose(model, loss_fn, iter(data[:2]), steps=5)  # a one-shot iterator is not
    assert d.steps == 2
    # Elements: weights (numel per step) + activations (batch x width per leaf module), per step.
    n_w = sum(p.numel() for p in model.parameters())
    n_a = 64 * (32 + 32 + 32 + 32 + 4)
    assert d.numel == 2 * (n_w + n_a)


def test_swamping_is_reported_and_drives_the_advice() -> None:
    model, loss_fn, data = tanh_mlp(2)
    tiny = diagnose(model, loss_fn, data, steps=2, optimizer=lambda p: torch.optim.SGD(p, lr=1e-6))
    big = diagnose(model, loss_fn, data, steps=2, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    assert tiny.format("bf16").swamping_fraction > 0.9  # updates of 1e-6 * g vanish next to |w| ~ 0.1
    assert big.format("bf16").swamping_fraction < tiny.format("bf16").swamping_fraction
    assert "master weights" in tiny.format("bf16").recommendation
    assert tiny.meta["optimizer"] == "SGD" and tiny.meta["optimizer_defaults"]["lr"] == 1e-6


# ------------------------------------------------------------------------------------------------------
# The functional core


def _hist(bins: dict[int, float]) -> np.ndarray:
    h = np.zeros(NB)
    for c, n in bins.items():
        h[c - HIST_MIN_LOG2] = n
    return h


def test_recommend_scale_hand_made() -> None:
    # 1000 values in (2^-31, 2^-30], 1 value in (2^-41, 2^-40]; max 2^-10.
    h = _hist({-30: 1000, -40: 1})
    # fp16 zero threshold 2^-25: bin c underflows at 2^k when c <= -25 - k.
    assert underflow_count_at(h, FP16, 0) == 1001
    assert underflow_count_at(h, FP16, 5) == 1001 and underflow_count_at(h, FP16, 6) == 1
    assert underflow_count_at(h, FP16, 16) == 0
    # threshold 1e-3 of 1001 elements allows the single tiny value to underflow: from 2^6;
    # 2^-10 * 2^k <= 65519.99 up to k = 25.
    assert recommend_scale(h, 1001, 2.0**-10, FP16, 1e-3) == ScaleInterval(6, 25)
    # threshold 0 needs the tiny value too: from 2^16
    assert recommend_scale(h, 1001, 2.0**-10, FP16, 0.0) == ScaleInterval(16, 25)
    # too wide for E5M2 (2^-17 .. 57344) at threshold 0: 2^-41 * 2^k > 2^-17 needs k >= 24, and
    # 2^-10 * 2^k <= 61439.99 allows k <= 25: [24, 25]; with max 2^1, no scale.
    assert recommend_scale(h, 1001, 2.0**-10, E5M2, 0.0) == ScaleInterval(24, 25)
    assert recommend_scale(h, 1001, 2.0, E5M2, 0.0) is None
    # non-finite FP32 gradients: nothing helps
    assert recommend_scale(h, 1001, 2.0**-10, FP16, 1e-3, finite=False) is None
    # BF16: nothing underflows at 1, the interval is wide and contains 1
    bf = recommend_scale(h, 1001, 2.0**-10, BF16, 1e-3)
    assert bf is not None and 1.0 in bf


def test_histogram_prediction_equals_exact_count_at_scale_1_with_subnormals() -> None:
    rng = np.random.default_rng(0)
    x = (2.0 ** rng.uniform(-60, 5, 50000)).astype(np.float32)
    for fmt in (FP16, E5M2, BF16, FloatFormat.parse("e4m3")):
        row = gradient_stats(torch.from_numpy(x), [fmt])
        c = Columns(1)
        assert underflow_count_at(row[c.hist].numpy(), fmt, 0) == row[c.underflow(0)]
    # Flushing subnormals: the prediction is an upper bound, strictly above here (2^-14 is in the bin of the
    # threshold 2^-14 - 2^-25 but rounds to min_normal).
    x = np.concatenate([x, np.float32([2.0**-14])])
    ftz = FloatFormat.parse("fp16-ftz")
    row = gradient_stats(torch.from_numpy(x), [ftz])
    assert underflow_count_at(row[c.hist].numpy(), ftz, 0) > row[c.underflow(0)]


def test_scale_interval() -> None:
    s = ScaleInterval(3, 5)
    assert (s.min, s.max, 8.0 in s, 64.0 in s, str(s)) == (8.0, 32.0, True, False, "[2^3, 2^5]")
    with pytest.raises(ValueError, match="log2_min"):
        ScaleInterval(5, 3)


# ------------------------------------------------------------------------------------------------------
# Output


def test_to_dict_has_the_documented_shape_and_round_trips(deep: Any) -> None:
    *_, d = deep
    out = json.loads(json.dumps(d.to_dict()))
    assert out["schema_version"] == 1
    assert set(out["formats"]) == {"bf16", "fp16", "e5m2"}
    for f in out["formats"].values():
        assert {"underflow_fraction", "overflow_fraction", "needs_scaling", "recommended_scale",
                "swamping_fraction"} <= set(f)
        assert f["recommended_scale"] is None or {"min", "max"} <= set(f["recommended_scale"])
        assert {"underflow_fraction", "overflow_fraction"} <= set(f["weight"]) & set(f["activation"])
    for layer in out["layers"]:
        assert {"name", "kind", "numel", "max_abs", "min_abs_nonzero", "formats"} <= set(layer)
        assert layer["kind"] in ("weight", "activation")
        for f in layer["formats"].values():
            assert {"underflow_fraction", "overflow_fraction"} <= set(f)
    fp16 = out["formats"]["fp16"]["recommended_scale"]
    assert fp16["min"] == 2.0 ** fp16["log2_min"] and fp16["max"] == 2.0 ** fp16["log2_max"]
    assert "WOULD" in out["source_note"]
    again = Diagnosis.from_dict(out)
    assert json.loads(json.dumps(again.to_dict())) == out
    assert np.array_equal(again.hist, d.hist)


def test_fractions_are_element_weighted_over_weights_and_activations(deep: Any) -> None:
    *_, d = deep
    out = d.to_dict()
    for name in ("fp16", "e5m2"):
        under = sum(x["numel"] * x["formats"][name]["underflow_fraction"] for x in out["layers"])
        assert math.isclose(under / d.numel, out["formats"][name]["underflow_fraction"], rel_tol=1e-12)


def test_markdown_says_what_the_numbers_are(deep: Any) -> None:
    *_, d = deep
    md = d.to_markdown()
    assert md.startswith("# Gradient diagnosis")
    assert "FP32 reference" in md and "WOULD" in md
    assert "| fp16 |" in md and "| 0.weight | weight |" in md
    assert str(d.format("fp16").recommended_scale) in md


def test_from_dict_rejects_other_schema_versions(deep: Any) -> None:
    *_, d = deep
    bad = d.to_dict() | {"schema_version": 2}
    with pytest.raises(ValueError, match="schema_version"):
        Diagnosis.from_dict(bad)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, "steps"),
        ({"threshold": 1.5}, ValueError, "threshold"),
        ({"formats": ("fp99",)}, ValueError, "unknown format"),
        ({"optimizer": 3}, TypeError, "optimizer"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    model, loss_fn, data = tanh_mlp(1)
    with pytest.raises(error, match=match):
        diagnose(model, loss_fn, data, **kwargs)


def test_bad_loss_and_batches() -> None:
    model, loss_fn, data = tanh_mlp(1)
    with pytest.raises(TypeError, match="scalar loss"):
        diagnose(model, lambda m, b: m(b[0]), data, steps=1)
    with pytest.raises(ValueError, match="at least one batch"):
        diagnose(model, loss_fn, [], steps=1)


def test_reports_say_which_gradients_they_cover(deep: Any) -> None:
    import dataclasses

    from lossscale.diagnose import COVERAGE

    *_, d = deep
    assert d.to_dict()["covers"] == COVERAGE["diagnosis"]
    md = d.to_markdown()
    assert f"*What is counted:* {COVERAGE['diagnosis']}." in md
    assert "Not the same gradients" not in md
    emu = dataclasses.replace(
        d, emulation={"linear.output.grad|fp16": {"elements": 4, "nonzero": 4, "underflow": 1, "subnormal": 0,
                                                  "overflow": 0}}
    )
    md = emu.to_markdown()
    assert f"*Not the same gradients as above:* {COVERAGE['emulation']}." in md
    assert "over the nonzero values entering a site" in md and "exact zeros included" in md
    model, loss_fn, data = tanh_mlp(1)
    w_only = diagnose(model, loss_fn, data, steps=1, activations=False)
    assert "activation gradients not measured" in w_only.to_dict()["covers"]
