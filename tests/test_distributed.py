"""fused_optim under torch.distributed: DDP, ZeroRedundancyOptimizer, uneven inputs, resume,
FSDP2, and the fused gradient clipping under DDP and FSDP2.

Every test spawns 2 CPU processes that talk over gloo on 127.0.0.1 only. Each worker sets
TRITON_INTERPRET=1 first thing, before it imports fused_optim (and so triton), and writes what
it ends with to files under ``tmp_path``; the comparisons run in the parent. Joins have a
deadline, so a hang fails the test instead of blocking the run.

This module imports fused_optim only inside functions: a spawned worker imports this module to
find its target, and must get to set its environment before triton is imported.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

WORLD = 2
STEPS = 10
FULL_BATCH = 16  # each rank trains on half of it
IN_FEATURES, HIDDEN, OUT_FEATURES = 6, 16, 3
JOIN_TIMEOUT_S = 90

OPT_CONFIGS = {
    "SGD": {"lr": 0.05, "momentum": 0.9},
    "Adam": {"lr": 0.01},
    "AdamW": {"lr": 0.01, "weight_decay": 0.1},
}

# (gradient_as_bucket_view, zero_grad's set_to_none). With bucket views and set_to_none=False the
# gradients stay the same views of DDP's buckets for the whole run.
VARIANTS = [(True, True), (False, True), (True, False)]

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# Shared by the workers and the parent.


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT_FEATURES))


def full_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch of one step; the same on every process."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(FULL_BATCH, IN_FEATURES, generator=g)
    y = torch.randn(FULL_BATCH, OUT_FEATURES, generator=g)
    return x, y


def rank_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = full_batch(step)
    n = FULL_BATCH // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # A mean over the batch: the DDP average of the two half-batch gradients is the
    # full-batch gradient.
    return nn.functional.mse_loss(out, y)


def train(model, opt, steps, batch, start=0, sched=None, set_to_none=True) -> None:
    for step in range(start, start + steps):
        x, y = batch(step)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        if sched is not None:
            sched.step()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def state_of(opt) -> dict:
    """Every optimizer state tensor, keyed by (param index, state key)."""
    return {
        (index, key): value.detach().clone()
        for index, entry in opt.state_dict()["state"].items()
        for key, value in entry.items()
        if isinstance(value, torch.Tensor)
    }


# ----------------------------------------------------------------------------------------------
# Workers.


def _entry(rank: int, world: int, port: int, outdir: str, job: str, kwargs: dict) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's own sockets on the loopback too
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        globals()[job](rank, world, Path(outdir))
    except BaseException:
        Path(outdir, f"error_rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # A finished job skips interpreter finalization: gloo's worker threads can still abort it
    # (SIGABRT, "terminate called without an active exception"; a known torch teardown race,
    # seen once in CI after a job had written its results).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _job_ddp_parity(rank: int, world: int, out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fused_optim

    results = {}
    for name, config in OPT_CONFIGS.items():
        for bucket_view, set_to_none in VARIANTS:
            model = DDP(make_model(), gradient_as_bucket_view=bucket_view)
            opt = getattr(fused_optim, name)(model.parameters(), **config)
            batch = lambda s: rank_batch(s, rank, world)  # noqa: E731
            train(model, opt, STEPS, batch, set_to_none=set_to_none)
            results[(name, bucket_view, set_to_none)] = {
                "params": params_of(model),
                "state": state_of(opt),
                "backends": opt.group_backends(),
            }
    torch.save(results, out / f"parity_rank{rank}.pt")


def _job_zero(rank: int, world: int, out: Path) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fused_optim

    model = DDP(make_model())
    opt = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=fused_optim.AdamW, **OPT_CONFIGS["AdamW"]
    )
    train(model, opt, STEPS, lambda s: rank_batch(s, rank, world))
    opt.consolidate_state_dict(to=0)
    result = {
        "params": params_of(model),
        "local_class": type(opt.optim).__name__,
        "local_module": type(opt.optim).__module__,
        "backends": opt.optim.group_backends(),
        "local_params": sum(len(g["params"]) for g in opt.optim.param_groups),
    }
    if rank == 0:
        result["state_dict"] = opt.state_dict()
    torch.save(result, out / f"zero_rank{rank}.pt")


def _job_join(rank: int, world: int, out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fused_optim

    batches = 3 if rank == 0 else 5
    result = {}
    for cls in (fused_optim.Adam, torch.optim.Adam):
        model = DDP(make_model())
        opt = cls(model.parameters(), lr=0.01)
        with model.join():
            train(model, opt, batches, lambda s: rank_batch(s, rank, world))
        result[cls.__module__] = params_of(model)
    torch.save(result, out / f"join_rank{rank}.pt")


CKPT_TOTAL, CKPT_AT = 8, 4


def _checkpoint_setup():
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fused_optim

    module = make_model()
    model = DDP(module)
    opt = fused_optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=CKPT_TOTAL)
    # growth_interval=2: the scale changes during the run, so its state matters on resume.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return module, model, opt, sched, scaler


def train_scaled(model, opt, sched, scaler, steps, batch, start=0) -> None:
    for step in range(start, start + steps):
        x, y = batch(step)
        scaler.scale(loss_fn(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()


def _checkpoint_result(model, opt, sched, scaler) -> dict:
    return {
        "params": params_of(model),
        "state": state_of(opt),
        "lr": sched.get_last_lr(),
        "scale": scaler.get_scale(),
    }


def _job_checkpoint_first(rank: int, world: int, out: Path) -> None:
    import torch.distributed as dist

    def batch(s):
        return rank_batch(s, rank, world)

    # The uninterrupted run.
    _, model, opt, sched, scaler = _checkpoint_setup()
    train_scaled(model, opt, sched, scaler, CKPT_TOTAL, batch)
    torch.save(_checkpoint_result(model, opt, sched, scaler), out / f"uninterrupted_rank{rank}.pt")
    # The run that stops after CKPT_AT steps and saves a checkpoint.
    module, model, opt, sched, scaler = _checkpoint_setup()
    train_scaled(model, opt, sched, scaler, CKPT_AT, batch)
    if rank == 0:
        checkpoint = {
            "model": module.state_dict(),
            "optim": opt.state_dict(),
            "sched": sched.state_dict(),
            "scaler": scaler.state_dict(),
        }
        torch.save(checkpoint, out / "checkpoint.pt")
    dist.barrier()


def _job_checkpoint_resume(rank: int, world: int, out: Path) -> None:
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    module, model, opt, sched, scaler = _checkpoint_setup()
    module.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optim"])
    sched.load_state_dict(checkpoint["sched"])
    scaler.load_state_dict(checkpoint["scaler"])
    batch = lambda s: rank_batch(s, rank, world)  # noqa: E731
    train_scaled(model, opt, sched, scaler, CKPT_TOTAL - CKPT_AT, batch, start=CKPT_AT)
    torch.save(_checkpoint_result(model, opt, sched, scaler), out / f"resumed_rank{rank}.pt")


# ----------------------------------------------------------------------------------------------
# Parent side.


FSDP_CONFIGS = {"AdamW": {"lr": 1e-2, "weight_decay": 0.1}, "SGD": {"lr": 0.05, "momentum": 0.9}}


def _full(value):
    """A DTensor's full value (every rank gets it); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value.detach().clone()


def _job_fsdp2(rank: int, world: int, out: Path) -> None:
    """FSDP2 (fully_shard, DTensor params) with fused_optim and with torch.optim's for-loop
    under the same sharding; then DTensors sharded so that one rank's local shard is empty."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    import fused_optim

    results: dict = {}
    for name, config in FSDP_CONFIGS.items():
        for impl in ("fused_optim", "torch"):
            model = make_model()
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
            if impl == "fused_optim":
                opt = getattr(fused_optim, name)(model.parameters(), **config)
            else:
                opt = getattr(torch.optim, name)(model.parameters(), **config, foreach=False)
            train(model, opt, 5, lambda step: rank_batch(step, rank, world))
            assert all(isinstance(p, DTensor) for p in model.parameters())
            results[(name, impl)] = dict(
                params=[_full(p) for p in model.parameters()],
                state={
                    (i, key): _full(value)
                    for i, p in enumerate(model.parameters())
                    for key, value in opt.state[p].items()
                },
                backends=getattr(opt, "group_backends", lambda: None)(),
            )
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(7)
    full_values = [torch.randn(1, 5, generator=gen), torch.randn(9, 3, generator=gen)]
    full_grads = [[torch.randn(t.shape, generator=gen) for t in full_values] for _ in range(3)]
    for impl in ("fused_optim", "torch"):
        params = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full_values]
        if impl == "fused_optim":
            opt = fused_optim.AdamW(params, lr=0.1)
        else:
            opt = torch.optim.AdamW(params, lr=0.1, foreach=False)
        for grads in full_grads:
            for p, g in zip(params, grads):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
            opt.step()
        results[("empty_shard", impl)] = dict(
            local_sizes=[p.to_local().numel() for p in params],
            params=[_full(p) for p in params],
        )
    torch.save(results, out / f"fsdp_rank{rank}.pt")


CLIP_MAX_NORM = 0.05


def _job_clip(rank: int, world: int, out: Path) -> None:
    """``max_grad_norm`` under DDP (the averaged gradients' norm, reduced nothing more) and
    under FSDP2 (the norm of the whole sharded gradients), against torch's ``clip_grad_norm_``
    + torch.optim.AdamW under the same wrapping; each step's norm recorded."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fused_optim

    results: dict = {}
    config = OPT_CONFIGS["AdamW"]
    for wrap in ("ddp", "fsdp2"):
        for impl in ("fused_optim", "torch"):
            model = make_model()
            if wrap == "ddp":
                model = DDP(model)
            else:
                for layer in model:
                    if isinstance(layer, nn.Linear):
                        fully_shard(layer)
                fully_shard(model)
            if impl == "fused_optim":
                opt = fused_optim.AdamW(model.parameters(), max_grad_norm=CLIP_MAX_NORM, **config)
            else:
                opt = torch.optim.AdamW(model.parameters(), foreach=False, **config)
            norms = []
            for step in range(STEPS):
                x, y = rank_batch(step, rank, world)
                loss_fn(model(x), y).backward()
                if impl == "torch":
                    norms.append(
                        _full(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_MAX_NORM))
                    )
                opt.step()
                if impl == "fused_optim":
                    norms.append(_full(opt.last_grad_norm))
                opt.zero_grad()
            results[(wrap, impl)] = dict(params=[_full(p) for p in model.parameters()], norms=norms)
    torch.save(results, out / f"clip_rank{rank}.pt")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(job: str, outdir: Path, timeout: float = JOIN_TIMEOUT_S) -> None:
    """Run ``job`` on WORLD processes; fail (never block) if one hangs or fails."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(rank, WORLD, port, str(outdir), job, {}))
        for rank in range(WORLD)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    errors = "".join(
        f"--- rank {rank} ---\n{path.read_text()}"
        for rank in range(WORLD)
        if (path := outdir / f"error_rank{rank}.txt").exists()
    )
    assert not hung, f"{job}: ranks {hung} still running after {timeout}s\n{errors}"
    codes = [proc.exitcode for proc in procs]
    assert codes == [0] * WORLD, f"{job}: exit codes {codes}\n{errors}"


def load(path: Path):
    return torch.load(path, weights_only=False)


def reference_run(name: str, steps: int = STEPS):
    """Single process, the full batch, torch.optim's for-loop implementation."""
    model = make_model()
    opt = getattr(torch.optim, name)(model.parameters(), foreach=False, **OPT_CONFIGS[name])
    train(model, opt, steps, full_batch)
    return model, opt


def assert_states_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key[1] == "step":
            assert torch.equal(actual[key], value), key
        else:
            torch.testing.assert_close(actual[key], value, msg=lambda m, k=key: f"{k}: {m}")


def assert_ranks_equal(per_rank: list, what: str) -> None:
    first = per_rank[0]
    for other in per_rank[1:]:
        if isinstance(first, dict):
            assert first.keys() == other.keys(), what
            items = [(k, first[k], other[k]) for k in first]
        else:
            assert len(first) == len(other), what
            items = list(zip(range(len(first)), first, other))
        for key, a, b in items:
            assert torch.equal(a, b), f"{what}[{key}] differs between ranks"


def assert_moved(params: list[torch.Tensor]) -> None:
    initial = list(make_model().parameters())
    for p, p0 in zip(params, initial):
        assert not torch.equal(p, p0.detach()), "a parameter did not move"


def auto_backend() -> str:
    """What backend=None picks for CPU tensors (in the ranks too): the fused C++ "cpu" backend
    when it is built, else Triton in its interpreter. Imported here, not at the top: the ranks
    import this module before they may import triton."""
    from fused_optim.backends import select_backend

    return select_backend(None, torch.device("cpu")).NAME


@pytest.fixture(scope="module")
def parity_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_parity")
    spawn("_job_ddp_parity", out)
    return [load(out / f"parity_rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=["bucket_view", "no_bucket_view", "bucket_view-keep_grads"]
)
@pytest.mark.parametrize("name", list(OPT_CONFIGS))
def test_ddp_matches_full_batch_torch_optim(parity_results, name, variant):
    ranks = [results[(name, *variant)] for results in parity_results]
    assert ranks[0]["backends"] == [auto_backend()]
    ref_model, ref_opt = reference_run(name)
    assert_moved(ranks[0]["params"])
    for p, ref in zip(ranks[0]["params"], ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, ref.detach())
    assert_states_close(ranks[0]["state"], state_of(ref_opt))
    assert_ranks_equal([r["params"] for r in ranks], "params")
    assert_ranks_equal([r["state"] for r in ranks], "optimizer state")


def test_zero_redundancy_optimizer_with_fused_adamw(tmp_path):
    import fused_optim

    spawn("_job_zero", tmp_path)
    ranks = [load(tmp_path / f"zero_rank{rank}.pt") for rank in range(WORLD)]
    for r in ranks:
        assert (r["local_module"], r["local_class"]) == ("fused_optim.optim.adam", "AdamW")
        assert r["backends"] == [auto_backend()]
        assert r["local_params"] > 0  # each rank updates a shard
    assert sum(r["local_params"] for r in ranks) == len(list(make_model().parameters()))
    assert_ranks_equal([r["params"] for r in ranks], "params")
    assert_moved(ranks[0]["params"])

    ref_model, ref_opt = reference_run("AdamW")
    for p, ref in zip(ranks[0]["params"], ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, ref.detach())
    state_dict = ranks[0]["state_dict"]
    zero_state = {
        (index, key): value
        for index, entry in state_dict["state"].items()
        for key, value in entry.items()
    }
    assert_states_close(zero_state, state_of(ref_opt))

    # The consolidated state dict loads into both optimizers; both continue alike.
    continued = {}
    for cls in (fused_optim.AdamW, torch.optim.AdamW):
        model = make_model()
        with torch.no_grad():
            for p, saved in zip(model.parameters(), ranks[0]["params"], strict=True):
                p.copy_(saved)
        kwargs = {"foreach": False} if cls is torch.optim.AdamW else {}
        opt = cls(model.parameters(), **OPT_CONFIGS["AdamW"], **kwargs)
        # A copy each: load_state_dict keeps the given state tensors, as torch.optim does.
        opt.load_state_dict(copy.deepcopy(state_dict))
        train(model, opt, 2, full_batch, start=STEPS)
        continued[cls] = (params_of(model), state_of(opt))
    train(ref_model, ref_opt, 2, full_batch, start=STEPS)
    for cls, (params, state) in continued.items():
        for p, ref, before in zip(params, ref_model.parameters(), ranks[0]["params"]):
            torch.testing.assert_close(p, ref.detach(), msg=lambda m, c=cls: f"{c}: {m}")
            assert not torch.equal(p, before)
        assert_states_close(state, state_of(ref_opt))


def test_ddp_join_uneven_inputs(tmp_path):
    spawn("_job_join", tmp_path)
    ranks = [load(tmp_path / f"join_rank{rank}.pt") for rank in range(WORLD)]
    fused = [r["fused_optim.optim.adam"] for r in ranks]
    assert_ranks_equal(fused, "params after join")
    assert_ranks_equal([r["torch.optim.adam"] for r in ranks], "torch.optim params after join")
    assert_moved(fused[0])
    for p, ref in zip(fused[0], ranks[0]["torch.optim.adam"], strict=True):
        torch.testing.assert_close(p, ref)


def test_checkpoint_resume_in_fresh_processes_is_bitwise(tmp_path):
    spawn("_job_checkpoint_first", tmp_path)
    assert (tmp_path / "checkpoint.pt").exists()
    spawn("_job_checkpoint_resume", tmp_path)
    for rank in range(WORLD):
        full = load(tmp_path / f"uninterrupted_rank{rank}.pt")
        resumed = load(tmp_path / f"resumed_rank{rank}.pt")
        assert full["lr"] == resumed["lr"]
        assert full["scale"] == resumed["scale"] != 2.0**10  # the scaler state came along
        assert_ranks_equal([full["params"], resumed["params"]], f"rank {rank} params")
        assert_ranks_equal([full["state"], resumed["state"]], f"rank {rank} optimizer state")
    assert_moved(full["params"])
    first = load(tmp_path / "uninterrupted_rank0.pt")
    assert_ranks_equal([first["params"], full["params"]], "params")


SUMMARY = re.compile(
    r"^summary: .*final_loss=(?P<loss>\S+) steps_per_s=(?P<rate>\S+) "
    r"optimizer_step_share=(?P<share>\S+)%$"
)


def run_example(tmp_path: Path, *args: str) -> re.Match:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, str(REPO / "examples" / "train_ddp.py"), *args]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, last
    assert f"optimizer=fused_optim.AdamW backend={auto_backend()} world_size=1 " in last
    return match


def test_example_train_ddp_single_process(tmp_path):
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    match = run_example(tmp_path, "--steps", "6", "--checkpoint", str(full))
    assert float(match["loss"]) > 0 and float(match["rate"]) > 0
    assert 0 < float(match["share"]) < 100
    assert "steps=6 " in match[0]
    # Stop after 3 steps, then resume in a fresh process: it ends as the uninterrupted run.
    run_example(tmp_path, "--steps", "6", "--stop-after", "3", "--checkpoint", str(part))
    assert torch.load(part, weights_only=True)["step"] == 3
    resumed = run_example(tmp_path, "--steps", "6", "--checkpoint", str(part), "--resume")
    assert "steps=3 " in resumed[0]
    assert resumed["loss"] == match["loss"]
    full_ckpt = torch.load(full, weights_only=True)
    resumed_ckpt = torch.load(part, weights_only=True)
    assert full_ckpt["step"] == resumed_ckpt["step"] == 6
    for key, value in full_ckpt["model"].items():
        assert torch.equal(value, resumed_ckpt["model"][key]), key
    for index, entry in full_ckpt["optim"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, resumed_ckpt["optim"]["state"][index][key]), (index, key)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    spawn("_job_fsdp2", out)
    return [load(out / f"fsdp_rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("name", list(FSDP_CONFIGS))
def test_fsdp2_matches_torch_optim_under_the_same_sharding(fsdp_results, name):
    for rank_results in fsdp_results:
        ours, theirs = rank_results[(name, "fused_optim")], rank_results[(name, "torch")]
        assert ours["backends"] == [auto_backend()]
        for a, b in zip(ours["params"], theirs["params"]):
            torch.testing.assert_close(a, b)
        assert ours["state"].keys() == theirs["state"].keys()
        for key, value in theirs["state"].items():
            torch.testing.assert_close(ours["state"][key], value, msg=lambda m, k=key: f"{k}: {m}")
        assert_moved_from_start(ours["params"])
    for a, b in zip(fsdp_results[0][(name, "fused_optim")]["params"],
                    fsdp_results[1][(name, "fused_optim")]["params"]):  # fmt: skip
        assert torch.equal(a, b)


def test_dtensor_with_an_empty_local_shard(fsdp_results):
    # A (1, 5) tensor sharded over 2 ranks: one rank holds an empty local shard.
    sizes = [r[("empty_shard", "fused_optim")]["local_sizes"][0] for r in fsdp_results]
    assert sorted(sizes) == [0, 5]
    for rank_results in fsdp_results:
        ours = rank_results[("empty_shard", "fused_optim")]["params"]
        theirs = rank_results[("empty_shard", "torch")]["params"]
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
            assert not torch.equal(a, torch.zeros_like(a))
    gen = torch.Generator().manual_seed(7)
    start = [torch.randn(1, 5, generator=gen), torch.randn(9, 3, generator=gen)]
    for p, p0 in zip(fsdp_results[0][("empty_shard", "fused_optim")]["params"], start):
        assert not torch.equal(p, p0), "a sharded param never moved"


def assert_moved_from_start(params: list[torch.Tensor]) -> None:
    initial = [p.detach() for p in make_model().parameters()]
    for p, p0 in zip(params, initial):
        assert not torch.equal(p, p0), "a param never moved"


@pytest.fixture(scope="module")
def clip_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    spawn("_job_clip", out)
    return [load(out / f"clip_rank{rank}.pt") for rank in range(WORLD)]


def _clipped_reference() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Single process, the full batch: torch's clip_grad_norm_ + torch.optim.AdamW."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), foreach=False, **OPT_CONFIGS["AdamW"])
    norms = []
    for step in range(STEPS):
        x, y = full_batch(step)
        loss_fn(model(x), y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_MAX_NORM))
        opt.step()
        opt.zero_grad()
    return params_of(model), norms


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_fused_clipping_matches_single_process_clip_grad_norm(clip_results, wrap):
    """DDP: the averaged gradients' local norm is the global one (nothing is reduced twice);
    FSDP2: the norm covers every shard (not one rank's local shards, which would be about
    1/sqrt(2) of it). Both match the single-process full-batch run and torch's own clip under
    the same wrapping, on every rank."""
    ref_params, ref_norms = _clipped_reference()
    assert sum(bool(n > CLIP_MAX_NORM) for n in ref_norms) >= STEPS // 2  # it does clip
    for results in clip_results:
        ours, theirs = results[(wrap, "fused_optim")], results[(wrap, "torch")]
        for mine, torch_wrapped, single in zip(ours["norms"], theirs["norms"], ref_norms):
            torch.testing.assert_close(mine, single, rtol=1e-5, atol=0)
            torch.testing.assert_close(mine, torch_wrapped, rtol=1e-5, atol=0)
        for mine, single in zip(ours["params"], ref_params, strict=True):
            torch.testing.assert_close(mine, single)
        assert_moved(ours["params"])
    assert_ranks_equal([r[(wrap, "fused_optim")]["params"] for r in clip_results], "params")
