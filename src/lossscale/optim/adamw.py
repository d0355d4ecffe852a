"""Adam and AdamW for low-precision weights, with Kahan-compensated or stochastically rounded updates.

The moment updates follow torch.optim.Adam/AdamW exactly (Loshchilov & Hutter, "Decoupled Weight Decay
Regularization", arXiv:1711.05101; Kingma & Ba, arXiv:1412.6980); only the last step, adding the update to
the weight, changes for weights narrower than FP32 (see :mod:`lossscale.optim.compensation`)::

    t += 1                                         # a Python int: no tensor, no sync
    g = -grad if maximize else grad
    if weight_decay and not decoupled: g = g + weight_decay * w
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g     (computed in FP32, stored in state_dtype)
    step_size = lr / (1 - beta1^t);  bc2 = sqrt(1 - beta2^t)                   (Python floats, as torch)
    u = -step_size * bc2 * m / (sqrt(v) + eps * bc2)      (= -step_size * m / (sqrt(v) / bc2 + eps))
    w = decay * w + u,  decay = 1 - lr * weight_decay if decoupled else 1,
        in FP32, then rounded to the weight format with compensation "none", "kahan" or "stochastic"

FP32 weights with ``compensation="none"`` and FP32 states take torch.optim's own sequence of operations
(foreach and for-loop forms), so they match ``torch.optim.AdamW``/``Adam`` bit for bit. BF16 weights with BF16
states and Kahan take a faster all-BF16 route (:func:`_kahan_bf16`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..formats import BF16, FormatLike
from ._base import CompensatedOptimizer, check_common, check_number, reject_unsupported
from . import _buckets
from ._buckets import Bucket, GeneratorLike, bucketize, bunch, column, generator_for, split_rows
from .compensation import (
    Compensation,
    as_fp32,
    begin_update,
    finish_update_,
    kahan_add_native_,
    resolve_compensation,
    store_rounded_,
)

__all__ = ["Adam", "AdamW", "adam", "adamw"]


def _check_adam(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    # torch.optim.Adam's checks and messages (plus a TypeError naming the argument for a wrong type).
    if not 0.0 <= check_number("eps", eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a pair of floats (beta1, beta2), got {type(betas).__name__} {betas!r}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        check_number(f"betas[{i}]", b)
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[int],
    kahan_comps: list[Tensor | None] | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = True,
    weight_format: FormatLike | None = None,
    compensation: Compensation | None = None,
    generator: GeneratorLike = None,
    foreach: bool | None = None,
) -> None:
    """One AdamW update of every tensor in place (the functional form of :class:`AdamW`).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: weights, their gradients and moments (moments in FP32 or
            BF16, the state dtype); ``max_exp_avg_sqs`` one per weight when ``amsgrad``, else empty.
        steps: each weight's step number *after* this update (1 on the first), Python ints: bias
            corrections are computed in Python floats, as torch does.
        kahan_comps: one Kahan buffer per weight (weight dtype, zeros at first), or None where the
            weight's compensation is not ``"kahan"``.
        lr, beta1, beta2, weight_decay, eps, amsgrad, maximize: as torch.optim.AdamW.
        decoupled_weight_decay: True for AdamW, False for Adam (L2 penalty added to the gradient).
        weight_format: format the weights are kept in (default: their dtype's; ``"bf16"`` for FP32
            tensors that hold BF16 values).
        compensation: ``"none"``, ``"kahan"`` or ``"stochastic"``; default ``"kahan"`` for formats
            narrower than FP32 and ``"none"`` for FP32.
        generator: for ``"stochastic"``: a ``torch.Generator``, a function device -> generator, or None
            (torch's global generator).
        foreach: multi-tensor kernels (default True); False runs the same arithmetic tensor by tensor.

    Does not synchronise with the device.

    Example:
        >>> import torch
        >>> from lossscale.optim import adamw
        >>> w = torch.ones(4, dtype=torch.bfloat16)
        >>> g = torch.full((4,), 1.0, dtype=torch.bfloat16)
        >>> m, v, c = torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)
        >>> adamw([w], [g], [m], [v], [], [1], [c], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0,
        ...       eps=1e-8)
        >>> w.tolist(), [round(x, 4) for x in (w.float() + c.float()).tolist()]  # 1 - 1e-3 = weight + buffer
        ([1.0, 1.0, 1.0, 1.0], [0.999, 0.999, 0.999, 0.999])
    """
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("steps", steps)):
        if len(lst) != n:
            raise ValueError(f"{name} must have one entry per parameter ({n}), got {len(lst)}")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError(f"amsgrad needs one max_exp_avg_sq per parameter ({n}), got {len(max_exp_avg_sqs)}")
    comps: list[Tensor | None] = [None] * n if kahan_comps is None else list(kahan_comps)
    foreach = True if foreach is None else foreach
    hyper = _Hyper(lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay)
    for bucket in bucketize(params, [m.dtype for m in exp_avgs], weight_format, compensation):
        idx = bucket.indices
        rows = [
            _AdamRow(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
                     comps[i] if bucket.compensation == "kahan" else None)
            for i in idx
        ]
        st = [steps[i] for i in idx]
        if bucket.torch_exact:
            (_torch_multi if foreach else _torch_single)(rows, st, hyper)
            continue
        if bucket.compensation == "kahan" and any(r.kahan_comp is None for r in rows):
            raise ValueError("compensation='kahan' needs a Kahan buffer for every parameter")
        gen = generator_for(generator, bucket.device) if bucket.compensation == "stochastic" else None
        # BF16 weights with BF16 states and Kahan: every operation in BF16 (see _kahan_bf16).
        all_bf16 = bucket.compensation == "kahan" and bucket.fmt == BF16 and not amsgrad
        all_bf16 = all_bf16 and rows[0].exp_avg.dtype == torch.bfloat16
        # Cache blocks (see _buckets.CHUNK); the for-loop form takes the same pieces one by one, so both forms
        # draw the same random bits in the same order for stochastic rounding.
        chunk = _buckets.CHUNK_NATIVE if all_bf16 else _buckets.CHUNK
        pieces = split_rows(rows, [True] * len(rows), chunk)
        for grp in bunch(pieces, chunk) if foreach else [[piece] for piece in pieces]:
            gst = [st[j] for j, _ in grp]
            if all_bf16:
                _kahan_bf16(grp, gst, hyper)
            else:
                _compensated(grp, gst, hyper, bucket, gen, foreach=foreach)


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[int],
    kahan_comps: list[Tensor | None] | None = None,
    **kwargs: Any,
) -> None:
    """:func:`adamw` with ``decoupled_weight_decay=False`` (Adam's L2 penalty) unless given. No sync."""
    kwargs.setdefault("decoupled_weight_decay", False)
    adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, kahan_comps, **kwargs)


class _AdamRow(NamedTuple):
    """One parameter and its state (or a cache-sized piece of them: see _buckets.split_rows)."""

    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None  # amsgrad only
    kahan_comp: Tensor | None  # Kahan only


class _Hyper(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    eps: float
    amsgrad: bool
    maximize: bool
    decoupled: bool


def _moments_(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], grads: list[Tensor], h: _Hyper) -> None:
    """The moment update of every path, torch.optim's operations: ``m = lerp(m, g, 1 - beta1)``,
    ``v = beta2 * v + (1 - beta2) * g * g``, in the dtype of the tensors given. No sync.

    On CPU a foreach call runs the per-tensor op on each tensor, so torch's for-loop form (one tensor per
    call) gives the same bits through this function.
    """
    torch._foreach_lerp_(exp_avgs, grads, 1 - h.beta1)
    if exp_avg_sqs[0].dtype == torch.float32:
        torch._foreach_mul_(exp_avg_sqs, h.beta2)
    else:
        # torch's CPU _foreach_mul_ rounds a Python scalar to the tensors' dtype before multiplying
        # (bf16(0.99) = 0.98828125, a 0.17% error in beta2), while Tensor.mul_ multiplies in FP32 and rounds
        # once (measured on torch 2.13; the other foreach ops used here do not round their scalars).
        for v in exp_avg_sqs:
            v.mul_(h.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - h.beta2)


def _step_terms(steps: list[int], h: _Hyper) -> tuple[list[float], list[float]]:
    """``(scale, eps_term)`` per tensor for the fused update ``u = scale * m / (sqrt(v) + eps_term)``.

    ``-step_size * m / (sqrt(v) / bc2 + eps) = -(step_size * bc2) * m / (sqrt(v) + eps * bc2)``: one pass
    less than torch's form (the compensated paths; the torch-exact paths keep torch's form). Python floats,
    from Python-int steps, as torch computes them.
    """
    bc2 = [(1 - h.beta2 ** float(s)) ** 0.5 for s in steps]
    scale = [-(h.lr / (1 - h.beta1 ** float(s))) * b for s, b in zip(steps, bc2, strict=True)]
    return scale, [h.eps * b for b in bc2]


# ------------------------------------------------------------------------------------------------------
# torch.optim's arithmetic (torch/optim/adam.py, _single_tensor_adam and _multi_tensor_adam with
# capturable=False), reproduced operation for operation so FP32 results match bit for bit.


def _torch_single(rows: list[_AdamRow], steps: list[int], h: _Hyper) -> None:
    for row, step_int in zip(rows, steps, strict=True):
        param = row.param
        grad = row.grad if not h.maximize else -row.grad
        if h.weight_decay != 0:
            if h.decoupled:
                param.mul_(1 - h.lr * h.weight_decay)
            else:
                grad = grad.add(param, alpha=h.weight_decay)
        _moments_([row.exp_avg], [row.exp_avg_sq], [grad], h)
        step = float(step_int)  # torch reads its float32 step tensor back as a Python float
        step_size = h.lr / (1 - h.beta1**step)
        bias_correction2_sqrt = (1 - h.beta2**step) ** 0.5
        v = row.exp_avg_sq
        if row.max_exp_avg_sq is not None:
            torch.maximum(row.max_exp_avg_sq, v, out=row.max_exp_avg_sq)
            v = row.max_exp_avg_sq
        denom = (v.sqrt() / bias_correction2_sqrt).add_(h.eps)
        param.addcdiv_(row.exp_avg, denom, value=-step_size)


def _torch_multi(rows: list[_AdamRow], steps: list[int], h: _Hyper) -> None:
    params = [r.param for r in rows]
    grads = [r.grad for r in rows]
    exp_avgs, exp_avg_sqs = [r.exp_avg for r in rows], [r.exp_avg_sq for r in rows]
    if h.maximize:
        grads = list(torch._foreach_neg(grads))
    if h.weight_decay != 0:
        if h.decoupled:
            torch._foreach_mul_(params, 1 - h.lr * h.weight_decay)
        elif h.maximize:
            torch._foreach_add_(grads, params, alpha=h.weight_decay)
        else:
            grads = list(torch._foreach_add(grads, params, alpha=h.weight_decay))
    _moments_(exp_avgs, exp_avg_sqs, grads, h)
    del grads
    fsteps = [float(s) for s in steps]
    step_size = [(h.lr / (1 - h.beta1**s)) * -1 for s in fsteps]
    bias_correction2_sqrt = [(1 - h.beta2**s) ** 0.5 for s in fsteps]
    if h.amsgrad:
        vmax = [r.max_exp_avg_sq for r in rows if r.max_exp_avg_sq is not None]
        torch._foreach_maximum_(vmax, exp_avg_sqs)
        denom = torch._foreach_sqrt(vmax)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, h.eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


# ------------------------------------------------------------------------------------------------------
# Compensated path: FP32 arithmetic on upcast copies, compensation on the weight update.


def _compensated(
    grp: list[tuple[int, _AdamRow]], steps: list[int], h: _Hyper, bucket: Bucket,
    generator: torch.Generator | None, *, foreach: bool,
) -> None:
    # All arithmetic on FP32 tensors of one dtype (exact upcasts first; torch's CPU kernels for mixed dtypes
    # are an order of magnitude slower than a cast plus a same-dtype op). The caller passes cache-sized
    # pieces, so these temporaries stay in cache. Native and emulated BF16 weights take the same arithmetic.
    params, grads = column(grp, "param"), column(grp, "grad")
    exp_avgs, exp_avg_sqs = column(grp, "exp_avg"), column(grp, "exp_avg_sq")
    comps = column(grp, "kahan_comp") if bucket.compensation == "kahan" else None
    if h.maximize or (h.weight_decay != 0 and not h.decoupled) or grads[0].dtype != torch.float32:
        g = [x.to(torch.float32, copy=True) for x in grads]  # private copy: the caller's grads are not written
        if h.maximize:
            torch._foreach_neg_(g)
        if h.weight_decay != 0 and not h.decoupled:
            torch._foreach_add_(g, as_fp32(params), alpha=h.weight_decay)
    else:
        g = grads
    low = exp_avgs[0].dtype != torch.float32  # BF16 states: updated in FP32, rounded to nearest once per step
    m = as_fp32(exp_avgs)
    v = as_fp32(exp_avg_sqs)
    _moments_(m, v, g, h)
    del g
    if h.amsgrad:
        vmax_state = column(grp, "max_exp_avg_sq")
        vmax = as_fp32(vmax_state)
        torch._foreach_maximum_(vmax, v)
        denom = torch._foreach_sqrt(vmax)
        if low:
            store_rounded_(vmax_state, vmax, BF16, foreach=foreach)
    else:
        denom = torch._foreach_sqrt(v)
    if low:
        store_rounded_(exp_avgs, m, BF16, foreach=foreach)
        store_rounded_(exp_avg_sqs, v, BF16, foreach=foreach)
    del v
    scale, eps_term = _step_terms(steps, h)
    torch._foreach_add_(denom, eps_term)
    decay = 1 - h.lr * h.weight_decay if h.decoupled else 1.0
    acc = begin_update(params, comps, fmt=bucket.fmt, compensation=bucket.compensation, decay=decay)
    torch._foreach_addcdiv_(acc, m, denom, scale)
    del denom, m
    finish_update_(
        params, acc, comps, fmt=bucket.fmt, compensation=bucket.compensation, generator=generator, foreach=foreach
    )


def _kahan_bf16(grp: list[tuple[int, _AdamRow]], steps: list[int], h: _Hyper) -> None:
    """AdamW with Kahan summation where every operation rounds to BF16 (BF16 weights and BF16 states).

    The specialised path of the 8-bytes-per-parameter configuration: no FP32 temporaries and fewer passes
    than :func:`_compensated` (measured with benchmarks/optimizers.py at 10M parameters, 2 threads: see the
    CHANGELOG). Kahan's textbook form in the weight format (torch-optimi's approach; each BF16 op computes in
    FP32 and rounds once), :func:`compensation.kahan_add_native_`::

        c = round(c + u)            # u = -step_size * m / (sqrt(v) / bc2 + eps) - lr * wd * w
        s = round(w + c)
        c = round(c + (w - s))      # w - s is exact (Sterbenz); w = s

    Emulated BF16 weights (FP32 tensors holding BF16 values) are cast to BF16 (exactly), updated by the same
    operations and cast back, so they match native BF16 bit for bit; their gradients are rounded to BF16
    first (exact for gradients that hold BF16 values, as a BF16 weight's gradient does). No sync.
    """
    params, comps = column(grp, "param"), column(grp, "kahan_comp")
    exp_avgs, exp_avg_sqs = column(grp, "exp_avg"), column(grp, "exp_avg_sq")
    native = params[0].dtype == torch.bfloat16
    p = params if native else [x.to(torch.bfloat16) for x in params]
    c = comps if native else [x.to(torch.bfloat16) for x in comps]
    g = [x.to(torch.bfloat16) for x in column(grp, "grad")]  # the same tensors when already BF16 (never written)
    if h.maximize:
        g = list(torch._foreach_neg(g))
    if h.weight_decay != 0 and not h.decoupled:
        g = list(torch._foreach_add(g, p, alpha=h.weight_decay))
    _moments_(exp_avgs, exp_avg_sqs, g, h)
    del g
    scale, eps_term = _step_terms(steps, h)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps_term)
    torch._foreach_addcdiv_(c, exp_avgs, denom, scale)  # c = round(c + u)
    del denom
    if h.weight_decay != 0 and h.decoupled:
        torch._foreach_add_(c, p, alpha=-h.lr * h.weight_decay)
    kahan_add_native_(p, c)
    if not native:
        for dst, src in zip(params, p, strict=True):
            dst.copy_(src)
        for dst, src in zip(comps, c, strict=True):
            dst.copy_(src)


# ------------------------------------------------------------------------------------------------------
# Stateful shell


class Adam(CompensatedOptimizer):
    """Adam (``torch.optim.Adam``'s arguments and defaults) for FP32, BF16, FP16 or emulated-BF16 weights.

    Algorithm: see :mod:`lossscale.optim.adamw`. Arguments as :class:`torch.optim.Adam`
    (``decoupled_weight_decay=True`` makes it AdamW), plus:

    Args:
        compensation: ``"none"`` | ``"kahan"`` | ``"stochastic"``; default (None): ``"kahan"`` for weights
            kept in a format narrower than FP32, ``"none"`` for FP32.
        weight_format: the format the weights are kept in; default their dtype's; ``"bf16"`` for FP32
            tensors that emulate BF16 weights (their values must already be BF16 values).
        state_dtype: dtype of the moment estimates, ``torch.float32`` (default) or ``torch.bfloat16``.
        seed: seed of the stochastic-rounding generators (default: ``torch.initial_seed()``); their state
            is part of ``state_dict()``, so a resumed run continues bit-identically.

    ``capturable``, ``differentiable`` and ``fused`` are accepted for signature compatibility and must be
    False/None. A tensor ``lr`` is refused (it would need a host sync per step). ``step()`` does not
    synchronise with the device. With a loss scaler, call ``scaler.step(optimizer)``: a skipped step leaves
    weights, moments, Kahan buffers, step counts and the generator untouched.

    State per parameter: ``step`` (Python int), ``exp_avg``, ``exp_avg_sq`` (state_dtype),
    ``max_exp_avg_sq`` (amsgrad), ``kahan_comp`` (weight dtype, Kahan only).

    Example:
        >>> import torch, lossscale
        >>> w = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
        >>> opt = lossscale.optim.AdamW([w], lr=1e-4, weight_decay=0.0)  # Kahan by default for BF16
        >>> for _ in range(10):
        ...     w.grad = torch.ones_like(w)
        ...     opt.step()
        >>> w.tolist(), round(float(w.detach()[0].float() + opt.state[w]["kahan_comp"][0].float()), 4)
        ([1.0, 1.0, 1.0], 0.999)
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        compensation: Compensation | None = None,
        weight_format: FormatLike | None = None,
        state_dtype: torch.dtype | str = torch.float32,
        seed: int | None = None,
    ) -> None:
        check_common(lr, weight_decay, compensation, foreach)
        _check_adam(lr, betas, eps, weight_decay)
        reject_unsupported(capturable=capturable, differentiable=differentiable, fused=bool(fused))
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, decoupled_weight_decay=decoupled_weight_decay, compensation=compensation,
            weight_format=weight_format, state_dtype=state_dtype,
        )
        super().__init__(params, defaults, seed=seed)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group`` with Adam's argument checks on the group's options."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_adam(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _check_options(self, group: dict[str, Any]) -> None:
        _check_adam(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter that has a gradient. Does not synchronise with the device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            max_exp_avg_sqs: list[Tensor] = []
            comps: list[Tensor | None] = []
            steps: list[int] = []
            sdtype = torch.float32 if group["state_dtype"] == "float32" else torch.bfloat16
            for p in self._params_with_grad(group):
                state = self.state[p]
                fmt = self.weight_format(p, group)
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
                if group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
                if resolve_compensation(group["compensation"], fmt) == "kahan" and "kahan_comp" not in state:
                    state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)  # type: ignore[arg-type]
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if group["amsgrad"]:
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"])
                comps.append(state.get("kahan_comp"))
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            adamw(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, comps,
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                amsgrad=group["amsgrad"], maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"], weight_format=group["weight_format"],
                compensation=group["compensation"], generator=self.generator, foreach=group["foreach"],
            )
        return loss


class AdamW(Adam):
    """AdamW: :class:`Adam` with decoupled weight decay, torch.optim.AdamW's defaults (weight_decay=1e-2).

    See :class:`Adam` for the lossscale arguments (``compensation``, ``weight_format``, ``state_dtype``,
    ``seed``). Does not synchronise with the device.

    Example:
        >>> import torch, lossscale
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = lossscale.optim.AdamW([w], lr=0.1, weight_format="bf16", compensation="stochastic", seed=0)
        >>> w.grad = torch.ones(2); opt.step()
        >>> all(v in (0.8984375, 0.90234375) for v in w.tolist())  # a BF16 neighbour of 0.899
        True
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        compensation: Compensation | None = None,
        weight_format: FormatLike | None = None,
        state_dtype: torch.dtype | str = torch.float32,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            compensation=compensation, weight_format=weight_format, state_dtype=state_dtype, seed=seed,
        )
