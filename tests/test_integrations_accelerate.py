"""lossscale.integrations.accelerate against the real accelerate package (tiny GPT-2 from a config, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

import accelerate  # noqa: E402

from lossscale import LossScaler  # noqa: E402
from lossscale.integrations.accelerate import Accelerator, unwrap_optimizer  # noqa: E402

from .integration_utils import (  # noqa: E402
    GemmRecorder,
    doc_example,
    gradscaler_trajectory,
    params_equal,
    fresh_accelerate_state,
    unscaled_norm,
)
from .integration_utils import BATCH, SEQ, VOCAB  # noqa: E402
from .integration_utils import tiny_gpt2 as _tiny_gpt2  # noqa: E402

pytestmark = pytest.mark.usefixtures(fresh_accelerate_state.__name__)


tiny_gpt2 = _tiny_gpt2  # no dropout: the steps are compared bit for bit


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]


def train(acc, model, opt, data, *, clip=None, inject_inf_at=(), start=0, record=None):
    """One optimizer step per batch; returns per-step (scale after, skipped, norm, expected norm)."""
    out = []
    for i, ids in enumerate(data, start=start):
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        if i in inject_inf_at:
            next(iter(model.parameters())).grad.view(-1)[0] = math.inf
        scale = acc.scaler.get_scale() if acc.scaler is not None else 1.0
        expected = unscaled_norm(list(model.parameters()), scale)
        norm = acc.clip_grad_norm_(model.parameters(), clip) if clip is not None else None
        opt.step()
        opt.zero_grad()
        out.append((acc.scaler.get_scale() if acc.scaler else 1.0, opt.step_was_skipped, norm, expected))
    return out


def setup(precision="fp16-mixed", scaler=None, seed=0, lr=1e-2, fused=False):
    acc = Accelerator(precision=precision, scaler=scaler, cpu=True)
    model = tiny_gpt2(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused or None)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def test_fp16_on_cpu_is_emulated():
    acc, model, opt = setup()
    ids = batches(1)[0]
    with GemmRecorder() as rec:
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
    assert len(rec.records) >= 10  # forward and backward GEMMs of 2 blocks + lm_head
    assert rec.dtypes() == {torch.float32}  # emulated: FP32 tensors ...
    assert rec.all_representable()  # ... holding FP16 values, forward and backward
    assert loss.dtype == torch.float32


def test_plain_accelerate_fp16_on_cpu_is_fp32():
    """Negative control: accelerate's own fp16 on CPU sets no autocast and no scaler (silently FP32)."""
    acc = accelerate.Accelerator(mixed_precision="fp16", cpu=True)
    model = tiny_gpt2()
    model = acc.prepare(model)
    assert acc.scaler is None
    ids = batches(1)[0]
    with GemmRecorder() as rec:
        model(input_ids=ids, labels=ids).loss.backward()
    assert rec.dtypes() == {torch.float32}
    assert not rec.any_representable()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_scale_trajectory_and_skip(fused):
    scaler = LossScaler(init_scale=2.0**10, growth_interval=2)
    acc, model, opt = setup(scaler=scaler, fused=fused)
    # A fused optimizer unscales and skips inside its own step (accelerate alone reports no skip then).
    assert getattr(unwrap_optimizer(opt), "_step_supports_amp_scaling", False) == fused
    assert acc.scaler is scaler
    inf_at = 3
    before = {}

    data = batches(7)
    got = []
    for i, ids in enumerate(data):
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        if i == inf_at:
            next(iter(model.parameters())).grad.view(-1)[0] = math.inf
            before = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt.step()
        if i == inf_at:
            assert opt.step_was_skipped and acc.optimizer_step_was_skipped
            after = dict(model.named_parameters())
            assert all(torch.equal(before[k], after[k]) for k in before)  # a skipped step changes nothing
        else:
            assert not opt.step_was_skipped
        opt.zero_grad()
        got.append(scaler.get_scale())
    assert got == gradscaler_trajectory(2.0**10, 2, {inf_at}, 7)
    assert scaler.skipped_steps == 1
    metrics = acc.scaler_metrics()
    assert metrics["skipped_steps"].item() == 1.0 and metrics["loss_scale"].item() == got[-1]


def test_clip_acts_on_unscaled_gradients():
    acc, model, opt = setup(scaler=LossScaler(init_scale=2.0**16))
    rows = train(acc, model, opt, batches(2), clip=1.0)
    for _, skipped, norm, expected in rows:
        assert not skipped
        assert math.isfinite(norm.item()) and norm.item() < 100.0
        assert torch.equal(norm, expected)  # bit-equal to the FP32 norm of grad / scale


def test_plain_accelerate_with_injected_scaler_clips_scaled_gradients():
    """Negative control: plain accelerate never unscales an injected scaler, so clipping sees S * norm."""
    acc = accelerate.Accelerator(cpu=True)
    acc.scaler = LossScaler(init_scale=2.0**16)
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    ids = batches(1)[0]
    acc.backward(model(input_ids=ids, labels=ids).loss)
    true = unscaled_norm(list(model.parameters()), 2.0**16)
    norm = acc.clip_grad_norm_(model.parameters(), 1.0)
    assert norm.item() == pytest.approx(2.0**16 * true.item(), rel=1e-5)
    assert norm.item() > 1e4


def _scaler():
    return LossScaler(init_scale=2.0**12, growth_interval=2)


def test_resume_is_bit_exact(tmp_path):
    data = batches(10)
    acc, ref_model, ref_opt = setup(scaler=_scaler())
    rows = train(acc, ref_model, ref_opt, data)
    scales = [r[0] for r in rows]
    assert len(set(scales)) > 2  # the scale moved during the run, so its state matters at the resume point

    acc, model, opt = setup(scaler=_scaler())
    train(acc, model, opt, data[:5])
    acc.save_state(str(tmp_path / "ckpt"))
    del acc, model, opt

    acc, model, opt = setup(scaler=_scaler(), seed=123)  # different init: everything must come from the checkpoint
    acc.load_state(str(tmp_path / "ckpt"))
    assert acc.scaler.get_scale() == scales[4]
    train(acc, model, opt, data[5:], start=5)
    assert params_equal(model, ref_model)

    # Negative control: the same resume with the scaler state thrown away does not end bit-identical.
    acc, model, opt = setup(scaler=_scaler(), seed=123)
    acc.load_state(str(tmp_path / "ckpt"))
    acc.scaler.load_state_dict(_scaler().state_dict())
    train(acc, model, opt, data[5:], start=5)
    assert not params_equal(model, ref_model)


def test_bf16_has_no_default_scaler_and_options_are_checked():
    acc = Accelerator(precision="bf16-mixed", cpu=True)
    assert acc.scaler is None
    acc.unscale_gradients()  # a no-op without a scaler
    assert isinstance(Accelerator(precision="fp8-hybrid", cpu=True).scaler, LossScaler)
    assert isinstance(Accelerator(precision="bf16-mixed", scaler=True, cpu=True).scaler, LossScaler)
    assert Accelerator(precision="fp16-mixed", scaler=False, cpu=True).scaler is None
    with pytest.raises(ValueError, match="precision="):
        Accelerator(precision="fp16-mixed", mixed_precision="fp16", cpu=True)
    with pytest.raises(TypeError, match="scaler"):
        Accelerator(precision="fp16-mixed", scaler=torch.amp.GradScaler("cpu"), cpu=True)
    with pytest.raises(ValueError, match="weights"):
        Accelerator(precision="bf16-pure", cpu=True)
    with pytest.raises(TypeError, match="emulate"):
        Accelerator(precision="fp16-mixed", emulate="yes", cpu=True)


def test_fp8_recipe_on_cpu_and_autocast_context():
    acc, model, opt = setup(precision="fp8-hybrid")
    rows = train(acc, model, opt, batches(2), clip=1.0)
    assert all(math.isfinite(r[2].item()) for r in rows if not r[1])
    x = torch.tensor([[1.0 + 2.0**-9]])
    with acc.autocast():
        y = torch.nn.functional.linear(x, torch.ones(1, 1))
    assert y.item() == 1.0  # rounded to E4M3 on the way in
    with acc.autocast(accelerate.utils.AutocastKwargs(enabled=False)):
        y = torch.nn.functional.linear(x, torch.ones(1, 1))
    assert y.item() == 1.0 + 2.0**-9  # FP32 inside a disabled block


def test_unwrap_optimizer_by_type():
    acc, model, opt = setup()
    inner = unwrap_optimizer(opt)
    assert type(inner) is torch.optim.AdamW
    with pytest.raises(TypeError):
        unwrap_optimizer(torch.optim.lr_scheduler.StepLR(inner, 1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_native_with_loss_scaler():
    acc = Accelerator(precision="fp16-mixed")
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    ids = batches(1)[0].to(acc.device)
    with GemmRecorder() as rec:
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
    assert torch.float16 in rec.dtypes()
    norm = acc.clip_grad_norm_(model.parameters(), 1.0)
    assert math.isfinite(norm.item())
    opt.step()


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(doc_example("accelerate"), "docs/integrations.md", "exec"), {})  # noqa: S102 - our own docs
    scale, skipped, was_skipped, norm = capsys.readouterr().out.split()
    assert float(scale) > 0 and int(skipped) >= 0 and was_skipped in ("True", "False")
    assert math.isfinite(float(norm)) and (tmp_path / "ckpt" / "scaler.pt").is_file()


@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed", "fp8-hybrid"])
def test_disabled_autocast_handler_is_fp32_inside_an_autocast_block(precision):
    """AutocastKwargs(enabled=False) nested in the recipe's autocast (as inside a prepared model's forward)
    computes exact FP32: 1.0001 survives (every recipe here would round it to 1.0)."""
    acc = Accelerator(precision=precision, cpu=True)
    x = torch.full((1, 1), 1.0001)
    with acc.autocast():
        assert (x @ torch.ones(1, 1)).item() == 1.0  # the recipe rounds it
        with acc.autocast(accelerate.utils.AutocastKwargs(enabled=False)):
            y = x @ torch.ones(1, 1)
        assert (x @ torch.ones(1, 1)).item() == 1.0  # and again after the block
    assert y.dtype == torch.float32 and y.item() == x.item()
    model = acc.prepare(torch.nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model.weight.fill_(1.0)

    def forward(inp):
        with acc.autocast(accelerate.utils.AutocastKwargs(enabled=False)):
            return inp @ torch.ones(1, 1)

    inner = torch.nn.Module()
    inner.forward = forward
    wrapped = acc.prepare(inner)
    assert wrapped(x).item() == x.item()  # FP32 block inside a prepared model's forward
    assert model(x).item() == 1.0  # the prepared model's own forward is rounded
