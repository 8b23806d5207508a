"""The workloads of ``fused-optim bench`` as pytest-benchmark tests.

Not part of the default test run (pyproject's ``testpaths`` is ``["tests"]``): ask for them.

    pytest benchmarks/ --benchmark-only                       # scale 1/64 on a CPU
    FUSED_OPTIM_BENCH_SCALE=1e-4 pytest benchmarks/ --benchmark-only -q   # tiny
    pytest benchmarks/ --benchmark-disable                    # every step once, no timing

(pytest-benchmark refuses ``--benchmark-only`` together with ``--benchmark-disable``.)

One test per optimizer x implementation x dtype x workload, grouped by (workload, optimizer,
dtype) so that pytest-benchmark compares the implementations of one case side by side; each
test's ``extra_info`` has the tensor and param counts, the bytes one step moves (the
roofline's model, ``fused_optim.bench.bytes_per_step``) and the GB/s of the median step.
fused_optim's params are checked against torch.optim's for-loop after the first step, as
``fused-optim bench`` does.

Environment:

* ``FUSED_OPTIM_BENCH_SCALE``: fraction of the full workload sizes (``0.01`` or ``1/64``;
  default 1/64 on a CPU, 1 on a GPU). Tensor counts do not change.
* ``FUSED_OPTIM_BENCH_DEVICE``: device (default: cuda if available, else cpu).
* ``FUSED_OPTIM_BENCH_ROUNDS``: timed steps per test (default 10), after one warm-up step.
* ``FUSED_OPTIM_BENCH_COMPILE=1``: also time ``torch.compile(opt.step)`` (compiling takes
  minutes on a CPU; only for workloads of at most 200 tensors).
"""

from __future__ import annotations

import os
from fractions import Fraction

import pytest
import torch

from fused_optim import bench

DEVICE = torch.device(os.environ.get("FUSED_OPTIM_BENCH_DEVICE") or bench.default_device())
SCALE = float(
    Fraction(os.environ.get("FUSED_OPTIM_BENCH_SCALE") or ("1/64" if DEVICE.type == "cpu" else 1))
)
ROUNDS = int(os.environ.get("FUSED_OPTIM_BENCH_ROUNDS") or 10)
COMPILE = os.environ.get("FUSED_OPTIM_BENCH_COMPILE") == "1"

IMPLEMENTATIONS = [("fused_optim", backend) for backend in bench.default_backends(DEVICE)] + [
    (impl, None) for impl in bench.IMPLS if impl != "fused_optim"
]


@pytest.mark.parametrize("workload", list(bench.WORKLOADS))
@pytest.mark.parametrize("dtype", list(bench.DEFAULT_DTYPES))
@pytest.mark.parametrize(
    "impl,backend",
    IMPLEMENTATIONS,
    ids=[f"{impl}-{backend}" if backend else impl for impl, backend in IMPLEMENTATIONS],
)
@pytest.mark.parametrize("optimizer", list(bench.OPTIMIZERS.values()))
def test_step(benchmark, optimizer, impl, backend, dtype, workload):
    shapes = bench.WORKLOADS[workload].scaled(SCALE)
    if impl == "compile":
        if not COMPILE:
            pytest.skip("set FUSED_OPTIM_BENCH_COMPILE=1 to time torch.compile(opt.step)")
        if len(shapes) > bench.COMPILE_MAX_TENSORS:
            pytest.skip(f"compiling a step over {len(shapes)} tensors takes too long")
        torch._dynamo.reset()
    init, grads = bench.make_params(shapes, bench.DTYPES[dtype], DEVICE)
    params = bench.clone_params(init, grads)
    step = bench.make_step(bench.make_optimizer(impl, optimizer, params, backend), impl)
    if impl == "compile" and DEVICE.type == "cpu":
        from torch._inductor import config as inductor_config

        # Compile in this process: no pool of compile workers left busy in the background.
        with inductor_config.patch(compile_threads=1):
            step()
    else:
        step()
    if impl == "fused_optim":
        expected = bench.clone_params(init, grads)
        bench.make_optimizer("forloop", optimizer, expected).step()
        for actual, wanted in zip(params, expected):
            torch.testing.assert_close(actual.detach(), wanted.detach())
        del expected
    del init

    def timed_step():
        step()
        bench.synchronize(DEVICE)

    numel = sum(p.numel() for p in params)
    nbytes = bench.bytes_per_step(optimizer, numel, bench.DTYPES[dtype])
    benchmark.group = f"{workload} {optimizer} {dtype} (scale {SCALE:g})"
    benchmark.extra_info.update(tensors=len(shapes), params=numel, bytes_per_step=nbytes)
    benchmark.pedantic(timed_step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["GBps"] = nbytes / stats.median / 1e9
