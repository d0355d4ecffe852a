"""The four case-study tasks: data, model, loss, metric, optimizer recipe and step budgets.

================  ==========================================  ==================  =====================
task              data                                        model               metric
================  ==========================================  ==================  =====================
``cnn``           sklearn digits, 8x8 images                  ResNet (BatchNorm)  test accuracy
``rnn``           sklearn digits read pixel by pixel (64)     LSTM                test accuracy
``transformer``   English -> French number names (num2words)  enc-dec Transformer BLEU (+ exact match)
``deep-mlp``      sklearn digits, 64 features                 30-layer tanh MLP   test accuracy
``lm``            Python stdlib docstrings, bytes (lm.py)     GPT-style decoder   held-out loss (lower)
``lm-lstm``       the same text                               LSTM LM             held-out loss (lower)
================  ==========================================  ==================  =====================

Each task has one base optimizer and schedule (:class:`Recipe`) and a budget per mode (``"tiny"`` for tests,
``"quick"`` for ``lossscale study --quick``, ``"full"`` for the README's table). :func:`build` returns a
:class:`TaskInstance` for one run; :func:`example` gives ``(model, loss_fn, batches)`` for
``lossscale diagnose --example``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ContextManager, Literal

import torch
from torch import nn

from . import data as D
from . import lm as LM
from .models import DeepMLP, LSTMClassifier, ResNet, Seq2SeqTransformer

__all__ = [
    "Mode",
    "MODES",
    "TASKS",
    "TASK_NAMES",
    "Budget",
    "Recipe",
    "TaskSpec",
    "TaskInstance",
    "build",
    "budget_for",
    "OVERRIDES",
    "example",
    "lr_multiplier",
]

Mode = Literal["tiny", "quick", "full"]
MODES: tuple[str, ...] = ("tiny", "quick", "full")
Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much one run of a task does: optimizer steps, batch size, data rows kept (None: all) and model
    size (task-specific keyword arguments)."""

    steps: int
    batch_size: int
    limit: int | None = None
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "batch_size": self.batch_size, "limit": self.limit, "model": dict(self.model)}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A task's base optimizer and schedule: ``optimizer`` ("sgd" with momentum/Nesterov, or "adamw"),
    peak ``lr``, ``weight_decay``, ``schedule`` ("cosine": linear warm-up then cosine decay to 0;
    "constant": warm-up then flat), ``warmup`` as a fraction of the steps, and gradient-norm clipping."""

    optimizer: Literal["sgd", "adamw"]
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: float = 0.0
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")

    def describe(self) -> str:
        opt = (
            f"SGD(lr={self.lr:g}, momentum={self.momentum:g}, nesterov, weight_decay={self.weight_decay:g})"
            if self.optimizer == "sgd"
            else f"AdamW(lr={self.lr:g}, betas=(0.9, 0.999), weight_decay={self.weight_decay:g})"
        )
        sched = f"{self.schedule}, warm-up {self.warmup:.0%}"
        clip = f", clip grad norm {self.clip_norm:g}" if self.clip_norm else ""
        return f"{opt}, {sched}{clip}"


def lr_multiplier(recipe: Recipe, step: int, total: int) -> float:
    """The schedule's learning-rate multiplier at 0-based ``step`` of ``total`` (pure function)."""
    warm = int(recipe.warmup * total)
    if step < warm:
        return (step + 1) / warm
    if recipe.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A case-study task: its name, metric, chance level, recipe and budgets. The metric is higher-is-better
    unless ``higher_is_better`` is False (the language models' held-out loss)."""

    name: str
    description: str
    metric_name: str
    chance: float
    recipe: Recipe
    budgets: Mapping[str, Budget]
    higher_is_better: bool = True

    def budget(self, mode: str) -> Budget:
        if mode not in self.budgets:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return self.budgets[mode]


@dataclasses.dataclass
class TaskInstance:
    """Everything one run needs: a freshly initialised model (on ``device``), the loss, an endless batch
    stream, and the evaluation (``evaluate(model, autocast_factory) -> {metric_name: value, ...}``)."""

    spec: TaskSpec
    model: nn.Module
    loss_fn: LossFn
    batches: Iterator[Batch]
    evaluate: Callable[[nn.Module, Callable[[], ContextManager[Any]]], dict[str, float]]
    data_source: str
    data_info: dict[str, Any] | None = None


# The deep MLP: weights N(0, 1/fan_in) (tanh's edge of chaos, so 30 plain layers still train) and a loss
# divided by 2^14, as a per-element loss normalised by the element count of a large batch (64 sequences x 256
# tokens) is: Adam is invariant to that factor (FP32 trains the same), but most activation gradients then sit
# below FP16's smallest subnormal (2^-24) unless the loss is scaled back up.
_MLP_MODEL: dict[str, Any] = {"depth": 30, "width": 64, "gain": 1.0, "loss_weight": 2.0**-14}

TASKS: dict[str, TaskSpec] = {
    "cnn": TaskSpec(
        "cnn",
        "small ResNet (BatchNorm, 2 stages) on sklearn's 8x8 handwritten digits",
        "accuracy",
        0.1,
        Recipe("sgd", lr=0.1, weight_decay=5e-4, momentum=0.9, schedule="cosine", warmup=0.05),
        {
            "tiny": Budget(12, 32, limit=256, model={"widths": (8, 16), "blocks": 1}),
            "quick": Budget(100, 64, model={"widths": (16, 32), "blocks": 1}),
            "full": Budget(400, 64, model={"widths": (16, 32), "blocks": 2}),
        },
    ),
    "rnn": TaskSpec(
        "rnn",
        "LSTM reading sklearn's digits pixel by pixel (64 steps)",
        "accuracy",
        0.1,
        Recipe("adamw", lr=1e-2, weight_decay=0.0, schedule="cosine", warmup=0.05, clip_norm=1.0),
        {
            "tiny": Budget(8, 32, limit=256, model={"hidden": 16}),
            "quick": Budget(80, 64, model={"hidden": 64}),
            "full": Budget(500, 64, model={"hidden": 64}),
        },
    ),
    "transformer": TaskSpec(
        "transformer",
        "encoder-decoder Transformer translating English number names to French (num2words, 0..999)",
        "bleu",
        0.0,
        Recipe("adamw", lr=3e-3, weight_decay=0.01, schedule="cosine", warmup=0.1, clip_norm=1.0),
        {
            "tiny": Budget(8, 32, limit=128, model={"d_model": 32, "nhead": 2, "layers": 1, "ff": 64}),
            "quick": Budget(110, 64, model={"d_model": 64, "nhead": 4, "layers": 2, "ff": 128}),
            "full": Budget(600, 64, model={"d_model": 64, "nhead": 4, "layers": 2, "ff": 128}),
        },
    ),
    "deep-mlp": TaskSpec(
        "deep-mlp",
        "30-layer plain tanh MLP (no normalisation) on the digits, loss normalised by 2^14: small gradients",
        "accuracy",
        0.1,
        Recipe("adamw", lr=1e-3, weight_decay=0.0, schedule="cosine", warmup=0.05),
        {
            "tiny": Budget(60, 64, limit=512, model=_MLP_MODEL | {"width": 32}),
            "quick": Budget(150, 64, model=_MLP_MODEL),
            "full": Budget(600, 64, model=_MLP_MODEL),
        },
    ),
    "lm": TaskSpec(
        "lm",
        "GPT-style byte-level decoder (causal attention, tied embeddings) on the Python standard library's "
        "docstrings",
        "heldout_loss",
        math.log(256.0),
        Recipe("adamw", lr=3e-3, weight_decay=0.01, schedule="cosine", warmup=0.05, clip_norm=1.0),
        {
            "tiny": Budget(100, 16, limit=60_000,
                           model={"d_model": 64, "nhead": 4, "layers": 2, "context": 32, "eval_windows": 64}),
            "quick": Budget(100, 16, model={"d_model": 64, "nhead": 4, "layers": 2, "context": 64,
                                           "eval_windows": 64}),
            "full": Budget(200, 16, model={"d_model": 64, "nhead": 4, "layers": 4, "context": 64,
                                          "eval_windows": 128}),
        },
        higher_is_better=False,
    ),
    "lm-lstm": TaskSpec(
        "lm-lstm",
        "LSTM byte-level language model (tied embeddings) on the Python standard library's docstrings",
        "heldout_loss",
        math.log(256.0),
        Recipe("adamw", lr=1e-2, weight_decay=0.0, schedule="cosine", warmup=0.05, clip_norm=1.0),
        {
            "tiny": Budget(100, 16, limit=60_000, model={"hidden": 64, "context": 32, "eval_windows": 64}),
            "quick": Budget(100, 16, model={"hidden": 64, "context": 64, "eval_windows": 64}),
            "full": Budget(200, 16, model={"hidden": 128, "context": 64, "eval_windows": 128}),
        },
        higher_is_better=False,
    ),
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def _epochs(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches, dropping each epoch's last partial batch (constant shapes)."""
    bs = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - bs + 1, bs):
            yield perm[i : i + bs]


def _classification_stream(
    d: D.ClassificationData, batch_size: int, seed: int, device: torch.device
) -> Iterator[Batch]:
    x, y = d.x_train.to(device), d.y_train.to(device)
    gen = torch.Generator().manual_seed(seed)
    for idx in _epochs(x.shape[0], batch_size, gen):
        idx = idx.to(device)
        yield x[idx], y[idx]


def _classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _weighted_loss(weight: float) -> LossFn:
    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        return _classification_loss(model, batch) * weight

    return loss_fn


def _accuracy_eval(
    d: D.ClassificationData, device: torch.device
) -> Callable[[nn.Module, Callable[[], ContextManager[Any]]], dict[str, float]]:
    x, y = d.x_test.to(device), d.y_test.to(device)

    def evaluate(model: nn.Module, ctx: Callable[[], ContextManager[Any]]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=device)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        with torch.no_grad():
            for i in range(0, x.shape[0], 512):
                with ctx():
                    logits = model(x[i : i + 512])
                logits = logits.float()
                correct += (logits.argmax(-1) == y[i : i + 512]).sum()
                loss += nn.functional.cross_entropy(logits, y[i : i + 512], reduction="sum").double()
        model.train(was_training)
        n = x.shape[0]
        return {"accuracy": float(correct) / n, "test_loss": float(loss) / n, "test_size": float(n)}

    return evaluate


def _seq2seq_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    src, tgt = batch
    logits = model(src, tgt[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt[:, 1:].reshape(-1),
                                       ignore_index=0)


def _translation_eval(
    d: D.TranslationData, device: torch.device
) -> Callable[[nn.Module, Callable[[], ContextManager[Any]]], dict[str, float]]:
    import sacrebleu

    src = d.src_test.to(device)
    max_len = d.tgt_test.shape[1]

    def evaluate(model: nn.Module, ctx: Callable[[], ContextManager[Any]]) -> dict[str, float]:
        assert isinstance(model, Seq2SeqTransformer)
        was_training = model.training
        model.eval()
        outs = []
        with torch.no_grad():
            for i in range(0, src.shape[0], 256):
                with ctx():
                    outs.append(model.greedy(src[i : i + 256], max_len, d.tgt_vocab.bos, d.tgt_vocab.eos))
        model.train(was_training)
        ids = torch.cat(outs).cpu().tolist()
        hyp_tokens = [d.tgt_vocab.decode(row[1:]) for row in ids]
        hyps = [D.detokenize(t) for t in hyp_tokens]
        # BLEU on our word tokens (hyphens split off): French number names are short ("deux cent douze"), and
        # sacrebleu's default 13a tokenizer keeps "quatre-vingt-dix" whole, leaving too few 4-grams to score.
        refs_tok = [" ".join(D.tokenize(r)) for r in d.test_refs]
        bleu = sacrebleu.corpus_bleu([" ".join(t) for t in hyp_tokens], [refs_tok], tokenize="none").score
        exact = sum(h == r for h, r in zip(hyps, d.test_refs, strict=True)) / len(hyps)
        return {"bleu": float(bleu), "exact_match": exact, "test_size": float(len(hyps))}

    return evaluate


# What a sweep may change, and on which tasks: the step count and the batch size (every task), the sequence
# length (the RNN tasks: rnn reads the digits upsampled to side x side pixels, lm-lstm trains on windows of
# that many bytes), and the fraction of training labels replaced by a different random class (the classification tasks).
OVERRIDES: dict[str, tuple[str, ...]] = {
    "steps": TASK_NAMES,
    "batch_size": TASK_NAMES,
    "seq_len": ("rnn", "lm-lstm"),
    "label_noise": ("cnn", "rnn", "deep-mlp"),
}


def budget_for(name: str, mode: str, overrides: Mapping[str, Any] | None = None) -> Budget:
    """Task ``name``'s budget in ``mode`` with sweep ``overrides`` applied (see :data:`OVERRIDES`)."""
    budget = TASKS[name].budget(mode)
    for key, value in (overrides or {}).items():
        if key not in OVERRIDES:
            raise ValueError(f"unknown override {key!r}; valid overrides: {', '.join(OVERRIDES)}")
        if name not in OVERRIDES[key]:
            raise ValueError(f"override {key!r} applies to tasks {', '.join(OVERRIDES[key])}, not {name!r}")
        if key == "steps":
            budget = dataclasses.replace(budget, steps=int(value))
        elif key == "batch_size":
            budget = dataclasses.replace(budget, batch_size=int(value))
        elif key == "seq_len":
            n = int(value)
            if name == "rnn" and (n < 64 or math.isqrt(n) ** 2 != n):
                raise ValueError(f"seq_len for rnn must be a square >= 64 (side x side pixels), got {value!r}")
            if n < 2:
                raise ValueError(f"seq_len must be >= 2, got {value!r}")
            budget = dataclasses.replace(budget, model={**budget.model, ("seq_len" if name == "rnn" else "context"): n})
        else:
            if not 0.0 <= float(value) < 0.9:
                raise ValueError(f"label_noise must be in [0, 0.9), got {value!r}")
            budget = dataclasses.replace(budget, model={**budget.model, "label_noise": float(value)})
    return budget


def _upsampled_sequences(d: D.ClassificationData, seq_len: int) -> D.ClassificationData:
    """Digit images ``(N, 1, 8, 8)`` resized (bilinear) to side x side and read pixel by pixel."""
    side = math.isqrt(seq_len)

    def seq(x: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return up.reshape(x.shape[0], side * side, 1)

    return D.ClassificationData(seq(d.x_train), d.y_train, seq(d.x_test), d.y_test, d.num_classes,
                                f"sklearn.datasets.load_digits upsampled to {side}x{side}, read pixel by pixel "
                                f"({seq_len} steps)")


def _noisy_labels(d: D.ClassificationData, fraction: float) -> D.ClassificationData:
    """Replace ``fraction`` of the training labels (a fixed choice, independent of the run's seed) by a
    different class drawn uniformly; the test labels stay clean."""
    if fraction == 0.0:
        return d
    gen = torch.Generator().manual_seed(D.SPLIT_SEED + 1)
    n = d.y_train.shape[0]
    idx = torch.randperm(n, generator=gen)[: int(round(fraction * n))]
    shift = torch.randint(1, d.num_classes, (idx.shape[0],), generator=gen)
    y = d.y_train.clone()
    y[idx] = (y[idx] + shift) % d.num_classes
    return D.ClassificationData(d.x_train, y, d.x_test, d.y_test, d.num_classes,
                                f"{d.source}, {fraction:.0%} of training labels replaced by a random other class")


def build(
    name: str, mode: str = "quick", *, seed: int = 0, device: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> TaskInstance:
    """A fresh instance of task ``name`` for one run: the model is initialised from ``seed`` (and the batch
    order drawn from it); the train/test split is the same for every seed. ``overrides`` are a sweep's
    changes to the budget (:func:`budget_for`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    spec = TASKS[name]
    budget = budget_for(name, mode, overrides)
    dev = torch.device(device)
    torch.manual_seed(seed)
    m = dict(budget.model)
    loss_fn: LossFn = _classification_loss
    if name in ("cnn", "rnn", "deep-mlp"):
        if name == "cnn":
            d = D.digits_images(limit=budget.limit)
            model: nn.Module = ResNet(1, d.num_classes, widths=tuple(m["widths"]), blocks=int(m["blocks"]))
        elif name == "rnn":
            d = D.digits_sequences(limit=budget.limit)
            if int(m.get("seq_len", 64)) != 64:
                d = _upsampled_sequences(D.digits_images(limit=budget.limit), int(m["seq_len"]))
            model = LSTMClassifier(1, int(m["hidden"]), d.num_classes)
        else:
            d = D.digits_features(limit=budget.limit)
            model = DeepMLP(
                d.x_train.shape[1], int(m["width"]), int(m["depth"]), d.num_classes, gain=m.get("gain")
            )
            if "loss_weight" in m:
                loss_fn = _weighted_loss(float(m["loss_weight"]))
        d = _noisy_labels(d, float(m.get("label_noise", 0.0)))
        return TaskInstance(
            spec,
            model.to(dev),
            loss_fn,
            _classification_stream(d, budget.batch_size, seed, dev),
            _accuracy_eval(d, dev),
            d.source,
        )
    if name in ("lm", "lm-lstm"):
        text = LM.text_data(budget.limit)
        seq_len = int(m["context"])
        if name == "lm":
            model = LM.GPT(d_model=int(m["d_model"]), nhead=int(m["nhead"]), layers=int(m["layers"]),
                           context=seq_len)
        else:
            model = LM.LSTMLanguageModel(hidden=int(m["hidden"]))
        return TaskInstance(
            spec,
            model.to(dev),
            LM.lm_loss,
            LM.lm_stream(text.train, seq_len, budget.batch_size, seed, dev),
            LM.lm_eval(text.heldout, seq_len, int(m["eval_windows"]), dev),
            text.source,
            dict(text.info),
        )
    t = D.number_phrases(limit=budget.limit)
    model = Seq2SeqTransformer(
        len(t.src_vocab), len(t.tgt_vocab), d_model=int(m["d_model"]), nhead=int(m["nhead"]),
        layers=int(m["layers"]), ff=int(m["ff"]), max_len=max(t.src_train.shape[1], t.tgt_train.shape[1]) + 1,
    )
    src, tgt = t.src_train.to(dev), t.tgt_train.to(dev)
    gen = torch.Generator().manual_seed(seed)

    def stream() -> Iterator[Batch]:
        for idx in _epochs(src.shape[0], budget.batch_size, gen):
            idx = idx.to(dev)
            yield src[idx], tgt[idx]

    return TaskInstance(spec, model.to(dev), _seq2seq_loss, stream(), _translation_eval(t, dev), t.source)


def example(name: str, *, seed: int = 0) -> tuple[nn.Module, LossFn, list[Batch]]:
    """``(model, loss_fn, batches)`` for ``lossscale diagnose --example NAME``: the task's quick-mode model at
    initialisation, ``loss_fn(model, batch) -> loss``, and 8 training batches (CPU)."""
    inst = build(name, "quick", seed=seed)
    batches = [next(inst.batches) for _ in range(8)]
    return inst.model, inst.loss_fn, batches


def null_context() -> ContextManager[Any]:
    """A do-nothing context (FP32 evaluation)."""
    return contextlib.nullcontext()
