"""The language-model tasks (`lm`, `lm-lstm`): the stdlib-docstring corpus, its split and fingerprint, the
decoder's causality, and learning in tiny mode (held-out loss below the text's unigram entropy, FP32)."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import pytest
import torch

from lossscale.study import lm as LM
from lossscale.study.runner import RunSpec, run_one
from lossscale.study.tasks import TASKS, build


def test_unigram_entropy_exact() -> None:
    assert LM.unigram_entropy(b"aabb") == pytest.approx(math.log(2.0), abs=1e-15)
    assert LM.unigram_entropy(b"aaaa") == 0.0
    # Four symbols with p = 1/2, 1/4, 1/8, 1/8: 1.75 bits.
    assert LM.unigram_entropy(b"aaaabbcd") == pytest.approx(1.75 * math.log(2.0), abs=1e-15)
    with pytest.raises(ValueError, match="empty"):
        LM.unigram_entropy(b"")


def test_corpus_fingerprint_and_fixed_split() -> None:
    docs = LM.stdlib_docstrings()
    text = "\n\n".join(docs).encode("utf-8")
    d = LM.text_data()
    assert d.info["sha256"] == hashlib.sha256(text).hexdigest() and d.info["bytes"] == len(text)
    assert d.info["bytes"] > 100_000 and "Python Software Foundation" in d.info["licence"]
    held = "\n\n".join(docs[9::10]).encode("utf-8")
    train = "\n\n".join(x for i, x in enumerate(docs) if i % 10 != 9).encode("utf-8")
    assert bytes(d.heldout.to(torch.uint8).tolist()) == held
    assert bytes(d.train.to(torch.uint8).tolist()) == train
    assert d.info["unigram_entropy_nats"] == pytest.approx(LM.unigram_entropy(text), rel=1e-12)
    assert LM.text_data() is d  # read once per process
    # Independent of the run's seed: two builds see the same held-out bytes.
    a, b = build("lm", "tiny", seed=0), build("lm", "tiny", seed=5)
    assert a.data_info == b.data_info and a.data_source == b.data_source


def test_gpt_is_causal_and_tied() -> None:
    torch.manual_seed(0)
    model = LM.GPT(d_model=32, nhead=4, layers=2, context=16)
    assert model.tok.weight.shape == (256, 32)
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids)
    ids2 = ids.clone()
    ids2[:, 10:] = (ids2[:, 10:] + 1) % 256
    out2 = model(ids2)
    assert torch.equal(out[:, :10], out2[:, :10])  # the future does not leak into the past
    assert not torch.equal(out[:, 10:], out2[:, 10:])
    # Tied output projection: no separate output matrix among the parameters.
    n_matrix = sum(1 for n, p in model.named_parameters() if p.shape == (256, 32))
    assert n_matrix == 1
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.int64))


def test_lm_stream_windows_are_shifted_text() -> None:
    train = torch.arange(1000) % 256
    x, y = next(LM.lm_stream(train, 8, 4, 0, torch.device("cpu")))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal((x + 1) % 256, y)


@pytest.mark.parametrize("task", ["lm", "lm-lstm"])
def test_tiny_lm_learns_below_unigram_entropy_fp32(task: str) -> None:
    rec: dict[str, Any] = run_one(RunSpec(task, "fp32", 0, "tiny"))
    info = rec["data_info"]
    assert rec["metric_name"] == "heldout_loss" and rec["higher_is_better"] is False
    # The best context-free model: the unigram entropy of the text (the held-out side's own is a bound too).
    held = LM.text_data(TASKS[task].budget("tiny").limit).heldout
    bound = min(info["unigram_entropy_nats"], LM.unigram_entropy(bytes(held.to(torch.uint8).tolist())))
    assert rec["metric"] < bound - 0.05, (rec["metric"], bound)
    assert rec["metric"] == rec["eval_curve"][-1]["heldout_loss"]
    assert rec["metrics"]["perplexity"] == pytest.approx(math.exp(rec["metric"]))
    assert info["sha256"] and info["bytes"] > 100_000
    # The curve is evaluated every budget/20 steps.
    assert [p["step"] for p in rec["eval_curve"]] == list(range(rec["eval_every"], rec["steps"] + 1, rec["eval_every"]))
