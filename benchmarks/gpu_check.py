"""One-shot GPU check: parity, launch count, recompiles, host syncs, big tensors, and timing.

Usage (CUDA machine, nothing installed beyond torch and triton, no internet):

    PYTHONPATH=. python benchmarks/gpu_check.py --json results.json

Runs in a few minutes on one GPU. ``--smoke`` runs the same checks on the CPU through the Triton
interpreter with tiny sizes (to check the script itself). Prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

import fused_optim  # noqa: E402
from fused_optim.backends.triton import kernels  # noqa: E402

DEVICE = torch.device("cpu" if SMOKE else "cuda")
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
CONFIGS = {
    "SGD": [
        dict(lr=0.01),
        dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.1),
        dict(lr=0.01, momentum=0.9, nesterov=True, maximize=True),
    ],
    "Adam": [
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.1, amsgrad=True),
        dict(lr=0.01, maximize=True, betas=(0.8, 0.99)),
    ],
    "AdamW": [dict(lr=0.01), dict(lr=0.01, weight_decay=0.1, amsgrad=True)],
}


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def parity() -> list[dict]:
    """fused_optim (Triton, compiled) vs torch.optim for-loop, same device, same data."""
    rows = []
    shapes = [(0,), (), (7,), (2049,), (300, 70), (0, 4), (4097,)]
    for name, configs in CONFIGS.items():
        for config in configs:
            for dname, dtype in DTYPES.items():
                cfg = dict(config)
                if dtype == torch.float16 and name != "SGD":
                    cfg["eps"] = 0.1
                gen = torch.Generator().manual_seed(0)
                init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
                ours = [p.to(DEVICE).clone().requires_grad_() for p in init]
                theirs = [p.to(DEVICE).clone().requires_grad_() for p in init]
                exact = [p.to(DEVICE, torch.float64).clone().requires_grad_() for p in init]
                o = getattr(fused_optim, name)(ours, **cfg)
                t = getattr(torch.optim, name)(theirs, **cfg, foreach=False)
                e = getattr(torch.optim, name)(exact, **cfg, foreach=False)
                for _ in range(5):
                    for a, b, c in zip(ours, theirs, exact):
                        g = torch.randn(a.shape, generator=gen).to(dtype).to(DEVICE)
                        a.grad, b.grad, c.grad = g, g.clone(), g.double()
                    o.step()
                    t.step()
                    e.step()
                diff = max((a - b).abs().max().item() for a, b in zip(ours, theirs) if a.numel())
                err_ours = max(
                    (a.double() - c).abs().max().item() for a, c in zip(ours, exact) if a.numel()
                )
                err_torch = max(
                    (b.double() - c).abs().max().item() for b, c in zip(theirs, exact) if b.numel()
                )
                moved = all(
                    not torch.equal(a.detach().cpu(), p0) for a, p0 in zip(ours, init) if a.numel()
                )
                rows.append(
                    dict(
                        optimizer=name,
                        config=str(cfg),
                        dtype=dname,
                        max_abs_vs_torch=diff,
                        err_vs_fp64_ours=err_ours,
                        err_vs_fp64_torch=err_torch,
                        moved=moved,
                        backend=o.group_backends()[0],
                    )
                )
    return rows


def launches_recompiles_syncs() -> dict:
    """One launch per step for 300 tensors, no recompile when lr changes, no host sync."""
    counts = []
    original = kernels.adam_kernel.run

    def counting(*args, **kwargs):
        counts.append(1)
        return original(*args, **kwargs)

    kernels.adam_kernel.run = counting
    try:
        params = [
            torch.randn(int(n) + 1, device=DEVICE, requires_grad=True)
            for n in torch.randint(0, 5000, (300,))
        ]
        opt = fused_optim.AdamW(params, lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
        sync_error = None

        def compiled_variants():
            caches = getattr(kernels.adam_kernel, "device_caches", None)
            return sum(len(entry[0]) for entry in caches.values()) if caches else None

        variants_after_first_step = None
        for step in range(8):
            for p in params:
                p.grad = torch.randn_like(p)
            if DEVICE.type == "cuda" and step >= 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            except RuntimeError as error:
                sync_error = repr(error)
                break
            finally:
                if DEVICE.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            sched.step()
            if step == 0:
                variants_after_first_step = compiled_variants()
        return dict(
            steps=8,
            launches=len(counts),
            n_tensors=300,
            compiled_variants_after_step_1=variants_after_first_step,
            compiled_variants_after_step_8=compiled_variants(),
            sync_error=sync_error,
        )
    finally:
        kernels.adam_kernel.run = original


def big_tensor() -> dict:
    """A tensor of more than 2^31 elements: values near its end must be updated correctly."""
    n = (1 << 31) + 4099 if not SMOKE else 4099
    p = torch.randn(n, device=DEVICE)
    tail = slice(n - 5000, n)
    expected_p = p[tail].clone()
    p.requires_grad_()
    p.grad = torch.randn(n, device=DEVICE)
    g_tail = p.grad[tail].clone()
    opt = fused_optim.SGD([p], lr=0.5)
    opt.step()
    expected_p.add_(g_tail, alpha=-0.5)
    ok = torch.equal(p.detach()[tail], expected_p)
    del p, opt
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return dict(numel=n, tail_matches=bool(ok))


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


def bench_ms(fn, reps=50) -> float:
    if DEVICE.type == "cuda":
        return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3 * 1e3


def copy_bandwidth() -> float:
    n = 256 << 20 if not SMOKE else 1 << 16
    a = torch.empty(n, device=DEVICE)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9


def workloads() -> dict[str, list[tuple[int, ...]]]:
    if SMOKE:
        return {"flat": [(1 << 12,)], "many-small": [(64,)] * 20}
    gpt2 = [(50257, 768), (1024, 768)]
    for _ in range(12):
        gpt2 += [
            (768,),
            (768,),
            (768, 2304),
            (2304,),
            (768, 768),
            (768,),
            (768,),
            (768,),
            (768, 3072),
            (3072,),
            (3072, 768),
            (768,),
        ]
    gpt2 += [(768,), (768,)]
    return {"flat-64M": [(64 << 20,)], "gpt2-small": gpt2, "2000x4096": [(4096,)] * 2000}


def timing(bandwidth: float) -> list[dict]:
    rows = []
    for wname, shapes in workloads().items():
        for dname in ("fp32", "bf16"):
            dtype = DTYPES[dname]
            numel = sum(torch.Size(s).numel() for s in shapes)
            impls = {}

            def make(factory, shapes=shapes, dtype=dtype):
                params = [
                    torch.randn(s, device=DEVICE, dtype=dtype, requires_grad=True) for s in shapes
                ]
                for p in params:
                    p.grad = torch.randn_like(p)
                opt = factory(params)
                opt.step()
                return opt.step

            impls["fused_optim"] = make(lambda ps: fused_optim.AdamW(ps, lr=1e-3))
            impls["torch-fused"] = make(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True))
            impls["torch-foreach"] = make(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True))
            times = {k: bench_ms(v) for k, v in impls.items()}
            bytes_per_param = 7 * torch.finfo(dtype).bits // 8
            for impl, ms in times.items():
                gbs = numel * bytes_per_param / (ms * 1e-3) / 1e9
                rows.append(
                    dict(
                        workload=wname,
                        dtype=dname,
                        impl=impl,
                        n_tensors=len(shapes),
                        numel=numel,
                        ms=ms,
                        GBps=gbs,
                        pct_copy_bw=100 * gbs / bandwidth,
                        speedup_vs_torch_fused=times["torch-fused"] / ms,
                    )
                )
            del impls
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def sweep(bandwidth: float) -> list[dict]:
    """AdamW fp32 step time for a few (BLOCK, num_warps) choices, to pick the defaults."""
    from fused_optim.backends.triton import plan

    rows = []
    saved = plan.BLOCK, plan.NUM_WARPS
    choices = [(1024, 4), (2048, 4), (2048, 8), (4096, 8)]
    try:
        for wname, shapes in workloads().items():
            params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            numel = sum(p.numel() for p in params)
            for block, warps in choices:
                plan.BLOCK, plan.NUM_WARPS = block, warps
                opt = fused_optim.AdamW(params, lr=1e-3)
                ms = bench_ms(opt.step)
                gbs = numel * 28 / (ms * 1e-3) / 1e9
                rows.append(
                    dict(
                        workload=wname,
                        block=block,
                        num_warps=warps,
                        ms=ms,
                        pct_copy_bw=100 * gbs / bandwidth,
                    )
                )
            del params
    finally:
        plan.BLOCK, plan.NUM_WARPS = saved
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json")
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()
    t0 = time.time()
    info = dict(
        torch=torch.__version__,
        triton=triton.__version__,
        device=str(DEVICE),
        gpu=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (interpreter)",
    )
    result = dict(info=info, parity=parity())
    print("parity done", time.time() - t0, flush=True)
    result["checkpoint"] = checkpoint_across_devices()
    print("checkpoint", result["checkpoint"], flush=True)
    result["launches"] = launches_recompiles_syncs()
    print("launches", result["launches"], flush=True)
    if not args.skip_big:
        result["big_tensor"] = big_tensor()
        print("big tensor", result["big_tensor"], flush=True)
    bandwidth = copy_bandwidth()
    result["copy_bandwidth_GBps"] = bandwidth
    result["timing"] = timing(bandwidth)
    result["sweep"] = sweep(bandwidth)
    result["seconds"] = time.time() - t0
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(info))
    worst = {}
    for r in result["parity"]:
        key = (r["optimizer"], r["dtype"])
        worst[key] = max(worst.get(key, 0.0), r["max_abs_vs_torch"])
    print("parity (max abs vs torch.optim for-loop, worst over configs):")
    for (opt, d), v in sorted(worst.items()):
        print(f"  {opt:6s} {d:5s} {v:.3g}")
    print("all moved:", all(r["moved"] for r in result["parity"]))
    print(f"copy bandwidth: {bandwidth:.0f} GB/s")
    print("launches/recompiles/syncs:", result["launches"], result.get("big_tensor"))
    for r in result["sweep"]:
        print(
            f"sweep {r['workload']:12s} BLOCK={r['block']:5d} warps={r['num_warps']} "
            f"{r['ms']:.3f} ms {r['pct_copy_bw']:.1f}%"
        )
    print(
        f"{'workload':12s} {'dtype':5s} {'impl':14s} {'ms':>8s} {'GB/s':>7s} "
        f"{'%copy':>6s} {'vs fused':>8s}"
    )
    for r in result["timing"]:
        print(
            f"{r['workload']:12s} {r['dtype']:5s} {r['impl']:14s} {r['ms']:8.3f} {r['GBps']:7.0f} "
            f"{r['pct_copy_bw']:6.1f} {r['speedup_vs_torch_fused']:8.2f}"
        )


if __name__ == "__main__":
    main()
