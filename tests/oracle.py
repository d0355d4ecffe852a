"""Test oracles, written independently of the code they check.

* A brute-force rounding oracle: enumerate every value of a format and pick the nearest (ties to even).
  Independent of lossscale.quantize: it uses only FloatFormat.decode (itself checked against ml_dtypes and
  torch.finfo in test_formats.py) and float64 arithmetic whose differences are exact (Sterbenz lemma: the
  two neighbours lo <= |x| <= hi are within a factor of two of |x|, or lo is 0 and |x| - 0 is exact).
* :func:`update_scale_py`: the loss-scaling rule in plain Python numbers, written from the rule in
  ``lossscale.scaling``'s docstring, to check ``lossscale.scaling.update_scale`` (tensors) against.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from lossscale import FloatFormat
from lossscale.scaling import SCALE_FLOOR, DynamicScaling, PyScalingState, ScalingConfig


@functools.lru_cache(maxsize=None)
def _table(fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    """Sorted non-negative finite values (with subnormals) and whether each has an even pattern, plus the
    virtual value one step past max (its pattern's parity decides the overflow tie)."""
    full = FloatFormat(fmt.exponent_bits, fmt.mantissa_bits, fmt.nonfinite, True)
    half = 1 << (fmt.bits - 1)
    vals, even = [], []
    for b in range(half):
        v = full.decode(b)
        if math.isfinite(v):
            vals.append(v)
            even.append(b % 2 == 0)
    max_bits = full.encode(full.max)
    assert max_bits is not None
    next_val = math.ldexp(1.0, full.emax + 1) if fmt.nonfinite != "nan" else (
        full.max + math.ldexp(1.0, full.emax - full.mantissa_bits)
    )
    vals.append(next_val)
    even.append((max_bits + 1) % 2 == 0)
    order = np.argsort(vals)
    return np.asarray(vals, dtype=np.float64)[order], np.asarray(even)[order]


def round_nearest(x: np.ndarray, fmt: FloatFormat, saturate: bool = False) -> np.ndarray:
    """Round float64 (or float32) values to fmt; returns float64."""
    x = np.asarray(x, dtype=np.float64)
    vals, even = _table(fmt)
    a = np.abs(x)
    finite = np.isfinite(a)
    a_f = np.where(finite, a, 0.0)
    idx = np.clip(np.searchsorted(vals, a_f, side="right") - 1, 0, len(vals) - 2)
    lo, hi = vals[idx], vals[idx + 1]
    d_lo, d_hi = a_f - lo, hi - a_f
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ~even[idx])
    r = np.where(pick_hi, hi, lo)
    beyond = a_f >= vals[-1]  # at or past the virtual value: overflow
    overflow = (pick_hi & (idx + 1 == len(vals) - 1)) | beyond | np.isinf(a)
    if fmt.nonfinite == "ieee" and not saturate:
        special = np.inf
    elif fmt.nonfinite == "nan" and not saturate:
        special = np.nan
    else:
        special = fmt.max
    r = np.where(overflow, special, r)
    if not fmt.subnormals:
        r = np.where(r < fmt.min_normal, 0.0, r)
    r = np.where(np.isnan(x), np.nan, r)
    return np.copysign(r, x)


def neighbours(x: np.ndarray, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    """The representable values just below and just above |x| (equal when |x| is representable), signed."""
    x = np.asarray(x, dtype=np.float64)
    vals, _ = _table(fmt)
    a = np.abs(x)
    idx = np.clip(np.searchsorted(vals, a, side="right") - 1, 0, len(vals) - 2)
    lo = vals[idx]
    hi = np.where(vals[idx] == a, vals[idx], vals[idx + 1])
    return np.copysign(lo, x), np.copysign(hi, x)


# ----------------------------------------------------------------------------------------------------------
# The loss-scaling rule in Python numbers


def _fp32(x: float) -> float:
    """Round a float64 to the nearest FP32 value (numpy's cast; overflow gives inf as a C++ cast does)."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def update_scale_py(state: PyScalingState, found_inf: bool, config: ScalingConfig) -> PyScalingState:
    """One step of the rule in ``lossscale.scaling``'s docstring, on Python numbers (the scale held as an
    FP32 value in a float; products formed in float64 and rounded once to FP32).

    Example:
        >>> from lossscale.scaling import init_state_py
        >>> cfg = DynamicScaling(init_scale=4.0, growth_interval=2)
        >>> s = init_state_py(cfg)
        >>> scales = []
        >>> for bad in [False, False, False, True, False, False]:
        ...     s = update_scale_py(s, bad, cfg)
        ...     scales.append(s.scale)
        >>> scales
        [4.0, 8.0, 8.0, 4.0, 4.0, 8.0]
    """
    steps = state.steps + 1
    if found_inf:
        consecutive, skipped = state.consecutive_skips + 1, state.skipped_steps + 1
    else:
        consecutive, skipped = 0, state.skipped_steps
    if not isinstance(config, DynamicScaling):
        return dataclasses.replace(state, consecutive_skips=consecutive, skipped_steps=skipped, steps=steps)

    scale = state.scale
    hyst = state.hysteresis_tracker
    if found_inf:
        tracker = 0
        if hyst <= 0:
            backed = _fp32(scale * config.backoff_factor)
            if config.min_scale is not None:
                backed = min(max(backed, _fp32(config.min_scale)), scale)
            scale = backed
        hyst = max(hyst - 1, 0)
    else:
        tracker = state.growth_tracker + 1
        if config.consecutive_hysteresis:
            hyst = config.hysteresis - 1
        if tracker >= config.growth_interval:
            grown = _fp32(scale * config.growth_factor)
            if math.isfinite(grown):
                scale = grown if config.max_scale is None else max(min(grown, _fp32(config.max_scale)), scale)
            tracker = 0
            hyst = config.hysteresis - 1
    return PyScalingState(
        scale=max(scale, SCALE_FLOOR),
        growth_tracker=tracker,
        hysteresis_tracker=hyst,
        consecutive_skips=consecutive,
        skipped_steps=skipped,
        steps=steps,
    )
