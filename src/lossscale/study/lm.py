"""The language-model tasks: a GPT-style decoder (``lm``) and an LSTM language model (``lm-lstm``), byte level,
on English text already on every machine: the docstrings of the Python standard library.

The corpus (:func:`stdlib_docstrings`) is read at run time with :func:`inspect.getdoc` from a fixed list of
standard-library modules (:data:`CORPUS_MODULES`): each module's docstring, then those of its public classes,
their public methods and its public functions, in name order. The text is CPython's own (Python Software
Foundation License version 2), so it differs between Python versions: results.json records its SHA-256, its
size and the Python version. ``python -OO`` strips docstrings; the corpus then refuses to build.

The split is fixed and does not depend on the run's seed: the docstrings are numbered in corpus order and
every tenth one (index 9, 19, ...) is held out. Training draws random windows from the training bytes; the
held-out metric is the mean cross-entropy (nats per byte) of the next byte over the first ``eval_windows``
non-overlapping windows of the held-out bytes, each scored in full (every position predicts its successor).

The decoder follows GPT-2 (Radford et al. 2019): learned positions, pre-norm blocks of causal self-attention
(``F.scaled_dot_product_attention``, is_causal) and a GELU MLP, a final LayerNorm, the output projection tied
to the token embedding, weights N(0, 0.02) with the residual projections scaled by 1/sqrt(2 * layers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import math
import platform
import sys
import warnings
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CORPUS_MODULES",
    "CORPUS_LICENCE",
    "TextData",
    "stdlib_docstrings",
    "text_data",
    "unigram_entropy",
    "GPT",
    "LSTMLanguageModel",
    "lm_stream",
    "lm_loss",
    "lm_eval",
]

# Pure-Python modules present in every CPython build (no optional C extension, no platform module).
CORPUS_MODULES: tuple[str, ...] = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "getopt", "gettext",
    "heapq", "hmac", "html", "inspect", "ipaddress", "json", "logging", "numbers", "operator", "optparse",
    "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil",
    "statistics", "string", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "typing", "uuid", "warnings", "weakref", "zipfile",
)
CORPUS_LICENCE = "Python Software Foundation License Version 2 (CPython's docstrings)"
# Every tenth docstring (index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) is held out.
HOLDOUT_EVERY = 10
VOCAB = 256  # bytes


def _docstrings(module_name: str) -> list[str]:
    mod = importlib.import_module(module_name)
    docs: list[str] = []

    def add(obj: Any) -> None:
        doc = inspect.getdoc(obj)
        if doc and doc.strip():
            docs.append(doc.strip())

    add(mod)
    for name in sorted(vars(mod)):
        if name.startswith("_"):
            continue
        obj = vars(mod)[name]
        if getattr(obj, "__module__", None) != module_name:
            continue  # defined elsewhere (re-exports would repeat text)
        if inspect.isclass(obj):
            add(obj)
            for mname in sorted(vars(obj)):
                if mname.startswith("_"):
                    continue
                member = vars(obj)[mname]
                if inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod, property)):
                    add(member.__func__ if isinstance(member, (classmethod, staticmethod)) else member)
        elif inspect.isfunction(obj):
            add(obj)
    return docs


@lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """The corpus: one string per docstring, in corpus order (module by module, names sorted). Raises
    ``RuntimeError`` when docstrings are stripped (``python -OO``) or the text is too small to split."""
    if sys.flags.optimize >= 2:
        raise RuntimeError("the lm corpus is the standard library's docstrings, which python -OO strips; run "
                           "without -OO")
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # typing.io / typing.re on 3.11 (read, not used)
        for name in CORPUS_MODULES:
            docs.extend(_docstrings(name))
    if sum(len(d) for d in docs) < 100_000:
        raise RuntimeError(
            f"the standard library's docstrings gave only {sum(len(d) for d in docs)} characters (expected "
            "several hundred thousand): are docstrings stripped in this Python build?"
        )
    return tuple(docs)


def unigram_entropy(data: bytes) -> float:
    """The byte unigram entropy of ``data`` in nats per byte (the loss of the best context-free model)."""
    if not data:
        raise ValueError("data must not be empty")
    counts = torch.bincount(torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), minlength=VOCAB)
    p = counts[counts > 0].double() / len(data)
    return float(-(p * p.log()).sum())


@dataclasses.dataclass(frozen=True)
class TextData:
    """Training and held-out bytes (1-D int64 tensors), and what they are (``info``: source, licence,
    SHA-256 and size of the whole text, split, unigram entropy)."""

    train: torch.Tensor
    heldout: torch.Tensor
    info: dict[str, Any]
    source: str


@lru_cache(maxsize=4)
def text_data(limit: int | None = None) -> TextData:
    """The corpus split into training and held-out bytes. ``limit`` keeps the first ``limit`` bytes of each
    side (tiny mode); the recorded SHA-256 and size are of the whole text either way."""
    docs = stdlib_docstrings()
    sep = "\n\n"
    text = sep.join(docs).encode("utf-8")
    train_docs = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    held_docs = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    train = sep.join(train_docs).encode("utf-8")
    held = sep.join(held_docs).encode("utf-8")
    if limit is not None:
        train, held = train[:limit], held[: max(limit // 4, 4096)]
    sha = hashlib.sha256(text).hexdigest()
    info = {
        "source": "docstrings of the Python standard library, read with inspect.getdoc from "
        f"{len(CORPUS_MODULES)} modules (lossscale.study.lm.CORPUS_MODULES)",
        "licence": CORPUS_LICENCE,
        "python": platform.python_version(),
        "sha256": sha,
        "bytes": len(text),
        "docstrings": len(docs),
        "split": f"every {HOLDOUT_EVERY}th docstring held out",
        "train_bytes": len(train),
        "heldout_bytes": len(held),
        "unigram_entropy_nats": unigram_entropy(text),
        "train_unigram_entropy_nats": unigram_entropy(train),
    }

    def as_tensor(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.uint8).long()

    source = (
        f"Python {info['python']} standard-library docstrings ({len(text):,} bytes, SHA-256 {sha[:16]}..., "
        f"{CORPUS_LICENCE}); {len(train):,} training / {len(held):,} held-out bytes"
    )
    return TextData(as_tensor(train), as_tensor(held), info, source)


# ----------------------------------------------------------------------------------------------------------
# Models


class _Block(nn.Module):
    def __init__(self, d_model: int, nhead: int, ff: int) -> None:
        super().__init__()
        self.nhead = nhead
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, ff)
        self.fc2 = nn.Linear(ff, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        shape = (b, t, self.nhead, d // self.nhead)
        y = F.scaled_dot_product_attention(
            q.reshape(shape).transpose(1, 2), k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2),
            is_causal=True,
        )
        h = h + self.proj(y.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = h + self.fc2(F.gelu(self.fc(self.ln2(h))))
        return out


class GPT(nn.Module):
    """A GPT-2-style byte-level decoder (see the module docstring): ``forward(ids (B, T)) -> logits (B, T, 256)``."""

    def __init__(
        self, vocab: int = VOCAB, *, d_model: int = 128, nhead: int = 4, layers: int = 4, ff: int | None = None,
        context: int = 128,
    ) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be a multiple of nhead ({nhead})")
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, nhead, ff or 4 * d_model) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            assert isinstance(blk, _Block)
            for lin in (blk.proj, blk.fc2):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.context}")
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        for blk in self.blocks:
            h = blk(h)
        logits: torch.Tensor = F.linear(self.ln_f(h), self.tok.weight)  # tied output projection
        return logits


class LSTMLanguageModel(nn.Module):
    """Byte embedding, ``nn.LSTM`` and an output projection tied to the embedding (hidden = embedding
    size): ``forward(ids (B, T)) -> logits (B, T, 256)``."""

    def __init__(self, vocab: int = VOCAB, *, hidden: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        nn.init.normal_(self.emb.weight, std=0.1)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(ids))
        logits: torch.Tensor = F.linear(out, self.emb.weight, self.bias)
        return logits


# ----------------------------------------------------------------------------------------------------------
# Training stream, loss, evaluation


def lm_stream(
    train: torch.Tensor, seq_len: int, batch_size: int, seed: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of ``(inputs, targets)``, each ``(batch_size, seq_len)``: random windows of the
    training bytes (start positions drawn from ``seed``), targets shifted by one byte."""
    n = train.shape[0] - seq_len - 1
    if n < 1:
        raise ValueError(f"seq_len {seq_len} needs more than {seq_len + 1} training bytes, got {train.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    data = train.to(device)
    offs = torch.arange(seq_len + 1, device=device)
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=gen).to(device)
        win = data[starts[:, None] + offs]
        yield win[:, :-1], win[:, 1:]


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over every position of the batch."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def lm_eval(heldout: torch.Tensor, seq_len: int, windows: int, device: torch.device) -> Any:
    """``evaluate(model, ctx) -> {"heldout_loss", "perplexity", "bits_per_byte", "test_size"}`` over the first
    ``windows`` non-overlapping windows of the held-out bytes (``test_size``: bytes scored)."""
    n = min(windows, (heldout.shape[0] - 1) // seq_len)
    if n < 1:
        raise ValueError(f"held-out text of {heldout.shape[0]} bytes has no window of {seq_len + 1} bytes")
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)
    win = heldout[idx].to(device)
    x, y = win[:, :-1], win[:, 1:]

    def evaluate(model: nn.Module, ctx: Any) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=device)
        with torch.no_grad():
            for i in range(0, n, 64):
                with ctx():
                    logits = model(x[i : i + 64])
                total += F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), y[i : i + 64].reshape(-1), reduction="sum"
                ).double()
        model.train(was_training)
        loss = float(total) / (n * seq_len)
        return {
            "heldout_loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": loss / math.log(2.0),
            "test_size": float(n * seq_len),
        }

    return evaluate
