"""``lossscale formats``: the preset formats, and how one value rounds in each."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from ..blockformats import BLOCK_PRESETS, SCALE_MODES, BlockFormat, ScaleMode, explain_block, is_block_name
from ..formats import PRESETS, FloatFormat
from ..quantize import explain
from . import CLIError

_EXAMPLES = """\
examples:
  lossscale formats                         every preset: bits, bias, max, min normal, min subnormal, eps
  lossscale formats --value 1e-8            how 1e-8 rounds in each preset (fp16 underflows, bf16 does not)
  lossscale formats --value -1e-8           negative numbers (and -inf) are values too
  lossscale formats --value 70000 --format fp16 --format e4m3
  lossscale formats --value 500 --format e4m3 --saturate
  lossscale formats --format e6m9           a custom format: e<E>m<M>[ieee|fn|f][-ftz]
  lossscale formats --block 1,0.3,-5,100 --format mxfp4    how one block quantizes (scale, elements, status)
  lossscale formats --block 1,0.3,-5,100 --format nvfp4 --format mxfp4 --scale-mode rceil
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "formats",
        help="table of number formats; how a value rounds in each",
        description="Show the number formats lossscale knows, or how one value rounds in each of them.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--value", type=str, default=None, metavar="X", help="a number to round (e.g. 1e-8, inf)")
    p.add_argument(
        "--format",
        dest="formats",
        action="append",
        default=None,
        metavar="F",
        help="a format name (repeatable): " + ", ".join(PRESETS) + ", or e<E>m<M>[ieee|fn|f][-ftz]",
    )
    p.add_argument("--saturate", action="store_true", help="clamp overflow to +-max instead of inf/NaN")
    p.add_argument(
        "--block",
        type=str,
        default=None,
        metavar="X1,X2,...",
        help="one block of comma-separated numbers to quantize in block formats (" + ", ".join(BLOCK_PRESETS) + ")",
    )
    p.add_argument(
        "--scale-mode", choices=SCALE_MODES, default="floor", help="E8M0 block scale rule (default: floor, OCP MX)"
    )
    p.set_defaults(func=run)


def _parse_formats(names: Sequence[str] | None) -> list[FloatFormat]:
    if not names:
        return list(PRESETS.values())
    out = []
    for name in names:
        try:
            out.append(FloatFormat.parse(name))
        except (ValueError, TypeError) as err:
            raise CLIError(str(err)) from None
    return out


def _num(v: float) -> str:
    if math.isnan(v) or math.isinf(v) or v == 0.0:
        return str(v)
    exp = math.log2(abs(v))
    if exp == int(exp) and abs(exp) >= 4:
        return f"{v:.6g} (2^{int(exp)})"
    return f"{v:.6g}"


def run(args: argparse.Namespace) -> int:
    if args.block is not None:
        return _run_block(args)
    blocks = [n for n in (args.formats or []) if is_block_name(n)]
    numbers = [n for n in args.formats if not is_block_name(n)] if args.formats else None
    fmts = [] if args.formats and not numbers else _parse_formats(numbers)
    if blocks and args.value is not None:
        raise CLIError(f"--value takes number formats; for block formats ({', '.join(blocks)}) use --block")
    if args.value is None:
        header = ["format", "s/e/m", "bias", "max", "min normal", "min subnormal", "eps", "inf", "NaN"]
        rows = [
            [
                f.name,
                f"1/{f.exponent_bits}/{f.mantissa_bits}",
                str(f.bias),
                _num(f.max),
                _num(f.min_normal),
                _num(f.min_subnormal),
                _num(f.eps),
                "yes" if f.has_inf else "no",
                "yes" if f.has_nan else "no",
            ]
            for f in fmts
        ]
        if fmts:
            _print_table("Number formats", header, rows)
        bfmts = [BlockFormat.parse(n) for n in blocks] if args.formats else list(BLOCK_PRESETS.values())
        if bfmts:
            bheader = ["block format", "element", "scale", "block", "tensor scale", "bits/element", "element max"]
            brows = [
                [
                    b.name,
                    b.element.name,
                    b.scale,
                    str(b.block_size),
                    "fp32" if b.tensor_scale else "-",
                    f"{b.bits_per_element:g}",
                    _num(b.element.max),
                ]
                for b in bfmts
            ]
            _print_table("Block-scaled formats (OCP MX v1.0, NVFP4)", bheader, brows)
        return 0
    try:
        x = float(args.value)
    except ValueError:
        raise CLIError(f"--value must be a number (e.g. 1e-8, -3.5, inf, nan), got {args.value!r}") from None
    header = ["format", "stored bits s|e|m", "value", "relative error", "status"]
    rows = []
    for f in fmts:
        info = explain(x, f, saturate=args.saturate)
        rows.append([f.name, info.bits_str, repr(info.value), f"{info.relative_error:.3g}", info.status])
    _print_table(f"How {x!r} rounds (round to nearest, ties to even)", header, rows)
    return 0


def _run_block(args: argparse.Namespace) -> int:
    try:
        values = [float(v) for v in args.block.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"--block must be comma-separated numbers (e.g. 1,0.3,-5,100), got {args.block!r}") from None
    names = args.formats or ["mxfp8_e4m3", "mxfp4", "nvfp4"]
    for name in names:
        if not is_block_name(name):
            raise CLIError(f"--block needs block formats ({', '.join(BLOCK_PRESETS)}), got --format {name}")
        fmt = BlockFormat.parse(name)
        mode: ScaleMode = args.scale_mode if fmt.scale == "e8m0" else "floor"
        try:
            info = explain_block(values, fmt, scale_mode=mode)
        except (ValueError, TypeError) as err:
            raise CLIError(str(err)) from None
        title = f"{fmt.name}: amax {info.amax!r}, scale {info.scale!r} = {info.scale_bits}" + (
            f" ({mode})" if fmt.scale == "e8m0" else f", tensor scale {info.tensor_scale!r}"
        )
        header = ["input", "scaled", "element bits s|e|m", "element", "dequantized", "status"]
        rows = [
            [repr(a), f"{b:.6g}", c, repr(d), repr(e), f]
            for a, b, c, d, e, f in zip(
                info.inputs, info.scaled, info.element_bits, info.elements, info.values, info.status, strict=True
            )
        ]
        _print_table(title, header, rows)
    return 0


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the [cli] extra is optional: plain text then
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h in ("format", "status") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    # Wide enough for every cell on one line (a pipe or a narrow terminal must not fold the bit strings).
    width = sum(max(len(h), *(len(r[i]) for r in rows)) + 3 for i, h in enumerate(header)) + 1
    Console(width=max(width, len(title))).print(table)
