"""Run the case studies: one training run per (task, configuration, seed), seeded, resumable.

One run (:func:`run_one`) is the ordinary training loop a user writes with lossscale, nothing more::

    model, batches = task(seed)                       # lossscale.study.tasks
    optimizer = lossscale.optim.SGD/AdamW(..., compensation=C, weight_format=W)
    bf16-pure:   lossscale.low_precision_weights(model, "bf16-pure", optimizer=optimizer)
    scaler = lossscale.LossScaler(enabled=scaling != "none", dynamic=scaling == "dynamic", init_scale=S)
    monitor = lossscale.GradientMonitor(model, optimizer=optimizer, scaler=scaler, counters=counters)
    for step in range(steps):
        with lossscale.autocast(precision, counters=counters):
            loss = loss_fn(model, next(batches))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer); clip_grad_norm_(...)            (tasks that clip)
        scaler.step(optimizer); scaler.update(); optimizer.zero_grad(); monitor.step()
    metric = evaluate(model) under the same autocast

``static`` scaling takes its constant from :func:`lossscale.diagnose` on the run's own initial model and
first batches (FP32 reference steps on a copy): a power of two inside the recommended interval.

:func:`run_study` runs a list of :class:`RunSpec` in order or on worker processes (``spawn``, one thread
each, so every run computes exactly what it computes alone), writes ``results.json`` after every finished
run (so an interrupted study resumes with ``resume=True``) and shows a ``rich`` progress bar.
Runs are deterministic on CPU for a fixed seed and thread count.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import multiprocessing
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import torch
from torch import nn

from ..scaling import DynamicScaling, NoScaling, StaticScaling, config_to_dict
from .configs import StudyConfig
from .tasks import TASKS, budget_for, build, lr_multiplier

__all__ = [
    "RunSpec",
    "run_one",
    "run_study",
    "plan_runs",
    "environment",
    "is_activation_grad_site",
    "MONITOR_FORMATS",
    "dynamic_growth_interval",
    "dynamic_scaling",
]

# Formats the monitor judges gradients against (FP32 runs: "what would underflow in bf16/fp16/e5m2").
MONITOR_FORMATS: tuple[str, ...] = ("bf16", "fp16", "e5m2")

# Which backward rounding sites carry activation gradients: every ``*.grad`` site in the gradient format except
# those of weights, biases and masks (their ``.grad`` is a weight gradient). That covers the gradients entering
# the backward GEMMs (GEMM results: "output", "in_proj", "gates_hh", ...) and, where the output format is the
# gradient format (FP16, BF16), the dgrad results rounded at the operand sites ("input", "hidden", "query").
_NON_ACTIVATION_ROLE_WORDS: tuple[str, ...] = ("weight", "bias", "mask")


def is_activation_grad_site(site: str) -> bool:
    """Whether a rounding-site name (``"[module:]op.role.grad"``) is an activation-gradient rounding."""
    if not site.endswith(".grad"):
        return False
    role = site[: -len(".grad")].rsplit(":", 1)[-1].split(".", 1)[-1]
    return not any(w in role for w in _NON_ACTIVATION_ROLE_WORDS)


# Dynamic scaling starts at torch's default 2^16; the growth interval is shortened for short runs (torch's
# 2000 would never grow in a few hundred steps), which the results record.
DYNAMIC_INIT_SCALE = 2.0**16
# LayerwiseScaler's range for its loss scale S.
LAYERWISE_MIN_LOSS_SCALE = 2.0**-20
LAYERWISE_MAX_LOSS_SCALE = 2.0**20


def dynamic_growth_interval(steps: int) -> int:
    """Growth interval for a run of ``steps`` steps: steps // 10 clamped to [10, 2000] (torch: 2000)."""
    return max(10, min(2000, steps // 10))


def dynamic_scaling(steps: int) -> DynamicScaling:
    """The dynamic scaling rule of a ``:dynamic`` run of ``steps`` steps: torch's defaults but the growth
    interval (:func:`dynamic_growth_interval`). Runs and results.json both describe it with
    :func:`lossscale.scaling.config_to_dict`."""
    return DynamicScaling(init_scale=DYNAMIC_INIT_SCALE, growth_interval=dynamic_growth_interval(steps))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: task, configuration name, seed, budget mode and device."""

    task: str
    config: str
    seed: int
    mode: str = "quick"
    device: str = "cpu"
    # A sweep's changes to the task's budget, as sorted (name, value) pairs (lossscale.study.tasks.budget_for).
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid tasks: {', '.join(TASKS)}")
        StudyConfig.parse(self.config)  # ValueError listing valid names
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.task, StudyConfig.parse(self.config).name, self.seed)


def plan_runs(
    tasks: Sequence[str], configs: Sequence[StudyConfig], seeds: Sequence[int], *, mode: str, device: str
) -> list[RunSpec]:
    """Every (task, config, seed) combination, task-major (so a task's table fills in first)."""
    return [RunSpec(t, c.name, s, mode, device) for t in tasks for s in seeds for c in configs]


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment(device: str, threads: int, workers: int) -> dict[str, Any]:
    """What the runs ran on (stored in results.json)."""
    import numpy

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "threads_per_run": threads,
        "workers": workers,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        from .. import __version__

        env["lossscale"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return env


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _make_optimizer(
    model: nn.Module, task: str, config: StudyConfig, seed: int
) -> tuple[torch.optim.Optimizer, str, str]:
    from .. import optim as lsoptim

    recipe = TASKS[task].recipe
    params = [p for p in model.parameters() if p.requires_grad]
    # bf16-pure:none runs the optimizer's arithmetic in FP32 and lets the weight helper round the result to
    # BF16 after the step (round to nearest, what BF16 storage does): the monitor, hooked before that
    # rounding, then sees exactly which updates storage throws away. Kahan / stochastic rounding are the
    # optimizer's own job (it must know the weight format).
    compensated = config.precision == "bf16-pure" and config.compensation != "none"
    kw: dict[str, Any] = {"compensation": config.compensation}
    if compensated:
        kw["weight_format"] = "bf16"
    if config.compensation == "stochastic":
        kw["seed"] = seed  # the optimizer's own generator: reproducible, saved in its state_dict
    opt: torch.optim.Optimizer
    if recipe.optimizer == "sgd":
        opt = lsoptim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay, **kw
        )
        name = "lossscale.optim.SGD"
    else:
        opt = lsoptim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **kw)
        name = "lossscale.optim.AdamW"
    return opt, name, recipe.describe()


def static_scale(
    task: str, mode: str, seed: int, fmt: str, device: str, overrides: dict[str, Any] | None = None
) -> tuple[float, dict[str, Any]]:
    """The constant scale of a ``static`` run: from :func:`lossscale.diagnose` on the run's own initial
    model and first batches (a fresh copy; the run itself is untouched), the power of two at the geometric
    middle of the recommended interval (margin both ways: gradients shrink or grow as training goes on).
    When nothing needs scaling: 1.0. When scaling is needed but no scale meets the threshold: the largest power
    of two leaving one binade of headroom below the format's maximum. Syncs (reads the diagnosis)."""
    from ..diagnose import diagnose

    inst = build(task, mode, seed=seed, device=device, overrides=overrides)
    batches = [next(inst.batches) for _ in range(4)]
    diag = diagnose(copy.deepcopy(inst.model), inst.loss_fn, batches, formats=(fmt,), steps=4).to_dict()
    info = diag["formats"][fmt]
    rec = info.get("recommended_scale")
    fallback = None
    if rec:
        lo, hi = math.log2(float(rec["min"])), math.log2(float(rec["max"]))
        scale = 2.0 ** math.floor((lo + hi) / 2.0)
    elif info.get("needs_scaling") and diag.get("max_abs") and math.isfinite(float(diag["max_abs"])):
        # Scaling is needed but no scale keeps the underflow within the threshold without overflow (the
        # gradients span more binades than the format): the largest power of two that leaves the largest
        # gradient one binade below the format's maximum, so that as little as possible underflows.
        from ..formats import FloatFormat

        top = FloatFormat.parse(fmt).max / float(diag["max_abs"])
        scale = 2.0 ** min(math.floor(math.log2(top)) - 1, 126)  # (a scale must be a normal FP32 number)
        fallback = "largest scale with one binade of headroom (no scale meets the underflow threshold)"
    else:
        scale = 1.0
    return scale, {
        "format": fmt,
        "underflow_fraction_at_1": info.get("underflow_fraction"),
        "needs_scaling": info.get("needs_scaling"),
        "recommended_scale": rec,
        "chosen_scale": scale,
        **({"fallback": fallback} if fallback else {}),
    }


def _underflow_from_counters(counts: dict[tuple[str, str], Any], fmt: str) -> tuple[float | None, int]:
    """Element-weighted underflow fraction over the activation-gradient rounding sites in ``fmt``: of the
    nonzero values entering them, the fraction that came out zero; and that number of nonzero values."""
    nonzero = underflow = 0
    for (site, fname), c in counts.items():
        if fname == fmt and is_activation_grad_site(site):
            nonzero += c.nonzero
            underflow += c.underflow
    return (underflow / nonzero if nonzero else None), nonzero


def _monitor_fractions(stats: Any) -> tuple[dict[str, float | None], dict[str, float | None], list[int], int]:
    """From a MonitorStats: would-underflow fraction of activation gradients per format, swamping fraction
    of weight updates per format, and the activation-gradient exponent histogram (ceil log2, counts)."""
    from ..monitor import HIST_MIN_LOG2

    cols = stats.columns
    act = stats.kind_total("activation")
    wt = stats.kind_total("weight")
    nonzero = act[cols.NUMEL] - act[cols.ZEROS] - act[cols.NAN]
    under: dict[str, float | None] = {}
    swamp: dict[str, float | None] = {}
    for i, f in enumerate(stats.formats):
        under[f.name] = float(act[cols.underflow(i)] / nonzero) if nonzero > 0 else None
        updated = wt[cols.updated]
        swamp[f.name] = float(wt[cols.swamped(i)] / updated) if updated > 0 else None
    hist = act[cols.hist]
    nz = [i for i, v in enumerate(hist) if v > 0]
    if nz:
        counts = [int(v) for v in hist[nz[0] : nz[-1] + 1]]
        lo = HIST_MIN_LOG2 + nz[0]
    else:
        counts, lo = [], 0
    return under, swamp, counts, lo


def run_one(spec: RunSpec, *, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train one run and return its record (a JSON-ready dict, see :mod:`lossscale.study.schema`).

    Deterministic on CPU for a fixed seed and thread count. Syncs freely (this is the study's loop, not a
    library per-step path), but only once per step beyond what the scaler does (to record the loss curve).
    """
    from .. import LayerwiseScaler, LossScaler
    from ..emulate import RecipeState, RoundingCounters, autocast, low_precision_weights
    from ..precision import Precision
    from ..monitor import GradientMonitor

    t0 = time.perf_counter()
    config = StudyConfig.parse(spec.config)
    task = TASKS[spec.task]
    overrides = dict(spec.overrides)
    budget = budget_for(spec.task, spec.mode, overrides)
    steps = budget.steps
    device = spec.device

    static_info: dict[str, Any] | None = None
    init_scale = 1.0
    if config.scaling in ("static", "layerwise"):
        # Static: the constant loss scale. Layerwise: the loss scale S between layers, which the gradients of
        # ops outside the scaled layers (attention, a recurrence inside one module) carry: with S = 1 they
        # underflowed in E5M2 on the language models (75% on lm-lstm against 5.5% with dynamic scaling).
        assert config.grad_format is not None
        init_scale, static_info = static_scale(
            spec.task, spec.mode, spec.seed, config.grad_format, device, dict(spec.overrides)
        )

    inst = build(spec.task, spec.mode, seed=spec.seed, device=device, overrides=overrides)
    model = inst.model
    model.train()
    opt, opt_name, opt_desc = _make_optimizer(model, spec.task, config, spec.seed)
    base_lrs = [g["lr"] for g in opt.param_groups]

    skipped_at: list[int] = []

    def on_skip(ev: Any) -> None:
        skipped_at.append(int(ev.step))

    scaler: LossScaler | LayerwiseScaler
    if config.scaling == "dynamic":
        scaler = LossScaler.from_config(dynamic_scaling(steps), on_skip=on_skip)
        scaler_desc: dict[str, Any] = config_to_dict(scaler.config)
    elif config.scaling == "layerwise":
        assert config.grad_format is not None
        loss_scale = min(max(init_scale, LAYERWISE_MIN_LOSS_SCALE), LAYERWISE_MAX_LOSS_SCALE)
        scaler = LayerwiseScaler(model, grad_format=config.grad_format, loss_scale=loss_scale, on_skip=on_skip)
        scaler_desc = {"kind": "layerwise", "mode": "adaptive", "grad_format": config.grad_format,
                       "loss_scale": loss_scale, "chosen_by": "lossscale.diagnose", **(static_info or {})}
    elif config.scaling == "static":
        scaler = LossScaler.from_config(StaticScaling(init_scale=init_scale), on_skip=on_skip)
        scaler_desc = {**config_to_dict(scaler.config), "chosen_by": "lossscale.diagnose", **(static_info or {})}
    else:
        scaler = LossScaler.from_config(NoScaling())
        scaler_desc = config_to_dict(scaler.config)

    device_type = torch.device(device).type
    # Native torch.autocast where the device has fast kernels for the precision (CUDA BF16/FP16 mixed),
    # emulation elsewhere (every precision on CPU; FP8 and custom recipes everywhere). Native runs have no
    # rounding sites to count.
    # Scaling recipes (fp8-delayed, mxfp8, ...) keep per-site state (delayed-scaling histories) across steps.
    recipe_state = RecipeState()
    native = config.precision != "fp32" and not autocast(
        config.precision, device_type=device_type, recipe_state=recipe_state, model=model
    ).emulated
    # Delayed scaling keeps one amax history per layer (Transformer Engine's rule), which needs the sites named
    # by module (model=); other precisions keep no per-site state, so they skip the naming hooks.
    recipe = Precision.parse(config.precision).recipe if config.precision != "fp32" else None
    site_model = model if recipe is not None and recipe.kind == "delayed" else None
    counters = None if config.precision == "fp32" or native else RoundingCounters()
    every = max(1, steps // 20)
    monitor = GradientMonitor(
        model, formats=MONITOR_FORMATS, every=every, optimizer=opt, scaler=scaler, counters=counters
    )
    weights_handle = None
    if config.precision == "bf16-pure":
        # BF16 weight storage, emulated: rounded now, and around each step below (gradients before, weights
        # after) rather than through optimizer hooks, so that the monitor's own step hooks see the optimizer's
        # result before storage rounds it: that is how it counts the updates BF16 storage throws away.
        weights_handle = low_precision_weights(model, "bf16-pure", optimizer=None)

    def ctx(step: int) -> contextlib.AbstractContextManager[Any]:
        if config.precision == "fp32":
            return contextlib.nullcontext()
        # Rounding-site counters cost a few element-wise passes per rounding; count on the monitor's sampled
        # steps only (the fractions are element-weighted over those steps).
        count = counters if step % every == 0 else None
        return autocast(
            config.precision, counters=count, emulate=not native, device_type=device_type, recipe_state=recipe_state,
            model=site_model,
        )

    def eval_ctx() -> contextlib.AbstractContextManager[Any]:
        if config.precision == "fp32":
            return contextlib.nullcontext()
        return autocast(config.precision, emulate=not native, device_type=device_type, recipe_state=recipe_state,
                        model=site_model)

    params = [p for g in opt.param_groups for p in g["params"]]
    clip = task.recipe.clip_norm
    # The metric every `every` steps (budget/20), for steps-to-target; its time is kept out of step_seconds.
    eval_curve: list[dict[str, Any]] = []
    eval_seconds = 0.0
    point: dict[str, float] = {}
    is_cuda = torch.device(device).type == "cuda"
    if is_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t_loop = time.perf_counter()
    losses = torch.empty(steps, dtype=torch.float32, device=device)
    scales = torch.empty(steps, dtype=torch.float32, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            mult = lr_multiplier(task.recipe, step, steps)
            for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = lr * mult
            batch = next(inst.batches)
            with ctx(step):
                loss = inst.loss_fn(model, batch)
            scaled: torch.Tensor = scaler.scale(loss)
            scaled.backward()  # type: ignore[no-untyped-call]
            if clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, clip)
            # (a LayerwiseScaler's loss scale is a constant; its per-layer scales are reported at the end)
            scale_used = scaler.state.scale if isinstance(scaler, LossScaler) and scaler.is_enabled() else None
            if scale_used is not None:
                scales[step] = scale_used
            else:
                scales[step] = scaler.get_scale() if scaler.is_enabled() else 1.0
            if weights_handle is not None:
                weights_handle.round_grads_()  # a BF16 parameter's gradient is BF16
            scaler.step(opt)
            if weights_handle is not None:
                weights_handle.round_()  # the update is rounded into BF16 storage
            scaler.update()
            opt.zero_grad(set_to_none=True)
            monitor.step()
            losses[step] = loss.detach().float()
            if (step + 1) % every == 0:
                if is_cuda:
                    torch.cuda.synchronize(device)
                te = time.perf_counter()
                point = inst.evaluate(model, eval_ctx)
                eval_curve.append({"step": step + 1, **{k: _finite_or_none(float(v)) for k, v in point.items()
                                                        if k != "test_size"}})
                eval_seconds += time.perf_counter() - te
            if on_step is not None:
                on_step(step + 1, steps)
    if is_cuda:
        torch.cuda.synchronize(device)
    loop_seconds = time.perf_counter() - t_loop - eval_seconds
    peak_memory = int(torch.cuda.max_memory_allocated(device)) if is_cuda else None
    train_seconds = time.perf_counter() - t0

    metrics = point if eval_curve and eval_curve[-1]["step"] == steps else inst.evaluate(model, eval_ctx)
    if isinstance(scaler, LayerwiseScaler):
        scaler_desc["final_layer_scales"] = scaler.layer_scales()
    stats = monitor.read()
    monitor.remove()
    if weights_handle is not None:
        weights_handle.remove()

    mon_under, mon_swamp, hist_counts, hist_lo = _monitor_fractions(stats)
    grad_fmt = config.grad_format
    act_grad_elements: int | None = None
    if grad_fmt is None:
        underflow = {k: mon_under.get(k) for k in ("bf16", "fp16")}
        underflow_source = "monitor: FP32 activation gradients that would underflow in each format at scale 1"
    elif counters is None:
        underflow = {grad_fmt: None}
        underflow_source = "native run: not measured (no rounding sites to count; use the CPU emulation)"
    else:
        from ..formats import FloatFormat

        gname = FloatFormat.parse(grad_fmt).name
        frac, act_grad_elements = _underflow_from_counters(counters.read(), gname)
        underflow = {gname: frac}
        underflow_source = f"emulation rounding sites: activation gradients rounded to {gname}"
    weight_fmt = "bf16"
    swamping = {weight_fmt: mon_swamp.get(weight_fmt)}

    loss_list = [_finite_or_none(float(v)) for v in losses.cpu().tolist()]
    scale_list = [float(v) for v in scales.cpu().tolist()]
    tail = [v for v in loss_list[-max(1, steps // 10) :]]
    final_loss = (
        sum(v for v in tail if v is not None) / len(tail) if tail and all(v is not None for v in tail) else None
    )
    metric_name = task.metric_name
    record: dict[str, Any] = {
        "task": spec.task,
        "config": config.name,
        "precision": config.precision,
        "scaling": config.scaling,
        "compensation": config.compensation,
        "optimizer": opt_name,
        "optimizer_recipe": opt_desc,
        "weight_format": config.weight_format,
        "grad_format": grad_fmt,
        "seed": spec.seed,
        "mode": spec.mode,
        "device": device,
        "native": native,
        "steps": steps,
        "batch_size": budget.batch_size,
        "metric_name": metric_name,
        "metric": _finite_or_none(float(metrics[metric_name])),
        "metrics": {k: _finite_or_none(float(v)) for k, v in metrics.items() if k != "test_size"},
        "test_size": int(metrics["test_size"]),
        "final_loss": final_loss,
        "diverged": final_loss is None,
        "skipped_steps": int(scaler.skipped_steps),
        "skipped_at": skipped_at,
        "final_scale": float(scaler.get_scale()) if scaler.is_enabled() else None,
        "scaler": scaler_desc,
        "underflow_fraction": underflow,
        "underflow_source": underflow_source,
        "activation_grad_elements": act_grad_elements,
        "swamping_fraction": swamping,
        "swamping_source": (
            "monitor: weight elements an optimizer step changed whose BF16-rounded value did not change"
            if not (config.precision == "bf16-pure" and config.compensation != "none")
            else "monitor: stored BF16 weights (the optimizer's compensation defers small updates instead "
            "of losing them, so nothing counts as swamped)"
        ),
        "monitor_underflow_fraction": mon_under,
        "monitor_swamping_fraction": mon_swamp,
        "monitor_every": every,
        "grad_exponent_histogram": {"min_log2": hist_lo, "counts": hist_counts, "kind": "activation",
                                    "scale": "as trained (scaled gradients)"},
        "seconds": time.perf_counter() - t0,
        "train_seconds": train_seconds,
        "loss_curve": loss_list,
        "scale_trajectory": scale_list,
        "eval_every": every,
        "eval_curve": eval_curve,
        "higher_is_better": task.higher_is_better,
        "step_seconds": loop_seconds / steps,
        "peak_memory_bytes": peak_memory,
        "data": inst.data_source,
        "data_info": inst.data_info,
        **({"overrides": overrides} if overrides else {}),
        "budget": budget.to_dict(),
    }
    return record


# ----------------------------------------------------------------------------------------------------------
# Many runs


# How often a worker checks that the study that started it is still alive (seconds).
_WATCHDOG_INTERVAL = 0.5


def _watch_parent(parent_pid: int) -> None:
    """Exit this worker as soon as its parent is gone. A SIGKILLed parent cannot tell its workers to stop,
    and they would otherwise train on (each holding the pool's queues, so none ever sees end-of-file): when
    the parent dies the worker is re-parented, so ``os.getppid()`` changes, on every POSIX system. On
    Windows, where there is no re-parenting, the parent's PID is polled instead."""
    while True:
        time.sleep(_WATCHDOG_INTERVAL)
        if os.name == "posix":
            gone = os.getppid() != parent_pid
        else:  # pragma: no cover - Windows
            gone = not _pid_alive(parent_pid)
        if gone:
            os._exit(70)  # no cleanup to run: the parent owns every file the study writes


def _pid_alive(pid: int) -> bool:  # pragma: no cover - Windows only
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    code = ctypes.c_ulong()
    kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
    kernel32.CloseHandle(handle)
    return code.value == 259  # STILL_ACTIVE


def _init_worker(threads: int, parent_pid: int | None = None) -> None:
    torch.set_num_threads(threads)
    # Keep BLAS pools at one thread as well (set before they spin up in the fresh spawned process).
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if parent_pid is not None:
        import threading

        threading.Thread(target=_watch_parent, args=(parent_pid,), name="lossscale-watchdog", daemon=True).start()


def _run_in_worker(spec: RunSpec) -> dict[str, Any]:
    return run_one(spec)


def run_study(
    specs: Sequence[RunSpec],
    *,
    workers: int = 1,
    threads: int = 1,
    done: Iterable[dict[str, Any]] = (),
    on_record: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    run: Callable[[RunSpec], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run ``specs`` (skipping those whose key is among the ``done`` records) and return all records, done
    ones first. ``on_record(record)`` is called after each finished run (the CLI writes results.json
    there). ``workers > 1`` uses spawned processes with ``threads`` threads each; each worker exits within
    about a second of its parent's death, however the parent dies (SIGKILL included). ``run`` replaces
    :func:`run_one` (a module-level function, so that workers can import it)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    records = list(done)
    have = {(r["task"], r["config"], int(r["seed"])) for r in records}
    todo = [s for s in specs if s.key not in have]

    bar: Any = None
    task_id: Any = None
    if progress and todo:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("[bold]study[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), transient=False,
        )
        bar.start()
        task_id = bar.add_task("", total=len(todo))

    def finished(rec: dict[str, Any]) -> None:
        records.append(rec)
        if on_record is not None:
            on_record(rec)
        if bar is not None:
            metric = rec["metric"]
            shown = "n/a" if metric is None else f"{metric:.3g}"
            bar.update(
                task_id, advance=1,
                description=f"{rec['task']} {rec['config']} seed {rec['seed']}: {rec['metric_name']} {shown}",
            )

    try:
        if workers == 1 or len(todo) <= 1:
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for spec in todo:
                    if bar is not None:
                        bar.update(task_id, description=f"{spec.task} {spec.config} seed {spec.seed} ...")
                    finished((run or run_one)(spec))
            finally:
                torch.set_num_threads(old)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                initargs=(threads, os.getpid()),
            ) as pool:
                # Submit in order, at most `workers` in flight, so results.json fills in task order.
                pending: dict[Future[dict[str, Any]], RunSpec] = {}
                queue = list(todo)
                while queue or pending:
                    while queue and len(pending) < workers:
                        spec = queue.pop(0)
                        pending[pool.submit(run or _run_in_worker, spec)] = spec
                    ready, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                    for fut in ready:
                        pending.pop(fut)
                        finished(fut.result())
    finally:
        if bar is not None:
            bar.stop()
    return records
