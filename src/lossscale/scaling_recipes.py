"""FP8 and microscaling training recipes as data: how each GEMM operand is scaled before rounding.

A :class:`ScalingRecipe` says how the operands of every emulated GEMM (forward ``y = x w^T`` and the two
backward GEMMs ``dx = g w`` and ``dw = g^T x``) are scaled and rounded:

    kind       scale per                                  element formats        source
    delayed    tensor, from an amax history (TE rule)     E4M3 fwd, E5M2 grads   Transformer Engine DelayedScaling
    rowwise    row along the GEMM's reduction dimension   E4M3 fwd, E5M2 grads   torchao float8 rowwise
    block      1x128 tile along the reduction dim for     E4M3 all               DeepSeek-V3 report (arXiv:2412.19437)
               activations/gradients, 128x128 weights
    mx         block of 32 along the reduction dim, E8M0  MX element             OCP MX v1.0; torchao MX training
    nvfp4      block of 16, E4M3 scale + FP32 tensor      E2M1                   NVIDIA NVFP4 (arXiv:2509.25149)

(per-tensor *current* scaling stays the ``Precision.scaling="current"`` of the ``fp8-hybrid`` preset).
Every GEMM quantizes its two operands from their FP32 values along its own reduction dimension, so the
backward GEMMs re-quantize rather than reuse the forward blocks (what block-scaled hardware must do, and what
torchao's MX training does). The element formats come from the :class:`~lossscale.Precision`: ``compute`` for
inputs and weights, ``grad`` for the incoming gradient.

Delayed scaling follows Transformer Engine's documented rule: the scale used at a step comes from the amax
history *before* this step's amax is recorded, ``scale = (fp8_max / amax) / 2^margin`` with ``amax`` the max
of the history (``"max"``) or its newest entry (``"most_recent"``); a zero or non-finite amax keeps the old
scale; the first step uses scale 1. Forward operands and gradients keep separate histories.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from .blockformats import SCALE_MODES

__all__ = ["ScalingRecipe", "RecipeKind", "RECIPE_KINDS"]

RecipeKind = Literal["delayed", "rowwise", "block", "mx", "nvfp4"]
RECIPE_KINDS: tuple[str, ...] = ("delayed", "rowwise", "block", "mx", "nvfp4")
AmaxAlgo = Literal["max", "most_recent"]
_ALGOS: tuple[str, ...] = ("max", "most_recent")


@dataclasses.dataclass(frozen=True)
class ScalingRecipe:
    """How GEMM operands are scaled (a frozen config; variants via ``dataclasses.replace``).

    Args:
        kind: ``"delayed"``, ``"rowwise"``, ``"block"``, ``"mx"`` or ``"nvfp4"`` (see the module docstring).
        amax_history_len: delayed: history length (Transformer Engine's default 1024).
        amax_compute_algo: delayed: ``"max"`` (of the history) or ``"most_recent"``.
        margin: delayed: the scale is divided by ``2^margin`` (integer >= 0).
        power_of_two: delayed/rowwise/block: round each scale down to a power of two (exact scaling);
            False uses the exact quotient ``fp8_max / amax`` (TE's default; torchao's rowwise recipe rounds to
            powers of two, so the ``fp8-rowwise`` preset sets True).
        block_size: block: tile length along the reduction dimension (weights: ``block_size`` squared).
        scale_mode: mx: ``"floor"`` (OCP) or ``"rceil"`` (NVIDIA hardware).
        enabled: False sets every tensor/row/block scale to 1 (a negative control: FP8 without scaling);
            only for delayed, rowwise and block.

    Example:
        >>> from lossscale.scaling_recipes import ScalingRecipe
        >>> ScalingRecipe("delayed", amax_history_len=16).amax_compute_algo
        'max'
    """

    kind: RecipeKind
    amax_history_len: int = 1024
    amax_compute_algo: AmaxAlgo = "max"
    margin: int = 0
    power_of_two: bool = False
    block_size: int = 128
    scale_mode: str = "floor"
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.kind not in RECIPE_KINDS:
            raise ValueError(f"kind must be one of {RECIPE_KINDS}, got {self.kind!r}")
        for field in ("amax_history_len", "margin", "block_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{field} must be an int, got {type(value).__name__}")
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.amax_compute_algo not in _ALGOS:
            raise ValueError(f"amax_compute_algo must be one of {_ALGOS}, got {self.amax_compute_algo!r}")
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        for field in ("power_of_two", "enabled"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field} must be a bool, got {type(getattr(self, field)).__name__}")
        if not self.enabled and self.kind in ("mx", "nvfp4"):
            raise ValueError(f"enabled=False (no scaling) applies to delayed, rowwise and block, not {self.kind}")

    @property
    def per_tensor(self) -> bool:
        """True when one scale covers the whole tensor (the reduction dimension does not matter)."""
        return self.kind == "delayed"

    def describe(self) -> str:
        """A one-line description, e.g. ``"delayed(history=16, algo=max, margin=0, exact)"``."""
        off = "" if self.enabled else ", scales disabled"
        exact = "pow2" if self.power_of_two else "exact"
        if self.kind == "delayed":
            return (
                f"delayed(history={self.amax_history_len}, algo={self.amax_compute_algo}, margin={self.margin}, "
                f"{exact}{off})"
            )
        if self.kind == "rowwise":
            return f"rowwise({exact}{off})"
        if self.kind == "block":
            return f"block(1x{self.block_size} activations/gradients, {self.block_size}x{self.block_size} " \
                f"weights, {exact}{off})"
        if self.kind == "mx":
            return f"mx(32-element blocks, E8M0 scales, {self.scale_mode})"
        return "nvfp4(16-element blocks, E4M3 scales, FP32 tensor scale)"
