"""How torch rounds on this CPU, and what that does to fp32 parity with torch.optim.

Prints the CPU (model, AVX2/AVX-512 flags), the share of fp32 inputs for which torch's CPU
``sqrt`` is not correctly rounded, and for every fp32 configuration of
``fused_optim.testing.CONFIGS`` on PyTorch's parity recipe:

* torch.optim's rounding: its for-loop against the same code with correctly rounded arithmetic
  (``fused_optim.testing.correctly_rounded_optimizer``), max abs over params and states;
* fused_optim's distance from that correctly rounded run, for every CPU backend available.

torch's own ``fused=True`` path is not run here (it does not run under some CPU emulators; use
``fused-optim verify --candidate`` for it)::

    python benchmarks/cpu_rounding.py [--json out.json] [--backends cpu reference]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

import fused_optim
from fused_optim import testing
from fused_optim.backends import correctly_rounded as cr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_description


def sqrt_miss_rate(count: int = 1 << 22) -> float:
    """Share of uniform [0, 2) fp32 inputs whose torch.sqrt is not correctly rounded."""
    x = torch.rand(count, generator=torch.Generator().manual_seed(0)) * 2
    return (torch.sqrt(x) != cr.sqrt(x)).double().mean().item()


def recipe_distance(factory, config, torch_class, torch_config) -> float:
    """Max abs distance of ``factory``'s run from torch.optim's correctly rounded run."""
    runs = zip(
        testing.run_recipe(factory, config),
        testing.run_recipe(testing.correctly_rounded_optimizer(torch_class), torch_config),
    )
    return max(testing.run_distance(run, exact) for run, exact in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--backends", nargs="*", default=None, help="default: cpu, reference")
    parser.add_argument(
        "--label", default="", help="a note for the JSON, e.g. the emulator and CPU model used"
    )
    args = parser.parse_args()
    device = torch.device("cpu")
    backends = args.backends or [
        b for b in ("cpu", "reference") if b in fused_optim.available_backends(device)
    ]
    result = {
        "label": args.label,
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "fp32_sqrt_not_correctly_rounded": sqrt_miss_rate(),
        "cases": [],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=1))
    print(f"{'optimizer':9} | {'config':62} | torch rounding | " + " | ".join(backends))
    for name in testing.OPTIMIZERS:
        torch_class = getattr(torch.optim, name)
        for config in testing.CONFIGS[name]:
            ref_config = testing.reference_config(config)
            row = {
                "optimizer": name,
                "config": testing.config_label(config),
                "torch_rounding": recipe_distance(torch_class, ref_config, torch_class, ref_config),
            }
            for backend in backends:

                def factory(params, backend=backend, name=name, **kw):
                    return getattr(fused_optim, name)(params, backend=backend, **kw)

                row[backend] = recipe_distance(factory, config, torch_class, ref_config)
            result["cases"].append(row)
            figures = " | ".join(f"{row[b]:.3g}" for b in backends)
            print(f"{name:9} | {row['config'][:62]:62} | {row['torch_rounding']:14.3g} | {figures}")
    worst = {k: max(c[k] for c in result["cases"]) for k in ("torch_rounding", *backends)}
    print("worst:", json.dumps(worst))
    result["worst"] = worst
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
