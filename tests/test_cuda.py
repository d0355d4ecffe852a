"""CUDA checks (`make test-gpu`; skipped without CUDA): native CUDA autocast against the emulation, the
LossScaler with BF16 gradients on CUDA, and the study's CUDA path (native runs, step time, peak memory) in
tiny mode. Run with an existing interpreter and the source tree: PYTHONPATH=src python3 -m pytest -m cuda."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import lossscale

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in BF16 units in the last place between two BF16-representable tensors (sign-magnitude
    patterns mapped to a monotonic integer line)."""

    def line(x: torch.Tensor) -> torch.Tensor:
        bits = x.to(torch.bfloat16).view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (line(a) - line(b)).abs()


@pytest.mark.parametrize("shape", [(256, 512, 384), (64, 1024, 64)])
def test_native_bf16_gemm_within_one_ulp_of_emulation(shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen)
    w = torch.randn(n, k, device="cuda", generator=gen)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        native = F.linear(x, w)
    assert native.dtype == torch.bfloat16
    with lossscale.autocast("bf16-mixed", emulate=True, device_type="cuda"):
        emulated = F.linear(x, w)
    assert emulated.dtype == torch.float32 and torch.equal(emulated, emulated.to(torch.bfloat16).float())
    ulps = _ulps_bf16(native.float(), emulated)
    assert (ulps <= 1).float().mean().item() >= 0.99, ulps.float().mean().item()
    # Negative control: the comparison can fail: inputs perturbed by a few BF16 ulps move most outputs.
    with lossscale.autocast("bf16-mixed", emulate=True, device_type="cuda"):
        off = F.linear(x * (1 + 2.0**-6), w)
    assert (_ulps_bf16(native.float(), off) <= 1).float().mean().item() < 0.99


def test_native_fp16_gemm_within_one_ulp_of_emulation() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(256, 512, device="cuda", generator=gen)
    w = torch.randn(384, 512, device="cuda", generator=gen) * 0.05
    with torch.autocast("cuda", dtype=torch.float16):
        native = F.linear(x, w)
    with lossscale.autocast("fp16-mixed", emulate=True, device_type="cuda"):
        emulated = F.linear(x, w)
    a = native.view(torch.int16).to(torch.int32)
    b = emulated.to(torch.float16).view(torch.int16).to(torch.int32)
    la, lb = torch.where(a < 0, -(a & 0x7FFF), a), torch.where(b < 0, -(b & 0x7FFF), b)
    assert ((la - lb).abs() <= 1).float().mean().item() >= 0.99


def test_loss_scaler_with_bf16_gradients_on_cuda() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 8).cuda().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    ref(x).float().pow(2).mean().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = lossscale.LossScaler(init_scale=2.0**10, growth_interval=1000)
    scaler.scale(model(x).float().pow(2).mean()).backward()
    assert model.weight.grad is not None and model.weight.grad.dtype == torch.bfloat16
    scaler.unscale_(opt)
    # A power-of-two scale commutes with BF16 rounding away from overflow/underflow: unscaled = unscaled run.
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**10 and scaler.skipped_steps == 0
    # An injected inf skips the step (weights unchanged) and halves the scale.
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(x).float().pow(2).mean()).backward()
    assert model.weight.grad is not None
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.skipped_steps == 1 and scaler.get_scale() == 2.0**9
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_study_cuda_path_tiny(tmp_path: pytest.TempPathFactory) -> None:
    from lossscale.study import ledger as L
    from lossscale.study import schema as SC
    from lossscale.study.runner import RunSpec, run_one

    runs = [run_one(RunSpec("cnn", c, 0, "tiny", "cuda")) for c in ("fp32", "bf16-mixed:dynamic", "fp16-mixed:none")]
    runs += [run_one(RunSpec("lm", c, 0, "tiny", "cuda")) for c in ("fp32", "bf16-mixed:none")]
    for r in runs:
        assert r["device"] == "cuda" and r["metric"] is not None
        assert r["step_seconds"] > 0 and r["peak_memory_bytes"] > 0
        assert r["native"] is (r["config"] in ("bf16-mixed:dynamic", "fp16-mixed:none", "bf16-mixed:none"))
    doc = {"config": {"tasks": ["cnn", "lm"]}, "runs": runs}
    row = next(x for x in L.ledger(doc) if x["claim"] == "resnet-speed")
    assert row["verdict"] != L.NOT_MEASURED and "ms" in row["measured"] and "MiB" in row["measured"]
    # The CLI's CUDA path writes a report with the speed table.
    from lossscale.cli import study as cli_study
    import argparse

    parser = argparse.ArgumentParser(prog="lossscale")
    cli_study.register(parser.add_subparsers(dest="command"))
    out = str(tmp_path)
    args = parser.parse_args(["study", "--tiny", "--device", "cuda", "--tasks", "cnn", "--configs",
                              "fp32,bf16-mixed:dynamic", "--no-progress", "--out", out])
    assert args.func(args) == 0
    doc = SC.load_results(os.path.join(out, "results.json"))
    assert doc["environment"].get("gpu")
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "peak memory (MiB)" in md
