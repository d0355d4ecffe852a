"""SGD (momentum, dampening, Nesterov, weight decay) for low-precision weights, with compensated updates.

The gradient and momentum arithmetic follows torch.optim.SGD (Sutskever et al. 2013 momentum form); only the
last step, adding the update to the weight, changes for weights narrower than FP32
(see :mod:`lossscale.optim.compensation`)::

    g = -grad if maximize else grad
    if weight_decay: g = g + weight_decay * w
    if momentum:
        b = g on the first step, else momentum * b + (1 - dampening) * g      (FP32 math, stored in state_dtype)
        g = g + momentum * b if nesterov else b
    w = w - lr * g   in FP32, then rounded to the weight format with compensation "none", "kahan" or
                     "stochastic"

FP32 weights with ``compensation="none"`` and FP32 state take torch.optim's own sequence of operations
(foreach and for-loop forms), so they match ``torch.optim.SGD`` bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..formats import BF16, FormatLike
from ._base import CompensatedOptimizer, check_common, check_number, parse_state_dtype, reject_unsupported
from ._buckets import Bucket, GeneratorLike, bucketize, bunch, column, generator_for, split_rows
from .compensation import Compensation, as_fp32, begin_update, finish_update_, resolve_compensation, store_rounded_

__all__ = ["SGD", "sgd"]


def _check_sgd(momentum: float, dampening: float, nesterov: bool) -> None:
    # torch.optim.SGD's checks and messages (plus a TypeError naming the argument for a wrong type).
    check_number("dampening", dampening)
    if check_number("momentum", momentum) < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    kahan_comps: list[Tensor | None] | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    weight_format: FormatLike | None = None,
    compensation: Compensation | None = None,
    state_dtype: torch.dtype | str = torch.float32,
    generator: GeneratorLike = None,
    foreach: bool | None = None,
) -> None:
    """One SGD update of every tensor in place (the functional form of :class:`SGD`).

    Args:
        params, grads: weights and their gradients.
        momentum_buffer_list: one entry per weight (used when ``momentum != 0``): the momentum buffer, or
            None on the first step, where a new buffer of ``state_dtype`` is created and stored in the
            list (as torch.optim.sgd does).
        kahan_comps: one Kahan buffer per weight (weight dtype, zeros at first), or None where the weight's
            compensation is not ``"kahan"``.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD.
        weight_format, compensation, generator, foreach: as :func:`lossscale.optim.adamw`.
        state_dtype: dtype of new momentum buffers (FP32 or BF16).

    Does not synchronise with the device.

    Example:
        >>> import torch
        >>> from lossscale.optim import sgd
        >>> w = torch.ones(2, dtype=torch.bfloat16); c = torch.zeros_like(w)
        >>> for _ in range(10):  # each update (1e-4) is far below BF16's half-spacing at 1 (2^-9)
        ...     sgd([w], [torch.ones_like(w)], [None], [c], lr=1e-4)
        >>> w.tolist(), round(float(w[0].float() + c[0].float()), 4)  # the Kahan buffer holds the rest
        ([1.0, 1.0], 0.999)
    """
    n = len(params)
    if len(grads) != n or len(momentum_buffer_list) != n:
        raise ValueError(f"grads and momentum_buffer_list must have one entry per parameter ({n})")
    sdtype = parse_state_dtype(state_dtype)
    comps: list[Tensor | None] = [None] * n if kahan_comps is None else list(kahan_comps)
    foreach = True if foreach is None else foreach
    dtypes = [sdtype if b is None else b.dtype for b in momentum_buffer_list]
    kw: dict[str, Any] = dict(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        maximize=maximize,
    )
    for bucket in bucketize(params, dtypes, weight_format, compensation):
        idx = bucket.indices
        p = [params[i] for i in idx]
        g = [grads[i] for i in idx]
        bufs = [momentum_buffer_list[i] for i in idx]
        if bucket.torch_exact:
            (_torch_multi if foreach else _torch_single)(p, g, bufs, **kw)
        else:
            if bucket.compensation == "kahan" and any(comps[i] is None for i in idx):
                raise ValueError("compensation='kahan' needs a Kahan buffer for every parameter")
            gen = generator_for(generator, bucket.device) if bucket.compensation == "stochastic" else None
            rows = [
                _SGDRow(p[j], g[j], bufs[j], comps[i] if bucket.compensation == "kahan" else None)
                for j, i in enumerate(idx)
            ]
            # Cache blocks (see _buckets.CHUNK), the same pieces in both forms (same SR draws). A buffer created
            # on this step is created whole, so its row is not cut.
            chunkable = [momentum == 0 or b is not None for b in bufs]
            pieces = split_rows(rows, chunkable)
            for grp in bunch(pieces) if foreach else [[piece] for piece in pieces]:
                sub_bufs: list[Tensor | None] = [row.momentum_buffer for _, row in grp]
                _compensated(
                    column(grp, "param"), column(grp, "grad"), sub_bufs,
                    column(grp, "kahan_comp") if bucket.compensation == "kahan" else None, bucket, gen, sdtype,
                    foreach=foreach, **kw,
                )
                for (j, row), b in zip(grp, sub_bufs, strict=True):
                    if row.momentum_buffer is None and momentum != 0:
                        bufs[j] = b  # a new buffer (whole row)
        for j, i in enumerate(idx):
            momentum_buffer_list[i] = bufs[j]


class _SGDRow(NamedTuple):
    """One parameter and its state (or a cache-sized piece of them: see _buckets.split_rows)."""

    param: Tensor
    grad: Tensor
    momentum_buffer: Tensor | None  # None before the first momentum step (or without momentum)
    kahan_comp: Tensor | None  # Kahan only


# ------------------------------------------------------------------------------------------------------
# torch.optim's arithmetic (torch/optim/sgd.py, _single_tensor_sgd and _multi_tensor_sgd), operation for
# operation, so FP32 results match bit for bit. Unlike torch's foreach form, the Nesterov step does not
# write into the caller's .grad tensors (same values, computed out of place).


def _torch_single(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], *, lr: float, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
) -> None:
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = bufs[i]
            if buf is None:
                buf = grad.detach().clone()
                bufs[i] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)


def _torch_multi(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], *, lr: float, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
) -> None:
    if maximize:
        grads = list(torch._foreach_neg(grads))
    if weight_decay != 0:
        if maximize:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    if momentum != 0:
        if all(b is not None for b in bufs):
            full = [b for b in bufs if b is not None]
            torch._foreach_mul_(full, momentum)
            torch._foreach_add_(full, grads, alpha=1 - dampening)
        else:
            full = []
            for i, b in enumerate(bufs):
                if b is None:
                    b = bufs[i] = grads[i].detach().clone()
                else:
                    b.mul_(momentum).add_(grads[i], alpha=1 - dampening)
                full.append(b)
        grads = list(torch._foreach_add(grads, full, alpha=momentum)) if nesterov else full
    torch._foreach_add_(params, grads, alpha=-lr)


# ------------------------------------------------------------------------------------------------------
# Compensated path: FP32 arithmetic on upcast copies, compensation on the weight update.


def _compensated(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], comps: list[Tensor] | None,
    bucket: Bucket, generator: torch.Generator | None, state_dtype: torch.dtype, *, foreach: bool, lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
) -> None:
    # FP32 arithmetic with one dtype per op (see adamw._compensated); the update goes straight into the
    # accumulator of begin_update, so without momentum the gradient is never copied.
    sign = 1.0
    decay = 1.0
    if momentum == 0:
        g = as_fp32(grads)
        sign = -1.0 if maximize else 1.0
        decay = 1 - lr * weight_decay  # w - lr * (g + wd * w) = (1 - lr * wd) * w - lr * g
    elif maximize or weight_decay != 0 or grads[0].dtype != torch.float32:
        g = [x.to(torch.float32, copy=True) for x in grads]  # private copy: the caller's grads are not written
        if maximize:
            torch._foreach_neg_(g)
        if weight_decay != 0:
            torch._foreach_add_(g, as_fp32(params), alpha=weight_decay)
    else:
        g = grads
    acc = begin_update(params, comps, fmt=bucket.fmt, compensation=bucket.compensation, decay=decay)
    if momentum == 0:
        torch._foreach_add_(acc, g, alpha=-lr * sign)
    else:
        b32: list[Tensor] = []
        olds = [i for i, b in enumerate(bufs) if b is not None]
        if olds:
            old_bufs = [b for b in bufs if b is not None]
            ob = as_fp32(old_bufs)
            torch._foreach_mul_(ob, momentum)
            torch._foreach_add_(ob, [g[i] for i in olds], alpha=1 - dampening)
            if ob[0] is not old_bufs[0]:  # BF16 state: round back to nearest
                store_rounded_(old_bufs, ob, BF16, foreach=foreach)
            by_index = dict(zip(olds, ob, strict=True))
        else:
            by_index = {}
        for i in range(len(params)):
            if i in by_index:
                b32.append(by_index[i])
            else:  # first step: the buffer is the gradient itself (torch.optim.SGD)
                b32.append(g[i])
                new = torch.empty_like(params[i], dtype=state_dtype)
                new.copy_(g[i])  # rounds to nearest for a BF16 state
                bufs[i] = new
        if nesterov:  # g + momentum * b
            torch._foreach_add_(acc, g, alpha=-lr)
            torch._foreach_add_(acc, b32, alpha=-lr * momentum)
        else:
            torch._foreach_add_(acc, b32, alpha=-lr)
    finish_update_(
        params, acc, comps, fmt=bucket.fmt, compensation=bucket.compensation, generator=generator, foreach=foreach
    )


# ------------------------------------------------------------------------------------------------------
# Stateful shell


class SGD(CompensatedOptimizer):
    """SGD (``torch.optim.SGD``'s arguments and defaults) for FP32, BF16, FP16 or emulated-BF16 weights.

    Algorithm: see :mod:`lossscale.optim.sgd`. Arguments as :class:`torch.optim.SGD`, plus
    ``compensation``, ``weight_format``, ``state_dtype`` (momentum buffer dtype) and ``seed`` as in
    :class:`lossscale.optim.Adam`. ``differentiable`` and ``fused`` must be False/None; a tensor ``lr`` is
    refused. ``step()`` does not synchronise with the device; with a loss scaler, a skipped step leaves
    weights, buffers and the generator untouched.

    State per parameter: ``momentum_buffer`` (state_dtype, when momentum != 0), ``kahan_comp`` (weight
    dtype, Kahan only).

    Example:
        >>> import torch, lossscale
        >>> w = torch.nn.Parameter(torch.full((2,), 256.0, dtype=torch.bfloat16))
        >>> opt = lossscale.optim.SGD([w], lr=0.25, compensation="none")
        >>> w.grad = torch.ones_like(w); opt.step(); w.tolist()  # 255.75 rounds back to 256 in BF16
        [256.0, 256.0]
        >>> opt = lossscale.optim.SGD([w], lr=0.25)  # Kahan by default: 4 steps move the weight by 1
        >>> for _ in range(4):
        ...     opt.step()
        >>> w.tolist()
        [255.0, 255.0]
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        compensation: Compensation | None = None,
        weight_format: FormatLike | None = None,
        state_dtype: torch.dtype | str = torch.float32,
        seed: int | None = None,
    ) -> None:
        check_common(lr, weight_decay, compensation, foreach)
        _check_sgd(momentum, dampening, nesterov)
        reject_unsupported(differentiable=differentiable, fused=bool(fused))
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, compensation=compensation, weight_format=weight_format,
            state_dtype=state_dtype,
        )
        super().__init__(params, defaults, seed=seed)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group`` with SGD's argument checks on the group's options."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_sgd(group["momentum"], group["dampening"], group["nesterov"])

    def _check_options(self, group: dict[str, Any]) -> None:
        _check_sgd(group["momentum"], group["dampening"], group["nesterov"])

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
            bufs: list[Tensor | None] = []
            comps: list[Tensor | None] = []
            for p in self._params_with_grad(group):
                state = self.state[p]
                fmt = self.weight_format(p, group)
                if resolve_compensation(group["compensation"], fmt) == "kahan" and "kahan_comp" not in state:
                    state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)  # type: ignore[arg-type]
                bufs.append(state.get("momentum_buffer"))
                comps.append(state.get("kahan_comp"))
            sgd(
                params, grads, bufs, comps, lr=group["lr"], momentum=group["momentum"],
                dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                maximize=group["maximize"], weight_format=group["weight_format"],
                compensation=group["compensation"], state_dtype=group["state_dtype"], generator=self.generator,
                foreach=group["foreach"],
            )
            if group["momentum"] != 0:
                for p, b in zip(params, bufs, strict=True):
                    self.state[p]["momentum_buffer"] = b
        return loss
