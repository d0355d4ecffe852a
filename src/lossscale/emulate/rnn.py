"""Emulated recurrent layers: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells.

The function mode sees a whole recurrent layer as one ``_VF.lstm``/``_VF.gru``/``_VF.rnn_*`` call, so the
handler unrolls it over time with emulated gate GEMMs, as cuDNN's persistent RNN kernels structure the work:

    gi = x W_ih^T + b_ih            one GEMM over all time steps (rounded result)
    for each step t:
        gh = h_{t-1} W_hh^T + b_hh  one GEMM per step (h rounded on entry, rounded result)
        gates from gi[t] + gh       element-wise, FP32 (as cuDNN's fused element-wise kernels)
        c_t, h_t                    FP32
        (LSTM with proj_size: h_t = h_t W_hr^T, another GEMM)

The weights are rounded once per call, so each weight's gradient is accumulated over the steps in FP32 and
rounded once, as a single wgrad GEMM over all steps would produce. Gate order follows torch: LSTM (i, f, g,
o), GRU (r, z, n) with ``n = tanh(gi_n + r * gh_n)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._core import Emulator

__all__ = ["rnn_layer", "rnn_cell"]

State = tuple[torch.Tensor, torch.Tensor | None]  # (h, c); c is None except for LSTM
Cell = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], State]


def _lstm_cell(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None) -> State:
    assert c is not None
    i, f, g, o = (gi + gh).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None) -> State:
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n), None  # (1 - z) * n + z * h, as torch writes it


def _tanh_cell(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None) -> State:
    return torch.tanh(gi + gh), None


def _relu_cell(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None) -> State:
    return torch.relu(gi + gh), None


CELLS: dict[str, Cell] = {"lstm": _lstm_cell, "gru": _gru_cell, "rnn_tanh": _tanh_cell, "rnn_relu": _relu_cell}


def is_packed_call(kind: str, args: Sequence[Any]) -> bool:
    """Whether a ``_VF`` RNN call is the PackedSequence overload (``data, batch_sizes, hx, params, ...``)."""
    if kind == "lstm":
        return len(args) > 1 and isinstance(args[1], torch.Tensor)
    return len(args) > 2 and isinstance(args[2], torch.Tensor)


def rnn_layer(emu: Emulator, kind: str, *args: Any) -> tuple[torch.Tensor, ...]:
    """Emulated ``_VF.lstm/gru/rnn_tanh/rnn_relu(input, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)``."""
    if is_packed_call(kind, args):
        raise NotImplementedError(
            f"lossscale emulation of nn.{kind.upper()} with a PackedSequence is not implemented; pad the "
            "sequences, or run this layer outside lossscale.autocast (it would otherwise run in FP32)"
        )
    if len(args) != 9:
        raise TypeError(f"unexpected _VF.{kind} call with {len(args)} positional arguments")
    x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
    cell = CELLS[kind]
    op = "lstm" if kind == "lstm" else ("gru" if kind == "gru" else "rnn")
    if kind == "lstm":
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    if batch_first:
        # Time-major and contiguous, so the input GEMM over all steps sees the layout cuDNN uses.
        x = x.transpose(0, 1).contiguous()
    dirs = 2 if bidirectional else 1
    per = len(params) // (num_layers * dirs)
    proj = kind == "lstm" and per in (3, 5)  # w_ih, w_hh, [b_ih, b_hh], [w_hr]
    h_n: list[torch.Tensor] = []
    c_n: list[torch.Tensor] = []
    for layer in range(num_layers):
        # Round the layer input once for both directions: its gradient (the sum of both directions' dgrad)
        # is rounded once, as the dgrad of one GEMM with both directions' weights stacked.
        x = emu.operand(x, op, "input")
        outs = []
        for d in range(dirs):
            idx = layer * dirs + d
            w = params[idx * per : (idx + 1) * per]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if proj else None
            out, h, c = _direction(
                emu, op, cell, x, h0[idx], None if c0 is None else c0[idx], w[0], w[1], b_ih, b_hh, w_hr,
                reverse=d == 1,
            )
            outs.append(out)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        x = outs[0] if dirs == 1 else torch.cat(outs, dim=-1)
        if dropout > 0 and train and layer < num_layers - 1:
            x = F.dropout(x, p=dropout, training=True)
    if batch_first:
        x = x.transpose(0, 1)
    if kind == "lstm":
        return x, torch.stack(h_n), torch.stack(c_n)
    return x, torch.stack(h_n)


def _direction(
    emu: Emulator,
    op: str,
    cell: Cell,
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    w_hr: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    steps = x.shape[0]
    # x arrives rounded (an operand site in rnn_layer).
    gi = F.linear(x, emu.operand(w_ih, op, "weight_ih"), emu.addend(b_ih, op, "bias_ih"))
    gi = emu.result(gi, op, "gates_ih")
    # Round the recurrent weights once per call (see the module docstring).
    w_hh_q = emu.operand(w_hh, op, "weight_hh")
    b_hh_q = emu.addend(b_hh, op, "bias_hh")
    w_hr_q = None if w_hr is None else emu.operand(w_hr, op, "weight_hr")
    outs: list[torch.Tensor] = [x] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        gh = F.linear(emu.operand(h, op, "hidden"), w_hh_q, b_hh_q)
        gh = emu.result(gh, op, "gates_hh")
        h, c = cell(gi[t], gh, h, c)
        if w_hr_q is not None:
            h = emu.result(F.linear(emu.operand(h, op, "proj_input"), w_hr_q), op, "proj")
        outs[t] = h
    emu.gemm_done(op, 1 + steps * (2 if w_hr is not None else 1))
    return torch.stack(outs), h, c


def rnn_cell(emu: Emulator, kind: str, *args: Any) -> Any:
    """Emulated ``_VF.lstm_cell/gru_cell/rnn_tanh_cell/rnn_relu_cell(input, hx, w_ih, w_hh, b_ih, b_hh)``."""
    x, hx, w_ih, w_hh = args[:4]
    b_ih = args[4] if len(args) > 4 else None
    b_hh = args[5] if len(args) > 5 else None
    op = kind + "_cell"
    if kind == "lstm":
        h, c = hx
    else:
        h, c = hx, None
    gi = emu.linear(x, w_ih, b_ih, op, ("input", "weight_ih", "bias_ih", "gates_ih"))
    gh = emu.linear(h, w_hh, b_hh, op, ("hidden", "weight_hh", "bias_hh", "gates_hh"))
    h, c = CELLS[kind](gi, gh, h, c)
    return (h, c) if kind == "lstm" else h
