"""Every quantize path keeps autograd the same way: a straight-through (identity) gradient, and forward bits
identical to the call without autograd."""

from __future__ import annotations

import pytest
import torch

from lossscale import quantize

# (dtype, format, keyword arguments): one per kernel path, so that each path is covered.
PATHS = [
    (torch.float32, "bf16", {}),  # torch's native cast
    (torch.float32, "bf16", {"impl": "bits"}),  # signed-pattern kernel (8 exponent bits): dropped autograd
    (torch.float32, "bf16", {"rounding": "stochastic"}),  # signed-pattern stochastic kernel
    (torch.float32, "e8m3", {}),  # signed-pattern kernel, a format torch lacks
    (torch.float32, "fp16", {"impl": "bits"}),  # addition kernel
    (torch.float32, "e4m3", {}),  # addition kernel, non-saturating NaN overflow
    (torch.float32, "e4m3", {"saturate": True}),  # native saturating cast
    (torch.float32, "e5m2", {"rounding": "stochastic"}),  # stochastic addition kernel
    (torch.float32, "e2m1", {}),  # no inf, no NaN: always saturates
    (torch.float32, "fp32", {"impl": "bits"}),  # identity
    (torch.float64, "bf16", {}),  # float64 container
    (torch.float64, "fp32", {}),  # float64 -> float32 cast
    (torch.bfloat16, "e4m3", {}),  # low-precision input, rounded in float32
    (torch.float16, "e5m2", {}),
]


@pytest.mark.parametrize(("dtype", "fmt", "kw"), PATHS)
def test_straight_through_gradient_on_every_path(dtype: torch.dtype, fmt: str, kw: dict[str, object]) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.cat([torch.randn(64, generator=g) * 4.0 ** torch.randint(-12, 12, (64,), generator=g),
                      torch.tensor([0.0, -0.0, 1e30, -1e-30, float("inf")])]).to(dtype)
    x = base.clone().requires_grad_(True)
    seed = kw.get("rounding") == "stochastic"
    q = quantize(x, fmt, generator=torch.Generator().manual_seed(1) if seed else None, **kw)  # type: ignore[arg-type]
    ref = quantize(base, fmt, generator=torch.Generator().manual_seed(1) if seed else None, **kw)  # type: ignore[arg-type]
    assert q.requires_grad and q.dtype == dtype and q.shape == x.shape
    assert torch.equal(q.detach().view(-1).isnan(), ref.isnan())
    same = ~ref.isnan()
    assert torch.equal(q.detach()[same], ref[same])  # same bits as without autograd
    up = torch.linspace(-3.0, 3.0, x.numel()).to(dtype)
    q.backward(up)
    assert x.grad is not None and torch.equal(x.grad, up)  # identity, also where q overflowed or underflowed


def test_empty_and_zero_dim_keep_autograd() -> None:
    for x in (torch.empty(0, 3, requires_grad=True), torch.tensor(0.3, requires_grad=True)):
        q = quantize(x, "bf16", impl="bits")
        q.sum().backward()
        assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


def test_no_graph_without_grad() -> None:
    x = torch.randn(8, requires_grad=True)
    with torch.no_grad():
        q = quantize(x, "bf16", impl="bits")
    assert not q.requires_grad and q.grad_fn is None
    assert quantize(x.detach(), "fp16").grad_fn is None
