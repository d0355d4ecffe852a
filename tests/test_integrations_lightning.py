"""lossscale.integrations.lightning against the real Lightning Trainer (a small LightningModule, CPU)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from lossscale import LossScaler  # noqa: E402
from lossscale.integrations.lightning import LossScalePrecision, unwrap_optimizer  # noqa: E402

from .integration_utils import (  # noqa: E402
    GemmRecorder,
    doc_example,
    gradscaler_trajectory,
    params_equal,
    unscaled_norm,
)

BATCHES_PER_EPOCH = 5


class Net(pl.LightningModule):
    """A 3-layer MLP regression; records what the tests need at Lightning's hooks."""

    def __init__(self, seed: int = 0, inf_at: int | None = None, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )
        self.inf_at, self.lr = inf_at, lr
        self.expected_norms: list[float] = []
        self.scales: list[float] = []
        self.metrics: list[dict[str, float]] = []
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x) * 4.0, y)

    def on_after_backward(self):
        # The gradients here are still scaled: inject the inf, and compute the true norm independently.
        if self.global_step == self.inf_at:
            self.net[0].weight.grad.view(-1)[0] = math.inf
        plugin = self.trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else 1.0
        self.expected_norms.append(unscaled_norm(list(self.parameters()), scale).item())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        plugin = self.trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        self.scales.append(scaler.get_scale() if scaler is not None else 1.0)
        self.metrics.append({k: float(v) for k, v in self.trainer.callback_metrics.items()})
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES_PER_EPOCH * 8, 16, generator=g)
    y = torch.randn(BATCHES_PER_EPOCH * 8, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def trainer(plugin=None, **kw) -> pl.Trainer:
    base = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, max_epochs=1, deterministic=True,
    )
    base.update(kw)
    if plugin is not None:
        base["plugins"] = [plugin]
    return pl.Trainer(**base)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|litlogger|does not have many workers).*")
        yield


def test_fp16_mixed_on_cpu_is_emulated():
    plugin = LossScalePrecision("fp16-mixed", scaler=LossScaler(init_scale=2.0**10))  # a step without overflow
    with GemmRecorder() as rec:
        trainer(plugin, max_steps=1).fit(Net(), loader())
    assert len(rec.records) >= 6  # 3 forward GEMMs + their backward GEMMs
    assert rec.dtypes() == {torch.float32}
    assert rec.all_representable()
    assert plugin.scaler.skipped_steps == 0


def test_plain_lightning_is_not_emulated():
    """Negative controls. Plain ``precision="16-mixed"`` on CPU swaps itself for BF16 autocast (with a warning);
    ``MixedPrecision("16-mixed", "cpu", scaler=LossScaler())`` runs torch's native CPU FP16 kernels (FP16
    tensors, not the emulation of a GPU's rounding); "32-true" is plain FP32."""
    with pytest.warns(UserWarning, match="bf16-mixed"), GemmRecorder() as rec:
        trainer(precision="16-mixed", max_steps=1).fit(Net(), loader())
    assert rec.dtypes() == {torch.bfloat16}

    native = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=LossScaler())
    with GemmRecorder() as rec:
        trainer(native, max_steps=1).fit(Net(), loader())
    assert rec.dtypes() == {torch.float16}

    with GemmRecorder() as rec:
        trainer(precision="32-true", max_steps=1).fit(Net(), loader())
    assert rec.dtypes() == {torch.float32}
    assert not rec.any_representable()


@pytest.fixture(scope="module")
def skipped_run():
    inf_at = 2
    plugin = LossScalePrecision("fp16-mixed", scaler=LossScaler(init_scale=2.0**10, growth_interval=2))
    model = Net(inf_at=inf_at)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(plugin, max_steps=BATCHES_PER_EPOCH, gradient_clip_val=1.0).fit(model, loader())
    return plugin, model, inf_at


def test_scale_trajectory_and_skip_count(skipped_run):
    plugin, model, inf_at = skipped_run
    assert model.scales == gradscaler_trajectory(2.0**10, 2, {inf_at}, BATCHES_PER_EPOCH)
    assert plugin.scaler.skipped_steps == 1
    logged = [m["lossscale/skipped_steps"] for m in model.metrics]
    assert logged == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert [m["lossscale/loss_scale"] for m in model.metrics] == model.scales


def test_lightning_steps_the_scheduler_on_a_skipped_step(skipped_run):
    # Documented behaviour: unlike the HF Trainer, Lightning steps LR schedulers regardless of skips.
    _, model, _ = skipped_run
    assert model.lrs == [0.05 * 0.5**k for k in range(1, BATCHES_PER_EPOCH + 1)]


def test_clip_sees_unscaled_gradients(skipped_run):
    _, model, inf_at = skipped_run
    norms = [m["lossscale/grad_norm"] for m in model.metrics]
    for i, (norm, expected) in enumerate(zip(norms, model.expected_norms, strict=True)):
        if i == inf_at:
            assert not math.isfinite(norm)
        else:
            assert math.isfinite(norm) and norm > 1.0  # the threshold was active
            assert norm == expected  # bit-equal to the FP32 norm of grad / scale
            assert norm < 1e4  # not the scaled norm


class StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.should_stop = True


def _plugin():
    return LossScalePrecision("fp16-mixed", scaler=LossScaler(init_scale=2.0**12, growth_interval=2))


def test_resume_at_epoch_boundary_is_bit_exact(tmp_path):
    ref = Net()
    trainer(_plugin(), max_epochs=2).fit(ref, loader())
    assert len(set(ref.scales)) > 2  # the scale moved, so its state matters at the resume point

    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="first", save_top_k=-1)
    first = Net()
    trainer(_plugin(), max_epochs=2, enable_checkpointing=True, callbacks=[ckpt_cb, StopAfterFirstEpoch()]).fit(
        first, loader()
    )
    assert first.global_step == BATCHES_PER_EPOCH
    path = tmp_path / "first.ckpt"
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["LossScalePrecision"] == first.trainer.precision_plugin.scaler.state_dict()

    resumed = Net(seed=123)
    plugin = _plugin()
    trainer(plugin, max_epochs=2).fit(resumed, loader(), ckpt_path=str(path))
    assert resumed.global_step == 2 * BATCHES_PER_EPOCH
    assert plugin.scaler.get_scale() == ref.scales[-1]
    assert params_equal(resumed, ref)

    # Negative control: the same checkpoint with the scaler state reset does not resume bit-identically.
    ckpt["LossScalePrecision"] = LossScaler(init_scale=2.0**12, growth_interval=2).state_dict()
    torch.save(ckpt, tmp_path / "reset.ckpt")
    blind = Net(seed=123)
    trainer(_plugin(), max_epochs=2).fit(blind, loader(), ckpt_path=str(tmp_path / "reset.ckpt"))
    assert not params_equal(blind, ref)


def test_monitor_metrics_are_logged():
    plugin = LossScalePrecision(
        "fp16-mixed", scaler=LossScaler(init_scale=2.0**10), monitor={"formats": "fp16,e5m2", "every": 2}
    )
    model = Net()
    trainer(plugin, max_steps=3).fit(model, loader())
    for m in model.metrics:
        assert 0.0 <= m["grad_health/fp16/underflow"] <= m["grad_health/e5m2/underflow"] <= 1.0
    stats = plugin.monitor.read()  # hooks removed at teardown; the statistics stay readable
    assert stats.sampled == 2 and stats.steps.tolist() == [0, 2]
    assert model.metrics[-1]["lossscale/skipped_steps"] == 0.0
    assert stats.scales.tolist() == [1024.0, 1024.0]  # measured at the scale in use
    # The monitor saw the torch optimizer's steps (swamping needs its step hooks): weights were updated.
    weights = [i for i, e in enumerate(stats.entries) if e.kind == "weight"]
    assert stats.total[weights, stats.columns.updated].sum() > 0


def test_options_and_state_checks():
    bf16 = LossScalePrecision()
    assert bf16.recipe.name == "bf16-mixed" and bf16.scaler is None and bf16.precision == "bf16-mixed"
    assert LossScalePrecision("16-mixed").precision == "16-mixed"
    fp8 = LossScalePrecision("fp8-hybrid")
    assert isinstance(fp8.scaler, LossScaler) and fp8.precision == "32-true"
    with pytest.raises(ValueError, match="scaler"):
        bf16.load_state_dict(LossScaler().state_dict())
    with pytest.raises(ValueError, match="no loss-scaler state"):
        fp8.load_state_dict({})
    with pytest.raises(ValueError, match="weights"):
        LossScalePrecision("16-true")
    with pytest.raises(TypeError, match="scaler"):
        LossScalePrecision("fp16-mixed", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="monitor"):
        LossScalePrecision("fp16-mixed", monitor=2.0)
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert unwrap_optimizer(pl.core.optimizer.LightningOptimizer(opt)) is opt
    with pytest.raises(TypeError):
        unwrap_optimizer(torch.optim.lr_scheduler.StepLR(opt, 1))


def test_bf16_plugin_runs_emulated_without_scaler():
    plugin = LossScalePrecision("bf16-mixed")
    with GemmRecorder(torch.bfloat16) as rec:
        trainer(plugin, max_steps=2).fit(Net(), loader())
    assert plugin.scaler is None
    assert rec.dtypes() == {torch.float32}
    assert rec.all_representable()  # every GEMM operand holds BF16 values


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(doc_example("Lightning"), "docs/integrations.md", "exec"), {})  # noqa: S102 - our own docs
    scale, skipped = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert scale.startswith("tensor(") and skipped.isdigit()
    (ckpt,) = tmp_path.rglob("*.ckpt")  # Lightning's default checkpoint carries the scaler
    assert torch.load(ckpt, weights_only=False)["LossScalePrecision"]["state"]["scale"] == float(scale[7:-2])


class ValNet(Net):
    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)


def test_resume_from_checkpoint_without_scaler_state_is_refused(tmp_path):
    """A checkpoint of a BF16 run (no "LossScalePrecision" key) resumed by an FP16 plugin with a scaler:
    ValueError at the first optimizer step, no weight changed; validating from it is fine."""
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="bf16", save_top_k=-1)
    trainer(
        LossScalePrecision("bf16-mixed"), max_epochs=2, enable_checkpointing=True,
        callbacks=[ckpt_cb, StopAfterFirstEpoch()],
    ).fit(Net(), loader())
    path = tmp_path / "bf16.ckpt"
    assert "LossScalePrecision" not in torch.load(path, weights_only=False)
    model = ValNet(seed=5)
    trainer(_plugin()).validate(model, loader(), ckpt_path=str(path))  # no step: no scaler state needed
    before = [p.detach().clone() for p in model.parameters()]
    plugin = _plugin()
    with pytest.raises(ValueError, match="holds no loss-scaler state"):
        trainer(plugin, max_epochs=2).fit(model, loader(), ckpt_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    trainer(plugin, max_steps=1).fit(Net(), loader())  # the next run, without ckpt_path, trains
    assert plugin.scaler.get_scale() == 2.0**12 and not plugin._missing_scaler_state
