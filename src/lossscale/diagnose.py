"""Does this model, in this format, lose gradients, and what should be done about it?

:func:`diagnose` trains a copy of the model for a few steps in FP32 under a :class:`GradientMonitor` sampling
every step, then answers per format (Micikevicius et al. 2018, arXiv:1710.03740, Fig. 3 asks the same
question of one histogram):

    underflow_fraction   #(g != 0 that round to 0 in F) / #(all gradient elements), weights and activations
    needs_scaling        underflow_fraction at scale 1 > threshold
    recommended_scale    [2^lo, 2^hi]: every power-of-two loss scale s with
                           #(g != 0 : round_F(s*g) == 0) / #g <= threshold     (lo: the smallest such s)
                           and max|g| * s rounds to a finite value in F       (hi: the largest such s)
                         or None when lo > hi (no single scale does both) or FP32 gradients were not finite
    swamping_fraction    #(updates lost when weights are stored in F) / #(nonzero updates)

The underflow count at scale ``2^k`` comes from the ``ceil(log2|g|)`` histogram: bin ``c`` holds
``2^(c-1) < |g| <= 2^c``, and for a format with subnormals ``g`` underflows exactly when ``|g| * 2^k <=
min_subnormal / 2`` (a power of two), i.e. when ``c <= log2(min_subnormal) - 1 - k``: exact. For a format
that flushes subnormals the threshold ``min_normal - min_subnormal / 2`` is inside a bin, which is then
counted as underflowing: an upper bound, so the recommendation stays safe. Overflow at ``2^k`` is exact from
the largest ``|g|``. The Adaptive Loss Scaling paper (Zhao et al., arXiv:1910.12385) uses the same 1e-3
underflow target per layer.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ._optimizers import (
    DEFAULT_OPTIMIZER,
    check_not_meta,
    OptimizerFactory,
    describe_optimizer,
    optimizer_factory,
    optimizer_settings,
    unwrap_optimizer,
)
from .formats import FloatFormat, FormatLike
from .noise import FP64RecomputationError, check_loss, numerically_zero_masks
from .monitor import HIST_MIN_LOG2, Columns, GradientMonitor, MonitorStats, thresholds

__all__ = [
    "DEFAULT_STEPS",
    "SCHEMA_VERSION",
    "COVERAGE",
    "SOURCE_NOTES",
    "Diagnosis",
    "FormatDiagnosis",
    "LayerDiagnosis",
    "ScaleInterval",
    "diagnose",
    "optimizer_factory",
    "recommend_scale",
    "underflow_count_at",
]

SCHEMA_VERSION = 1
DEFAULT_STEPS = 8
# Loss scales considered: powers of two that are normal FP32 numbers.
_LOG2_RANGE = (-126, 127)

SOURCE_NOTES = {
    "fp32": (
        "FP32 reference: the format columns say what rounding these FP32 gradients to each format WOULD do "
        "at the loss scale in use (scale 1 unless stated)"
    ),
    "emulated": (
        "emulated low-precision run: the gradients were already rounded, so the format columns describe "
        "already-rounded values; the emulation's rounding-site counters (what really underflowed) are under "
        "'emulation'"
    ),
}

# Which gradients each number covers (docs/diagnostics.md, "Which gradients each number covers").
COVERAGE = {
    "diagnosis": (
        "every parameter's gradient (as accumulated in .grad) and the gradient of every leaf module's output "
        "(Linear, GELU, LayerNorm, Dropout, ... alike), each element once per sampled step; fractions are over "
        "all of these elements, exact zeros included"
    ),
    "emulation": (
        "the emulation's rounding-site counters cover a different set: the gradients the emulated ops (GEMMs: "
        "linear, convolution, matmul, attention, RNN) round in backward, per site, before any accumulation; "
        "their underflow fraction is over the nonzero values entering a site. Parameters used outside GEMMs "
        "(embeddings, norms) and element-wise modules' output gradients are not among them, so the two "
        "fractions differ in numerator and denominator"
    ),
}


# ----------------------------------------------------------------------------------------------------------
# The functional core: from a histogram to a recommendation


def _zero_bin(fmt: FloatFormat) -> tuple[int, bool]:
    """Highest ceil(log2) bin that underflows to zero in fmt at scale 1, and whether that is exact."""
    t = thresholds(fmt).zero
    if t <= 0.0:
        return HIST_MIN_LOG2 - 1, True
    c = math.ceil(math.log2(t))
    return c, math.ldexp(1.0, c) == t


def underflow_count_at(hist: np.ndarray, fmt: FormatLike, log2_scale: int) -> float:
    """Number of nonzero finite values (histogram of ``ceil(log2|g|)`` from ``HIST_MIN_LOG2``) that round to 0
    in ``fmt`` once multiplied by ``2^log2_scale``.

    Exact for formats with subnormals, except for values in the lowest bin, which also holds every FP32
    subnormal (down to 2^-149): that bin counts as underflowing as soon as its smallest possible value would.
    For formats that flush subnormals the bin holding the threshold counts as underflowing. So the count is
    exact or an upper bound, never an underestimate.
    """
    fmt = FloatFormat.parse(fmt)
    z, _ = _zero_bin(fmt)
    h = np.asarray(hist)
    last = z - log2_scale - HIST_MIN_LOG2  # bins 0..last underflow
    count = float(h[1 : last + 1].sum()) if last >= 1 else 0.0
    if -149 + log2_scale <= z:  # the lowest bin's smallest possible member, 2^-149, would underflow
        count += float(h[0])
    return count


def _fits(max_abs: float, fmt: FloatFormat, log2_scale: int) -> bool:
    # max_abs is an FP32 value; times a power of two it is exact in FP64.
    return math.ldexp(max_abs, log2_scale) <= thresholds(fmt).finite


# ----------------------------------------------------------------------------------------------------------
# JSON codec derived from the dataclass fields (the nested types are read from the annotations), so that a
# new field is written and read back without touching to_dict/from_dict.


def _encode(value: Any) -> Any:
    """A field value as JSON-ready data: nested dataclasses through their ``to_dict``, mappings as dicts,
    tuples as lists, numpy scalars as Python numbers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return to_dict() if callable(to_dict) else _fields_to_dict(value)
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fields_to_dict(obj: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    skipped = set(skip)
    return {f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skipped}


def _decode(hint: Any, value: Any) -> Any:
    """JSON data back into the annotated type (dataclasses with a ``from_dict``, ``X | None``,
    ``Mapping[str, X]``, ``tuple[X, ...]``; anything else as it is)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _decode(inner, value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint.from_dict(value)  # type: ignore[attr-defined]
    if origin is not None and isinstance(value, Mapping):
        args = typing.get_args(hint)
        return {k: _decode(args[1], v) for k, v in value.items()} if len(args) == 2 else dict(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_decode(typing.get_args(hint)[0], v) for v in value)
    return value


def _fields_from_dict(cls: Any, d: Mapping[str, Any], given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Constructor arguments of the dataclass ``cls`` from ``d`` (its ``to_dict`` output): every field, decoded
    by its annotation; ``given`` supplies fields that ``to_dict`` writes elsewhere. A field missing from ``d``
    takes its default, or raises ValueError naming it when it has none."""
    if not isinstance(d, Mapping):
        raise TypeError(f"{cls.__name__}.from_dict: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = dict(given or {})
    for f in dataclasses.fields(cls):
        if f.name in out:
            continue
        if f.name in d:
            out[f.name] = _decode(hints[f.name], d[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{cls.__name__}.from_dict: missing field {f.name!r}")
    return out


@dataclasses.dataclass(frozen=True)
class ScaleInterval:
    """Power-of-two loss scales ``2^log2_min .. 2^log2_max`` (inclusive)."""

    log2_min: int
    log2_max: int

    def __post_init__(self) -> None:
        if self.log2_min > self.log2_max:
            raise ValueError(f"log2_min must be <= log2_max, got {self.log2_min} > {self.log2_max}")

    @property
    def min(self) -> float:
        return math.ldexp(1.0, self.log2_min)

    @property
    def max(self) -> float:
        return math.ldexp(1.0, self.log2_max)

    def __contains__(self, scale: object) -> bool:
        return isinstance(scale, (int, float)) and self.min <= scale <= self.max

    def to_dict(self) -> dict[str, float | int]:
        """The fields plus the scales themselves (``min``, ``max``), which :meth:`from_dict` ignores."""
        return {"min": self.min, "max": self.max, **_fields_to_dict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScaleInterval:
        return cls(**_fields_from_dict(cls, d))

    def __str__(self) -> str:
        return f"[2^{self.log2_min}, 2^{self.log2_max}]"


def recommend_scale(
    hist: np.ndarray,
    numel: float,
    max_abs: float,
    fmt: FormatLike,
    threshold: float,
    *,
    finite: bool = True,
    log2_range: tuple[int, int] = _LOG2_RANGE,
) -> ScaleInterval | None:
    """The power-of-two loss scales that keep ``underflow / numel <= threshold`` and nothing overflowing.

    Args:
        hist: counts of ``ceil(log2|g|)`` for nonzero finite gradients, bin 0 = ``HIST_MIN_LOG2``.
        numel: all gradient elements (zeros included): the denominator of the underflow fraction.
        max_abs: the largest finite ``|g|``.
        fmt: the format.
        threshold: largest acceptable underflow fraction.
        finite: False when some FP32 gradient was inf or NaN: no scale helps then (returns None).
        log2_range: exponents considered (default: scales that are normal FP32 numbers).

    Returns None when no scale does both. Pure function of its arguments.

    Example:
        >>> import numpy as np
        >>> from lossscale.diagnose import recommend_scale
        >>> from lossscale.monitor import HIST_MIN_LOG2
        >>> hist = np.zeros(255); hist[-30 - HIST_MIN_LOG2] = 10      # ten gradients in (2^-31, 2^-30]
        >>> str(recommend_scale(hist, 10, 2.0**-30, "fp16", 1e-3))  # 2^-30 * s must exceed 2^-25, stay <= 65504
        '[2^6, 2^45]'
    """
    fmt = FloatFormat.parse(fmt)
    if not finite or numel <= 0:
        return None
    lo_k, hi_k = log2_range
    lo = next(
        (k for k in range(lo_k, hi_k + 1) if underflow_count_at(hist, fmt, k) <= threshold * numel), None
    )
    hi = next((k for k in range(hi_k, lo_k - 1, -1) if _fits(max_abs, fmt, k)), None)
    if lo is None or hi is None or lo > hi:
        return None
    return ScaleInterval(lo, hi)


# ----------------------------------------------------------------------------------------------------------
# The result


def _frac(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def _opt_float(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


@dataclasses.dataclass(frozen=True)
class FormatDiagnosis:
    """The verdict for one format. Fractions are over all gradient elements of the sampled steps."""

    name: str
    underflow_fraction: float
    subnormal_fraction: float
    overflow_fraction: float
    needs_scaling: bool
    recommended_scale: ScaleInterval | None
    swamping_fraction: float | None
    weight: Mapping[str, float]
    activation: Mapping[str, float]
    recommendation: str
    recommended_scale_exact: bool = True
    # Per-layer scales (by module name, for lossscale.LayerwiseScaler) when no single scale fits, else None.
    layer_scales: Mapping[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every field but ``name`` (the key this entry is stored under in ``Diagnosis.formats``)."""
        return _fields_to_dict(self, skip=("name",))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str | None = None) -> FormatDiagnosis:
        """Inverse of :meth:`to_dict`; ``name`` (the entry's key) unless ``d`` holds one."""
        return cls(**_fields_from_dict(cls, d, None if name is None else {"name": name}))


@dataclasses.dataclass(frozen=True)
class LayerDiagnosis:
    """One monitored gradient: a parameter's (``kind="weight"``) or a leaf module output's
    (``kind="activation"``), summed over the sampled steps."""

    name: str
    kind: str
    numel: int
    zeros: int
    max_abs: float
    min_abs_nonzero: float | None
    formats: Mapping[str, Mapping[str, float | None]]
    numerically_zero: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _fields_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerDiagnosis:
        return cls(**_fields_from_dict(cls, d))


def _region_fractions(row: np.ndarray, cols: Columns, f: int) -> dict[str, float]:
    n = row[cols.NUMEL]
    return {
        "underflow_fraction": _frac(row[cols.underflow(f)], n),
        "subnormal_fraction": _frac(row[cols.subnormal(f)], n),
        "overflow_fraction": _frac(row[cols.overflow(f)], n),
    }


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` found; :meth:`to_dict` is the documented JSON shape (``docs/diagnostics.md``).

    Attributes:
        formats: per format name, the :class:`FormatDiagnosis`.
        layers: per monitored gradient, a :class:`LayerDiagnosis`.
        threshold: the acceptable underflow (and swamping) fraction.
        steps: sampled steps the statistics cover.
        source: ``"fp32"`` or ``"emulated"`` (see ``SOURCE_NOTES``).
        numel, zeros, nonfinite: over all gradient elements.
        numerically_zero: elements (of ``zeros``) whose FP32 gradient was rounding noise around an exact
            zero (:mod:`lossscale.noise`), counted as zeros rather than underflow.
        hist_weight, hist_activation: counts of ``ceil(log2|g|)`` from ``HIST_MIN_LOG2`` (nonzero finite).
        meta: run description (optimizer, torch version, device, ...).
    """

    formats: Mapping[str, FormatDiagnosis]
    layers: tuple[LayerDiagnosis, ...]
    threshold: float
    steps: int
    source: str
    numel: int
    zeros: int
    nonfinite: int
    max_abs: float
    hist_weight: np.ndarray
    hist_activation: np.ndarray
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    emulation: Mapping[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION
    numerically_zero: int = 0

    @property
    def hist(self) -> np.ndarray:
        return np.asarray(self.hist_weight + self.hist_activation)

    def format(self, name: FormatLike) -> FormatDiagnosis:
        return self.formats[FloatFormat.parse(name).name]

    @classmethod
    def from_stats(
        cls,
        stats: MonitorStats,
        *,
        threshold: float = 1e-3,
        meta: Mapping[str, Any] | None = None,
        numerically_zero: Mapping[str, int] | None = None,
    ) -> Diagnosis:
        """Summarise a monitor's totals (host-side numpy; no device work). ``numerically_zero``: per weight
        entry name, how many of its elements per sampled step were excluded as rounding noise (measured as
        zeros through the monitor's ``exclude``)."""
        _check_threshold(threshold)
        nz_per_step = dict(numerically_zero or {})
        cols = stats.columns
        everything = stats.kind_total(None)
        w_row = stats.kind_total("weight")
        a_row = stats.kind_total("activation")
        numel = everything[cols.NUMEL]
        nonfinite = int(everything[cols.INF] + everything[cols.NAN])
        hist = everything[cols.hist]
        max_abs = float(everything[cols.MAX_ABS])
        finite_max = max_abs if math.isfinite(max_abs) else 0.0
        formats: dict[str, FormatDiagnosis] = {}
        for f, fmt in enumerate(stats.formats):
            fr = _region_fractions(everything, cols, f)
            needs = fr["underflow_fraction"] > threshold
            interval = recommend_scale(hist, numel, finite_max, fmt, threshold, finite=nonfinite == 0)
            updated = w_row[cols.updated]
            swamp = _frac(w_row[cols.swamped(f)], updated) if updated > 0 else None
            layer_scales = _layer_scales(stats, fmt, threshold) if interval is None and nonfinite == 0 else None
            formats[fmt.name] = FormatDiagnosis(
                name=fmt.name,
                needs_scaling=needs,
                recommended_scale=interval,
                swamping_fraction=swamp,
                weight=_region_fractions(w_row, cols, f),
                activation=_region_fractions(a_row, cols, f),
                recommendation=_recommend_text(fmt, fr, needs, interval, swamp, threshold, nonfinite)
                + _layer_scales_text(layer_scales),
                layer_scales=layer_scales,
                recommended_scale_exact=bool(_zero_bin(fmt)[1] and hist[0] == 0),
                **fr,
            )
        layers = []
        for e, row in zip(stats.entries, stats.total, strict=False):
            per: dict[str, dict[str, float | None]] = {}
            for f, fmt in enumerate(stats.formats):
                d: dict[str, float | None] = dict(_region_fractions(row, cols, f))
                if e.kind == "weight":
                    upd = row[cols.updated]
                    d["swamping_fraction"] = _frac(row[cols.swamped(f)], upd) if upd > 0 else None
                per[fmt.name] = d
            layers.append(
                LayerDiagnosis(
                    name=e.name,
                    kind=e.kind,
                    numel=int(row[cols.NUMEL]),
                    zeros=int(row[cols.ZEROS]),
                    max_abs=float(row[cols.MAX_ABS]),
                    min_abs_nonzero=_opt_float(float(row[cols.MIN_ABS])),
                    formats=per,
                    numerically_zero=int(nz_per_step.get(e.name, 0)) * stats.sampled if e.kind == "weight" else 0,
                )
            )
        return cls(
            formats=formats,
            layers=tuple(layers),
            threshold=threshold,
            steps=stats.sampled,
            source=stats.source,
            numel=int(numel),
            zeros=int(everything[cols.ZEROS]),
            nonfinite=nonfinite,
            max_abs=max_abs,
            hist_weight=w_row[cols.hist].copy(),
            hist_activation=a_row[cols.hist].copy(),
            meta=dict(meta or {}),
            emulation=None
            if stats.emulation is None
            else {f"{site}|{fmt}": dict(v) for (site, fmt), v in stats.emulation.items()},
            numerically_zero=sum(x.numerically_zero for x in layers),
        )

    # -- output --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (schema_version 1; documented in docs/diagnostics.md)."""
        nz = np.nonzero(self.hist)[0]
        first = int(nz[0]) if nz.size else 0
        last = int(nz[-1]) + 1 if nz.size else 0
        out = _fields_to_dict(self, skip=("hist_weight", "hist_activation"))
        out["source_note"] = SOURCE_NOTES.get(self.source, "")
        out["covers"] = self.meta.get("covers", COVERAGE["diagnosis"])
        out["histogram"] = {
            "bins": "ceil(log2|g|): bin c counts nonzero finite gradients with 2^(c-1) < |g| <= 2^c",
            "first_log2": first + HIST_MIN_LOG2,
            "weight": [int(v) for v in self.hist_weight[first:last]],
            "activation": [int(v) for v in self.hist_activation[first:last]],
        }
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Diagnosis:
        """Rebuild from :meth:`to_dict` output (as read back from ``diagnosis.json``). Fields are read by their
        annotations; the histogram (stored trimmed to its nonzero bins) is expanded to the full bin range."""
        if not isinstance(d, Mapping):
            raise TypeError(f"Diagnosis.from_dict: expected a mapping, got {type(d).__name__}")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"schema_version must be {SCHEMA_VERSION}, got {d.get('schema_version')!r}")
        from .monitor import HIST_MAX_LOG2

        if "histogram" not in d:
            raise ValueError("Diagnosis.from_dict: missing field 'histogram'")
        nb = HIST_MAX_LOG2 - HIST_MIN_LOG2 + 1
        h = d["histogram"]
        off = int(h["first_log2"]) - HIST_MIN_LOG2
        hw, ha = np.zeros(nb), np.zeros(nb)
        hw[off : off + len(h["weight"])] = h["weight"]
        ha[off : off + len(h["activation"])] = h["activation"]
        formats = {name: FormatDiagnosis.from_dict(f, name) for name, f in d.get("formats", {}).items()}
        given = {"formats": formats, "hist_weight": hw, "hist_activation": ha}
        return cls(**_fields_from_dict(cls, d, given))

    def _zero_note(self) -> list[str]:
        if not self.numerically_zero:
            return []
        names = [x.name for x in self.layers if x.numerically_zero]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        return [
            "",
            f"*Numerically zero:* {self.numerically_zero:,} gradient elements ({shown}) are rounding noise "
            "around an exact zero (their FP64 recomputation is at least 1024x smaller than the FP32 value, "
            "e.g. an attention key bias, to which softmax is invariant): counted as zeros, not as underflow.",
        ]

    def swamping_basis(self) -> str:
        """What the swamping figures assume: the optimizer that made the updates (from ``meta``)."""
        desc = self.meta.get("optimizer_description") or self.meta.get("optimizer")
        if desc:
            return (
                f"the swamping column counts the weight updates of {desc}; another optimizer or learning "
                "rate makes updates of other sizes and swamps a different share."
            )
        if self.meta.get("updates"):
            return f"the swamping column counts the weight updates given ({self.meta['updates']})."
        return "no weight updates were measured, so swamping is n/a."

    def to_markdown(self) -> str:
        """A human-readable report: the verdict per format, then the layers with the most underflow."""
        lines = [
            "# Gradient diagnosis",
            "",
            f"*Source: {SOURCE_NOTES.get(self.source, self.source)}.* "
            f"{self.steps} sampled steps, {self.numel:,} gradient elements ({self.zeros:,} exactly zero in FP32"
            + (f", {self.nonfinite:,} inf/NaN" if self.nonfinite else "")
            + f"), threshold {self.threshold:g}.",
            "",
            f"*What is counted:* {self.meta.get('covers', COVERAGE['diagnosis'])}.",
            *self._zero_note(),
            "",
            "| format | underflow | subnormal | overflow | needs scaling | recommended scale | swamping |",
            "|---|---:|---:|---:|---|---|---:|",
        ]
        for name, fd in self.formats.items():
            rs = "none" if fd.recommended_scale is None else str(fd.recommended_scale)
            sw = "n/a" if fd.swamping_fraction is None else f"{fd.swamping_fraction:.3%}"
            lines.append(
                f"| {name} | {fd.underflow_fraction:.3%} | {fd.subnormal_fraction:.3%} | "
                f"{fd.overflow_fraction:.3%} | {'yes' if fd.needs_scaling else 'no'} | {rs} | {sw} |"
            )
        lines += ["", f"*Swamping:* {self.swamping_basis()}"]
        lines += ["", "## Recommendations", ""]
        lines += [f"- **{name}**: {fd.recommendation}" for name, fd in self.formats.items()]
        lines += ["", "## Layers (underflow fraction at scale 1)", ""]
        names = list(self.formats)
        lines.append("| layer | kind | elements | max abs | min nonzero abs | " + " | ".join(names) + " |")
        lines.append("|---|---|---:|---:|---:|" + "---:|" * len(names))
        for layer in self.layers:
            mn = "-" if layer.min_abs_nonzero is None else f"{layer.min_abs_nonzero:.3g}"
            if layer.numerically_zero:
                mn += f" ({layer.numerically_zero:,} numerically zero)"
            cells = " | ".join(f"{float(layer.formats[n]['underflow_fraction'] or 0.0):.3%}" for n in names)
            lines.append(
                f"| {layer.name} | {layer.kind} | {layer.numel:,} | {layer.max_abs:.3g} | {mn} | {cells} |"
            )
        if self.emulation:
            lines += ["", "## Emulation rounding-site counters (what the emulated run really rounded)", ""]
            lines += [f"*Not the same gradients as above:* {COVERAGE['emulation']}.", ""]
            lines.append("| site | format | elements | underflow | overflow |")
            lines.append("|---|---|---:|---:|---:|")
            for key, v in self.emulation.items():
                site, _, fmt = key.rpartition("|")
                lines.append(f"| {site} | {fmt} | {v['elements']:,} | {v['underflow']:,} | {v['overflow']:,} |")
        return "\n".join(lines) + "\n"


def _layer_scales(stats: MonitorStats, fmt: FloatFormat, threshold: float) -> dict[str, float] | None:
    """Per-layer scales from the activation gradients' histograms (lossscale.layerwise's adaptive rule)."""
    from .layerwise import recommend_layer_scales_from_histograms

    cols = stats.columns
    rows = [
        (e.name, row[cols.hist], float(row[cols.NUMEL]), float(row[cols.MAX_ABS]))
        for e, row in zip(stats.entries, stats.total, strict=False)
        if e.kind == "activation"
    ]
    scales = recommend_layer_scales_from_histograms(rows, HIST_MIN_LOG2, fmt, underflow_prob=min(threshold, 0.25))
    return scales or None


def _layer_scales_text(scales: Mapping[str, float] | None) -> str:
    if not scales:
        return ""
    logs = [round(math.log2(v)) for v in scales.values()]
    return (
        f" Per-layer scales that fit (lossscale.LayerwiseScaler, the layer_scales field) span 2^{min(logs)} .. "
        f"2^{max(logs)} over {len(logs)} layers."
    )


def _clamp(k: int, interval: ScaleInterval) -> int:
    return min(max(k, interval.log2_min), interval.log2_max)


def _recommend_text(
    fmt: FloatFormat,
    fr: Mapping[str, float],
    needs: bool,
    interval: ScaleInterval | None,
    swamp: float | None,
    threshold: float,
    nonfinite: int,
) -> str:
    parts: list[str] = []
    u = fr["underflow_fraction"]
    if nonfinite:
        parts.append(
            f"{nonfinite} FP32 gradient values are inf or NaN: no loss scale helps; fix the model or data first."
        )
    elif interval is None:
        parts.append(
            f"{u:.3%} of gradients underflow at scale 1 and no single power-of-two loss scale keeps underflow "
            f"<= {threshold:g} without overflow: the gradients span more binades than {fmt.name} holds; use "
            "per-layer (adaptive) loss scaling or a format with more exponent bits (bf16)."
        )
    elif needs:
        parts.append(
            f"loss scaling needed ({u:.3%} of gradients underflow at scale 1): a static scale in {interval} "
            "keeps underflow within the threshold with no overflow"
            + (
                "; dynamic scaling starting at 2^16 is inside it."
                if 16 in range(interval.log2_min, interval.log2_max + 1)
                else f"; with dynamic scaling, start inside it (e.g. 2^{_clamp(16, interval)})."
            )
        )
    elif fr["overflow_fraction"] > 0:
        parts.append(
            f"{fr['overflow_fraction']:.3%} of gradients overflow at scale 1: scale the loss down, into {interval}."
        )
    else:
        parts.append(f"no loss scaling needed (underflow {u:.3%} <= {threshold:g}, no overflow).")
    if swamp is not None and swamp > threshold:
        parts.append(
            f"{swamp:.2%} of nonzero weight updates would be lost with {fmt.name} weights: keep FP32 master "
            "weights or use a compensated optimizer (Kahan summation or stochastic rounding; Zamirai et al. 2020)."
        )
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# The driver


def _check_threshold(threshold: object) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be a float in [0, 1), got {threshold!r}")


def _batches(batches: Iterable[Any], steps: int) -> Iterable[Any]:
    """``steps`` batches, cycling over a re-iterable collection that has fewer."""
    got = 0
    while got < steps:
        it = iter(batches)
        fresh = 0
        for b in itertools.islice(it, steps - got):
            fresh += 1
            got += 1
            yield b
        if fresh == 0:
            if got == 0:
                raise ValueError("batches must yield at least one batch")
            return
        if it is batches:  # a one-shot iterator: it is exhausted
            return


def diagnose(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    formats: Iterable[FormatLike] | str = ("bf16", "fp16", "e5m2"),
    steps: int = DEFAULT_STEPS,
    threshold: float = 1e-3,
    optimizer: OptimizerFactory | str | None = None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    activations: bool = True,
    zero_check: bool = True,
    progress: Callable[[int, int], None] | None = None,
    recipes: Iterable[str] | None = None,
    recipe_steps: int = 200,
) -> Diagnosis:
    """Train a copy of ``model`` in FP32 for ``steps`` steps, measuring every gradient, and judge each format.

    Algorithm::

        reference = deepcopy(model).float();  opt = optimizer(reference.parameters())
        monitor = GradientMonitor(reference, formats, every=1, optimizer=opt)
        repeat steps times:  loss_fn(reference, next batch).backward();  opt.step();  zero_grad
        return Diagnosis.from_stats(monitor.read(), threshold)        # the only host sync

    Args:
        model: left unchanged (a deep copy is trained).
        loss_fn: ``loss_fn(model, batch) -> scalar loss tensor``.
        batches: an iterable of batches; cycled when it holds fewer than ``steps`` (if re-iterable).
        formats: formats to judge (default bf16, fp16, e5m2).
        steps: training steps measured (default ``DEFAULT_STEPS`` = 8: seconds on a small model).
        threshold: acceptable underflow fraction (default 1e-3, the Adaptive Loss Scaling target).
        optimizer: the optimizer of the steps; swamping depends on it (the update size decides
            whether ``w + u`` rounds back to ``w``), so pass the one you train with: a factory
            ``params -> torch.optim.Optimizer`` (a wrapped one, accelerate's or Lightning's, is unwrapped),
            or a ``torch.optim`` class name (``"adamw"``) built with ``optimizer_kwargs``. Default
            ``torch.optim.SGD(params, lr=0.01)``. The report names the optimizer it ran
            (``meta["optimizer_description"]``).
        optimizer_kwargs: keyword arguments for a named optimizer (``{"lr": 1e-4}``).
        activations: also measure activation gradients (leaf module outputs).
        zero_check: before the steps, recompute the first batch's weight gradients in FP32 and FP64 and
            count the elements whose FP32 value is rounding noise around an exact zero (e.g. an attention
            key bias) as zeros, not underflow (:mod:`lossscale.noise`; reported as ``numerically_zero``).
            When the model cannot run in FP64 this warns and goes on without it.
        progress: called as ``progress(done, steps)`` after each step.
        recipes: also run the recipe advisor (:func:`lossscale.recipe_advisor.diagnose_recipes`) for these
            recipes (e.g. ``["fp8-delayed", "mxfp8", "nvfp4"]``), ``recipe_steps`` steps each; its report's
            ``to_dict()`` lands in ``meta["recipes"]`` (the batches are materialised once for both).

    Example:
        >>> import torch
        >>> from lossscale import diagnose
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        >>> data = [(torch.randn(32, 8), torch.randint(0, 2, (32,))) for _ in range(2)]
        >>> loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        >>> d = diagnose(model, loss_fn, data, steps=4)
        >>> d.format("fp16").needs_scaling, d.format("bf16").underflow_fraction
        (False, 0.0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    _check_threshold(threshold)
    if isinstance(optimizer, str):
        optimizer = optimizer_factory(optimizer, **dict(optimizer_kwargs or {}))
    elif optimizer_kwargs:
        raise ValueError("optimizer_kwargs needs optimizer given by name (e.g. optimizer='adamw')")
    if optimizer is not None and not callable(optimizer):
        raise TypeError(
            "optimizer must be a callable params -> torch.optim.Optimizer, a torch.optim class name, or None"
        )

    check_not_meta(model)
    if recipes is not None:
        batches = list(itertools.islice(iter(batches), max(steps, recipe_steps)))
    reference = copy.deepcopy(model).float().train()
    params = [p for p in reference.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad")
    if optimizer is None:
        optimizer = optimizer_factory(DEFAULT_OPTIMIZER[0], **DEFAULT_OPTIMIZER[1])
    opt = unwrap_optimizer(optimizer(params))
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
    monitor: GradientMonitor | None = None
    zero_note = "off"
    masks: dict[str, torch.Tensor] = {}
    done = 0
    try:
        for batch in _batches(batches, steps):
            if monitor is None:  # built at the first batch, which the numerically-zero check needs
                if zero_check:
                    masks, zero_note = _zero_masks(reference, loss_fn, batch)
                monitor = GradientMonitor(
                    reference, formats, every=1, optimizer=opt, activations=activations, history=1, exclude=masks
                )
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(reference, batch)
            check_loss(loss)
            loss.reshape(()).backward()  # type: ignore[no-untyped-call]
            opt.step()
            monitor.step()
            done += 1
            if progress is not None:
                progress(done, steps)
        if monitor is None:
            raise ValueError("batches must yield at least one batch")
        stats = monitor.read()
    finally:
        if monitor is not None:
            monitor.remove()
    meta = {
        "optimizer": type(opt).__name__,
        "optimizer_defaults": optimizer_settings(opt),
        "optimizer_description": describe_optimizer(opt),
        "formats": [f.name for f in monitor.formats],
        "steps_requested": steps,
        "activations": activations,
        "covers": COVERAGE["diagnosis"]
        if activations
        else COVERAGE["diagnosis"].split(" and the gradient of every leaf")[0]
        + " (activation gradients not measured: activations=False), each element once per sampled step",
        "numerically_zero_check": zero_note,
        "torch_version": torch.__version__,
        "device": str(params[0].device),
    }
    per_step = {name: int(m.sum()) for name, m in masks.items()}
    if recipes is not None:
        from .recipe_advisor import diagnose_recipes  # the advisor sits beside diagnose; imported on demand

        meta["recipes"] = diagnose_recipes(
            model, loss_fn, batches, recipes=list(recipes), steps=recipe_steps, optimizer=optimizer
        ).to_dict()
    return Diagnosis.from_stats(stats, threshold=threshold, meta=meta, numerically_zero=per_step)


def _zero_masks(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any
) -> tuple[dict[str, torch.Tensor], str]:
    """The numerically-zero masks of :mod:`lossscale.noise`, or none with a warning when the model cannot be
    recomputed in FP64."""
    try:
        masks = numerically_zero_masks(model, loss_fn, batch)
    except FP64RecomputationError as err:  # the model cannot run in FP64: say so and go on without the check
        note = f"skipped: the FP64 recomputation failed ({err})"
        warnings.warn(
            f"diagnose: numerically-zero check {note}; gradients that are FP32 rounding noise will be counted "
            "as underflow. Pass zero_check=False to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return {}, note
    return masks, f"on: {sum(int(m.sum()) for m in masks.values())} elements per step in {len(masks)} parameters"
