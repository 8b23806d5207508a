"""``fused-optim demo``: train a small model with torch.optim.AdamW and fused_optim.AdamW.

Both runs start from the same weights and see the same batches of a generated two-spirals
classification problem. The demo prints how closely the loss curves agree, each optimizer's
step time, and writes a PNG of both loss curves beside each step's max |param difference| from
torch.optim's for-loop run, fused_optim's and torch's own ``fused=True``'s. The backend is
fused_optim's default (on a CPU, its C++ ``cpu`` backend when built) or the one ``--backend``
names: on a CPU, ``triton`` runs the Triton kernels in Triton's interpreter (step times are
then not a benchmark).
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
        "--plot",
        default="fused_optim_demo.png",
        help="PNG of the loss curves and the per-step differences ('' for none)",
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


FOR_LOOP, FUSED_OPTIM = "torch.optim.AdamW", "fused_optim.AdamW"
TORCH_FUSED = "torch.optim.AdamW(fused=True)"


def train_side_by_side(steps, batch_size, lr, weight_decay, device, backend, seed):
    """Train copies of one MLP with torch.optim.AdamW (its for-loop step), fused_optim.AdamW and,
    where torch supports it on the device, torch.optim.AdamW(fused=True); returns per-step
    losses, step times, and each step's max |param difference| from the for-loop run."""
    import torch
    from torch import nn

    import fused_optim

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
    ).to(device)
    models = {FOR_LOOP: model, FUSED_OPTIM: copy.deepcopy(model)}
    kwargs = dict(lr=lr, weight_decay=weight_decay)
    optimizers = {
        FOR_LOOP: torch.optim.AdamW(models[FOR_LOOP].parameters(), **kwargs, foreach=False),
        FUSED_OPTIM: fused_optim.AdamW(models[FUSED_OPTIM].parameters(), **kwargs, backend=backend),
    }
    twin = copy.deepcopy(model)
    try:
        optimizers[TORCH_FUSED] = torch.optim.AdamW(twin.parameters(), **kwargs, fused=True)
        models[TORCH_FUSED] = twin
    except RuntimeError:  # torch has no fused AdamW for this device
        pass
    x, y = make_spirals(4096, seed)
    x, y = x.to(device), y.to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    losses: dict[str, list[float]] = {name: [] for name in models}
    times: dict[str, list[float]] = {name: [] for name in models}
    param_diffs: dict[str, list[float]] = {name: [] for name in models if name != FOR_LOOP}
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
        for name in param_diffs:
            param_diffs[name].append(_max_difference(models[name], models[FOR_LOOP]))
    with torch.no_grad():
        accuracy = {
            name: (net(x).argmax(1) == y).float().mean().item() for name, net in models.items()
        }
    return dict(
        losses=losses,
        step_ms={name: 1e3 * statistics.median(t) for name, t in times.items()},
        accuracy=accuracy,
        max_param_diff=param_diffs[FUSED_OPTIM][-1] if steps else 0.0,
        param_diff_per_step=param_diffs,
        backend=optimizers[FUSED_OPTIM].group_backends()[0],
    )


def _max_difference(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


#: Where a difference of exactly 0 is drawn on the log axis.
ZERO_ON_LOG_AXIS = 1e-12


def plot_losses(result: dict, path: str, device) -> None:
    """Two panels: the loss curves of the for-loop and fused_optim runs, and each step's max
    |param difference| from the for-loop run, fused_optim's beside torch's own fused=True."""
    import_extra("matplotlib").use("Agg")
    plt = import_extra("matplotlib.pyplot")

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, style in ((FOR_LOOP, "-"), (FUSED_OPTIM, "--")):
        label = f"{name} (for-loop step)" if name == FOR_LOOP else f"{name} ({result['backend']})"
        left.plot(result["losses"][name], style, label=label, linewidth=1.5)
    left.set_xlabel("step")
    left.set_ylabel("training loss (cross-entropy)")
    left.set_title("loss: the two curves overlap")
    left.legend()
    for name, values in result["param_diff_per_step"].items():
        shown = [max(v, ZERO_ON_LOG_AXIS) for v in values]
        label = f"{name} ({result['backend']})" if name == FUSED_OPTIM else name
        right.plot(shown, label=label, linewidth=1.2)
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("max |param difference| from the for-loop run")
    right.set_title(f"differences (0 drawn at {ZERO_ON_LOG_AXIS:g})")
    right.legend()
    fig.suptitle(
        f"AdamW on two spirals; device: {device}; fused_optim backend: {result['backend']}"
    )
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
    ours, theirs = result["losses"][FUSED_OPTIM], result["losses"][FOR_LOOP]
    loss_diff = max(abs(a - b) for a, b in zip(ours, theirs))
    interpreted = device.type == "cpu" and result["backend"] == "triton"
    print(f"device: {device}   fused_optim backend: {result['backend']}")
    print(f"{'step':>5}  {'torch.optim.AdamW':>18}  {'fused_optim.AdamW':>18}")
    for step in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{step:>5}  {theirs[step]:>18.6f}  {ours[step]:>18.6f}")
    print(f"{args.steps - 1:>5}  {theirs[-1]:>18.6f}  {ours[-1]:>18.6f}")
    print(f"loss curves: max |difference| over {args.steps} steps = {loss_diff:.3g}")
    print(f"params: max |difference| at the end = {result['max_param_diff']:.3g}")
    if TORCH_FUSED in result["param_diff_per_step"]:
        torch_fused = result["param_diff_per_step"][TORCH_FUSED][-1]
        print(f"  (torch.optim.AdamW(fused=True) against its for-loop step: {torch_fused:.3g})")
    for name, acc in result["accuracy"].items():
        print(f"{name}: accuracy {100 * acc:.1f}%, optimizer step {result['step_ms'][name]:.3f} ms")
    if interpreted:
        print(
            "(fused_optim's kernels ran in Triton's interpreter: its step time is not a benchmark)"
        )
    if args.plot:
        plot_losses(result, args.plot, device)
        print(f"loss curves and per-step differences written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, max_loss_diff=loss_diff, device=str(device)), f, indent=1)
    return 0
