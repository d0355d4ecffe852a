"""Grouping of per-tensor work into buckets that one foreach call can take."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

from ..formats import FP32, FloatFormat, FormatLike
from .compensation import Compensation, resolve_compensation, weight_format_of

__all__ = ["Bucket", "bucketize", "GeneratorLike", "generator_for", "split_rows", "bunch", "column"]

GeneratorLike = torch.Generator | Callable[[torch.device], torch.Generator] | None


@dataclass(frozen=True)
class Bucket:
    """Tensors that share device, weight dtype, weight format, compensation and state dtype."""

    indices: tuple[int, ...]
    device: torch.device
    fmt: FloatFormat
    compensation: Compensation
    torch_exact: bool  # FP32 weights, FP32 states, no compensation: torch.optim's own arithmetic


def bucketize(
    params: Sequence[Tensor],
    state_dtypes: Sequence[torch.dtype],
    weight_format: FormatLike | None,
    compensation: str | None,
) -> list[Bucket]:
    """Split ``params`` by (device, dtype, weight format, compensation, state dtype), keeping their order.

    ``state_dtypes`` gives each parameter's state dtype. Raises on parameters whose dtype or format is not
    allowed. No sync.
    """
    groups: dict[tuple[object, ...], list[int]] = {}
    meta: dict[tuple[object, ...], tuple[torch.device, FloatFormat, Compensation, bool]] = {}
    for i, p in enumerate(params):
        fmt = weight_format_of(p, weight_format)
        comp = resolve_compensation(compensation, fmt)
        state_dtype = state_dtypes[i]
        key = (p.device, p.dtype, fmt, comp, state_dtype)
        groups.setdefault(key, []).append(i)
        exact = p.dtype == torch.float32 and fmt == FP32 and comp == "none" and state_dtype == torch.float32
        meta[key] = (p.device, fmt, comp, exact)
    return [Bucket(tuple(idx), *meta[key]) for key, idx in groups.items()]


def generator_for(generator: GeneratorLike, device: torch.device) -> torch.Generator | None:
    """The generator to use on ``device``: a fixed one, one from a per-device factory, or None (global)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return generator(device)


# Elements per cache block. The compensated updates run 10-20 element-wise passes with temporaries; doing
# them block by block keeps the temporaries in cache, so only the weights, gradients and states travel to
# and from memory (one read and one write each), while each foreach call still takes enough elements that
# torch's per-call dispatch cost stays small. Measured with benchmarks/optimizers.py-style runs (10M
# parameters, 2 threads, AMD EPYC with AVX512-BF16, 2026-12-02): the FP32-temporaries paths were fastest at
# 2^18 of 2^16..2^20 (Kahan FP32 states 86 ms at 2^18, 169 ms at 2^16, 320 ms at 2^20, on a noisy machine);
# the all-BF16 Kahan path (half the bytes per temporary, fewer passes) at 2^20 (0.84x torch-optimi's step
# against 1.08x at 2^18 and 1.63x at 2^16 on a quiet machine). Multiples of every SIMD width, so blocks keep
# the alignment of whole tensors and give the same bits (see test_cache_blocks_give_same_bits).
CHUNK = 1 << 18
CHUNK_NATIVE = 1 << 20

R = TypeVar("R", bound=NamedTuple)


def split_rows(rows: Sequence[R], chunkable: Sequence[bool], chunk: int | None = None) -> list[tuple[int, R]]:
    """Cut each row of same-shaped tensors (a parameter and its state, a NamedTuple whose fields are tensors
    or None) into flat pieces of <= ``chunk`` elements.

    Pieces are views (in-place updates reach the originals). Rows with a non-contiguous tensor, or marked
    not ``chunkable``, stay whole. Order: row by row, piece by piece. No sync.
    """
    chunk = CHUNK if chunk is None else chunk
    out: list[tuple[int, R]] = []
    for i, row in enumerate(rows):
        tensors = [t for t in row if t is not None]
        n = tensors[0].numel()
        if not chunkable[i] or n <= chunk or not all(t.is_contiguous() for t in tensors):
            out.append((i, row))
            continue
        flat = [None if t is None else t.view(-1) for t in row]
        for start in range(0, n, chunk):
            out.append((i, row._make([None if t is None else t[start : start + chunk] for t in flat])))
    return out


def bunch(pieces: list[tuple[int, R]], chunk: int | None = None) -> list[list[tuple[int, R]]]:
    """Group consecutive pieces into bunches of about ``chunk`` elements, one foreach call each."""
    chunk = CHUNK if chunk is None else chunk
    out: list[list[tuple[int, R]]] = []
    cur: list[tuple[int, R]] = []
    size = 0
    for piece in pieces:
        first = next(t for t in piece[1] if t is not None)
        if cur and size + first.numel() > chunk:
            out.append(cur)
            cur, size = [], 0
        cur.append(piece)
        size += first.numel()
    if cur:
        out.append(cur)
    return out


def column(group: Sequence[tuple[int, NamedTuple]], field: str) -> list[Tensor]:
    """The tensors of one field of a bunch's rows, skipping rows where the field is None."""
    return [t for _, row in group if (t := getattr(row, field)) is not None]
