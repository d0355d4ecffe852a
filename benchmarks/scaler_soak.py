"""A 10,000-step soak: LossScaler and torch.amp.GradScaler in lockstep, 5% of steps injected with inf/NaN.

The default rule, left alone under frequent overflows, backs the scale off until ``1/scale`` overflows FP32
(scale <= 2^-128); from there GradScaler unscales finite gradients into inf/NaN, runs the step, does not
count it as skipped, and the weights become non-finite. LossScaler's rule stops at 2^-127 and skips (and
counts) any step whose ``1/scale`` is not finite.

Both scalers train copies of one small MLP with SGD on the same batches; each step has a 5% chance of one
gradient element set to +inf, -inf or NaN (fixed seed). Printed: the step at which GradScaler's scale first
went below 2^-127, whether scales and weights were bit-identical until then, the first step at which
GradScaler's weights went non-finite, and for LossScaler: any non-finite weight (must be none), injected
steps not skipped (must be 0), the final scale. Exits 1 if a LossScaler claim fails.

Usage::

    .venv/bin/python benchmarks/scaler_soak.py                         # 10,000 steps, growth_interval 50
    .venv/bin/python benchmarks/scaler_soak.py --steps 20000 --seed 1 --growth-interval 100
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lossscale import LossScaler  # noqa: E402
from lossscale.scaling import SCALE_FLOOR  # noqa: E402


def finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def same_bits(m1: nn.Module, m2: nn.Module) -> bool:
    return all(
        torch.equal(p.detach().view(torch.int32), q.detach().view(torch.int32))
        for p, q in zip(m1.parameters(), m2.parameters(), strict=True)
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--growth-interval", type=int, default=50)
    ap.add_argument("--inject-prob", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(1)

    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model_ref = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    model_ours = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    model_ours.load_state_dict(model_ref.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (model_ref, model_ours)]
    ref = torch.amp.GradScaler("cpu", growth_interval=args.growth_interval)
    ours = LossScaler("cpu", growth_interval=args.growth_interval, warn_after_skips=None)
    params = [list(model_ref.parameters()), list(model_ours.parameters())]

    crossed_at: int | None = None
    identical_until_cross = True
    ref_nonfinite_at: int | None = None
    ours_nonfinite_at: int | None = None
    injected = injected_not_skipped = 0
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = torch.randn(32, 16, generator=gen)
        y = torch.randn(32, 4, generator=gen)
        inject = None
        if rng.random() < args.inject_prob:
            i = rng.randrange(len(params[0]))
            inject = (i, rng.randrange(params[0][i].numel()), rng.choice([float("inf"), -float("inf"), float("nan")]))
            injected += 1
        for k, (model, opt, scaler) in enumerate(zip((model_ref, model_ours), opts, (ref, ours), strict=True)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if inject is not None:
                i, j, v = inject
                params[k][i].grad.view(-1)[j] = v  # type: ignore[union-attr]
            scaler.step(opt)
            scaler.update()
        if inject is not None and ours.last_step_skipped is not True:
            injected_not_skipped += 1
        if ours_nonfinite_at is None and not finite(model_ours):
            ours_nonfinite_at = step
        if ref_nonfinite_at is None and not finite(model_ref):
            ref_nonfinite_at = step
        if crossed_at is None:
            if ref.get_scale() < SCALE_FLOOR:
                crossed_at = step
            elif ref.get_scale() != ours.get_scale() or not same_bits(model_ref, model_ours):
                identical_until_cross = False
    seconds = time.perf_counter() - t0

    print(f"soak: {args.steps} steps, {injected} injected with inf/NaN (p={args.inject_prob}), "
          f"growth_interval={args.growth_interval}, seed={args.seed}, {seconds:.1f} s")  # fmt: skip
    print(f"GradScaler's scale first below 2^-127 after update of step: {crossed_at}")
    print(f"scales and weights bit-identical until then: {identical_until_cross}")
    print(f"GradScaler: first non-finite weight at step {ref_nonfinite_at}; final scale {ref.get_scale():g}")
    print(
        f"LossScaler: first non-finite weight at step {ours_nonfinite_at}; injected steps not skipped: "
        f"{injected_not_skipped}; skipped {ours.skipped_steps}; final scale {ours.get_scale():g}"
    )
    ok = ours_nonfinite_at is None and injected_not_skipped == 0 and identical_until_cross
    print("LossScaler claims:", "hold" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
