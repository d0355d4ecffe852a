"""Shared pieces of the framework-integration tests: an aten-level GEMM recorder, tiny models, an oracle for
scale trajectories. No downloads: every model is built from a config with random weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# The GEMMs that linear/matmul/Conv1D lower to at the aten level on CPU, with the positions of their operands.
_GEMM_OPERANDS = {
    aten.mm.default: (0, 1),
    aten.bmm.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.baddbmm.default: (1, 2),
}


def representable(t: torch.Tensor, dtype: torch.dtype = torch.float16) -> bool:
    """Every element is exactly representable in ``dtype`` (a round trip through torch's own cast; NaN and
    inf, which an overflowed backward produces, are values of the format too)."""
    x = t.detach().float()
    back = x.to(dtype).float()
    return bool(((back == x) | (back.isnan() & x.isnan())).all())


class GemmRecorder(TorchDispatchMode):
    """Records, for every aten GEMM, the operands' dtypes and whether their values are representable in
    ``dtype`` (FP16 by default)."""

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.dtype = dtype
        self.records: list[tuple[str, tuple[torch.dtype, ...], bool]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        positions = _GEMM_OPERANDS.get(func)
        if positions is not None:
            ops = [args[i] for i in positions]
            self.records.append(
                (str(func), tuple(o.dtype for o in ops), all(representable(o, self.dtype) for o in ops))
            )
        return func(*args, **(kwargs or {}))

    def dtypes(self) -> set[torch.dtype]:
        return {d for _, ds, _ in self.records for d in ds}

    def all_representable(self) -> bool:
        return all(ok for _, _, ok in self.records)

    def any_representable(self) -> bool:
        return any(ok for _, _, ok in self.records)


def gradscaler_trajectory(init_scale: float, growth_interval: int, inf_steps: set[int], steps: int) -> list[float]:
    """Scale after each of ``steps`` iterations, by torch.amp.GradScaler itself (the oracle), when the gradients
    are non-finite exactly at the iterations in ``inf_steps`` (0-based)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    out = []
    for i in range(steps):
        scaler.scale(p.sum()).backward()
        if i in inf_steps:
            p.grad.fill_(math.inf)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        out.append(scaler.get_scale())
    return out


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Every parameter bit-identical (NaN-safe: compares the bit patterns)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys():
        return False
    return all(
        torch.equal(pa[k].detach().view(torch.int32), pb[k].detach().view(torch.int32)) for k in pa
    )


def unscaled_norm(params: Sequence[torch.nn.Parameter], scale: float) -> torch.Tensor:
    """FP32 2-norm of the gradients divided by a power-of-two scale (exact), computed independently of the
    scaler (as torch.nn.utils.clip_grad_norm_ computes norms)."""
    grads = [p.grad.detach() / scale for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, 2.0)


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that the next Accelerator may choose another precision
    (accelerate's own tests do the same between cases)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state() -> Any:
    """accelerate's process-wide state reset around a test (use with ``pytest.mark.usefixtures``)."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


# The tiny GPT-2 of the accelerate and transformers tests: vocabulary, context and batch.
VOCAB, SEQ, BATCH = 64, 16, 4


def tiny_gpt2(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    """A 2-layer GPT-2 (width 32) from a config, random weights seeded by ``seed``."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    return transformers.GPT2LMHeadModel(cfg)


def doc_example(section: str) -> str:
    """The first python block under ``## {section}`` in docs/integrations.md (the docs' runnable examples)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", body, re.S)
    assert match is not None, section
    return match.group(1)


def sgd_reusing_id(freed_id: int, params: Sequence[torch.nn.Parameter], tries: int = 200_000) -> torch.optim.SGD | None:
    """A new ``torch.optim.SGD`` over ``params`` that sits at ``freed_id`` (the id of an optimizer just freed),
    or None when CPython does not hand that address out again within ``tries`` allocations.

    Instances are allocated bare (``__new__``) until one lands on the freed address; only that one is
    initialised. (A full construction allocates many objects first, which usually take the address.)
    """
    held = []
    for _ in range(tries):
        opt = torch.optim.SGD.__new__(torch.optim.SGD)
        if id(opt) == freed_id:
            opt.__init__(params, lr=0.1)  # type: ignore[misc]
            return opt
        held.append(opt)  # keep it alive so that the next allocation takes another address
    return None
