"""LayerwiseScaler under torch.distributed: 2 CPU processes on gloo (as tests/test_scaler_distributed.py).

Scenarios (each rank writes what it saw; the tests compare the ranks):
- "ddp":       DistributedDataParallel, different data per rank (so per-rank statistics differ), adaptive mode
               (statistics of the previous iteration, all-reduced); rank 1 alone injects an overflow at one
               step: both ranks skip it, name the same culprit, and keep identical per-layer scales and weights.
- "no_reduce": negative control, the same run with the scaler's all-reduces disabled: the per-layer scales
               differ between ranks.
- "current":   stats="current" is refused under torch.distributed (each rank would choose its own scales).
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.slow  # two spawned processes: ~45 s on a loaded 2-core machine

STEPS = 6
OVERFLOW_STEP = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lossscale import LayerwiseScaler

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    model = DDP(inner)
    scaler = LayerwiseScaler(inner, mode="adaptive")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out: dict[str, Any] = {"scales": [], "stepped": [], "culprits": []}
    gen = torch.Generator().manual_seed(10 + rank)
    for t in range(STEPS):
        opt.zero_grad()
        x = torch.randn(16, 8, generator=gen) * (1.0 if rank == 0 else 2.0**-12)  # very different statistics
        before = inner[0].weight.detach().clone()
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        if rank == 1 and t == OVERFLOW_STEP:
            inner[2].weight.grad[0, 0] = math.inf  # type: ignore[index]
        scaler.step(opt)
        scaler.update()
        out["scales"].append(scaler.layer_scales())
        out["stepped"].append(not torch.equal(before, inner[0].weight))
        out["culprits"].append(list(scaler.last_skip.culprits) if scaler.last_step_skipped and scaler.last_skip
                               else [])
    out["weights"] = [p.detach().clone() for p in inner.parameters()]
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        from lossscale import LayerwiseScaler
        from lossscale import layerwise as lw_mod

        results: dict[str, Any] = {"ddp": _run(rank)}
        real = lw_mod._all_reduce
        lw_mod._all_reduce = lambda t, op, group: None
        try:
            results["no_reduce"] = _run(rank)
        finally:
            lw_mod._all_reduce = real
        model = nn.Linear(2, 2)
        scaler = LayerwiseScaler(nn.Sequential(model), stats="current")
        try:
            scaler.scale(model(torch.ones(1, 2)).sum())
            results["current"] = "accepted"
        except ValueError as exc:
            results["current"] = str(exc)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist_layerwise")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ranks_agree_on_per_layer_scales_and_skip_together(results: list[dict[str, Any]]) -> None:
    r0, r1 = results[0]["ddp"], results[1]["ddp"]
    assert r0["scales"] == r1["scales"]
    assert len({v for s in r0["scales"] for v in s.values()}) > 1  # the scales moved and differ per layer
    expected = [t != OVERFLOW_STEP for t in range(STEPS)]
    assert r0["stepped"] == r1["stepped"] == expected
    assert r0["culprits"][OVERFLOW_STEP] == r1["culprits"][OVERFLOW_STEP] == ["2"]
    for a, b in zip(r0["weights"], r1["weights"], strict=True):
        assert torch.equal(a, b)


def test_negative_control_without_all_reduce_scales_diverge(results: list[dict[str, Any]]) -> None:
    r0, r1 = results[0]["no_reduce"], results[1]["no_reduce"]
    assert r0["scales"] != r1["scales"]


def test_current_statistics_refused_under_distributed(results: list[dict[str, Any]]) -> None:
    assert "stats='current' cannot be used under torch.distributed" in results[0]["current"]
