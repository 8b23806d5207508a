"""``fused-optim bench``: the command end to end at a tiny scale, its argument errors, its
correctness check, and the bytes model. Timings are never asserted: only that they exist."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fused_optim import bench, cli
from fused_optim.backends import BACKENDS, available_backends, reference

from cases import AUTO_CPU

TINY = ["--device", "cpu", "--scale", "1e-4", "--repeats", "2", "--warmup", "0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fixed_bandwidth(monkeypatch):
    """Skip the copy-bandwidth measurement where a test does not look at it."""
    monkeypatch.setattr(bench, "measure_copy_bandwidth", lambda device=None, **kw: 10.0)


def test_quick_run_writes_table_json_and_plot(tmp_path, capsys):
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--quick", *TINY, "--workloads", "flat,gpt2-small"]
    argv += ["--optimizers", "sgd", "adamw", "--dtypes", "fp32,bf16"]
    argv += ["--json", str(report_path), "--plot", str(plot_path)]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "| optimizer | implementation" in out and "copy bandwidth" in out
    assert "step" in err  # the progress bar

    report = json.loads(report_path.read_text())
    machine = report["machine"]
    for key in ("device", "device_name", "torch", "triton", "date"):
        assert machine[key], key
    assert machine["torch"] == torch.__version__
    bandwidth = report["copy_bandwidth_GBps"]
    assert bandwidth > 0
    assert report["exit_code"] == 0 and report["settings"]["quick"] is True

    rows = report["rows"]
    # --quick skips torch.compile; on a CPU, Triton's interpreter is not timed by default.
    implementations = {"fused_optim (reference)", "torch for-loop", "torch foreach", "torch fused"}
    if AUTO_CPU == "cpu":
        implementations.add("fused_optim (cpu)")
    assert {row["implementation"] for row in rows} == implementations
    assert len(rows) == 2 * 2 * 2 * len(implementations)
    columns = ["optimizer", "implementation", "dtype", "tensors", "params", "time_ms", "GBps"]
    columns += ["pct_copy_bandwidth", "speedup_vs_torch_fused", "workload", "check"]
    for row in rows:
        assert all(key in row for key in columns), row
        assert row["time_ms"] > 0 and len(row["times_ms"]) == 2 and not row["skipped"]
        assert row["bytes_per_step"] == bench.bytes_per_step(
            row["optimizer"], row["params"], row["dtype"]
        )
        assert math.isclose(row["GBps"], row["bytes_per_step"] / row["time_ms"] / 1e6)
        assert math.isclose(row["pct_copy_bandwidth"], 100 * row["GBps"] / bandwidth)
        assert row["speedup_vs_torch_fused"] > 0
        assert row["check"] == ("ok" if row["impl"] == "fused_optim" else None)
        assert row["failed"] is False
        if row["implementation"] == "torch fused":
            assert row["speedup_vs_torch_fused"] == 1
    gpt2 = [row for row in rows if row["workload"] == "gpt2-small"]
    assert {row["tensors"] for row in gpt2} == {148}
    assert plot_path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "args,message",
    [
        (["--workloads", "gpt3"], "unknown workload 'gpt3' (choose from flat, gpt2-small"),
        (["--optimizers", "adam,rmsprop"], "unknown optimizer 'rmsprop' (choose from sgd"),
        (["--dtypes", "int8"], "unknown dtype 'int8' (choose from fp32, bf16"),
        (["--impls", "apex"], "unknown implementation 'apex' (choose from fused_optim"),
        (["--backends", "rocm"], f"unknown backend 'rocm' (choose from {', '.join(BACKENDS)})"),
        (["--scale", "0"], "scale must be a positive number, got '0'"),
        (["--scale=-0.5"], "scale must be a positive number, got '-0.5'"),
        (["--size", "tiny"], "invalid scale 'tiny'"),
        (["--repeats", "0"], "expected a positive integer, got '0'"),
        (["--device", "nonsense"], "invalid device 'nonsense'"),
        (["--compile", "--no-compile"], "not allowed with argument"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["bench", *args])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "fused-optim bench: error:" in err
    assert message in err


def test_explicit_triton_backend_where_it_cannot_run_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["bench", "--quick", "--device", "cpu", "--backends", "triton"])
    assert excinfo.value.code == 2
    assert "backend='triton' is unavailable" in capsys.readouterr().err


def test_triton_interpreter_is_timed_only_when_asked_for():
    # tests/conftest.py sets TRITON_INTERPRET=1: Triton can run on the CPU, interpreted.
    assert "triton" in available_backends("cpu")
    cpu_backends = ["cpu", "reference"] if AUTO_CPU == "cpu" else ["reference"]
    assert bench.default_backends(torch.device("cpu")) == cpu_backends
    rows = bench.run_bench(
        device="cpu",
        workloads=["flat"],
        optimizers=["sgd"],
        dtypes=["fp32"],
        impls=["fused_optim", "forloop"],
        backends=["triton"],
        scale=1e-5,
        repeats=1,
        warmup=0,
        copy_bandwidth=10.0,
        progress=False,
    )
    assert [row["implementation"] for row in rows] == ["fused_optim (triton)", "torch for-loop"]
    assert rows[0]["check"] == "ok" and rows[0]["time_ms"] > 0


def test_a_wrong_step_is_flagged_and_exits_1(monkeypatch, tmp_path, capsys, fixed_bandwidth):
    original = reference.sgd

    def perturbed(work, *args, **kwargs):
        created = original(work, *args, **kwargs)
        for p in work.params:
            p.add_(1e-3)
        return created

    monkeypatch.setattr(reference, "sgd", perturbed)
    report_path = tmp_path / "bench.json"
    argv = ["bench", "--quick", *TINY, "--workloads", "flat", "--optimizers", "sgd,adam"]
    argv += ["--dtypes", "fp32", "--no-progress", "--json", str(report_path)]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "FAILED: fused_optim (reference) SGD fp32 flat" in out
    report = json.loads(report_path.read_text())
    assert report["exit_code"] == 1
    ours = {row["optimizer"]: row for row in report["rows"] if row["impl"] == "fused_optim"}
    assert ours["SGD"]["check"] == "MISMATCH" and ours["SGD"]["failed"] is True
    assert ours["SGD"]["max_abs_diff_vs_forloop"] == pytest.approx(1e-3, rel=0.01)
    assert ours["Adam"]["check"] == "ok" and ours["Adam"]["failed"] is False
    assert not any(row["failed"] for row in report["rows"] if row["impl"] != "fused_optim")


def test_a_compile_failure_is_a_skipped_row(monkeypatch):
    def failing_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", failing_compile)
    rows = bench.run_bench(
        device="cpu",
        workloads=["flat", "gpt2-small"],
        optimizers=["adamw"],
        dtypes=["fp32"],
        impls=["fused", "compile"],
        scale=1e-4,
        repeats=1,
        warmup=0,
        compile_max_tensors=100,
        copy_bandwidth=10.0,
        progress=False,
    )
    compiled = {row["workload"]: row for row in rows if row["impl"] == "compile"}
    assert compiled["flat"]["skipped"] == "compile failed: RuntimeError: no C++ compiler here"
    assert "148 tensors > --compile-max-tensors 100" in compiled["gpt2-small"]["skipped"]
    for row in compiled.values():
        assert row["time_ms"] is None and row["failed"] is False
    assert all(row["time_ms"] > 0 for row in rows if row["impl"] == "fused")
    assert "skipped: compile failed" in bench.format_table(rows)


@pytest.mark.parametrize(
    "optimizer,dtype,kwargs,per_param",
    [
        ("sgd", torch.float32, {}, 20),  # p, g, buf read; p, buf written
        ("SGD", "bf16", {}, 10),
        ("sgd", torch.float32, {"momentum": False}, 12),  # p, g read; p written
        ("adam", torch.float32, {}, 28),  # p, g, m, v read; p, m, v written
        ("adamw", torch.float32, {}, 28),
        ("Adam", torch.bfloat16, {}, 14),
        ("adamw", "bf16", {}, 14),
        ("adam", torch.float32, {"amsgrad": True}, 36),
        ("adamw", torch.float64, {}, 56),
    ],
)
def test_bytes_per_step_follows_the_design_model(optimizer, dtype, kwargs, per_param):
    assert bench.bytes_per_step(optimizer, 1000, dtype, **kwargs) == 1000 * per_param


def test_workloads():
    gpt2 = bench.WORKLOADS["gpt2-small"]
    assert gpt2.tensors == 148 and gpt2.numel == 124_439_808
    assert bench.WORKLOADS["flat"].shapes == ((64 << 20,),)
    assert bench.WORKLOADS["many-small"].shapes == ((4096,),) * 2000
    for workload in bench.WORKLOADS.values():
        assert workload.scaled(1) == list(workload.shapes)
        shapes = workload.scaled(1 / 64)
        assert len(shapes) == workload.tensors
        numel = sum(math.prod(s) for s in shapes)
        assert abs(numel - workload.numel / 64) <= workload.tensors


def test_clip_workload_checks_against_torch_s_clip_and_counts_the_norm_read(fixed_bandwidth):
    """``fused-optim bench --clip``: fused_optim's clip_grad_norm_ + step is checked against
    torch's clip_grad_norm_ + torch.optim's for-loop (a clip that did nothing would mismatch:
    the norm here is far above 1e-3), and the roofline counts one more gradient read."""
    rows = bench.run_bench(
        device="cpu",
        workloads=["flat"],
        optimizers=["adamw", "sgd"],
        dtypes=["fp32"],
        impls=["fused_optim", "forloop", "fused"],
        backends=["reference"],
        scale=1e-5,
        repeats=1,
        warmup=0,
        copy_bandwidth=10.0,
        progress=False,
        clip=1e-3,
    )
    ours = [row for row in rows if row["impl"] == "fused_optim"]
    assert len(ours) == 2 and all(row["check"] == "ok" for row in ours)
    for row in rows:
        unclipped = bench.bytes_per_step(row["optimizer"], row["params"], torch.float32)
        assert row["bytes_per_step"] == unclipped + 4 * row["params"]
        assert row["clip_max_norm"] == 1e-3
