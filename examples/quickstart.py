"""Train a small model with torch.optim.AdamW and fused_optim.AdamW side by side.

    python examples/quickstart.py

Both runs start from the same weights and see the same batches; the script prints the losses
every few steps and how closely the two runs agree at the end. fused_optim picks its backend
(on a CPU, its C++ ``cpu`` backend when built) unless FUSED_OPTIM_QUICKSTART_BACKEND names one
("triton", "cuda", "cpu" or "reference"). Without a GPU the script sets TRITON_INTERPRET=1
before triton is imported, so that "triton" runs the kernels in Triton's interpreter.
"""

from __future__ import annotations

import copy
import os
import time

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch import nn

import fused_optim

STEPS = 60


def make_data(n: int = 512, seed: int = 0):
    """A small regression problem: y = sin(3 x0) + x1 * x2 + noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = torch.sin(3 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.05 * torch.randn(n, 1, generator=gen)
    return x, y


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
    )
    model_torch = model.to(device)
    model_fused = copy.deepcopy(model_torch)
    opt_torch = torch.optim.AdamW(
        model_torch.parameters(), lr=3e-3, weight_decay=0.1, foreach=False
    )
    backend = os.environ.get("FUSED_OPTIM_QUICKSTART_BACKEND") or None
    opt_fused = fused_optim.AdamW(
        model_fused.parameters(), lr=3e-3, weight_decay=0.1, backend=backend
    )
    x, y = make_data()
    x, y = x.to(device), y.to(device)
    step_time = {"torch.optim.AdamW": 0.0, "fused_optim.AdamW": 0.0}
    print(f"device={device}  fused_optim backend={opt_fused.group_backends()[0]}")
    print(f"{'step':>4}  {'torch.optim loss':>16}  {'fused_optim loss':>16}")
    for step in range(STEPS):
        batch = slice((step * 64) % 512, (step * 64) % 512 + 64)
        losses = []
        for name, model_, opt in (
            ("torch.optim.AdamW", model_torch, opt_torch),
            ("fused_optim.AdamW", model_fused, opt_fused),
        ):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model_(x[batch]), y[batch])
            loss.backward()
            start = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_time[name] += time.perf_counter() - start
            losses.append(loss.item())
        if step % 10 == 0 or step == STEPS - 1:
            print(f"{step:>4}  {losses[0]:>16.6f}  {losses[1]:>16.6f}")
    max_param_diff = max(
        (a - b).abs().max().item()
        for a, b in zip(model_torch.parameters(), model_fused.parameters())
    )
    with torch.no_grad():
        final = [nn.functional.mse_loss(m(x), y).item() for m in (model_torch, model_fused)]
    print(f"final full-data loss: torch.optim {final[0]:.6f}  fused_optim {final[1]:.6f}")
    print(f"max |param difference| after {STEPS} steps: {max_param_diff:.3g}")
    for name, seconds in step_time.items():
        print(f"{name} step time: {1e3 * seconds / STEPS:.3f} ms/step")
    if device.type == "cpu" and opt_fused.group_backends()[0] == "triton":
        print("(Triton kernels ran in the interpreter: the step times above are not a benchmark)")


if __name__ == "__main__":
    main()
