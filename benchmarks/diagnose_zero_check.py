"""What the numerically-zero check costs: ``diagnose(zero_check=True)`` against ``zero_check=False``.

    .venv/bin/python benchmarks/diagnose_zero_check.py            # well under a minute on one core
    .venv/bin/python benchmarks/diagnose_zero_check.py --quick

The check (lossscale.noise) recomputes the first batch's weight gradients once in FP32 and once in FP64 on
copies of the model, before the ``steps`` measured steps: about two extra steps, the FP64 one slower. Models:
a tiny GPT-2 written in torch (2 blocks, width 64, 16 tokens, batch 8) and an MLP 512-1024-1024-10 at batch
256, ``steps=8`` (diagnose's default). The two settings run interleaved, round by round, so machine load hits
them alike; per setting the minimum over rounds is reported, and the ratio of the minima.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lossscale import diagnose


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.d, self.heads = d, heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(self.d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(self.d // self.heads)).masked_fill(
            ~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        x = x + self.c_proj((att @ v).transpose(1, 2).reshape(b, t, self.d))
        return x + self.mlp(self.ln2(x))


def gpt() -> tuple[nn.Module, Callable[..., torch.Tensor], list[Any]]:
    torch.manual_seed(0)
    vocab, d = 128, 64
    model = nn.Sequential(nn.Embedding(vocab, d), Block(d, 4), Block(d, 4), nn.Linear(d, vocab))
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (8, 17), generator=g) for _ in range(4)]
    return model, lambda m, ids: nn.functional.cross_entropy(
        m(ids[:, :-1]).reshape(-1, vocab), ids[:, 1:].reshape(-1)), data


def mlp() -> tuple[nn.Module, Callable[..., torch.Tensor], list[Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(256, 512, generator=g), torch.randint(0, 10, (256,), generator=g)) for _ in range(4)]
    return model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    args = parser.parse_args()
    rounds = 2 if args.quick else 5
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {rounds} rounds, steps=8; minimum (median) seconds per diagnose()")
    for name, make in (("tiny GPT (torch)", gpt), ("MLP 512-1024-1024-10", mlp)):
        model, loss_fn, data = make()
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for check in (False, True):
                t = time.perf_counter()
                diagnose(model, loss_fn, data, steps=8, zero_check=check)
                times[check].append(time.perf_counter() - t)
        off, on = min(times[False]), min(times[True])
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"{name:24s} zero_check=False {off:.3f} ({med[False]:.3f})  zero_check=True {on:.3f} "
              f"({med[True]:.3f})  ratio {on / off:.2f}x")


if __name__ == "__main__":
    main()
