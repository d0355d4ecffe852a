"""The stateful shell shared by lossscale's optimizers: option checks, the SR generator, state_dict."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..formats import FloatFormat, FormatLike
from .compensation import COMPENSATIONS, StochasticRoundingRNG, resolve_compensation, weight_format_of

__all__ = ["CompensatedOptimizer", "check_number", "parse_state_dtype", "STATE_DTYPES"]

STATE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_STATE_DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
# Bumped when the layout of what state_dict() adds to torch's changes.
STATE_FORMAT_VERSION = 1


def parse_state_dtype(state_dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32``/``"fp32"`` or ``torch.bfloat16``/``"bf16"``; anything else is a ``ValueError``."""
    if isinstance(state_dtype, torch.dtype):
        if state_dtype in STATE_DTYPES.values():
            return state_dtype
    elif isinstance(state_dtype, str) and state_dtype in _STATE_DTYPE_ALIASES:
        return STATE_DTYPES[_STATE_DTYPE_ALIASES[state_dtype]]
    raise ValueError(
        f"state_dtype must be torch.float32 ('fp32') or torch.bfloat16 ('bf16'), got {state_dtype!r}"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "bfloat16"


def check_number(name: str, value: object) -> float:
    """``value`` if it is a real number (not a bool), else a ``TypeError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return value


def check_common(lr: object, weight_decay: object, compensation: object, foreach: object) -> None:
    """Argument checks shared by every optimizer (torch.optim's messages where torch has one)."""
    if isinstance(lr, Tensor):
        raise TypeError("lr must be a Python float: a tensor lr would need a host sync every step")
    if not 0.0 <= check_number("lr", lr):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= check_number("weight_decay", weight_decay):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if compensation is not None and compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {COMPENSATIONS} or None, got {compensation!r}")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be a bool or None, got {type(foreach).__name__}")


def reject_unsupported(**flags: bool) -> None:
    """torch.optim flags we accept for signature compatibility but do not implement, when set."""
    for name, value in flags.items():
        if value:
            raise ValueError(f"{name}=True is not supported by lossscale.optim (use torch.optim for it)")


class CompensatedOptimizer(torch.optim.Optimizer):
    """Base class: per-group ``weight_format``/``compensation``/``state_dtype``, SR generator, state_dict.

    Param groups carry ``weight_format`` (a format name or None), ``compensation`` (None = the format's
    default) and ``state_dtype`` (``"float32"`` or ``"bfloat16"``), all plain data so that ``state_dict()``
    loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, params: Any, defaults: dict[str, Any], *, seed: int | None) -> None:
        # torch.initial_seed() reads the global seed without drawing from (and so changing) the global stream.
        self._rng = StochasticRoundingRNG(torch.initial_seed() % (1 << 62) if seed is None else seed)
        super().__init__(params, defaults)

    # -- options ------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch.optim's method) after checking its lossscale options against its tensors."""
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's lossscale options against its tensors and normalise them to plain data."""
        check_common(group["lr"], group["weight_decay"], group["compensation"], group["foreach"])
        fmt_arg = group["weight_format"]
        if fmt_arg is not None:
            group["weight_format"] = FloatFormat.parse(fmt_arg).name
        group["state_dtype"] = _dtype_name(parse_state_dtype(group["state_dtype"]))
        for p in group["params"]:
            fmt = weight_format_of(p, group["weight_format"])
            resolve_compensation(group["compensation"], fmt)

    def weight_format(self, param: Tensor, group: dict[str, Any]) -> FloatFormat:
        """The format ``param`` is kept in (the group's ``weight_format`` or its dtype's). No sync."""
        fmt: FormatLike | None = group["weight_format"]
        return weight_format_of(param, fmt)

    def generator(self, device: torch.device) -> torch.Generator:
        """The stochastic-rounding generator of ``device`` (saved in ``state_dict``). No sync."""
        return self._rng.get(device)

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus ``"lossscale": {"version", "rng"}`` (the SR generators' states).

        State tensors are the live ones, as in torch (save or copy them). Loads with
        ``torch.load(weights_only=True)``. Reading a generator's state is host-side for CPU generators (a
        device read for accelerator generators; never in the per-step path).
        """
        sd = super().state_dict()
        sd["lossscale"] = {"version": STATE_FORMAT_VERSION, "rng": self._rng.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or from the same ``torch.optim`` class), keeping each
        state tensor's dtype. Validates the lossscale part first: on a malformed dict it raises and the
        optimizer is left unchanged.

        torch.optim casts floating-point state to its parameter's dtype on load, which would turn FP32
        moments of BF16 weights into BF16 (losing bits) and BF16 states of FP32 weights into FP32; we restore
        the saved dtype after torch's load, so a round trip is bit-exact. A ``step`` saved as a tensor (as
        ``torch.optim`` saves it) is read once here into the Python int we keep, so that later steps do not
        read it back from the device (a host sync per step).
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("lossscale", None)
        rng: StochasticRoundingRNG | None = None
        if extra is not None:
            version = extra.get("version") if isinstance(extra, dict) else None
            if version != STATE_FORMAT_VERSION:
                raise ValueError(
                    f"unsupported lossscale optimizer state version {version!r}; "
                    f"this version reads {STATE_FORMAT_VERSION}"
                )
            rng = StochasticRoundingRNG.from_state_dict(extra.get("rng"))
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        # A torch.optim state dict lacks our options (compensation, weight_format, state_dtype, ...): they take
        # this optimizer's defaults, as torch's own __setstate__ does for options it adds over time. Checked on
        # copies first, so that a bad group raises before anything is loaded.
        for saved, current in zip(saved_groups, self.param_groups, strict=False):
            self._check_group({**self.defaults, **saved, "params": current["params"]})
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self._check_group(group)
        id_map = dict(
            zip(
                itertools.chain.from_iterable(g["params"] for g in saved_groups),
                itertools.chain.from_iterable(g["params"] for g in self.param_groups),
                strict=True,
            )
        )
        for saved_id, param in id_map.items():
            if saved_id not in saved_state:
                continue
            state = self.state[param]
            for key, value in saved_state[saved_id].items():
                if key == "step" and isinstance(value, Tensor):
                    state[key] = int(value.item())  # once, at load time (see above)
                elif isinstance(value, Tensor) and value.is_floating_point():
                    state[key] = value.to(device=param.device, copy=True)
        if rng is not None:
            self._rng = rng

    def _params_with_grad(self, group: dict[str, Any]) -> Iterable[Tensor]:
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                yield p
