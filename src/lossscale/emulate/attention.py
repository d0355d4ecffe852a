"""Emulated attention: ``scaled_dot_product_attention`` and ``nn.MultiheadAttention``'s forward.

The function mode sees ``nn.MultiheadAttention`` as one ``F.multi_head_attention_forward`` call. Calling that
function again from the handler re-enters the mode (its ``has_torch_function`` check is true whenever a mode
is active) and recurses without end, so the handler re-implements the function on top of the emulator's
ops, following torch's own semantics (masks, ``bias_k``/``bias_v``, ``add_zero_attn``, static keys, the
``need_weights`` and SDPA paths).

Scaled dot-product attention follows flash attention's numerics (FlashAttention-2, Dao 2023): the scores
``S = Q K^T * scale`` and the softmax stay in FP32 registers, the unnormalised probabilities
``exp(S - rowmax)`` are rounded to the input format before the ``P V`` GEMM, the FP32 accumulator is divided
by the FP32 row sum at the end, and the output is rounded once. In backward, ``dO`` enters in low
precision, ``dS`` is rounded before the ``dQ``/``dK`` GEMMs, and ``dQ``, ``dK``, ``dV`` are rounded results.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F

from ..quantize import quantize
from ._core import Emulator, Operand

__all__ = ["sdpa", "multi_head_attention_forward"]

_SDPA_SIG = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None
)
_MHA_SIG = inspect.signature(F.multi_head_attention_forward)


def sdpa(emu: Emulator, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Emulated ``F.scaled_dot_product_attention`` (same arguments)."""
    bound = _SDPA_SIG.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    return _sdpa(
        emu, a["query"], a["key"], a["value"], a["attn_mask"], a["dropout_p"], a["is_causal"], a["scale"],
        a["enable_gqa"],
    )


def _sdpa(
    emu: Emulator,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    op: str = "sdpa",
    projected: bool = False,
) -> torch.Tensor:
    L, S = q.size(-2), k.size(-2)
    if L == 0 or S == 0:
        # Nothing to round: torch's result is empty (no queries) or zeros (no keys), exact in any format.
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    # projected: q, k, v are views of rounded in-projection results (multi-head attention).
    operand = emu.result_operand if projected else emu.operand
    q = operand(q, op, "query")
    k = operand(k, op, "key")
    v = operand(v, op, "value")
    if enable_gqa and k.dim() >= 3 and q.size(-3) != k.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
    bias: torch.Tensor | None = None
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill_(~causal, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # SDPA's bool masks: True means "attend"
            mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, -math.inf)
        else:
            # Autocast casts every floating argument of the op, the additive mask included.
            mask = emu.addend(attn_mask, op, "attn_mask")  # type: ignore[assignment]
        bias = mask if bias is None else bias + mask
    emu.gemm_done(op, 2)
    if dropout_p == 0.0 and (bias is None or not bias.requires_grad):
        out: torch.Tensor = _Flash.apply(q, k, v, bias, scale, emu, op)  # type: ignore[no-untyped-call]
        return emu.result(out, op)
    return emu.result(_composite(emu, q, k, v, bias, dropout_p, scale, op), op)


def _flash_forward(
    emu: Emulator,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    site: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and log-sum-exp of attention with flash numerics (see the module docstring)."""
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if bias is not None:
        s = s + bias
    # Unnormalised probabilities exp(S - rowmax) enter the PV GEMM; the FP32 row sum divides the FP32
    # accumulator at the end. Fully masked rows (max = -inf) give 0/0 = NaN, as torch's math path does.
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    e = _round_probs(emu, e, site)
    out = torch.matmul(e, v).div_(denom)
    return out, m + torch.log(denom)


def _round_probs(emu: Emulator, p: torch.Tensor, site: str | None) -> torch.Tensor:
    """P = exp(S - max) into the PV GEMM (forward, reduced over keys: dim -1; counted at ``site``) or, with
    ``site`` None, P recomputed in backward for the dV GEMM (P^T there: reduced over queries, dim -2; the same
    rounding as in forward, not counted again)."""
    if emu.compute is None:
        return p
    if site is None:
        info = Operand("sdpa", "probs", "backward", (-2,), True)
        return emu.quantize(p, emu.compute, "", info, scaled=emu.scaled, count=False)
    return emu.quantize(p, emu.compute, site, Operand("sdpa", "probs", "forward", (-1,), True), scaled=emu.scaled)


class _Flash(torch.autograd.Function):
    """Attention with flash-attention forward and backward numerics, between rounded q/k/v and output.

    Backward (FlashAttention-2, Alg. 2): with P = exp(S - lse) recomputed in FP32,
        dV = q(P)^T dO,   dP = dO V^T,   D = rowsum(dO * O),   dS = P * (dP - D)  rounded to the grad format,
        dQ = dS K * scale,   dK = dS^T Q * scale
    (dO arrives already rounded by the result site; the operand sites round dQ, dK, dV.)
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        scale: float,
        emu: Emulator,
        op: str,
    ) -> torch.Tensor:
        out, lse = _flash_forward(emu, q, k, v, bias, scale, emu._site_name(op, "probs"))
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale, ctx.emu, ctx.grad_site = scale, emu, emu._site_name(op, "scores") + ".grad"
        return out

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, bias, out, lse = ctx.saved_tensors
        emu: Emulator = ctx.emu
        scale: float = ctx.scale
        s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
        if bias is not None:
            s = s + bias
        p = torch.exp(s - lse)
        if emu.output is not None:
            out = quantize(out, emu.output)  # flash keeps O in the input format
        d_v = torch.matmul(_round_probs(emu, p, None).transpose(-2, -1), d_out)
        d_p = torch.matmul(d_out, v.transpose(-2, -1))
        delta = (d_out * out).sum(dim=-1, keepdim=True)
        d_s = p.mul_(d_p.sub_(delta))
        if emu.grad is not None:
            # dS enters the dQ GEMM (reduced over keys, dim -1) and the dK GEMM (over queries, dim -2).
            d_s = emu.quantize(d_s, emu.grad, ctx.grad_site, Operand("sdpa", "scores", "backward", (-1, -2), True))
        d_q = torch.matmul(d_s, k).mul_(scale)
        d_k = torch.matmul(d_s.transpose(-2, -1), q).mul_(scale)
        return _unbroadcast(d_q, q), _unbroadcast(d_k, k), _unbroadcast(d_v, v), None, None, None, None


def _unbroadcast(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # matmul broadcasts batch dimensions; sum the gradient back to the operand's shape.
    if g.shape == like.shape:
        return g
    extra = g.dim() - like.dim()
    if extra > 0:
        g = g.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, n in enumerate(like.shape) if n == 1 and g.shape[i] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


def _composite(
    emu: Emulator,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_p: float,
    scale: float,
    op: str,
) -> torch.Tensor:
    """Attention from autograd ops (for dropout, or a mask that needs a gradient): the same forward
    numerics with dropout on the unnormalised probabilities; backward by autograd with dS rounded."""
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    s = emu.site(s, op, "scores", None, emu.grad)
    if bias is not None:
        s = s + bias
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    if dropout_p > 0.0:
        e = F.dropout(e, p=dropout_p)
    e = emu.site(e, op, "probs", emu.compute, None, emu.scaled)
    return torch.matmul(e, v) / denom


def _out_projection(
    emu: Emulator, attn: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, op: str
) -> torch.Tensor:
    # The attention output is a rounded result: no second rounding on its way into the out-projection.
    y = F.linear(
        emu.result_operand(attn, op, "out_proj_input"),
        emu.operand(w, op, "out_proj_weight"),
        emu.addend(b, op, "out_proj_bias"),
    )
    emu.gemm_done(op)
    return emu.result(y, op, "out_proj")


def _canonical(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # MHA's bool masks mean "masked out" (True -> -inf), as torch's _canonical_mask does.
    if mask is None or torch.is_floating_point(mask):
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, -math.inf)


def multi_head_attention_forward(emu: Emulator, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Emulated ``F.multi_head_attention_forward`` (same arguments and results)."""
    bound = _MHA_SIG.bind(*args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    op = "mha"
    query, key, value = a["query"], a["key"], a["value"]
    num_heads: int = a["num_heads"]
    key_padding_mask, attn_mask = a["key_padding_mask"], a["attn_mask"]
    need_weights, is_causal = a["need_weights"], a["is_causal"]

    is_batched = query.dim() == 3
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    if embed_dim != a["embed_dim_to_check"]:
        raise ValueError(f"was expecting embedding dimension of {a['embed_dim_to_check']}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise ValueError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")

    key_padding_mask = _canonical(key_padding_mask, query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # SDPA's is_causal does it
    else:
        attn_mask = _canonical(attn_mask, query.dtype)
        if key_padding_mask is not None:
            is_causal = False

    # In-projection, as torch's _in_projection_packed / _in_projection (same GEMMs, same shapes).
    b = a["in_proj_bias"]
    if not a["use_separate_proj_weight"]:
        w = a["in_proj_weight"]
        E = query.size(-1)
        if key is value and query is key:
            proj = emu.linear(query, w, b, op, ("input", "in_proj_weight", "in_proj_bias", "in_proj"))
            q, k, v = proj.unflatten(-1, (3, E)).unbind(-2)  # type: ignore[no-untyped-call]
        elif key is value:
            w_q, w_kv = w.split([E, 2 * E])
            b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
            q = emu.linear(query, w_q, b_q, op, ("input", "in_proj_weight", "in_proj_bias", "in_proj"))
            kv = emu.linear(key, w_kv, b_kv, op, ("input", "in_proj_weight", "in_proj_bias", "in_proj"))
            k, v = kv.unflatten(-1, (2, E)).unbind(-2)  # type: ignore[no-untyped-call]
        else:
            w_q, w_k, w_v = w.chunk(3)
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            roles = ("input", "in_proj_weight", "in_proj_bias", "in_proj")
            q = emu.linear(query, w_q, b_q, op, roles)
            k = emu.linear(key, w_k, b_k, op, roles)
            v = emu.linear(value, w_v, b_v, op, roles)
    else:
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        q = emu.linear(query, a["q_proj_weight"], b_q, op, ("input", "q_proj_weight", "in_proj_bias", "in_proj"))
        k = emu.linear(key, a["k_proj_weight"], b_k, op, ("input", "k_proj_weight", "in_proj_bias", "in_proj"))
        v = emu.linear(value, a["v_proj_weight"], b_v, op, ("input", "v_proj_weight", "in_proj_bias", "in_proj"))

    src_len = key.size(0)
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() != 3:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    bias_k, bias_v = a["bias_k"], a["bias_v"]
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    static_k, static_v = a["static_k"], a["static_v"]
    k = static_k if static_k is not None else k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = static_v if static_v is not None else v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

    if a["add_zero_attn"]:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k = torch.cat([k, zeros], dim=1)
        v = torch.cat([v, zeros], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    src_len = k.size(1)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
        kpm = kpm.reshape(bsz * num_heads, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm

    dropout_p = a["dropout_p"] if a["training"] else 0.0
    # q, k, v are views of rounded in-projection results unless static keys, bias_k or zero attention mixed
    # other values in.
    projected = static_k is None and static_v is None and bias_k is None and not a["add_zero_attn"]
    kv_operand = emu.result_operand if projected else emu.operand
    out_w, out_b = a["out_proj_weight"], a["out_proj_bias"]

    if need_weights:
        # torch's explicit path: two batched GEMMs around an FP32 softmax (the scores are a GEMM result).
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        qo = emu.operand(q_scaled, op, "query")
        ko = kv_operand(k, op, "key").transpose(-2, -1)
        if attn_mask is not None:
            scores = torch.baddbmm(emu.addend(attn_mask, op, "attn_mask"), qo, ko)  # type: ignore[arg-type]
        else:
            scores = torch.bmm(qo, ko)
        scores = emu.result(scores, op, "scores")
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        attn = torch.bmm(emu.operand(weights, op, "probs"), kv_operand(v, op, "value"))
        attn = emu.result(attn, op, "attn")
        emu.gemm_done(op, 2)
        attn = attn.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        attn = _out_projection(emu, attn, out_w, out_b, op).view(tgt_len, bsz, -1)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if a["average_attn_weights"]:
            weights = weights.mean(dim=1)
        if not is_batched:
            attn, weights = attn.squeeze(1), weights.squeeze(0)
        return attn, weights

    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.reshape(bsz, num_heads, tgt_len, head_dim)
    k = k.reshape(bsz, num_heads, src_len, head_dim)
    v = v.reshape(bsz, num_heads, src_len, head_dim)
    attn = _sdpa(emu, q, k, v, attn_mask, dropout_p, is_causal, None, False, op, projected)
    attn = attn.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    attn = _out_projection(emu, attn, out_w, out_b, op).view(tgt_len, bsz, -1)
    if not is_batched:
        attn = attn.squeeze(1)
    return attn, None
