"""Host cost of gradient clipping with the step, on many tiny CPU tensors (AdamW).

    python benchmarks/clip_host_cost.py [--tensors 2000] [--rounds 15] [--json out.json]

Tensors of 16 elements, so that the arithmetic costs next to nothing and the time is the work
per tensor around it. Implementations, each with its own params and the same gradients:

* ``fused_optim step``: ``backend="cpu"`` without clipping (the anchor of the clip's cost);
* ``fused_optim max_grad_norm``: the clip inside ``step()`` (``max_grad_norm=``);
* ``fused_optim clip_grad_norm_ + step``: ``opt.clip_grad_norm_()`` then ``step()``;
* ``torch fused step`` and ``torch clip_grad_norm_ + fused step``: torch.optim.AdamW(fused=True)
  alone, and after ``torch.nn.utils.clip_grad_norm_``.

The max norm is large (1e9), so nothing changes the values between rounds. Interleaved in
rotating order; the table shows median microseconds per tensor and the median over rounds of
the per-round ratio ``torch clip_grad_norm_ + fused step`` / this. Prints the machine first.
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

import fused_optim

MAX_NORM = 1e9
ANCHOR = "torch clip_grad_norm_ + fused step"


def implementations(count: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(16, generator=gen) for _ in range(count)]
    grads = [torch.randn(16, generator=gen) for _ in range(count)]

    def params():
        out = [torch.nn.Parameter(v.clone()) for v in values]
        for p, g in zip(out, grads):
            p.grad = g.clone()
        return out

    plain = fused_optim.AdamW(params(), lr=1e-3, backend="cpu")
    automatic = fused_optim.AdamW(params(), lr=1e-3, backend="cpu", max_grad_norm=MAX_NORM)
    explicit = fused_optim.AdamW(params(), lr=1e-3, backend="cpu")
    fused = torch.optim.AdamW(params(), lr=1e-3, fused=True)
    clipped_params = params()
    clipped = torch.optim.AdamW(clipped_params, lr=1e-3, fused=True)

    def explicit_step():
        explicit.clip_grad_norm_(MAX_NORM)
        explicit.step()

    def torch_clip_step():
        torch.nn.utils.clip_grad_norm_(clipped_params, MAX_NORM)
        clipped.step()

    return {
        "fused_optim step": plain.step,
        "fused_optim max_grad_norm": automatic.step,
        "fused_optim clip_grad_norm_ + step": explicit_step,
        "torch fused step": fused.step,
        ANCHOR: torch_clip_step,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu_description())
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    fns = implementations(args.tensors)
    for fn in fns.values():
        for _ in range(3):
            fn()  # warm-up: states, plans, the compiled host path
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    rows = []
    print(f"{'implementation':38s} {'us/tensor':>10s} {'vs torch clip + fused':>22s}")
    for name, ts in times.items():
        ratio = statistics.median(a / t for a, t in zip(times[ANCHOR], ts))
        per_tensor = statistics.median(ts) * 1e6 / args.tensors
        rows.append(dict(implementation=name, us_per_tensor=per_tensor, anchor_over_this=ratio))
        print(f"{name:38s} {per_tensor:10.2f} {ratio:21.2f}x")
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
