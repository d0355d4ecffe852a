"""PyTorch's own GradScaler tests that run on CPU, reproduced and run against both scalers.

Written here from the behaviour checked by the ``test_grad_scaling_*`` tests (and ``test_pickle_gradscaler``,
``test_grad_scale_will_not_overflow``) of pytorch/pytorch ``test/test_torch.py`` (device-generic, CPU
included) and ``test/test_cuda.py`` (CUDA-only there, but whose behaviour holds on any device), with the
``_run_scaling_case`` harness of ``torch/testing/_internal/common_utils.py``. Each test takes the scaler
class: ``torch.amp.GradScaler`` is the control (it must pass, or the test is wrong), ``LossScaler`` the
subject. Tests of the bare kernels (``_amp_update_scale_``, ``_amp_foreach_non_finite_check_and_unscale_``)
and of multiple CUDA devices are left out: they do not exercise a scaler.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lossscale import LossScaler

ScalerCls = Callable[..., torch.amp.GradScaler]
SCALERS = [pytest.param(torch.amp.GradScaler, id="GradScaler"), pytest.param(LossScaler, id="LossScaler")]
DEVICE = "cpu"
# LossScaler warns once when a checkpoint overrides its settings; these tests load on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:LossScaler.load_state_dict")


# ---------------------------------------------------------------------------------------------------------
# The harness: a control run without scaling (that skips the optimizer step at skip_iter) against a scaled run
# that injects inf at skip_iter. Both must end with the same gradients, optimizer states and parameters.

Data = list[tuple[torch.Tensor, torch.Tensor]]
Run = Callable[[Data, nn.Module, torch.optim.Optimizer, Any, Callable[..., torch.Tensor], int, bool], None]


def _create_scaling_models_optimizers(
    optimizer_ctor: Callable[..., torch.optim.Optimizer], optimizer_kwargs: dict[str, Any]
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    mod_control = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    mod_scaling = copy.deepcopy(mod_control)
    kwargs = {"lr": 1.0, **optimizer_kwargs}
    return (
        mod_control,
        mod_scaling,
        optimizer_ctor(mod_control.parameters(), **kwargs),
        optimizer_ctor(mod_scaling.parameters(), **kwargs),
    )


def _create_scaling_case(
    optimizer_ctor: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    optimizer_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer, Data, nn.Module, int]:
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)) for _ in range(4)]
    torch.manual_seed(0)
    models_opts = _create_scaling_models_optimizers(optimizer_ctor, optimizer_kwargs or {})
    return (*models_opts, data, nn.MSELoss(), 2)


def _run_scaling_case(
    scaler_cls: ScalerCls,
    run: Run,
    unskipped: int,
    skipped: int,
    atol: float = 1e-7,
    optimizer_ctor: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    optimizer_kwargs: dict[str, Any] | None = None,
) -> None:
    for enabled in (True, False):
        mod_control, mod_scaling, opt_control, opt_scaling, data, loss_fn, skip_iter = _create_scaling_case(
            optimizer_ctor, optimizer_kwargs
        )
        scaler = scaler_cls(DEVICE, init_scale=128.0, growth_factor=2.0, enabled=enabled, growth_interval=1)
        run(data, mod_control, opt_control, scaler, loss_fn, skip_iter, False)
        run(data, mod_scaling, opt_scaling, scaler, loss_fn, skip_iter, True)
        if enabled:
            expected = 128.0 * scaler.get_growth_factor() ** unskipped * scaler.get_backoff_factor() ** skipped
            assert scaler.get_scale() == expected
        else:
            assert scaler.get_scale() == 1.0
        for c, s in zip(mod_control.parameters(), mod_scaling.parameters(), strict=True):
            assert (c.grad is None) == (s.grad is None)
            if c.grad is not None:
                torch.testing.assert_close(c.grad, s.grad, atol=atol, rtol=1e-5)
            c_state, s_state = opt_control.state[c], opt_scaling.state[s]
            for k in c_state:
                torch.testing.assert_close(c_state[k], s_state[k], atol=atol, rtol=1e-5)
            torch.testing.assert_close(c, s, atol=atol, rtol=1e-5)


def _inject_inf(model: nn.Module) -> None:
    with torch.no_grad():
        model[1].weight.grad.fill_(float("inf"))  # type: ignore[index, union-attr]


OPTIMIZERS = [
    pytest.param(torch.optim.SGD, {}, id="sgd"),
    pytest.param(torch.optim.SGD, {"momentum": 0.9, "foreach": True}, id="sgd-foreach"),
    pytest.param(torch.optim.Adam, {"lr": 0.01, "foreach": True}, id="adam-foreach"),
    pytest.param(torch.optim.AdamW, {"lr": 0.01, "fused": True}, id="adamw-fused"),
    pytest.param(torch.optim.SGD, {"momentum": 0.9, "fused": True}, id="sgd-fused"),
]


@pytest.mark.parametrize("scaler_cls", SCALERS)
@pytest.mark.parametrize(("optimizer_ctor", "optimizer_kwargs"), OPTIMIZERS)
def test_grad_scaling_autocast(
    scaler_cls: ScalerCls, optimizer_ctor: Callable[..., torch.optim.Optimizer], optimizer_kwargs: dict[str, Any]
) -> None:
    """test_torch.py: test_grad_scaling_autocast / _foreach / _fused (BF16 autocast on CPU)."""

    def run(
        data: Data,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        loss_fn: Callable[..., torch.Tensor],
        skip_iter: int,
        try_scaling_api: bool,
    ) -> None:
        for i, (x, y) in enumerate(data):
            optimizer.zero_grad()
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
            if try_scaling_api:
                scaler.scale(loss).backward()
                if i == skip_iter and scaler.is_enabled():
                    _inject_inf(model)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if (not scaler.is_enabled()) or (i != skip_iter):
                    optimizer.step()

    _run_scaling_case(scaler_cls, run, 3, 1, 1e-3, optimizer_ctor, optimizer_kwargs)


@pytest.mark.parametrize("scaler_cls", SCALERS)
def test_grad_scaling_clipping(scaler_cls: ScalerCls) -> None:
    """test_cuda.py: test_grad_scaling_clipping (clip the scaled gradients at max_norm * scale)."""

    def run(
        data: Data,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        loss_fn: Callable[..., torch.Tensor],
        skip_iter: int,
        try_scaling_api: bool,
    ) -> None:
        max_norm = 0.2
        for i, (x, y) in enumerate(data):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            if try_scaling_api:
                scaler.scale(loss).backward()
                nn.utils.clip_grad_norm_(model.parameters(), max_norm * scaler.get_scale())
                if i == skip_iter and scaler.is_enabled():
                    _inject_inf(model)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                if (not scaler.is_enabled()) or (i != skip_iter):
                    optimizer.step()

    _run_scaling_case(scaler_cls, run, 3, 1, 1e-5)


@pytest.mark.parametrize("scaler_cls", SCALERS)
def test_grad_scaling_clipping_separate_unscale(scaler_cls: ScalerCls) -> None:
    """test_cuda.py: test_grad_scaling_clipping_separate_unscale (unscale_, then clip the true gradients)."""

    def run(
        data: Data,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        loss_fn: Callable[..., torch.Tensor],
        skip_iter: int,
        try_scaling_api: bool,
    ) -> None:
        max_norm = 0.2
        for i, (x, y) in enumerate(data):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            if try_scaling_api:
                scaler.scale(loss).backward()
                if i == skip_iter and scaler.is_enabled():
                    _inject_inf(model)
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), max_norm, error_if_nonfinite=False)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                if (not scaler.is_enabled()) or (i != skip_iter):
                    optimizer.step()

    _run_scaling_case(scaler_cls, run, 3, 1)


@pytest.mark.parametrize("scaler_cls", SCALERS)
def test_grad_scaling_penalty(scaler_cls: ScalerCls) -> None:
    """test_cuda.py: test_grad_scaling_penalty (a gradient penalty through autograd.grad of the scaled loss)."""

    def run(
        data: Data,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        loss_fn: Callable[..., torch.Tensor],
        skip_iter: int,
        try_scaling_api: bool,
    ) -> None:
        for i, (x, y) in enumerate(data):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            params = list(model.parameters())
            if try_scaling_api:
                grads = torch.autograd.grad(scaler.scale(loss), params, create_graph=True)
                inv_scale = 1.0 / scaler.get_scale()
                grads = tuple(g * inv_scale for g in grads)
            else:
                grads = torch.autograd.grad(loss, params, create_graph=True)
            grad_norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
            loss = loss + grad_norm
            if try_scaling_api:
                scaler.scale(loss).backward()
                if i == skip_iter and scaler.is_enabled():
                    _inject_inf(model)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if (not scaler.is_enabled()) or (i != skip_iter):
                    optimizer.step()

    _run_scaling_case(scaler_cls, run, 3, 1, 1e-6)


@pytest.mark.parametrize("scaler_cls", SCALERS)
def test_grad_scaling_accumulation(scaler_cls: ScalerCls) -> None:
    """test_cuda.py: test_grad_scaling_accumulation (two micro-batches per step, no injection)."""

    def run(
        data: Data,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        loss_fn: Callable[..., torch.Tensor],
        skip_iter: int,
        try_scaling_api: bool,
    ) -> None:
        iters_to_accumulate = 2
        for i, (x, y) in enumerate(data):
            loss = loss_fn(model(x), y) / iters_to_accumulate
            if try_scaling_api:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            if (i + 1) % iters_to_accumulate == 0:
                if try_scaling_api:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad()

    _run_scaling_case(scaler_cls, run, 2, 0)


@pytest.mark.parametrize("scaler_cls", SCALERS)
def test_grad_scaling_multiple(scaler_cls: ScalerCls) -> None:
    """test_cuda.py: test_grad_scaling_multiple (two models, two losses, two optimizers, one scaler; inf in
    one model's gradients skips only its optimizer, and the scale backs off once)."""
    for enabled in (True, False):
        mod_control0, mod_scaling0, opt_control0, opt_scaling0, data, loss_fn, skip_iter = _create_scaling_case()
        mod_control1, mod_scaling1, opt_control1, opt_scaling1 = _create_scaling_models_optimizers(torch.optim.SGD, {})
        scaler = scaler_cls(DEVICE, init_scale=128.0, growth_factor=2.0, enabled=enabled, growth_interval=1)

        def run(
            model0: nn.Module,
            model1: nn.Module,
            optimizer0: torch.optim.Optimizer,
            optimizer1: torch.optim.Optimizer,
            try_scaling_api: bool,
            scaler: Any = scaler,
            data: Data = data,
            loss_fn: Callable[..., torch.Tensor] = loss_fn,
            skip_iter: int = skip_iter,
        ) -> None:
            for i, (x, y) in enumerate(data):
                optimizer0.zero_grad()
                optimizer1.zero_grad()
                output0, output1 = model0(x), model1(x)
                loss0 = loss_fn(0.3 * output0 + 0.7 * output1, y)
                loss1 = loss_fn(0.6 * output0 - 0.4 * output1, y)
                if try_scaling_api:
                    scaler.scale(loss0).backward(retain_graph=True)
                    scaler.scale(loss1).backward()
                    if i == skip_iter and scaler.is_enabled():
                        _inject_inf(model1)
                    scaler.unscale_(optimizer0)  # a separate unscale_ for one of the two
                    scaler.step(optimizer0)
                    scaler.step(optimizer1)
                    scaler.update()
                else:
                    loss0.backward(retain_graph=True)
                    loss1.backward()
                    optimizer0.step()
                    if (not scaler.is_enabled()) or (i != skip_iter):
                        optimizer1.step()

        run(mod_control0, mod_control1, opt_control0, opt_control1, False)
        run(mod_scaling0, mod_scaling1, opt_scaling0, opt_scaling1, True)
        expected = 128.0 * scaler.get_growth_factor() ** 3 * scaler.get_backoff_factor() ** 1 if enabled else 1.0
        assert scaler.get_scale() == expected
        controls = [*mod_control0.parameters(), *mod_control1.parameters()]
        scalings = [*mod_scaling0.parameters(), *mod_scaling1.parameters()]
        for c, s in zip(controls, scalings, strict=True):
            torch.testing.assert_close(c, s, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Scaling, private methods, checkpoints, pickling


@pytest.mark.parametrize("scaler_cls", SCALERS)
def test_grad_scaling_scale(scaler_cls: ScalerCls) -> None:
    """test_cuda.py: test_grad_scaling_scale (nested iterables of tensors; the scale lives on their device)."""
    scaler = scaler_cls(DEVICE, init_scale=2.0)
    t0 = torch.full((1,), 4.0, dtype=torch.float32)
    outputs = scaler.scale((t0.clone(), (t0.clone(), t0.clone()), [t0.clone(), (t0.clone(), t0.clone())]))
    assert outputs[0] == 8.0 and outputs[1][0] == 8.0 and outputs[1][1] == 8.0  # type: ignore[index]
    assert outputs[2][0] == 8.0 and outputs[2][1][0] == 8.0 and outputs[2][1][1] == 8.0  # type: ignore[index]
    assert scaler._scale is not None and scaler._scale.device == t0.device
    with pytest.raises(ValueError):  # GradScaler: "outputs must be a Tensor or an iterable of Tensors"
        scaler.scale([t0, 4.0])  # type: ignore[list-item]


@pytest.mark.parametrize("scaler_cls", SCALERS)
def test_grad_scaling_unscale_sparse(scaler_cls: ScalerCls) -> None:
    """test_torch.py: test_grad_scaling_unscale_sparse, through the private ``_unscale_grads_``."""
    scaler = scaler_cls(DEVICE)
    inv_scale = torch.full((1,), 0.25, dtype=torch.float32)
    found_inf = torch.empty((1,), dtype=torch.float32)
    cur = found_inf.device
    i = torch.tensor([[0, 1, 1], [2, 0, 2]], dtype=torch.int64)
    v = torch.tensor([16.0, 32.0, 64.0])
    s = torch.sparse_coo_tensor(i, v, torch.Size([2, 3]))
    p = s.clone()
    assert p.is_sparse
    opt = torch.optim.SGD([p], lr=1.0)

    p.grad = s.clone()
    found_inf.zero_()
    found = scaler._unscale_grads_(opt, inv_scale, found_inf, False)[cur]
    assert found.item() == 0.0
    assert torch.equal(p.grad.to_dense(), (s / 4).to_dense())

    for bad in (float("inf"), float("nan")):
        p.grad = torch.sparse_coo_tensor(i, torch.tensor([16.0, 32.0, bad]), torch.Size([2, 3]))
        found_inf.zero_()
        assert scaler._unscale_grads_(opt, inv_scale, found_inf, False)[cur].item() == 1.0

    p = s.clone().half()
    assert p.is_sparse
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = s.clone().half()
    found_inf.zero_()
    assert scaler._unscale_grads_(opt, inv_scale, found_inf, True)[cur].item() == 0.0
    assert torch.equal(p.grad.to_dense(), (s.half() / 4).to_dense())

    # Uncoalesced FP16 values whose sum overflows: the check must see the coalesced values.
    i = torch.tensor([[0, 1, 0], [2, 0, 2]], dtype=torch.int64)
    v = torch.tensor([64000.0, 32.0, 64000.0])
    p.grad = torch.sparse_coo_tensor(i, v, torch.Size([2, 3]), dtype=torch.float16)
    found_inf.zero_()
    assert scaler._unscale_grads_(opt, inv_scale, found_inf, True)[cur].item() == 1.0


@pytest.mark.parametrize("scaler_cls", SCALERS)
@pytest.mark.parametrize("lazy_init_scale", [True, False])
def test_grad_scaling_state_dict(scaler_cls: ScalerCls, lazy_init_scale: bool) -> None:
    """test_torch.py: test_grad_scaling_state_dict."""
    s0 = scaler_cls(DEVICE, init_scale=3.0, growth_factor=4.0, backoff_factor=0.5, growth_interval=2)
    s1 = scaler_cls(DEVICE, init_scale=6.0, growth_factor=7.0, backoff_factor=0.8, growth_interval=1)
    s1._init_growth_tracker = 7  # a value for load_state_dict to overwrite
    if lazy_init_scale:
        s1.scale(torch.full((1,), 4.0))
        assert s1._scale is not None and s1._scale.dtype == torch.float32
    s1.load_state_dict(s0.state_dict())
    assert s1.get_scale() == 3.0
    assert s1.get_growth_factor() == 4.0
    assert s1.get_backoff_factor() == 0.5
    assert s1.get_growth_interval() == 2
    assert s1._init_growth_tracker == 0
    # A disabled scaler ignores a state dict and reports scale 1.
    s2 = scaler_cls(DEVICE, enabled=False)
    s2.load_state_dict(s0.state_dict())
    assert s2.get_scale() == 1.0 and s2.state_dict() == {}


@pytest.mark.parametrize("scaler_cls", SCALERS)
@pytest.mark.parametrize("lazy_init_scale", [True, False])
def test_pickle_gradscaler(scaler_cls: ScalerCls, lazy_init_scale: bool) -> None:
    """test_cuda.py: test_pickle_gradscaler (on CPU)."""
    a = scaler_cls(DEVICE, init_scale=3.0, growth_factor=4.0, backoff_factor=0.5, growth_interval=2)
    assert a.is_enabled()
    if lazy_init_scale:
        a.scale(torch.tensor([4.0], dtype=torch.float32))
        assert a._scale is not None and a._scale.device.type == DEVICE
    b = pickle.loads(pickle.dumps(a))
    assert b.is_enabled() == a.is_enabled()
    assert b.get_scale() == 3.0
    assert b.get_growth_factor() == 4.0
    assert b.get_backoff_factor() == 0.5
    assert b.get_growth_interval() == 2
    assert b._init_growth_tracker == 0
    # A dummy key tests the defaultdict's default_factory.
    assert b._per_optimizer_states["fdsa"] == torch.amp.grad_scaler._refresh_per_optimizer_state()
    if lazy_init_scale:
        assert b.scale(torch.tensor([4.0], dtype=torch.float32)).item() == 12.0


@pytest.mark.parametrize("scaler_cls", SCALERS)
def test_grad_scale_will_not_overflow(scaler_cls: ScalerCls) -> None:
    """test_cuda.py: test_grad_scale_will_not_overflow (growth is refused when it would overflow FP32)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    optimizer = torch.optim.Adam(model.parameters())
    scaler = scaler_cls(DEVICE, growth_interval=1, growth_factor=2**4, init_scale=1e38)
    optimizer.zero_grad()
    x = torch.randn(1, 5)
    y = 1e-30 * torch.randn(1, 1)
    loss = ((model(x) - y) ** 2).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler._scale is not None
    assert bool(torch.isfinite(scaler._scale))


@pytest.mark.parametrize("scaler_cls", SCALERS)
def test_grad_scaler_pass_itself(scaler_cls: ScalerCls) -> None:
    """test_torch.py: test_grad_scaler_pass_itself. An optimizer whose step takes ``grad_scaler`` gets the
    scaler itself (a GradScaler), with a FutureWarning, and no attributes; one without gets ``grad_scale`` and
    ``found_inf`` tensors."""
    seen: dict[str, Any] = {}

    class _PlaceHolderOptimizer(torch.optim.Optimizer):
        _step_supports_amp_scaling = True

        def __init__(self, params: Any) -> None:
            super().__init__(params, {})

    class Optimizer1(_PlaceHolderOptimizer):
        def step(self, closure: Any = None, *, grad_scaler: Any = None) -> None:  # type: ignore[override]
            seen["o1"] = (
                isinstance(grad_scaler, torch.amp.GradScaler),
                hasattr(self, "grad_scale"),
                hasattr(self, "found_inf"),
            )

    class Optimizer2(_PlaceHolderOptimizer):
        def step(self, closure: Any = None) -> None:  # type: ignore[override]
            seen["o2"] = (
                isinstance(getattr(self, "grad_scale", None), torch.Tensor),
                isinstance(getattr(self, "found_inf", None), torch.Tensor),
            )

    torch.manual_seed(0)
    x = torch.randn(4, 4)
    m = nn.Linear(4, 1)
    o1, o2 = Optimizer1(m.parameters()), Optimizer2(m.parameters())
    scaler = scaler_cls(DEVICE, init_scale=2.0)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = m(x).mean()
    scaler.scale(loss).backward()
    with pytest.warns(FutureWarning):
        scaler.step(o1)
    scaler.step(o2)
    scaler.update()
    assert seen == {"o1": (True, False, False), "o2": (True, True)}
    assert not hasattr(o2, "grad_scale") and not hasattr(o2, "found_inf")  # removed after the step


@pytest.mark.parametrize("scaler_cls", SCALERS)
def test_params_invalidated_with_grads_invalidated_between_unscale_and_step(scaler_cls: ScalerCls) -> None:
    """test_torch.py: the test of that name. Gradients broken *after* ``unscale_`` are not checked again:
    the step runs and the parameters become non-finite, for GradScaler and (at scale >= 1, where unscaling
    cannot overflow and nothing is re-checked) for LossScaler alike."""
    for ctor, kwargs in ((torch.optim.SGD, {}), (torch.optim.Adam, {"lr": 0.01, "foreach": True})):
        model, _, optimizer, _, data, loss_fn, _ = _create_scaling_case(ctor, kwargs)
        scaler = scaler_cls(DEVICE, init_scale=128.0)
        for x, y in data:
            optimizer.zero_grad()
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            for j, param in enumerate(model.parameters()):  # deliberately break the gradients
                param.grad.fill_(float("inf") if j % 2 else float("nan"))  # type: ignore[union-attr]
            scaler.step(optimizer)
            scaler.update()
        assert all(bool(p.isnan().any() or p.isinf().any()) for p in model.parameters())
