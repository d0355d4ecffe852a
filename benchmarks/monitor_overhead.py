"""Training-step time with a GradientMonitor sampling every 100 steps and every step, against no monitor.

    .venv/bin/python benchmarks/monitor_overhead.py            # about three minutes (2 threads)
    .venv/bin/python benchmarks/monitor_overhead.py --quick    # a smoke run

Claim checked (issue "One way to do each thing ...", monitor split): the monitor (formats bf16, fp16, e5m2; weight
and activation gradients; swamping through the optimizer hooks) costs <= 3% of the step time at ``every=100`` and
<= 50% at ``every=1``, on a matmul-bound model (MLP 512-1024-1024-10 at batch 256), 2 torch threads. The fused CPU
kernel (lossscale/monitor/_native.c) is used where a C compiler is found; the mode "every=1, tensor path" runs
without it, for comparison. A training step is ``zero_grad, forward, backward, SGD step, monitor.step()``. Each
mode trains its own copy of the model, and the modes run interleaved round by round, so that machine load hits them
alike: one round = 100 steps of "none" and of ``every=100`` (which then samples exactly one step per round) and
``--steps1`` steps of each ``every=1`` mode. The ratio of a mode is the **median over rounds** of its mean step
time divided by that of "none" in the same round (>= 20 rounds: >= 20 alternating pairs); the ratio of the per-mode
minima is printed beside it.

Also reported, without a target: the 30-layer width-32 tanh MLP of the diagnostics tests at batch 64, where a
step is ~1 ms of tiny GEMMs and the monitor's fixed per-step work (a few dozen small kernels over the packed
gradients) is not amortised: the every=1 ratio there is the worst case.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lossscale import GradientMonitor
from lossscale.monitor import _native

FORMATS = ("bf16", "fp16", "e5m2")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def deep_tanh() -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(30):
        layers += [nn.Linear(16 if i == 0 else 32, 32), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(32, 10))


class Mode:
    def __init__(self, name: str, model: nn.Module, every: int | None, swamping: bool, native: bool = True) -> None:
        self.name = name
        self.native = native
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.monitor = (
            None
            if every is None
            else GradientMonitor(model, FORMATS, every=every, optimizer=self.opt if swamping else None, history=4)
        )
        self.means: list[float] = []

    def run(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        saved = _native.library
        if not self.native:  # the tensor path, as on a machine without a C compiler
            _native.library = lambda: None  # type: ignore[assignment]
        try:
            self._run(x, y, steps)
        finally:
            _native.library = saved  # type: ignore[assignment]

    def _run(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(self.model(x), y).backward()
            self.opt.step()
            if self.monitor is not None:
                self.monitor.step()
        self.means.append((time.perf_counter() - t0) / steps)


def bench(
    title: str, make: Callable[[], nn.Module], batch: int, n_in: int, rounds: int, steps: int, steps1: int
) -> dict[str, float]:
    torch.manual_seed(0)
    base = make()
    x, y = torch.randn(batch, n_in), torch.randint(0, 10, (batch,))
    modes = [
        (Mode("none", copy.deepcopy(base), None, False), steps),
        (Mode("every=100", copy.deepcopy(base), 100, True), steps),
        (Mode("every=1", copy.deepcopy(base), 1, True), steps1),
        (Mode("every=1, no swamping", copy.deepcopy(base), 1, False), steps1),
        (Mode("every=1, tensor path", copy.deepcopy(base), 1, True, native=False), steps1),
    ]
    for m, _ in modes:  # warm-up: first-call costs (allocator, threshold tables) out of the measurement
        m.run(x, y, 3)
        m.means.clear()
        if m.monitor is not None:
            m.monitor.reset()
    for r in range(rounds):
        order = modes if r % 2 == 0 else modes[::-1]  # alternate the order: no mode always runs first
        for m, n in order:
            m.run(x, y, n)
    # Check the sampled path really ran (and read, which syncs, only now).
    for m, n in modes:
        if m.monitor is not None:
            assert m.monitor.read().sampled == len(range(0, rounds * n, m.monitor.config.every))
    none = modes[0][0].means
    print(
        f"\n{title}  (batch {batch}, {rounds} rounds x {steps} steps ({steps1} for every=1), "
        f"torch threads {torch.get_num_threads()})"
    )
    print(f"  {'mode':<22} {'median ms/step':>15} {'median ratio':>13} {'min ratio':>10} {'overhead':>9}")
    out = {}
    for m, _ in modes:
        ratio = statistics.median(a / b for a, b in zip(m.means, none, strict=True))
        out[m.name] = ratio
        print(
            f"  {m.name:<22} {statistics.median(m.means) * 1e3:>15.3f} {ratio:>13.3f} "
            f"{min(m.means) / min(none):>10.3f} {(ratio - 1) * 100:>8.1f}%"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run (fewer rounds)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds = pairs per mode (default 20, quick 3)")
    ap.add_argument("--steps1", type=int, default=20, help="steps per round of the every=1 modes (default 20)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 20)
    r = bench("MLP 512-1024-1024-10 (target model)", mlp, 256, 512, rounds, 100, args.steps1)
    bench("deep tanh MLP 30x32 (worst case, no target)", deep_tanh, 64, 16, rounds, 100, args.steps1)
    ok100 = r["every=100"] <= 1.03
    ok1 = r["every=1"] <= 1.50
    print(
        f"\ntargets on the MLP (median of {rounds} pairs): every=100 ratio {r['every=100']:.3f} <= 1.03: "
        f"{'met' if ok100 else 'NOT met'}; every=1 ratio {r['every=1']:.3f} <= 1.50: {'met' if ok1 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
