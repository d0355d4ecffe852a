"""Brute-force rounding oracle: enumerate every value of a format and pick the nearest (ties to even).

Independent of lossscale.quantize: it uses only FloatFormat.decode (itself checked against ml_dtypes and
torch.finfo in test_formats.py) and float64 arithmetic whose differences are exact (Sterbenz lemma: the
two neighbours lo <= |x| <= hi are within a factor of two of |x|, or lo is 0 and |x| - 0 is exact).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from lossscale import FloatFormat


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
