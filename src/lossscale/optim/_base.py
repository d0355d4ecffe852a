"""The stateful shell shared by lossscale's optimizers: option checks, the SR generator, state_dict."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
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
    """``value`` if it is a finite real number: a ``TypeError`` naming the argument for a non-number (or a
    bool), a ``ValueError`` for NaN or an infinity (no hyper-parameter of ours has a meaning there)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
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
        try:
            self._check_group(self.param_groups[-1])
        except BaseException:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

    def _check_options(self, group: dict[str, Any]) -> None:
        """The subclass's own hyper-parameter checks on a group (SGD's momentum, Adam's betas, ...)."""

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's lossscale options against its tensors and normalise them to plain data."""
        check_common(group["lr"], group["weight_decay"], group["compensation"], group["foreach"])
        self._check_options(group)
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
        self._check_state_dict(state_dict)
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

    def _check_state_dict(self, state_dict: Any) -> None:
        """The structure of a state dict, checked before anything is loaded (a ``ValueError``/``TypeError``
        naming what is wrong): ``state`` and ``param_groups`` present, as many groups of as many parameters
        as this optimizer has, each parameter id once, every per-parameter state tensor (but ``step``) of its
        parameter's shape, every ``step`` a finite integer >= 0. Reads a tensor ``step`` (a host sync, at
        load time only)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r} entry (keys: {sorted(map(str, state_dict))})")
        groups, state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
            raise TypeError("state_dict['param_groups'] must be a list of dicts")
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict['state'] must be a dict, got {type(state).__name__}")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups)} parameter group(s); this optimizer has {len(self.param_groups)}"
            )
        params_of: dict[Any, Tensor] = {}
        for i, (saved, current) in enumerate(zip(groups, self.param_groups, strict=True)):
            ids = saved.get("params")
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"state_dict['param_groups'][{i}] has no 'params' list")
            if len(ids) != len(current["params"]):
                raise ValueError(
                    f"state_dict['param_groups'][{i}] has {len(ids)} parameter(s); this optimizer's group {i} "
                    f"has {len(current['params'])}"
                )
            for pid, p in zip(ids, current["params"], strict=True):
                if pid in params_of:
                    raise ValueError(f"state_dict names parameter id {pid!r} twice")
                params_of[pid] = p
        for pid, entry in state.items():
            if pid not in params_of:
                raise ValueError(f"state_dict['state'] has an entry for parameter id {pid!r}, which no group lists")
            if not isinstance(entry, Mapping):
                raise TypeError(f"state_dict['state'][{pid!r}] must be a dict, got {type(entry).__name__}")
            p = params_of[pid]
            for key, value in entry.items():
                where = f"state_dict['state'][{pid!r}][{key!r}]"
                if key == "step":
                    step = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
                    if isinstance(step, bool) or not isinstance(step, (int, float)) or not (
                        math.isfinite(step) and step >= 0 and step == int(step)
                    ):
                        raise ValueError(f"{where} must be an integer >= 0, got {value!r}")
                elif isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(f"{where} has shape {tuple(value.shape)}; its parameter has {tuple(p.shape)}")

    def _params_with_grad(self, group: dict[str, Any]) -> Iterable[Tensor]:
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                yield p
