"""Training-precision recipes: which number format each part of a training step uses.

A :class:`Precision` names the format of

    forward operands of the low-precision op set   compute   (GEMM/conv/attention inputs)
    results of those ops, and their dgrad/wgrad     output    (= compute, except FP8 GEMMs output BF16)
    activation gradients entering backward GEMMs   grad
    stored weights                                 weights   (FP32 master weights, or "pure" low precision)

plus flush-to-zero and the per-tensor scaling of forward operands. Presets follow the names users already
know: Lightning's precision flags, and Transformer Engine's FP8 "HYBRID" recipe (E4M3 forward, E5M2
backward; "FP8 Formats for Deep Learning", Micikevicius et al., arXiv:2209.05433). The string form of a custom
recipe follows jmp's policy strings (``"params=float32,compute=bfloat16"``, google-deepmind/jmp).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from .formats import BF16, E2M1, E4M3, E5M2, FP16, FP32, FloatFormat
from .scaling_recipes import RECIPE_KINDS, ScalingRecipe

__all__ = ["Precision", "Scaling", "PRECISION_PRESETS"]

Scaling = Literal["none", "current"]
_SCALINGS: tuple[str, ...] = ("none", "current")
_KEYS = ("compute", "output", "grad", "weights", "scaling", "ftz", "recipe")


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """The fields of a :class:`Precision`, all resolved (no None): validated, never modified."""

    compute: FloatFormat = FP32
    output: FloatFormat = FP32
    grad: FloatFormat = FP32
    weights: FloatFormat = FP32
    flush_to_zero: bool = False
    scaling: Scaling = "none"
    recipe: ScalingRecipe | None = None

    def __post_init__(self) -> None:
        for field in ("compute", "output", "grad", "weights"):
            if not isinstance(getattr(self, field), FloatFormat):
                optional = " or None" if field in ("output", "grad") else ""
                raise TypeError(
                    f"{field} must be a FloatFormat{optional} (use Precision.parse for names), "
                    f"got {type(getattr(self, field)).__name__}"
                )
        if not isinstance(self.flush_to_zero, bool):
            raise TypeError(f"flush_to_zero must be a bool, got {type(self.flush_to_zero).__name__}")
        if self.scaling not in _SCALINGS:
            raise ValueError(f"scaling must be one of {_SCALINGS}, got {self.scaling!r}")
        if self.recipe is not None:
            if not isinstance(self.recipe, ScalingRecipe):
                raise TypeError(f"recipe must be a ScalingRecipe or None, got {type(self.recipe).__name__}")
            if self.scaling != "none":
                raise ValueError("recipe and scaling='current' exclude each other: a recipe scales the operands itself")
            if self.compute == FP32:
                raise ValueError(f"recipe {self.recipe.kind!r} needs a low-precision compute format, got fp32")


class Precision(_Recipe):
    """A low-precision training recipe (a frozen config; variants via ``dataclasses.replace``).

    Args:
        compute: format of the forward operands of the low-precision ops (default FP32).
        output: format of those ops' results and of the gradients they produce in backward (default: None,
            meaning ``compute``, or BF16 when ``compute`` has 8 bits or fewer, as FP8 GEMMs output BF16).
        grad: format of activation gradients entering backward GEMMs (default: None, meaning ``output``).
        weights: storage format of the weights: FP32 master weights (default) or, e.g., BF16 ("pure").
        flush_to_zero: flush subnormal results to zero at every rounding site.
        scaling: ``"none"`` or ``"current"``: per-tensor power-of-two scaling of forward operands before
            rounding to ``compute`` (Transformer Engine's current scaling). Gradients are never scaled per
            tensor; a loss scale decides what survives in ``grad``.

    Example:
        >>> from lossscale import Precision
        >>> p = Precision.parse("fp8-hybrid")
        >>> (p.compute.name, p.output.name, p.grad.name, p.scaling)
        ('e4m3', 'bf16', 'e5m2', 'current')
        >>> Precision.parse("bf16-true") == Precision.parse("bf16-pure")
        True
        >>> Precision.parse("compute=fp16,weights=fp16").name
        'fp16-pure'
    """

    def __init__(
        self,
        compute: FloatFormat = FP32,
        output: FloatFormat | None = None,
        grad: FloatFormat | None = None,
        weights: FloatFormat = FP32,
        flush_to_zero: bool = False,
        scaling: Scaling = "none",
        recipe: ScalingRecipe | None = None,
    ) -> None:
        # Resolve the defaults before the frozen fields are set, so that readers always see a FloatFormat and
        # equal recipes compare equal. (A non-format compute is passed on for _Recipe to refuse.)
        if output is None:
            output = BF16 if isinstance(compute, FloatFormat) and compute.bits <= 8 else compute
        super().__init__(
            compute, output, output if grad is None else grad, weights, flush_to_zero, scaling, recipe
        )

    # ----------------------------------------------------------------------------------------------
    @property
    def output_format(self) -> FloatFormat:
        """``output`` with flush-to-zero applied (the format the rounding sites use)."""
        return self._ftz(self.output)

    @property
    def compute_format(self) -> FloatFormat:
        """``compute`` with flush-to-zero applied."""
        return self._ftz(self.compute)

    @property
    def grad_format(self) -> FloatFormat:
        """``grad`` with flush-to-zero applied."""
        return self._ftz(self.grad)

    @property
    def weights_format(self) -> FloatFormat:
        """``weights`` with flush-to-zero applied."""
        return self._ftz(self.weights)

    def formats(self) -> dict[str, FloatFormat]:
        """The effective (flush-to-zero applied) formats by role."""
        return {
            "compute": self.compute_format,
            "output": self.output_format,
            "grad": self.grad_format,
            "weights": self.weights_format,
        }

    @property
    def is_fp32(self) -> bool:
        """True when no rounding site changes anything (compute, output and grad are all FP32)."""
        return all(f == FP32 for f in (self.compute_format, self.output_format, self.grad_format))

    @property
    def name(self) -> str:
        """The preset name, or a ``key=value`` string that :meth:`parse` reads back."""
        for preset_name, preset in PRECISION_PRESETS.items():
            if preset == self:
                return preset_name
        parts = [
            f"compute={self.compute.name}",
            f"output={self.output.name}",
            f"grad={self.grad.name}",
            f"weights={self.weights.name}",
            f"scaling={self.scaling}",
            f"ftz={'true' if self.flush_to_zero else 'false'}",
        ]
        if self.recipe is not None:
            parts.append(f"recipe={self.recipe.kind}")
        return ",".join(parts)

    def __str__(self) -> str:
        return self.name

    def _ftz(self, fmt: FloatFormat) -> FloatFormat:
        if self.flush_to_zero and fmt != FP32:
            return dataclasses.replace(fmt, subnormals=False)
        return fmt

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: Precision | str) -> Precision:
        """A recipe from a preset name, a Lightning precision name, a format name or a ``key=value`` list.

        Presets: ``"fp32"``, ``"bf16-mixed"``, ``"bf16-pure"``, ``"fp16-mixed"``, ``"fp16-pure"``,
        ``"fp8-hybrid"``, and the scaling recipes ``"fp8-delayed"``, ``"fp8-rowwise"``, ``"fp8-block"``,
        ``"mxfp8"``, ``"mxfp4"``, ``"nvfp4"`` (``recipe=delayed|rowwise|block|mx|nvfp4`` in a custom
        string). Lightning aliases: ``"32-true"``/``"32"``, ``"16-mixed"``/``"16"``,
        ``"bf16-mixed"``/``"bf16"``, ``"16-true"``, ``"bf16-true"``. A bare format name (``"e6m9"``) is mixed
        precision in that format. Custom: ``"compute=e4m3,output=bf16,grad=e5m2,weights=fp32,
        scaling=current,ftz=false"`` (any subset of the keys, any order).
        """
        if isinstance(spec, Precision):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"precision must be a Precision or a string, got {type(spec).__name__}")
        key = spec.strip().lower().replace("_", "-")
        if key in PRECISION_PRESETS:
            return PRECISION_PRESETS[key]
        if key in _ALIASES:
            return PRECISION_PRESETS[_ALIASES[key]]
        if "=" in key:
            return cls._parse_pairs(spec, key)
        try:
            fmt = FloatFormat.parse(key)
        except ValueError:
            raise ValueError(
                f"precision: unknown name {spec!r}; allowed: {', '.join(PRECISION_PRESETS)}, the Lightning "
                f"names {', '.join(_ALIASES)}, a format name (e.g. 'e6m9'), or 'key=value' pairs with keys "
                f"{', '.join(_KEYS)}"
            ) from None
        return cls(compute=fmt)

    @classmethod
    def _parse_pairs(cls, spec: str, key: str) -> Precision:
        values: dict[str, str] = {}
        for part in key.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or name not in _KEYS:
                raise ValueError(
                    f"precision: bad item {part!r} in {spec!r}; expected key=value with keys {', '.join(_KEYS)}"
                )
            if name in values:
                raise ValueError(f"precision: key {name!r} given twice in {spec!r}")
            values[name] = value
        kwargs: dict[str, object] = {}
        for name in ("compute", "output", "grad", "weights"):
            if name in values:
                kwargs[name] = FloatFormat.parse(values[name])
        if "scaling" in values:
            kwargs["scaling"] = values["scaling"]
        if "ftz" in values:
            if values["ftz"] not in ("true", "false", "1", "0"):
                raise ValueError(f"precision: ftz must be true or false, got {values['ftz']!r}")
            kwargs["flush_to_zero"] = values["ftz"] in ("true", "1")
        if "recipe" in values:
            if values["recipe"] not in RECIPE_KINDS:
                raise ValueError(f"precision: recipe must be one of {RECIPE_KINDS}, got {values['recipe']!r}")
            kwargs["recipe"] = _DEFAULT_RECIPES[values["recipe"]]
        return cls(**kwargs)  # type: ignore[arg-type]


PRECISION_PRESETS: dict[str, Precision] = {
    "fp32": Precision(),
    "bf16-mixed": Precision(compute=BF16),
    "bf16-pure": Precision(compute=BF16, weights=BF16),
    "fp16-mixed": Precision(compute=FP16),
    "fp16-pure": Precision(compute=FP16, weights=FP16),
    # Transformer Engine's HYBRID recipe: E4M3 forward operands with per-tensor current scaling, BF16 GEMM
    # outputs, E5M2 activation gradients without per-tensor scaling.
    "fp8-hybrid": Precision(compute=E4M3, output=BF16, grad=E5M2, scaling="current"),
    # Transformer Engine's DelayedScaling defaults (history 1024, "max", margin 0, exact scales), HYBRID formats.
    "fp8-delayed": Precision(compute=E4M3, output=BF16, grad=E5M2, recipe=ScalingRecipe("delayed")),
    # torchao float8 "rowwise": E4M3 for every operand, power-of-two scales per row of the reduction dim.
    "fp8-rowwise": Precision(compute=E4M3, output=BF16, grad=E4M3, recipe=ScalingRecipe("rowwise", power_of_two=True)),
    # DeepSeek-V3: E4M3 everywhere, 1x128 tiles (activations, gradients) and 128x128 blocks (weights).
    "fp8-block": Precision(compute=E4M3, output=BF16, grad=E4M3, recipe=ScalingRecipe("block")),
    # OCP MX: torchao's MX training defaults (E4M3 elements for every operand, floor scales).
    "mxfp8": Precision(compute=E4M3, output=BF16, grad=E4M3, recipe=ScalingRecipe("mx")),
    "mxfp4": Precision(compute=E2M1, output=BF16, grad=E2M1, recipe=ScalingRecipe("mx")),
    # NVFP4: 1x16 blocks for every operand, no Hadamard transform, nearest rounding.
    "nvfp4": Precision(compute=E2M1, output=BF16, grad=E2M1, recipe=ScalingRecipe("nvfp4")),
}

_DEFAULT_RECIPES: dict[str, ScalingRecipe] = {
    "delayed": ScalingRecipe("delayed"),
    "rowwise": ScalingRecipe("rowwise", power_of_two=True),
    "block": ScalingRecipe("block"),
    "mx": ScalingRecipe("mx"),
    "nvfp4": ScalingRecipe("nvfp4"),
}

# Lightning's precision flags (lightning.pytorch Trainer(precision=...)).
_ALIASES: dict[str, str] = {
    "32-true": "fp32",
    "32": "fp32",
    "16-mixed": "fp16-mixed",
    "16": "fp16-mixed",
    "bf16": "bf16-mixed",
    "16-true": "fp16-pure",
    "bf16-true": "bf16-pure",
}
