"""Diagnosis of exported gradients: the framework-neutral entry for TensorFlow, JAX or anything else.

:func:`diagnose_gradients` takes named gradient arrays (numpy arrays, or anything with ``__array__``: a
``tf.Tensor``'s ``.numpy()``, a ``jax.Array``, a torch tensor) and returns the same :class:`Diagnosis` as
:func:`lossscale.diagnose`: per format the underflow/subnormal/overflow fractions, whether loss scaling is
needed and the recommended scale interval, per array the same per-layer rows; swamping too when the weights
and their updates (or the weights after the step) are given. The arrays are measured by the monitor's own
statistics kernel (:func:`lossscale.monitor.gradient_stats`), so the numbers equal those of a
:class:`GradientMonitor` on the same gradients, element for element.

``.npz`` layout (:func:`load_npz`, :func:`save_npz`; ``lossscale diagnose --gradients FILE.npz``): a key is
``[step<k>::][kind::]name`` with kind ``grad`` (the default: a weight gradient), ``activation`` (an
activation gradient), ``weight`` (the weight before the update), ``update`` (the update added to it) or
``new_weight`` (the weight after the update); the name is free text (``dense/kernel:0`` is fine). Keys
without ``step<k>::`` belong to step 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .diagnose import Diagnosis, _check_threshold
from .formats import FormatLike
from .monitor import Columns, Entry, MonitorConfig, MonitorStats, gradient_stats
from .monitor._kernel import _combine_rows, _swamping_counts

__all__ = ["KINDS", "diagnose_gradients", "load_npz", "save_npz"]

KINDS = ("grad", "activation", "weight", "update", "new_weight")
ArrayDict = Mapping[str, Any]
Steps = ArrayDict | Sequence[ArrayDict]
_KEY = re.compile(r"^(?:step(\d+)::)?(?:(grad|activation|weight|update|new_weight)::)?(.+)$", re.S)


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    """A float32 CPU tensor of the array's values: FP16/BF16 exactly, FP64 rounded to FP32 (as the monitor
    measures FP64 gradients)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        try:
            a = np.asarray(x)
        except Exception as err:  # noqa: BLE001 - any conversion failure, named
            raise TypeError(f"{what}: cannot be read as an array ({type(err).__name__}: {err})") from None
        if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 (JAX, TF exports): widened exactly
            a = a.astype(np.float32)
        if a.dtype.kind != "f":
            raise TypeError(f"{what}: must hold floating-point values, got dtype {a.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(a))
    if not t.is_floating_point():
        raise TypeError(f"{what}: must hold floating-point values, got dtype {t.dtype}")
    return t.float().reshape(-1)


def _steps(arg: Steps | None, what: str) -> list[ArrayDict]:
    if arg is None:
        return []
    if isinstance(arg, Mapping):
        return [arg]
    if isinstance(arg, (str, bytes)) or not isinstance(arg, Sequence):
        raise TypeError(f"{what} must be a mapping of name to array, or a sequence of them (one per step)")
    for i, m in enumerate(arg):
        if not isinstance(m, Mapping):
            raise TypeError(f"{what}[{i}] must be a mapping of name to array, got {type(m).__name__}")
    return list(arg)


def diagnose_gradients(
    gradients: Steps,
    *,
    activations: Steps | None = None,
    weights: Steps | None = None,
    updates: Steps | None = None,
    new_weights: Steps | None = None,
    formats: Sequence[FormatLike] | str = ("bf16", "fp16", "e5m2"),
    threshold: float = 1e-3,
    meta: Mapping[str, Any] | None = None,
) -> Diagnosis:
    """The :class:`Diagnosis` of named gradient arrays, from any framework.

    Args:
        gradients: weight gradients, ``{name: array}`` for one step or a sequence of them (one per step;
            names may differ between steps, each name is one row).
        activations: activation gradients, the same way (optional).
        weights: the weights before each step's update, by the gradients' names (optional; for swamping).
        updates: what each step added to the weights (``w_new = fp32(w + update)``), or
        new_weights: the weights after the step (exact; use this when you have them).
        formats, threshold: as :func:`lossscale.diagnose`.
        meta: extra run description stored in the result (e.g. the optimizer that made the updates).

    Swamping counts an element as updated when ``w_new != w`` and as swamped in ``F`` when also
    ``round_F(w_new) == round_F(w)``, as the monitor does around ``optimizer.step()``.

    Example:
        >>> import numpy as np
        >>> from lossscale import diagnose_gradients
        >>> g = {"dense/kernel:0": np.full((4, 4), 1e-9, np.float32), "dense/bias:0": np.ones(4, np.float32)}
        >>> d = diagnose_gradients(g, formats=("bf16", "fp16"))
        >>> d.format("fp16").underflow_fraction, str(d.format("fp16").recommended_scale)
        (0.8, '[2^5, 2^15]')
    """
    config = MonitorConfig.make(formats)
    fmts = config.formats
    _check_threshold(threshold)
    grads = _steps(gradients, "gradients")
    if not grads:
        raise ValueError("gradients must hold at least one step")
    acts = _steps(activations, "activations")
    ws = _steps(weights, "weights")
    ups = _steps(updates, "updates")
    news = _steps(new_weights, "new_weights")
    if ups and news:
        raise ValueError("give updates or new_weights, not both")
    after = ups or news
    if bool(ws) != bool(after):
        raise ValueError("swamping needs both weights and (updates or new_weights)")
    for what, lst in (("activations", acts), ("weights", ws), ("updates" if ups else "new_weights", after)):
        if lst and len(lst) != len(grads):
            raise ValueError(f"{what} must have one mapping per step: {len(lst)} given for {len(grads)} steps")

    entries: list[Entry] = []
    rows: dict[tuple[str, str], int] = {}
    for kind, lst in (("weight", grads), ("activation", acts)):
        for step in lst:
            for name in step:
                if not isinstance(name, str):
                    raise TypeError(f"array names must be str, got {name!r}")
                if (kind, name) not in rows:
                    rows[(kind, name)] = len(entries)
                    entries.append(Entry(name, kind))  # type: ignore[arg-type]
    cols = Columns(len(fmts))
    total = np.zeros((len(entries), cols.width))
    total[:, cols.MIN_ABS] = np.inf
    for s in range(len(grads)):
        for kind, lst in (("weight", grads), ("activation", acts)):
            if not lst:
                continue
            for name, arr in lst[s].items():
                i = rows[(kind, name)]
                row = gradient_stats(_as_tensor(arr, f"{kind} gradient {name!r} (step {s})"), fmts).numpy()
                total[i] = _combine_rows(np.stack([total[i], row]), cols)
        if ws:
            for name, w in ws[s].items():
                if ("weight", name) not in rows:
                    raise ValueError(f"weights[{s}] names {name!r}, which has no gradient")
                if name not in after[s]:
                    raise ValueError(f"weights[{s}] names {name!r} but {'updates' if ups else 'new_weights'} does not")
                old = _as_tensor(w, f"weight {name!r} (step {s})")
                other = _as_tensor(after[s][name], f"{'update' if ups else 'new weight'} {name!r} (step {s})")
                if other.shape != old.shape:
                    raise ValueError(
                        f"{name!r} (step {s}): weight has {old.numel()} elements, its update {other.numel()}"
                    )
                new = old + other if ups else other  # FP32 addition, round to nearest even
                counts = _swamping_counts(old, new, None, 1, fmts).numpy()[0]
                total[rows[("weight", name)], cols.updated :] += counts
    stats = MonitorStats(
        source="fp32",
        formats=fmts,
        entries=tuple(entries),
        steps=np.zeros(0, dtype=np.int64),
        scales=np.zeros(0),
        tables=np.zeros((0, len(entries), cols.width)),
        total=total,
        sampled=len(grads),
    )
    info: dict[str, Any] = {
        "entry": "diagnose_gradients",
        "formats": [f.name for f in fmts],
        "covers": "the named gradient arrays given (weights: "
        f"{sum(1 for e in entries if e.kind == 'weight')}, activations: "
        f"{sum(1 for e in entries if e.kind == 'activation')}), each element once per step; fractions are over "
        "all of their elements, exact zeros included",
    }
    if ws:
        info["updates"] = "weights and their updates as given" if ups else "weights before and after each step"
    info.update(meta or {})
    return Diagnosis.from_stats(stats, threshold=threshold, meta=info)


def load_npz(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an ``.npz`` in the layout of the module docstring into :func:`diagnose_gradients`' keyword
    arguments (``gradients``, ``activations``, ``weights``, ``updates``, ``new_weights``)."""
    with np.load(Path(path), allow_pickle=False) as z:
        items = [(k, z[k]) for k in z.files]
    by_kind: dict[str, dict[int, dict[str, np.ndarray]]] = {k: {} for k in KINDS}
    for key, arr in items:
        m = _KEY.match(key)
        if m is None:  # pragma: no cover - the pattern matches any non-empty key
            raise ValueError(f"{path}: cannot read key {key!r}")
        step = int(m.group(1) or 0)
        by_kind[m.group(2) or "grad"].setdefault(step, {})[m.group(3)] = arr
    if not by_kind["grad"]:
        raise ValueError(f"{path}: holds no gradient (keys 'name' or 'grad::name'); keys: {[k for k, _ in items][:5]}")
    steps = sorted(set().union(*(d.keys() for d in by_kind.values())))
    out: dict[str, Any] = {}
    for kind, arg in zip(KINDS, ("gradients", "activations", "weights", "updates", "new_weights"), strict=True):
        got = by_kind[kind]
        out[arg] = [got.get(s, {}) for s in steps] if got else None
    return out


def save_npz(
    path: str | os.PathLike[str],
    gradients: Steps,
    *,
    activations: Steps | None = None,
    weights: Steps | None = None,
    updates: Steps | None = None,
    new_weights: Steps | None = None,
) -> Path:
    """Write arrays in the layout :func:`load_npz` reads (numpy only: the way out of any framework)."""
    flat: dict[str, np.ndarray] = {}
    for kind, arg in zip(KINDS, (gradients, activations, weights, updates, new_weights), strict=True):
        for s, step in enumerate(_steps(arg, kind)):
            for name, arr in step.items():
                a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
                flat[f"step{s}::{kind}::{name}"] = a
    out = Path(path)
    np.savez(out, **flat)  # type: ignore[arg-type]
    return out
