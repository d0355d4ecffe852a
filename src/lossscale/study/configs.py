"""Study configurations named ``PRECISION:VARIANT``: which precision recipe, and which loss scaling or
optimizer compensation, one run uses.

=================  ===========================================  =========================================
name               precision (``lossscale.Precision`` preset)   variant
=================  ===========================================  =========================================
``fp32``           FP32 everywhere                              (none)
``bf16-mixed:V``   BF16 compute and gradients, FP32 weights     loss scaling V: none / static / dynamic
``fp16-mixed:V``   FP16 compute and gradients, FP32 weights     loss scaling V: none / static / dynamic /
                                                                layerwise
``bf16-pure:V``    as bf16-mixed, weights stored in BF16        optimizer compensation V: none / kahan /
                                                                stochastic (no loss scaling)
``fp8-hybrid:V``   E4M3 forward (per-tensor current scaling),   loss scaling V of the E5M2 gradients:
                   E5M2 activation gradients, FP32 weights      none / dynamic / layerwise
``fp8-delayed:none``  TE delayed scaling (E4M3/E5M2)            none (the recipe scales every operand)
``fp8-rowwise:none``  torchao rowwise float8 (E4M3)              none
``mxfp8:none``     OCP MXFP8 blocks of 32 (E4M3)                none
``mxfp4:none``     OCP MXFP4 blocks of 32 (E2M1)                none
``nvfp4:none``     NVFP4 blocks of 16 (E2M1, E4M3 scales)       none
=================  ===========================================  =========================================

``static`` uses a constant power-of-two scale chosen by ``lossscale.diagnose`` on the run's own model and
data before training (Micikevicius et al. 2018 picked such constants by hand: 8 to 32K). ``layerwise`` uses
``lossscale.LayerwiseScaler`` (a scale per layer, adaptive rule of Zhao et al. 2019) targeting the recipe's
gradient format.

>>> StudyConfig.parse("fp16-mixed:dynamic").scaling
'dynamic'
>>> StudyConfig.parse("bf16-pure:kahan").compensation
'kahan'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

__all__ = [
    "StudyConfig",
    "CONFIG_NAMES",
    "QUICK_CONFIG_NAMES",
    "parse_configs",
    "PrecisionName",
    "Scaling",
    "Compensation",
]

PrecisionName = Literal[
    "fp32", "bf16-mixed", "fp16-mixed", "bf16-pure", "fp8-hybrid", "fp8-delayed", "fp8-rowwise", "mxfp8", "mxfp4",
    "nvfp4",
]
Scaling = Literal["none", "static", "dynamic", "layerwise"]
Compensation = Literal["none", "kahan", "stochastic"]

# precision -> its allowed variants, in the order tables list them.
_VARIANTS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "bf16-mixed": ("none", "static", "dynamic"),
    "fp16-mixed": ("none", "static", "dynamic", "layerwise"),
    "bf16-pure": ("none", "kahan", "stochastic"),
    "fp8-hybrid": ("none", "dynamic", "layerwise"),
    # Scaling recipes (lossscale.scaling_recipes): they scale every GEMM operand themselves.
    "fp8-delayed": ("none",),
    "fp8-rowwise": ("none",),
    "mxfp8": ("none",),
    "mxfp4": ("none",),
    "nvfp4": ("none",),
}

CONFIG_NAMES: tuple[str, ...] = tuple(
    p if not vs else f"{p}:{v}" for p, vs in _VARIANTS.items() for v in (vs or ("",))
)
"""Every valid configuration name, in table order."""

QUICK_CONFIG_NAMES: tuple[str, ...] = (
    "fp32",
    "bf16-mixed:none",
    "bf16-mixed:dynamic",
    "fp16-mixed:none",
    "fp16-mixed:static",
    "fp16-mixed:dynamic",
    "bf16-pure:none",
    "bf16-pure:kahan",
    "bf16-pure:stochastic",
    "fp8-hybrid:none",
    "fp8-hybrid:dynamic",
    "fp8-delayed:none",
    "nvfp4:none",
)
"""What ``lossscale study --quick`` runs (``bf16-mixed:static`` only in full mode: BF16 needs no scale, so
the diagnostics' recommendation is 1, the same run as ``bf16-mixed:none``; of the scaling recipes, one FP8
and one FP4)."""


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One configuration: ``precision`` and its variant, as ``scaling`` (mixed and FP8 recipes) or
    ``compensation`` (pure BF16). Build one with :meth:`parse`."""

    precision: PrecisionName
    scaling: Scaling = "none"
    compensation: Compensation = "none"

    def __post_init__(self) -> None:
        if self.precision not in _VARIANTS:
            raise ValueError(
                f"precision must be one of {tuple(_VARIANTS)}, got {self.precision!r}"
            )
        if self.scaling not in ("none", "static", "dynamic", "layerwise"):
            raise ValueError(
                f"scaling must be 'none', 'static', 'dynamic' or 'layerwise', got {self.scaling!r}"
            )
        if self.compensation not in ("none", "kahan", "stochastic"):
            raise ValueError(
                f"compensation must be 'none', 'kahan' or 'stochastic', got {self.compensation!r}"
            )
        pure = self.precision == "bf16-pure"
        if self.name not in CONFIG_NAMES or (not pure and self.compensation != "none") or (
            pure and self.scaling != "none"
        ):
            raise ValueError(
                f"{self.precision} does not combine scaling={self.scaling!r} with "
                f"compensation={self.compensation!r}; valid configurations: {', '.join(CONFIG_NAMES)}"
            )

    @property
    def variant(self) -> str:
        """The part after the colon ("" for fp32)."""
        if self.precision == "fp32":
            return ""
        return self.compensation if self.precision == "bf16-pure" else self.scaling

    @property
    def name(self) -> str:
        """``PRECISION:VARIANT`` (just ``fp32`` for FP32)."""
        return self.precision if self.precision == "fp32" else f"{self.precision}:{self.variant}"

    @property
    def weight_format(self) -> str:
        """The format weights are kept in: "bf16" for bf16-pure, else "fp32" (master weights)."""
        return "bf16" if self.precision == "bf16-pure" else "fp32"

    @property
    def grad_format(self) -> str | None:
        """The format activation gradients are rounded to (None for FP32)."""
        return {"fp32": None, "bf16-mixed": "bf16", "fp16-mixed": "fp16", "bf16-pure": "bf16",
                "fp8-hybrid": "e5m2", "fp8-delayed": "e5m2", "fp8-rowwise": "e4m3", "mxfp8": "e4m3",
                "mxfp4": "e2m1", "nvfp4": "e2m1"}[self.precision]

    @classmethod
    def parse(cls, name: str) -> StudyConfig:
        """Parse ``"fp32"``, ``"bf16-mixed:dynamic"``, ``"bf16-pure:kahan"``, ...; a bad name raises
        ``ValueError`` listing every valid name (``"fp32:none"`` is accepted for ``"fp32"``)."""
        if not isinstance(name, str):
            raise TypeError(f"configuration name must be a str, got {type(name).__name__}")
        text = name.strip().lower()
        if text == "fp32:none":
            text = "fp32"
        if text not in CONFIG_NAMES:
            raise ValueError(
                f"unknown configuration {name!r}; valid configurations: {', '.join(CONFIG_NAMES)}"
            )
        precision, _, variant = text.partition(":")
        if precision == "bf16-pure":
            return cls(precision, "none", variant)  # type: ignore[arg-type]
        return cls(precision, variant or "none")  # type: ignore[arg-type]


def parse_configs(names: str | Iterable[str]) -> tuple[StudyConfig, ...]:
    """Parse a comma-separated list (or an iterable) of names; ``"all"`` means every configuration and
    ``"quick"`` the quick set. Duplicates are dropped, order kept."""
    items = [n for n in (names.split(",") if isinstance(names, str) else names)]
    out: list[StudyConfig] = []
    for raw in items:
        n = raw.strip()
        if not n:
            continue
        expanded = CONFIG_NAMES if n == "all" else QUICK_CONFIG_NAMES if n == "quick" else (n,)
        for e in expanded:
            c = StudyConfig.parse(e)
            if c not in out:
                out.append(c)
    if not out:
        raise ValueError(f"no configuration given; valid configurations: {', '.join(CONFIG_NAMES)}")
    return tuple(out)
