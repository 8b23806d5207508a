"""The gradient-norm pass alone: fused_optim's (``backends.clip.total_norm``, the C++ CPU
backend's one multi-tensor pass) against ``torch.nn.utils.get_total_norm``.

    python benchmarks/grad_norm.py [--rounds 11] [--json out.json]

fp32 gradients of three workloads (one 64M-element tensor, GPT-2 small's shapes, 2000 tensors
of 4096), 2-norm. Interleaved in alternating order; the table shows median ms and the median
over rounds of the per-round ratio torch / fused_optim (above 1: fused_optim is faster), and
each norm's relative error against the norm computed in fp64. Prints the machine first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_description

from fused_optim.backends import clip
from fused_optim.bench import gpt2_small_shapes

WORKLOADS = {
    "flat": ((64 << 20,),),
    "gpt2-small": gpt2_small_shapes(),
    "many-small": ((4096,),) * 2000,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu_description())
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    rows = []
    for name, shapes in WORKLOADS.items():
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(shape, generator=gen) for shape in shapes]
        impls = {
            "fused_optim": lambda grads=grads: clip.total_norm(grads),
            "torch": lambda grads=grads: torch.nn.utils.get_total_norm(grads),
        }
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        results = {impl: fn() for impl, fn in impls.items()}  # warm-up
        for r in range(args.rounds):
            for impl in list(impls)[:: 1 if r % 2 == 0 else -1]:
                start = time.perf_counter()
                impls[impl]()
                times[impl].append(time.perf_counter() - start)
        ratio = statistics.median(t / f for t, f in zip(times["torch"], times["fused_optim"]))
        exact = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
        errors = {
            impl: float((value.double() - exact).abs() / exact) for impl, value in results.items()
        }
        rows.append(
            dict(
                workload=name,
                fused_optim_ms=statistics.median(times["fused_optim"]) * 1e3,
                torch_ms=statistics.median(times["torch"]) * 1e3,
                torch_over_fused_optim=ratio,
                fused_optim_relative_error=errors["fused_optim"],
                torch_relative_error=errors["torch"],
            )
        )
    print(
        f"{'workload':<12} {'fused_optim ms':>15} {'torch ms':>9} {'ratio':>7} "
        f"{'fused_optim rel err':>20} {'torch rel err':>14}"
    )
    for row in rows:
        print(
            f"{row['workload']:<12} {row['fused_optim_ms']:>15.2f} {row['torch_ms']:>9.2f} "
            f"{row['torch_over_fused_optim']:>6.2f}x {row['fused_optim_relative_error']:>20.1e} "
            f"{row['torch_relative_error']:>14.1e}"
        )
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
