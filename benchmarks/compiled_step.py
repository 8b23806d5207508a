"""``torch.compile(opt.step)`` against the eager step, with a scheduler changing lr every step.

    python benchmarks/compiled_step.py [--cases 16x4096 128x4096 500x16 8x1048576]
                                       [--rounds 21] [--json out.json]

AdamW on CPU params (fused_optim's C++ CPU backend), a ``LambdaLR`` scheduler stepping after
every optimizer step (the recipe of PyTorch's compiled-optimizer tutorial):

* ``fused_optim eager``: ``opt.step()`` as it is;
* ``fused_optim compiled``: ``torch.compile(opt.step)`` (inductor);
* ``torch fused``: ``torch.optim.AdamW(fused=True).step()``;
* ``torch compiled``: ``torch.compile(torch.optim.AdamW(...).step)``, what the tutorial times.

Each compiled run reports what dynamo did over all its steps: graphs compiled, graph breaks met
(each step meets LRScheduler's wrapper of ``opt.step``, which dynamo never traces) and whether
any step after the warm-up compiled anything (a recompile on lr would). Step times are
medians over interleaved rounds; ``vs fused_optim eager`` is the median of per-round ratios.
Prints the machine first (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_description

import fused_optim

HYPER = dict(lr=1e-3, weight_decay=0.01)
WARMUP = 4


def implementations() -> dict:
    return {
        "fused_optim eager": (lambda ps: fused_optim.AdamW(ps, **HYPER, backend="cpu"), False),
        "fused_optim compiled": (lambda ps: fused_optim.AdamW(ps, **HYPER, backend="cpu"), True),
        "torch fused": (lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True), False),
        "torch compiled": (lambda ps: torch.optim.AdamW(ps, **HYPER), True),
    }


class Run:
    """One implementation on its own params, grads and scheduler."""

    def __init__(self, factory, compiled: bool, count: int, numel: int):
        gen = torch.Generator().manual_seed(0)
        self.params = [torch.nn.Parameter(torch.randn(numel, generator=gen)) for _ in range(count)]
        for p in self.params:
            p.grad = torch.randn(numel, generator=gen)
        self.opt = factory(self.params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + s))
        self.step = torch.compile(self.opt.step) if compiled else self.opt.step
        self.compiled = compiled
        self.graphs = 0  # compiled by this run's calls (dynamo's counters are global)
        self.breaks = 0

    def __call__(self) -> float:
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        start = time.perf_counter()
        self.step()
        elapsed = time.perf_counter() - start
        self.graphs += counters["stats"]["unique_graphs"] - graphs
        self.breaks += sum(counters["graph_break"].values()) - breaks
        self.scheduler.step()
        return elapsed


def run_case(count: int, numel: int, rounds: int) -> list[dict]:
    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for name, (factory, compiled) in implementations().items():
        run = runs[name] = Run(factory, compiled, count, numel)
        for _ in range(WARMUP):
            run()
    names = list(runs)
    warm_graphs = {name: runs[name].graphs for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(runs[name]())
    base = times["fused_optim eager"]
    rows = []
    for name in names:
        run = runs[name]
        rows.append(dict(
            tensors=count,
            numel=numel,
            implementation=name,
            us_per_step=statistics.median(times[name]) * 1e6,
            vs_fused_optim_eager=statistics.median(t / b for t, b in zip(times[name], base)),
            graphs=run.graphs if run.compiled else None,
            graph_breaks=run.breaks if run.compiled else None,
            recompiled_after_warmup=run.graphs != warm_graphs[name] if run.compiled else None,
        ))  # fmt: skip
    torch._dynamo.reset()
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| tensors x numel | implementation | us/step | vs fused_optim eager | graphs | breaks |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        graphs = "" if r["graphs"] is None else str(r["graphs"])
        if r["recompiled_after_warmup"]:
            graphs += " (recompiled)"
        breaks = "" if r["graph_breaks"] is None else str(r["graph_breaks"])
        lines.append(
            f"| {r['tensors']} x {r['numel']} | {r['implementation']} | {r['us_per_step']:.0f} "
            f"| {r['vs_fused_optim_eager']:.2f}x | {graphs} | {breaks} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cases = ["16x4096", "128x4096", "500x16", "8x1048576"]
    parser.add_argument("--cases", nargs="+", default=cases, help="TENSORSxNUMEL")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    machine = cpu_description()
    print(json.dumps(machine))
    rows = []
    for case in args.cases:
        count, numel = map(int, case.split("x"))
        rows += run_case(count, numel, args.rounds)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
