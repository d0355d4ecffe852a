"""Aten-level emulation for composite ops (einsum, tensordot, multi_dot, ...) and a probe for opaque ops.

CUDA autocast sees a composite op such as ``einsum`` as the aten GEMMs it decomposes into (``bmm``/``mm``),
each with low-precision operands and a low-precision result, in forward and (since the saved tensors are
low precision) in backward. The function mode sees ``torch.einsum`` as one call, so its handler runs the
call inside :class:`_Region`, an ``autograd.Function`` whose forward runs the composite under
:class:`_RoundingMode` (a ``TorchDispatchMode`` that rounds the operands and the result of every GEMM-class
aten op it sees) and whose backward runs ``torch.autograd.grad`` over that inner graph under the same mode.
So every GEMM piece is emulated forward and backward, whatever path the composite takes, and the backward
needs no active context (it is attached to the graph at forward time, like the rounding sites).

Formats at an aten GEMM (the same as the function-level sites):
    forward   operands -> compute (per-tensor scaled under ``scaling="current"``),  addends and result -> output
    backward  operands saved from forward -> compute (scaled, so the same values as in forward),
              gradient operands -> grad,  results (dgrad / wgrad) -> output
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ._core import Emulator, Operand

__all__ = ["GEMM_ATEN", "run_composite", "probe_gemms"]

_aten = torch.ops.aten

# GEMM-class aten ops: name -> (operand positions with (role, reduction dims)), addend positions).
# Reduction dims: the dims of the operand that the GEMM sums over (None: not one tensor dim).
GEMM_ATEN: dict[str, tuple[dict[int, tuple[str, tuple[int, ...] | None]], tuple[int, ...]]] = {
    "mm": ({0: ("input", (-1,)), 1: ("mat2", (-2,))}, ()),
    "bmm": ({0: ("input", (-1,)), 1: ("mat2", (-2,))}, ()),
    "addmm": ({1: ("mat1", (-1,)), 2: ("mat2", (-2,))}, (0,)),
    "baddbmm": ({1: ("batch1", (-1,)), 2: ("batch2", (-2,))}, (0,)),
    "addbmm": ({1: ("batch1", (-1,)), 2: ("batch2", (-2,))}, (0,)),
    "mv": ({0: ("input", (-1,)), 1: ("vec", (-1,))}, ()),
    "addmv": ({1: ("mat", (-1,)), 2: ("vec", (-1,))}, (0,)),
    "addr": ({1: ("vec1", None), 2: ("vec2", None)}, (0,)),
    "dot": ({0: ("input", (-1,)), 1: ("tensor", (-1,))}, ()),
    "vdot": ({0: ("input", (-1,)), 1: ("other", (-1,))}, ()),
    "_trilinear": ({0: ("i1", None), 1: ("i2", None), 2: ("i3", None)}, ()),
    "convolution": ({0: ("input", None), 1: ("weight", None)}, (2,)),
    "convolution_backward": ({0: ("grad_output", None), 1: ("input", None), 2: ("weight", None)}, ()),
}


def _is_fp32(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32


class _RoundingMode(TorchDispatchMode):
    """Rounds the operands and results of the GEMM-class aten ops of :data:`GEMM_ATEN` (FP32 ones)."""

    def __init__(self, emu: Emulator, op: str, phase: str, saved: list[torch.Tensor]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.emu, self.op, self.phase, self.saved = emu, op, phase, saved
        self._saved_ptrs = {t.untyped_storage().data_ptr() for t in saved} if phase == "backward" else set()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__ if func.namespace == "aten" else ""
        spec = GEMM_ATEN.get(name)
        if spec is None or not any(_is_fp32(a) for a in args):
            return func(*args, **kwargs)
        emu = self.emu
        operands, addends = spec
        new = list(args)
        piece = f"{self.op}.{name}"
        for i, (role, dims) in operands.items():
            x = args[i] if i < len(args) else None
            if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
                continue
            if self.phase == "forward":
                self.saved.append(x)
                new[i] = self._round(x, emu.compute, piece, role, dims, emu.scaled)
            elif x.untyped_storage().data_ptr() in self._saved_ptrs:
                new[i] = self._round(x, emu.compute, piece, role, dims, emu.scaled)  # as in forward
            else:
                # Under a scaling recipe the gradient operand takes the recipe in the grad format (E5M2), not
                # the emulator's result-gradient rounding (the output format there).
                gfmt = emu.precision.grad_format if emu.recipe is not None else emu.grad
                new[i] = self._round(x, gfmt, piece, "grad_" + role, dims, False)
        for i in addends:
            x = args[i] if i < len(args) else None
            if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
                new[i] = self._round(x, emu.output, piece, "addend", None, False, operand=False)
        out = func(*new, **kwargs)
        emu.gemm_done(piece)
        if isinstance(out, torch.Tensor):
            return self._round(out, emu.output, piece, "output", None, False, operand=False)
        if isinstance(out, (tuple, list)):
            return type(out)(
                self._round(o, emu.output, piece, "output", None, False, operand=False) if _is_fp32(o) else o
                for o in out
            )
        return out

    def _round(
        self,
        x: torch.Tensor,
        fmt: Any,
        piece: str,
        role: str,
        dims: tuple[int, ...] | None,
        scaled: bool,
        operand: bool = True,
    ) -> torch.Tensor:
        if fmt is None:
            return x
        site = self.emu._site_name(piece, role) + (".grad" if self.phase == "backward" else "")
        return self.emu.quantize(x, fmt, site, Operand(piece, role, self.phase, dims, operand), scaled=scaled)


def _flatten(args: tuple[Any, ...]) -> tuple[list[torch.Tensor], Callable[[Sequence[torch.Tensor]], tuple[Any, ...]]]:
    """The tensors of ``args`` (top level and inside lists/tuples) and a function that puts others in."""
    tensors: list[torch.Tensor] = []
    layout: list[Any] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            layout.append(len(tensors))
            tensors.append(a)
        elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
            idx = []
            for t in a:
                idx.append(len(tensors))
                tensors.append(t)
            layout.append((type(a), idx))
        else:
            layout.append(("const", a))

    def rebuild(ts: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        out: list[Any] = []
        for entry in layout:
            if isinstance(entry, int):
                out.append(ts[entry])
            elif entry[0] == "const":
                out.append(entry[1])
            else:
                out.append(entry[0](ts[i] for i in entry[1]))
        return tuple(out)

    return tensors, rebuild


def _keep(x: torch.Tensor) -> torch.Tensor:
    return x


class _Region(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        emu: Emulator,
        op: str,
        func: Callable[..., Any],
        rebuild: Callable[[Sequence[torch.Tensor]], tuple[Any, ...]],
        kwargs: dict[str, Any],
        *leaves: torch.Tensor,
    ) -> torch.Tensor:
        saved: list[torch.Tensor] = []
        with torch.enable_grad():
            inner = [t.detach().requires_grad_(t.requires_grad) for t in leaves]
            # The inner graph is kept on ctx, not saved through save_for_backward: identity hooks keep outer
            # saved-tensor hooks (checkpointing's) from packing tensors this Function never hands them.
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep), _RoundingMode(emu, op, "forward", saved):
                out = func(*rebuild(inner), **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"lossscale emulation: {op} returned {type(out).__name__}, expected a tensor")
        ctx.emu, ctx.op, ctx.inner, ctx.out, ctx.saved = emu, op, inner, out, saved
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # once_differentiable: the inner gradient is computed without create_graph, so a double backward
        # (create_graph=True) raises instead of silently dropping the second-order terms.
        emu: Emulator = ctx.emu
        if emu.grad is not None:
            g = emu.quantize(g, emu.grad, emu._site_name(ctx.op, "output") + ".grad",
                             Operand(ctx.op, "output", "backward", None, True))
        wanted = [t for t in ctx.inner if t.requires_grad]
        grads: tuple[torch.Tensor | None, ...] = ()
        if wanted and ctx.out.requires_grad:
            with _RoundingMode(emu, ctx.op, "backward", ctx.saved):
                # retain_graph: the outer graph may be backwarded again (retain_graph=True there); the inner
                # graph lives on ctx and is freed with it.
                grads = torch.autograd.grad(ctx.out, wanted, g, allow_unused=True, retain_graph=True)
        it = iter(grads)
        per_leaf = [next(it, None) if t.requires_grad else None for t in ctx.inner]
        return (None, None, None, None, None, *per_leaf)


def run_composite(
    emu: Emulator, op: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run a composite op with every GEMM-class aten piece emulated, forward and backward."""
    leaves, rebuild = _flatten(args)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in leaves)):
        with _RoundingMode(emu, op, "forward", []):
            return func(*args, **kwargs)
    return _Region.apply(emu, op, func, rebuild, kwargs, *leaves)  # type: ignore[no-untyped-call]


# ----------------------------------------------------------------------------------------------------------
# Probe: which GEMM-class aten ops does an opaque (non-aten) op run inside?


class _Probe(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.gemms: list[str] = []
        self.opaque = False

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func.namespace == "aten":
            name = func.overloadpacket.__name__
            if name in GEMM_ATEN and any(_is_fp32(a) for a in args):
                self.gemms.append(name)
            return func(*args, **kwargs)
        key = _backend_key(args)
        if key is None:
            self.opaque = True
            return func(*args, **kwargs)
        # Run the op's own kernel with this mode pushed again, so that the aten ops inside it are seen.
        with self:
            return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)


def _backend_key(args: Sequence[Any]) -> Any:
    for a in args:
        if isinstance(a, torch.Tensor):
            return {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}.get(a.device.type)
    return None


def probe_gemms(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, list[str], bool]:
    """Run ``func`` and return (its result, the FP32 GEMM-class aten ops it ran, whether it stayed opaque)."""
    probe = _Probe()
    with probe:
        out = func(*args, **kwargs)
    return out, probe.gemms, probe.opaque
