"""Rounding sites and the emulated ops built from them.

A tensor-core GEMM (and cuDNN convolution, flash attention) computes with low-precision operands, accumulates
in FP32 and rounds its result. In training the same holds in backward: the incoming gradient enters the dgrad
and wgrad GEMMs in low precision and their results are rounded. Emulation reproduces this with FP32 ops
between *rounding sites*, ``autograd.Function``s that round in forward and round the gradient in backward:

    operand site   forward: x -> q_compute(x)  (with per-tensor scaling, if any)  backward: g -> q_output(g)
    addend site    forward: b -> q_output(b)   (bias, the C of addmm)             backward: g -> q_output(g)
    result site    forward: y -> q_output(y)                                      backward: g -> q_grad(g)

so that ``result(op(operand(x), operand(w)))`` has the forward and backward numerics of the hardware op,
while autograd runs the op's own FP32 backward in between (exact products, FP32 accumulation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from ..formats import FP32, FloatFormat
from ..precision import Precision
from ..quantize import quantize
from .counters import RoundingCounters
from .recipes import GEMMContext, Phase, RecipeGEMM, RecipeState, Role, recipe_operand, recipe_site

__all__ = ["Emulator", "Operand", "round_to", "scaled_round"]


def round_to(
    x: torch.Tensor, fmt: FloatFormat, site: str, counters: RoundingCounters | None
) -> torch.Tensor:
    """Round ``x`` to ``fmt`` (nearest-even, overflow visible) and count what happened at ``site``."""
    q = quantize(x, fmt)
    if counters is not None:
        counters.record(site, fmt, x, q)
    return q


def current_scale(x: torch.Tensor, fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor power-of-two scale ``s = 2^k`` with ``k`` the largest integer such that ``amax * s <= max``,
    and its inverse (both exact). 1 when amax is 0 or not finite (so that overflow stays visible).

    Transformer Engine's current scaling uses ``max / amax`` (margin 0); a power of two keeps scaling and
    unscaling exact, so the only error is the rounding itself. Does not synchronise.
    """
    if x.numel() == 0:  # no amax to take (amax() of an empty tensor raises); nothing to scale
        one = torch.ones((), dtype=x.dtype, device=x.device)
        return one, one
    amax = x.detach().abs().amax().float()
    ok = torch.isfinite(amax) & (amax > 0)
    safe = torch.where(ok, amax, torch.ones_like(amax))
    # log2 in FP32 may be off by one next to a power of two: correct by checking the bound directly.
    k = torch.floor(math.log2(fmt.max) - torch.log2(safe))
    k = torch.where(safe * torch.exp2(k) > fmt.max, k - 1, k)
    # Keep s and 1/s finite normal FP32 numbers so multiplying by either is exact.
    k = torch.where(ok, k.clamp(-126, 126), torch.zeros_like(k))
    return torch.exp2(k).to(x.dtype), torch.exp2(-k).to(x.dtype)


def scaled_round(
    x: torch.Tensor, fmt: FloatFormat, site: str, counters: RoundingCounters | None
) -> torch.Tensor:
    """``q(x * s) / s`` with the per-tensor current scale ``s`` (counts are taken on the scaled values)."""
    scale, inv = current_scale(x, fmt)
    return round_to(x * scale, fmt, site, counters) * inv


# The first GEMM operand's role name in each aten op of lossscale.emulate.aten.GEMM_ATEN.
_FIRST_SLOTS = frozenset({"input", "mat1", "batch1", "mat", "vec1", "i1", "grad_output"})


@dataclasses.dataclass(frozen=True)
class Operand:
    """What :meth:`Emulator.quantize` is told about a tensor it rounds (the one entry point of all rounding).

    Attributes:
        op: the op the tensor enters or leaves (``"linear"``, ``"conv2d"``, ``"mm"`` inside an einsum, ...).
        role: its role there: ``"input"``, ``"weight"``, ``"bias"``, ``"output"``, ``"probs"``, ... In
            backward the role of the tensor whose gradient is rounded (``"output"``: dL/dy entering the dgrad
            and wgrad GEMMs; ``"input"``/``"weight"``: the dgrad/wgrad results).
        phase: ``"forward"`` or ``"backward"``.
        reduction_dims: the dimensions of this tensor that the GEMM(s) it enters reduce over (negative
            indices), or None where that is not one well-defined set (a result, an addend, an element-wise
            op's operand). In backward a gradient entering both dgrad and wgrad GEMMs lists both.
        gemm_operand: whether the tensor is a GEMM operand (True) or a result/addend rounded to the output
            or grad format (False).
    """

    op: str
    role: str
    phase: str = "forward"
    reduction_dims: tuple[int, ...] | None = None
    gemm_operand: bool = True


class _Site(torch.autograd.Function):
    """Round in forward (optionally with per-tensor scaling); round the gradient in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        fwd: FloatFormat | None,
        scaled: bool,
        bwd: FloatFormat | None,
        site: str,
        emu: Emulator,
        info: Operand,
    ) -> torch.Tensor:
        ctx.bwd, ctx.site, ctx.emu, ctx.info = bwd, site, emu, info
        if fwd is None:
            return x.view_as(x)
        return emu.quantize(x, fwd, site, info, scaled=scaled)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None, None, None]:
        if ctx.bwd is not None and g is not None:
            g = ctx.emu.quantize(g, ctx.bwd, ctx.site + ".grad", _backward_info(ctx.info))
        return g, None, None, None, None, None, None


@functools.lru_cache(maxsize=4096)
def _info(op: str, role: str, phase: str, dims: tuple[int, ...] | None, gemm_operand: bool) -> Operand:
    return Operand(op, role, phase, dims, gemm_operand)  # cached: sites are created per op call


@functools.lru_cache(maxsize=4096)
def _backward_info(info: Operand) -> Operand:
    """What the backward rounding at a site rounds: at an operand site the dgrad/wgrad result (not an operand),
    at a result site the gradient entering the backward GEMMs (an operand)."""
    dims = None if info.gemm_operand else _BACKWARD_REDUCTION.get(info.role)
    return _info(info.op, info.role, "backward", dims, not info.gemm_operand)


# A result's gradient enters the dgrad GEMM (reduced over the output features, the last dim) and the wgrad
# GEMM (reduced over every leading dim); block-scaled formats quantize it once per GEMM along these.
_BACKWARD_REDUCTION: dict[str, tuple[int, ...]] = {"output": (-1,)}


class Emulator:
    """One emulated precision: its rounding sites, counters, weight cache and site naming.

    Created by :func:`lossscale.autocast` per context; the handlers call its methods directly (never through
    the function mode), so composite layers do not re-enter the mode.
    """

    def __init__(
        self, precision: Precision, counters: RoundingCounters | None, recipe_state: RecipeState | None = None
    ) -> None:
        self.precision = precision
        self.compute = _none_if_fp32(precision.compute_format)
        self.output = _none_if_fp32(precision.output_format)
        self.grad = _none_if_fp32(precision.grad_format)
        self.scaled = precision.scaling == "current" and self.compute is not None
        # A GEMM result fed straight into another GEMM needs no second rounding when one format serves
        # operands, results and gradients: forward it already holds values of the format, and in backward the
        # result site rounds the (same-format) gradient anyway.
        self._one_format = self.compute == self.output == self.grad and not self.scaled
        self.counters = counters
        # A scaling recipe (delayed, rowwise, block, MX, NVFP4) quantizes the operands of every GEMM itself,
        # gradients included, so the result sites keep gradients in the output format.
        self.recipe = precision.recipe
        self.recipe_state = recipe_state if recipe_state is not None else RecipeState(count=False)
        if self.recipe is not None:
            self.grad = self.output
            self._one_format = False
        # Set by autocast when torch.autocast runs this device type natively alongside the emulation (CUDA
        # tensors native, tensors on other devices emulated): ops on it are left to torch.autocast.
        self.native_device_type: str | None = None
        self.strict = False  # raise on GEMM-class ops that cannot be emulated (lossscale.autocast strict=)
        # torch.autocast's nesting depth at entry (None: take it at the first handled op, replay_depth below).
        self.autocast_nesting: int | None = 0
        self.replay_depth = 0
        self.module_stack: list[str] = []
        self.model: torch.nn.Module | None = None  # autocast's model= (checkpoint recomputations re-hook it)
        # Like torch.autocast's cast cache: a leaf tensor that requires grad (a weight) is rounded once per
        # context, so that all its uses share one rounded copy and its gradient is rounded once.
        self._cache: dict[tuple[int, int, str, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def clear_cache(self) -> None:
        self._cache.clear()

    def _site_name(self, op: str, role: str) -> str:
        base = f"{op}.{role}"
        return f"{self.module_stack[-1]}:{base}" if self.module_stack else base

    def quantize(
        self,
        x: torch.Tensor,
        fmt: FloatFormat,
        site: str,
        info: Operand,
        *,
        scaled: bool = False,
        count: bool = True,
    ) -> torch.Tensor:
        """THE entry point through which every emulated rounding passes (operands, results, gradients, in
        forward and backward, and the aten-level rounding inside composite ops): round ``x`` to ``fmt``
        (with per-tensor power-of-two scaling if ``scaled``), counting at ``site``. ``info`` says which op,
        role, phase and reduction dimensions the tensor has; the built-in rounding ignores it, and a
        block-scaled quantizer (MX, NVFP4, row-wise FP8) replaces this method and uses it. ``count=False``:
        a recomputation of a rounding already counted (flash attention's backward). Does not sync."""
        counters = self.counters if count else None
        if self.recipe is not None and info.gemm_operand and info.reduction_dims and fmt != self.output:
            # A scaling recipe (block, row-wise, delayed) quantizes a GEMM operand along its reduction dim: the
            # aten pieces of composite ops (einsum, tensordot, ...) in forward and backward come through here.
            grad = info.phase == "backward" and info.role.startswith("grad_")
            role: Role = "grad_output" if grad else ("weight" if info.role == "weight" else "input")
            # A backward piece is the dgrad GEMM when the gradient is its first operand (g @ b^T), the wgrad
            # GEMM when it is the second (a^T @ g); the saved forward operands take that piece's phase too.
            first = info.role.removeprefix("grad_") in _FIRST_SLOTS
            phase: Phase = "fwd" if info.phase == "forward" else ("dgrad" if first == grad else "wgrad")
            ctx = self._gemm_context(info.op, "weight")
            fmt_r = ctx.grad if grad else ctx.compute
            # One history per operand slot: the second operand of a piece (mat2, batch2, ...) is keyed
            # f"{site}.{slot}.input", never sharing the first operand's history.
            slot = info.role.removeprefix("grad_")
            site_r = ctx.site if grad or slot in ("input", "weight", "mat1", "batch1") else f"{ctx.site}.{slot}"
            return recipe_operand(
                x, op=info.op, role=role, phase=phase, dim=info.reduction_dims[-1], recipe=ctx.recipe, fmt=fmt_r,
                state=ctx.state, site=site_r, count=count,
            )
        if scaled:
            return scaled_round(x, fmt, site, counters)
        return round_to(x, fmt, site, counters)

    def site(
        self,
        x: torch.Tensor,
        op: str,
        role: str,
        fwd: FloatFormat | None,
        bwd: FloatFormat | None,
        scaled: bool = False,
        info: Operand | None = None,
    ) -> torch.Tensor:
        """A rounding site: forward rounds to ``fwd``, backward rounds the gradient to ``bwd`` (None: keep)."""
        if fwd is None and bwd is None:
            return x
        name = self._site_name(op, role)
        if info is None:
            info = _info(op, role, "forward", None, False)
        if torch.is_grad_enabled() and x.requires_grad:
            out: torch.Tensor = _Site.apply(x, fwd, scaled, bwd, name, self, info)  # type: ignore[no-untyped-call]
            return out
        if fwd is None:
            return x
        return self.quantize(x, fwd, name, info, scaled=scaled)

    def _cached(self, x: torch.Tensor, kind: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not (x.is_leaf and x.requires_grad):
            return make()
        # The grad mode is part of the key: a copy rounded under no_grad has no autograd history.
        key = (id(x), x._version, kind, torch.is_grad_enabled())
        hit = self._cache.get(key)
        if hit is not None and hit[0] is x:
            return hit[1]
        out = make()
        self._cache[key] = (x, out)  # keeping x alive keeps id(x) unique while cached
        return out

    def operand(
        self, x: torch.Tensor, op: str, role: str, reduction_dims: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """A GEMM operand: compute format (with per-tensor scaling) forward, output format backward.
        ``reduction_dims``: the dims of ``x`` the GEMM reduces over (told to :meth:`quantize`). Under a scaling
        recipe (lossscale.scaling_recipes) the recipe quantizes the operand instead."""
        if self.recipe is not None:
            return recipe_site(x, self._gemm_context(op, "input"), "weight" if role == "weight" else "input")
        info = _info(op, role, "forward", reduction_dims, True)
        return self._cached(
            x, "operand", lambda: self.site(x, op, role, self.compute, self.output, self.scaled, info)
        )

    def result_operand(self, x: torch.Tensor, op: str, role: str) -> torch.Tensor:
        """An operand that is the direct output of a result site (or a view of one): skipped when that is
        exact (one format for operands, results and gradients), else an ordinary operand site."""
        return x if self._one_format else self.operand(x, op, role)

    def addend(self, x: torch.Tensor | None, op: str, role: str) -> torch.Tensor | None:
        """A bias or addend, applied in the GEMM epilogue: output format both ways, never scaled."""
        if x is None:
            return None
        return self._cached(x, "addend", lambda: self.site(x, op, role, self.output, self.output))

    def result(self, y: torch.Tensor, op: str, role: str = "output") -> torch.Tensor:
        """A GEMM result: output format forward; the incoming gradient rounded to the grad format."""
        return self.site(y, op, role, self.output, self.grad)

    def _gemm_context(self, op: str, role_b: Role) -> GEMMContext:
        assert self.recipe is not None  # only called under a recipe
        site = f"{self.module_stack[-1]}:{op}" if self.module_stack else op
        output = self.output

        def rounding(y: torch.Tensor, name: str) -> torch.Tensor:
            return y if output is None else round_to(y, output, name, self.counters)

        return GEMMContext(
            op, site, role_b, self.recipe, self.precision.compute_format, self.precision.grad_format, output,
            self.recipe_state, rounding,
        )

    def recipe_gemm(
        self, op: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.Tensor | None:
        """Under a scaling recipe: ``F.linear`` or a 2-operand ``matmul``/``mm``/``bmm`` whose three GEMMs
        (forward, dgrad, wgrad) quantize both operands along their reduction dimensions
        (:class:`~lossscale.emulate.recipes.RecipeGEMM`); None for shapes it does not cover (the caller then
        uses the per-operand sites)."""
        if func is torch.Tensor.__rmatmul__:
            return None
        if op == "linear":
            names = ("input", "weight", "bias")
            vals = dict(zip(names, args, strict=False))
            vals.update({k: v for k, v in kwargs.items() if k in names})
            if set(kwargs) - set(names):
                return None
            a, w, bias = vals.get("input"), vals.get("weight"), vals.get("bias")
            if not isinstance(a, torch.Tensor) or not isinstance(w, torch.Tensor) or a.dim() < 2 or w.dim() != 2:
                return None
            b = w.t()
            role_b: Role = "weight"
        elif op in ("matmul", "mm", "bmm") and len(args) == 2 and not kwargs:
            a, b = args
            bias = None
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2 or b.dim() < 2:
                return None
            if b.dim() != 2 and (a.dim() != b.dim() or a.shape[:-2] != b.shape[:-2]):
                return None
            role_b = "weight" if (b.is_leaf and b.requires_grad) else "input"
        else:
            return None
        y: torch.Tensor = RecipeGEMM.apply(a, b, bias, self._gemm_context(op, role_b))  # type: ignore[no-untyped-call]
        self.gemm_done(op)
        return y

    def gemm_done(self, op: str, n: int = 1) -> None:
        if self.counters is not None:
            self.counters.count_gemm(op, n)

    # ----------------------------------------------------------------------------------------------
    # Emulated primitives the handlers compose.
    def linear(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        op: str = "linear",
        roles: tuple[str, str, str, str] = ("input", "weight", "bias", "output"),
    ) -> torch.Tensor:
        if self.recipe is not None and x.dim() >= 2 and w.dim() == 2:
            # A scaling recipe quantizes all three GEMMs (attention's projections come through here).
            out: torch.Tensor = RecipeGEMM.apply(x, w.t(), b, self._gemm_context(op, "weight"))  # type: ignore[no-untyped-call]
            self.gemm_done(op)
            return out
        y = torch.nn.functional.linear(
            self.operand(x, op, roles[0], (-1,)), self.operand(w, op, roles[1], (-1,)),
            self.addend(b, op, roles[2]),
        )
        self.gemm_done(op)
        return self.result(y, op, roles[3])


def _none_if_fp32(fmt: FloatFormat) -> FloatFormat | None:
    # FP32 sites are identities on FP32 tensors: skip them entirely.
    return None if fmt == FP32 else fmt
