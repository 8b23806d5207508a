"""AdamW step time on the CPU: fused_optim's C++ backend against torch.optim and DeepSpeed.

    python benchmarks/cpu_bench.py [--workloads many-small gpt2-small flat flat-bf16]
                                   [--rounds 11] [--threads N] [--json out.json]

Implementations (whichever exist here): torch.optim.AdamW's for-loop (foreach=False), foreach
and fused=True paths; fused_optim.AdamW(backend="cpu") once per kernel build this CPU runs
(``[avx2]``, ``[avx512]``; with bf16 params also with fp32 states, state_dtype=torch.float32);
DeepSpeedCPUAdam(adamw_mode=True) if deepspeed imports and its CPU Adam op builds (fp32
states). Every implementation updates the same params with the same grads (the values drift,
the work does not) and keeps its own states.

Each round times one step of every implementation, in a rotating order (interleaved, so that
frequency and cache drift hit all alike). The table shows each implementation's median time and
the median over rounds of the per-round ratios torch fused / this and DeepSpeedCPUAdam / this
(above 1: this is faster). These machines are noisy (+-30% between runs): use 9 rounds or more.
The header gives the CPU model and vector flags, torch's CPU capability and the kernel builds.

``--clip MAX_NORM`` times gradient clipping with the step: torch.optim's and DeepSpeed's steps
follow ``torch.nn.utils.clip_grad_norm_(params, MAX_NORM)`` (a pass for the norm, a pass that
rewrites the gradients), fused_optim's follow ``opt.clip_grad_norm_(MAX_NORM)`` (the norm pass;
the coefficient is applied inside the update).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fused_optim
from fused_optim.backends import cpu as cpu_backend
from fused_optim.bench import gpt2_small_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_description

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
FLAT = 64 << 20
WORKLOADS: dict[str, tuple[str, tuple[tuple[int, ...], ...], torch.dtype]] = {
    "many-small": ("2000 tensors x 4096, fp32", ((4096,),) * 2000, torch.float32),
    "gpt2-small": ("GPT-2 small's 148 shapes (124M), fp32", gpt2_small_shapes(), torch.float32),
    "flat": ("one 64M-element tensor, fp32", ((FLAT,),), torch.float32),
    "flat-bf16": ("one 64M-element tensor, bf16 params", ((FLAT,),), torch.bfloat16),
}


def deepspeed_adam() -> tuple[type | None, str]:
    """DeepSpeedCPUAdam, or None and why not."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as error:  # not installed, or its import fails
        return None, f"deepspeed does not import: {error!r}"
    try:
        probe = [torch.nn.Parameter(torch.zeros(8))]
        probe[0].grad = torch.zeros(8)
        DeepSpeedCPUAdam(probe, adamw_mode=True).step()
    except Exception as error:  # its C++ op failed to build or load
        return None, f"DeepSpeedCPUAdam does not build/run: {error!r}"
    return DeepSpeedCPUAdam, ""


def make_params(shapes, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02).to(dtype))
        p.grad = torch.randn(shape, generator=generator).mul_(1e-3).to(dtype)
        params.append(p)
    return params


def implementations(params, dtype, ds_class) -> dict[str, tuple[Callable, str | None]]:
    """name -> (optimizer factory, kernel build to switch to before each of its steps)."""
    adamw = torch.optim.AdamW
    impls: dict[str, tuple[Callable[[], torch.optim.Optimizer], str | None]] = {
        "torch for-loop": (lambda: adamw(params, **HYPER, foreach=False), None),
        "torch foreach": (lambda: adamw(params, **HYPER, foreach=True), None),
        "torch fused": (lambda: adamw(params, **HYPER, fused=True), None),
    }
    for isa in cpu_backend.supported_isas()[1:]:  # the vector builds, best last
        impls[f"fused_optim cpu [{isa}]"] = (
            lambda: fused_optim.AdamW(params, **HYPER, backend="cpu"),
            isa,
        )
        if dtype != torch.float32:
            impls[f"fused_optim cpu [{isa}] fp32 states"] = (
                lambda: fused_optim.AdamW(
                    params, **HYPER, backend="cpu", state_dtype=torch.float32
                ),
                isa,
            )
    if ds_class is not None:
        # DeepSpeed keeps fp32 states (also for bf16 params).
        impls["DeepSpeedCPUAdam"] = (lambda: ds_class(
            params, lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"],
            weight_decay=HYPER["weight_decay"], adamw_mode=True,
        ), None)  # fmt: skip
    return impls


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of numerator / denominator, paired round by round."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def _stepper(opt, params, clip: float | None) -> Callable[[], None]:
    """One timed step of ``opt``: with ``clip``, torch's clip_grad_norm_ first, or
    fused_optim's own (applied inside its update)."""
    if clip is None:
        return opt.step
    if isinstance(opt, fused_optim.AdamW):

        def fused_clip_and_step():
            opt.clip_grad_norm_(clip)
            opt.step()

        return fused_clip_and_step

    def torch_clip_and_step():
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    return torch_clip_and_step


def run_workload(name: str, rounds: int, ds_class, clip: float | None = None) -> list[dict]:
    label, shapes, dtype = WORKLOADS[name]
    params = make_params(shapes, dtype)
    optimizers, isas = {}, {}
    default_isa = cpu_backend.cpu_isa()
    for impl, (factory, isa) in implementations(params, dtype, ds_class).items():
        try:
            if isa is not None:
                cpu_backend.set_isa(isa)
            opt = _stepper(factory(), params, clip)
            for _ in range(2):  # warm-up: creates the states, first-touches the memory
                opt()
            optimizers[impl], isas[impl] = opt, isa
        except Exception as error:
            print(f"  {impl}: skipped ({error!r})", file=sys.stderr)
    times: dict[str, list[float]] = {impl: [] for impl in optimizers}
    names = list(optimizers)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for impl in order:
            if isas[impl] is not None:
                cpu_backend.set_isa(isas[impl])
            start = time.perf_counter()
            optimizers[impl]()
            times[impl].append(time.perf_counter() - start)
    cpu_backend.set_isa(default_isa)
    numel = sum(p.numel() for p in params)
    rows = []
    for impl, ts in times.items():
        rows.append(
            dict(
                workload=name,
                description=label,
                tensors=len(params),
                numel=numel,
                dtype=str(dtype).replace("torch.", ""),
                clip=clip,
                implementation=impl,
                median_ms=statistics.median(ts) * 1e3,
                min_ms=min(ts) * 1e3,
                rounds=rounds,
                vs_torch_fused=(
                    _median_ratio(times["torch fused"], ts) if "torch fused" in times else None
                ),
                vs_deepspeed=(
                    _median_ratio(times["DeepSpeedCPUAdam"], ts)
                    if "DeepSpeedCPUAdam" in times
                    else None
                ),
            )
        )
    del optimizers, params
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"{'workload':<12} {'implementation':<36} {'median ms':>10} {'min ms':>9} "
        f"{'vs fused':>9} {'vs DS':>7}"
    )
    for row in rows:
        ratios = [row["vs_torch_fused"], row["vs_deepspeed"]]
        fused, ds = ("" if r is None else f"{r:.2f}x" for r in ratios)
        print(
            f"{row['workload']:<12} {row['implementation']:<36} {row['median_ms']:>10.2f} "
            f"{row['min_ms']:>9.2f} {fused:>9} {ds:>7}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument(
        "--rounds", type=int, default=11, help="timed steps per implementation (9 or more)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeedCPUAdam")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--clip", type=float, default=None, metavar="MAX_NORM",
        help="clip the gradients' 2-norm to MAX_NORM before each step (see above)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ds_class, ds_reason = (None, "--no-deepspeed") if args.no_deepspeed else deepspeed_adam()
    available, reason = cpu_backend.is_available(torch.device("cpu"))
    if not available:
        print(f"fused_optim's cpu backend is unavailable: {reason}", file=sys.stderr)
        return 2
    meta = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu=cpu_description(),
        deepspeed=ds_reason or "yes",
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        clip=args.clip,
    )
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    rows = []
    for name in args.workloads:
        rows += run_workload(name, args.rounds, ds_class, args.clip)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
