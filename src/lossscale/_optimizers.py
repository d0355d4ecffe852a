"""Optimizers for the diagnosis: by name (``"adamw"``, any ``torch.optim`` class) or as a factory, described in
one line for the report, and unwrapped from the trainer frameworks' wrappers.

Swamping (updates lost when weights are stored in a narrow format) depends on the update size, so on the
optimizer and its learning rate: the diagnosis must run the user's optimizer and say which one it ran.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_OPTIMIZER",
    "check_not_meta",
    "describe_optimizer",
    "optimizer_factory",
    "torch_optimizer_names",
    "unwrap_optimizer",
]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

# What diagnose() runs when told nothing (kept for backward compatibility, and stated in every report).
DEFAULT_OPTIMIZER = ("SGD", {"lr": 0.01})


def torch_optimizer_names() -> dict[str, type[torch.optim.Optimizer]]:
    """Every optimizer class exported by ``torch.optim``, keyed by its lower-case name (``"adamw"``, ``"sgd"``)."""
    out: dict[str, type[torch.optim.Optimizer]] = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            out[name.lower()] = obj
    return out


def _resolve(name: str) -> type[torch.optim.Optimizer]:
    if ":" in name:  # "package.module:Class", e.g. "lossscale.optim:AdamW"
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"optimizer {name!r}: cannot import it ({type(err).__name__}: {err})") from None
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f"optimizer {name!r} is not a torch.optim.Optimizer class")
        return cls
    known = torch_optimizer_names()
    cls = known.get(name.lower())
    if cls is None:
        raise ValueError(
            f"optimizer must be a torch.optim class name (one of {', '.join(sorted(known))}) or "
            f"'package.module:Class', got {name!r}"
        )
    return cls


def optimizer_factory(name: str, **kwargs: Any) -> OptimizerFactory:
    """A factory ``params -> optimizer`` for a ``torch.optim`` class named case-insensitively (``"adamw"``,
    ``"SGD"``) or ``"package.module:Class"``, built with ``kwargs`` (``lr=1e-4, weight_decay=0.1``).

    The name and the keyword arguments are checked now (a ValueError names what is wrong), not when the
    factory is called.

    Example:
        >>> import torch
        >>> from lossscale.diagnose import optimizer_factory
        >>> opt = optimizer_factory("adamw", lr=1e-4)([torch.nn.Parameter(torch.zeros(2))])
        >>> type(opt).__name__, opt.defaults["lr"]
        ('AdamW', 0.0001)
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"optimizer name must be a non-empty str, got {name!r}")
    cls = _resolve(name)
    sig = inspect.signature(cls.__init__)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    allowed = [p for p in sig.parameters if p not in ("self", "params")]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown and not accepts_any:
        raise ValueError(f"optimizer {cls.__name__} takes no argument {unknown[0]!r}; it takes {', '.join(allowed)}")

    def factory(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return cls(params, **kwargs)

    factory.__qualname__ = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    return factory


def _simple(v: Any) -> bool:
    if isinstance(v, (int, float, str)) and not isinstance(v, bool):
        return True
    return isinstance(v, tuple) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def optimizer_settings(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The numeric hyper-parameters of ``opt`` (its ``defaults``; flags and None left out)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt.defaults.items() if _simple(v)}


def describe_optimizer(opt: torch.optim.Optimizer) -> str:
    """One line naming the optimizer and its numeric hyper-parameters: ``AdamW(lr=0.0001, betas=(0.9, 0.999),
    eps=1e-08, weight_decay=0.01)``."""
    parts = [f"{k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in optimizer_settings(opt).items()]
    return f"{type(opt).__name__}({', '.join(parts)})"


def unwrap_optimizer(opt: Any) -> Any:
    """The ``torch.optim.Optimizer`` inside a trainer framework's wrapper, recognised by type: accelerate's
    ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer`` (both ``lightning`` and
    ``pytorch_lightning``). Anything else is returned as it is. Never follows a bare ``.optimizer``
    attribute (learning-rate schedulers have one too). A framework that is not imported cannot have made
    the object, so nothing is imported here."""
    for _ in range(4):  # wrappers may nest (a Lightning optimizer around an accelerated one)
        inner = None
        acc = sys.modules.get("accelerate.optimizer")
        if acc is not None and isinstance(opt, acc.AcceleratedOptimizer):
            inner = opt.optimizer
        for mod_name in ("lightning.pytorch.core.optimizer", "pytorch_lightning.core.optimizer"):
            mod = sys.modules.get(mod_name)
            if mod is not None and isinstance(opt, mod.LightningOptimizer):
                inner = opt._optimizer
        if inner is None:
            return opt
        opt = inner
    return opt


def check_not_meta(model: nn.Module) -> None:
    """Raise ValueError naming the parameters on the ``meta`` device (shapes without values: nothing to
    train or measure; materialise them first, e.g. ``model.to_empty(device=...)`` and load the weights)."""
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        shown = ", ".join(meta[:5]) + (f" and {len(meta) - 5} more" if len(meta) > 5 else "")
        raise ValueError(
            f"model has parameters on the meta device (no values): {shown}; load or initialise the weights "
            "first (e.g. model.to_empty(device='cpu') and load_state_dict)"
        )
