"""One-shot GPU check: `fused-optim verify` and `fused-optim bench`, plus the checks only a GPU
can make (one launch per step, no recompiles, no host sync, 2^31+ elements, checkpoints across
devices).

Usage (CUDA machine with torch, triton, tqdm and matplotlib; no internet, nothing to install):

    PYTHONPATH=. python benchmarks/gpu_check.py --out results/

Writes verify.json, bench.json, bench_compile.json, bench.png and gpu_check.json under --out and
prints a short table last. Takes a few minutes on an H200. ``--smoke`` runs everything on the CPU
through the Triton interpreter at tiny sizes, to check the script itself.
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


def main() -> None:
    from fused_optim.cli import main as cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    result = dict(
        info=dict(
            torch=torch.__version__,
            triton=triton.__version__,
            gpu=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (interpreter)",
        )
    )
    device = ["--device", DEVICE.type]
    verify_args = ["verify", *device, "--json", f"{out}/verify.json", "--seed", "0"]
    result["verify_exit"] = cli([*verify_args, "--quick"] if SMOKE else verify_args)
    print(f"verify exit {result['verify_exit']} ({time.time() - t0:.0f} s)", flush=True)
    result["checkpoint"] = checkpoint_across_devices()
    result["launches"] = launches_recompiles_syncs()
    result["big_tensor"] = big_tensor()
    print(
        "extra checks", result["checkpoint"], result["launches"], result["big_tensor"], flush=True
    )
    scale = ["--scale", "0.001", "--repeats", "3"] if SMOKE else []
    result["bench_exit"] = cli(
        ["bench", *device, *scale, "--no-compile", "--no-progress",
         "--json", f"{out}/bench.json", "--plot", f"{out}/bench.png"]
    )  # fmt: skip
    print(f"bench exit {result['bench_exit']} ({time.time() - t0:.0f} s)", flush=True)
    # torch.compile'd steps take a while to compile: one optimizer, fp32, the two big workloads.
    result["bench_compile_exit"] = cli(
        ["bench", *device, *scale, "--compile", "--no-progress", "--optimizers", "AdamW",
         "--dtypes", "fp32", "--workloads", "flat", "gpt2-small",
         "--json", f"{out}/bench_compile.json"]
    )  # fmt: skip
    result["seconds"] = time.time() - t0
    with open(f"{out}/gpu_check.json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["info"]))
    with open(f"{out}/bench.json") as f:
        rows = [r for r in json.load(f)["rows"] if r["implementation"].startswith("fused_optim")]
    print(f"{'workload':11s} {'optimizer':9s} {'impl':24s} {'dtype':5s} {'ms':>8s} "
          f"{'%copy':>6s} {'vs fused':>8s}")  # fmt: skip
    for r in rows:
        if r.get("time_ms") is not None:
            print(f"{r['workload']:11s} {r['optimizer']:9s} {r['implementation']:24s} "
                  f"{r['dtype']:5s} {r['time_ms']:8.3f} {r['pct_copy_bandwidth']:6.1f} "
                  f"{r['speedup_vs_torch_fused']:8.2f}")  # fmt: skip
    print(f"verify: exit {result['verify_exit']}; bench: exit {result['bench_exit']}, "
          f"{result['bench_compile_exit']}; {result['seconds']:.0f} s in all")  # fmt: skip
    print("launches:", result["launches"])
    print("big tensor:", result["big_tensor"], "checkpoints:", result["checkpoint"])


if __name__ == "__main__":
    main()
