"""One-shot GPU check: `fused-optim verify` and `fused-optim bench`, plus the checks only a GPU
can make: kernel launches per step (one per bucket across all param groups, counted by the
profiler), no recompiles when a scheduler changes lr, no host sync in step(), the host cost of a
step over many small tensors, 2^31+ elements, checkpoints across devices.

Usage (CUDA machine with torch, triton, tqdm and matplotlib; no internet, nothing to install):

    PYTHONPATH=. python benchmarks/gpu_check.py --out results/

Writes verify.json, bench.json, bench_compile.json, bench.png and gpu_check.json under --out
(gpu_check.json after every part, so a run cut short keeps what it measured) and prints short
tables last. Takes a few minutes on an H200. ``--skip PART ...`` leaves parts out (see
``--help``). ``--smoke`` runs everything on the CPU through the Triton interpreter at tiny
sizes, to check the script itself (there the profiler sees no kernels: launches are counted by
``optimizer.launches_per_step()`` and by wrapping the Triton kernels' ``run``).

gpu_check.json keys: ``info``, ``verify_exit``, ``checkpoint``, ``clip`` (per backend: params and
norms against torch's clip_grad_norm_ + AdamW, sync error, profiled kernels of a step (the
update's, and with the norm pass's: 2 expected, ``two_kernels``), clip + step timing against
torch's), ``bench_clip_exit`` (bench.json's --clip run in bench_clip.json),
``launches`` (per backend, per
case: launches_per_step, profiler_kernels_per_step, triton_runs_per_step, sync_error,
triton_cache_after_step_2 / _after_last_step, ok), ``launches_ok``, ``no_host_sync``,
``no_recompiles``, ``host_cost`` (rows: groups x grads x implementation: host_ms, step_ms,
GBps, pct_copy_bandwidth, median per-round speedups vs torch fused), ``big_tensor`` (per
backend), ``bench_exit``, ``bench_compile_exit``, ``skipped``, ``seconds``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

import fused_optim  # noqa: E402
from fused_optim.backends import host_checks  # noqa: E402
from fused_optim.backends.triton import kernels  # noqa: E402
from fused_optim.bench import bytes_per_step, measure_copy_bandwidth  # noqa: E402

DEVICE = torch.device("cpu" if SMOKE else "cuda")
CUDA = DEVICE.type == "cuda"
PARTS = (
    "verify", "checkpoint", "launches", "clip", "host_cost", "big_tensor", "bench",
    "bench_compile", "bench_clip",
)  # fmt: skip
#: Substrings of the kernel names of both GPU backends: the Triton kernels are named after their
#: functions, the CUDA C++ ones are ``fused_optim::cuda::{sgd,adam}_kernel<...>``.
KERNEL_NAMES = ("sgd_kernel", "adam_kernel")
NORM_KERNEL_NAMES = ("norm_kernel",)  # clipping's norm pass (Triton and CUDA C++)


def synchronize():
    if CUDA:
        torch.cuda.synchronize()


def free_memory():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def fused_backends() -> list[str]:
    """The fused_optim backends the launch and host-cost checks run: triton and cuda where they
    are available (on the CPU smoke run: triton through the interpreter, and the C++ CPU
    backend in place of cuda)."""
    available = fused_optim.available_backends(DEVICE)
    wanted = ("triton", "cuda", "cpu") if SMOKE else ("triton", "cuda")
    return [name for name in wanted if name in available]


def cuda_backend_status() -> str:
    try:
        from fused_optim.backends import cuda as cuda_backend

        ok, reason = cuda_backend.is_available(torch.device("cuda"))
        return "available" if ok else reason
    except Exception as error:  # pragma: no cover - depends on the machine
        return repr(error)


# ------------------------------------------------------------------------------------------------
# Launches, recompiles, host syncs.


def triton_cache_size() -> int | str:
    """Compiled variants of the Triton kernels, all devices ("unknown" if not introspectable:
    the interpreter, or a Triton whose JITFunction keeps its cache elsewhere)."""
    try:
        total = 0
        for kernel in (kernels.sgd_kernel, kernels.adam_kernel):
            caches = getattr(kernel, "device_caches", None)  # triton 3.x: device -> (cache, ...)
            if isinstance(caches, dict):
                for entry in caches.values():
                    total += len(entry[0] if isinstance(entry, (tuple, list)) else entry)
                continue
            cache = getattr(kernel, "cache", None)  # older triton: device -> {key: kernel}
            if isinstance(cache, dict):
                total += sum(len(v) if isinstance(v, dict) else 1 for v in cache.values())
                continue
            return "unknown"
        return total
    except Exception:
        return "unknown"


class TritonRunCounter:
    """Counts ``kernel.run`` calls of the Triton kernels (every ``kernel[grid](...)`` launch, in
    the interpreter too) by wrapping the bound method on the kernel objects themselves, so that
    host steps holding a kernel object count as well."""

    def __init__(self):
        self.count = 0
        self._saved = []

    def __enter__(self):
        for kernel in (kernels.sgd_kernel, kernels.adam_kernel):
            original = kernel.run

            def counting(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            self._saved.append((kernel, "run" in vars(kernel), original))
            kernel.run = counting
        return self

    def __exit__(self, *exc):
        for kernel, had_attribute, original in self._saved:
            if had_attribute:
                kernel.run = original
            else:
                del kernel.run
        self._saved = []


def device_kernel_counts(prof, names=KERNEL_NAMES) -> tuple[int | None, dict]:
    """(device kernels named like ``names``, other device events by name) in a profile;
    (None, {}) when the profile holds no device events (the CPU)."""
    try:
        events = [(e.name(), e.device_type()) for e in prof.profiler.kineto_results.events()]
    except Exception:
        events = [(e.name, getattr(e, "device_type", None)) for e in prof.events()]
    device = [name for name, kind in events if kind == torch.autograd.DeviceType.CUDA]
    if not device:
        return None, {}
    ours = [name for name in device if any(k in name for k in names)]
    others = collections.Counter(name[:100] for name in device if name not in ours)
    return len(ours), dict(others.most_common(12))


def launch_case(case: str, backend: str):
    """(optimizer, params, what changes lr between steps, expected launches per step)."""
    gen = torch.Generator().manual_seed(len(case))

    def tensors(n: int) -> list[torch.Tensor]:
        high = 64 if SMOKE else 5000
        sizes = torch.randint(1, high, (n,), generator=gen).tolist()
        return [torch.randn(s, generator=gen).to(DEVICE).requires_grad_() for s in sizes]

    def write_lr(opt, factor):
        def tick():
            for group in opt.param_groups:
                group["lr"] = group["lr"] * factor  # a new float object every step

        return tick

    if case == "1 group":
        params = tensors(30 if SMOKE else 300)
        opt = fused_optim.AdamW(params, lr=1e-3, weight_decay=0.01, backend=backend)
        # OneCycleLR changes lr and (cycle_momentum) beta1 every step.
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
        return opt, params, sched.step, 1
    if case == "28 groups (layer-wise lr decay)":
        per_group = [tensors(1 if SMOKE else 6) for _ in range(28)]
        groups = [
            dict(params=ps, lr=1e-3 * 0.75 ** (27 - i), weight_decay=0.05 if i % 2 else 0.0)
            for i, ps in enumerate(per_group)
        ]
        opt = fused_optim.AdamW(groups, lr=1e-3, backend=backend)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
        return opt, [p for ps in per_group for p in ps], sched.step, 1
    if case == "one group per param":
        params = tensors(20 if SMOKE else 200)
        groups = [dict(params=[p], lr=1e-3 * (1 + i / 200)) for i, p in enumerate(params)]
        opt = fused_optim.AdamW(groups, lr=1e-3, backend=backend)
        return opt, params, write_lr(opt, 0.97), 1
    if case == "2 flag sets (nesterov in one group)":
        a, b = tensors(5 if SMOKE else 50), tensors(5 if SMOKE else 50)
        groups = [dict(params=a, nesterov=True), dict(params=b, lr=2e-2)]
        opt = fused_optim.SGD(groups, lr=1e-2, momentum=0.9, backend=backend)
        return opt, a + b, write_lr(opt, 0.9), 2
    raise ValueError(case)


LAUNCH_CASES = (
    "1 group",
    "28 groups (layer-wise lr decay)",
    "one group per param",
    "2 flag sets (nesterov in one group)",
)
LAUNCH_STEPS = 8
PROFILED_STEPS = (3, 4, 5)


def run_launch_case(case: str, backend: str) -> dict:
    """8 steps with fresh gradients (two sets of new tensors, alternating) and lr changed after
    every step. Step 0 builds the plans; steps 1+ run under ``set_sync_debug_mode("error")``
    (CUDA); steps 3-5 are profiled and their kernels counted."""
    counter = TritonRunCounter() if backend == "triton" else None
    with counter if counter is not None else _null():
        opt, params, tick, expected = launch_case(case, backend)
        grad_sets = [[torch.randn_like(p) for p in params] for _ in range(2)]
        launches, runs, cache = [], [], {}
        sync_error = sync_error_step = None
        profiled, others, profile_error = None, {}, None

        def one_step(step: int) -> bool:
            nonlocal sync_error, sync_error_step
            for p, g in zip(params, grad_sets[step % 2]):
                p.grad = g
            before = counter.count if counter is not None else 0
            if CUDA and step >= 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            except RuntimeError as error:
                sync_error, sync_error_step = repr(error)[:400], step
                return False
            finally:
                if CUDA:
                    torch.cuda.set_sync_debug_mode("default")
            launches.append(opt.launches_per_step())
            if counter is not None:
                runs.append(counter.count - before)
            tick()
            if step == 1:
                synchronize()
                cache["after_step_2"] = triton_cache_size()
            return True

        step, ok = 0, True
        while ok and step < PROFILED_STEPS[0]:
            ok, step = one_step(step), step + 1
        if ok:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if CUDA:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            try:
                with torch.profiler.profile(activities=activities) as prof:
                    while ok and step <= PROFILED_STEPS[-1]:
                        ok, step = one_step(step), step + 1
                    synchronize()
                count, others = device_kernel_counts(prof)
                if count is not None and ok:
                    profiled = count / len(PROFILED_STEPS)
            except Exception as error:  # the profiler itself failed: say so, keep the rest
                profile_error = repr(error)[:400]
        while ok and step < LAUNCH_STEPS:
            ok, step = one_step(step), step + 1
        synchronize()
        cache["after_last_step"] = triton_cache_size()
        plan = getattr(opt, "_plan", None)
        fast_path = plan is not None and getattr(plan, "fast", None) is not None
    steady = launches[1:] if len(launches) > 1 else launches
    counted_by = "profiler" if profiled is not None else "launches_per_step (no device profile)"
    result = dict(
        expected=expected,
        launches_per_step=launches,
        profiler_kernels_per_step=profiled,
        counted_by=counted_by,
        triton_runs_per_step=runs if counter is not None else None,
        other_device_events_in_profile=others,
        profile_error=profile_error,
        fast_path=fast_path,
        sync_error=sync_error,
        sync_error_step=sync_error_step,
        sync_checked=CUDA,
        triton_cache_after_step_2=cache.get("after_step_2") if backend == "triton" else None,
        triton_cache_after_last_step=cache.get("after_last_step") if backend == "triton" else None,
    )
    result["ok"] = bool(
        sync_error is None
        and steady
        and all(n == expected for n in steady)
        and (profiled is None or profiled == expected)
        and (counter is None or all(n == expected for n in runs[1:]))
    )
    return result


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def launches_recompiles_syncs() -> dict:
    """Every launch case on every fused backend, and the three verdicts."""
    results: dict = {}
    for backend in ("triton", "cuda"):
        if backend not in fused_backends():
            results[backend] = dict(skipped=f"backend {backend!r} unavailable on {DEVICE}")
    for backend in fused_backends():
        results[backend] = {}
        for case in LAUNCH_CASES:
            try:
                results[backend][case] = run_launch_case(case, backend)
            except Exception as error:
                results[backend][case] = dict(error=repr(error)[:400], ok=False)
            free_memory()
            row = results[backend][case]
            print(f"launches {backend:7s} {case:38s} {row.get('launches_per_step')} "
                  f"profiler {row.get('profiler_kernels_per_step')} ok {row.get('ok')}",
                  flush=True)  # fmt: skip
    cases = [r for per in results.values() for r in per.values() if isinstance(r, dict)]
    cases = [r for r in cases if "ok" in r]
    caches = [
        (r["triton_cache_after_step_2"], r["triton_cache_after_last_step"])
        for r in results.get("triton", {}).values()
        if isinstance(r, dict) and "triton_cache_after_step_2" in r
    ]
    if not caches or any("unknown" in pair or None in pair for pair in caches):
        no_recompiles: bool | str = "unknown"
    else:
        no_recompiles = all(a == b for a, b in caches)
    return dict(
        cases=results,
        launches_ok=bool(cases) and all(r["ok"] for r in cases),
        no_host_sync=(
            all(r.get("sync_error") is None and "error" not in r for r in cases)
            if CUDA
            else "not checked (cpu)"
        ),
        no_recompiles=no_recompiles,
    )


# ------------------------------------------------------------------------------------------------
# Host cost of a step over many small tensors.


def host_cost() -> dict:
    """AdamW over 2000 tensors of 4096 fp32 elements: one param group vs one group per tensor,
    the same gradients every step vs fresh ones (new tensors at new addresses, as after
    ``zero_grad()`` and backward), fused_optim (triton, cuda) vs torch.optim AdamW fused=True and
    foreach. Interleaved rounds (the starting implementation rotating), each running
    ``steps_per_round`` steps of each implementation from an idle device.

    ``host_ms``: time in ``step()`` on the host (the device runs behind). ``step_ms``: CUDA
    events around each step (the host's time when it is the bottleneck, the device's
    otherwise; wall time on the CPU). Speedups vs torch fused are medians of per-round ratios.
    """
    count, numel = (40, 64) if SMOKE else (2000, 4096)
    rounds, steps, warmup = (3, 1, 2) if SMOKE else (11, 3, 3)
    hyper = dict(lr=1e-3, weight_decay=0.01)
    copy_bw = measure_copy_bandwidth(DEVICE, nbytes=(8 << 20) if SMOKE else None)
    nbytes = bytes_per_step("AdamW", count * numel, torch.float32)
    factories = {}
    for name in fused_backends():
        factories[f"fused_optim ({name})"] = lambda g, name=name: fused_optim.AdamW(
            g, **hyper, backend=name
        )
    factories["torch fused"] = lambda g: torch.optim.AdamW(g, **hyper, fused=True)
    factories["torch foreach"] = lambda g: torch.optim.AdamW(g, **hyper, foreach=True)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(numel, generator=gen).to(DEVICE) for _ in range(count)]
    grad_sets = [[torch.randn(numel, generator=gen).to(DEVICE) for _ in range(count)]
                 for _ in range(2)]  # fmt: skip
    rows = []
    for per_tensor in (False, True):
        for fresh in (False, True):
            runs = {}
            for name, factory in factories.items():
                params = [t.clone().requires_grad_() for t in init]
                for p, g in zip(params, grad_sets[0]):
                    p.grad = g
                groups = [{"params": [p]} for p in params] if per_tensor else [{"params": params}]
                try:
                    opt = factory(groups)
                    state = dict(opt=opt, params=params, flip=0)
                    for _ in range(warmup):
                        _timed_steps(state, 1, fresh, grad_sets)
                except Exception as error:
                    rows.append(dict(groups="per tensor" if per_tensor else "one",
                                     grads="fresh" if fresh else "same", implementation=name,
                                     error=repr(error)[:300]))  # fmt: skip
                    continue
                runs[name] = state
            synchronize()
            host = {name: [] for name in runs}
            step = {name: [] for name in runs}
            names = list(runs)
            for r in range(rounds):
                shift = r % len(names)
                for name in names[shift:] + names[:shift]:
                    h, s = _timed_steps(runs[name], steps, fresh, grad_sets)
                    host[name].append(h)
                    step[name].append(s)
            for name, state in runs.items():
                opt = state["opt"]
                step_s = statistics.median(step[name])
                row = dict(
                    groups="per tensor" if per_tensor else "one",
                    grads="fresh" if fresh else "same",
                    implementation=name,
                    host_ms=statistics.median(host[name]) * 1e3,
                    step_ms=step_s * 1e3,
                    GBps=nbytes / step_s / 1e9,
                    pct_copy_bandwidth=100 * nbytes / step_s / 1e9 / copy_bw,
                    host_speedup_vs_torch_fused=_median_ratio(host, name),
                    step_speedup_vs_torch_fused=_median_ratio(step, name),
                    launches_per_step=(
                        opt.launches_per_step() if hasattr(opt, "launches_per_step") else None
                    ),
                    fast_path=(
                        getattr(getattr(opt, "_plan", None), "fast", None) is not None
                        if hasattr(opt, "launches_per_step")
                        else None
                    ),
                    host_ms_rounds=[t * 1e3 for t in host[name]],
                    step_ms_rounds=[t * 1e3 for t in step[name]],
                )
                rows.append(row)
                print(f"host cost {row['groups']:10s} {row['grads']:5s} {name:22s} host "
                      f"{row['host_ms']:8.3f} ms step {row['step_ms']:8.3f} ms",
                      flush=True)  # fmt: skip
            del runs
            free_memory()
    return dict(
        optimizer="AdamW",
        dtype="fp32",
        tensors=count,
        numel_per_tensor=numel,
        rounds=rounds,
        steps_per_round=steps,
        warmup_steps=warmup,
        bytes_per_step=nbytes,
        copy_bandwidth_GBps=copy_bw,
        rows=rows,
    )


def _timed_steps(state: dict, steps: int, fresh: bool, grad_sets) -> tuple[float, float]:
    """(host seconds per step, step seconds per step) of ``steps`` steps from an idle device."""
    opt, params = state["opt"], state["params"]
    synchronize()
    host = 0.0
    events = []
    for _ in range(steps):
        if fresh:
            state["flip"] ^= 1
            for p, g in zip(params, grad_sets[state["flip"]]):
                p.grad = g
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        opt.step()
        host += time.perf_counter() - t0
        if CUDA:
            end.record()
            events.append((start, end))
    synchronize()
    if CUDA:
        return host / steps, sum(s.elapsed_time(e) for s, e in events) / 1e3 / steps
    return host / steps, host / steps


def _median_ratio(samples: dict, name: str) -> float | None:
    base = samples.get("torch fused")
    if not base or not samples[name]:
        return None
    return statistics.median(b / t for b, t in zip(base, samples[name]) if t > 0)


# ------------------------------------------------------------------------------------------------
# Gradient clipping folded into the step.


def clip_check() -> dict:
    """AdamW with ``max_grad_norm`` on each fused backend, over 300 tensors of random sizes:
    the params after 4 steps against torch's ``clip_grad_norm_`` + torch.optim.AdamW's for-loop
    (``assert_close``), the norms against ``get_total_norm``, no host sync in steps 1-3
    (``set_sync_debug_mode("error")``), every device kernel of step 2 (profiled) by name, and
    the time of clip + step against torch's ``clip_grad_norm_`` + ``fused=True`` step,
    interleaved (median per-round ratio)."""
    gen = torch.Generator().manual_seed(11)
    sizes = torch.randint(1, 64 if SMOKE else 5000, (30 if SMOKE else 300,), generator=gen)
    init = [torch.randn(int(n), generator=gen).to(DEVICE) for n in sizes.tolist()]
    grad_sets = [[torch.randn_like(t) * 0.1 for t in init] for _ in range(4)]
    results: dict = dict(tensors=len(init), numel=int(sizes.sum()), bytes_per_param=dict(
        fused_clip_and_step=32, torch_clip_and_fused_step=40))  # fmt: skip
    for backend in fused_backends():
        row: dict = {}
        try:
            ours = [t.clone().requires_grad_() for t in init]
            theirs = [t.clone().requires_grad_() for t in init]
            opt = fused_optim.AdamW(ours, lr=1e-2, max_grad_norm=1.0, backend=backend)
            ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
            norms, ref_norms, kernels_step2, sync_error = [], [], None, None
            for step, grads in enumerate(grad_sets):
                for p, q, g in zip(ours, theirs, grads):
                    p.grad, q.grad = g.clone(), g.clone()
                ref_norms.append(torch.nn.utils.clip_grad_norm_(theirs, 1.0))
                ref.step()
                profile = step == 2 and CUDA
                if CUDA and step >= 1:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    if profile:
                        activities = [torch.profiler.ProfilerActivity.CUDA]
                        with torch.profiler.profile(activities=activities) as prof:
                            opt.step()
                            synchronize()
                        count, others = device_kernel_counts(prof)
                        # A clipped step: the norm pass and the update, 2 kernels in all.
                        both, others = device_kernel_counts(prof, KERNEL_NAMES + NORM_KERNEL_NAMES)
                        kernels_step2 = dict(
                            update_kernels=count, norm_and_update=both, two_kernels=both == 2,
                            others=others,
                        )  # fmt: skip
                    else:
                        opt.step()
                except RuntimeError as error:
                    sync_error = repr(error)[:300]
                    break
                finally:
                    if CUDA:
                        torch.cuda.set_sync_debug_mode("default")
                norms.append(opt.last_grad_norm)
            params_ok = all(
                torch.allclose(p.detach(), q.detach(), rtol=1.3e-6, atol=1e-5)
                for p, q in zip(ours, theirs)
            )
            norms_ok = all(
                torch.allclose(a.double().cpu(), b.double().cpu(), rtol=1e-5, atol=0)
                for a, b in zip(norms, ref_norms)
            )
            row.update(params_match=bool(params_ok), norms_match=bool(norms_ok),
                       sync_error=sync_error, kernels_step2=kernels_step2,
                       launches_per_step=opt.launches_per_step())  # fmt: skip
            row["timing"] = _clip_timing(backend, init, grad_sets[0])
        except Exception as error:
            row["error"] = repr(error)[:400]
        results[backend] = row
        print(f"clip {backend}: {row}", flush=True)
        free_memory()
    return results


def _clip_timing(backend: str, init, grads, rounds: int = 15) -> dict:
    """clip + step, interleaved: fused_optim's clip_grad_norm_ + step against torch's
    clip_grad_norm_ + AdamW(fused=True) (where torch has it on this device)."""
    ours = [t.clone().requires_grad_() for t in init]
    theirs = [t.clone().requires_grad_() for t in init]
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt = fused_optim.AdamW(ours, lr=1e-3, backend=backend)
    steps = {"fused_optim": lambda: (opt.clip_grad_norm_(1.0), opt.step())}
    try:
        ref = torch.optim.AdamW(theirs, lr=1e-3, fused=True)
        steps["torch fused"] = lambda: (torch.nn.utils.clip_grad_norm_(theirs, 1.0), ref.step())
    except RuntimeError:
        pass
    samples: dict = {name: [] for name in steps}
    for fn in steps.values():
        fn()  # warm-up
    for r in range(rounds):
        for name in list(steps)[:: 1 if r % 2 == 0 else -1]:
            synchronize()
            t0 = time.perf_counter()
            steps[name]()
            synchronize()
            samples[name].append(time.perf_counter() - t0)
    return dict(
        ms={name: statistics.median(ts) * 1e3 for name, ts in samples.items()},
        speedup_vs_torch_fused=_median_ratio(samples, "fused_optim"),
    )


# ------------------------------------------------------------------------------------------------
# Big tensors and checkpoints.


def big_tensor() -> dict:
    """A tensor of more than 2^31 elements, on each fused backend: values near its end must be
    updated correctly."""
    n = (1 << 31) + 4099 if not SMOKE else 4099
    results = {}
    for backend in fused_backends():
        try:
            p = torch.randn(n, device=DEVICE)
            tail = slice(n - 5000, n)
            expected_p = p[tail].clone()
            p.requires_grad_()
            p.grad = torch.randn(n, device=DEVICE)
            g_tail = p.grad[tail].clone()
            opt = fused_optim.SGD([p], lr=0.5, backend=backend)
            opt.step()
            expected_p.add_(g_tail, alpha=-0.5)
            ok = torch.equal(p.detach()[tail], expected_p)
            results[backend] = dict(numel=n, tail_matches=bool(ok))
            del p, opt
        except Exception as error:
            results[backend] = dict(numel=n, error=repr(error)[:300])
        free_memory()
    return results


def checkpoint_across_devices() -> dict:
    """A checkpoint written on the GPU loads on the CPU (map_location) and back, both ways
    between fused_optim and torch.optim, and training continues with the same numbers."""
    import io

    results = {}
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) for s in [(33, 17), (17,), (0,)]]
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(5)]

    def run(opt_cls, params, steps):
        opt = opt_cls(params, lr=1e-2)
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.to(p.device)
            opt.step()
        return opt

    for source, target in [("cuda", "cpu"), ("cpu", "cuda")]:
        if SMOKE:
            source = target = "cpu"
        for src_cls, dst_cls in [
            (fused_optim.AdamW, torch.optim.AdamW),
            (torch.optim.AdamW, fused_optim.AdamW),
        ]:
            full = [p.to(source).clone().requires_grad_() for p in init]
            run(src_cls, full, grads)
            first = [p.to(source).clone().requires_grad_() for p in init]
            opt = run(src_cls, first, grads[:3])
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            state = torch.load(buffer, map_location=target, weights_only=True)
            second = [p.detach().to(target).clone().requires_grad_() for p in first]
            opt2 = dst_cls(second, lr=1e-2)
            opt2.load_state_dict(state)
            for gs in grads[3:]:
                for p, g in zip(second, gs):
                    p.grad = g.to(target)
                opt2.step()
            diff = max(
                (a.detach().cpu() - b.detach().cpu()).abs().max().item()
                for a, b in zip(full, second)
                if a.numel()
            )
            results[
                f"{src_cls.__module__.split('.')[0]}@{source}->{dst_cls.__module__.split('.')[0]}@{target}"
            ] = diff
    return results


# ------------------------------------------------------------------------------------------------
# The run.


def _print_tables(result: dict, out: str) -> None:
    if os.path.exists(f"{out}/bench.json") and "bench_exit" in result:
        with open(f"{out}/bench.json") as f:
            rows = [
                r for r in json.load(f)["rows"] if r["implementation"].startswith("fused_optim")
            ]
        print(f"{'workload':11s} {'optimizer':9s} {'impl':24s} {'dtype':5s} {'ms':>8s} "
              f"{'%copy':>6s} {'vs fused':>8s}")  # fmt: skip
        for r in rows:
            if r.get("time_ms") is not None:
                speedup = r["speedup_vs_torch_fused"]
                print(f"{r['workload']:11s} {r['optimizer']:9s} {r['implementation']:24s} "
                      f"{r['dtype']:5s} {r['time_ms']:8.3f} {r['pct_copy_bandwidth']:6.1f} "
                      f"{speedup if speedup is not None else float('nan'):8.2f}")  # fmt: skip
    cost = result.get("host_cost")
    if isinstance(cost, dict) and "rows" in cost:
        print(f"\nhost cost: AdamW, {cost['tensors']} x {cost['numel_per_tensor']} fp32, "
              f"copy {cost['copy_bandwidth_GBps']:.0f} GB/s")  # fmt: skip
        print(f"{'groups':10s} {'grads':5s} {'impl':22s} {'host ms':>8s} {'step ms':>8s} "
              f"{'%copy':>6s} {'host x':>7s} {'step x':>7s} {'launch':>6s}")  # fmt: skip
        for r in cost["rows"]:
            if "error" in r:
                print(f"{r['groups']:10s} {r['grads']:5s} {r['implementation']:22s} "
                      f"ERROR {r['error'][:60]}")  # fmt: skip
                continue

            def fmt(x, spec):
                return format(x, spec) if x is not None else "-"

            print(f"{r['groups']:10s} {r['grads']:5s} {r['implementation']:22s} "
                  f"{r['host_ms']:8.3f} {r['step_ms']:8.3f} {r['pct_copy_bandwidth']:6.2f} "
                  f"{fmt(r['host_speedup_vs_torch_fused'], '7.2f')} "
                  f"{fmt(r['step_speedup_vs_torch_fused'], '7.2f')} "
                  f"{fmt(r['launches_per_step'], '6d')}")  # fmt: skip
    clip = result.get("clip")
    if isinstance(clip, dict) and "error" not in clip:
        print(f"\nclip (max_grad_norm, AdamW, {clip.get('tensors')} tensors): backend, params and "
              "norms vs torch's clip_grad_norm_ + AdamW, host sync, kernels of a step, "
              "clip + step vs torch's")  # fmt: skip
        for backend, row in clip.items():
            if not isinstance(row, dict) or backend == "bytes_per_param":
                continue
            if "error" in row:
                print(f"{backend:8s} ERROR {row['error'][:80]}")
                continue
            timing = row.get("timing") or {}
            print(f"{backend:8s} params {row['params_match']} norms {row['norms_match']} "
                  f"sync {'ok' if row['sync_error'] is None else 'SYNC'} "
                  f"kernels {row['kernels_step2']} "
                  f"speedup {timing.get('speedup_vs_torch_fused')}")  # fmt: skip
    launches = result.get("launches")
    if isinstance(launches, dict) and "cases" in launches:
        print(f"\n{'backend':8s} {'case':38s} {'expect':>6s} {'per step':>9s} {'profiler':>8s} "
              f"{'sync':>5s} {'cache 2->last':>14s} ok")  # fmt: skip
        for backend, per in launches["cases"].items():
            if "skipped" in per:
                print(f"{backend:8s} skipped: {per['skipped']}")
                continue
            for case, r in per.items():
                if "error" in r:
                    print(f"{backend:8s} {case:38s} ERROR {r['error'][:80]}")
                    continue
                steady = sorted(set(r["launches_per_step"][1:])) or r["launches_per_step"]
                cache = f"{r['triton_cache_after_step_2']}->{r['triton_cache_after_last_step']}"
                sync = "ok" if r["sync_error"] is None else "SYNC"
                print(f"{backend:8s} {case:38s} {r['expected']:6d} "
                      f"{','.join(map(str, steady)):>9s} {r['profiler_kernels_per_step']!s:>8s} "
                      f"{sync:>5s} {cache:>14s} {r['ok']}")  # fmt: skip
        print(f"launches_ok {launches['launches_ok']}; no_host_sync {launches['no_host_sync']}; "
              f"no_recompiles {launches['no_recompiles']}")  # fmt: skip


def main() -> None:
    from fused_optim.cli import main as cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=PARTS, metavar="PART",
        help=f"parts to leave out: {', '.join(PARTS)}",
    )  # fmt: skip
    args = parser.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    skip = set(args.skip)
    t0 = time.time()
    result: dict = dict(
        info=dict(
            torch=torch.__version__,
            triton=triton.__version__,
            cuda=torch.version.cuda,
            gpu=torch.cuda.get_device_name() if CUDA else "cpu (interpreter)",
            smoke=SMOKE,
            available_backends=fused_optim.available_backends(DEVICE),
            cuda_backend=cuda_backend_status(),
            host_fast_path_extension=host_checks() is not None,
        ),
        skipped=sorted(skip),
    )
    print(json.dumps(result["info"]), flush=True)

    def save():
        result["seconds"] = time.time() - t0
        with open(f"{out}/gpu_check.json", "w") as f:
            json.dump(result, f, indent=1)

    def part(name, fn):
        if name in skip:
            return
        start = time.time()
        try:
            result[name] = fn()
        except Exception as error:
            result[name] = dict(error=repr(error)[:400])
        result.setdefault("part_seconds", {})[name] = time.time() - start
        print(f"{name} done ({time.time() - t0:.0f} s)", flush=True)
        save()

    device = ["--device", DEVICE.type]
    if "verify" not in skip:
        verify_args = ["verify", *device, "--json", f"{out}/verify.json", "--seed", "0"]
        part("verify_exit", lambda: cli([*verify_args, "--quick"] if SMOKE else verify_args))
    part("checkpoint", checkpoint_across_devices)
    if "launches" not in skip:
        part("launches", launches_recompiles_syncs)
        launches = result["launches"]
        for key in ("launches_ok", "no_host_sync", "no_recompiles"):
            result[key] = launches.get(key) if isinstance(launches, dict) else None
        save()
    part("clip", clip_check)
    part("host_cost", host_cost)
    part("big_tensor", big_tensor)
    scale = ["--scale", "0.001", "--repeats", "3"] if SMOKE else []
    if "bench" not in skip:
        part("bench_exit", lambda: cli(
            ["bench", *device, *scale, "--no-compile", "--no-progress",
             "--json", f"{out}/bench.json", "--plot", f"{out}/bench.png"]
        ))  # fmt: skip
    # torch.compile'd steps take a while to compile: one optimizer, fp32, the two big workloads.
    if "bench_compile" not in skip:
        part("bench_compile_exit", lambda: cli(
            ["bench", *device, *scale, "--compile", "--no-progress", "--optimizers", "AdamW",
             "--dtypes", "fp32", "--workloads", "flat", "gpt2-small",
             "--json", f"{out}/bench_compile.json"]
        ))  # fmt: skip
    if "bench_clip" not in skip:
        part("bench_clip_exit", lambda: cli(
            ["bench", *device, *scale, "--no-compile", "--no-progress", "--optimizers", "AdamW",
             "--dtypes", "fp32", "bf16", "--clip", "1.0", "--json", f"{out}/bench_clip.json"]
        ))  # fmt: skip
    save()
    print(json.dumps(result["info"]))
    _print_tables(result, out)
    print(f"\nverify: exit {result.get('verify_exit')}; bench: exit {result.get('bench_exit')}, "
          f"{result.get('bench_compile_exit')}; {result['seconds']:.0f} s in all")  # fmt: skip
    print("big tensor:", result.get("big_tensor"), "checkpoints:", result.get("checkpoint"))


if __name__ == "__main__":
    main()
