"""The monitor's fused CPU kernels (lossscale/monitor/_native.c) against what they replace: torch's own casts
for the rounding, and the tensor path of lossscale.monitor._kernel for the counts, bit for bit."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lossscale import GradientMonitor
from lossscale.formats import FloatFormat
from lossscale.monitor import _kernel as K
from lossscale.monitor import _native as N
from lossscale.quantize import quantize

LIB = N.library()
pytestmark = pytest.mark.skipif(LIB is None, reason="no C compiler: the fused kernel is not built here")


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Force the tensor path (as on a machine without a C compiler)."""
    monkeypatch.setattr(N, "library", lambda: None)
    yield


def _patterns(n: int, seed: int) -> torch.Tensor:
    """Random FP32 bit patterns (every class: zeros, subnormals, normals, inf, NaN) plus every power of two and
    its neighbours, both signs."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    e = torch.arange(-149, 128)
    p2 = torch.ldexp(torch.ones(e.numel(), dtype=torch.float64), e).float()
    up = torch.nextafter(p2, torch.full_like(p2, math.inf))
    down = torch.nextafter(p2, torch.zeros_like(p2))
    mids = (p2.double() * 1.5).float()  # ties of the coarser formats sit at these
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65520.0, 57344.0, 61440.0])
    structured = torch.cat([p2, up, down, mids, special])
    return torch.cat([rand, structured, -structured]).contiguous()


@pytest.mark.parametrize(("name", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("e5m2", torch.float8_e5m2)])
def test_rounding_equals_torchs_cast(name: str, dtype: torch.dtype) -> None:
    assert LIB is not None
    x = _patterns(1 << 22, seed=1)
    y = N.round_ieee(LIB, x, FloatFormat.parse(name))
    ref = x.to(dtype).float()
    same = (y == ref) & (torch.signbit(y) == torch.signbit(ref))
    same |= y.isnan() & ref.isnan()
    bad = (~same).nonzero().flatten()
    assert bad.numel() == 0, [(x[i].item(), y[i].item(), ref[i].item()) for i in bad[:5].tolist()]


@pytest.mark.parametrize("spec", ["e6m9", "e8m3", "e4m3-ieee", "e3m2-ieee"])
def test_rounding_equals_quantize_for_custom_ieee_formats(spec: str) -> None:
    assert LIB is not None
    e, m = spec.split("-")[0][1:].split("m")
    fmt = FloatFormat(int(e), int(m), "ieee")
    x = _patterns(1 << 20, seed=2)
    y = N.round_ieee(LIB, x, fmt)
    ref = quantize(x, fmt)
    same = ((y == ref) & (torch.signbit(y) == torch.signbit(ref))) | (y.isnan() & ref.isnan())
    assert bool(same.all()), int((~same).sum())


def _edges_data(formats: tuple[FloatFormat, ...], seed: int) -> torch.Tensor:
    """Values at and around every threshold of the formats (where a wrong compare would show), plus noise."""
    vals: list[float] = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -3.0]
    for f in formats:
        t = K.thresholds(f)
        for v in (t.zero, t.subnormal, t.finite, f.min_normal, f.max, f.min_subnormal):
            c = torch.tensor([v], dtype=torch.float32)
            vals += [c.item(), torch.nextafter(c, torch.tensor([math.inf])).item(),
                     torch.nextafter(c, torch.tensor([0.0])).item()]
    g = torch.Generator().manual_seed(seed)
    edges = torch.tensor(vals, dtype=torch.float32).repeat(7)
    noise = torch.randn(50_000, generator=g) * torch.pow(2.0, torch.randint(-60, 20, (50_000,), generator=g).float())
    x = torch.cat([edges, -edges, noise, _patterns(20_000, seed)])
    return x[torch.randperm(x.numel(), generator=g)].contiguous()


MANY = ("bf16", "fp16", "e5m2", "e4m3", "e3m2", "e2m3", "e2m1", "e6m9", "e8m3")


@pytest.mark.parametrize("specs", [("bf16", "fp16", "e5m2"), ("e4m3",), ("fp16", "e2m1", "e3m2"), ("e5m2", "bf16"),
                                   ("fp32",), MANY])
def test_histogram_kernel_equals_the_tensor_path(specs: tuple[str, ...]) -> None:
    """The same rows (every count, the histogram, max and min) from the fused kernel and from the torch ops,
    for pieces of several rows; both forms of the kernel's edge test (a list of edges, and the lookup tables
    past MAX_EDGES edges: the MANY formats)."""
    assert LIB is not None
    formats = tuple(FloatFormat.parse(s) for s in specs)
    tab = K._tables(formats)
    if specs == MANY:
        assert len(tab.edge_pairs) > N.MAX_EDGES  # the lookup-table form runs
    x = _edges_data(formats, seed=len(specs))
    n = x.numel()
    cuts = [0, 7, 7, 1000, n // 3, n // 2, n - 5, n]  # an empty piece too
    rows = [2, 0, 2, 1, 3, 0, 1]
    pieces = [(rows[i], x[cuts[i] : cuts[i + 1]]) for i in range(len(rows))]

    native = K._Raw(4, tab, torch.device("cpu"))
    native.add_native(LIB, pieces)
    ref = K._Raw(4, tab, torch.device("cpu"))
    # The tensor path, forced: add_segments without layout hints never takes the kernel.
    seg = torch.cat([torch.full((t.numel(),), r, dtype=torch.int64) for r, t in pieces])
    ref.add_segments(torch.cat([t for _, t in pieces]), seg)
    assert torch.equal(native.counts, ref.counts)
    assert torch.equal(native.mx, ref.mx) and torch.equal(native.mn, ref.mn)
    assert torch.equal(native.rows(), ref.rows())


def test_bf16_and_fp64_inputs_are_counted_like_the_tensor_path(torch_path: None) -> None:
    assert LIB is not None
    tab = K._tables((FloatFormat.parse("bf16"), FloatFormat.parse("fp16")))
    x = _edges_data(tab.formats, seed=5)
    for t in (x.to(torch.bfloat16), x.double(), x.view(-1, 1).expand(-1, 2).t()[0]):  # the last: non-contiguous
        native = K._Raw(1, tab, torch.device("cpu"))
        native.add_native(LIB, [(0, t)])
        ref = K._Raw(1, tab, torch.device("cpu"))
        ref.add(t.reshape(-1), 0)  # the tensor path (library() is patched to None)
        assert torch.equal(native.rows(), ref.rows())


def _train(every: int, formats: tuple[str, ...], weights_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 600), nn.ReLU(), nn.Linear(600, 10))
    model.to(weights_dtype)
    big = nn.Linear(600, 600).to(weights_dtype)  # 360K weights: the direct (unpacked) path
    model.insert(4, big)
    model.insert(5, nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    mon = GradientMonitor(model, formats, every=every, optimizer=opt)
    for step in range(4):
        x = torch.randn(32, 64, dtype=weights_dtype) * (1e-3 if step % 2 else 1.0)
        opt.zero_grad()
        loss = model(x).float().square().mean() * 1e-4
        loss.backward()
        opt.step()
        mon.step()
    stats = mon.read()
    mon.remove()
    return torch.from_numpy(stats.tables.copy()), torch.from_numpy(stats.total.copy())


@pytest.mark.parametrize(("formats", "dtype"), [(("bf16", "fp16", "e5m2"), torch.float32),
                                                (("fp16", "e4m3"), torch.float32),
                                                (("bf16", "fp16"), torch.bfloat16)])
def test_monitor_tables_are_identical_with_and_without_the_kernel(
    formats: tuple[str, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A monitored training run (weights, activations, swamping through the optimizer) gives the same tables
    to the bit with the fused kernel and with the tensor path; the updates really are counted."""
    with_kernel = _train(1, formats, dtype)
    monkeypatch.setattr(N, "library", lambda: None)
    without = _train(1, formats, dtype)
    for a, b in zip(with_kernel, without, strict=True):
        assert torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0))
    cols = K.Columns(len(formats))
    assert with_kernel[1][:, cols.NUMEL].sum() > 0
    if dtype == torch.float32:  # (BF16 weights: these tiny updates are all lost in BF16 storage itself)
        assert with_kernel[1][:, cols.updated].sum() > 0 and with_kernel[1][:, cols.swamped(0)].sum() > 0


def test_without_a_compiler_the_tensor_path_runs_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    N._reset_for_tests()
    monkeypatch.setattr(N, "_compiler", lambda: None)
    try:
        with pytest.warns(N.PerformanceWarning, match="no C compiler"):
            assert N.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert N.library() is None  # once per process
        monkeypatch.setenv("LOSSSCALE_NATIVE", "0")
        N._reset_for_tests()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # disabled on purpose: silent
            assert N.library() is None
    finally:
        monkeypatch.undo()
        N._reset_for_tests()
    assert N.library() is not None
