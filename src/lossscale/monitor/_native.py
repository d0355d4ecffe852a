"""The monitor's fused CPU kernels (``_native.c``): built with the system C compiler on first use, loaded
with ctypes, and used for contiguous FP32 CPU tensors. Results are identical to the tensor path
(:mod:`lossscale.monitor._kernel`); only the speed differs.

The shared library is cached under ``$LOSSSCALE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lossscale`` or
``~/.cache/lossscale``), named by a hash of the source, the compiler and the platform, and written atomically
(a temporary file renamed into place), so concurrent first uses (the study's worker processes) are safe.
Without a C compiler, or with ``LOSSSCALE_NATIVE=0``, the tensor path runs instead and one
:class:`PerformanceWarning` says so (``GradientMonitor(every=1)`` then costs about twice a training step).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..formats import FloatFormat

__all__ = ["PerformanceWarning", "library", "hist", "swamp", "native_formats", "round_ieee"]

_SOURCE = Path(__file__).with_name("_native.c")
_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99", "-fno-fast-math")


class PerformanceWarning(UserWarning):
    """lossscale runs a slower path than it could (the results are the same)."""


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    env = os.environ.get("LOSSSCALE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lossscale"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cc: str) -> Path:
    src = _SOURCE.read_bytes()
    tag = hashlib.sha256(src + repr((cc, _FLAGS, platform.machine(), sys.platform)).encode()).hexdigest()[:16]
    suffix = ".dll" if sys.platform == "win32" else ".dylib" if sys.platform == "darwin" else ".so"
    folder = _cache_dir()
    target = folder / f"monitor_{tag}{suffix}"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".monitor_", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise OSError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (no compiler, a failed build, or ``LOSSSCALE_NATIVE=0``: the tensor path
    runs, with one :class:`PerformanceWarning` unless disabled on purpose). Built once per process."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("LOSSSCALE_NATIVE", "1") == "0":
                return None
            cc = _compiler()
            if cc is None:
                raise OSError("no C compiler found (looked for $CC, cc, gcc, clang)")
            lib = ctypes.CDLL(str(_build(cc)))
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
            lib.ls_hist.argtypes = [i64, p, p, p, p, p, p, i32, i64, p, p, p, p]
            lib.ls_hist.restype = None
            lib.ls_swamp.argtypes = [i64, p, p, p, p, i32, p, p, p, p, p]
            lib.ls_swamp.restype = None
            lib.ls_round_ieee.argtypes = [p, p, i64, i32, ctypes.c_float, ctypes.c_float, ctypes.c_float]
            lib.ls_round_ieee.restype = None
            _lib = lib
        except (OSError, subprocess.SubprocessError) as err:
            warnings.warn(
                f"lossscale.GradientMonitor: the fused CPU kernel is unavailable ({err}); counting with torch "
                "ops instead (same results, slower: set CC to a C compiler to enable it, or LOSSSCALE_NATIVE=0 "
                "to silence this)",
                PerformanceWarning,
                stacklevel=2,
            )
            _lib = None
        finally:
            _tried = True
        return _lib


def _reset_for_tests() -> None:
    global _lib, _tried
    with _lock:
        _lib, _tried = None, False


def usable(t: torch.Tensor) -> bool:
    """A tensor the kernels can read in place: contiguous FP32 on the CPU."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _ptrs(tensors: Sequence[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _i64(values: Sequence[int]) -> ctypes.Array[ctypes.c_int64]:
    return (ctypes.c_int64 * len(values))(*values)


def hist(
    lib: ctypes.CDLL, pieces: Sequence[tuple[int, torch.Tensor]], lut: torch.Tensor, k_tables: int,
    edge_pairs: Sequence[tuple[int, int]], stride: int, counts: torch.Tensor, mx: torch.Tensor, mn: torch.Tensor,
) -> None:
    """Add the pieces (row, contiguous FP32 CPU tensor) into the raw accumulators (all CPU, contiguous:
    ``counts`` int64 ``[rows, stride]``, ``mx``/``mn`` int32 ``[rows]``, ``lut`` int32 ``[k_tables, 257]``;
    ``edge_pairs``: the same edges as (edge pattern, top pattern of its binade), see ``_kernel._Tables``)."""
    tensors = [t for _, t in pieces]
    scratch = torch.empty(4 * stride, dtype=torch.int64)
    edges, tops = edge_arrays(edge_pairs)
    lib.ls_hist(len(tensors), _ptrs(tensors), _i64([t.numel() for t in tensors]), _i64([r for r, _ in pieces]),
                edges, tops, lut.data_ptr() if k_tables else None, k_tables, stride, counts.data_ptr(),
                mx.data_ptr(), mn.data_ptr(), scratch.data_ptr())


MAX_EDGES = 16  # as in _native.c
_NO_EDGE = 0x7FFFFFFF


def edge_arrays(edge_pairs: Sequence[tuple[int, int]]) -> tuple[Any, Any]:
    """(edge, top of its binade) patterns as the kernel's padded arrays, or (None, None) when there are more
    than MAX_EDGES (the kernel then reads the lookup tables)."""
    if len(edge_pairs) > MAX_EDGES:
        return None, None
    pairs = list(edge_pairs) + [(_NO_EDGE, _NO_EDGE)] * (MAX_EDGES - len(edge_pairs))
    return (ctypes.c_uint32 * MAX_EDGES)(*(e for e, _ in pairs)), (ctypes.c_uint32 * MAX_EDGES)(*(t for _, t in pairs))


def native_formats(formats: Sequence[FloatFormat]) -> bool:
    """Formats whose rounding the swamping kernel computes: IEEE-style (inf and NaN), with subnormals,
    fewer than 23 mantissa bits (bf16, fp16, e5m2 and custom ones like them); others take the tensor path."""
    return len(formats) <= 16 and all(
        f.nonfinite == "ieee" and f.subnormals and f.mantissa_bits < 23 and f.exponent_bits <= 8
        and f.emin - f.mantissa_bits + 23 >= -126  # the subnormal rounding constant is a normal FP32 number
        for f in formats
    )


def _sub_magic(fmt: FloatFormat) -> float:
    """2^(emin - m + 23): adding it rounds a value below min_normal to fmt's subnormal grid (see _native.c)."""
    return math.ldexp(1.0, fmt.emin - fmt.mantissa_bits + 23)


def _fmt_args(formats: Sequence[FloatFormat]) -> tuple[ctypes.Array, ...]:  # type: ignore[type-arg]
    n = len(formats)
    return (
        (ctypes.c_int32 * n)(*(f.mantissa_bits for f in formats)),
        (ctypes.c_float * n)(*(_sub_magic(f) for f in formats)),
        (ctypes.c_float * n)(*(f.min_normal for f in formats)),
        (ctypes.c_float * n)(*(f.max for f in formats)),
    )


def swamp(
    lib: ctypes.CDLL, olds: Sequence[torch.Tensor], news: Sequence[torch.Tensor], rows: Sequence[int],
    formats: Sequence[FloatFormat], out: torch.Tensor,
) -> None:
    """Add the swamping counts of each (old, new) pair of contiguous FP32 CPU tensors into row ``rows[i]``
    of ``out`` (int64 ``[n_rows, 1 + len(formats)]``, contiguous)."""
    mant, emin, min_normal, maxv = _fmt_args(formats)
    lib.ls_swamp(len(olds), _ptrs(olds), _ptrs(news), _i64([t.numel() for t in olds]), _i64(rows), len(formats),
                 mant, emin, min_normal, maxv, out.data_ptr())


def round_ieee(lib: ctypes.CDLL, x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The swamping kernel's rounding of ``x`` (contiguous FP32 CPU) to ``fmt`` (NaN kept), for the tests."""
    y = torch.empty_like(x)
    lib.ls_round_ieee(x.data_ptr(), y.data_ptr(), x.numel(), fmt.mantissa_bits, _sub_magic(fmt), fmt.min_normal,
                      fmt.max)
    return y
