"""Precision recipes: presets, Lightning aliases, custom strings, validation."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from lossscale import E2M1, BF16, E4M3, E5M2, FP16, FP32, FloatFormat, Precision
from lossscale.precision import PRECISION_PRESETS

# (name, compute, output, grad, weights, scaling)
PRESET_TABLE = [
    ("fp32", FP32, FP32, FP32, FP32, "none"),
    ("bf16-mixed", BF16, BF16, BF16, FP32, "none"),
    ("bf16-pure", BF16, BF16, BF16, BF16, "none"),
    ("fp16-mixed", FP16, FP16, FP16, FP32, "none"),
    ("fp16-pure", FP16, FP16, FP16, FP16, "none"),
    ("fp8-hybrid", E4M3, BF16, E5M2, FP32, "current"),
    ("fp8-delayed", E4M3, BF16, E5M2, FP32, "none"),
    ("fp8-rowwise", E4M3, BF16, E4M3, FP32, "none"),
    ("fp8-block", E4M3, BF16, E4M3, FP32, "none"),
    ("mxfp8", E4M3, BF16, E4M3, FP32, "none"),
    ("mxfp4", E2M1, BF16, E2M1, FP32, "none"),
    ("nvfp4", E2M1, BF16, E2M1, FP32, "none"),
]


@pytest.mark.parametrize("name, compute, output, grad, weights, scaling", PRESET_TABLE)
def test_presets(
    name: str, compute: FloatFormat, output: FloatFormat, grad: FloatFormat, weights: FloatFormat, scaling: str
) -> None:
    p = Precision.parse(name)
    assert (p.compute, p.output, p.grad, p.weights, p.scaling) == (compute, output, grad, weights, scaling)
    assert p.flush_to_zero is False
    assert p.name == name
    assert Precision.parse(p.name) == p
    assert Precision.parse(name.upper()) == p


def test_preset_table_is_complete() -> None:
    assert sorted(PRECISION_PRESETS) == sorted(row[0] for row in PRESET_TABLE)


@pytest.mark.parametrize(
    "alias, preset",
    [
        ("32-true", "fp32"),
        ("32", "fp32"),
        ("16-mixed", "fp16-mixed"),
        ("16", "fp16-mixed"),
        ("bf16-mixed", "bf16-mixed"),
        ("bf16", "bf16-mixed"),
        ("16-true", "fp16-pure"),
        ("bf16-true", "bf16-pure"),
        ("BF16_TRUE", "bf16-pure"),
    ],
)
def test_lightning_aliases(alias: str, preset: str) -> None:
    assert Precision.parse(alias) == PRECISION_PRESETS[preset]


def test_defaults_resolve() -> None:
    # output follows compute (BF16 for 8-bit compute), grad follows output.
    assert Precision(compute=BF16).output == BF16
    assert Precision(compute=BF16).grad == BF16
    assert Precision(compute=E4M3).output == BF16
    assert Precision(compute=E4M3, output=FP16).grad == FP16
    assert Precision(compute=BF16) == Precision(compute=BF16, output=BF16, grad=BF16)


def test_custom_string_round_trip() -> None:
    p = Precision.parse("compute=e4m3, grad=e5m2, scaling=current, ftz=true, weights=bf16")
    assert (p.compute, p.output, p.grad, p.weights, p.scaling, p.flush_to_zero) == (
        E4M3, BF16, E5M2, BF16, "current", True
    )
    assert Precision.parse(p.name) == p
    assert Precision.parse("compute=fp16,weights=fp16") == PRECISION_PRESETS["fp16-pure"]
    assert Precision.parse("compute=fp16,weights=fp16").name == "fp16-pure"


def test_bare_format_is_mixed_precision() -> None:
    p = Precision.parse("e6m9")
    assert p.compute == FloatFormat(6, 9) and p.output == FloatFormat(6, 9) and p.weights == FP32


def test_flush_to_zero_formats() -> None:
    p = dataclasses.replace(Precision.parse("bf16-pure"), flush_to_zero=True)
    assert p.compute_format == dataclasses.replace(BF16, subnormals=False)
    assert p.weights_format.name == "bf16-ftz"
    assert p.formats()["grad"].subnormals is False
    assert not p.is_fp32
    assert dataclasses.replace(Precision(), flush_to_zero=True).compute_format == FP32
    assert Precision().is_fp32


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("bf17-mixed", ValueError, "precision: unknown name"),
        ("compute=bf16,colour=red", ValueError, "keys compute, output"),
        ("compute=bf16,compute=fp16", ValueError, "given twice"),
        ("compute=bf16,ftz=maybe", ValueError, "ftz must be"),
        ("compute=bf16,scaling=delayed", ValueError, "scaling must be one of"),
        ("compute=xx", ValueError, "unknown format name"),
        (3, TypeError, "Precision or a string"),
    ],
)
def test_parse_errors(spec: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Precision.parse(spec)  # type: ignore[arg-type]


def test_constructor_validation() -> None:
    with pytest.raises(TypeError, match="compute must be a FloatFormat"):
        Precision(compute="bf16")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="grad must be a FloatFormat or None"):
        Precision(grad="bf16")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="flush_to_zero must be a bool"):
        Precision(flush_to_zero=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scaling must be one of"):
        Precision(scaling="delayed")  # type: ignore[arg-type]


def test_frozen_and_hashable() -> None:
    p = Precision.parse("bf16-mixed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.compute = FP16  # type: ignore[misc]
    assert len({p, Precision.parse("bf16"), Precision.parse("fp16-mixed")}) == 2


def test_replace_pickle_and_fields_keep_resolved_formats() -> None:
    p = Precision(E4M3)  # positional, as a dataclass constructor takes them
    assert (p.output, p.grad) == (BF16, BF16)
    q = dataclasses.replace(p, scaling="current")
    assert type(q) is Precision and q == Precision(compute=E4M3, scaling="current") and q != p
    assert pickle.loads(pickle.dumps(q)) == q
    assert repr(p).startswith("Precision(compute=")
    assert [f.name for f in dataclasses.fields(Precision)] == [
        "compute", "output", "grad", "weights", "flush_to_zero", "scaling", "recipe"
    ]
