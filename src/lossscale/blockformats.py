"""Block-scaled number formats: OCP Microscaling (MX) and NVIDIA's NVFP4.

A block format stores a tensor as blocks of ``block_size`` consecutive elements along one dimension; each
block shares one scale ``X`` and each element is a narrow float ``P_i``, so that the block means
``v_i = X * P_i``:

    MX (OCP Microscaling Formats v1.0, section 5 and 6.3): X = 2^e is an E8M0 byte (an exponent only,
        bias 127, e in -127..127, byte 255 = NaN), blocks of 32, elements E4M3/E5M2/E2M3/E3M2/E2M1.
        scale_mode "floor" (the spec):  e = floor(log2(amax)) - emax(element)
        scale_mode "rceil" (NVIDIA's cuBLAS/Blackwell rule): e = ceil(log2(fp32(amax / max(element))))
        where amax is the block's largest magnitude; e is clamped to -127..127 (an all-zero block gets
        e = -127). The elements are round-to-nearest-even(v_i / X), saturated to +-max(element) (under
        "floor" amax / X may exceed the element's max: the top values saturate, as the spec says).
    NVFP4 (NVIDIA, "Pretraining LLMs with NVFP4", arXiv:2509.25149; the cuBLAS block-scaling docs): blocks of
        16 E2M1 elements, each block's scale an E4M3 number, times one FP32 scale per tensor:
            s_t = amax(tensor) / (448 * 6)            (FP32; 1 for an all-zero tensor)
            s_b = e4m3(clamp(fp32(fp32(amax(block) / 6) / s_t), 2^-6, 448))
            P_i = e2m1(clamp(v_i * fp32(fp32(1 / s_t) / s_b), -6, 6))
            dequantized: fp32(P_i * fp32(s_t * s_b))
        in exactly this sequence of FP32 operations (the one torchao's reference and NVIDIA's kernels use).

Conventions here:
* A ragged last block (``shape[dim]`` not a multiple of ``block_size``) is its own, shorter block: its scale
  comes from its own elements only (torchao refuses such shapes).
* A block holding an inf or a NaN dequantizes to NaN in every element (the OCP spec: such a block's scale
  is NaN). torchao departs from this for inf: its floor rule reads the scale byte from the exponent field of
  amax = inf, giving a finite byte (247 for E4M3, 240 for E5M2, 253 for E2M1/E2M3, 251 for E3M2), and its
  rceil rule gives byte 254; the block's finite values then come back as 0 and the inf (saturated to the
  element's max, times the huge scale) as inf again. Only NaN gets byte 255 there. NVFP4 follows the same
  rule here (a block with inf/NaN is NaN); its tensor scale is taken from the other blocks.
* A scale byte of 0 (e = -127, only for blocks whose amax is below about 2^(emax - 126)) is the value
  2^-127 here, both ways. torchao's floor rule divides by 2^-126 there but multiplies back by 2^-127 (the
  values come back halved), and its rceil rule (after TE's ``exp2f_rcp``) does not scale at all; only blocks
  of values below 2^-118 are affected.
* Everything is computed in FP32, as the hardware does: float32 inputs, or bfloat16/float16 (upcast
  exactly); float64 is refused rather than rounded twice.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Union

import torch

from .formats import E2M1, E2M3, E3M2, E4M3, E5M2, FloatFormat

__all__ = [
    "BlockFormat",
    "BlockInfo",
    "ScaleKind",
    "ScaleMode",
    "MXFP8_E4M3",
    "MXFP8_E5M2",
    "MXFP6_E2M3",
    "MXFP6_E3M2",
    "MXFP4",
    "NVFP4",
    "BLOCK_PRESETS",
    "block_quantize",
    "block_scales",
    "explain_block",
]

ScaleKind = Literal["e8m0", "e4m3"]
ScaleMode = Literal["floor", "rceil"]
_SCALE_KINDS: tuple[str, ...] = ("e8m0", "e4m3")
SCALE_MODES: tuple[str, ...] = ("floor", "rceil")

# E8M0: an unsigned biased exponent byte, value 2^(byte - 127); byte 255 is NaN (OCP MX v1.0, 5.4.1).
E8M0_BIAS = 127
E8M0_NAN = 255
_E8M0_EMIN, _E8M0_EMAX = -127, 127


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """A block-scaled format: ``block_size`` elements of ``element`` share one ``scale``.

    Args:
        element: the element format (a :class:`~lossscale.FloatFormat` or its name).
        scale: ``"e8m0"`` (a power of two, the OCP MX scale) or ``"e4m3"`` (an E4M3 number, NVFP4's).
        block_size: elements per block along the blocked dimension (>= 1).
        tensor_scale: an extra FP32 scale per tensor (NVFP4's second level); only with ``scale="e4m3"``.

    Example:
        >>> from lossscale import MXFP4, NVFP4
        >>> MXFP4.name, MXFP4.block_size, MXFP4.element.name, NVFP4.scale
        ('mxfp4', 32, 'e2m1', 'e4m3')
        >>> round(MXFP4.bits_per_element, 3)
        4.25
    """

    element: FloatFormat
    scale: ScaleKind
    block_size: int
    tensor_scale: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.element, str):
            object.__setattr__(self, "element", FloatFormat.parse(self.element))
        if not isinstance(self.element, FloatFormat):
            raise TypeError(f"element must be a FloatFormat or a format name, got {type(self.element).__name__}")
        if self.scale not in _SCALE_KINDS:
            raise ValueError(f"scale must be one of {_SCALE_KINDS}, got {self.scale!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int, got {type(self.block_size).__name__}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not isinstance(self.tensor_scale, bool):
            raise TypeError(f"tensor_scale must be a bool, got {type(self.tensor_scale).__name__}")
        if self.tensor_scale and self.scale != "e4m3":
            raise ValueError("tensor_scale=True needs scale='e4m3' (an E8M0 scale has no use for an FP32 one)")
        if self.element.bits > 8:
            raise ValueError(f"element must have at most 8 bits, got {self.element.name} ({self.element.bits})")

    @property
    def name(self) -> str:
        """``"mxfp8_e4m3"``, ``"nvfp4"``, ... for presets; else ``"<element>x<block>_<scale>[+fp32]"``."""
        for preset_name, preset in BLOCK_PRESETS.items():
            if preset == self:
                return preset_name
        return f"{self.element.name}x{self.block_size}_{self.scale}" + ("+fp32" if self.tensor_scale else "")

    @property
    def bits_per_element(self) -> float:
        """Storage per element, the scale amortised over the block (the tensor scale not counted)."""
        return self.element.bits + 8 / self.block_size

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, spec: BlockFormatLike) -> BlockFormat:
        """A block format from a preset name (``"mxfp8"`` = ``"mxfp8_e4m3"``, ``"mxfp4"``, ``"nvfp4"``, ...)
        or a ``BlockFormat`` (returned as is)."""
        if isinstance(spec, BlockFormat):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"block format must be a BlockFormat or a name, got {type(spec).__name__}")
        key = spec.strip().lower().replace("-", "_")
        found = _BLOCK_ALIASES.get(key)
        if found is None:
            raise ValueError(f"block format: unknown name {spec!r}; allowed: {', '.join(_BLOCK_ALIASES)}")
        return found


BlockFormatLike = Union[BlockFormat, str]

MXFP8_E4M3 = BlockFormat(E4M3, "e8m0", 32)
MXFP8_E5M2 = BlockFormat(E5M2, "e8m0", 32)
MXFP6_E2M3 = BlockFormat(E2M3, "e8m0", 32)
MXFP6_E3M2 = BlockFormat(E3M2, "e8m0", 32)
MXFP4 = BlockFormat(E2M1, "e8m0", 32)
NVFP4 = BlockFormat(E2M1, "e4m3", 16, tensor_scale=True)

BLOCK_PRESETS: dict[str, BlockFormat] = {
    "mxfp8_e4m3": MXFP8_E4M3,
    "mxfp8_e5m2": MXFP8_E5M2,
    "mxfp6_e2m3": MXFP6_E2M3,
    "mxfp6_e3m2": MXFP6_E3M2,
    "mxfp4": MXFP4,
    "nvfp4": NVFP4,
}
_BLOCK_ALIASES: dict[str, BlockFormat] = {**BLOCK_PRESETS, "mxfp8": MXFP8_E4M3, "mxfp6": MXFP6_E2M3}


def is_block_name(name: str) -> bool:
    """True when ``name`` names a block format preset."""
    return name.strip().lower().replace("-", "_") in _BLOCK_ALIASES


# ------------------------------------------------------------------------------------------------------
# Kernels


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for integer e in -127..127, built from float64 bits (exact; 2^-127 is an FP32
    subnormal): float64 = sign(1) | exponent(11, bias 1023) | mantissa(52)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64).float()


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) exactly for finite a > 0 (frexp: a = m * 2^k with 0.5 <= m < 1, subnormals too)."""
    return torch.frexp(a)[1] - 1


def _ceil_log2(a: torch.Tensor) -> torch.Tensor:
    """ceil(log2(a)) exactly for finite a > 0: one less than frexp's exponent only for powers of two."""
    m, k = torch.frexp(a)
    return torch.where(m == 0.5, k - 1, k)


def _blocked(x: torch.Tensor, dim: int, block_size: int) -> tuple[torch.Tensor, int]:
    """x with ``dim`` moved last, zero-padded to whole blocks and reshaped to (..., blocks, block_size);
    and the unpadded length. Zero padding leaves every block's amax (and NaN) unchanged."""
    moved = x.movedim(dim, -1)
    n = moved.shape[-1]
    pad = (-n) % block_size
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    return moved.reshape(*moved.shape[:-1], -1, block_size), n


def _unblocked(b: torch.Tensor, n: int, dim: int, contiguous: bool = True) -> torch.Tensor:
    out = b.reshape(*b.shape[:-2], -1)[..., :n].movedim(-1, dim)
    return out.contiguous() if contiguous else out


def _check(x: torch.Tensor, fmt: BlockFormat, dim: int, scale_mode: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"x must be float32, bfloat16 or float16 for block format {fmt.name} (blocks are computed in FP32, "
            f"as the hardware does; float64 would be rounded twice), got {x.dtype}"
        )
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if x.dim() == 0:
        raise ValueError(f"x must have at least one dimension to block along, got a 0-d tensor ({fmt.name})")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-d tensor, got {dim}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    if fmt.scale == "e4m3" and scale_mode != "floor":
        raise ValueError(
            f"scale_mode={scale_mode!r} applies to E8M0 (power-of-two) scales only; {fmt.name}'s E4M3 block "
            "scales are rounded to nearest"
        )
    return dim % x.dim()


def block_scales(
    x: torch.Tensor, fmt: BlockFormatLike, dim: int = -1, scale_mode: ScaleMode = "floor"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block scales of ``x`` in ``fmt``: (scales, tensor scale).

    For E8M0 formats the scales are the E8M0 bytes as an int32 tensor (0..254; 255 for a block holding an
    inf or NaN) of shape ``(..., blocks)`` with ``dim`` moved last, and the tensor scale is None. For NVFP4
    the scales are the E4M3 block scales as float32 values (NaN for a block holding inf/NaN) and the tensor
    scale is a 0-d FP32 tensor. Does not synchronise.
    """
    fmt = BlockFormat.parse(fmt)
    d = _check(x, fmt, dim, scale_mode)
    blocks, _ = _blocked(x.float(), d, fmt.block_size)
    if fmt.scale == "e8m0":
        e, bad = _e8m0_exponent(blocks, fmt.element, scale_mode)
        return torch.where(bad, E8M0_NAN, e + E8M0_BIAS).to(torch.int32), None
    amax = blocks.abs().amax(-1)
    s_t = _tensor_scale_from_block_amax(amax)
    s_b, bad = _e4m3_block_scale(amax, fmt.element, s_t)
    return s_b.masked_fill(bad, math.nan), s_t


def _e8m0_exponent(
    blocks: torch.Tensor, element: FloatFormat, scale_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared exponent e per block (int32, -127..127) and the mask of blocks holding inf/NaN."""
    amax = blocks.abs().amax(-1)  # NaN propagates
    bad = ~torch.isfinite(amax)
    if scale_mode == "floor":
        # OCP MX v1.0 6.3: X = 2^(floor(log2(amax)) - emax_elem).
        e = _floor_log2(amax) - element.emax
    else:
        # NVIDIA's rule (cuBLAS "Computing scaling and conversion factors for FP8 with UE8M0 scales"):
        # the FP32 quotient amax / max_elem rounded up to a power of two (cvt.rp ue8m0).
        descale = amax / element.max
        e = _ceil_log2(descale)
    # amax == 0 (frexp gives exponent 0 for 0): the smallest scale, as the byte-0 convention.
    e = torch.where(amax > 0, e, _E8M0_EMIN)
    return e.clamp(_E8M0_EMIN, _E8M0_EMAX).masked_fill(bad, 0).to(torch.int32), bad


def _tensor_scale_from_block_amax(block_amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's FP32 per-tensor scale amax / (448 * 6), amax over the blocks free of inf/NaN (1 for an
    all-zero tensor)."""
    amax = torch.where(torch.isfinite(block_amax), block_amax, 0.0).amax() if block_amax.numel() else (
        block_amax.new_zeros(())
    )
    s_t = amax / (E4M3.max * E2M1.max)
    return torch.where(s_t > 0, s_t, torch.ones_like(s_t))


def _e4m3_block_scale(
    amax: torch.Tensor, element: FloatFormat, s_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4's E4M3 block scales (as float32) from the block amaxes, and the mask of blocks holding
    inf/NaN."""
    from .quantize import quantize

    bad = ~torch.isfinite(amax)
    # FP32 ops in this order: amax / 6, then / s_t, clamped to [2^-6 (E4M3's min normal), 448], to E4M3.
    s = ((amax / element.max) / s_t).clamp(E4M3.min_normal, E4M3.max)
    s = quantize(s.masked_fill(bad, 1.0), E4M3, saturate=True)
    return s, bad


def _quantize_blocks(
    blocks: torch.Tensor, fmt: BlockFormat, scale_mode: str, s_t: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elements P (..., blocks, block_size), the dequantizing multiplier per block (..., blocks, 1; NaN for a
    block holding inf/NaN, so that ``P * multiplier`` is the dequantized block in one pass) and the mask of
    those blocks (..., blocks)."""
    from .quantize import quantize

    # Formats without inf/NaN (E2M1, E2M3, E3M2) saturate by themselves: no separate clamp pass.
    sat = fmt.element.nonfinite != "none"
    if fmt.scale == "e8m0":
        e, bad = _e8m0_exponent(blocks, fmt.element, scale_mode)
        scale = _pow2(e).masked_fill_(bad, math.nan).unsqueeze(-1)
        inv = _pow2(-e).unsqueeze(-1)
        # Multiplying by a power of two is exact (correctly rounded where the result is an FP32 subnormal,
        # the same as dividing); the elements saturate (clamp) as the spec's conversion does.
        p = quantize(blocks * inv, fmt.element, saturate=sat)
        return p, scale, bad
    amax = blocks.abs().amax(-1)
    if s_t is None:
        s_t = _tensor_scale_from_block_amax(amax)
    s_b, bad = _e4m3_block_scale(amax, fmt.element, s_t)
    s_b = s_b.unsqueeze(-1)
    recip = (1.0 / s_t) / s_b
    p = quantize(blocks * recip, fmt.element, saturate=sat)
    return p, (s_t * s_b).masked_fill_(bad.unsqueeze(-1), math.nan), bad


def block_quantize(
    x: torch.Tensor, fmt: BlockFormatLike, dim: int = -1, scale_mode: ScaleMode = "floor"
) -> torch.Tensor:
    """Quantize ``x`` to the block format ``fmt`` (blocks along ``dim``) and return the dequantized values
    (float32 for float32 input; bfloat16/float16 inputs are computed in FP32 and cast back).

    See the module docstring for the rules. :func:`lossscale.quantize` calls this for block formats. Does
    not synchronise.

    >>> import torch
    >>> from lossscale.blockformats import block_quantize
    >>> block_quantize(torch.tensor([[1.0, 0.3, -5.0, 100.0]]), "mxfp4").tolist()  # amax 100: X = 2^(6-2)
    [[0.0, 0.0, -8.0, 96.0]]
    """
    fmt = BlockFormat.parse(fmt)
    d = _check(x, fmt, dim, scale_mode)
    if x.numel() == 0:
        return x.clone()
    blocks, n = _blocked(x.float(), d, fmt.block_size)
    p, mult, _ = _quantize_blocks(blocks, fmt, scale_mode)
    return _unblocked(p.mul_(mult), n, d).to(x.dtype)


# ------------------------------------------------------------------------------------------------------
# One block, explained (for `lossscale formats --block`)


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    """How one block quantizes (see :func:`explain_block`)."""

    format: str
    scale_mode: str
    amax: float
    scale: float  # the block's scale X (for NVFP4: s_t * s_b)
    scale_bits: str  # E8M0 byte, or the E4M3 pattern s|eeee|mmm of s_b
    tensor_scale: float | None
    inputs: tuple[float, ...]
    scaled: tuple[float, ...]  # v_i / X before element rounding
    elements: tuple[float, ...]  # the stored element values P_i
    element_bits: tuple[str, ...]
    values: tuple[float, ...]  # dequantized X * P_i
    status: tuple[str, ...]  # per element: exact, rounded, saturated, underflow, subnormal, nan


def explain_block(
    values: list[float] | tuple[float, ...],
    fmt: BlockFormatLike,
    *,
    scale_mode: ScaleMode = "floor",
    tensor_amax: float | None = None,
) -> BlockInfo:
    """Quantize one block of Python floats and say what happened to each element (host-side helper).

    ``values`` (1..block_size numbers) is one block (a shorter one is a ragged last block). For NVFP4 the
    tensor scale comes from ``tensor_amax`` (default: the block's own amax, as if the tensor were this block).

    >>> info = explain_block([1.0, 0.3, -5.0, 100.0], "mxfp4")
    >>> info.scale, info.scale_bits, info.elements, info.status
    (16.0, '131 (2^4)', (0.0, 0.0, -0.5, 6.0), ('underflow', 'underflow', 'subnormal', 'saturated'))
    """
    from .quantize import _bits_str

    fmt = BlockFormat.parse(fmt)
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError("values must be a non-empty list of numbers (one block)")
    if len(values) > fmt.block_size:
        raise ValueError(f"values: a block of {fmt.name} holds at most {fmt.block_size} numbers, got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"values must be numbers, got {type(v).__name__}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    x = torch.tensor([float(v) for v in values], dtype=torch.float32)
    inputs = tuple(x.tolist())
    blocks = x.view(1, -1)
    tensor_scale: float | None = None
    s_t: torch.Tensor | None = None
    if fmt.scale == "e4m3":
        finite = [abs(v) for v in inputs if math.isfinite(v)]
        amax_t = max(finite, default=0.0) if tensor_amax is None else tensor_amax
        if isinstance(amax_t, bool) or not isinstance(amax_t, (int, float)) or not (
            math.isfinite(amax_t) and amax_t >= max(finite, default=0.0)
        ):
            raise ValueError(f"tensor_amax must be a finite number >= the block's finite amax, got {tensor_amax!r}")
        s_t = torch.tensor(float(amax_t), dtype=torch.float32) / (E4M3.max * E2M1.max)
        s_t = torch.where(s_t > 0, s_t, torch.ones_like(s_t))
        tensor_scale = float(s_t.item())
    elif tensor_amax is not None:
        raise ValueError(f"tensor_amax applies to formats with a tensor scale (nvfp4), not {fmt.name}")
    p, mult, bad_t = _quantize_blocks(blocks, fmt, scale_mode, s_t)
    bad = bool(bad_t.item())
    results = tuple((p * mult).squeeze(0).tolist())
    scale = math.nan if bad else float(mult.item())
    elements = tuple(math.nan for _ in inputs) if bad else tuple(p.squeeze(0).tolist())
    if fmt.scale == "e8m0":
        byte = E8M0_NAN if bad else round(math.log2(scale)) + E8M0_BIAS
        scale_bits = f"{byte} (NaN)" if bad else f"{byte} (2^{byte - E8M0_BIAS})"
        scaled = tuple(math.nan if bad else v / scale for v in inputs)  # exact: a power of two
    else:
        s_b = scale / tensor_scale if tensor_scale else math.nan
        s_b_t = _e4m3_block_scale(blocks.abs().amax(-1), fmt.element, s_t)[0] if s_t is not None else None
        sb = float(s_b_t.item()) if s_b_t is not None else s_b
        scale_bits = "NaN" if bad else f"{_bits_str(E4M3.encode(sb), E4M3)} ({sb!r})"
        recip = (1.0 / s_t) / sb if s_t is not None else None
        scaled = tuple(math.nan if bad or recip is None else float((torch.tensor(v) * recip).item()) for v in inputs)
    element_bits = tuple(
        _bits_str(fmt.element.encode(e), fmt.element) if math.isfinite(e) else "-" for e in elements
    )
    status = tuple(_element_status(sv, pv, fmt.element) for sv, pv in zip(scaled, elements, strict=True))
    amax = max((abs(v) for v in inputs), default=0.0) if not any(math.isnan(v) for v in inputs) else math.nan
    return BlockInfo(
        fmt.name, scale_mode, amax, scale, scale_bits, tensor_scale, inputs, scaled, elements, element_bits,
        results, status,
    )


def _element_status(s: float, p: float, element: FloatFormat) -> str:
    if math.isnan(p):
        return "nan"
    if abs(s) > element.max:
        return "saturated"
    if s != 0.0 and p == 0.0:
        return "underflow"
    if p != 0.0 and abs(p) < element.min_normal:
        return "subnormal"
    return "exact" if p == s else "rounded"
