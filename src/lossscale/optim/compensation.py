"""Compensated weight updates for low-precision weights: Kahan summation and stochastic rounding.

With weights kept in a format of ``M`` mantissa bits and round-to-nearest, ``w + u`` rounds back to ``w``
whenever ``|u|`` is below half the spacing at ``w`` (between ``2^-(M+2) |w|`` and ``2^-(M+1) |w|``): for BF16
(``M = 7``) an update smaller than about 0.2-0.4% of the weight is lost, every step, and training stalls
(Zamirai et al., "Revisiting BFloat16 Training", 2020, arXiv:2010.06192). Two remedies, both applied to the
weight update only:

Kahan (compensated) summation keeps what rounding dropped in a buffer ``c`` of the weight's format and adds
it back at the next step (Kahan 1965; for BF16 weights: Zamirai et al. 2020; torch-optimi keeps the buffer
in the weight dtype, https://optimi.benjaminwarner.dev/kahan_summation/). Ours accumulates in FP32::

    t = w + c + u                # FP32: the weight, what earlier steps dropped, and the update
    w = round(t)                 # the new weight, nearest (weight format)
    c = round(t - w)             # what this rounding dropped (t - w is exact in FP32)

so ``w + c`` carries the weight to FP32 precision (what FP32 master weights would hold) up to the rounding of
``c`` itself (2^-(M+1) of ``c``, and ``|c| <= half a spacing of w``). For FP32 weights (Kahan on FP32 sums)
the textbook form ``y = u + c; s = w + y; c = (w - s) + y`` is used instead.

Stochastic rounding rounds the new weight up with probability equal to the distance from the lower
neighbour over the gap, so ``E[round(w + u)] = w + u``: small updates survive on average, with no buffer
(Gupta et al. 2015, arXiv:1502.02551; Zamirai et al. 2020; Ozkara et al. 2025, arXiv:2502.20566)::

    w = round_stochastic(w + u)

Every function here works on lists of tensors (one "foreach" call per list when ``foreach`` is True, a
for-loop otherwise) and never synchronises with the device.

Weights may be native low-precision tensors (``torch.bfloat16``) or FP32 tensors that hold values of a
narrower format ("emulated" weights, e.g. BF16 values in FP32 on a CPU without BF16 arithmetic). Both take
the same FP32 arithmetic and the same rounding, so they give the same values bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ..formats import FP32, FloatFormat, FormatLike
from ..quantize import quantize

__all__ = [
    "Compensation",
    "COMPENSATIONS",
    "weight_format_of",
    "resolve_compensation",
    "store_rounded_",
    "apply_update_",
    "begin_update",
    "finish_update_",
    "kahan_add_native_",
    "StochasticRoundingRNG",
]

Compensation = Literal["none", "kahan", "stochastic"]
COMPENSATIONS: tuple[str, ...] = ("none", "kahan", "stochastic")
WEIGHT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def weight_format_of(param: Tensor, weight_format: FormatLike | None) -> FloatFormat:
    """The format ``param``'s values are kept in: ``weight_format``, or by default its dtype's format.

    A native low-precision tensor (BF16, FP16) can only be kept in its own format; an FP32 tensor may hold
    the values of any narrower format (emulated weights). Raises ``TypeError``/``ValueError`` otherwise.
    """
    if param.dtype not in WEIGHT_DTYPES:
        raise TypeError(
            f"parameters must be float32, bfloat16 or float16 tensors, got {param.dtype} "
            "(float64 weights need no compensation; use torch.optim)"
        )
    own = FloatFormat.parse(param.dtype)
    if weight_format is None:
        return own
    fmt = FloatFormat.parse(weight_format)
    if param.dtype != torch.float32 and fmt != own:
        raise ValueError(
            f"weight_format={fmt.name!r} does not match a {param.dtype} parameter: a native low-precision "
            f"tensor is kept in its own format ({own.name!r}); emulate other formats with float32 tensors"
        )
    return fmt


def resolve_compensation(compensation: str | None, fmt: FloatFormat) -> Compensation:
    """``compensation``, or by default ``"kahan"`` for formats narrower than FP32 and ``"none"`` for FP32."""
    if compensation is None:
        return "none" if fmt == FP32 else "kahan"
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {COMPENSATIONS} or None, got {compensation!r}")
    if compensation == "kahan":
        return "kahan"
    return "stochastic" if compensation == "stochastic" else "none"


def _native(dst: Tensor, fmt: FloatFormat) -> bool:
    # The cast into dst rounds to nearest-even exactly as quantize does for these formats (quantize's
    # native path is the same cast), so a copy_ does the rounding in one pass.
    return dst.dtype != torch.float32 and dst.dtype == fmt.torch_dtype


def store_rounded_(dsts: Sequence[Tensor], srcs: Sequence[Tensor], fmt: FloatFormat, *, foreach: bool) -> None:
    """``dst <- round(src)`` to ``fmt`` (nearest-even), for FP32 ``srcs``; ``dsts`` keep their dtype."""
    if not dsts:
        return
    if foreach and all(_native(d, fmt) or fmt == FP32 for d in dsts):
        torch._foreach_copy_(list(dsts), list(srcs))
        return
    for d, s in zip(dsts, srcs, strict=True):
        d.copy_(s if (_native(d, fmt) or fmt == FP32) else quantize(s, fmt))


def as_fp32(ts: Sequence[Tensor]) -> list[Tensor]:
    # Exact upcasts; FP32 tensors are returned as they are (callers only read them).
    return [t if t.dtype == torch.float32 else t.float() for t in ts]


def _fp32_copy(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t.clone() if t.dtype == torch.float32 else t.float() for t in ts]


def begin_update(
    params: list[Tensor],
    comps: list[Tensor] | None,
    *,
    fmt: FloatFormat,
    compensation: Compensation,
    decay: float = 1.0,
) -> list[Tensor]:
    """New FP32 accumulators into which an optimizer adds its update; :func:`finish_update_` stores them.

    ``acc = decay * w + c`` (``c``: the Kahan buffer, zero without Kahan; ``decay`` folds in decoupled
    weight decay ``1 - lr * wd``), so the optimizer's ``acc += update`` and the weight's rounding are the only
    operations on the weight. For FP32 weights with Kahan, ``acc = (decay - 1) * w + c`` (the update alone:
    Kahan's exact form needs the old weight separately). Only same-dtype FP32 operations (torch's CPU kernels
    for mixed dtypes are an order of magnitude slower). Does not synchronise.
    """
    if compensation == "kahan":
        if comps is None:
            raise ValueError("compensation='kahan' needs Kahan buffers (comps)")
        acc = _fp32_copy(comps)
        alpha = decay - 1.0 if fmt == FP32 else decay
        if alpha != 0.0:
            torch._foreach_add_(acc, as_fp32(params), alpha=alpha)
        return acc
    acc = _fp32_copy(params)
    if decay != 1.0:
        torch._foreach_mul_(acc, decay)
    return acc


def _round_into_(params: list[Tensor], acc: list[Tensor], fmt: FloatFormat, *, foreach: bool) -> list[Tensor]:
    """``w <- round(acc)``; returns the new weights in FP32 (for the Kahan residual)."""
    if all(_native(p, fmt) for p in params):
        store_rounded_(params, acc, fmt, foreach=foreach)
        return as_fp32(params)
    rounded = [quantize(a, fmt) for a in acc]
    for p, r in zip(params, rounded, strict=True):
        p.copy_(r)
    return rounded


def finish_update_(
    params: list[Tensor],
    acc: list[Tensor],
    comps: list[Tensor] | None,
    *,
    fmt: FloatFormat,
    compensation: Compensation,
    generator: torch.Generator | None = None,
    foreach: bool = True,
) -> None:
    """Store accumulators from :func:`begin_update` (plus the update) into the weights; ``acc`` is scratch.

    none: ``w = round(acc)``; stochastic: ``w = round_stochastic(acc)``; kahan: ``w = round(acc)``,
    ``c = round(acc - w)`` (``acc - w`` is exact in FP32: ``w`` is ``acc``'s nearest neighbour in the format).
    FP32 weights with Kahan: ``s = w + y``, ``c = (w - s) + y`` (Kahan's form, ``y = acc``; exact when
    ``|w| >= |y|``, which holds for updates smaller than the weight).
    Does not synchronise.
    """
    if not params:
        return
    if compensation == "kahan":
        if comps is None:
            raise ValueError("compensation='kahan' needs Kahan buffers (comps)")
        if fmt == FP32:
            old = [p.clone() for p in params]
            torch._foreach_add_(params, acc)  # s = fl(w + y)
            torch._foreach_sub_(old, params)  # w - s: exact when |w| >= |y| (Fast2Sum, Dekker 1971)
            torch._foreach_add_(old, acc)  # (w - s) + y: what the addition dropped
            store_rounded_(comps, old, fmt, foreach=foreach)
            return
        new = _round_into_(params, acc, fmt, foreach=foreach)  # w = round(acc)
        torch._foreach_sub_(acc, new)  # acc - w, exact
        store_rounded_(comps, acc, fmt, foreach=foreach)  # c = round(acc - w)
        return
    if compensation == "stochastic" and fmt != FP32:
        for p, t in zip(params, acc, strict=True):
            p.copy_(quantize(t, fmt, rounding="stochastic", generator=generator))
        return
    store_rounded_(params, acc, fmt, foreach=foreach)


def kahan_add_native_(params: list[Tensor], comps: list[Tensor]) -> None:
    """``w <- w + c`` with Kahan's textbook compensation, every operation in the weights' own dtype.

    ``comps`` already holds ``c + u`` (the buffer plus this step's update, rounded once)::

        s = round(w + c);  c = round(c + (w - s));  w = s

    ``w - s`` is exact (Sterbenz: ``s`` is within a factor 2 of ``w`` when ``|c| <= |w|``), so ``c`` keeps
    what the rounding of ``s`` dropped up to one rounding of ``c`` itself. The all-low-precision form used by
    torch-optimi (https://optimi.benjaminwarner.dev/kahan_summation/); :func:`finish_update_` is the FP32-
    accumulated form. Does not synchronise.
    """
    prev = [x.clone() for x in params]
    torch._foreach_add_(params, comps)  # s = round(w + c)
    torch._foreach_sub_(prev, params)  # w - s, exact
    torch._foreach_add_(comps, prev)  # c = round(c + (w - s))


def apply_update_(
    params: list[Tensor],
    updates: list[Tensor],
    comps: list[Tensor] | None,
    *,
    fmt: FloatFormat,
    compensation: Compensation,
    generator: torch.Generator | None = None,
    foreach: bool = True,
) -> None:
    """``w <- w + u`` for each weight, rounded to ``fmt`` with the given compensation (module docstring).

    Args:
        params: the weights (float32, or the native dtype of ``fmt``), updated in place.
        updates: updates ``u`` (any float dtype, added in FP32), one per weight; not modified.
        comps: Kahan buffers (same dtype as the weights), updated in place; required for ``"kahan"``.
        fmt: the format the weights are kept in.
        compensation: ``"none"`` (nearest), ``"kahan"`` or ``"stochastic"``.
        generator: random source for ``"stochastic"`` (one per device; default torch's global one).
        foreach: use torch's multi-tensor (``_foreach``) kernels where they apply.

    Does not synchronise with the device.
    """
    if not params:
        return
    acc = begin_update(params, comps, fmt=fmt, compensation=compensation)
    torch._foreach_add_(acc, as_fp32(updates))
    finish_update_(params, acc, comps, fmt=fmt, compensation=compensation, generator=generator, foreach=foreach)


class StochasticRoundingRNG:
    """One ``torch.Generator`` per device for stochastic rounding, created lazily, seeded from one seed.

    Saved and restored with the optimizer's ``state_dict`` so that runs are reproducible and a resumed run
    draws the same random bits as an uninterrupted one. The generator of device ``d`` is seeded with
    ``seed + index`` where ``index`` counts devices in order of first use (so a CPU-only run depends on
    ``seed`` alone). Never touches torch's global generator.
    """

    def __init__(self, seed: int) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator:
        """The generator for ``device`` (created and seeded on first use). Does not synchronise."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + len(self._generators))
            self._generators[key] = gen
        return gen

    def state_dict(self) -> dict[str, object]:
        """``{"seed": int, "states": {device: uint8 tensor}}``; loads with ``torch.load(weights_only=True)``."""
        return {"seed": self.seed, "states": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the seed and every saved generator's state (all or nothing: validated first)."""
        loaded = StochasticRoundingRNG.from_state_dict(state)
        self.seed, self._generators = loaded.seed, loaded._generators

    @classmethod
    def from_state_dict(cls, state: object) -> StochasticRoundingRNG:
        """A new RNG from :meth:`state_dict` output; ``ValueError`` naming the problem if it is malformed."""
        if not isinstance(state, dict):
            raise ValueError(f"malformed stochastic-rounding rng state: expected a dict, got {type(state).__name__}")
        seed = state.get("seed")
        states = state.get("states")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or not isinstance(states, dict):
            raise ValueError("malformed stochastic-rounding rng state: expected {'seed': int >= 0, 'states': dict}")
        out = cls(seed)
        for key, value in states.items():
            if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
                raise ValueError(f"malformed stochastic-rounding rng state for device {key!r}: expected a uint8 tensor")
            try:
                gen = torch.Generator(device=torch.device(key))
                gen.set_state(value)
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"malformed stochastic-rounding rng state for device {key!r}: {e}") from None
            out._generators[key] = gen
        return out
