"""Training-step time with LayerwiseScaler against the same step with LossScaler (emulated fp16-mixed).

    .venv/bin/python benchmarks/layerwise_overhead.py            # about a minute on one core
    .venv/bin/python benchmarks/layerwise_overhead.py --quick    # a smoke run

One training step (forward under ``lossscale.autocast("fp16-mixed", emulate=True)``, ``scale(loss).backward()``,
``step``, ``update``, ``zero_grad``) on the matmul-bound models of ``benchmarks/emulation.py`` (the MLP
512-1024-1024-10 at batch 256 and the Transformer block at d_model 256), with each scaler, interleaved round by
round; ratios are the median over rounds of the ratio of two scalers timed back to back (robust to the load of
a shared machine). Scalers: ``LossScaler`` (one global scale), ``LayerwiseScaler`` adaptive with statistics of
the current backward (the default on one process), adaptive with the previous iteration's statistics (the
distributed path, minus the all-reduce), and dynamic (fairscale-style). Target (issue 14): LayerwiseScaler
<= 1.15x LossScaler.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lossscale  # noqa: E402
from lossscale import LayerwiseScaler, LossScaler  # noqa: E402


class Block(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model, 4, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.layer(x).mean(dim=1))
        return out


def models(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    batch, seq_batch = (32, 2) if quick else (256, 8)
    return {
        f"mlp 512-1024-1024-10 b{batch}": (
            lambda: nn.Sequential(
                nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
            ),
            (batch, 512),
        ),
        f"transformer block d256 s128 b{seq_batch}": (lambda: Block(256), (seq_batch, 128, 256)),
    }


SCALERS: dict[str, Callable[[nn.Module], Any]] = {
    "LossScaler": lambda m: LossScaler(init_scale=2.0**10),
    "layerwise adaptive (current)": lambda m: LayerwiseScaler(m, mode="adaptive", stats="current"),
    "layerwise adaptive (previous)": lambda m: LayerwiseScaler(m, mode="adaptive", stats="previous"),
    "layerwise dynamic": lambda m: LayerwiseScaler(m, mode="dynamic", init_scale=2.0**10),
}


def step_fn(model: nn.Module, scaler: Any, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        with lossscale.autocast("fp16-mixed", emulate=True):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def bench(rounds: int, steps: int, quick: bool) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {rounds} interleaved rounds "
          f"x {steps} steps; emulated fp16-mixed")
    for name, (build, shape) in models(quick).items():
        torch.manual_seed(0)
        x = torch.randn(*shape)
        y = torch.randint(0, 10, (shape[0],))
        base = build()
        fns = {}
        for sname, make in SCALERS.items():
            model = build()
            model.load_state_dict(base.state_dict())
            fns[sname] = step_fn(model, make(model), x, y)
        for f in fns.values():  # warm-up (and the first forward's graph tracing)
            f()
            f()
        times: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for sname in order:
                t0 = time.perf_counter()
                for _ in range(steps):
                    fns[sname]()
                times[sname].append((time.perf_counter() - t0) / steps)
        print(f"\n{name}")
        ref = times["LossScaler"]
        for sname in names:
            ratio = statistics.median(a / b for a, b in zip(times[sname], ref, strict=True))
            target = "" if sname == "LossScaler" else ("  (target <= 1.15x: " + ("met" if ratio <= 1.15 else
                                                                                   "NOT met") + ")")
            print(f"  {sname:<32} {statistics.median(times[sname]) * 1e3:8.2f} ms/step  {ratio:5.3f}x{target}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batches, few rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 15)
    steps = args.steps or (2 if args.quick else 3)
    bench(rounds, steps, args.quick)


if __name__ == "__main__":
    main()
