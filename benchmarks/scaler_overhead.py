"""Per-step cost of loss scaling: unscale_ + step decision + update, LossScaler vs its peers.

Measured side by side in one run, alternating the implementations (their order rotates each repetition) on
the same gradients, refreshed (outside the timed region) before every step:

* ``lossscale``: ``LossScaler`` (``unscale_``, ``step`` on an optimizer whose ``step`` does nothing,
  ``update``);
* ``torch``: ``torch.amp.GradScaler("cpu")``, the same three calls;
* ``deepspeed-alg``: DeepSpeed's fp16 (unfused) optimizer algorithm, reimplemented from its description:
  an overflow check per tensor that sums the tensor and reads the sum on the host (``float(g.float().sum())``,
  inf/NaN test in Python), then ``g.mul_(1 / scale)`` per tensor, then ``DynamicLossScaler.update_scale`` in
  Python (window 1000, hysteresis 2). The deepspeed package itself is not installed (it pulls its own build
  and CUDA tooling).

Gradients: 64 weight matrices holding the requested number of parameters plus 64 bias vectors of 256
elements (a transformer-like count of tensors), FP32, all finite (the common step). Scale 2^16.

Targets (issue 3): lossscale <= 1.05x torch at 10M and 100M parameters, <= 1.3x at 1M; cost linear in the
number of parameters.

A last line times the scale update alone (``lossscale.scaling.update_scale``, torch's rule, a finite step):
the shortcut through torch's fused kernel ``torch._amp_update_scale_`` against the library's tensor form of
the rule (``impl="fallback"``), alternating; it says what keeping the kernel behind ``_compat`` buys.

Usage::

    .venv/bin/python benchmarks/scaler_overhead.py                   # 1M, 10M, 100M; 1 thread
    .venv/bin/python benchmarks/scaler_overhead.py --sizes 1e6 --reps 300 --threads 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lossscale import LossScaler  # noqa: E402
from lossscale.scaling import DynamicScaling, init_state, update_scale  # noqa: E402

N_MATRICES = 64
BIAS = 256


class NoopOptimizer(torch.optim.Optimizer):
    """An optimizer whose step does nothing: only the scaler's work is timed."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        return None


class DeepSpeedAlgorithm:
    """DeepSpeed's unfused fp16 path: per-tensor host-side overflow check, per-tensor unscale, Python update.

    Written from DeepSpeed's documented behaviour (``has_overflow_serial``/``_has_inf_or_nan`` and
    ``DynamicLossScaler.update_scale``); its code is not copied.
    """

    def __init__(self, init_scale: float = 2.0**16, scale_window: int = 1000, hysteresis: int = 2) -> None:
        self.cur_scale = init_scale
        self.scale_window = scale_window
        self.delayed_shift = hysteresis
        self.cur_hysteresis = hysteresis
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.min_scale = 1.0

    @staticmethod
    def _has_inf_or_nan(x: torch.Tensor) -> bool:
        s = float(x.float().sum())  # a host read per tensor
        return s in (math.inf, -math.inf) or s != s

    def step(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        overflow = any(p.grad is not None and self._has_inf_or_nan(p.grad) for p in params)
        if not overflow:
            inv = 1.0 / self.cur_scale
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(inv)
            optimizer.step()
        self.update_scale(overflow)

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / 2.0, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        elif (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
            self.cur_scale *= 2.0
            self.cur_hysteresis = self.delayed_shift
        self.cur_iter += 1


def make_params(n: int) -> list[torch.nn.Parameter]:
    per = max(1, (n - N_MATRICES * BIAS) // N_MATRICES)
    cols = 1024 if per >= 1024 else per
    rows = max(1, per // cols)
    params = []
    for _ in range(N_MATRICES):
        params.append(torch.nn.Parameter(torch.empty(rows, cols)))
        params.append(torch.nn.Parameter(torch.empty(BIAS)))
    return params


def bench(n: int, reps: int, warmup: int) -> dict[str, float]:
    params = make_params(n)
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(p.shape, generator=gen) for p in params]
    for p, b in zip(params, base, strict=True):
        p.grad = b.clone()
    opt = NoopOptimizer(params)
    ours = LossScaler()
    ref = torch.amp.GradScaler("cpu")
    ds = DeepSpeedAlgorithm()
    ours.scale(torch.ones(()))
    ref.scale(torch.ones(()))

    def run_scaler(s: LossScaler | torch.amp.GradScaler) -> Callable[[], None]:
        def f() -> None:
            s.unscale_(opt)
            s.step(opt)
            s.update()

        return f

    impls: dict[str, Callable[[], None]] = {
        "lossscale": run_scaler(ours),
        "torch": run_scaler(ref),
        "deepspeed-alg": lambda: ds.step(params, opt),
    }
    names = list(impls)
    times: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(warmup + reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            for p, b in zip(params, base, strict=True):
                p.grad.copy_(b)  # type: ignore[union-attr]
            t0 = time.perf_counter()
            impls[name]()
            dt = time.perf_counter() - t0
            if rep >= warmup:
                times[name].append(dt)
    assert ours.skipped_steps == 0 and ours.get_scale() == ref.get_scale()
    return {k: statistics.median(v) for k, v in times.items()}


def bench_update(reps: int, calls: int = 200) -> dict[str, float]:
    """Median seconds per ``update_scale`` call (torch's rule, finite steps), kernel vs tensor rule."""
    cfg = DynamicScaling()
    state, found = init_state(cfg), torch.zeros(())
    times: dict[str, list[float]] = {"fused": [], "fallback": []}
    for rep in range(reps):
        for impl in ("fused", "fallback") if rep % 2 == 0 else ("fallback", "fused"):
            t0 = time.perf_counter()
            for _ in range(calls):
                update_scale(state, found, cfg, impl=impl)  # type: ignore[arg-type]
            times[impl].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="parameter counts")
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions per size (default: by size)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); median per step, implementations alternating")
    print(
        f"{'params':>8} {'lossscale':>11} {'torch':>11} {'ds-alg':>11} {'ours/torch':>11} {'ours/ds':>8}"
        f" {'ns/param':>9} {'target':>7}"
    )
    for size in args.sizes:
        n = int(size)
        reps = args.reps or (200 if n <= 2_000_000 else 40 if n <= 20_000_000 else 9)
        m = bench(n, reps, warmup=max(2, reps // 10))
        ratio = m["lossscale"] / m["torch"]
        target = 1.3 if n < 5_000_000 else 1.05
        print(
            f"{n / 1e6:>7.0f}M {m['lossscale'] * 1e3:>9.3f}ms {m['torch'] * 1e3:>9.3f}ms "
            f"{m['deepspeed-alg'] * 1e3:>9.3f}ms {ratio:>10.3f}x {m['lossscale'] / m['deepspeed-alg']:>7.3f}x"
            f" {m['lossscale'] / n * 1e9:>9.3f} {'<=' + str(target) + 'x':>7}"
        )
    u = bench_update(reps=41)
    print(
        f"scale update alone (torch's rule, median of 41 alternating runs of 200 calls): torch kernel "
        f"{u['fused'] * 1e6:.1f}us, tensor rule {u['fallback'] * 1e6:.1f}us per step "
        f"(the kernel saves {(u['fallback'] - u['fused']) * 1e6:.1f}us, {u['fallback'] / u['fused']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
