"""Long-horizon bf16 experiment: what the precision modes buy when updates are below bf16's
resolution.

A linear regression ``y = x @ W_true.T`` whose weights sit around 1.0, where bf16's spacing is
2^-8 (just below 1) to 2^-7 (just above), trained from the same start on the same data stream
with lr x update around 1e-4 to 1e-3, far below half a bf16 ulp, in these modes:

* ``fp32``: fp32 params and states (the baseline);
* ``bf16``: bf16 params and states, torch.optim's numbers (round to nearest at every step);
* ``bf16+fp32-states``: bf16 params, fp32 optimizer states (``state_dtype=torch.float32``);
* ``bf16+master``: bf16 params with fp32 master weights (``master_weights=True``);
* ``bf16+sr``: bf16 params written with stochastic rounding (``stochastic_rounding=True``).

The loss is computed in fp32 from the (upcast) params, so that every difference from the fp32
run comes from how the optimizer stores params and states, not from bf16 matmuls. All runs start
from the same bf16-representable weights.

For each mode the table shows the relative distance of the final weights from the fp32 run's,
``||W - W_fp32|| / ||W_fp32 - W_init||`` (1.0 for weights that never left the start), the
fraction of weights that never changed during the whole run, and the final loss on a fixed
evaluation batch (fp32 math). A last row gives the floor: the fp32 run's own final weights
rounded to bf16, as close as any bf16 weights can get.

    python benchmarks/bf16_experiment.py --backend reference     # 2000 steps, SGD and AdamW
    python benchmarks/bf16_experiment.py --steps 500 --optimizer adamw --json out.json
    python benchmarks/bf16_experiment.py --backend triton --device cuda

``--backend`` defaults to fused_optim's automatic choice for the device; ``reference`` (pure
torch) is fast on a CPU (~1-2 s per mode for 2000 steps), ``triton`` runs on a GPU (or on a CPU
under ``TRITON_INTERPRET=1``, slowly).
:func:`run_experiment` is the same experiment as a function (tests/test_precision.py runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch

import fused_optim

#: Mode name -> (param dtype, fused_optim precision keywords).
MODES: dict[str, tuple[torch.dtype, dict[str, Any]]] = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "bf16+fp32-states": (torch.bfloat16, {"state_dtype": torch.float32}),
    "bf16+master": (torch.bfloat16, {"master_weights": True}),
    "bf16+sr": (torch.bfloat16, {"stochastic_rounding": True}),
}
BASELINE = "fp32"

#: Optimizer name -> (class, hyperparameters). SGD's gradients are ~1e-2 at the start, so
#: lr x grad is ~5e-4; AdamW's steps are ~lr = 3e-4 (no weight decay: a clean target).
OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "sgd": (fused_optim.SGD, {"lr": 0.05}),
    "adamw": (fused_optim.AdamW, {"lr": 3e-4, "weight_decay": 0.0}),
}

IN_FEATURES = 128
OUT_FEATURES = 32
BATCH = 64
INIT_SPREAD = 0.02  # W_init = 1 + INIT_SPREAD * N(0, 1), rounded to bf16
TARGET_OFFSET = 0.1  # W_true = W_init + TARGET_OFFSET * N(0, 1): ~10 bf16 ulps away


def make_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_init, W_true) in fp32; W_init holds bf16-representable values."""
    gen = torch.Generator().manual_seed(seed)
    shape = (OUT_FEATURES, IN_FEATURES)
    w_init = (1 + INIT_SPREAD * torch.randn(shape, generator=gen)).bfloat16().float()
    w_true = w_init + TARGET_OFFSET * torch.randn(shape, generator=gen)
    return w_init, w_true


def loss_fn(w: torch.Tensor, x: torch.Tensor, w_true: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``x @ w.T`` against the noiseless targets, in fp32."""
    return ((x @ w.float().t() - x @ w_true.t()) ** 2).mean()


def train(
    mode: str,
    steps: int,
    optimizer: str = "adamw",
    backend: str | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Train one mode; returns its final weights (fp32, CPU), the mask of weights that never
    changed, the final loss and the wall time."""
    dtype, precision = MODES[mode]
    cls, hyper = OPTIMIZERS[optimizer]
    device = torch.device(device)
    w_init, w_true = make_problem(seed)
    w_true = w_true.to(device)
    w = w_init.to(device=device, dtype=dtype).requires_grad_()
    opt = cls([w], **hyper, **precision, backend=backend)
    data = torch.Generator().manual_seed(seed + 1)
    never_moved = torch.ones_like(w, dtype=torch.bool)
    previous = w.detach().clone()
    start = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(BATCH, IN_FEATURES, generator=data).to(device)
        opt.zero_grad(set_to_none=True)
        loss_fn(w, x, w_true).backward()
        opt.step()
        current = w.detach()
        never_moved &= current == previous
        previous.copy_(current)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    x_eval = torch.randn(1024, IN_FEATURES, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        final_loss = loss_fn(w.detach().cpu(), x_eval, w_true.cpu()).item()
    return {
        "weights": w.detach().float().cpu(),
        "never_moved": never_moved.cpu(),
        "final_loss": final_loss,
        "seconds": seconds,
        "backends": opt.group_backends(),
    }


def run_experiment(
    steps: int = 2000,
    backend: str | None = None,
    optimizer: str = "adamw",
    device: torch.device | str = "cpu",
    seed: int = 0,
    modes: tuple[str, ...] = tuple(MODES),
) -> dict[str, Any]:
    """Run every mode for ``steps`` steps; returns a JSON-ready dict.

    ``result["modes"][mode]`` has ``rel_distance`` (``||W - W_fp32|| / ||W_fp32 - W_init||``),
    ``never_moved`` (fraction of weights that never changed), ``final_loss``, ``seconds`` and
    ``backend``. ``result["initial_loss"]`` is the loss at the start, for scale, and
    ``result["rounding_floor"]`` the relative distance of the fp32 run's own final weights
    rounded to bf16 (to nearest): no bf16 weights can be much closer to the fp32 run than that.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    modes = tuple(dict.fromkeys((BASELINE, *modes)))
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)  # 4096 weights: more intra-op threads only add overhead
    try:
        runs = {m: train(m, steps, optimizer, backend, device, seed) for m in modes}
    finally:
        torch.set_num_threads(threads)
    w_init, w_true = make_problem(seed)
    x_eval = torch.randn(1024, IN_FEATURES, generator=torch.Generator().manual_seed(seed + 2))
    baseline = runs[BASELINE]["weights"]
    travelled = (baseline - w_init).norm().item()
    results = {}
    for mode, run in runs.items():
        results[mode] = {
            "rel_distance": (run["weights"] - baseline).norm().item() / travelled,
            "never_moved": run["never_moved"].double().mean().item(),
            "final_loss": run["final_loss"],
            "seconds": run["seconds"],
            "backend": "+".join(run["backends"]),
        }
    return {
        "steps": steps,
        "optimizer": optimizer,
        "hyperparameters": OPTIMIZERS[optimizer][1],
        "device": str(device),
        "seed": seed,
        "shape": [OUT_FEATURES, IN_FEATURES],
        "initial_loss": loss_fn(w_init, x_eval, w_true).item(),
        "fp32_travelled": travelled,
        "rounding_floor": (baseline.bfloat16().float() - baseline).norm().item() / travelled,
        "modes": results,
    }


def format_table(result: dict[str, Any]) -> str:
    hyper = ", ".join(f"{k}={v:g}" for k, v in result["hyperparameters"].items())
    lines = [
        f"{result['optimizer']} ({hyper}), {result['steps']} steps, "
        f"{math.prod(result['shape'])} weights ~1.0 on {result['device']}; "
        f"initial loss {result['initial_loss']:.3g}, "
        f"fp32 run moved the weights by {result['fp32_travelled']:.3g} (L2)",
        "",
        "| mode | rel. distance from fp32 | never moved | final loss | backend | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for mode, row in result["modes"].items():
        lines.append(
            f"| {mode} | {row['rel_distance']:.4f} | {100 * row['never_moved']:.1f}% | "
            f"{row['final_loss']:.3e} | {row['backend']} | {row['seconds']:.1f} |"
        )
    lines.append(
        f"| (fp32 result rounded to bf16: the floor) | {result['rounding_floor']:.4f} | | | | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    parser.add_argument(
        "--optimizer", choices=[*OPTIMIZERS, "both"], default="both", help="default: both"
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="fused_optim backend, e.g. triton or reference (default: automatic)",
    )
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    names = list(OPTIMIZERS) if args.optimizer == "both" else [args.optimizer]
    results = []
    for name in names:
        result = run_experiment(args.steps, args.backend, name, args.device, args.seed)
        print(format_table(result), end="\n\n", flush=True)
        results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "runs": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
