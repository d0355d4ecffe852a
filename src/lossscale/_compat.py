"""The only module that touches private torch APIs; each use has a pure-PyTorch fallback.

* ``torch._amp_foreach_non_finite_check_and_unscale_``: one fused pass that flags non-finite gradients and
  multiplies them by ``inv_scale``. For DTensor gradients (FSDP2) torch 2.13 all-reduces ``found_inf``
  (MAX over the mesh) inside this op (``torch/distributed/tensor/_dispatch.py``, ``found_inf_reduce_handler``).
  torch's CUDA kernel rejects BF16 gradients (pytorch#127176); the CPU kernel accepts them.
* ``torch._amp_update_scale_``: torch's scale update (no hysteresis, no clamps), one fused op. It has no
  fallback here: :func:`lossscale.scaling.update_scale` holds the one tensor form of the rule and calls this
  kernel only as a shortcut for torch's rule (``benchmarks/scaler_overhead.py`` prints what it saves;
  ``tests/test_scaling.py`` checks that both give the same bits).
* ``Tensor._values()``: the values of a sparse COO gradient, coalesced or not, as a view.
* ``torch.amp.grad_scaler._refresh_per_optimizer_state``: the factory of ``GradScaler._per_optimizer_states``
  (a module-level function so that the defaultdict pickles); ``OptState`` is public.

For the first and third, ``impl="auto"`` takes the fused path when torch has it and it accepts the inputs,
else the fallback; ``"fused"`` and ``"fallback"`` force one (tests check that both agree bit for bit).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

__all__ = [
    "KernelImpl",
    "OptState",
    "dtensor_type",
    "fused_available",
    "is_dtensor",
    "non_finite_check_and_unscale_",
    "refresh_per_optimizer_state",
    "sparse_values",
    "to_local",
    "update_scale_",
    "update_scale_available",
]

from torch.amp.grad_scaler import OptState

try:  # GradScaler's own factory, so that a LossScaler's per-optimizer states are GradScaler's objects
    from torch.amp.grad_scaler import _refresh_per_optimizer_state as refresh_per_optimizer_state
except ImportError:  # pragma: no cover - older or newer torch without it

    def refresh_per_optimizer_state() -> dict[str, Any]:
        """A fresh per-optimizer record with GradScaler's keys: stage READY, no found-inf flags yet."""
        return {"stage": OptState.READY, "found_inf_per_device": {}}


KernelImpl = Literal["auto", "fused", "fallback"]
"""Which implementation of a torch kernel to run: torch's fused op, the pure-PyTorch fallback, or ``"auto"``."""
_IMPLS = ("auto", "fused", "fallback")


def _check_impl(impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def fused_available() -> bool:
    """Whether this torch has the fused non-finite-check-and-unscale op."""
    return hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_")


_DTENSOR: list[type | None] = []  # resolved on first use (no import of torch.distributed.tensor at import)


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or None when torch.distributed is absent."""
    if not _DTENSOR:
        cls: type | None = None
        if torch.distributed.is_available():
            try:
                from torch.distributed.tensor import DTensor

                cls = DTensor
            except ImportError:  # torch < 2.4 keeps it under torch.distributed._tensor
                cls = None
        _DTENSOR.append(cls)
    return _DTENSOR[0]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False when torch.distributed is absent)."""
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def to_local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or ``t`` itself."""
    if is_dtensor(t):
        local: torch.Tensor = t.to_local()  # type: ignore[attr-defined]
        return local
    return t


def _fused_accepts(grads: list[torch.Tensor]) -> bool:
    # The CUDA kernel takes float32/float64/float16 only (pytorch#127176); CPU also takes bfloat16.
    g = grads[0]
    if g.dtype in (torch.float32, torch.float64, torch.float16):
        return True
    return g.dtype == torch.bfloat16 and g.device.type == "cpu"


def non_finite_check_and_unscale_(
    grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor, *, impl: KernelImpl = "auto"
) -> bool:
    """Set ``found_inf`` to 1.0 if any element of ``grads`` is inf/NaN, then ``grads *= inv_scale`` in place.

    All of ``grads`` share one device and dtype; ``found_inf`` and ``inv_scale`` are 0-d float32 tensors on
    that device. ``found_inf`` is left as it was when everything is finite. The check reads the values
    before the multiplication (as torch's kernel does). No host sync.

    Returns True when ``found_inf`` has already been all-reduced (MAX) across the ranks holding DTensor
    ``grads`` (torch's fused op does it for DTensors), False otherwise.
    """
    _check_impl(impl)
    if not grads:
        return False
    dtensors = is_dtensor(grads[0])
    use_fused = impl == "fused" or (impl == "auto" and fused_available() and _fused_accepts(grads))
    if use_fused:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        return dtensors
    locals_ = [to_local(g) for g in grads] if dtensors else grads
    # Pure PyTorch: one flag per tensor, gathered into one tensor, then the in-place multiply.
    flags = torch.stack([torch.logical_not(torch.isfinite(g).all()) for g in locals_]).any()
    found_inf.copy_(torch.where(flags, torch.ones_like(found_inf), found_inf))
    for g in locals_:
        g.mul_(inv_scale)
    return False


def update_scale_available() -> bool:
    """Whether this torch has the fused scale-update op ``torch._amp_update_scale_``."""
    return hasattr(torch, "_amp_update_scale_")


def update_scale_(
    scale: torch.Tensor,
    growth_tracker: torch.Tensor,
    found_inf: torch.Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
) -> None:
    """torch.amp.GradScaler's scale update kernel, in place on ``scale`` (float32) and ``growth_tracker`` (int32).

    On a non-finite step (``found_inf > 0``): ``scale *= backoff``, tracker = 0. Otherwise tracker += 1 and
    when it equals ``growth_interval``: ``scale *= growth`` if the result is finite in FP32, tracker = 0.
    No host sync. Raises RuntimeError when this torch lacks the op (see :func:`update_scale_available`);
    the rule itself, in any torch, is :func:`lossscale.scaling.update_scale`.
    """
    if not update_scale_available():
        raise RuntimeError("this torch has no torch._amp_update_scale_; use lossscale.scaling.update_scale")
    torch._amp_update_scale_(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval)


def sparse_values(grad: torch.Tensor, *, impl: KernelImpl = "auto") -> torch.Tensor:
    """A view of a sparse COO tensor's stored values, to check and unscale in place.

    The fused path reads ``grad._values()`` whether or not ``grad`` is coalesced (as torch's GradScaler).
    The fallback needs a coalesced tensor (``Tensor.values()``) and raises ValueError otherwise: coalesce
    the gradient first (``p.grad = p.grad.coalesce()``).
    """
    _check_impl(impl)
    if impl != "fallback" and hasattr(grad, "_values"):
        values: torch.Tensor = grad._values()
        return values
    if not grad.is_coalesced():
        raise ValueError("sparse_values(impl='fallback') needs a coalesced sparse gradient")
    return grad.values()
