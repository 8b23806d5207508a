"""``fused-optim bench``: optimizer step times against torch.optim, and the memory roofline.

Times one optimizer step of fused_optim (each backend that can run on the device) and of
torch.optim's for-loop, foreach, fused and ``torch.compile``'d steps, on the same workloads, in
the same run, on the current device. Method:

* **Correctness first.** Every implementation starts from the same params and gradients and
  takes one step; fused_optim's params must then match torch.optim's for-loop within
  ``torch.testing.assert_close``'s default tolerances. A mismatch is reported in the row and
  makes the exit code 1.
* **Interleaved medians.** After a warm-up, the implementations are timed round-robin (one step
  of each per round, the starting one rotating), and each one's time is the median of its
  rounds. On CUDA a sample is one step between two CUDA events, after the L2 cache was flushed
  (as ``triton.testing.do_bench`` does); on the CPU it is ``time.perf_counter`` wall time.
* **The roofline.** The device's copy bandwidth (bytes read + written by a large ``copy_``) is
  measured in the same run; each step's GB/s uses this bytes model (``bytes_per_step``):
  SGD with momentum reads p, g, buf and writes p, buf (5 tensors, 20 B/param in fp32); Adam
  and AdamW read p, g, m, v and write p, m, v (7 tensors, 28 B/param; 9 with amsgrad). States
  follow the param dtype, so bf16 halves every figure.

Also a library: :func:`run_bench`, :func:`measure_copy_bandwidth`, :data:`WORKLOADS`,
:func:`bytes_per_step`, :func:`time_round_robin`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

import fused_optim
from fused_optim.backends import BACKENDS, BackendUnavailableError, available_backends

from ._extras import import_extra

# --------------------------------------------------------------------------------------------
# What can be benchmarked
# --------------------------------------------------------------------------------------------

OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
#: Hyperparameters of every timed step (SGD with momentum, as in the bytes model of bytes_per_step).
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "SGD": dict(lr=1e-3, momentum=0.9),
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3),
}
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
DEFAULT_DTYPES = ("fp32", "bf16")
#: Implementations: fused_optim (one row per backend) and torch.optim's four ways to step.
IMPLS = ("fused_optim", "forloop", "foreach", "fused", "compile")
IMPL_LABELS = {
    "forloop": "torch for-loop",
    "foreach": "torch foreach",
    "fused": "torch fused",
    "compile": "torch.compile(step)",
}
#: Compiling a step over thousands of tensors takes many minutes (over 10 on 2 CPU cores for
#: 2000 tensors): by default the compiled step is only timed up to this many tensors.
COMPILE_MAX_TENSORS = 200

QUICK_SCALE = 1 / 256
QUICK_REPEATS = 5
QUICK_WARMUP = 1
DEFAULT_REPEATS = {"cpu": 10, "other": 50}
DEFAULT_WARMUP = {"cpu": 2, "other": 5}
CACHE_FLUSH_BYTES = 256 << 20


@dataclass(frozen=True)
class Workload:
    """A list of parameter shapes; ``scaled(s)`` shrinks every tensor's size by ``s``."""

    name: str
    description: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def scaled(self, scale: float) -> list[tuple[int, ...]]:
        """The shapes with every tensor's element count multiplied by ``scale``.

        The number of tensors stays the same (per-tensor costs are part of what is measured).
        At scale 1 the shapes are the real ones; otherwise each tensor becomes 1-D with
        ``max(1, round(numel * scale))`` elements: the update is elementwise, so only sizes
        matter.
        """
        if scale == 1:
            return list(self.shapes)
        return [(max(1, round(math.prod(shape) * scale)),) for shape in self.shapes]


def gpt2_small_shapes() -> tuple[tuple[int, ...], ...]:
    """GPT-2 small's 148 parameter shapes (124,439,808 params), in the model's order."""
    d, vocab, context, blocks = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]  # wte, wpe
    for _ in range(blocks):
        shapes += [
            (d,),  # ln_1.weight
            (d,),  # ln_1.bias
            (d, 3 * d),  # attn.c_attn.weight
            (3 * d,),  # attn.c_attn.bias
            (d, d),  # attn.c_proj.weight
            (d,),  # attn.c_proj.bias
            (d,),  # ln_2.weight
            (d,),  # ln_2.bias
            (d, 4 * d),  # mlp.c_fc.weight
            (4 * d,),  # mlp.c_fc.bias
            (4 * d, d),  # mlp.c_proj.weight
            (d,),  # mlp.c_proj.bias
        ]
    shapes += [(d,), (d,)]  # ln_f
    return tuple(shapes)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("flat", "one tensor of 64M elements", ((64 << 20,),)),
        Workload("gpt2-small", "GPT-2 small's parameter shapes", gpt2_small_shapes()),
        Workload("many-small", "2000 tensors of 4096 elements", ((4096,),) * 2000),
        # 2000 tensors of 16 elements: the update is next to nothing, so this times the host
        # work of a step (benchmarks/host_overhead.py breaks it down further).
        Workload("host-2000", "2000 tensors of 16 elements (host cost)", ((16,),) * 2000),
    )
}


def bytes_per_step(
    optimizer: str,
    numel: int,
    dtype: torch.dtype | str = torch.float32,
    *,
    momentum: bool = True,
    amsgrad: bool = False,
    clip: bool = False,
) -> int:
    """Bytes one step moves (read + written) for ``numel`` params: the roofline's model.

    SGD: reads p and g, writes p, plus reads and writes the momentum buffer with momentum
    (20 B/param in fp32). Adam/AdamW: reads p, g, m, v and writes p, m, v (28 B/param in fp32),
    plus reads and writes max_exp_avg_sq with amsgrad (+8). With ``clip``, one more read of the
    gradients for their norm (the least a clip costs: 32 B/param for fp32 AdamW; torch's
    ``clip_grad_norm_`` then rewrites them, 40). Gradients and states have the param's dtype,
    so every tensor counts its dtype's size.
    """
    name = OPTIMIZERS.get(optimizer.lower())
    if name is None:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZERS)}")
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    size = torch.empty((), dtype=dtype).element_size()
    if name == "SGD":
        tensors = 5 if momentum else 3
    else:
        tensors = 9 if amsgrad else 7
    return (tensors + int(clip)) * size * numel


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cpu":
        return
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "synchronize"):
        module.synchronize()


class Timer:
    """Times calls: CUDA events after an L2 flush on CUDA, ``perf_counter`` elsewhere.

    On CUDA a sample is *enqueued* (``begin``) and read later (``collect``), as
    ``triton.testing.do_bench`` does: the host keeps running ahead of the GPU, as it does in
    training, so a step's host-side work is hidden unless the step is host-bound.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._flush = None
        if self.cuda:
            self._flush = torch.empty(CACHE_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def begin(self, fn: Callable[[], object]):
        """Run ``fn()`` once, timed; returns what ``collect`` turns into seconds."""
        if self.cuda:
            assert self._flush is not None
            self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return start, end
        synchronize(self.device)
        t0 = time.perf_counter()
        fn()
        synchronize(self.device)
        return time.perf_counter() - t0

    def collect(self, sample) -> float:
        if self.cuda:
            start, end = sample
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return sample

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds ``fn()`` took."""
        return self.collect(self.begin(fn))


def time_round_robin(
    fns: dict[str, Callable[[], object]],
    timer: Timer,
    repeats: int,
    warmup: int = 1,
    on_sample: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed rounds, then ``repeats`` timed
    rounds that call each function once, the first one rotating from round to round. A round's
    samples are read after the whole round is enqueued."""
    keys = list(fns)
    for _ in range(warmup):
        for key in keys:
            fns[key]()
            if on_sample is not None:
                on_sample()
    synchronize(timer.device)
    samples: dict[str, list[float]] = {key: [] for key in keys}
    for r in range(repeats):
        shift = r % len(keys) if keys else 0
        pending = [(key, timer.begin(fns[key])) for key in keys[shift:] + keys[:shift]]
        for key, sample in pending:
            samples[key].append(timer.collect(sample))
            if on_sample is not None:
                on_sample()
    return samples


def measure_copy_bandwidth(
    device: torch.device | str | None = None,
    nbytes: int | None = None,
    repeats: int = 10,
) -> float:
    """The device's copy bandwidth in GB/s: bytes read + written by ``b.copy_(a)`` over the
    median time of ``repeats`` copies of ``nbytes`` (default 1 GiB on GPUs, 256 MiB on CPUs:
    source and destination together are beyond their caches)."""
    device = torch.device(device) if device is not None else default_device()
    if nbytes is None:
        nbytes = (256 << 20) if device.type == "cpu" else (1 << 30)
    n = max(1, nbytes // 4)
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    timer = Timer(device)
    times = time_round_robin({"copy": lambda: b.copy_(a)}, timer, repeats, warmup=2)["copy"]
    seconds = statistics.median(times)
    return 2 * n * 4 / seconds / 1e9


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def default_backends(device: torch.device) -> list[str]:
    """fused_optim backends timed by default on ``device``: those available there, without
    Triton's interpreter (interpreted kernels say nothing about speed)."""
    from fused_optim.backends.triton import interpreting

    names = available_backends(device)
    if device.type == "cpu" or interpreting():
        names = [name for name in names if name != "triton"]
    return names


def impl_label(impl: str, backend: str | None = None) -> str:
    if impl == "fused_optim":
        return f"fused_optim ({backend})"
    return IMPL_LABELS[impl]


def make_optimizer(
    impl: str, optimizer: str, params: list[Tensor], backend: str | None = None
) -> torch.optim.Optimizer:
    """The optimizer of ``impl`` (an entry of :data:`IMPLS`) over ``params``."""
    name = OPTIMIZERS.get(optimizer.lower(), optimizer)
    hyper = HYPERPARAMETERS[name]
    if impl == "fused_optim":
        return getattr(fused_optim, name)(params, **hyper, backend=backend)
    cls = getattr(torch.optim, name)
    if impl == "forloop":
        return cls(params, **hyper, foreach=False)
    if impl == "foreach":
        return cls(params, **hyper, foreach=True)
    if impl == "fused":
        return cls(params, **hyper, fused=True)
    if impl == "compile":
        return cls(params, **hyper)  # PyTorch's recipe: default flags, torch.compile(step)
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


def make_step(
    opt: torch.optim.Optimizer, impl: str, clip: float | None = None
) -> Callable[[], object]:
    """What one timed step calls: ``opt.step``, or ``torch.compile(opt.step)``. With ``clip``,
    the gradients' 2-norm is clipped to it first: by ``opt.clip_grad_norm_`` for fused_optim
    (applied inside its step), by ``torch.nn.utils.clip_grad_norm_`` for torch.optim (compiled
    with the step for ``"compile"``)."""
    if clip is None:
        return torch.compile(opt.step) if impl == "compile" else opt.step
    if impl == "fused_optim":

        def clip_and_step():
            opt.clip_grad_norm_(clip)
            return opt.step()

        return clip_and_step
    params = [p for group in opt.param_groups for p in group["params"]]

    def torch_clip_and_step():
        torch.nn.utils.clip_grad_norm_(params, clip)
        return opt.step()

    return torch.compile(torch_clip_and_step) if impl == "compile" else torch_clip_and_step


def make_params(
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> tuple[list[Tensor], list[Tensor]]:
    """(initial params, gradients), reproducible from ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    init = [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in shapes]
    return init, grads


def clone_params(init: list[Tensor], grads: list[Tensor], own_grads: bool = False) -> list[Tensor]:
    """Fresh leaf params equal to ``init``, whose ``.grad`` are the tensors of ``grads`` (or
    copies of them with ``own_grads``)."""
    params = [t.clone().requires_grad_() for t in init]
    # Every implementation reads the same gradient tensors, as none of them writes its grads;
    # torch's clip_grad_norm_ does: with a clip, each gets its own.
    for p, g in zip(params, grads):
        p.grad = g.clone() if own_grads else g
    return params


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def _max_abs_diff(actual: list[Tensor], expected: list[Tensor]) -> float:
    diff = 0.0
    for a, b in zip(actual, expected):
        if a.numel():
            diff = max(diff, (a.detach().double() - b.detach().double()).abs().max().item())
    return diff


def _matches(actual: list[Tensor], expected: list[Tensor]) -> bool:
    try:
        for a, b in zip(actual, expected):
            torch.testing.assert_close(a.detach(), b.detach())
    except AssertionError:
        return False
    return True


@dataclass
class _Entry:
    """One implementation of one (workload, dtype, optimizer) case, and its row."""

    impl: str
    backend: str | None
    params: list[Tensor] | None = None
    opt: torch.optim.Optimizer | None = None
    step: Callable[[], object] | None = None
    skipped: str | None = None
    error: str | None = None
    check: str | None = None
    max_abs_diff: float | None = None
    compile_s: float | None = None
    samples: list[float] | None = None

    @property
    def key(self) -> str:
        return f"{self.impl}:{self.backend}" if self.backend else self.impl


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def run_bench(
    *,
    device: torch.device | str | None = None,
    workloads: Iterable[str] | None = None,
    optimizers: Iterable[str] | None = None,
    dtypes: Iterable[str] | None = None,
    impls: Iterable[str] | None = None,
    backends: Iterable[str] | None = None,
    scale: float = 1.0,
    repeats: int | None = None,
    warmup: int | None = None,
    compile_max_tensors: int = COMPILE_MAX_TENSORS,
    copy_bandwidth: float | None = None,
    progress: bool = True,
    seed: int = 0,
    clip: float | None = None,
) -> list[dict]:
    """Time every (workload, dtype, optimizer, implementation); one dict per row. With
    ``clip``, each step clips the gradients' 2-norm to it first (see :func:`make_step`).

    ``impls`` defaults to :data:`IMPLS` (``"compile"`` included), ``backends`` to
    :func:`default_backends`. ``copy_bandwidth`` (GB/s) is measured if not given. Rows hold the
    table's columns (``optimizer``, ``implementation``, ``dtype``, ``tensors``, ``params``,
    ``time_ms``, ``GBps``, ``pct_copy_bandwidth``, ``speedup_vs_torch_fused``) plus
    ``workload``, ``check`` (fused_optim rows: ``"ok"`` or ``"MISMATCH"``), ``failed``,
    ``skipped`` (why a row has no time), every sample (``times_ms``) and more.
    """
    tqdm = import_extra("tqdm.auto").tqdm

    device = torch.device(device) if device is not None else default_device()
    workloads = list(workloads or WORKLOADS)
    optimizers = [OPTIMIZERS[o.lower()] for o in (optimizers or OPTIMIZERS)]
    dtypes = list(dtypes or DEFAULT_DTYPES)
    impls = list(impls or IMPLS)
    backends = list(backends) if backends is not None else default_backends(device)
    kind = "cpu" if device.type == "cpu" else "other"
    repeats = DEFAULT_REPEATS[kind] if repeats is None else repeats
    warmup = DEFAULT_WARMUP[kind] if warmup is None else warmup
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if copy_bandwidth is None:
        copy_bandwidth = measure_copy_bandwidth(device)

    cases = [(w, o, d) for w in workloads for o in optimizers for d in dtypes]
    variants = [("fused_optim", b) for b in backends if "fused_optim" in impls]
    variants += [(i, None) for i in IMPLS if i in impls and i != "fused_optim"]
    timer = Timer(device)
    rows: list[dict] = []
    bar = tqdm(
        total=len(cases) * len(variants) * (1 + warmup + repeats),
        desc="bench",
        unit="step",
        file=sys.stderr,
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    stack = contextlib.ExitStack()
    if "compile" in impls and device.type == "cpu":
        # Compile in this process: a pool of compile workers would keep the CPU busy in the
        # background while the other implementations are timed on it.
        from torch._inductor import config as inductor_config

        stack.enter_context(inductor_config.patch(compile_threads=1))
    try:
        for workload_name, optimizer, dtype_name in cases:
            workload = WORKLOADS[workload_name]
            bar.set_description(f"{workload_name} {optimizer} {dtype_name}")
            shapes = workload.scaled(scale)
            entries = [_Entry(impl, backend) for impl, backend in variants]
            _run_case(
                entries,
                shapes,
                optimizer,
                DTYPES[dtype_name],
                device,
                timer,
                repeats,
                warmup,
                compile_max_tensors,
                bar,
                seed,
                clip,
            )
            rows += _case_rows(
                entries, workload, shapes, optimizer, dtype_name, copy_bandwidth, device, clip
            )
            del entries
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        bar.close()
        stack.close()
    return rows


def _run_case(
    entries: list[_Entry],
    shapes: list[tuple[int, ...]],
    optimizer: str,
    dtype: torch.dtype,
    device: torch.device,
    timer: Timer,
    repeats: int,
    warmup: int,
    compile_max_tensors: int,
    bar,
    seed: int,
    clip: float | None = None,
) -> None:
    init, grads = make_params(shapes, dtype, device, seed)
    reference: list[Tensor] | None = None
    # The for-loop steps first (it is the reference) and fused_optim last, so that an
    # implementation that wrongly wrote its gradients could only spoil its own check.
    order = sorted(entries, key=lambda e: (e.impl != "forloop", e.impl == "fused_optim"))
    for entry in order:
        if entry.impl == "compile" and len(shapes) > compile_max_tensors:
            entry.skipped = (
                f"{len(shapes)} tensors > --compile-max-tensors {compile_max_tensors} "
                "(compiling takes many minutes)"
            )
            bar.update(1 + warmup + repeats)
            continue
        params = clone_params(init, grads, clip is not None)
        try:
            if entry.impl == "compile":
                torch._dynamo.reset()  # fresh caches: no recompile limit hit across cases
            opt = make_optimizer(entry.impl, optimizer, params, entry.backend)
            step = make_step(opt, entry.impl, clip)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            if entry.impl == "compile":
                entry.compile_s = time.perf_counter() - t0
        except BackendUnavailableError as error:
            entry.skipped = _first_line(error)
        except Exception as error:
            if entry.impl == "fused_optim":
                entry.error = _first_line(error)
            else:
                what = "compile failed" if entry.impl == "compile" else "unsupported"
                entry.skipped = f"{what}: {_first_line(error)}"
        bar.update(1)
        if entry.skipped or entry.error:
            bar.update(warmup + repeats)
            continue
        entry.params, entry.opt, entry.step = params, opt, step
        if entry.impl == "forloop":
            reference = params
    if reference is None:
        # The for-loop is not timed: step a copy of it only to check the others against.
        reference = clone_params(init, grads, clip is not None)
        make_step(make_optimizer("forloop", optimizer, reference), "forloop", clip)()
    del init
    for entry in entries:
        if entry.params is None:
            continue
        entry.max_abs_diff = _max_abs_diff(entry.params, reference)
        if entry.impl == "fused_optim":
            entry.check = "ok" if _matches(entry.params, reference) else "MISMATCH"
    del reference

    fns = {entry.key: entry.step for entry in entries if entry.step is not None}
    try:
        samples = time_round_robin(fns, timer, repeats, warmup, on_sample=lambda: bar.update(1))
    except Exception:
        # Timing each one alone tells which failed.
        samples = {}
        for entry in entries:
            if entry.step is None:
                continue
            try:
                alone = time_round_robin({entry.key: entry.step}, timer, repeats, warmup)
                samples[entry.key] = alone[entry.key]
            except Exception as error:
                if entry.impl == "fused_optim":
                    entry.error = _first_line(error)
                else:
                    entry.skipped = f"failed while timed: {_first_line(error)}"
    for entry in entries:
        if not entry.skipped and not entry.error:
            entry.samples = samples.get(entry.key)
        entry.params = entry.opt = entry.step = None


def _case_rows(
    entries: list[_Entry],
    workload: Workload,
    shapes: list[tuple[int, ...]],
    optimizer: str,
    dtype_name: str,
    copy_bandwidth: float,
    device: torch.device,
    clip: float | None = None,
) -> list[dict]:
    numel = sum(math.prod(s) for s in shapes)
    nbytes = bytes_per_step(optimizer, numel, DTYPES[dtype_name], clip=clip is not None)
    medians = {}
    for entry in entries:
        if entry.samples:
            medians[entry.key] = statistics.median(entry.samples)
    fused_time = medians.get("fused")
    rows = []
    for entry in entries:
        seconds = medians.get(entry.key)
        gbps = nbytes / seconds / 1e9 if seconds else None
        failed = entry.impl == "fused_optim" and (
            entry.error is not None or entry.check == "MISMATCH"
        )
        rows.append(
            dict(
                workload=workload.name,
                optimizer=optimizer,
                implementation=impl_label(entry.impl, entry.backend),
                impl=entry.impl,
                backend=entry.backend,
                dtype=dtype_name,
                tensors=len(shapes),
                params=numel,
                time_ms=seconds * 1e3 if seconds else None,
                GBps=gbps,
                pct_copy_bandwidth=100 * gbps / copy_bandwidth if gbps else None,
                speedup_vs_torch_fused=fused_time / seconds if fused_time and seconds else None,
                check=entry.check,
                max_abs_diff_vs_forloop=entry.max_abs_diff,
                failed=failed,
                skipped=entry.skipped,
                error=entry.error,
                bytes_per_step=nbytes,
                copy_bandwidth_GBps=copy_bandwidth,
                compile_s=entry.compile_s,
                clip_max_norm=clip,
                times_ms=[t * 1e3 for t in entry.samples or []],
                device=str(device),
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    "workload",
    "optimizer",
    "implementation",
    "dtype",
    "tensors",
    "params",
    "time/step",
    "GB/s",
    "% copy BW",
    "vs torch fused",
    "check",
)


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _ms(ms: float) -> str:
    return f"{_num(ms)} ms"


def _num(x: float) -> str:
    """About three significant digits, trailing zeros kept."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.2g}" if x < 0.01 else f"{x:.3f}"


def _cells(row: dict) -> list[str]:
    check = row["check"] or ""
    if row["error"]:
        check = f"ERROR: {row['error']}"
    elif check == "MISMATCH":
        check = f"MISMATCH (max abs diff {row['max_abs_diff_vs_forloop']:.3g})"
    if row["time_ms"] is None:
        timing = ["-", "-", "-", "-"]
        if row["skipped"]:
            check = f"skipped: {row['skipped']}"
    else:
        speedup = row["speedup_vs_torch_fused"]
        timing = [
            _ms(row["time_ms"]),
            _num(row["GBps"]),
            _num(row["pct_copy_bandwidth"]),
            f"{speedup:.2f}x" if speedup else "-",
        ]
    return [
        row["workload"],
        row["optimizer"],
        row["implementation"],
        row["dtype"],
        str(row["tensors"]),
        _si(row["params"]),
        *timing,
        check,
    ]


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned Markdown table."""
    cells = [list(TABLE_COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_COLUMNS))]
    numeric = {4, 5, 6, 7, 8, 9}

    def line(values: list[str]) -> str:
        padded = [
            v.rjust(w) if i in numeric else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths))
        ]
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join(
        "-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)
    )
    return "\n".join([line(cells[0]), separator + "|"] + [line(c) for c in cells[1:]])


def machine_info(device: torch.device) -> dict:
    """Device name and versions, for the JSON report."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - depends on the machine
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return dict(
        device=str(device),
        device_name=name,
        cpu=_cpu_name(),
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton_version,
        fused_optim=fused_optim.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        load_average=_load_average(),
        cpu_busy_before=_cpu_busy(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # pragma: no cover - not on every platform
        return None


def _cpu_busy(interval: float = 0.25) -> float | None:
    """Share of the machine's CPU time other processes used over ``interval`` seconds while
    this one slept (Linux ``/proc/stat``), or None where that cannot be read."""

    def totals() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return idle, sum(values[:8])

    try:
        idle0, total0 = totals()
        time.sleep(interval)
        idle1, total1 = totals()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return round(1 - (idle1 - idle0) / (total1 - total0), 3)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for text in f:
                if text.startswith("model name"):
                    return f"{text.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def write_plot(rows: list[dict], path: str, copy_bandwidth: float, title: str = "") -> None:
    """A PNG: per workload, the GB/s each implementation reaches for each (optimizer, dtype),
    on a log scale, with the measured copy bandwidth drawn as the roofline."""
    FigureCanvasAgg = import_extra("matplotlib.backends.backend_agg").FigureCanvasAgg
    Figure = import_extra("matplotlib.figure").Figure

    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    labels = list(dict.fromkeys(row["implementation"] for row in rows))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    width = 0.8 / max(1, len(labels))
    groups_of = {
        w: list(dict.fromkeys((r["optimizer"], r["dtype"]) for r in rows if r["workload"] == w))
        for w in workloads
    }
    widest = max((len(g) for g in groups_of.values()), default=1)
    fig = Figure(figsize=(max(8.0, 1.5 * widest + 3), 3.4 * max(1, len(workloads))))
    FigureCanvasAgg(fig)
    values = [row["GBps"] for row in rows if row["GBps"]] + [copy_bandwidth]
    for index, workload in enumerate(workloads):
        ax = fig.add_subplot(len(workloads), 1, index + 1)
        groups = groups_of[workload]
        for row in rows:
            if row["workload"] != workload or not row["GBps"]:
                continue
            g = groups.index((row["optimizer"], row["dtype"]))
            j = labels.index(row["implementation"])
            ax.bar(
                g - 0.4 + width * (j + 0.5), row["GBps"], width, color=colors[row["implementation"]]
            )
        ax.axhline(copy_bandwidth, color="black", linestyle="--", linewidth=1)
        ax.annotate(
            f"measured copy bandwidth {copy_bandwidth:.0f} GB/s",
            (len(groups) - 0.5, copy_bandwidth),
            ha="right",
            va="bottom",
            fontsize=8,
        )
        ax.set_yscale("log")
        ax.set_ylim(min(values) / 2, max(values) * 2)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{o} {d}" for o, d in groups])
        ax.set_xlim(-0.5, len(groups) - 0.5)
        first = next(row for row in rows if row["workload"] == workload)
        tensors = f"{first['tensors']} tensor" + ("s" if first["tensors"] != 1 else "")
        ax.set_title(f"{workload}: {tensors}, {_si(first['params'])} params", fontsize=10)
        ax.set_ylabel("GB/s")
    Patch = import_extra("matplotlib.patches").Patch

    handles = [Patch(color=colors[label], label=label) for label in labels]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 0.8, 0.97))
    fig.savefig(path, format="png", dpi=100)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _names(kind: str, valid: Iterable[str], case_insensitive: bool = False):
    valid = tuple(valid)

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"no {kind} given")
        out = []
        for name in names:
            key = name.lower() if case_insensitive else name
            if key not in valid:
                raise argparse.ArgumentTypeError(
                    f"unknown {kind} {name!r} (choose from {', '.join(valid)})"
                )
            out.append(key)
        return out

    parse.__name__ = kind  # argparse names the type in its messages
    return parse


def _scale(text: str) -> float:
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"invalid scale {text!r}: give a positive number such as 0.01 or 1/64"
        ) from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"scale must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: {error}") from None
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        is_available = getattr(module, "is_available", None)
        if is_available is None or not is_available():
            raise argparse.ArgumentTypeError(f"device {text!r} is not available on this machine")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    parser.description = (
        "Time optimizer steps of fused_optim and torch.optim (for-loop, foreach, fused, "
        "torch.compile) on this device, interleaved, medians of many runs, with the device's "
        "copy bandwidth measured in the same run as the roofline."
    )
    parser.epilog = (
        "Bytes per step (the roofline's model): SGD with momentum 20 B/param, Adam/AdamW "
        "28 B/param in fp32; states follow the param dtype (bf16: half). Exit code 1 if "
        "fused_optim's params do not match torch.optim's for-loop after one step."
    )
    names = "comma-separated; repeatable"
    parser.add_argument(
        "--device",
        type=_device,
        default=None,
        help="device to time on (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--workloads",
        type=_names("workload", WORKLOADS),
        nargs="+",
        action="extend",
        metavar="NAME",
        help=f"{', '.join(f'{w.name} ({w.description})' for w in WORKLOADS.values())}; "
        f"default: all ({names})",
    )
    parser.add_argument(
        "--optimizers",
        type=_names("optimizer", OPTIMIZERS, case_insensitive=True),
        nargs="+",
        action="extend",
        metavar="NAME",
        help=f"sgd (momentum 0.9), adam, adamw; default: all ({names})",
    )
    parser.add_argument(
        "--dtypes",
        type=_names("dtype", DTYPES),
        nargs="+",
        action="extend",
        metavar="NAME",
        help=f"{', '.join(DTYPES)}; default: fp32,bf16 ({names})",
    )
    parser.add_argument(
        "--impls",
        type=_names("implementation", IMPLS),
        nargs="+",
        action="extend",
        metavar="NAME",
        help="fused_optim (every backend of --backends), forloop, foreach, fused, compile "
        f"(torch.optim's, foreach=False / True, fused=True, torch.compile(opt.step)); "
        f"default: all ({names})",
    )
    parser.add_argument(
        "--backends",
        type=_names("backend", BACKENDS),
        nargs="+",
        action="extend",
        metavar="NAME",
        help="fused_optim backends to time (triton, cuda, cpu, reference); default: those "
        "available on "
        "the device, without Triton's interpreter, whose timings mean nothing",
    )
    parser.add_argument(
        "--scale",
        "--size",
        type=_scale,
        default=None,
        dest="scale",
        help="multiply every tensor's size by this (e.g. 0.01 or 1/64; tensor counts stay); "
        f"default 1, --quick {Fraction(QUICK_SCALE)}",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help="timed steps per implementation, interleaved (default: 10 on CPU, 50 on GPU; "
        f"--quick {QUICK_REPEATS})",
    )
    parser.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=None,
        help="untimed steps per implementation after the correctness step (default: 2 on "
        f"CPU, 5 on GPU; --quick {QUICK_WARMUP})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small and fast: scale {Fraction(QUICK_SCALE)}, {QUICK_REPEATS} repeats, no "
        "torch.compile unless --compile (under a minute on 2 CPU cores)",
    )
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="time torch.compile(opt.step) (default, except with --quick)",
    )
    compile_group.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip torch.compile (compiling can take minutes on a CPU)",
    )
    parser.add_argument(
        "--compile-max-tensors",
        type=_positive_int,
        default=COMPILE_MAX_TENSORS,
        metavar="N",
        help="skip the compiled step for workloads of more than N tensors "
        f"(default {COMPILE_MAX_TENSORS}: compiling 2000 tensors takes over 10 minutes)",
    )
    parser.add_argument(
        "--clip",
        type=float,
        default=None,
        metavar="MAX_NORM",
        help="clip the gradients' 2-norm to MAX_NORM in every step: fused_optim's "
        "opt.clip_grad_norm_ (applied inside its step) against torch's clip_grad_norm_ before "
        "torch.optim's steps; the roofline then counts one more gradient read",
    )
    parser.add_argument("--json", metavar="PATH", help="write every row and machine info here")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s vs the roofline")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(bench_parser=parser)


def _unique(values: list[list[str]] | None) -> list[str] | None:
    """Names given to a repeatable ``nargs="+"`` option of comma lists, flat, in order, once."""
    if not values:
        return None
    return list(dict.fromkeys(name for names in values for name in names))


def _usage_error(args: argparse.Namespace, message: str) -> None:
    parser = getattr(args, "bench_parser", None)
    if parser is not None:
        parser.error(message)
    print(f"fused-optim bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_settings(args: argparse.Namespace) -> dict:
    """The run's settings from parsed arguments, defaults filled in."""
    device = args.device if args.device is not None else default_device()
    impls = _unique(args.impls)
    if impls is None:
        impls = list(IMPLS)
        if args.quick and not args.compile:
            impls.remove("compile")
    if args.compile is False and "compile" in impls:
        impls.remove("compile")
    if args.compile and "compile" not in impls:
        impls.append("compile")
    backends = _unique(args.backends)
    if backends is None:
        backends = default_backends(device)
    else:
        from fused_optim.backends import select_backend

        for name in backends:
            try:
                select_backend(name, device)
            except BackendUnavailableError as error:
                _usage_error(args, f"argument --backends: {error}")
    kind = "cpu" if device.type == "cpu" else "other"
    return dict(
        device=device,
        workloads=_unique(args.workloads) or list(WORKLOADS),
        optimizers=[OPTIMIZERS[o] for o in _unique(args.optimizers) or list(OPTIMIZERS)],
        dtypes=_unique(args.dtypes) or list(DEFAULT_DTYPES),
        impls=impls,
        backends=backends,
        scale=args.scale if args.scale is not None else (QUICK_SCALE if args.quick else 1.0),
        repeats=args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS[kind]),
        warmup=args.warmup
        if args.warmup is not None
        else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP[kind]),
        compile_max_tensors=args.compile_max_tensors,
        clip=args.clip,
    )


def run(args: argparse.Namespace) -> int:
    """``fused-optim bench``: 0 if every fused_optim row matched torch.optim, else 1."""
    settings = resolve_settings(args)
    device = settings["device"]
    progress = not args.no_progress
    info = machine_info(device)
    t0 = time.perf_counter()
    bandwidth = measure_copy_bandwidth(device)
    rows = run_bench(**settings, copy_bandwidth=bandwidth, progress=progress)
    seconds = time.perf_counter() - t0

    print(
        f"fused-optim bench on {info['device_name']} ({device}); torch {info['torch']}, "
        f"triton {info['triton']}; {info['cpu_threads']} CPU threads"
    )
    print(
        f"copy bandwidth: {bandwidth:.1f} GB/s (bytes read + written by copy_, measured in "
        f"this run); scale {settings['scale']:g}; median of {settings['repeats']} interleaved "
        f"steps after {settings['warmup']} warm-up"
    )
    busy = info["cpu_busy_before"]
    if busy is not None and busy > 0.2:
        print(
            f"note: other processes used {100 * busy:.0f}% of the CPU just before this run: "
            "they compete with it, and its timings are unreliable"
        )
    print(format_table(rows))
    print(
        "GB/s: bytes per step / time (SGD+momentum 20 B/param, Adam/AdamW 28 B/param in fp32; "
        "states in the param dtype). vs torch fused: torch fused time / this time."
    )
    if settings["scale"] < 1 and device.type == "cpu":
        print(
            "At scale < 1 a workload may fit in the CPU's caches: % of the copy bandwidth "
            "(measured beyond them) can then exceed 100."
        )
    failed = [row for row in rows if row["failed"]]
    for row in failed:
        what = row["error"] or (
            f"params differ from torch.optim's for-loop after one step "
            f"(max abs diff {row['max_abs_diff_vs_forloop']:.3g})"
        )
        print(
            f"FAILED: {row['implementation']} {row['optimizer']} {row['dtype']} "
            f"{row['workload']}: {what}"
        )
    if args.json:
        report = dict(
            machine=info,
            copy_bandwidth_GBps=bandwidth,
            settings={
                **settings,
                "device": str(device),
                "quick": bool(args.quick),
            },
            seconds=seconds,
            exit_code=1 if failed else 0,
            columns=list(TABLE_COLUMNS),
            rows=rows,
        )
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        title = f"{info['device_name']}, torch {info['torch']}, scale {settings['scale']:g}"
        write_plot(rows, args.plot, bandwidth, title)
        print(f"wrote {args.plot}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fused_optim.bench``: the same as ``fused-optim bench``."""
    parser = argparse.ArgumentParser(prog="fused-optim bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
