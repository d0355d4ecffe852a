"""``lossscale.autocast``: native ``torch.autocast`` where it is fast, emulated low precision elsewhere.

Emulation is a ``torch.overrides.TorchFunctionMode`` that sends the low-precision op set (CUDA autocast's
lower-precision list: GEMMs, convolutions, attention, recurrent layers) to handlers built on rounding sites
(see ``_core``); every other op runs unchanged in FP32, which is what CUDA autocast does with its FP32 list
(softmax, norms, losses).

Nesting: a thread-local stack holds the active emulators (None for a region that is not emulated). The
innermost entry decides; while a handler runs, a thread-local ``busy`` flag makes every mode pass calls
through, so handlers can call torch ops (and outer modes) without being intercepted again.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..formats import BF16, FP16
from ..precision import Precision
from . import aten, attention, rnn
from ._core import Emulator
from .counters import RoundingCounters
from .recipes import RecipeState

__all__ = ["autocast", "Autocast", "UnemulatedOpError", "covered_ops"]

Handler = Callable[[Emulator, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


class _Local(threading.local):
    def __init__(self) -> None:
        self.stack: list[Emulator | None] = []
        self.busy = 0
        self.compile_warned = False


_LOCAL = _Local()


def _gemm_handler(
    op: str,
    operands: tuple[str, ...],
    addends: tuple[str, ...] = (),
    reduction: dict[str, tuple[int, ...]] | None = None,
) -> Handler:
    """A handler for a GEMM-like op whose positional arguments are named ``operands + addends`` roles
    (``reduction``: the reduction dims of each operand role, told to the quantizer)."""
    roles = operands  # positional order
    addend_set = set(addends)
    dims = reduction or {}

    def handle(emu: Emulator, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("out") is not None or not _all_fp32(args, kwargs):
            return func(*args, **kwargs)
        if emu.recipe is not None:  # a scaling recipe quantizes all three GEMMs itself
            y = emu.recipe_gemm(op, func, args, kwargs)
            if y is not None:
                return y

        def site(value: torch.Tensor, role: str) -> torch.Tensor:
            if role in addend_set:
                return emu.addend(value, op, role)  # type: ignore[return-value]
            return emu.operand(value, op, role, dims.get(role))

        new_args = list(args)
        for i, value in enumerate(args[: len(roles)]):
            if isinstance(value, torch.Tensor):
                new_args[i] = site(value, roles[i])
        new_kwargs = dict(kwargs)
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor) and name in roles:
                new_kwargs[name] = site(value, name)
        out = func(*new_args, **new_kwargs)
        emu.gemm_done(op)
        return emu.result(out, op)

    return handle


def _composite_handler(op: str) -> Handler:
    """A composite op (einsum, tensordot, multi_dot, ...): its aten GEMM pieces are emulated (see aten.py)."""

    def handle(emu: Emulator, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("out") is not None:
            return func(*args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k != "out"}
        return aten.run_composite(emu, op, func, args, kwargs)

    return handle


def _all_fp32(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(t.dtype == torch.float32 for t in tensors)


def _tensor_fp32(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


def _sdpa_handler(emu: Emulator, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    q = args[0] if args else kwargs.get("query")
    if not _tensor_fp32(q):
        return func(*args, **kwargs)
    return attention.sdpa(emu, *args, **kwargs)


def _mha_handler(emu: Emulator, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    q = args[0] if args else kwargs.get("query")
    if not _tensor_fp32(q):
        return func(*args, **kwargs)
    return attention.multi_head_attention_forward(emu, *args, **kwargs)


def _rnn_handler(kind: str) -> Handler:
    def handle(emu: Emulator, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs or not _tensor_fp32(args[0] if args else None):
            return func(*args, **kwargs)
        return rnn.rnn_layer(emu, kind, *args)

    return handle


def _cell_handler(kind: str) -> Handler:
    def handle(emu: Emulator, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs or not _tensor_fp32(args[0] if args else None):
            return func(*args, **kwargs)
        return rnn.rnn_cell(emu, kind, *args)

    return handle


_LAST: tuple[int, ...] = (-1,)
_MM: dict[str, tuple[int, ...]] = {
    "input": (-1,), "mat1": (-1,), "batch1": (-1,), "mat": (-1,), "other": (-2,), "mat2": (-2,), "batch2": (-2,),
    "vec": (-1,),
}


def _build_handlers() -> dict[Any, tuple[str, Handler]]:
    """func -> (op name, handler). The op names are the covered-op list (docs/emulation.md, generated)."""
    vf = torch._C._VariableFunctions  # what torch._VF forwards to: the functions nn.LSTM & co. call
    h: dict[Any, tuple[str, Handler]] = {}

    def add(op: str, handler: Handler, *funcs: Any) -> None:
        for f in funcs:
            h[f] = (op, handler)

    add("linear", _gemm_handler("linear", ("input", "weight", "bias"), ("bias",),
                                {"input": _LAST, "weight": _LAST}), F.linear)
    add("matmul", _gemm_handler("matmul", ("input", "other"), (), _MM),
        torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.linalg.matmul)
    add("matmul", _gemm_handler("matmul", ("other", "input"), (), {"other": (-1,), "input": (-2,)}),
        torch.Tensor.__rmatmul__)
    for name, roles, addends in (
        ("mm", ("input", "mat2"), ()),
        ("bmm", ("input", "mat2"), ()),
        ("addmm", ("input", "mat1", "mat2"), ("input",)),
        ("baddbmm", ("input", "batch1", "batch2"), ("input",)),
        ("addbmm", ("input", "batch1", "batch2"), ("input",)),
        ("mv", ("input", "vec"), ()),
        ("addmv", ("input", "mat", "vec"), ("input",)),
        ("addr", ("input", "vec1", "vec2"), ("input",)),
        ("dot", ("input", "tensor"), ()),
        ("vdot", ("input", "other"), ()),
        ("inner", ("input", "other"), ()),
    ):
        dims = {r: _MM.get(r, _LAST) for r in roles if name not in ("addr", "outer", "ger")}
        add(name, _gemm_handler(name, roles, addends, dims), getattr(torch, name), getattr(torch.Tensor, name))
    for name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        add(name, _gemm_handler(name, ("input", "weight", "bias"), ("bias",)), getattr(F, name),
            getattr(torch, name))
    add("convolution", _gemm_handler("convolution", ("input", "weight", "bias"), ("bias",)), torch.convolution)
    add("prelu", _gemm_handler("prelu", ("input", "weight")), F.prelu, torch.prelu, torch.Tensor.prelu)
    add("bilinear", _gemm_handler("bilinear", ("input1", "input2", "weight", "bias"), ("bias",),
                                  {"input1": _LAST, "input2": _LAST, "weight": (-2, -1)}), F.bilinear, torch.bilinear)
    add("einsum", _composite_handler("einsum"), torch.einsum, torch.functional.einsum)
    add("tensordot", _composite_handler("tensordot"), torch.tensordot, torch.functional.tensordot)
    add("chain_matmul", _composite_handler("chain_matmul"), torch.chain_matmul, torch.functional.chain_matmul)
    add("multi_dot", _composite_handler("multi_dot"), torch.linalg.multi_dot)
    add("scaled_dot_product_attention", _sdpa_handler, F.scaled_dot_product_attention)
    add("multi_head_attention_forward", _mha_handler, F.multi_head_attention_forward)
    for kind in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        add(kind, _rnn_handler(kind), getattr(vf, kind))
        add(kind + "_cell", _cell_handler(kind), getattr(vf, kind + "_cell"))
    return h


def covered_ops() -> list[str]:
    """The op names the emulation handles (sorted), as listed in docs/emulation.md."""
    return sorted({op for op, _ in _HANDLERS.values()})


_HANDLERS = _build_handlers()


class _EmulationMode(TorchFunctionMode):
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        local = _LOCAL
        if local.busy or not local.stack or local.stack[-1] is None:
            return func(*args, **kwargs)
        try:
            entry = _HANDLERS.get(func)
        except TypeError:  # unhashable callables are never ours
            return func(*args, **kwargs)
        if entry is None:
            kind = _unknown_kind(func)
            if kind is None:
                return func(*args, **kwargs)
        emu = local.stack[-1]
        device = _first_tensor_device_type(args)
        if emu.native_device_type is not None and device == emu.native_device_type:
            return func(*args, **kwargs)  # torch.autocast handles this device natively
        _bind_checkpoint(emu)
        if not _LOCAL.compile_warned and _in_compiled_module():
            _LOCAL.compile_warned = True
            warnings.warn(
                "lossscale emulation: a torch.compile'd module runs eagerly inside lossscale.autocast (the "
                "emulation is not compiled into the graph; results are those of eager emulation)",
                RuntimeWarning, stacklevel=3,
            )
        if device is not None and _autocast_disabled_inside(emu, device):
            return func(*args, **kwargs)  # torch.autocast(device, enabled=False) inside: FP32, as on CUDA
        local.busy += 1
        try:
            if entry is None:
                return _run_unknown(emu, func, kind, args, kwargs)
            # The handler's own torch calls skip __torch_function__ entirely (they would only pass through,
            # busy being set): a few microseconds per call, which per-time-step handlers (RNNs) make up.
            with torch._C.DisableTorchFunction():
                return entry[1](emu, func, args, kwargs)
        finally:
            local.busy -= 1


# ----------------------------------------------------------------------------------------------------------
# Activation checkpointing: the recomputation re-enters the emulation that ran the forward.
#
# torch.utils.checkpoint recomputes a segment's forward during backward, re-entering only torch's own
# autocast state. The emulation binds itself to the checkpoint when one of its ops first runs inside the
# segment: reentrant (CheckpointFunction, forward under no_grad): the checkpoint's ``ctx.run_function`` is
# wrapped; non-reentrant (saved-tensor hooks): the checkpoint frame's ``recompute_fn`` is wrapped. The wrapper
# re-enters a copy of the emulator (same precision, counters, strictness; its own weight cache), so the
# recomputation runs the same rounding sites and the gradients are those of the un-checkpointed run. This reads
# two attributes of torch.utils.checkpoint's private objects; where they are not found, the segment raises
# instead of producing un-emulated gradients (checked at every handled op inside a checkpoint).

_BOUND = "_lossscale_emulation"


def _install_hooks(model: torch.nn.Module, emu: Emulator) -> list[torch.utils.hooks.RemovableHandle]:
    """Name the rounding sites after the innermost module running (public module hooks; the caller removes
    the handles returned)."""
    stack = emu.module_stack
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    for name, module in model.named_modules():
        label = name or type(model).__name__

        def pre(_m: torch.nn.Module, _args: Any, label: str = label) -> None:
            stack.append(label)

        def post(_m: torch.nn.Module, _args: Any, _out: Any) -> None:
            if stack:
                stack.pop()

        hooks.append(module.register_forward_pre_hook(pre))
        hooks.append(module.register_forward_hook(post))
    return hooks


class _Reentered:
    """Context that re-enters a copy of ``emu`` (and the function mode) for a checkpoint recomputation."""

    def __init__(self, emu: Emulator, depth: int, modules: list[str]) -> None:
        self.emu, self.depth, self.modules = emu, depth, modules
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> None:
        src = self.emu
        # The same RecipeState, replaying: forward operands take the scales of the original forward (delayed
        # histories are not recorded again) and the recipe counts are not counted twice.
        emu = Emulator(src.precision, src.counters, src.recipe_state)
        self._replaying, src.recipe_state.replaying = src.recipe_state.replaying, True
        emu.strict, emu.native_device_type = src.strict, src.native_device_type
        emu.autocast_nesting, emu.replay_depth = None, self.depth
        # The site names of the original forward (a recipe's state is keyed by them): the module stack when
        # the emulation bound to the checkpoint, and autocast's model= hooks again for the modules inside.
        emu.module_stack[:] = self.modules
        emu.model = src.model
        if src.model is not None:
            self._hooks = _install_hooks(src.model, emu)
        self._mode = _EmulationMode()
        _LOCAL.stack.append(emu)
        self._busy, _LOCAL.busy = _LOCAL.busy, 0
        self._mode.__enter__()  # type: ignore[no-untyped-call]

    def __exit__(self, *exc: Any) -> None:
        try:
            self._mode.__exit__(*exc)  # type: ignore[no-untyped-call]
        finally:
            _LOCAL.stack.pop()
            _LOCAL.busy = self._busy
            self.emu.recipe_state.replaying = self._replaying
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()


def _reentering(fn: Callable[..., Any], emu: Emulator) -> Callable[..., Any]:
    # The autocast depth of the first handled op relative to the region, replayed in the recomputation.
    depth = _nesting() - (emu.autocast_nesting or 0)
    modules = list(emu.module_stack)

    def run(*args: Any, **kwargs: Any) -> Any:
        with _Reentered(emu, depth, modules):
            return fn(*args, **kwargs)

    setattr(run, _BOUND, True)
    return run


def _checkpoint_forward_code() -> Any:
    module = sys.modules.get("torch.utils.checkpoint")
    fn = getattr(getattr(module, "CheckpointFunction", None), "forward", None)
    return getattr(fn, "__code__", None)


def _bind_checkpoint(emu: Emulator) -> None:
    if torch.is_grad_enabled():
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if hooks is None or "_checkpoint_hook" not in getattr(hooks[0], "__qualname__", ""):
            return
        frame = next(
            (c.cell_contents for c in hooks[0].__closure__ or () if hasattr(c.cell_contents, "recompute_fn")),
            None,
        )
        if frame is None:
            raise RuntimeError(
                "lossscale emulation inside torch.utils.checkpoint (use_reentrant=False): this torch version's "
                "checkpoint frame has no recompute_fn to re-enter the emulation in; the recomputation would "
                "not be emulated. Checkpoint outside the emulated region or use use_reentrant=True"
            )
        if not getattr(frame.recompute_fn, _BOUND, False):
            frame.recompute_fn = _reentering(frame.recompute_fn, emu)
        return
    code = _checkpoint_forward_code()
    if code is None:
        return
    f: Any = sys._getframe(2)
    for _ in range(64):  # the checkpointed function runs a few frames below CheckpointFunction.forward
        if f is None:
            return
        if f.f_code is code:
            ctx = f.f_locals.get("ctx")
            run = getattr(ctx, "run_function", None)
            if run is None:
                raise RuntimeError(
                    "lossscale emulation inside torch.utils.checkpoint (use_reentrant=True): this torch "
                    "version's CheckpointFunction has no run_function to re-enter the emulation in; the "
                    "recomputation would not be emulated. Use use_reentrant=False"
                )
            if not getattr(run, _BOUND, False):
                ctx.run_function = _reentering(run, emu)
            return
        f = f.f_back


def _in_compiled_module() -> bool:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    probe = getattr(eval_frame, "_is_in_optimized_module", None)
    return bool(probe()) if probe is not None else False


def _nesting() -> int:
    # torch.autocast's nesting depth (torch has no getter: increment and decrement back; no sync).
    n = torch.autocast_increment_nesting()
    torch.autocast_decrement_nesting()
    return int(n) - 1


def _autocast_disabled_inside(emu: Emulator, device: str) -> bool:
    """Whether a ``torch.autocast(device, enabled=False)`` entered inside this emulated region is active.

    Every ``torch.autocast`` context (enabled or not) raises torch's autocast nesting depth; the emulation
    records the depth at entry, so a deeper level with autocast off for the tensors' device is a region the
    model runs in FP32 on purpose (transformers' ``maybe_autocast``, rotary embeddings, ...). In a
    checkpoint recomputation, which enters autocast contexts of its own, the base depth is taken at the
    first handled op, minus that op's depth relative to the region in forward."""
    if emu.autocast_nesting is None:
        emu.autocast_nesting = _nesting() - emu.replay_depth
    if _nesting() <= emu.autocast_nesting:
        return False
    try:
        return not torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type torch.autocast does not know: nothing can disable it
        return False


# ----------------------------------------------------------------------------------------------------------
# Nothing silently FP32: GEMM-class ops the emulation has no handler for.

_GEMM_WORDS = frozenset(
    {"matmul", "gemm", "linear", "bilinear", "dot", "vdot", "vecdot", "einsum", "attention", "lstm", "gru",
     "rnn", "tbc", "convolution"}
)
_UNKNOWN_CACHE: dict[Any, str | None] = {}
_WARNED: set[str] = set()


class UnemulatedOpError(RuntimeError):
    """Raised under ``lossscale.autocast(..., strict=True)`` by a GEMM-class op the emulation cannot round."""


def _unknown_kind(func: Any) -> str | None:
    """"custom" for an op of a non-aten ``torch.library`` namespace (probed for GEMMs inside), "gemm" for a
    torch function without a handler whose name says GEMM/convolution/attention, else None. Cached."""
    try:
        return _UNKNOWN_CACHE[func]
    except KeyError:
        pass
    kind: str | None = None
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        namespace, _, name = _op_name(func).partition("::")
        if namespace not in ("aten", "prims", "profiler"):
            kind = "custom"
        elif name.split(".")[0] in aten.GEMM_ATEN:
            kind = "aten"  # torch.ops.aten.mm & co. called directly: emulated at the aten level
        elif _gemm_like(name.split(".")[0]):
            kind = "gemm"
    elif _gemm_like(getattr(func, "__name__", "")):
        kind = "gemm"
    _UNKNOWN_CACHE[func] = kind
    return kind


def _gemm_like(name: str) -> bool:
    words = [w for w in name.lower().split("_") if w]
    return any(
        w in _GEMM_WORDS or w.endswith("mm") or (w.startswith("conv") and not w.startswith("convert")) for w in words
    )


def _op_name(func: Any) -> str:
    if isinstance(func, torch._ops.OpOverloadPacket):
        return str(func._qualified_op_name)
    if isinstance(func, torch._ops.OpOverload):
        return str(func.name()).replace(".default", "")  # type: ignore[no-untyped-call]
    module = getattr(func, "__module__", None) or ""
    name = str(getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func))
    return f"{module}.{name}" if module and not name.startswith(module) else name


def _run_unknown(emu: Emulator, func: Any, kind: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    leaves, _ = aten._flatten((*args, *kwargs.values()))
    if not any(t.dtype == torch.float32 for t in leaves):
        return func(*args, **kwargs)
    name = _op_name(func)
    if kind == "aten":
        return aten.run_composite(emu, name.split("::")[-1].split(".")[0], func, args, kwargs)
    if kind == "custom":
        out, gemms, opaque = aten.probe_gemms(func, args, kwargs)
        if not gemms and not opaque:
            return out  # no GEMM inside: nothing to emulate
        what = f"runs {', '.join(sorted(set(gemms)))} inside" if gemms else "could not be looked into"
    else:
        out, what = None, "has a GEMM-class name"
    message = (
        f"lossscale emulation: {name} {what} and is not emulated: it computed with FP32 operands inside an "
        "emulated region. Run it outside lossscale.autocast, register an emulated version, or accept FP32 "
        "for it (counted in RoundingCounters.unemulated)"
    )
    if emu.strict:
        raise UnemulatedOpError(message)
    if emu.counters is not None:
        emu.counters.count_unemulated(name)
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    return out if kind == "custom" else func(*args, **kwargs)


def _first_tensor_device_type(args: tuple[Any, ...]) -> str | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return None


def _native_dtype(precision: Precision) -> torch.dtype | None:
    """The torch dtype autocast would use for this precision, or None if torch autocast cannot express it."""
    fmt = precision.compute
    if (
        fmt in (BF16, FP16)
        and precision.output == fmt
        and precision.grad == fmt
        and precision.scaling == "none"
        and not precision.flush_to_zero
    ):
        return fmt.torch_dtype
    return None


class Autocast:
    """The context manager :func:`autocast` returns. Attributes: ``precision``, ``emulated`` (bool),
    ``counters`` (the :class:`RoundingCounters` given, or None), ``device_type``."""

    def __init__(
        self,
        precision: Precision | str,
        *,
        emulate: bool | None = None,
        counters: RoundingCounters | None = None,
        device_type: str | None = None,
        model: torch.nn.Module | None = None,
        recipe_state: RecipeState | None = None,
        strict: bool = False,
    ) -> None:
        self.precision = Precision.parse(precision)
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        self.strict = strict
        if recipe_state is not None and not isinstance(recipe_state, RecipeState):
            raise TypeError(f"recipe_state must be a RecipeState or None, got {type(recipe_state).__name__}")
        if recipe_state is None and self.precision.recipe is not None and self.precision.recipe.kind == "delayed":
            warnings.warn(
                f"{self.precision.name}: delayed scaling without recipe_state= keeps its amax histories for this "
                "context only; pass one lossscale.RecipeState() to every step's autocast",
                stacklevel=3,
            )
        if (
            model is None and recipe_state is not None and not recipe_state.warned_no_model
            and self.precision.recipe is not None and self.precision.recipe.kind == "delayed"
        ):
            recipe_state.warned_no_model = True
            warnings.warn(
                f"{self.precision.name}: without model= the delayed-scaling histories are keyed by op name only "
                "(every linear shares 'linear.input' and 'linear.weight'); pass model= to autocast to keep one "
                "history per layer",
                stacklevel=3,
            )
        self.recipe_state = recipe_state
        if emulate is not None and not isinstance(emulate, bool):
            raise TypeError(f"emulate must be a bool or None, got {type(emulate).__name__}")
        if counters is not None and not isinstance(counters, RoundingCounters):
            raise TypeError(f"counters must be a RoundingCounters or None, got {type(counters).__name__}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if not isinstance(device_type, str):
            raise TypeError(f"device_type must be a str or None, got {type(device_type).__name__}")
        self.device_type = device_type
        self.counters = counters
        self.model = model
        dtype = _native_dtype(self.precision)
        # emulate=None on a CUDA machine: torch.autocast runs CUDA tensors natively, and the emulation covers
        # tensors on every other device (a CPU model on a GPU machine is emulated, not silently left FP32).
        native_possible = dtype is not None and device_type == "cuda" and counters is None
        self._hybrid = emulate is None and native_possible  # `emulated` stays False: the device is native
        if emulate is None:
            emulate = not native_possible
        if not emulate:
            if self.precision.is_fp32:
                dtype = None
            elif dtype is None:
                raise ValueError(
                    f"emulate=False: torch.autocast cannot run precision {self.precision.name!r} natively "
                    "(native needs compute == output == grad in bf16 or fp16, no scaling, no flush-to-zero); "
                    "use emulate=True or None"
                )
            if counters is not None:
                raise ValueError("counters need emulation: native torch.autocast has no rounding sites to count")
        self.emulated = emulate
        self._dtype = dtype
        self._emulator: Emulator | None = None
        self._mode: _EmulationMode | None = None
        self._native: torch.autocast | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._depth = 0
        self._stance: Any = None

    def __enter__(self) -> Autocast:
        if self._depth:
            raise RuntimeError("this lossscale.autocast context is already active; create a new one to nest")
        self._depth = 1
        if (self.emulated or self._hybrid) and not self.precision.is_fp32:
            emu = Emulator(self.precision, self.counters, self.recipe_state)
            emu.strict = self.strict
            self._emulator = emu
            _LOCAL.stack.append(emu)
            if self.model is not None:
                emu.model = self.model
                self._hooks = _install_hooks(self.model, emu)
            if self._hybrid:
                emu.native_device_type = self.device_type
                self._native = torch.autocast(self.device_type, dtype=self._dtype)
                self._native.__enter__()  # type: ignore[no-untyped-call]
            emu.autocast_nesting = _nesting()
            # torch.compile'd code runs eagerly inside the emulation (see docs/emulation.md, torch.compile).
            # Nothing can be compiled before torch._dynamo is imported: then skip (importing it takes seconds).
            if "torch._dynamo" in sys.modules:
                self._stance = torch.compiler.set_stance("force_eager")
                self._stance.__enter__()
            self._mode = _EmulationMode()
            self._mode.__enter__()  # type: ignore[no-untyped-call]
        else:
            # Native or FP32: nothing is emulated inside, even under an outer emulated context.
            _LOCAL.stack.append(None)
            if self._dtype is not None:
                self._native = torch.autocast(self.device_type, dtype=self._dtype)
                self._native.__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(exc_type, exc, tb)  # type: ignore[no-untyped-call]
            if self._native is not None:
                self._native.__exit__(exc_type, exc, tb)
            if self._stance is not None:
                self._stance.__exit__(exc_type, exc, tb)
        finally:
            self._stance = None
            _LOCAL.stack.pop()
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()
            if self._emulator is not None:
                self._emulator.clear_cache()
            self._mode = self._native = self._emulator = None
            self._depth = 0

    def __repr__(self) -> str:
        mode = f"native on {self.device_type}, emulated elsewhere" if self._hybrid else (
            "emulated" if self.emulated else "native"
        )
        return f"lossscale.autocast({self.precision.name!r}, {mode}, device_type={self.device_type!r})"


def autocast(
    precision: Precision | str,
    *,
    emulate: bool | None = None,
    counters: RoundingCounters | None = None,
    device_type: str | None = None,
    model: torch.nn.Module | None = None,
    recipe_state: RecipeState | None = None,
    strict: bool = False,
) -> Autocast:
    """Run the enclosed forward pass in low precision, natively (``torch.autocast``) or emulated.

    Emulated: for FP32 tensors, GEMMs (linear, matmul/mm/bmm/addmm/baddbmm), convolutions (1d-3d),
    scaled-dot-product and multi-head attention and recurrent layers (LSTM/GRU/RNN and cells) compute in
    FP32 between rounding sites:

        forward:   y = q_output( op( q_compute(x), q_compute(w) ) + q_output(b) )
        backward:  g = q_grad(dL/dy);  dx = q_output(op_x'(g)),  dw = q_output(op_w'(g))

    (``q_compute`` with per-tensor power-of-two scaling under ``scaling="current"``). Everything else runs in
    FP32, as on CUDA autocast's FP32 list (softmax, norms, losses). The backward rounding is attached at
    forward time, so ``loss.backward()`` may run after the context exits (as with ``torch.autocast``).

    Args:
        precision: a :class:`~lossscale.Precision` or preset name (``"bf16-mixed"``, ``"fp8-hybrid"``, ...).
        emulate: None (native where fast: on a CUDA machine, for bf16/fp16 recipes without counters, CUDA
            tensors run under torch.autocast and tensors on other devices are emulated), True
            (always emulate), False (require native ``torch.autocast``; ValueError if it cannot express the
            precision).
        counters: a :class:`RoundingCounters` that accumulates underflow/overflow per rounding site (emulation
            only). Counting does not synchronise.
        device_type: for native mode; default ``"cuda"`` if available, else ``"cpu"``.
        model: name rounding sites after the innermost submodule of ``model`` running (forward hooks,
            removed on exit).
        recipe_state: for precisions with a scaling recipe (``"fp8-delayed"``, ``"mxfp8"``, ...): the
            :class:`~lossscale.emulate.recipes.RecipeState` holding delayed-scaling histories and the recipe's
            per-site counters; pass the same one every step.
        strict: raise :class:`UnemulatedOpError` on a GEMM-class op the emulation cannot round (an opaque
            ``torch.library`` op computing a GEMM, a torch function without a handler); by default such an
            op runs in FP32 with one ``RuntimeWarning`` per op and a count in ``counters.unemulated``.

    Returns an :class:`Autocast` context manager (``__enter__`` returns itself). Entering and leaving do not
    synchronise.

    Example:
        >>> import torch, lossscale
        >>> x, w = torch.tensor([[1.0 + 2**-9]]), torch.tensor([[1.0]])
        >>> with lossscale.autocast("bf16-mixed", emulate=True):
        ...     y = torch.nn.functional.linear(x, w)
        >>> y.item()  # x was rounded to BF16 on its way into the GEMM
        1.0
    """
    return Autocast(
        precision, emulate=emulate, counters=counters, device_type=device_type, model=model,
        recipe_state=recipe_state, strict=strict,
    )
