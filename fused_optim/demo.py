"""``fused-optim demo``: train a small model with torch.optim.AdamW and fused_optim.AdamW.

Both runs start from the same weights and see the same batches of a generated two-spirals
classification problem. The demo prints how closely the loss curves agree, each optimizer's
step time, and writes a PNG of both loss curves. The backend is fused_optim's default (on a CPU,
its C++ ``cpu`` backend when built) or the one ``--backend`` names: on a CPU, ``triton`` runs
the Triton kernels in Triton's interpreter (step times are then not a benchmark).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

from ._extras import import_extra


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=_positive_int, default=150, help="training steps (150)")
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (128)")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate (1e-2)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay (0.01)")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument(
        "--backend",
        choices=["triton", "cuda", "cpu", "reference"],
        default=None,
        help="fused_optim backend (default: fused_optim's choice: the C++ cpu backend on a CPU "
        "when built, Triton on a GPU; triton on a CPU runs Triton's interpreter)",
    )
    parser.add_argument(
        "--plot", default="fused_optim_demo.png", help="PNG of both loss curves ('' for none)"
    )
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def make_spirals(n: int, seed: int):
    """Two interleaved spirals in 2-D, labelled 0 and 1, with a little noise."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=gen) * 2 * torch.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=gen)
    sign = 1 - 2 * label.float()
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / 4
    x = x + 0.02 * torch.randn(n, 2, generator=gen)
    return x, label


def train_side_by_side(steps, batch_size, lr, weight_decay, device, backend, seed):
    """Train two copies of one MLP; returns per-step losses and step times of both."""
    import torch
    from torch import nn

    import fused_optim

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
    ).to(device)
    models = {"torch.optim.AdamW": model, "fused_optim.AdamW": copy.deepcopy(model)}
    optimizers = {
        "torch.optim.AdamW": torch.optim.AdamW(
            models["torch.optim.AdamW"].parameters(),
            lr=lr,
            weight_decay=weight_decay,
            foreach=False,
        ),
        "fused_optim.AdamW": fused_optim.AdamW(
            models["fused_optim.AdamW"].parameters(),
            lr=lr,
            weight_decay=weight_decay,
            backend=backend,
        ),
    }
    x, y = make_spirals(4096, seed)
    x, y = x.to(device), y.to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    losses: dict[str, list[float]] = {name: [] for name in models}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps):
        batch = torch.randint(0, len(x), (batch_size,), generator=gen).to(device)
        for name, net in models.items():
            opt = optimizers[name]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            losses[name].append(loss.item())
    with torch.no_grad():
        accuracy = {
            name: (net(x).argmax(1) == y).float().mean().item() for name, net in models.items()
        }
    param_diff = max(
        (a - b).abs().max().item()
        for a, b in zip(
            models["torch.optim.AdamW"].parameters(), models["fused_optim.AdamW"].parameters()
        )
    )
    return dict(
        losses=losses,
        step_ms={name: 1e3 * statistics.median(t) for name, t in times.items()},
        accuracy=accuracy,
        max_param_diff=param_diff,
        backend=optimizers["fused_optim.AdamW"].group_backends()[0],
    )


def plot_losses(losses: dict[str, list[float]], path: str, title: str) -> None:
    import_extra("matplotlib").use("Agg")
    plt = import_extra("matplotlib.pyplot")

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, values), style in zip(losses.items(), ["-", "--"]):
        ax.plot(values, style, label=name, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.backend not in ("reference", "cpu"):
        # Run the real Triton kernels on the CPU, through Triton's interpreter. This must be
        # set before fused_optim's kernels are first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    result = train_side_by_side(
        args.steps, args.batch_size, args.lr, args.weight_decay, device, args.backend, args.seed
    )
    ours, theirs = result["losses"]["fused_optim.AdamW"], result["losses"]["torch.optim.AdamW"]
    loss_diff = max(abs(a - b) for a, b in zip(ours, theirs))
    interpreted = device.type == "cpu" and result["backend"] == "triton"
    print(f"device: {device}   fused_optim backend: {result['backend']}")
    print(f"{'step':>5}  {'torch.optim.AdamW':>18}  {'fused_optim.AdamW':>18}")
    for step in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{step:>5}  {theirs[step]:>18.6f}  {ours[step]:>18.6f}")
    print(f"{args.steps - 1:>5}  {theirs[-1]:>18.6f}  {ours[-1]:>18.6f}")
    print(f"loss curves: max |difference| over {args.steps} steps = {loss_diff:.3g}")
    print(f"params: max |difference| at the end = {result['max_param_diff']:.3g}")
    for name, acc in result["accuracy"].items():
        print(f"{name}: accuracy {100 * acc:.1f}%, optimizer step {result['step_ms'][name]:.3f} ms")
    if interpreted:
        print(
            "(fused_optim's kernels ran in Triton's interpreter: its step time is not a benchmark)"
        )
    if args.plot:
        plot_losses(
            result["losses"], args.plot, f"AdamW on two spirals ({device}, {result['backend']})"
        )
        print(f"loss curves written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, max_loss_diff=loss_diff, device=str(device)), f, indent=1)
    return 0
