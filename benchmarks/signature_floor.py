"""How much of the fast path's per-step check is memory: ``GradTable.check()`` against a loop
that only reads the fields a signature check needs.

    python benchmarks/signature_floor.py [--tensors 2000] [--rounds 40] [--json out.json]

An AdamW optimizer (Triton backend, launches elided: the interpreter is loaded, never run) on
``--tensors`` params of 16 elements takes a few steps, so that its fast path exists. Then, each
round, after writing a 64 MB buffer on every core (which evicts the caches, as a forward and
backward pass does), one of:

* ``grad table check``: the Triton bucket's ``GradTable.check()``, what a step runs (every
  param, grad, state and step count: address, numel, dtype, sizes, strides);
* ``fields only``: a loop compiled here (``torch.utils.cpp_extension.load_inline``) that reads,
  for the params, grads and both moment states, only each tensor's storage address, offset,
  numel, first size and first stride, with no test: the memory floor of those reads, on the
  same OpenMP threads;
* ``fields only, one thread``: the same on one thread.

Each is timed cold (right after the flush) and warm (called again right away). Medians in
microseconds; implementations interleaved in rotating order. Prints the machine first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from host_overhead import elide_triton_launches
from machine import cpu_description

import fused_optim

FIELDS_SOURCE = r"""
#include <torch/extension.h>

static std::vector<at::Tensor> held;

void hold(std::vector<at::Tensor> tensors) { held = std::move(tensors); }

// Reads what a signature check reads of each held tensor, and nothing more.
int64_t read_fields(bool parallel) {
  int64_t sum = 0;
  const int64_t count = static_cast<int64_t>(held.size());
#pragma omp parallel for schedule(static) reduction(+ : sum) if (parallel)
  for (int64_t i = 0; i < count; ++i) {
    const c10::TensorImpl* impl = held[i].unsafeGetTensorImpl();
    const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
    sum += reinterpret_cast<intptr_t>(storage->data()) + impl->storage_offset() + impl->numel() +
           impl->sizes()[0] + impl->strides()[0];
  }
  return sum;
}
"""


def build_fields_reader():
    directory = Path(tempfile.gettempdir()) / "fused_optim_signature_floor"
    directory.mkdir(exist_ok=True)
    return load_inline(
        "fused_optim_signature_floor",
        cpp_sources=FIELDS_SOURCE,
        functions=["hold", "read_fields"],
        extra_cflags=["-O2", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(cpu_description())
    elide_triton_launches()
    reader = build_fields_reader()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, generator=gen)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn(16, generator=gen)
    opt = fused_optim.AdamW(params, lr=1e-3, weight_decay=0.01, backend="triton")
    for _ in range(3):
        opt.step()
    fast = opt._plan.fast
    if fast is None:
        raise SystemExit("the fast path was not built (is the C++ extension installed?)")
    grad_table = fast.steps[0].grad_table
    states = [opt.state[p] for p in params]
    reader.hold(
        params
        + [p.grad for p in params]
        + [s["exp_avg"] for s in states]
        + [s["exp_avg_sq"] for s in states]
    )
    runs = {
        "grad table check": grad_table.check,
        "fields only": lambda: reader.read_fields(True),
        "fields only, one thread": lambda: reader.read_fields(False),
    }
    flush = torch.empty(64 * 1024 * 1024 // 4)
    cold = {name: [] for name in runs}
    warm = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            flush.fill_(r)
            start = time.perf_counter()
            runs[name]()
            cold[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            runs[name]()
            warm[name].append(time.perf_counter() - start)
    rows = [
        dict(
            what=name,
            tensors=args.tensors,
            cold_us=statistics.median(cold[name]) * 1e6,
            warm_us=statistics.median(warm[name]) * 1e6,
        )
        for name in names
    ]
    print(f"{args.tensors} params (4 tensors each read by 'fields only'; 5 by the check)")
    print(f"{'':26} {'cold us':>9} {'warm us':>9}")
    for row in rows:
        print(f"{row['what']:26} {row['cold_us']:>9.1f} {row['warm_us']:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(dict(machine=cpu_description(), rows=rows), indent=2))


if __name__ == "__main__":
    main()
