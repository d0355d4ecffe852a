"""lossscale.integrations.transformers against the real transformers Trainer (tiny GPT-2 from a config, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lossscale import LossScaler  # noqa: E402
from lossscale.integrations._common import monitor_summary  # noqa: E402
from lossscale.integrations.transformers import GradientMonitorCallback, LossScaleTrainer  # noqa: E402

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


def tiny_gpt2(seed: int = 0, dropout: float = 0.1) -> torch.nn.Module:
    return _tiny_gpt2(seed, dropout)  # the Trainer tests keep GPT-2's default dropout


def dataset(n: int = 40, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), use_cpu=True, max_steps=4, per_device_train_batch_size=BATCH, logging_steps=1,
        report_to=[], save_strategy="no", disable_tqdm=True, learning_rate=1e-3, seed=0, dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


class InfAt(transformers.TrainerCallback):
    """Makes the first parameter's gradient infinite during the backward of optimizer step ``k`` (0-based)."""

    def __init__(self, model: torch.nn.Module, k: int) -> None:
        self.k, self.now = k, -1
        next(iter(model.parameters())).register_hook(self._hook)

    def on_step_begin(self, args, state, control, **kwargs):
        self.now = state.global_step

    def _hook(self, g):
        return torch.full_like(g, math.inf) if self.now == self.k else g


class Probe(LossScaleTrainer):
    """Records, right after each backward (before any unscale or clip), the FP32 norm of grad / scale."""

    expected: list[float]

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        self.expected = [*getattr(self, "expected", []), unscaled_norm(list(model.parameters()), scale).item()]
        return loss


def train_logs(trainer):
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_fp16_true_on_cpu_is_emulated(tmp_path):
    # Without dropout: the emulated attention's dropout path feeds an FP32 operand (dO / rowsum) into its
    # backward GEMMs (a limitation of lossscale.emulate's composite attention, not of this integration).
    trainer = LossScaleTrainer(
        model=tiny_gpt2(dropout=0.0), args=args(tmp_path, fp16=True, max_steps=1), train_dataset=dataset()
    )
    assert trainer.precision.name == "fp16-mixed" and isinstance(trainer.scaler, LossScaler)
    with GemmRecorder() as rec:
        trainer.train()
    assert len(rec.records) >= 10
    assert rec.dtypes() == {torch.float32}
    assert rec.all_representable()


def test_plain_trainer_fp16_on_cpu_is_fp32(tmp_path):
    """Negative control: TrainingArguments(fp16=True, use_cpu=True) with the plain Trainer is silently FP32."""
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args(tmp_path, fp16=True, max_steps=1), train_dataset=dataset()
    )
    assert trainer.accelerator.scaler is None
    with GemmRecorder() as rec:
        trainer.train()
    assert rec.dtypes() == {torch.float32}
    assert not rec.any_representable()


def test_trajectory_skip_scheduler_and_true_grad_norm(tmp_path):
    model = tiny_gpt2()
    scaler = LossScaler(init_scale=2.0**10, growth_interval=2)
    inf_at = 2
    trainer = Probe(
        model=model, args=args(tmp_path, max_steps=6),
        train_dataset=dataset(), precision="fp16-mixed", scaler=scaler, callbacks=[InfAt(model, inf_at)],
    )
    logs = train_logs(trainer)
    assert [h["loss_scale"] for h in logs] == gradscaler_trajectory(2.0**10, 2, {inf_at}, 6)
    assert [h["skipped_steps"] for h in logs] == [0, 0, 1, 1, 1, 1]
    # The LR scheduler is not stepped on the skipped step: the learning rate logged after it repeats.
    lrs = [h["learning_rate"] for h in logs]
    assert lrs[inf_at + 1] == lrs[inf_at] and lrs[1] != lrs[0] and lrs[4] != lrs[3]
    # max_grad_norm=1.0 (the default) acted on the unscaled gradients: the logged norm is their FP32 norm.
    for i, h in enumerate(logs):
        if i == inf_at:
            assert not math.isfinite(h["grad_norm"])
        else:
            assert math.isfinite(h["grad_norm"]) and 1.0 < h["grad_norm"] < 100.0  # the threshold was active
            assert h["grad_norm"] == trainer.expected[i]


def test_plain_trainer_with_injected_scaler_logs_the_scaled_norm(tmp_path):
    """Negative control: a scaler injected into the plain Trainer's accelerator is never unscaled before
    max_grad_norm clipping, so the logged grad_norm is the scaled one (~ 2^16 times too large)."""
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args(tmp_path, max_steps=1), train_dataset=dataset())
    trainer.accelerator.scaler = LossScaler(init_scale=2.0**16)
    logs = train_logs(trainer)
    ours = LossScaleTrainer(
        model=tiny_gpt2(), args=args(tmp_path, max_steps=1), train_dataset=dataset(), precision="fp32", scaler=True
    )
    true = train_logs(ours)[0]["grad_norm"]
    assert logs[0]["grad_norm"] == pytest.approx(2.0**16 * true, rel=1e-4)
    assert logs[0]["grad_norm"] > 1e4


class StopAt(transformers.TrainerCallback):
    def __init__(self, k: int) -> None:
        self.k = k

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.k:
            control.should_save = True
            control.should_training_stop = True


def _scaler():
    return LossScaler(init_scale=2.0**12, growth_interval=2)


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    kw = dict(max_steps=10, save_strategy="steps", save_steps=100)
    ref = LossScaleTrainer(
        model=tiny_gpt2(), args=args(tmp_path / "ref", **kw), train_dataset=dataset(), precision="fp16-mixed",
        scaler=_scaler(),
    )
    scales = [h["loss_scale"] for h in train_logs(ref)]
    assert len(set(scales)) > 2  # the scale moved, so its state matters at the resume point

    first = LossScaleTrainer(
        model=tiny_gpt2(), args=args(tmp_path / "run", **kw), train_dataset=dataset(), precision="fp16-mixed",
        scaler=_scaler(), callbacks=[StopAt(5)],
    )
    first.train()
    assert first.state.global_step == 5
    ckpt = tmp_path / "run" / "checkpoint-5"
    assert (ckpt / "scaler.pt").is_file()

    scaler = _scaler()
    resumed = LossScaleTrainer(
        model=tiny_gpt2(seed=123), args=args(tmp_path / "run", **kw), train_dataset=dataset(),
        precision="fp16-mixed", scaler=scaler,
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 10
    assert scaler.get_scale() == scales[-1]
    assert params_equal(resumed.model, ref.model)

    # Negative control: the same resume without scaler.pt (the scaler restarts at 2^12) is not bit-identical.
    (ckpt / "scaler.pt").unlink()
    blind = LossScaleTrainer(
        model=tiny_gpt2(seed=123), args=args(tmp_path / "run", **kw), train_dataset=dataset(),
        precision="fp16-mixed", scaler=_scaler(),
    )
    blind.train(resume_from_checkpoint=str(ckpt))
    assert not params_equal(blind.model, ref.model)


def test_monitor_summary_in_logs(tmp_path):
    trainer = LossScaleTrainer(
        model=tiny_gpt2(), args=args(tmp_path, max_steps=2), train_dataset=dataset(), precision="fp16-mixed",
        monitor={"formats": "fp16,e5m2", "every": 1},
    )
    logs = train_logs(trainer)
    for h in logs:
        for fmt in ("fp16", "e5m2"):
            for what in ("underflow", "subnormal", "overflow"):
                assert 0.0 <= h[f"grad_health/{fmt}/{what}"] <= 1.0
        # E5M2's smallest subnormal (2^-16) is above FP16's (2^-24): whatever rounds to 0 in FP16 does in E5M2.
        assert h["grad_health/e5m2/underflow"] >= h["grad_health/fp16/underflow"]
    assert logs[-1]["grad_health/e5m2/underflow"] > 0.0  # the scaled gradients do reach below 2^-17
    cb = trainer.monitor_callback
    assert isinstance(cb, GradientMonitorCallback) and cb.monitor is not None
    assert cb.monitor.read().sampled == 2
    # the monitor watched the torch optimizer inside the AcceleratedOptimizer, at the scaler's scale
    stats = cb.monitor.read()
    assert stats.scales.tolist() == [65536.0, 65536.0]
    # the logged numbers are the last sampled step's summary
    summary = monitor_summary(stats)
    assert {k: logs[-1][k] for k in summary} == summary


def test_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="precision="):
        LossScaleTrainer(model=tiny_gpt2(), args=args(tmp_path, fp16=True), precision="bf16-mixed")
    trainer = LossScaleTrainer(model=tiny_gpt2(), args=args(tmp_path, bf16=True))
    assert trainer.precision.name == "bf16-mixed" and trainer.scaler is None
    trainer = LossScaleTrainer(model=tiny_gpt2(), args=args(tmp_path), precision="fp8-hybrid")
    assert isinstance(trainer.scaler, LossScaler)
    with pytest.raises(TypeError, match="monitor"):
        LossScaleTrainer(model=tiny_gpt2(), args=args(tmp_path), monitor=3.5)


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(doc_example("Hugging Face Trainer"), "docs/integrations.md", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out
    assert "'loss_scale': 65536.0" in out and "'grad_health/e5m2/underflow'" in out
    assert (tmp_path / "out" / "checkpoint-10" / "scaler.pt").is_file()


def test_monitor_callback_with_a_plain_trainer(tmp_path):
    cb = GradientMonitorCallback(formats="fp16", every=1)
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args(tmp_path, max_steps=2), train_dataset=dataset(), callbacks=[cb]
    )
    trainer.train()
    stats = cb.monitor.read()
    assert stats.sampled == 2 and np.isnan(stats.scales).all()  # no scaler in a plain FP32 Trainer
    # It watched the torch optimizer inside the AcceleratedOptimizer (unwrapped by type): its step hooks saw
    # the weights change ...
    weights = [i for i, e in enumerate(stats.entries) if e.kind == "weight"]
    assert stats.total[weights, stats.columns.updated].sum() > 0
    # ... and its summary of the last sampled step is in `latest`.
    assert cb.latest == monitor_summary(stats) and "grad_health/fp16/underflow" in cb.latest


def test_data_parallel_is_refused(tmp_path):
    """args.n_gpu > 1 without torch.distributed: the Trainer would wrap the model in nn.DataParallel and skip
    accelerator.prepare (the forward would bypass the recipe). Simulated on CPU by setting the GPU count."""
    a = args(tmp_path, fp16=True)
    _ = a._setup_devices
    a._n_gpu = 2
    plain = transformers.Trainer(model=tiny_gpt2(), args=a)
    assert isinstance(plain._wrap_model(plain.model), torch.nn.DataParallel)  # what would happen
    with pytest.raises(ValueError, match=r"DataParallel \(args.n_gpu=2"):
        LossScaleTrainer(model=tiny_gpt2(), args=a)


def test_tensor_parallel_model_is_refused(tmp_path):
    """A tensor-parallel model (transformers' ``tp_size`` property reads ``_tp_size``, set when it is sharded
    at load time): the Trainer clips its DTensor gradients itself without unscaling."""
    model = tiny_gpt2()
    model._tp_size = 2
    assert model.tp_size == 2
    with pytest.raises(ValueError, match=r"tensor parallelism \(model.tp_size=2\)"):
        LossScaleTrainer(model=model, args=args(tmp_path), precision="fp16-mixed")
    model._tp_size = 1  # tp_size 1 is no tensor parallelism: accepted
    assert LossScaleTrainer(model=model, args=args(tmp_path), precision="fp16-mixed").scaler is not None
