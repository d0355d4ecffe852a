"""LossScaler under torch.distributed: 2 CPU processes on gloo, started once for all scenarios.

Scenarios (each rank writes its observations; the tests below compare them):
- "sharded":   per-rank gradients that differ (as in ZeRO-style sharded optimizers); rank 1 alone injects an
               overflow. With LossScaler both ranks skip together.
- "no_reduce": negative control, the same run with LossScaler's all-reduce disabled: the ranks diverge.
- "torch":     negative control, torch.amp.GradScaler on the same run: the ranks diverge.
- "ddp":       DistributedDataParallel, a non-finite input on rank 1 only: both ranks skip, weights agree.
- "fsdp2":     fully_shard (DTensor gradients) with an overflow in rank 1's local shard: both ranks skip, and
               LossScaler issues no collective of its own (torch reduces found_inf for DTensors).
- "fsdp2_fallback": the same with the plain-PyTorch check on local shards: LossScaler all-reduces itself.
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

STEPS = 8
OVERFLOW_STEPS = {2, 5, 6}  # iterations at which rank 1 alone sees a non-finite gradient


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_local(rank: int, scaler: Any) -> dict[str, Any]:
    """Each rank trains its own shard of parameters (different values and gradients on each rank)."""
    torch.manual_seed(100 + rank)
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scales, stepped, skips = [], [], []
    for t in range(STEPS):
        opt.zero_grad()
        before = model.weight.detach().clone()
        loss = model(torch.randn(4, 6)).square().mean()
        scaler.scale(loss).backward()
        if rank == 1 and t in OVERFLOW_STEPS:
            model.weight.grad[0, 0] = math.inf  # type: ignore[index]
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        stepped.append(not torch.equal(before, model.weight))
        skips.append(_skip_summary(scaler))
    return {"scales": scales, "stepped": stepped, "skips": skips}


def _skip_summary(scaler: Any) -> tuple[str, list[tuple[str, int]]] | None:
    """The forensics of the last step if it was skipped: reason, (culprit name, +inf count) (LossScaler)."""
    if getattr(scaler, "last_step_skipped", None) is not True:
        return None
    ev = scaler.last_skip
    return (ev.reason, [(c.name, c.posinf) for c in ev.culprits])


def _scenario_ddp(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lossscale import LossScaler

    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = LossScaler(init_scale=2.0**10, growth_interval=3)
    torch.manual_seed(rank)
    scales = []
    for t in range(STEPS):
        opt.zero_grad()
        x = torch.randn(4, 6)
        if rank == 1 and t in OVERFLOW_STEPS:
            x[0, 0] = math.nan
        scaler.scale(model(x).square().mean()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"scales": scales, "params": flat, "skipped": scaler.skipped_steps}


def _scenario_fsdp2(rank: int, fallback: bool = False) -> dict[str, Any]:
    """FSDP2; with ``fallback`` the non-finite check runs in plain PyTorch on the local shards (no DTensor
    reduction inside), so LossScaler must issue its own all-reduce."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lossscale import LossScaler, _compat
    from lossscale import scaler as scaler_mod

    calls = {"n": 0}
    real = scaler_mod._all_reduce_max
    real_check = _compat.non_finite_check_and_unscale_

    def counting(t: torch.Tensor, group: Any) -> None:
        calls["n"] += 1
        real(t, group)

    def forced_fallback(grads: list[torch.Tensor], found: torch.Tensor, inv: torch.Tensor, **_: Any) -> bool:
        return real_check(grads, found, inv, impl="fallback")

    # Patched in this worker process only.
    scaler_mod._all_reduce_max = counting  # count LossScaler's own collectives
    if fallback:
        _compat.non_finite_check_and_unscale_ = forced_fallback  # type: ignore[assignment]
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = LossScaler(init_scale=2.0**10, growth_interval=3)
    torch.manual_seed(rank)
    scales, stepped, skips = [], [], []
    weight = model[0].weight
    for t in range(STEPS):
        opt.zero_grad()
        before = weight.to_local().detach().clone()
        scaler.scale(model(torch.randn(4, 6)).square().mean()).backward()
        if rank == 1 and t in OVERFLOW_STEPS:
            weight.grad.to_local()[0, 0] = math.inf  # type: ignore[union-attr]
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        stepped.append(not torch.equal(before, weight.to_local()))
        skips.append(_skip_summary(scaler))
    scaler_mod._all_reduce_max = real
    _compat.non_finite_check_and_unscale_ = real_check  # type: ignore[assignment]
    full = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
    return {
        "scales": scales,
        "stepped": stepped,
        "own_collectives": calls["n"],
        "finite": bool(torch.isfinite(full).all()),
        "is_dtensor": type(weight.grad).__name__ if weight.grad is not None else None,
        "skips": skips,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # A timeout turns a mismatched collective into an error instead of a hung test run.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        from lossscale import LossScaler
        from lossscale import scaler as scaler_mod

        results: dict[str, Any] = {}
        results["sharded"] = _train_local(rank, LossScaler(init_scale=2.0**10, growth_interval=2))
        real = scaler_mod._all_reduce_max
        scaler_mod._all_reduce_max = lambda t, group: None
        try:
            results["no_reduce"] = _train_local(rank, LossScaler(init_scale=2.0**10, growth_interval=2))
        finally:
            scaler_mod._all_reduce_max = real
        results["torch"] = _train_local(rank, torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2))
        results["ddp"] = _scenario_ddp(rank)
        results["fsdp2"] = _scenario_fsdp2(rank)
        results["fsdp2_fallback"] = _scenario_fsdp2(rank, fallback=True)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_sharded_gradients_skip_together(results: list[dict[str, Any]]) -> None:
    r0, r1 = results[0]["sharded"], results[1]["sharded"]
    expected_stepped = [t not in OVERFLOW_STEPS for t in range(STEPS)]
    assert r0["stepped"] == expected_stepped
    assert r1["stepped"] == expected_stepped
    assert r0["scales"] == r1["scales"]
    # init 1024, growth every 2 finite steps: t0 F, t1 F -> 2048, t2 overflow -> 1024, t3, t4 -> 2048,
    # t5 -> 1024, t6 -> 512, t7 F.
    assert r0["scales"] == [1024, 2048, 1024, 1024, 2048, 1024, 512, 512]
    # Forensics: the rank that overflowed names its parameter; the other says the flag came from elsewhere.
    for t in range(STEPS):
        if t in OVERFLOW_STEPS:
            assert r1["skips"][t] == ("nonfinite_grads", [("param_groups[0].params[0]", 1)])
            assert r0["skips"][t] == ("external", [])
        else:
            assert r0["skips"][t] is None and r1["skips"][t] is None


@pytest.mark.parametrize("control", ["no_reduce", "torch"])
def test_negative_control_without_reduction_diverges(results: list[dict[str, Any]], control: str) -> None:
    r0, r1 = results[0][control], results[1][control]
    assert r0["stepped"] == [True] * STEPS  # rank 0 never sees the overflow and steps every time
    assert r1["stepped"] == [t not in OVERFLOW_STEPS for t in range(STEPS)]
    assert r0["scales"] != r1["scales"]


def test_ddp_skips_together(results: list[dict[str, Any]]) -> None:
    r0, r1 = results[0]["ddp"], results[1]["ddp"]
    assert r0["scales"] == r1["scales"]
    assert r0["skipped"] == r1["skipped"] == len(OVERFLOW_STEPS)
    assert torch.equal(r0["params"], r1["params"])
    assert bool(torch.isfinite(r0["params"]).all())


def test_fsdp2_fallback_check_adds_the_collective(results: list[dict[str, Any]]) -> None:
    r0, r1 = results[0]["fsdp2_fallback"], results[1]["fsdp2_fallback"]
    expected_stepped = [t not in OVERFLOW_STEPS for t in range(STEPS)]
    assert r0["stepped"] == expected_stepped and r1["stepped"] == expected_stepped
    assert r0["scales"] == r1["scales"] == results[0]["fsdp2"]["scales"]
    assert r0["own_collectives"] == r1["own_collectives"] == STEPS  # one per unscale_


def test_fsdp2_skips_together_without_extra_collective(results: list[dict[str, Any]]) -> None:
    r0, r1 = results[0]["fsdp2"], results[1]["fsdp2"]
    assert r0["is_dtensor"] == "DTensor"
    expected_stepped = [t not in OVERFLOW_STEPS for t in range(STEPS)]
    assert r0["stepped"] == expected_stepped and r1["stepped"] == expected_stepped
    assert r0["scales"] == r1["scales"]
    assert r0["scales"][2] == r0["scales"][1] / 2
    assert r0["own_collectives"] == r1["own_collectives"] == 0
    assert r0["finite"] and r1["finite"]
    # Forensics read the local shard of the DTensor gradient.
    assert [r1["skips"][t] for t in sorted(OVERFLOW_STEPS)] == [
        ("nonfinite_grads", [("param_groups[0].params[0]", 1)])
    ] * len(OVERFLOW_STEPS)
    assert [r0["skips"][t] for t in sorted(OVERFLOW_STEPS)] == [("external", [])] * len(OVERFLOW_STEPS)
