"""Diagnosis.to_dict/from_dict are derived from the dataclass fields: a round trip through JSON with every field
set to a non-default value gives every field back, and a field added later cannot be forgotten by the codec."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest

from lossscale.diagnose import SCHEMA_VERSION, Diagnosis, FormatDiagnosis, LayerDiagnosis, ScaleInterval
from lossscale.monitor import HIST_MAX_LOG2, HIST_MIN_LOG2

NB = HIST_MAX_LOG2 - HIST_MIN_LOG2 + 1


def _full() -> Diagnosis:
    hw, ha = np.zeros(NB), np.zeros(NB)
    hw[100:103] = [3.0, 0.0, 7.0]  # a zero bin inside the stored range
    ha[101] = 11.0
    fd = FormatDiagnosis(
        name="fp16",
        underflow_fraction=0.125,
        subnormal_fraction=0.25,
        overflow_fraction=0.0625,
        needs_scaling=True,
        recommended_scale=ScaleInterval(3, 9),
        swamping_fraction=0.5,
        weight={"underflow_fraction": 0.375, "overflow_fraction": 0.0},
        activation={"underflow_fraction": 0.75, "overflow_fraction": 0.03125},
        recommendation="use a loss scale of 2^3 .. 2^9",
        recommended_scale_exact=False,
        layer_scales={"0": 8.0, "2": 512.0},
    )
    fd2 = dataclasses.replace(fd, name="bf16", recommended_scale=None, swamping_fraction=None, layer_scales=None)
    layer = LayerDiagnosis(
        name="0.weight",
        kind="weight",
        numel=96,
        zeros=5,
        max_abs=3.5,
        min_abs_nonzero=2.0**-30,
        formats={"fp16": {"underflow_fraction": 0.25, "subnormal_fraction": None}},
        numerically_zero=2,
    )
    return Diagnosis(
        formats={"fp16": fd, "bf16": fd2},
        layers=(layer, dataclasses.replace(layer, name="1", kind="activation", min_abs_nonzero=None)),
        threshold=0.002,
        steps=17,
        source="emulated",
        numel=1234,
        zeros=56,
        nonfinite=3,
        max_abs=65504.0,
        hist_weight=hw,
        hist_activation=ha,
        meta={"optimizer": "SGD", "torch": "2.x", "covers": "weights only"},
        emulation={"linear.output.grad|fp16": {"elements": 10, "nonzero": 9, "underflow": 1}},
        schema_version=SCHEMA_VERSION,  # from_dict accepts only this one
        numerically_zero=4,
    )


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize("cls", [Diagnosis, FormatDiagnosis, LayerDiagnosis])
def test_the_fixture_sets_every_defaulted_field(cls: type) -> None:
    # A field added with a default must be set here too, or the round trip below would not cover it.
    d = _full()
    obj: Any = {Diagnosis: d, FormatDiagnosis: d.formats["fp16"], LayerDiagnosis: d.layers[0]}[cls]
    for f in dataclasses.fields(cls):
        if f.name == "schema_version":
            continue
        default = _default(f)
        assert default is dataclasses.MISSING or getattr(obj, f.name) != default, f.name


def _assert_same(a: Diagnosis, b: Diagnosis) -> None:
    for f in dataclasses.fields(Diagnosis):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and np.array_equal(x, y), f.name
        else:
            assert x == y, f.name
            assert type(x) is type(y) or isinstance(x, dict), f.name


def test_round_trip_through_json_gives_every_field_back() -> None:
    d = _full()
    out = json.loads(json.dumps(d.to_dict()))
    again = Diagnosis.from_dict(out)
    _assert_same(d, again)
    assert again.formats["fp16"].recommended_scale == ScaleInterval(3, 9)
    assert isinstance(again.layers, tuple) and isinstance(again.layers[1], LayerDiagnosis)
    assert json.loads(json.dumps(again.to_dict())) == out


def test_the_documented_shape_is_kept() -> None:
    out = _full().to_dict()
    assert set(out) == {
        "schema_version", "source", "source_note", "covers", "threshold", "steps", "numel", "zeros",
        "numerically_zero", "nonfinite", "max_abs", "formats", "layers", "histogram", "emulation", "meta",
    }  # fmt: skip
    assert out["covers"] == "weights only"
    assert "name" not in out["formats"]["fp16"]
    assert out["formats"]["fp16"]["recommended_scale"] == {"min": 8.0, "max": 512.0, "log2_min": 3, "log2_max": 9}
    h = out["histogram"]
    assert h["first_log2"] == 100 + HIST_MIN_LOG2 and h["weight"] == [3, 0, 7] and h["activation"] == [0, 11, 0]
    assert out["layers"][0] == {
        "name": "0.weight", "kind": "weight", "numel": 96, "zeros": 5, "max_abs": 3.5,
        "min_abs_nonzero": 2.0**-30, "formats": {"fp16": {"underflow_fraction": 0.25, "subnormal_fraction": None}},
        "numerically_zero": 2,
    }  # fmt: skip


def test_a_missing_required_field_is_named() -> None:
    out = _full().to_dict()
    del out["threshold"]
    with pytest.raises(ValueError, match="'threshold'"):
        Diagnosis.from_dict(out)
    out = _full().to_dict()
    del out["layers"][0]["kind"]
    with pytest.raises(ValueError, match="LayerDiagnosis.*'kind'"):
        Diagnosis.from_dict(out)
    with pytest.raises(TypeError, match="mapping"):
        Diagnosis.from_dict([])  # type: ignore[arg-type]


def test_site_counts_name_their_denominator_and_keep_a_deprecated_alias() -> None:
    # FormatDiagnosis.underflow_fraction is over all elements; the rounding-site counters' fraction is over the
    # nonzero values, so it carries that in its name; the old name still answers, with a DeprecationWarning.
    from lossscale import SiteCounts

    c = SiteCounts(elements=10, nonzero=4, underflow=1, subnormal=2, overflow=0)
    assert c.underflow_fraction_of_nonzero == 0.25
    with pytest.warns(DeprecationWarning, match="underflow_fraction_of_nonzero"):
        assert c.underflow_fraction == 0.25
    fd = _full().formats["fp16"]
    assert not hasattr(fd, "underflow_fraction_of_nonzero")  # one meaning per name
