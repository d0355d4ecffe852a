"""Gradients that are rounding noise: nonzero in FP32 only because FP32 rounds, zero in exact arithmetic.

The standard case is the key bias of softmax attention (GPT-2's ``c_attn.bias``, key third): a bias ``b``
added to every key shifts every score of a query by the same ``q.b``, and softmax is invariant to such a
shift, so ``dL/db = sum_j dL/ds_j * q = 0`` exactly (the ``dL/ds_j`` of a softmax sum to zero). In FP32 the
sum is ``~eps32 * |terms|`` instead (near 1e-14 on GPT-2), which every format narrower than FP32 flushes to
zero: counting it as "underflow" is a false alarm.

Test (:func:`numerically_zero_masks`): recompute one batch's gradients in FP32 and in FP64 from the same
weights (same random state, so dropout draws the same masks). FP64 rounding error is ``2^29`` times smaller
than FP32's, so an element whose FP32 gradient is rounding noise has an FP64 gradient ~1e9 times smaller,
while a genuine gradient, however tiny (1e-30 everywhere), has FP32 and FP64 values that agree to FP32
precision. An element is *numerically zero* when its FP32 gradient is nonzero and its FP64 gradient is at
most ``2^-10`` of it in magnitude (the FP32 value is at least 99.9% rounding error), or exactly zero.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["NOISE_RATIO", "FP64RecomputationError", "check_loss", "numerically_zero_masks", "to_double"]

# |g64| <= NOISE_RATIO * |g32| marks an FP32 gradient element as rounding noise (see the module docstring).
NOISE_RATIO = 2.0**-10


class FP64RecomputationError(RuntimeError):
    """The model ran in FP32 but not in FP64 (the message says why)."""


def to_double(obj: Any) -> Any:
    """``obj`` with every floating tensor inside (tensors, tuples, lists, dicts) converted to float64."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        items = [to_double(x) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [to_double(x) for x in obj]
    if isinstance(obj, Mapping):
        return {k: to_double(v) for k, v in obj.items()}
    return obj


def check_loss(loss: object) -> None:
    """Raise unless ``loss`` is a scalar floating-point tensor that requires grad (TypeError/ValueError)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = type(loss).__name__
        if isinstance(loss, torch.Tensor):
            got = f"a tensor of shape {tuple(loss.shape)}"
        raise TypeError(f"loss_fn must return a scalar loss tensor, got {got}")
    if not loss.is_floating_point():
        raise TypeError(f"loss_fn must return a floating-point loss, got dtype {loss.dtype}")
    if not loss.requires_grad:
        raise ValueError(
            "loss_fn returned a loss that does not require grad (detached, computed under torch.no_grad(), "
            "or from no trainable parameter): no gradient to measure"
        )


def _grads(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, seed: int
) -> dict[str, torch.Tensor]:
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        loss = loss_fn(model, batch)
        check_loss(loss)
        loss.reshape(()).backward()  # type: ignore[no-untyped-call]
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.detach()
            out[name] = g.to_dense() if g.is_sparse else g
    return out


def numerically_zero_masks(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    *,
    ratio: float = NOISE_RATIO,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per parameter name with at least one numerically-zero element, a bool mask of its shape marking the
    elements whose FP32 gradient on ``batch`` is rounding noise (module docstring). ``model`` is not
    changed (copies are run, in train mode, FP32 and FP64). Errors of the FP32 run (e.g. a loss that is not
    a scalar, see :func:`check_loss`) propagate; a failure of the FP64 run only (a model that hard-codes
    float32 tensors) raises :class:`FP64RecomputationError`.

    Example:
        >>> import torch
        >>> from lossscale.noise import numerically_zero_masks
        >>> class Shift(torch.nn.Module):  # softmax(x + b): softmax is invariant to b
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.b = torch.nn.Parameter(torch.tensor(0.3))
        ...     def forward(self, x):
        ...         return torch.softmax(x + self.b, dim=-1)
        >>> x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
        >>> masks = numerically_zero_masks(Shift(), lambda m, b: (m(b) * b).sum(), x)
        >>> list(masks)
        ['b']
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
    # One copy at a time (peak: the FP64 copy, its gradients and the FP32 gradients kept for comparison).
    g32 = _grads(copy.deepcopy(model).float().train(), loss_fn, batch, seed)
    try:
        g64 = _grads(copy.deepcopy(model).double().train(), loss_fn, to_double(batch), seed)
    except Exception as err:  # noqa: BLE001 - whatever the FP64 run raises, named for the caller
        raise FP64RecomputationError(f"{type(err).__name__}: {err}") from err
    out: dict[str, torch.Tensor] = {}
    for name, a in g32.items():
        b = g64.get(name)
        if b is None:
            continue
        mask = (a != 0) & (b.abs() <= ratio * a.double().abs())
        if bool(mask.any()):
            out[name] = mask
    return out
