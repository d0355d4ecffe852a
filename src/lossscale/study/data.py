"""Data for the case studies: generated or shipped with a package, never downloaded.

Four built-in data sets, each split once with a fixed seed (the split does not depend on the run's seed, so
runs with different seeds are scored on the same test set):

- :func:`digits_images`: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes; UCI "Optical
  Recognition of Handwritten Digits", shipped inside scikit-learn), as ``(N, 1, 8, 8)`` images;
- :func:`digits_sequences`: the same digits read pixel by pixel, ``(N, 64, 1)`` sequences (the 8x8 analogue
  of "pixel MNIST", Le et al. 2015, arXiv:1504.00941): the label depends on pixels 64 steps back;
- :func:`number_phrases`: English -> French number phrases (``"two hundred and twelve"`` ->
  ``"deux cent douze"``), written by ``num2words``; held-out numbers form the test set;
- :func:`digits_features`: the digits as flat 64-feature vectors, for the deep plain MLP.

And one loader per kind for the standard on-disk format of a real data set of that kind:

- :func:`load_cifar10` (CIFAR-10's "python version" pickled batches) for images,
- :func:`load_idx` / :func:`load_mnist_sequences` (MNIST's IDX files) for pixel sequences,
- :func:`load_parallel_text` (a pair of aligned text files, one sentence per line, as WMT/Europarl/OPUS ship
  them) for translation,
- :func:`load_csv_table` (a header row, numeric columns, one target column) for tabular data.

Everything returns CPU tensors; the runner moves them to the run's device.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import os
import pickle
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "ClassificationData",
    "TranslationData",
    "Vocab",
    "digits_images",
    "digits_sequences",
    "digits_features",
    "number_phrases",
    "load_cifar10",
    "load_idx",
    "load_mnist_sequences",
    "load_parallel_text",
    "load_csv_table",
    "tokenize",
    "detokenize",
]

# The seed of every train/test split: fixed so that all runs (whatever their seed) share one test set.
SPLIT_SEED = 20240229


@dataclasses.dataclass(frozen=True)
class ClassificationData:
    """Inputs and integer labels, split into train and test (float32 inputs, int64 labels)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str

    def __post_init__(self) -> None:
        if self.x_train.shape[0] != self.y_train.shape[0] or self.x_test.shape[0] != self.y_test.shape[0]:
            raise ValueError("inputs and labels must have the same number of rows")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")


def _split(n: int, test_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = max(1, int(round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def _digits_raw() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # shipped inside scikit-learn: no download

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0  # pixel values 0..16 -> [0, 1]
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return x, y


def _standardise(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Statistics from the training split only, so no test information leaks into the inputs.
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std


def digits_images(*, test_fraction: float = 0.2, limit: int | None = None) -> ClassificationData:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` standardised images; ``limit`` keeps the first rows of each
    split (for tiny test studies)."""
    x, y = _digits_raw()
    train, test = _split(x.shape[0], test_fraction)
    xtr, xte = _standardise(x[train].unsqueeze(1), x[test].unsqueeze(1))
    ytr, yte = y[train], y[test]
    if limit is not None:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    return ClassificationData(xtr, ytr, xte, yte, 10, "sklearn.datasets.load_digits (8x8 images)")


def digits_sequences(*, test_fraction: float = 0.2, limit: int | None = None) -> ClassificationData:
    """The digits read pixel by pixel in raster order: ``(N, 64, 1)`` sequences."""
    img = digits_images(test_fraction=test_fraction, limit=limit)
    return ClassificationData(
        img.x_train.reshape(img.x_train.shape[0], -1, 1),
        img.y_train,
        img.x_test.reshape(img.x_test.shape[0], -1, 1),
        img.y_test,
        10,
        "sklearn.datasets.load_digits read pixel by pixel (64 steps)",
    )


def digits_features(*, test_fraction: float = 0.2, limit: int | None = None) -> ClassificationData:
    """The digits as flat ``(N, 64)`` standardised feature vectors."""
    img = digits_images(test_fraction=test_fraction, limit=limit)
    return ClassificationData(
        img.x_train.flatten(1),
        img.y_train,
        img.x_test.flatten(1),
        img.y_test,
        10,
        "sklearn.datasets.load_digits as 64 features",
    )


# ------------------------------------------------------------------------------------------------------
# Loaders for standard on-disk formats


# What CIFAR-10's python batches contain besides dicts, lists, bytes and ints: NumPy arrays (the ``data``
# matrix), pickled through NumPy's reconstructor (``numpy.core`` before NumPy 2, ``numpy._core`` since) and,
# for files written by Python 3 with protocol 2, bytes through ``_codecs.encode``. Nothing else is needed, so
# nothing else is allowed: unpickling may call any global it names (Python docs, "Restricting Globals").
_CIFAR_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only the types CIFAR-10's python batches hold; refuses any other global, naming it."""

    def __init__(self, fh: Any) -> None:
        super().__init__(fh, encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: a CIFAR-10 batch holds only dicts, lists, bytes, ints and "
                "NumPy arrays"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id (a CIFAR-10 batch has none)")


def load_cifar10(root: str | os.PathLike[str], *, test_fraction: float | None = None) -> ClassificationData:
    """Load CIFAR-10's "python version" (``cifar-10-batches-py``): pickled dicts ``data_batch_1..5`` and
    ``test_batch`` with ``b"data"`` (uint8, ``N x 3072``, channel-major 32x32) and ``b"labels"``.

    Missing ``data_batch_*`` files are allowed as long as one is present (subsets). Images are scaled to
    [0, 1] and standardised per channel with the training statistics. ``test_fraction`` is ignored when
    ``test_batch`` exists; without it, that fraction of the training rows becomes the test set.
    Format: https://www.cs.toronto.edu/~kriz/cifar.html

    The batches are read with a restricted unpickler that accepts only what they contain (dicts, lists,
    bytes, ints, NumPy arrays): a file naming any other class or function is refused with a ``ValueError``
    naming it, before anything in it runs.
    """
    root = os.fspath(root)
    names = sorted(n for n in os.listdir(root) if re.fullmatch(r"data_batch_\d+", n))
    if not names:
        raise FileNotFoundError(f"no data_batch_* files in {root!r} (expected CIFAR-10's python batches)")

    def read(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        path = os.path.join(root, name)
        with open(path, "rb") as fh:
            try:
                d = _CifarUnpickler(fh).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
                raise ValueError(f"{path}: not a CIFAR python batch ({err})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: not a CIFAR python batch (holds a {type(d).__name__}, not a dict)")
        data, labels = d.get(b"data"), d.get(b"labels", d.get(b"fine_labels"))
        if data is None or labels is None:
            raise ValueError(f"{name}: not a CIFAR python batch (needs b'data' and b'labels')")
        x = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
        y = torch.as_tensor(list(labels), dtype=torch.int64)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: {x.shape[0]} images but {y.shape[0]} labels")
        return x, y

    parts = [read(n) for n in names]
    x_train = torch.cat([p[0] for p in parts]).float() / 255.0
    y_train = torch.cat([p[1] for p in parts])
    if os.path.exists(os.path.join(root, "test_batch")):
        x_test_u8, y_test = read("test_batch")
        x_test = x_test_u8.float() / 255.0
    else:
        train, test = _split(x_train.shape[0], 0.2 if test_fraction is None else test_fraction)
        x_train, x_test, y_train, y_test = x_train[train], x_train[test], y_train[train], y_train[test]
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return ClassificationData(
        (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, 10, f"CIFAR-10 python batches in {root}"
    )


_IDX_DTYPES = {
    0x08: (torch.uint8, "B"),
    0x09: (torch.int8, "b"),
    0x0B: (torch.int16, ">h"),
    0x0C: (torch.int32, ">i"),
    0x0D: (torch.float32, ">f"),
    0x0E: (torch.float64, ">d"),
}


def load_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read one IDX file (MNIST's format; ``.gz`` accepted): magic ``0x0000TTDD`` (type code, number of
    dimensions), then the big-endian int32 sizes, then the data, big-endian.
    Format: http://yann.lecun.com/exdb/mnist/ ("FILE FORMATS FOR THE MNIST DATABASE")."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    dtype, fmt = _IDX_DTYPES[code]
    import numpy as np

    count = 1
    for d in dims:
        count *= d
    np_dtype = np.dtype(fmt if fmt.startswith(">") else fmt)
    body = raw[4 + 4 * ndim :]
    if len(body) != count * np_dtype.itemsize:
        raise ValueError(f"{path}: expected {count * np_dtype.itemsize} data bytes, found {len(body)}")
    arr = np.frombuffer(body, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
    return torch.from_numpy(arr.copy()).to(dtype).reshape(dims)


def load_mnist_sequences(
    images: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    *,
    test_images: str | os.PathLike[str] | None = None,
    test_labels: str | os.PathLike[str] | None = None,
    test_fraction: float = 0.2,
) -> ClassificationData:
    """MNIST-style IDX image and label files as pixel-by-pixel sequences ``(N, H*W, 1)`` (sequential MNIST:
    784 steps for 28x28 images), standardised with the training statistics."""
    x = load_idx(images).float() / 255.0
    y = load_idx(labels).long()
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected images (N, H, W) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if test_images is not None and test_labels is not None:
        xtr, ytr = x, y
        xte, yte = load_idx(test_images).float() / 255.0, load_idx(test_labels).long()
    else:
        train, test = _split(x.shape[0], test_fraction)
        xtr, ytr, xte, yte = x[train], y[train], x[test], y[test]
    xtr, xte = _standardise(xtr, xte)
    num_classes = max(int(ytr.max()) + 1, int(yte.max()) + 1, 2)
    return ClassificationData(
        xtr.reshape(xtr.shape[0], -1, 1), ytr, xte.reshape(xte.shape[0], -1, 1), yte, num_classes,
        f"IDX files {os.fspath(images)}",
    )


def load_csv_table(
    path: str | os.PathLike[str], *, target: str, test_fraction: float = 0.2
) -> ClassificationData:
    """A CSV file with a header row; every column but ``target`` is a numeric feature; ``target`` holds
    class labels (any strings, mapped to 0..K-1 in sorted order). Features are standardised per column."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{os.fspath(path)}: no data rows")
    if target not in rows[0]:
        raise ValueError(f"target column {target!r} not in {sorted(rows[0])}")
    features = [c for c in rows[0] if c != target]
    classes = sorted({r[target] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    try:
        x = torch.tensor([[float(r[c]) for c in features] for r in rows], dtype=torch.float32)
    except ValueError as err:
        raise ValueError(f"{os.fspath(path)}: non-numeric feature value ({err})") from None
    y = torch.tensor([index[r[target]] for r in rows], dtype=torch.int64)
    train, test = _split(x.shape[0], test_fraction)
    xtr, xte = x[train], x[test]
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    return ClassificationData(
        (xtr - mean) / std, y[train], (xte - mean) / std, y[test], max(len(classes), 2),
        f"CSV table {os.fspath(path)}",
    )


# ------------------------------------------------------------------------------------------------------
# Translation


PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
_SPECIALS = (PAD, BOS, EOS, UNK)


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens; hyphens and apostrophes become tokens of their own, commas are dropped."""
    text = text.lower().replace(",", " ")
    return re.findall(r"[^\s\-']+|[\-']", text)


def detokenize(tokens: Iterable[str]) -> str:
    """Invert :func:`tokenize` (hyphens and apostrophes re-attached)."""
    out = " ".join(tokens)
    return re.sub(r" ?([\-']) ?", r"\1", out)


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A word vocabulary with ``<pad>=0, <s>=1, </s>=2, <unk>=3``."""

    words: tuple[str, ...]

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]]) -> Vocab:
        seen = sorted({w for s in sentences for w in s} - set(_SPECIALS))
        return cls(_SPECIALS + tuple(seen))

    def __len__(self) -> int:
        return len(self.words)

    @property
    def pad(self) -> int:
        return 0

    @property
    def bos(self) -> int:
        return 1

    @property
    def eos(self) -> int:
        return 2

    def encode(self, tokens: Sequence[str], length: int, *, bos: bool = False) -> list[int]:
        """Ids for ``tokens`` (+ ``</s>``, optionally a leading ``<s>``), padded to ``length``; raises
        ``ValueError`` when the sentence does not fit."""
        index = {w: i for i, w in enumerate(self.words)}
        ids = ([self.bos] if bos else []) + [index.get(t, 3) for t in tokens] + [self.eos]
        if len(ids) > length:
            raise ValueError(f"sentence of {len(ids)} tokens does not fit in length {length}")
        return ids + [self.pad] * (length - len(ids))

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens up to the first ``</s>``, without specials."""
        out: list[str] = []
        for i in ids:
            if i == self.eos:
                break
            if i >= len(_SPECIALS):
                out.append(self.words[i])
        return out


@dataclasses.dataclass(frozen=True)
class TranslationData:
    """Token-id tensors for a sequence-to-sequence task, plus the raw test sentences for scoring.

    ``src_*`` are ``(N, S)`` padded source ids ending in ``</s>``; ``tgt_*`` are ``(N, T)`` target ids
    ``<s> ... </s>`` padded; ``test_refs`` are the detokenised reference sentences.
    """

    src_train: torch.Tensor
    tgt_train: torch.Tensor
    src_test: torch.Tensor
    tgt_test: torch.Tensor
    src_vocab: Vocab
    tgt_vocab: Vocab
    test_refs: tuple[str, ...]
    source: str


def _translation_tensors(
    pairs_train: Sequence[tuple[str, str]], pairs_test: Sequence[tuple[str, str]], source: str
) -> TranslationData:
    tok_tr = [(tokenize(s), tokenize(t)) for s, t in pairs_train]
    tok_te = [(tokenize(s), tokenize(t)) for s, t in pairs_test]
    src_vocab = Vocab.build(s for s, _ in tok_tr)
    tgt_vocab = Vocab.build(t for _, t in tok_tr)
    s_len = max(len(s) for s, _ in tok_tr + tok_te) + 1
    t_len = max(len(t) for _, t in tok_tr + tok_te) + 2

    def enc(tok: Sequence[tuple[list[str], list[str]]]) -> tuple[torch.Tensor, torch.Tensor]:
        src = torch.tensor([src_vocab.encode(s, s_len) for s, _ in tok], dtype=torch.int64)
        tgt = torch.tensor([tgt_vocab.encode(t, t_len, bos=True) for _, t in tok], dtype=torch.int64)
        return src, tgt

    src_tr, tgt_tr = enc(tok_tr)
    src_te, tgt_te = enc(tok_te)
    refs = tuple(detokenize(t) for _, t in tok_te)
    return TranslationData(src_tr, tgt_tr, src_te, tgt_te, src_vocab, tgt_vocab, refs, source)


def number_phrases(
    *, low: int = 0, high: int = 1000, test_fraction: float = 0.2, limit: int | None = None
) -> TranslationData:
    """English -> French number names for the integers ``low..high-1`` (``num2words``), a random
    ``test_fraction`` of the numbers held out for testing (the model must compose, not memorise: the test
    numbers never appear in training). ``limit`` caps the training pairs (tiny studies)."""
    from num2words import num2words  # generates the phrases: no download

    if not 0 <= low < high:
        raise ValueError(f"need 0 <= low < high, got low={low}, high={high}")
    numbers = list(range(low, high))
    train, test = _split(len(numbers), test_fraction)
    pairs = [(num2words(n, lang="en"), num2words(n, lang="fr")) for n in numbers]
    p_train = [pairs[i] for i in train.tolist()]
    p_test = [pairs[i] for i in test.tolist()]
    if limit is not None:
        p_train, p_test = p_train[:limit], p_test[: max(1, limit // 4)]
    return _translation_tensors(p_train, p_test, f"num2words en->fr, integers {low}..{high - 1}")


def load_parallel_text(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    test_fraction: float = 0.1,
    max_tokens: int = 64,
) -> TranslationData:
    """A parallel corpus as two aligned UTF-8 text files, one sentence per line (``train.en`` /
    ``train.fr``, the layout of WMT, Europarl and OPUS "Moses" downloads). Empty pairs and pairs longer than
    ``max_tokens`` tokens on either side are dropped; a fixed random ``test_fraction`` is held out."""
    with open(source, encoding="utf-8") as fs, open(target, encoding="utf-8") as ft:
        src_lines, tgt_lines = fs.read().splitlines(), ft.read().splitlines()
    if len(src_lines) != len(tgt_lines):
        raise ValueError(
            f"parallel files differ in length: {len(src_lines)} source lines, {len(tgt_lines)} target lines"
        )
    pairs = [
        (s.strip(), t.strip())
        for s, t in zip(src_lines, tgt_lines, strict=True)
        if s.strip() and t.strip() and len(tokenize(s)) <= max_tokens and len(tokenize(t)) <= max_tokens
    ]
    if len(pairs) < 2:
        raise ValueError("need at least 2 non-empty sentence pairs")
    train, test = _split(len(pairs), test_fraction)
    return _translation_tensors(
        [pairs[i] for i in train.tolist()],
        [pairs[i] for i in test.tolist()],
        f"parallel text {os.fspath(source)} / {os.fspath(target)}",
    )
