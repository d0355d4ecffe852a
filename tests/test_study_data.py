"""Study data: built-in data sets and loaders for standard on-disk formats (files written by the tests)."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from lossscale.study import data as D
from lossscale.study import tasks as T


def test_digits_split_is_fixed_and_complete() -> None:
    a = D.digits_images()
    b = D.digits_images()
    assert a.x_train.shape == (1438, 1, 8, 8) and a.x_test.shape == (359, 1, 8, 8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert sorted(set(a.y_train.tolist())) == list(range(10))
    # Standardised with the training statistics.
    assert abs(a.x_train.mean().item()) < 1e-5 and abs(a.x_train.std().item() - 1) < 1e-4
    seq = D.digits_sequences()
    assert seq.x_train.shape == (1438, 64, 1)
    assert torch.equal(seq.x_train[:, :, 0], a.x_train.flatten(1))  # raster order, pixel by pixel


def test_number_phrases_hold_out_numbers() -> None:
    t = D.number_phrases()
    assert t.src_train.shape[0] == 800 and t.src_test.shape[0] == 200
    train_src = {tuple(r) for r in t.src_train.tolist()}
    assert not any(tuple(r) in train_src for r in t.src_test.tolist())  # held-out numbers never trained on
    from num2words import num2words

    # The references are num2words' French, hyphens kept.
    french = {num2words(n, lang="fr") for n in range(1000)}
    assert all(r in french for r in t.test_refs)
    assert t.tgt_train[:, 0].eq(t.tgt_vocab.bos).all()


def test_tokenize_round_trip() -> None:
    s = "quatre-vingt-dix-neuf"
    assert D.tokenize(s) == ["quatre", "-", "vingt", "-", "dix", "-", "neuf"]
    assert D.detokenize(D.tokenize(s)) == s
    assert D.detokenize(D.tokenize("one thousand, two hundred")) == "one thousand two hundred"
    v = D.Vocab.build([["a", "b"], ["b", "c"]])
    ids = v.encode(["a", "c", "zzz"], 6, bos=True)
    assert ids == [1, 4, 6, 3, 2, 0]
    assert v.decode(ids[1:]) == ["a", "c"]  # specials (here <unk>) are dropped
    with pytest.raises(ValueError, match="does not fit"):
        v.encode(["a"] * 6, 4)


def _write_cifar_batch(path: str, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, size=n)]
    with open(path, "wb") as fh:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, fh)
    return data, labels


def test_load_cifar10_python_batches(tmp_path: pytest.TempPathFactory) -> None:
    d1, l1 = _write_cifar_batch(str(tmp_path / "data_batch_1"), 6, 0)
    d2, l2 = _write_cifar_batch(str(tmp_path / "data_batch_2"), 4, 1)
    dt, lt = _write_cifar_batch(str(tmp_path / "test_batch"), 3, 2)
    c = D.load_cifar10(tmp_path)
    assert c.x_train.shape == (10, 3, 32, 32) and c.x_test.shape == (3, 3, 32, 32)
    assert c.y_train.tolist() == l1 + l2 and c.y_test.tolist() == lt
    # Channel-major layout: pixel (ch 1, row 2, col 3) of image 0 is data[0, 1*1024 + 2*32 + 3].
    raw = np.concatenate([d1, d2]).astype(np.float64) / 255.0
    mean = raw.reshape(10, 3, 1024).mean(axis=(0, 2))
    std = raw.reshape(10, 3, 1024).transpose(1, 0, 2).reshape(3, -1).std(axis=1, ddof=1)
    expect = (raw[0, 1 * 1024 + 2 * 32 + 3] - mean[1]) / std[1]
    assert c.x_train[0, 1, 2, 3].item() == pytest.approx(expect, rel=1e-4)
    # The CNN task's model takes these images as they are.
    model = T.ResNet(3, 10, widths=(4, 8))
    assert model(c.x_train[:2]).shape == (2, 10)


def test_load_cifar10_errors(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(FileNotFoundError, match="data_batch"):
        D.load_cifar10(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump({b"nothing": 1}, fh)
    with pytest.raises(ValueError, match="not a CIFAR python batch"):
        D.load_cifar10(tmp_path)


def _write_idx(path: str, arr: np.ndarray, code: int) -> None:
    with open(path, "wb") as fh:
        fh.write(bytes([0, 0, code, arr.ndim]))
        fh.write(struct.pack(f">{arr.ndim}i", *arr.shape))
        fh.write(arr.astype(arr.dtype.newbyteorder(">")).tobytes())


def test_load_idx_and_mnist_sequences(tmp_path: pytest.TempPathFactory) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 4, 5), dtype=np.uint8)
    labels = (np.arange(20) % 3).astype(np.uint8)
    _write_idx(str(tmp_path / "img"), images, 0x08)
    _write_idx(str(tmp_path / "lab"), labels, 0x08)
    assert torch.equal(D.load_idx(tmp_path / "img"), torch.from_numpy(images))
    floats = rng.standard_normal((3, 2)).astype(np.float32)
    _write_idx(str(tmp_path / "f32"), floats, 0x0D)
    assert torch.equal(D.load_idx(tmp_path / "f32"), torch.from_numpy(floats))  # big-endian decoded
    seq = D.load_mnist_sequences(tmp_path / "img", tmp_path / "lab", test_fraction=0.25)
    assert seq.x_train.shape == (15, 20, 1) and seq.x_test.shape == (5, 20, 1) and seq.num_classes == 3
    with open(tmp_path / "bad", "wb") as fh:
        fh.write(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        D.load_idx(tmp_path / "bad")
    with open(tmp_path / "short", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + struct.pack(">i", 5) + b"\x00\x01")
    with pytest.raises(ValueError, match="data bytes"):
        D.load_idx(tmp_path / "short")


def test_load_parallel_text(tmp_path: pytest.TempPathFactory) -> None:
    en = ["the cat", "a dog", "", "the dog sleeps", "one two", "three"] * 3
    fr = ["le chat", "un chien", "vide", "le chien dort", "un deux", "trois"] * 3
    (tmp_path / "train.en").write_text("\n".join(en) + "\n", encoding="utf-8")
    (tmp_path / "train.fr").write_text("\n".join(fr) + "\n", encoding="utf-8")
    t = D.load_parallel_text(tmp_path / "train.en", tmp_path / "train.fr", test_fraction=0.2)
    n = t.src_train.shape[0] + t.src_test.shape[0]
    assert n == 15  # the 3 pairs with an empty side are dropped
    assert set(t.test_refs) <= {"le chat", "un chien", "le chien dort", "un deux", "trois"}
    assert "chien" in t.tgt_vocab.words and "dog" in t.src_vocab.words
    (tmp_path / "short.fr").write_text("un\n", encoding="utf-8")
    with pytest.raises(ValueError, match="differ in length"):
        D.load_parallel_text(tmp_path / "train.en", tmp_path / "short.fr")


def test_load_csv_table(tmp_path: pytest.TempPathFactory) -> None:
    rows = ["a,b,label"] + [f"{i},{2 * i},{'yes' if i % 2 else 'no'}" for i in range(10)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    c = D.load_csv_table(tmp_path / "t.csv", target="label")
    assert c.x_train.shape[1] == 2 and c.num_classes == 2
    all_y = sorted(c.y_train.tolist() + c.y_test.tolist())
    assert all_y == [0] * 5 + [1] * 5  # "no" -> 0, "yes" -> 1 (sorted)
    with pytest.raises(ValueError, match="target column"):
        D.load_csv_table(tmp_path / "t.csv", target="nope")
    (tmp_path / "bad.csv").write_text("a,label\nx,1\n")
    with pytest.raises(ValueError, match="non-numeric"):
        D.load_csv_table(tmp_path / "bad.csv", target="label")


@pytest.mark.parametrize("name", T.TASK_NAMES)
def test_example_for_diagnose(name: str) -> None:
    model, loss_fn, batches = T.example(name, seed=0)
    model2, _, batches2 = T.example(name, seed=0)
    # Seeded: the same seed gives the same model and batches.
    state, state2 = model.state_dict().values(), model2.state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(state, state2, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(batches[3], batches2[3], strict=True))
    assert isinstance(model, torch.nn.Module) and len(batches) == 8
    loss = loss_fn(model, batches[0])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match="valid tasks: cnn, rnn, transformer, deep-mlp"):
        T.build("mlp")


def test_lr_schedule() -> None:
    r = T.Recipe("sgd", lr=0.1, warmup=0.1, schedule="cosine")
    assert T.lr_multiplier(r, 0, 100) == pytest.approx(0.1)
    assert T.lr_multiplier(r, 9, 100) == pytest.approx(1.0)
    assert T.lr_multiplier(r, 10, 100) == pytest.approx(1.0)
    assert T.lr_multiplier(r, 55, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup"):
        T.Recipe("sgd", lr=0.1, warmup=1.5)
    with pytest.raises(ValueError, match="optimizer"):
        T.Recipe("lamb", lr=0.1)  # type: ignore[arg-type]
