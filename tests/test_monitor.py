"""GradientMonitor: exact region counts, histogram, swamping vs brute force, no host syncs, scaler/emulation."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import lossscale
from lossscale import BF16, E4M3, E5M2, FP16, FP32, PRESETS, FloatFormat, GradientMonitor
from lossscale import monitor as monitor_mod
from lossscale.monitor import _kernel as kernel_mod
from lossscale.monitor import HIST_MIN_LOG2, Columns, gradient_stats, thresholds

from lossscale.quantize import quantize

from .oracle import round_nearest

INF, NAN = math.inf, math.nan
# FP32 is left out of the oracle tests (its table would have 2^31 entries); its thresholds are checked by hand.
ALL_FORMATS = [f for f in PRESETS.values() if f != FP32] + [
    FloatFormat.parse("fp16-ftz"),
    FloatFormat.parse("bf16-ftz"),
]
IDS = [f.name for f in ALL_FORMATS]


def f32(x: float) -> float:
    return float(np.float32(x))


def next_up(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def next_down(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(0)))


# ------------------------------------------------------------------------------------------------------
# Thresholds, against the brute-force oracle (independent of quantize)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=IDS)
def test_thresholds_are_the_exact_region_edges(fmt: FloatFormat) -> None:
    t = thresholds(fmt)
    r = lambda x: float(round_nearest(np.array([x]), fmt)[0])  # noqa: E731
    # zero: the largest FP32 value rounding to 0
    assert r(t.zero) == 0.0
    assert r(next_up(t.zero)) != 0.0
    # subnormal: the largest FP32 value rounding below min_normal
    assert abs(r(t.subnormal)) < fmt.min_normal
    assert abs(r(next_up(t.subnormal))) >= fmt.min_normal
    # finite: the largest FP32 value not rounding past max (the oracle saturates formats without inf/NaN,
    # so for those check the tie rule directly: max's last mantissa bit is 1, a tie goes up)
    if fmt.nonfinite != "none":
        assert math.isfinite(r(t.finite)) and r(t.finite) <= fmt.max
        assert not math.isfinite(r(next_up(t.finite)))
    else:
        midpoint = fmt.max + math.ldexp(1.0, fmt.emax - fmt.mantissa_bits - 1)
        assert t.finite == next_down(midpoint)


def test_thresholds_hand_values() -> None:
    # FP32 judged against itself: nothing underflows or overflows; below 2^-126 is subnormal.
    assert (thresholds(FP32).zero, thresholds(FP32).finite) == (0.0, FP32.max)
    assert thresholds(FP32).subnormal == next_down(2.0**-126)
    # FP16: min_subnormal/2 = 2^-25 is a tie whose even neighbour is 0; 65520 (max + ulp/2) is a tie whose
    # even neighbour is 65536 (inf).
    assert thresholds("fp16").zero == 2.0**-25
    assert thresholds("fp16").finite == next_down(65520.0)
    # E4M3: 464 = 448 + 16 is a tie to 448 (mantissa 110, even): still finite.
    assert thresholds(E4M3).finite == 464.0
    assert thresholds("bf16").zero == 2.0**-134
    assert thresholds(E5M2).zero == 2.0**-17
    # Flushing subnormals: everything that would round below min_normal becomes 0.
    ftz = thresholds("fp16-ftz")
    assert ftz.zero == ftz.subnormal == next_down(2.0**-14 - 2.0**-25)


# ------------------------------------------------------------------------------------------------------
# Region counts on hand-made gradients


def test_hand_made_counts_fp16() -> None:
    q = 2.0**-24  # FP16 min subnormal
    values = (
        [0.0] * 3  # exact zeros
        + [1e-12, q / 4, -q / 2] * 2  # underflow (q/2 is a tie to 0): 6
        + [next_up(q / 2), q, 1e-6, -5e-5, next_down(2.0**-14 - q / 2)]  # subnormal: 5
        + [2.0**-14 - q / 2, 2.0**-14, 1.0, -65504.0, next_down(65520.0)]  # normal: 5
        + [65520.0, -1e5, 3e38, INF, -INF]  # overflow: 5 (inf included)
        + [NAN, NAN]  # NaN: 2
    )
    row = gradient_stats(torch.tensor(values), ["fp16"])
    c = Columns(1)
    got = [int(row[i]) for i in (c.NUMEL, c.ZEROS, c.underflow(0), c.subnormal(0), c.overflow(0), c.INF, c.NAN)]
    assert got == [len(values), 3, 6, 5, 5, 2, 2]
    assert row[c.MAX_ABS] == INF
    assert row[c.MIN_ABS] == f32(1e-12)


def test_hand_made_counts_each_format_known_regions() -> None:
    fmts = [BF16, FP16, E5M2, E4M3]
    for i, fmt in enumerate(fmts):
        q, mn, mx = fmt.min_subnormal, fmt.min_normal, fmt.max
        # 4 below q/2, 3 subnormal, 2 normal, 1 above max: known by construction
        values = [q / 8, q / 4, q / 3, q / 2] + [q, 2 * q, mn / 2] + [mn, mx] + [mx * 4]
        row = gradient_stats(torch.tensor(values), fmts)
        c = Columns(len(fmts))
        assert (int(row[c.underflow(i)]), int(row[c.subnormal(i)]), int(row[c.overflow(i)])) == (4, 3, 1), fmt


def _oracle_counts(x: np.ndarray, fmt: FloatFormat) -> tuple[int, int, int]:
    """underflow, subnormal, overflow of float32 values, by the brute-force rounding oracle."""
    a = np.abs(x.astype(np.float64))
    fin = np.isfinite(a)
    big = fmt if fmt.nonfinite != "none" else FloatFormat(fmt.exponent_bits + 1, fmt.mantissa_bits)
    r = np.abs(round_nearest(np.where(fin, a, 0.0), big))
    full = np.abs(round_nearest(np.where(fin, a, 0.0), fmt))
    under = int(np.sum(fin & (a != 0) & (full == 0)))
    sub = int(np.sum(fin & (full != 0) & (full < fmt.min_normal)))
    over = int(np.sum(fin & ~(r <= fmt.max))) + int(np.sum(np.isinf(a)))
    return under, sub, over


def _log_uniform(n: int, seed: int, lo: float = -150.0, hi: float = 130.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        x = (2.0 ** rng.uniform(lo, hi, n)) * rng.choice([-1.0, 1.0], n)
        x = x.astype(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan] * 4, dtype=np.float32)
    x[: min(n, 20)] = specials[: min(n, 20)]
    return x


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=IDS)
def test_counts_match_oracle_on_wide_random_values(fmt: FloatFormat) -> None:
    x = _log_uniform(20000, seed=hash(fmt.name) % 1000)
    # Add every format's edges and their FP32 neighbours: the ties must go the right way.
    t = thresholds(fmt)
    edges = [t.zero, t.subnormal, t.finite, fmt.min_subnormal / 2, fmt.min_normal, fmt.max]
    extra = [v for e in edges for v in (next_down(e), f32(e), next_up(e))]
    x = np.concatenate([x, np.array(extra, dtype=np.float32)])
    row = gradient_stats(torch.from_numpy(x), [fmt])
    c = Columns(1)
    got = (int(row[c.underflow(0)]), int(row[c.subnormal(0)]), int(row[c.overflow(0)]))
    assert got == _oracle_counts(x, fmt)
    assert int(row[c.ZEROS]) == int(np.sum(x == 0))
    assert int(row[c.NAN]) == int(np.sum(np.isnan(x)))
    assert int(row[c.INF]) == int(np.sum(np.isinf(x)))


def test_histogram_is_ceil_log2_exactly() -> None:
    x = _log_uniform(30000, seed=1)
    x = np.concatenate([x, np.float32([2.0**-149, 2.0**-126, 1.0, 2.0, 3.0, 2.0**127, 3.4e38])])
    row = gradient_stats(torch.from_numpy(x), ["bf16"])
    c = Columns(1)
    a = np.abs(x[np.isfinite(x) & (x != 0)]).astype(np.float64)
    m, e = np.frexp(a)  # float64: FP32 subnormals are normal here
    ceil_log2 = np.maximum(e - (m == 0.5), HIST_MIN_LOG2)  # the lowest bin holds (0, 2^-126]
    expected = np.bincount(ceil_log2 - HIST_MIN_LOG2, minlength=255)
    assert np.array_equal(row[c.hist].numpy(), expected)
    # bin c holds 2^(c-1) < |g| <= 2^c: 1.0 is in bin 0, 2.0 in bin 1, 3.0 in bin 2
    one = gradient_stats(torch.tensor([1.0, 2.0, 3.0, 2.0**-149]), ["bf16"])[c.hist].numpy()
    assert one[0 - HIST_MIN_LOG2] == 1 and one[1 - HIST_MIN_LOG2] == 1 and one[2 - HIST_MIN_LOG2] == 1
    assert one[0] == 1  # 2^-149 in the first bin, (0, 2^-126]


def test_empty_and_low_precision_inputs() -> None:
    c = Columns(1)
    row = gradient_stats(torch.zeros(0), ["fp16"])
    assert int(row[c.NUMEL]) == 0 and row[c.MIN_ABS] == INF and row[c.MAX_ABS] == 0
    b = torch.tensor([1e-30, 1.0, 0.0], dtype=torch.bfloat16)
    row = gradient_stats(b, ["fp16"])
    assert (int(row[c.underflow(0)]), int(row[c.ZEROS])) == (1, 1)


def test_packing_and_segments_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Statistics of chunks of slices add up to the statistics of whole tensors."""
    tab = kernel_mod._tables((BF16, FP16, E5M2))
    rng = np.random.default_rng(0)
    tensors = [torch.from_numpy(_log_uniform(int(n), seed=int(s), lo=-40, hi=20)) for n, s in
               zip(rng.integers(1, 500, 12), range(12), strict=False)]
    pieces = [(i % 5, t) for i, t in enumerate(tensors)]
    expected = torch.zeros(5, tab.cols.width, dtype=torch.float64)
    expected[:, Columns.MIN_ABS] = INF
    for i, t in pieces:
        expected = kernel_mod._combine_tables(
            expected, _one_row_table(kernel_mod._segment_stats(t, None, 1, tab)[0], i, 5, tab.cols), tab.cols
        )
    for chunk_size in (7, 100, 1 << 22):
        got = torch.zeros(5, tab.cols.width, dtype=torch.float64)
        got[:, Columns.MIN_ABS] = INF
        for chunk in monitor_mod._pack(pieces, chunk_size):
            assert sum(t.numel() for _, t in chunk) <= chunk_size
            flat = torch.cat([t for _, t in chunk])
            seg = torch.cat([torch.full((t.numel(),), i) for i, t in chunk])
            got = kernel_mod._combine_tables(got, kernel_mod._segment_stats(flat, seg, 5, tab), tab.cols)
        assert torch.equal(got, expected), chunk_size


def _one_row_table(row: torch.Tensor, i: int, n: int, cols: Columns) -> torch.Tensor:
    t = torch.zeros(n, cols.width, dtype=torch.float64)
    t[:, Columns.MIN_ABS] = INF
    t[i] = row
    return t


# ------------------------------------------------------------------------------------------------------
# The monitor on a model


def mlp(seed: int = 0, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3))


def batches(n: int, seed: int = 0, batch: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)


@pytest.mark.parametrize(
    ("chunk", "width", "batch", "direct"),
    [
        (50, 16, 8, 1 << 17),  # many chunks, tensors split across them; extremes by per-element scatter
        (1 << 20, 16, 8, 1 << 17),  # one chunk of many short runs
        (1 << 20, 2048, 64, 1 << 30),  # long runs: extremes reduced run by run
        (20000, 2048, 64, 1 << 30),  # long runs split across chunks
        (1 << 20, 2048, 64, 1 << 12),  # the large gradients measured on their own as they come
        (50, 16, 8, 1),  # every gradient measured on its own
    ],
)
def test_monitor_rows_equal_stats_of_the_gradients(
    monkeypatch: pytest.MonkeyPatch, chunk: int, width: int, batch: int, direct: int
) -> None:
    monkeypatch.setattr(monitor_mod, "_CHUNK", chunk)
    monkeypatch.setattr(monitor_mod, "_DIRECT", direct)
    model = mlp(width=width)
    fmts = ("bf16", "fp16", "e5m2")
    mon = GradientMonitor(model, formats=fmts, every=2)
    # Independent capture of the same gradients.
    captured: dict[str, list[torch.Tensor]] = {}

    def capture(name: str):  # type: ignore[no-untyped-def]
        def hook(m: nn.Module, a: object, out: torch.Tensor) -> None:
            out.register_hook(lambda g: captured.setdefault(name, []).append(g))

        return hook

    for name, mod in model.named_modules():
        if name:
            mod.register_forward_hook(capture(name))
    expected_w: dict[str, list[torch.Tensor]] = {}
    for step, (x, y) in enumerate(batches(5, batch=batch)):
        captured.clear()
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step % 2 == 0:
            for name, p in model.named_parameters():
                expected_w.setdefault(name, []).append(gradient_stats(p.grad, fmts))
            for name, gs in captured.items():
                expected_w.setdefault(name, []).append(gradient_stats(gs[0], fmts))
        mon.step()
    stats = mon.read()
    assert stats.sampled == 3 and list(stats.steps) == [0, 2, 4]
    assert stats.source == "fp32" and stats.emulation is None
    assert [(e.name, e.kind) for e in stats.entries] == [
        ("0.weight", "weight"), ("0.bias", "weight"), ("2.weight", "weight"), ("2.bias", "weight"),
        ("0", "activation"), ("1", "activation"), ("2", "activation"),
    ]
    for r in range(3):
        for j, e in enumerate(stats.entries):
            assert np.array_equal(stats.tables[r, j], expected_w[e.name][r].numpy()), (r, e)
    c = stats.columns
    total = stats.total
    assert np.array_equal(total[:, c.NUMEL], stats.tables[:, :, c.NUMEL].sum(0))
    assert np.array_equal(total[:, c.MAX_ABS], stats.tables[:, :, c.MAX_ABS].max(0))
    assert np.all(np.isnan(stats.scales))


def test_history_keeps_the_last_tables_but_totals_cover_all() -> None:
    model = mlp()
    mon = GradientMonitor(model, formats=("fp16",), every=1, history=2)
    for x, y in batches(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        mon.step()
    s = mon.read()
    assert list(s.steps) == [2, 3] and s.sampled == 4
    assert s.total[0, s.columns.NUMEL] == 4 * 16 * 6


def test_unsampled_steps_and_remove_record_nothing() -> None:
    model = mlp()
    mon = GradientMonitor(model, every=3)
    for x, y in batches(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        mon.step()
    assert mon.read().sampled == 1
    mon.remove()
    mon.reset()
    nn.functional.cross_entropy(model(x), y).backward()
    mon.step()
    s = mon.read()
    assert s.tables.shape[0] == 0 and s.total[:, s.columns.NUMEL].sum() == 0


def test_weight_stats_are_taken_at_the_scale_used_and_the_scale_is_recorded() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = lossscale.LossScaler(init_scale=2.0**10)
    mon = GradientMonitor(model, formats=("fp16",), every=1, scaler=scaler)
    x, y = next(batches(1))
    scaled_grads: list[torch.Tensor] = []
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaled_grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)  # unscales .grad in place: the monitor must have kept the scaled values
    scaler.update()
    mon.step()
    s = mon.read()
    assert list(s.scales) == [1024.0]
    for j, g in enumerate(scaled_grads):
        assert np.array_equal(s.tables[0, j], gradient_stats(g, ["fp16"]).numpy())


def test_skipped_steps_are_those_with_nonfinite_weight_gradients() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = lossscale.LossScaler(init_scale=2.0**4)
    mon = GradientMonitor(model, formats=("fp16",), every=1, scaler=scaler, optimizer=opt)
    for i, (x, y) in enumerate(batches(3)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if i == 1:
            loss = loss * INF  # inf gradients: the scaler skips this step
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        mon.step()
    s = mon.read()
    assert list(s.skipped()) == [False, True, False]
    assert list(s.scales) == [16.0, 16.0, 8.0]
    # The skipped step ran no optimizer step: no swamping data for it.
    c = s.columns
    w = [j for j, e in enumerate(s.entries) if e.kind == "weight"]
    assert s.tables[1, w, c.updated].sum() == 0 and s.tables[0, w, c.updated].sum() > 0


@pytest.mark.parametrize("direct", [1 << 17, 1])  # parameters packed / compared one by one
def test_swamping_fraction_matches_brute_force(monkeypatch: pytest.MonkeyPatch, direct: int) -> None:
    monkeypatch.setattr(monitor_mod, "_DIRECT", direct)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 2))
    with torch.no_grad():
        # Weights over many binades, some exactly representable, some zero: updates of every size relative
        # to them.
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 2.0 ** torch.randint(-12, 4, p.shape).float())
        model[0].weight[0, :4] = torch.tensor([1.0, 0.5, 0.0, 2.0**-20])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fmts = (BF16, FP16, E5M2)
    mon = GradientMonitor(model, formats=fmts, every=1, optimizer=opt, activations=False)
    names = [n for n, _ in model.named_parameters()]
    expected = np.zeros((len(names), 1 + len(fmts)))
    for x, y in batches(2):
        x, y = x.repeat(1, 2), y % 2
        x[:, :3] = 0.0  # zero gradients for these weight columns: SGD leaves them unchanged
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        old = [p.detach().clone().numpy().ravel() for p in model.parameters()]
        opt.step()
        new = [p.detach().numpy().ravel() for p in model.parameters()]
        for j, (o, n) in enumerate(zip(old, new, strict=False)):
            for a, b in zip(o.tolist(), n.tolist(), strict=False):  # element by element, through the oracle
                if a != b:
                    expected[j, 0] += 1
                    for f, fmt in enumerate(fmts):
                        ra, rb = (float(round_nearest(np.array([v]), fmt)[0]) for v in (a, b))
                        expected[j, 1 + f] += ra == rb
        mon.step()
    s = mon.read()
    c = s.columns
    got = s.total[:, c.updated : c.updated + 1 + len(fmts)]
    assert np.array_equal(got, expected)
    assert expected[:, 0].sum() < 2 * sum(p.numel() for p in model.parameters())  # some not updated
    assert 0 < expected[:, 1].sum() < expected[:, 0].sum()  # some, not all, swamped in bf16
    assert expected[:, 2].sum() < expected[:, 1].sum()  # fp16 keeps more small updates than bf16


@pytest.mark.parametrize("direct", [1 << 17, 1])
def test_swamping_sees_updates_of_non_contiguous_parameters(monkeypatch: pytest.MonkeyPatch, direct: int) -> None:
    monkeypatch.setattr(monitor_mod, "_DIRECT", direct)
    # A channels_last convolution weight is not contiguous: a flattened view of it is a copy, which the
    # optimizer step does not update. The new values must be read from the parameter itself.
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    assert not model[0].weight.is_contiguous()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GradientMonitor(model, formats=("bf16",), every=1, optimizer=opt, activations=False)
    old = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 3, 8, 8)).square().sum().backward()
    opt.step()
    mon.step()
    expected = [float((p.detach() != o).sum()) for p, o in zip(model.parameters(), old, strict=True)]
    c = Columns(1)
    got = mon.read().total[:, c.updated].tolist()
    assert expected[0] > 100  # the conv weight did move (108 elements)
    assert got == expected


@pytest.mark.parametrize("direct", [1 << 17, 1])
def test_two_backward_passes_count_activations_twice_and_the_last_weight_gradient(
    monkeypatch: pytest.MonkeyPatch, direct: int
) -> None:
    monkeypatch.setattr(monitor_mod, "_DIRECT", direct)
    model = mlp()
    mon = GradientMonitor(model, formats=("fp16",), every=1)
    acts: dict[str, list[torch.Tensor]] = {}
    def keep(name: str):  # type: ignore[no-untyped-def]
        def hook(m: nn.Module, a: object, out: torch.Tensor) -> None:
            out.register_hook(lambda g: acts.setdefault(name, []).append(g))

        return hook

    for name, mod in model.named_modules():
        if name:
            mod.register_forward_hook(keep(name))
    for x, y in batches(2):
        nn.functional.cross_entropy(model(x), y).backward()  # accumulates into .grad
    mon.step()
    s = mon.read()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for i, e in enumerate(s.entries):
        if e.kind == "weight":
            want = gradient_stats(grads[e.name], ["fp16"]).numpy()
        else:
            rows = [gradient_stats(g, ["fp16"]).numpy() for g in acts[e.name]]
            assert len(rows) == 2
            want = rows[0].copy()
            want[Columns.NUMEL :] += rows[1][Columns.NUMEL :]
            want[Columns.MAX_ABS] = max(r[Columns.MAX_ABS] for r in rows)
            want[Columns.MIN_ABS] = min(r[Columns.MIN_ABS] for r in rows)
        assert np.array_equal(s.total[i], want), e.name


@pytest.mark.parametrize("direct", [1 << 17, 1])
def test_no_host_sync_until_read(monkeypatch: pytest.MonkeyPatch, direct: int) -> None:
    monkeypatch.setattr(monitor_mod, "_DIRECT", direct)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GradientMonitor(model, every=1, optimizer=opt, scaler=lossscale.LossScaler(init_scale=4.0))
    calls: list[str] = []
    for name in ("item", "__bool__", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: object, _orig: object = orig, _name: str = name, **kw: object):  # type: ignore[no-untyped-def]
            calls.append(_name)
            return _orig(self, *args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, counting)
    for x, y in batches(3):
        opt.zero_grad()
        loss = mon._scaler.scale(nn.functional.cross_entropy(model(x), y))  # type: ignore[union-attr]
        loss.backward()
        opt.step()  # plain step: the scaler's own step() syncs once by design, which is not ours to count
        mon.step()
    assert calls == []
    mon.read()
    assert calls  # negative control: the patch does see the copy to the host


def test_emulated_run_reports_the_rounding_site_counters() -> None:
    model = mlp()
    counters = lossscale.RoundingCounters()
    mon = GradientMonitor(model, formats=("fp16",), every=1, counters=counters)
    x, y = next(batches(1))
    with lossscale.autocast("fp16-mixed", counters=counters, emulate=True):
        loss = nn.functional.cross_entropy(model(x * 1e-6), y)
    loss.backward()
    mon.step()
    s = mon.read()
    assert s.source == "emulated"
    assert s.emulation is not None
    site = s.emulation[("linear.output.grad", "fp16")]
    assert site["elements"] > 0 and set(site) >= {"elements", "nonzero", "underflow", "subnormal", "overflow"}
    # Every output says which is which.
    d = lossscale.Diagnosis.from_stats(s)
    out = json.loads(json.dumps(d.to_dict()))
    assert out["source"] == "emulated" and "already rounded" in out["source_note"]
    assert out["emulation"]["linear.output.grad|fp16"]["elements"] == site["elements"]
    md = d.to_markdown()
    assert "emulated low-precision run" in md and "Emulation rounding-site counters" in md


def test_multiple_devices_and_dtypes_are_measured_in_fp32() -> None:
    model = mlp().to(torch.float64)
    mon = GradientMonitor(model, formats=("fp16",), every=1)
    x, y = next(batches(1))
    nn.functional.cross_entropy(model(x.double()), y).backward()
    mon.step()
    s = mon.read()
    g = model[0].weight.grad
    assert np.array_equal(s.tables[0, 0], gradient_stats(g.float(), ["fp16"]).numpy())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ValueError, "every"),
        ({"formats": ()}, ValueError, "formats"),
        ({"formats": ("fp17",)}, ValueError, "unknown format"),
        ({"formats": ("fp16", "half")}, ValueError, "repeat"),
        ({"history": 0}, ValueError, "history"),
        ({"weights": False, "activations": False}, ValueError, "at least one"),
        ({"optimizer": object()}, TypeError, "optimizer"),
        ({"scaler": object()}, TypeError, "scaler"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        GradientMonitor(mlp(), **kwargs)  # type: ignore[arg-type]


def test_formats_from_comma_string() -> None:
    mon = GradientMonitor(mlp(), "bf16,e4m3")
    assert [f.name for f in mon.formats] == ["bf16", "e4m3"]
    assert FP16 not in mon.formats


def test_hooks_are_attached_only_for_sampled_steps() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GradientMonitor(model, every=3, optimizer=opt)
    attached = []
    for x, y in batches(7):
        attached.append((bool(model[0]._forward_hooks), bool(opt._optimizer_step_pre_hooks)))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        mon.step()
    assert attached == [(True, True), (False, False), (False, False), (True, True), (False, False),
                        (False, False), (True, True)]
    assert list(mon.read().steps) == [0, 3, 6]
    mon.remove()
    assert not model[0]._forward_hooks and not opt._optimizer_step_pre_hooks


@pytest.mark.parametrize("fmt", [BF16, FP16, E5M2])
def test_round_eq_native_casts_agree_with_the_bit_level_quantize(fmt: FloatFormat) -> None:
    # The swamping test "round_F(new) == round_F(old)" uses torch's casts for these formats; the oracle is
    # lossscale's own bit-level kernel (impl="bits"), on random FP32 patterns of every binade plus the
    # edges: ties at zero, the subnormal/normal boundary, the overflow tie, inf, NaN, signed zeros.
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    a = bits.view(torch.float32)
    t = kernel_mod.thresholds(fmt)
    edges = torch.tensor([0.0, -0.0, t.zero, t.subnormal, t.finite, math.inf, math.nan, fmt.max, fmt.min_normal])
    near = torch.cat([edges, torch.nextafter(edges, torch.full_like(edges, math.inf)), -edges])
    a = torch.cat([a, near, a * 2.0**-100, a * 2.0**-120])
    for b in (a.flip(0), torch.nextafter(a, torch.full_like(a, math.inf)), -a, a * 1.001):
        want = quantize(a, fmt, impl="bits") == quantize(b, fmt, impl="bits")
        assert torch.equal(kernel_mod._round_eq(a, b, fmt), want)
