"""Step time and optimizer memory of lossscale.optim.AdamW on BF16 weights against its peers, side by side.

Claim checked (issues "Low-precision optimizers" and "One way to do each thing"): on 10M parameters with 2
threads (median over >= 20 alternating pairs in one run),
lossscale's Kahan AdamW with BF16 states is no slower than torch-optimi's Kahan AdamW on BF16 weights
(ratio <= 1.0), its stochastic-rounding AdamW is faster than torchao's BF16 stochastic-rounding AdamW
(ratio < 1.0), and optimizer memory (weights + optimizer state, gradients excluded) is <= 12 bytes per
parameter with FP32 states and <= 8 with BF16 states.

All optimizers run in one process, interleaved round by round (the order reversed every other round, so no
optimizer always follows the same one: the previous step's data in the cache matters), on the same parameter
shapes and gradients, so machine noise hits every column alike; a ratio is the median over rounds of the
per-round ratio. Peers that are not installed, or fail to run here, are skipped
with the reason printed.

    .venv/bin/python benchmarks/optimizers.py [--params 10_000_000] [--threads 2] [--steps 25]
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch

import lossscale


def _shapes(total: int) -> list[tuple[int, ...]]:
    """Ten square matrices plus their bias vectors, about ``total`` elements (a transformer-like mix)."""
    side = int((total / 10) ** 0.5)
    return [(side, side) for _ in range(10)] + [(side,) for _ in range(10)]


def _make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(dtype))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params


def _state_bytes(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> float:
    total = sum(p.numel() * p.element_size() for p in params)  # the weights themselves
    for p in params:
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.numel() == p.numel():  # skip scalar step tensors
                total += v.numel() * v.element_size()
    return total / sum(p.numel() for p in params)


def _candidates() -> list[tuple[str, torch.dtype, Callable[[list[torch.nn.Parameter]], Any]]]:
    lr, wd = 1e-4, 1e-2
    cands: list[tuple[str, torch.dtype, Callable[[list[torch.nn.Parameter]], Any]]] = [
        ("torch AdamW fp32 foreach", torch.float32,
         lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=wd, foreach=True)),
        ("torch AdamW fp32 fused", torch.float32,
         lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=wd, fused=True)),
        ("ours bf16 kahan fp32-state", torch.bfloat16,
         lambda p: lossscale.optim.AdamW(p, lr=lr, weight_decay=wd, compensation="kahan")),
        ("ours bf16 kahan bf16-state", torch.bfloat16,
         lambda p: lossscale.optim.AdamW(p, lr=lr, weight_decay=wd, compensation="kahan", state_dtype="bf16")),
        ("ours bf16 SR fp32-state", torch.bfloat16,
         lambda p: lossscale.optim.AdamW(p, lr=lr, weight_decay=wd, compensation="stochastic", seed=0)),
        ("ours bf16 SR bf16-state", torch.bfloat16,
         lambda p: lossscale.optim.AdamW(p, lr=lr, weight_decay=wd, compensation="stochastic",
                                         state_dtype="bf16", seed=0)),
    ]
    try:
        import optimi

        cands.append(("torch-optimi bf16 kahan", torch.bfloat16,
                      lambda p: optimi.AdamW(p, lr=lr, weight_decay=wd, kahan_sum=True, foreach=True)))
    except Exception as exc:  # noqa: BLE001 - report any import failure and go on
        print(f"skipped torch-optimi: {type(exc).__name__}: {exc}")
    try:
        from torchao.optim import _AdamW

        cands.append(("torchao bf16 SR", torch.bfloat16,
                      lambda p: _AdamW(p, lr=lr, weight_decay=wd, bf16_stochastic_round=True)))
    except Exception as exc:  # noqa: BLE001
        print(f"skipped torchao: {type(exc).__name__}: {exc}")
    return cands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=10_000_000, help="parameter count (default 10M)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--steps", type=int, default=25,
                        help="timed rounds, one step of each optimizer per round, order alternating (default 25)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    shapes = _shapes(args.params)
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n / 1e6:.2f}M parameters, "
          f"{args.steps} rounds after {args.warmup} warm-up steps; ratios: median over rounds of the per-round "
          "ratio (alternating pairs)")

    runs: dict[str, tuple[Any, list[torch.nn.Parameter]]] = {}
    for name, dtype, make in _candidates():
        params = _make_params(shapes, dtype, seed=0)
        try:
            opt = make(params)
            for _ in range(args.warmup):
                opt.step()
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            print(f"skipped {name}: fails on this machine: {last[:200]}")
            continue
        runs[name] = (opt, params)

    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.steps):  # interleaved: one step of each optimizer per round, the order alternating
        for name in names if r % 2 == 0 else names[::-1]:
            opt = runs[name][0]
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}

    def pair_ratio(name: str, ref: str) -> float | None:
        """Median over rounds of this round's step time over the reference's (one alternating pair a round)."""
        if ref not in times:
            return None
        return statistics.median(a / b for a, b in zip(times[name], times[ref], strict=True))
    print(f"\n{'optimizer':30s} {'ms/step':>9s} {'bytes/param':>12s} {'vs torch foreach':>17s} "
          f"{'vs optimi kahan':>16s} {'vs torchao SR':>14s}")
    def ratio(name: str, ref: str) -> str:
        got = pair_ratio(name, ref)
        return "n/a" if got is None else f"{got:.2f}x"

    for name, (opt, params) in runs.items():
        print(f"{name:30s} {med[name]:9.1f} {_state_bytes(opt, params):12.1f} "
              f"{ratio(name, 'torch AdamW fp32 foreach'):>17s} {ratio(name, 'torch-optimi bf16 kahan'):>16s} "
              f"{ratio(name, 'torchao bf16 SR'):>14s}")
    print("\ntargets: 'ours bf16 kahan bf16-state' vs optimi kahan <= 1.00x; 'ours bf16 SR *' vs torchao SR < 1.00x;"
          " bytes/param <= 12 (fp32 states), <= 8 (bf16 states)")


if __name__ == "__main__":
    main()
