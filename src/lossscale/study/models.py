"""The case-study models: a small ResNet, an LSTM classifier, an encoder-decoder Transformer, a deep plain MLP.

Plain ``torch.nn`` building blocks only (``nn.Conv2d``/``nn.BatchNorm2d``, ``nn.LSTM``, ``nn.Transformer*``
layers, ``nn.Linear``), so that the emulation sees exactly the layers a user's model has.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ResNet", "LSTMClassifier", "Seq2SeqTransformer", "DeepMLP"]


class _BasicBlock(nn.Module):
    """The two-convolution residual block of He et al., "Deep Residual Learning" (arXiv:1512.03385)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        res: torch.Tensor = torch.relu(out + self.shortcut(x))
        return res


class ResNet(nn.Module):
    """A small ResNet: a 3x3 stem, then ``len(widths)`` stages of ``blocks`` basic blocks (each stage after
    the first halves the resolution), global average pooling and a linear classifier."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32), blocks: int = 1
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(_BasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        logits: torch.Tensor = self.head(h.mean(dim=(2, 3)))
        return logits


class LSTMClassifier(nn.Module):
    """An ``nn.LSTM`` over the whole sequence, classifying from the last hidden state."""

    def __init__(self, input_size: int = 1, hidden: int = 64, num_classes: int = 10, layers: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        logits: torch.Tensor = self.head(out[:, -1])
        return logits


class Seq2SeqTransformer(nn.Module):
    """An encoder-decoder Transformer (Vaswani et al., arXiv:1706.03762) with learned positions, pre-norm
    layers (``norm_first=True``, more stable at small budgets) and no dropout (deterministic, small data)."""

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        *,
        d_model: int = 64,
        nhead: int = 4,
        layers: int = 2,
        ff: int = 128,
        max_len: int = 64,
        pad: int = 0,
    ) -> None:
        super().__init__()
        self.pad, self.d_model = pad, d_model
        self.src_emb = nn.Embedding(src_vocab, d_model, padding_idx=pad)
        self.tgt_emb = nn.Embedding(tgt_vocab, d_model, padding_idx=pad)
        self.pos = nn.Embedding(max_len, d_model)
        enc = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True, norm_first=True)
        dec = nn.TransformerDecoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, layers, norm=nn.LayerNorm(d_model))
        self.out = nn.Linear(d_model, tgt_vocab)

    def _embed(self, emb: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        out: torch.Tensor = emb(ids) * math.sqrt(self.d_model) + self.pos(positions)
        return out

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src_pad = src == self.pad
        return self.encoder(self._embed(self.src_emb, src), src_key_padding_mask=src_pad), src_pad

    def decode(self, memory: torch.Tensor, src_pad: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        t = tgt_in.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tgt_in.device), diagonal=1)
        h = self.decoder(
            self._embed(self.tgt_emb, tgt_in),
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=tgt_in == self.pad,
            memory_key_padding_mask=src_pad,
        )
        logits: torch.Tensor = self.out(h)
        return logits

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, src_pad = self.encode(src)
        return self.decode(memory, src_pad, tgt_in)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int, bos: int, eos: int) -> torch.Tensor:
        """Greedy decoding: ``(N, max_len)`` token ids starting with ``bos`` (positions after ``eos`` are
        filled with ``pad``)."""
        memory, src_pad = self.encode(src)
        ys = torch.full((src.shape[0], 1), bos, dtype=torch.int64, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len - 1):
            logits = self.decode(memory, src_pad, ys)[:, -1]
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            ys = torch.cat([ys, nxt[:, None]], dim=1)
            done = done | (nxt == eos)
        return ys


class DeepMLP(nn.Module):
    """A deep plain MLP, no normalisation and no residual connections: ``depth`` Linear+activation layers.

    With PyTorch's default ``nn.Linear`` initialisation (weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance
    1/(3 fan_in)) each tanh layer shrinks the backward signal by about sqrt(1/3): over 30 layers the
    activation gradients of the first layers are ~1e-7 of the last ones, far below FP16's smallest subnormal
    (2^-24) at loss scale 1, while the biases keep the forward activations at a healthy size. This is the
    vanishing-gradient regime of Glorot & Bengio (2010), and the stress case for FP16 without loss scaling.
    """

    def __init__(
        self, in_features: int = 64, width: int = 64, depth: int = 30, num_classes: int = 10,
        activation: str = "tanh", gain: float | None = None,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        if activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
        act: type[nn.Module] = nn.Tanh if activation == "tanh" else nn.ReLU
        layers: list[nn.Module] = [nn.Linear(in_features, width), act()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), act()]
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        if gain is not None:
            # Weights N(0, gain^2 / fan_in), zero biases: gain 1 is the edge of chaos for tanh (Schoenholz et
            # al. 2017, arXiv:1611.01232), where a deep plain net still trains.
            for m in self.net:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=gain / math.sqrt(m.in_features))
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)
        return logits
