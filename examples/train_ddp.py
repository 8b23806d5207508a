"""Train a small MLP with DistributedDataParallel and a fused_optim (or torch.optim) optimizer.

    torchrun --nproc_per_node 2 examples/train_ddp.py            # 2 processes
    python examples/train_ddp.py                                 # 1 process, no process group
    python examples/train_ddp.py --optimizer torch.optim.AdamW   # the same with torch.optim
    python examples/train_ddp.py --checkpoint ckpt.pt            # save at the end
    python examples/train_ddp.py --checkpoint ckpt.pt --stop-after 20   # stop early, save
    python examples/train_ddp.py --checkpoint ckpt.pt --resume           # continue to --steps

The data is generated (a fixed random "teacher" MLP plus noise), nothing is downloaded. Every
step draws a global batch from a generator seeded by the step number, and each rank trains on
its slice, so a resumed run sees the same batches as an uninterrupted one. The process group
uses nccl when CUDA is available and gloo on the CPU.

``--backend auto`` (the default) is fused_optim's own choice: on a CPU its C++ ``cpu`` backend
when built. On a machine without CUDA, the script also sets TRITON_INTERPRET=1 before
fused_optim (and so triton) is imported, unless ``--backend`` is ``cpu`` or ``reference``, so
that ``--backend triton`` (and auto without the C++ backend) runs the Triton kernels in Triton's
interpreter (slow, but the real kernels). torch.optim optimizers ignore ``--backend``.

A resumed run continues exactly like an uninterrupted one with the same arguments (same
batches, LR schedule, optimizer state): ``--steps`` is the length of the whole run and sets the
LR schedule, ``--stop-after`` ends a run early.

The last line printed (by rank 0) is one summary line: the final loss (averaged over ranks),
steps per second, and the share of the step time spent in ``optimizer.step()``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

OPTIMIZERS = [
    f"{package}.{name}"
    for package in ("fused_optim", "torch.optim")
    for name in ("SGD", "Adam", "AdamW")
]
DEFAULT_LR = {"SGD": 0.05, "Adam": 1e-3, "AdamW": 1e-3}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="fused_optim.AdamW")
    parser.add_argument(
        "--backend",
        choices=["auto", "triton", "cuda", "cpu", "reference"],
        default="auto",
        help="fused_optim backend (auto: fused_optim's choice, the C++ cpu backend on a CPU "
        "when built, Triton on a GPU)",
    )
    parser.add_argument("--steps", type=int, default=60, help="length of the run (LR schedule)")
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop after this step (default: --steps)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="default: 0.05 SGD, 1e-3 Adam*")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=str, default=None, help="save here at the end")
    parser.add_argument(
        "--resume", action="store_true", help="load --checkpoint first and continue from it"
    )
    args = parser.parse_args(argv)
    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint PATH")
    return args


IN_FEATURES, OUT_FEATURES = 16, 4


def make_model(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, OUT_FEATURES),
    )


def make_teacher(seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed + 12345)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, OUT_FEATURES)
    )
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return teacher


def batch(step, rank, world, per_rank, teacher, seed, device):
    """This rank's slice of the global batch of ``step`` (the same on every rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(per_rank * world, IN_FEATURES, generator=g)
    with torch.no_grad():
        y = teacher(x) + 0.01 * torch.randn(x.shape[0], OUT_FEATURES, generator=g)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return x[rows].to(device), y[rows].to(device)


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and args.backend not in ("reference", "cpu"):
        # Must happen before triton is imported (fused_optim imports it).
        os.environ["TRITON_INTERPRET"] = "1"

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fused_optim

    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        local_rank, rank, world = 0, 0, 1
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")

    module = make_model(args.hidden, args.seed).to(device)
    model = DDP(module, device_ids=[local_rank] if cuda else None) if distributed else module

    package, name = args.optimizer.rsplit(".", 1)
    lr = args.lr if args.lr is not None else DEFAULT_LR[name]
    kwargs = {"lr": lr}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    if package == "fused_optim":
        kwargs["backend"] = None if args.backend == "auto" else args.backend
        opt = getattr(fused_optim, name)(model.parameters(), **kwargs)
    else:
        opt = getattr(torch.optim, name)(model.parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.steps, 1))

    start = 0
    if args.resume:
        checkpoint = torch.load(args.checkpoint, map_location=device, weights_only=True)
        module.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optim"])
        sched.load_state_dict(checkpoint["sched"])
        start = int(checkpoint["step"])

    teacher = make_teacher(args.seed)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    step_time = opt_time = 0.0
    loss = torch.zeros((), device=device)
    stop = args.steps if args.stop_after is None else min(args.stop_after, args.steps)
    for step in range(start, stop):
        x, y = batch(step, rank, world, args.batch_size, teacher, args.seed, device)
        sync()
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        opt.zero_grad()
        sched.step()
        step_time += time.perf_counter() - t0
        opt_time += t2 - t1

    final_loss = loss.detach().clone()
    if distributed:
        dist.all_reduce(final_loss)
        final_loss /= world
    steps_done = max(stop - start, 0)

    if args.checkpoint and rank == 0:
        checkpoint = {
            "model": module.state_dict(),
            "optim": opt.state_dict(),
            "sched": sched.state_dict(),
            "step": max(stop, start),
        }
        torch.save(checkpoint, args.checkpoint)
    if distributed:
        dist.barrier()

    if rank == 0:
        if package == "fused_optim":
            backend = "+".join(sorted(set(opt.group_backends())))
        else:
            backend = "torch"
        rate = steps_done / step_time if step_time > 0 else 0.0
        share = 100.0 * opt_time / step_time if step_time > 0 else 0.0
        print(
            f"summary: optimizer={args.optimizer} backend={backend} world_size={world} "
            f"device={device.type} steps={steps_done} final_loss={final_loss.item():.6f} "
            f"steps_per_s={rate:.1f} optimizer_step_share={share:.1f}%",
            flush=True,
        )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
