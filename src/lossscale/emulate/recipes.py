"""Scaling recipes in the emulation: per-site state, counters, and the one function that quantizes a GEMM
operand (:func:`recipe_operand`).

:func:`recipe_operand` is the whole numerics of a recipe for one operand of one GEMM: given the FP32 tensor,
the op, the operand's role and the GEMM phase, the operand's reduction dimension in that GEMM, the recipe,
the element format and the state, it returns the dequantized FP32 operand and adds to the per-site counters.
The emulation calls it for both operands of every GEMM, forward and backward:

    forward  y  = A B            A: role "input",       dim -1 (K)     B: "weight"/"input", dim -2 (K)
    dgrad    dA = G B^T          G: "grad_output",      dim -1 (N)     B: same role,        dim -1 (N)
    wgrad    dB = A^T G          A: "input",            dim -2 (M)     G: "grad_output",    dim -2 (M)

so each GEMM re-quantizes its operands from FP32 along its own reduction dimension. :class:`RecipeGEMM` is
the adapter at today's interception level (``F.linear``, ``matmul``/``mm``/``bmm``); other low-precision ops
(convolutions, attention, recurrent layers, addmm) quantize their operands along the last dimension in forward
only, with a warning (see :func:`recipe_site`).

Delayed scaling (Transformer Engine's rule; see :mod:`lossscale.scaling_recipes`): per site and role one
history; the forward roles record their amax in the forward GEMM, ``grad_output`` in the dgrad GEMM; the
other GEMMs of the same step reuse the scale that call used.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Literal

import torch

from ..blockformats import BlockFormat, _blocked, _quantize_blocks, _unblocked
from ..formats import FloatFormat
from ..quantize import quantize
from ..scaling_recipes import ScalingRecipe

__all__ = ["RecipeState", "RecipeCounts", "recipe_operand", "RecipeGEMM", "recipe_site", "Role", "Phase"]

Role = Literal["input", "weight", "grad_output"]
Phase = Literal["fwd", "dgrad", "wgrad"]
_ROLES = ("input", "weight", "grad_output")
_PHASES = ("fwd", "dgrad", "wgrad")
# Order of the on-device counts per site.
_FIELDS = ("nonzero", "underflow", "saturated", "nonfinite", "stale_overflow", "calls")


@dataclasses.dataclass(frozen=True)
class RecipeCounts:
    """Counts at one recipe site (plain ints; from :meth:`RecipeState.read`).

    Attributes:
        elements: values quantized.
        nonzero: nonzero values quantized.
        underflow: nonzero values that became zero.
        saturated: finite values whose scaled magnitude exceeded the element format's max (clamped).
        nonfinite: finite values that came out NaN (their block held an inf or NaN).
        stale_overflow: delayed scaling: calls where the scale taken from the history was too large for the
            current amax (``amax * scale > max``), so values saturated.
        calls: quantizations counted.
    """

    elements: int = 0
    nonzero: int = 0
    underflow: int = 0
    saturated: int = 0
    nonfinite: int = 0
    stale_overflow: int = 0
    calls: int = 0

    @property
    def underflow_fraction(self) -> float:
        return self.underflow / self.nonzero if self.nonzero else 0.0

    @property
    def saturated_fraction(self) -> float:
        return self.saturated / self.elements if self.elements else 0.0

    def __add__(self, other: RecipeCounts) -> RecipeCounts:
        return RecipeCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


class _Delayed:
    """One delayed-scaling history (Transformer Engine's ``amax_history`` and ``scale``), on device.

    ``history[0]`` is the slot the current step writes; after the update the history is rolled by one and
    slot 0 cleared, so the window holds this step and the ``len - 1`` before it."""

    def __init__(self, length: int, device: torch.device) -> None:
        self.history = torch.zeros(length, dtype=torch.float32, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        self.last_scale = self.scale.clone()
        # Forward calls recorded since the last backward use: a checkpoint recomputation replays last_scale,
        # which is the scale of every forward call only when there was one (see RecipeState.replaying).
        self.fwd_calls = 0
        self.in_backward = False


class RecipeState:
    """Per-site state of the scaling recipes (delayed-scaling histories) and their counters.

    Pass one to :func:`lossscale.autocast` (``recipe_state=``) and keep it across steps: delayed scaling needs
    its histories from step to step. ``count=False`` skips the counters (a few element-wise passes per
    operand; an autocast given no state uses such a one). ``record_amax=True`` also keeps, per site and role,
    the amax and binade histogram of every call (on device, no sync) for the recipe advisor
    (:func:`lossscale.recipe_advisor.replay_delayed`).
    """

    def __init__(self, *, record_amax: bool = False, count: bool = True) -> None:
        if not isinstance(record_amax, bool):
            raise TypeError(f"record_amax must be a bool, got {type(record_amax).__name__}")
        if not isinstance(count, bool):
            raise TypeError(f"count must be a bool, got {type(count).__name__}")
        self.record_amax = record_amax
        self.count = count
        self.delayed: dict[str, _Delayed] = {}
        self._counts: dict[tuple[str, str], torch.Tensor] = {}
        self._elements: dict[tuple[str, str], int] = {}
        self.amax: dict[str, list[torch.Tensor]] = {}
        self.hists: dict[str, list[torch.Tensor]] = {}
        self.warned_no_model = False  # autocast's one warning: delayed histories keyed by op name only
        # True while activation checkpointing recomputes a forward segment: forward operands replay the scale
        # of the original forward (delayed: last_scale) and are neither recorded nor counted.
        self.replaying = False
        self.warned_replay = False

    def _add(self, key: tuple[str, str], x: torch.Tensor, values: list[torch.Tensor]) -> None:
        self._elements[key] = self._elements.get(key, 0) + x.numel()
        buf = self._counts.get(key)
        if buf is None:
            buf = torch.zeros(len(_FIELDS), dtype=torch.int64, device=x.device)
            self._counts[key] = buf
        buf.add_(torch.stack([v.to(torch.int64) for v in values]))

    def read(self) -> dict[tuple[str, str], RecipeCounts]:
        """Counts keyed by ``(site.role, phase)``. Synchronises once."""
        keys = list(self._counts)
        if not keys:
            return {}
        host = torch.stack([self._counts[k].cpu() for k in keys]).tolist()
        return {k: RecipeCounts(self._elements[k], *row) for k, row in sorted(zip(keys, host, strict=True))}

    def histograms(self, key: str) -> list[list[int]]:
        """Per recorded call at ``key``: counts of nonzero finite values per binade ``floor(log2|x|)``, from
        ``HIST_MIN_LOG2`` (-149) to 127. Synchronises once."""
        seq = self.hists.get(key, [])
        return torch.stack(seq).cpu().tolist() if seq else []

    def amax_sequence(self, key: str) -> list[float]:
        """The recorded amax per call at ``key`` (``site.role``). Synchronises once."""
        seq = self.amax.get(key, [])
        return torch.stack(seq).cpu().tolist() if seq else []

    def reset_counts(self) -> None:
        """Forget counts and recorded amaxes (histories are kept). Does not synchronise."""
        self._counts.clear()
        self._elements.clear()
        self.amax.clear()
        self.hists.clear()


HIST_MIN_LOG2, HIST_MAX_LOG2 = -149, 127  # FP32's binades, subnormals included


def _binades(x: torch.Tensor) -> torch.Tensor:
    """Counts of the nonzero finite values of x per binade floor(log2|x|) (frexp: exact), on device."""
    a = x.abs()
    keep = (a > 0) & torch.isfinite(a)
    e = torch.frexp(a[keep])[1].to(torch.int64) - 1 - HIST_MIN_LOG2
    return torch.bincount(e, minlength=HIST_MAX_LOG2 - HIST_MIN_LOG2 + 1)


# ------------------------------------------------------------------------------------------------------
# Scales


def _exact_or_pow2(fmt_max: float, amax: torch.Tensor, power_of_two: bool) -> torch.Tensor:
    """``fmt_max / amax`` in FP32 (1 where amax is 0 or not finite), optionally rounded down to a power of
    two (exact: frexp gives the exponent; torchao's ``round_scales_to_power_of_2``)."""
    ok = torch.isfinite(amax) & (amax > 0)
    scale = torch.where(ok, fmt_max / torch.where(ok, amax, 1.0), 1.0)
    if power_of_two:
        scale = torch.ldexp(torch.ones_like(scale), torch.frexp(scale)[1] - 1)
    return scale


def _tile_amax(x: torch.Tensor, dim: int, block: int, weight_tiles: bool) -> torch.Tensor:
    """amax per 1 x block tile along ``dim`` (shape of x), or per block x block tile of a 2-d weight."""
    if weight_tiles and x.dim() == 2:
        rows, cols = x.shape
        pr, pc = (-rows) % block, (-cols) % block
        a = torch.nn.functional.pad(x.abs(), (0, pc, 0, pr))
        t = a.reshape(a.shape[0] // block, block, a.shape[1] // block, block).amax(dim=(1, 3), keepdim=True)
        t = t.expand(-1, block, -1, block).reshape(a.shape)
        return t[:rows, :cols]
    blocks, n = _blocked(x.abs(), dim, block)
    return _unblocked(blocks.amax(-1, keepdim=True).expand_as(blocks), n, dim)


def _scaled(
    x: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor, divide: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q(x * scale) dequantized by ``/ scale`` (torchao) or ``* (1 / scale)`` (Transformer Engine's
    scale_inv), saturating (both projects' casts saturate); non-finite inputs pass through (a loss scaler
    must still see them). Returns (dequantized, scaled x)."""
    xs = x * scale
    q = quantize(xs, fmt, saturate=True)
    out = q / scale if divide else q * torch.reciprocal(scale)
    return torch.where(torch.isfinite(x), out, x), xs


# torchao's float8 amax floor (torchao.float8.float8_utils.EPS): a row of amax below it gets the scale
# max / 1e-12 (and zeros stay zero).
_TORCHAO_EPS = 1e-12


def _past_max(fmt: FloatFormat) -> float:
    """Scaled magnitudes above this saturate (they would round past max: the midpoint to the next value)."""
    return fmt.max + math.ldexp(1.0, fmt.emax - fmt.mantissa_bits - 1)


def recipe_operand(
    x: torch.Tensor,
    *,
    op: str,
    role: Role,
    phase: Phase,
    dim: int,
    recipe: ScalingRecipe,
    fmt: FloatFormat,
    state: RecipeState,
    site: str,
    records: bool | None = None,
    count: bool = True,
) -> torch.Tensor:
    """Quantize one GEMM operand as ``recipe`` does and return it dequantized (FP32; no autograd history).

    Args:
        x: the FP32 operand.
        op: the GEMM's op name (``"linear"``, ``"matmul"``, ...), for messages.
        role: ``"input"``, ``"weight"`` or ``"grad_output"`` (block recipes tile weights 128x128).
        phase: ``"fwd"``, ``"dgrad"`` or ``"wgrad"``: which GEMM of the step (delayed scaling records the
            forward roles' amax in ``"fwd"`` and ``grad_output``'s in ``"dgrad"``; other phases reuse).
        dim: the operand's reduction dimension in this GEMM (blocks and rows run along it).
        recipe: the :class:`~lossscale.scaling_recipes.ScalingRecipe`.
        fmt: the element format (E4M3, E5M2, E2M1, ...).
        state: the :class:`RecipeState` (histories and counters).
        site: the site name (module path and op); the state keys are ``f"{site}.{role}"``.
        records: whether this call records the operand's amax (delayed history, ``record_amax``); None: the
            default above. ``grad_output`` records in ``"wgrad"`` when the GEMM has no dgrad (a first layer
            whose input does not require grad).
        count: False for a recomputation of a quantization already counted (flash attention's backward): not
            counted in ``state`` nor recorded for the advisor.

    Counts underflow, saturation, NaN blocks and (delayed) stale-scale overflow into ``state``. Does not
    synchronise.
    """
    if role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}, got {role!r}")
    if phase not in _PHASES:
        raise ValueError(f"phase must be one of {_PHASES}, got {phase!r}")
    if x.dtype != torch.float32:
        raise TypeError(f"{op}: recipe operands must be float32, got {x.dtype}")
    key = f"{site}.{role}"
    if records is None:
        records = phase == ("dgrad" if role == "grad_output" else "fwd")
    replay = state.replaying and phase == "fwd"
    x = x.detach()
    stale = torch.zeros((), dtype=torch.int64, device=x.device)
    if x.numel() == 0:
        return x.clone()
    d = dim % x.dim()
    if recipe.kind in ("mx", "nvfp4"):
        bfmt = (
            BlockFormat(fmt, "e8m0", 32) if recipe.kind == "mx" else BlockFormat(fmt, "e4m3", 16, tensor_scale=True)
        )
        blocks, n = _blocked(x, d, bfmt.block_size)
        p, mult, _ = _quantize_blocks(blocks, bfmt, recipe.scale_mode)
        out = _unblocked(p.mul_(mult), n, d, contiguous=False)  # a view: the GEMM takes any layout
        if replay or not count or not (state.count or state.record_amax):
            return out
        saturated = torch.count_nonzero(blocks.abs() > _past_max(fmt) * mult)
        amax = x.abs().amax()
    else:
        if recipe.kind == "delayed":
            amax = x.abs().amax()
            hist = state.delayed.get(key)
            if hist is None:
                hist = _Delayed(recipe.amax_history_len, x.device)
                state.delayed[key] = hist
            if replay:
                records = False
                if hist.fwd_calls > 1 and not state.warned_replay:
                    state.warned_replay = True
                    warnings.warn(
                        f"{op}: activation checkpointing recomputes {key!r} under delayed scaling, but that "
                        f"history was used by {hist.fwd_calls} forward calls since its last backward (a shared "
                        "site: no model= to autocast, a module called twice, or several forwards per backward); "
                        "the recomputation replays the last call's scale, so its gradients may differ from the "
                        "un-checkpointed run",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            elif records and role != "grad_output":
                if hist.in_backward:
                    hist.fwd_calls, hist.in_backward = 0, False
                hist.fwd_calls += 1
            elif phase != "fwd":
                hist.in_backward = True
            scale = hist.scale if records else hist.last_scale
            if not recipe.enabled:
                scale = torch.ones_like(scale)
            if records:
                hist.last_scale = scale
                stale = (amax * scale > _past_max(fmt)).to(torch.int64)
                _delayed_update(hist, amax, recipe, fmt.max)
        elif recipe.kind == "rowwise":
            # torchao float8 (axiswise): scale = float32(max / max(amax, 1e-12)) computed in float64, then
            # optionally rounded down to a power of two; dequantized by dividing.
            amax_rows = x.abs().amax(d, keepdim=True)
            scale = (fmt.max / amax_rows.double().clamp(min=_TORCHAO_EPS)).float()
            if recipe.power_of_two:
                scale = torch.ldexp(torch.ones_like(scale), torch.frexp(scale)[1] - 1)
            amax = amax_rows.amax()
        else:  # block
            tiles = _tile_amax(x, d, recipe.block_size, role == "weight")
            scale = _exact_or_pow2(fmt.max, tiles, recipe.power_of_two)
            amax = tiles.amax()
        if not recipe.enabled:
            scale = torch.ones_like(scale)
        out, xs = _scaled(x, fmt, scale, divide=recipe.kind == "rowwise")
        if replay or not count or not (state.count or state.record_amax):
            return out
        saturated = torch.count_nonzero((xs.abs() > _past_max(fmt)) & torch.isfinite(x))
    finite = torch.isfinite(x)
    nonzero = torch.count_nonzero(x)
    underflow = torch.count_nonzero((x != 0) & (out == 0))
    nonfinite = torch.count_nonzero(finite & ~torch.isfinite(out))
    counts = [nonzero, underflow, saturated, nonfinite, stale, torch.ones((), dtype=torch.int64, device=x.device)]
    state._add((key, phase), x, counts)
    if state.record_amax and records:
        state.amax.setdefault(key, []).append(amax.float())
        state.hists.setdefault(key, []).append(_binades(x))
    return out


def _delayed_update(hist: _Delayed, amax: torch.Tensor, recipe: ScalingRecipe, fmt_max: float) -> None:
    """Record this step's amax and compute the next step's scale (Transformer Engine's
    ``_default_get_amax_and_update_history`` and ``_default_sf_compute``): amax over the window (or the
    newest), ``scale = (fmt_max / amax) / 2^margin``, the old scale kept when amax is 0 or not finite; then
    roll the history by one and clear the slot the next step writes."""
    hist.history[0] = amax
    a = hist.history.amax() if recipe.amax_compute_algo == "max" else hist.history[0].clone()
    new = (fmt_max / a) / (2.0**recipe.margin)
    if recipe.power_of_two:
        new = torch.ldexp(torch.ones_like(new), torch.frexp(new)[1] - 1)
    ok = torch.isfinite(a) & (a > 0)
    hist.scale = torch.where(ok, new, hist.scale)
    hist.history = torch.roll(hist.history, -1, 0)
    hist.history[0] = 0.0


# ------------------------------------------------------------------------------------------------------
# The adapter at today's interception level: a GEMM whose three products all quantize their operands.


@dataclasses.dataclass
class GEMMContext:
    """What :class:`RecipeGEMM` needs from the emulator."""

    op: str
    site: str
    role_b: Role
    recipe: ScalingRecipe
    compute: FloatFormat
    grad: FloatFormat
    output: FloatFormat | None
    state: RecipeState
    rounding: Any  # callable(t, site) -> rounded t (the emulator's result rounding with its counters)


class RecipeGEMM(torch.autograd.Function):
    """``y = q_out(Q(a) @ Q(b) + bias)`` with ``a`` (..., M, K) and ``b`` (K, N) or (..., K, N); backward
    ``da = q_out(Q(g) @ Q(b)^T)``, ``db = q_out(Q(a)^T @ Q(g))`` with every Q along that GEMM's reduction
    dimension (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, g: GEMMContext
    ) -> torch.Tensor:
        ctx.g = g
        ctx.save_for_backward(a, b)
        ctx.has_bias = bias is not None
        aq = _q(g, a, "input", "fwd", -1)
        bq = _q(g, b, g.role_b, "fwd", -2, slot_b=True)
        y = torch.matmul(aq, bq)
        if bias is not None:
            y = y + (bias if g.output is None else quantize(bias, g.output))
        return g.rounding(y, g.site + ".output")  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, Any, None]:
        g: GEMMContext = ctx.g
        a, b = ctx.saved_tensors
        da = db = dbias = None
        if ctx.needs_input_grad[0]:
            gq = _q(g, grad, "grad_output", "dgrad", -1)
            bq = _q(g, b, g.role_b, "dgrad", -1, slot_b=True)
            da = _out(g, torch.matmul(gq, bq.transpose(-1, -2)))
        if ctx.needs_input_grad[1]:
            if b.dim() == 2:  # reduce over every row of a (all tokens)
                a2, g2 = a.reshape(-1, a.shape[-1]), grad.reshape(-1, grad.shape[-1])
            else:
                a2, g2 = a, grad
            aq = _q(g, a2, "input", "wgrad", -2)
            # No dgrad GEMM (the input needs no gradient): grad_output's amax is recorded here instead.
            gq = _q(g, g2, "grad_output", "wgrad", -2, records=None if ctx.needs_input_grad[0] else True)
            db = _out(g, torch.matmul(aq.transpose(-1, -2), gq))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = _out(g, grad.reshape(-1, grad.shape[-1]).sum(0))
        return da, db, dbias, None


def _q(
    g: GEMMContext,
    x: torch.Tensor,
    role: Role,
    phase: Phase,
    dim: int,
    slot_b: bool = False,
    records: bool | None = None,
) -> torch.Tensor:
    fmt = g.grad if role == "grad_output" else g.compute
    # The second operand of an activation x activation GEMM (role "input" too) gets its own site, so that
    # the two operands never share one delayed-scaling history (keys f"{site}.mat2.input").
    site = f"{g.site}.mat2" if slot_b and role == "input" else g.site
    return recipe_operand(
        x, op=g.op, role=role, phase=phase, dim=dim, recipe=g.recipe, fmt=fmt, state=g.state, site=site,
        records=records,
    )


def _out(g: GEMMContext, t: torch.Tensor) -> torch.Tensor:
    return t if g.output is None else quantize(t, g.output)


class _RecipeSite(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: GEMMContext, role: Role) -> torch.Tensor:
        ctx.output = g.output
        return _q(g, x, role, "fwd", -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return (grad if ctx.output is None else quantize(grad, ctx.output)), None, None


def recipe_site(x: torch.Tensor, g: GEMMContext, role: Role) -> torch.Tensor:
    """An operand of a low-precision op the recipe adapter does not cover (convolution, attention, recurrent
    layers, addmm/baddbmm, 1-d matmul): quantized along its last dimension in forward, its gradient rounded to
    the output format in backward. Warns (Python's default filter shows it once per recipe and op)."""
    warnings.warn(
        f"{g.recipe.describe()}: {g.op} operands are quantized along their last dimension in forward only "
        "(the backward GEMMs reuse them and their gradients stay in the output format); only linear and "
        "matmul/mm/bmm apply the recipe to all three GEMMs",
        stacklevel=3,
    )
    if torch.is_grad_enabled() and x.requires_grad:
        out: torch.Tensor = _RecipeSite.apply(x, g, role)  # type: ignore[no-untyped-call]
        return out
    return _q(g, x, role, "fwd", -1)
