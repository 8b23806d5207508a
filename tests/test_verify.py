"""fused_optim.testing.compare_to_torch and the ``fused-optim verify`` command.

The checker must pass fused_optim's classes and fail optimizers that are slightly wrong: one that
nudges a param (caught by the tolerance) and one that silently skips a tensor (caught by the
moved check even where a loose tolerance would let it through). The command must print its
table, write JSON, exit 0/1 on pass/fail and 2 with a clear message for bad arguments.

This module is also imported as ``tests.test_verify`` by ``verify --candidate``, so it must not
import from ``cases`` (only on sys.path under pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_optim
from fused_optim.backends import BACKENDS, available_backends, select_backend
from fused_optim.cli import main
from fused_optim.testing import (
    CONFIGS,
    PARAM_NAMES,
    ParityReport,
    adapt_config,
    assert_matches_torch,
    compare_to_torch,
    config_label,
)

# What backend=None picks for CPU tensors here ("cpu" when the C++ extension is built).
AUTO_CPU = select_backend(None, torch.device("cpu")).NAME
ROOT = Path(__file__).resolve().parent.parent
NUDGED = "2.weight"
SKIPPED = "2.bias"


class BrokenAdamW(fused_optim.AdamW):
    """fused_optim.AdamW whose step then nudges one element of one param by 1e-6."""

    def step(self, closure=None):
        loss = super().step(closure)
        param = self.param_groups[0]["params"][PARAM_NAMES.index(NUDGED)]
        if param.grad is not None:
            with torch.no_grad():
                param.view(-1)[0] += 1e-6
        return loss


class SkippingAdamW(fused_optim.AdamW):
    """fused_optim.AdamW as if its kernel silently skipped one tensor: the state exists and
    ``step`` advances, but that param and its moments never change."""

    def step(self, closure=None):
        param = self.param_groups[0]["params"][PARAM_NAMES.index(SKIPPED)]
        before = param.detach().clone()
        loss = super().step(closure)
        with torch.no_grad():
            param.copy_(before)
            state = self.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].zero_()
        return loss


# compare_to_torch --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,config,dtype,backend",
    [
        ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True}, torch.float32, "triton"),
        ("Adam", {"lr": 0.01, "amsgrad": True}, torch.float64, "reference"),
        ("AdamW", {"capturable": True, "lr": torch.tensor(0.01)}, torch.bfloat16, "triton"),
        ("AdamW", {"lr": 0.01, "weight_decay": 0.1}, torch.float16, "reference"),
    ],
    ids=["SGD-fp32-triton", "Adam-fp64-reference", "AdamW-bf16-triton", "AdamW-fp16-reference"],
)
def test_compare_to_torch_passes_fused_optim(name, config, dtype, backend):
    report = compare_to_torch(name, adapt_config(name, config, dtype), dtype=dtype, backend=backend)
    assert isinstance(report, ParityReport)
    assert report.passed, report.summary()
    assert report.failures == [] and report.moved
    assert report.optimizer == f"fused_optim.{name}"
    assert report.reference == f"torch.optim.{name}(foreach=False)"
    assert report.backend == backend and report.dtype == dtype
    assert [s.iteration for s in report.steps] == list(range(7))
    assert [s.had_grads for s in report.steps] == [True, True, False, True, True, True, True]
    assert report.steps[3].frozen == ("0.weight", "0.bias") and report.steps[5].frozen == ()
    assert report.params_moved == dict.fromkeys(["0.weight", "0.bias", "2.weight", "2.bias"], True)
    assert report.max_abs == max(report.param_max_abs, report.state_max_abs)
    assert report.worst_ratio <= 1
    assert assert_matches_torch(name, adapt_config(name, config, dtype), dtype=dtype).passed
    json.dumps(report.to_dict())  # JSON-compatible


def test_compare_to_torch_accepts_class_factory_and_names():
    assert compare_to_torch(fused_optim.SGD, {"lr": 0.1}).reference.startswith("torch.optim.SGD")

    def factory(params, **config):
        return torch.optim.Adam(params, **config)

    with pytest.raises(ValueError, match="reference="):
        compare_to_torch(factory)
    report = compare_to_torch(factory, {"lr": 0.01}, reference="Adam", dtype="fp64")
    assert report.passed and report.max_abs == 0.0, report.summary()
    # A custom reference gets the config as is; its fp32 bound follows the class it builds.
    report = compare_to_torch("Adam", {"foreach": False}, reference=factory)
    assert report.passed and report.tolerance.atol == 3e-8, report.summary()
    with pytest.raises(ValueError, match="unknown optimizer 'Lion'"):
        compare_to_torch("Lion")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        compare_to_torch("SGD", dtype="fp8")


def test_broken_optimizer_fails_with_a_readable_message():
    report = compare_to_torch(BrokenAdamW, {"lr": 0.01})
    assert report.reference == "torch.optim.AdamW(foreach=False)"  # found from its bases
    assert not report.passed
    assert report.moved  # it fails on the values, not on the moved check
    assert report.param_max_abs >= 1e-6 * 0.5 > report.tolerance.atol
    assert any(f"{NUDGED}: max abs diff" in line for line in report.failures)
    assert report.steps[0].failures and report.steps[0].param_max_abs > report.tolerance.atol
    with pytest.raises(AssertionError) as raised:
        report.assert_ok()
    message = str(raised.value)
    assert "FAILED" in message and NUDGED in message and "iteration 0" in message
    assert "3e-08" in message  # the tolerance used
    with pytest.raises(AssertionError, match=NUDGED):
        report.raise_if_failed()
    with pytest.raises(AssertionError, match="FAILED"):
        assert_matches_torch(BrokenAdamW, {"lr": 0.01})


def test_skipped_tensor_fails_the_moved_check_even_within_tolerance():
    report = compare_to_torch(SkippingAdamW, {"lr": 0.01})
    assert not report.passed and not report.moved
    assert report.params_moved[SKIPPED] is False and report.reference_params_moved[SKIPPED]
    assert f"{SKIPPED} never moved, but torch.optim moved it" in report.failures
    # With small steps a skipped tensor stays close to the reference: under a tolerance loose
    # enough to accept every difference (atol=1, a test of the checker, not a parity bound),
    # the moved check alone still fails it.
    loose = compare_to_torch(SkippingAdamW, {"lr": 0.01}, atol=1.0)
    assert loose.max_abs <= 1.0 and all(not s.failures for s in loose.steps)
    assert loose.failures == [f"{SKIPPED} never moved, but torch.optim moved it"]
    assert not loose.passed
    with pytest.raises(AssertionError, match="never moved"):
        loose.assert_ok()


# The verify command ----------------------------------------------------------------------


def test_verify_quick_writes_json(tmp_path, capsys):
    path = tmp_path / "parity.json"
    assert main(["verify", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "optimizer" in out and "tolerance" in out and "PASS" in out and "FAIL" not in out
    backends = available_backends("cpu")  # triton (interpreted), cpu when built, reference
    total = 12 * len(backends)
    assert out.rstrip().splitlines()[-1].startswith(f"PASSED: all {total} cases")
    data = json.loads(path.read_text())
    assert data["passed"] is True and data["failed"] == 0 and data["total"] == total
    assert data["device"] == "cpu" and data["torch"] == torch.__version__
    cases = data["cases"]
    assert len(cases) == total
    assert {c["optimizer"] for c in cases} == {f"fused_optim.{n}" for n in ("SGD", "Adam", "AdamW")}
    assert {c["dtype"] for c in cases} == {"fp32", "bf16"}
    assert {c["backend"] for c in cases} == set(backends)
    for case in cases:
        assert case["passed"] is True and case["moved"] is True and case["failures"] == []
        assert isinstance(case["max_abs"], float) and isinstance(case["max_rel"], float)
        assert case["tolerance"]["kind"] in ("max_abs", "vs_torch_error")
        assert len(case["steps"]) == 7


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dtypes", "fp8"], "argument --dtypes: unknown dtype 'fp8'; choose from fp64, fp32"),
        (["--optimizers", "SGD,Lion"], "unknown optimizer 'Lion'; choose from SGD, Adam, AdamW"),
        (["--backends", "rocm"], f"unknown backend 'rocm'; choose from {', '.join(BACKENDS)}"),
        (["--candidate", "no_colon"], "expected MODULE:ATTR"),
        (["--reference", "AdamW"], "--reference needs --candidate"),
        (["--candidate", "no_such_module:X", "--reference", "SGD"], "cannot import"),
        (["--candidate", "torch.optim:Adagrad"], "--candidate needs --reference"),
        (["--device", "not_a_device"], "invalid device 'not_a_device'"),
        (["--clip", "-1"], "--clip: a max norm must be finite and not negative"),
    ],
)
def test_verify_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["verify", *argv])
    assert raised.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "usage: fused-optim verify" in captured.err and captured.out == ""


def test_verify_candidate_broken_exits_1(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = ["--candidate", "tests.test_verify:BrokenAdamW", "--reference", "AdamW"]
    assert main(["verify", *argv, "--quick", "--dtypes", "fp32", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("tests.test_verify:BrokenAdamW")]
    assert len(rows) == 2 and all(row.rstrip().endswith("FAIL") for row in rows)
    assert f"{NUDGED}: max abs diff" in out
    assert out.rstrip().splitlines()[-1].startswith("FAILED: 2 of 2 cases")


def test_verify_candidate_infers_reference_and_passes(capsys):
    argv = ["--candidate", "fused_optim:SGD", "--quick", "--dtypes", "fp64", "--backends", "triton"]
    assert main(["verify", *argv, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("fused_optim:SGD ") == 2 and "PASSED: all 2 cases" in out


def test_verify_sets_triton_interpret_on_cpu():
    """Without TRITON_INTERPRET, verify on the CPU sets it so that the Triton kernels run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = ["verify", "--quick", "--optimizers", "SGD", "--dtypes", "fp32", "--device", "cpu"]
    result = subprocess.run(
        [sys.executable, "-m", "fused_optim", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("fused_optim.SGD")]
    backends = ["triton", *(["cpu"] if AUTO_CPU == "cpu" else []), "reference"]
    assert [row.split("|")[3].strip() for row in rows] == backends * 2
    assert "TRITON_INTERPRET=1" in result.stdout.splitlines()[-1]


def test_example_ci_file_passes():
    example = ROOT / "examples" / "test_parity_in_your_ci.py"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def _torch_fused(name):
    def factory(params, **config):
        return getattr(torch.optim, name)(params, fused=True, **config)

    return factory


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
@pytest.mark.parametrize(
    "name,config",
    [(name, config) for name in CONFIGS for config in CONFIGS[name]],
    ids=[f"{name}[{config_label(config)}]" for name in CONFIGS for config in CONFIGS[name]],
)
def test_torch_fused_passes_the_checker(name, config, dtype):
    """A checker that fails torch's own fused=True on the machine it runs on is wrong: its
    fp32 bound must absorb torch's CPU rounding, and torch's own fused-vs-for-loop spread."""
    report = compare_to_torch(_torch_fused(name), config, reference=name, dtype=dtype)
    assert report.passed, report.summary()


def test_verify_with_clipping(tmp_path, capsys):
    """``fused-optim verify --clip``: every quick case with max_grad_norm against torch's
    clip_grad_norm_ + torch.optim, and the JSON says so."""
    path = tmp_path / "parity.json"
    argv = ["verify", "--quick", "--device", "cpu", "--backends", "reference", "--clip", "1.5"]
    assert main([*argv, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "max_grad_norm=1.5" in out and "FAIL" not in out
    data = json.loads(path.read_text())
    assert data["clip"] == 1.5 and data["passed"] is True and data["total"] == 12
    assert all(case["clip_norm_max_rel"] < 1e-2 for case in data["cases"])
