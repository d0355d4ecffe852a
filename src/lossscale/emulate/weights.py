"""Low-precision weight storage ("pure" BF16/FP16 training), native or emulated.

Hardware that stores weights in BF16 rounds every optimizer update into BF16: an update smaller than half an
ulp of the weight is lost (swamping; Zamirai et al., "Revisiting BFloat16 Training", arXiv:2010.06192).
Emulated, the weights stay FP32 tensors that hold values of the weight format:

    before optimizer.step():  p.grad <- q_weights(p.grad)     (a BF16 parameter's gradient is BF16)
    after  optimizer.step():  p      <- q_weights(p)          (the update is rounded into the format)

For an optimizer whose update is one FP32 operation followed by one rounding (plain SGD, with or without
weight decay), this gives the same bits as the optimizer run on native BF16 tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..formats import FloatFormat, FormatLike
from ..precision import Precision
from ..quantize import quantize

__all__ = ["low_precision_weights", "LowPrecisionWeights"]


class LowPrecisionWeights:
    """Handle returned by :func:`low_precision_weights`: keeps a model's weights in a format.

    Attributes: ``format`` (the weight :class:`FloatFormat`), ``native`` (bool), ``params`` (the parameters
    kept). Methods: :meth:`round_`, :meth:`round_grads_`, :meth:`remove`.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        fmt: FloatFormat,
        optimizers: list[torch.optim.Optimizer],
        native: bool,
    ) -> None:
        self.params = params
        self.format = fmt
        self.native = native
        self._handles: list[Any] = []
        if not native:
            for opt in optimizers:
                self._handles.append(opt.register_step_pre_hook(self._pre_step))
                self._handles.append(opt.register_step_post_hook(self._post_step))

    @torch.no_grad()
    def round_(self) -> None:
        """Round every parameter in place to the weight format. Does not synchronise."""
        for p in self.params:
            if p.dtype == torch.float32:
                p.copy_(quantize(p, self.format))

    @torch.no_grad()
    def round_grads_(self) -> None:
        """Round every parameter's ``.grad`` in place to the weight format. Does not synchronise."""
        for p in self.params:
            if p.grad is not None and p.grad.dtype == torch.float32:
                p.grad.copy_(quantize(p.grad, self.format))

    def _pre_step(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        self.round_grads_()

    def _post_step(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        self.round_()

    def remove(self) -> None:
        """Remove the optimizer hooks; the parameters keep their current values."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        return (
            f"LowPrecisionWeights({self.format.name}, native={self.native}, {len(self.params)} params, "
            f"{len(self._handles) // 2} optimizers hooked)"
        )


def low_precision_weights(
    model: torch.nn.Module,
    weights: Precision | FormatLike,
    *,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    native: bool = False,
) -> LowPrecisionWeights:
    """Put ``model``'s floating-point parameters into a low-precision weight format and keep them there.

    Args:
        model: the module whose parameters to keep.
        weights: a :class:`~lossscale.Precision` (its ``weights_format``), a preset name (``"bf16-pure"``)
            or a format (``"bf16"``, ``lossscale.BF16``, ``torch.bfloat16``). A string that names a format
            is that format; otherwise it is parsed as a precision.
        optimizer: optimizer(s) to hook (emulated form): before each ``step()`` the gradients are rounded to
            the format, after it the parameters. None: call :meth:`LowPrecisionWeights.round_` yourself
            after each step.
        native: False (default): keep FP32 tensors holding values of the format (any device, any format).
            True: convert the model with ``model.to(dtype)`` (the format needs a torch dtype); parameters keep
            their identity, so an existing optimizer still holds them, and torch's own arithmetic rounds.

    Warning: create the optimizer's state after this call in native mode (its state takes the parameters'
    dtype). Parameters are rounded in place now; does not synchronise.

    Example:
        >>> import torch, lossscale
        >>> lin = torch.nn.Linear(4, 4)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=1e-6)
        >>> handle = lossscale.low_precision_weights(lin, "bf16-pure", optimizer=opt)
        >>> before = lin.weight.detach().clone()
        >>> lin(torch.ones(1, 4)).sum().backward(); opt.step()
        >>> torch.equal(before, lin.weight)   # updates of ~1e-6 vanish in BF16 weights of size ~0.1
        True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fmt = _weight_format(weights)
    if not isinstance(native, bool):
        raise TypeError(f"native must be a bool, got {type(native).__name__}")
    if optimizer is None:
        optimizers: list[torch.optim.Optimizer] = []
    elif isinstance(optimizer, torch.optim.Optimizer):
        optimizers = [optimizer]
    else:
        optimizers = list(optimizer)
        for opt in optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizer must be a torch.optim.Optimizer or a list of them, got {type(opt).__name__}"
                )
    params = [p for p in model.parameters() if p.is_floating_point()]
    if native:
        dtype = fmt.torch_dtype
        if dtype is None:
            raise ValueError(
                f"native=True needs a weight format torch has as a dtype (bf16, fp16, ...), got {fmt.name}"
            )
        model.to(dtype)
    handle = LowPrecisionWeights(params, fmt, optimizers, native)
    if not native:
        handle.round_()
    return handle


def _weight_format(weights: Precision | FormatLike) -> FloatFormat:
    if isinstance(weights, Precision):
        return weights.weights_format
    if isinstance(weights, str):
        # A format name means that format ("bf16" is BF16 weights, not the "bf16" = "bf16-mixed" alias).
        try:
            return FloatFormat.parse(weights)
        except ValueError:
            return Precision.parse(weights).weights_format
    return FloatFormat.parse(weights)
