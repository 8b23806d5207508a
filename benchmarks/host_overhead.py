"""Host cost of ``optimizer.step()``: the work between the call and the kernel launch.

    python benchmarks/host_overhead.py [--tensors 1 150 2000 10000] [--rounds 15] [--json out.json]
    python benchmarks/host_overhead.py --compare before.json after.json   # markdown table

AdamW on CPU tensors of 16 elements, so that the update itself costs next to nothing:

* ``fused_optim triton (launch elided)``: the Triton path with the kernel launch replaced by a
  no-op (the interpreter is loaded, never run): everything the host does per step, and nothing
  the device would do;
* ``fused_optim cpu``: the whole step of the C++ CPU backend (host work plus a tiny kernel);
* ``fused_optim triton (pure Python)``: the Triton path, launch elided, with the fast path's
  checks in plain Python (``backends.python_checks``: what runs where the C++ extension is not
  built);
* ``torch fused`` and ``torch foreach``: torch.optim.AdamW's whole step, for reference.

Each cell is crossed with the same gradient tensors every step against fresh ones (what
``zero_grad()`` followed by backward gives: new tensors at new addresses), and one param group
against one group per tensor. Implementations run interleaved in rotating order, each taking
``WARM_REPEATS`` steps in a row per round. The table shows median microseconds per tensor of the
first of them (``us/tensor``: taken right after the other implementations' steps, with this
one's objects out of cache, as a training step finds them after the forward and backward pass)
and of the last (``warm``: the host work alone, its objects in cache), and the median of the
per-round ratios of torch fused's first step over this one's (``vs fused``). Prints the machine
first (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend loads on a CPU

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_description

import fused_optim

NUMEL = 16
#: Steps in a row per implementation and round: the first is timed right after the other
#: implementations ran (its objects out of cache, as after a forward and backward pass: the
#: ``us/tensor`` column), the last after its own steps (``warm``: the host work alone).
WARM_REPEATS = 3
HYPER = dict(lr=1e-3, weight_decay=0.01)


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def elide_triton_launches() -> None:
    from fused_optim.backends.triton import kernels

    kernels.adam_kernel = _NoLaunch()
    kernels.sgd_kernel = _NoLaunch()


class WithPythonChecks:
    """An optimizer whose steps run the fast path's checks in plain Python
    (``backends.python_checks``), as an install without the C++ extension does."""

    def __init__(self, opt):
        self.opt = opt

    def step(self):
        fused_optim.backends.use_python_host_checks(True)
        try:
            return self.opt.step()
        finally:
            fused_optim.backends.use_python_host_checks(False)

    def __getattr__(self, name):
        return getattr(self.opt, name)


def make_params(count: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(NUMEL, generator=gen)) for _ in range(count)]


def param_groups(params, per_tensor: bool):
    return [{"params": [p]} for p in params] if per_tensor else [{"params": params}]


def implementations(available: list[str]):
    impls = {}
    if "triton" in available:
        impls["fused_optim triton (launch elided)"] = lambda g: fused_optim.AdamW(
            g, **HYPER, backend="triton"
        )
        impls["fused_optim triton (pure Python)"] = lambda g: WithPythonChecks(
            fused_optim.AdamW(g, **HYPER, backend="triton")
        )
    if "cpu" in available:
        impls["fused_optim cpu"] = lambda g: fused_optim.AdamW(g, **HYPER, backend="cpu")
    impls["torch fused"] = lambda g: torch.optim.AdamW(g, **HYPER, fused=True)
    impls["torch foreach"] = lambda g: torch.optim.AdamW(g, **HYPER, foreach=True)
    return impls


def run_case(count: int, fresh_grads: bool, per_tensor: bool, rounds: int, available) -> list:
    runs = {}
    for name, factory in implementations(available).items():
        params = make_params(count)
        for p in params:
            p.grad = torch.randn(NUMEL)
        opt = factory(param_groups(params, per_tensor))
        for _ in range(2):
            opt.step()
        runs[name] = (opt, params)
    times = {name: [] for name in runs}
    warm_times = {name: [] for name in runs}
    names = list(runs)
    new_grads = [torch.randn(NUMEL) for _ in range(count)]
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            opt, params = runs[name]
            for repeat in range(WARM_REPEATS):
                if fresh_grads:
                    for p, g in zip(params, new_grads):
                        p.grad = g.clone()
                start = time.perf_counter()
                opt.step()
                elapsed = time.perf_counter() - start
                if repeat == 0:
                    times[name].append(elapsed)
            warm_times[name].append(elapsed)
    rows = []
    anchor = times.get("torch fused")
    for name, ts in times.items():
        median = statistics.median(ts)
        warm = statistics.median(warm_times[name])
        opt = runs[name][0]
        # Median of per-round ratios (torch fused's time over this one's, same round).
        speedup = statistics.median(a / b for a, b in zip(anchor, ts)) if anchor else None
        rows.append(
            dict(
                tensors=count,
                grads="fresh" if fresh_grads else "same",
                groups="per tensor" if per_tensor else "one",
                implementation=name,
                us_per_step=median * 1e6,
                us_per_tensor=median * 1e6 / count,
                us_per_tensor_warm=warm * 1e6 / count,
                speedup_vs_torch_fused=speedup,
                launches=opt.launches_per_step() if hasattr(opt, "launches_per_step") else None,
                fast_path=getattr(getattr(opt, "_plan", None), "fast", None) is not None,
            )
        )
    return rows


def _per_tensor(report: dict) -> dict:
    return {
        (r["tensors"], r["groups"], r["grads"], r["implementation"]): r["us_per_tensor"]
        for r in report["rows"]
    }


def compare(before: dict, after: dict) -> str:
    """A markdown table of two reports (us per tensor; ratios against torch fused of the same
    report)."""
    old, new = _per_tensor(before), _per_tensor(after)
    elided, cpu, fused = "fused_optim triton (launch elided)", "fused_optim cpu", "torch fused"
    pure = "fused_optim triton (pure Python)"
    lines = [
        "| tensors | groups | grads | triton, launch elided: before -> after | triton, pure "
        "Python (after) | cpu: before -> after | torch fused (before / after run) | cpu vs "
        "torch fused (after) | triton vs torch fused (after) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cases = sorted({key[:3] for key in new}, key=lambda k: (k[0], k[1] != "one", k[2] != "same"))
    for case in cases:

        def get(table, name, case=case):
            return table.get((*case, name), float("nan"))

        lines.append(
            f"| {case[0]} | {case[1]} | {case[2]} | {get(old, elided):.2f} -> "
            f"{get(new, elided):.2f} | {get(new, pure):.2f} | {get(old, cpu):.2f} -> "
            f"{get(new, cpu):.2f} | {get(old, fused):.2f} / {get(new, fused):.2f} | "
            f"{get(new, fused) / get(new, cpu):.1f}x | {get(new, fused) / get(new, elided):.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[1, 150, 2000, 10000])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--compare",
        type=Path,
        nargs=2,
        metavar=("BEFORE", "AFTER"),
        help="print a markdown table of two --json reports and exit",
    )
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(path.read_text()) for path in args.compare)
        print(compare(before, after))
        return 0
    available = fused_optim.available_backends(torch.device("cpu"))
    if "triton" in available:
        elide_triton_launches()
    meta = dict(torch=torch.__version__, cpu=cpu_description(), available=available)
    print(json.dumps(meta))
    print(
        f"{'tensors':>7} {'grads':>5} {'groups':>10}  {'implementation':<36} "
        f"{'us/step':>10} {'us/tensor':>9} {'warm':>6} {'vs fused':>8} {'launches':>8} "
        f"{'fast path':>9}"
    )
    rows = []
    for count in args.tensors:
        for per_tensor in (False, True):
            for fresh in (False, True):
                rounds = args.rounds if count <= 2000 else max(5, args.rounds // 3)
                for row in run_case(count, fresh, per_tensor, rounds, available):
                    rows.append(row)
                    launches = "" if row["launches"] is None else row["launches"]
                    fast = "yes" if row["fast_path"] else ""
                    print(
                        f"{row['tensors']:>7} {row['grads']:>5} {row['groups']:>10}  "
                        f"{row['implementation']:<36} {row['us_per_step']:>10.1f} "
                        f"{row['us_per_tensor']:>9.2f} {row['us_per_tensor_warm']:>6.2f} "
                        f"{row['speedup_vs_torch_fused'] or 0:>7.2f}x {launches!s:>8} {fast:>9}"
                    )
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
