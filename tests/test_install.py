"""How the package installs: a plain ``pip install .`` builds the C++ CPU backend; with both
compiled extensions skipped it installs as pure Python and still works.

Each install is non-editable and goes into a temporary directory; a child process that imports
fused_optim from there (not from the checkout) checks what it got, and runs a share of the CPU
test suite against the pure-Python one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECKS = """
import torch
import fused_optim
from fused_optim.backends import BackendUnavailableError, available_backends

assert fused_optim.__file__.startswith(SITE), fused_optim.__file__
assert "cpu" not in available_backends("cpu"), available_backends("cpu")
assert "cuda" not in available_backends("cpu")
p = torch.nn.Parameter(torch.randn(10))
p.grad = torch.randn(10)
for name in ("cpu", "cuda"):
    opt = fused_optim.AdamW([p], backend=name)
    try:
        opt.step()
    except BackendUnavailableError as error:
        assert "_C_" in str(error), str(error)  # names the extension and its import error
    else:
        raise AssertionError(f"backend={name!r} ran without its extension")
opt = fused_optim.AdamW([p])
before = p.detach().clone()
opt.step()
assert not torch.equal(before, p.detach())
print("auto backend:", opt.group_backends())
"""


SITECUSTOMIZE = """
import sys

sys.meta_path[:] = [
    finder for finder in sys.meta_path
    if not getattr(finder, "__module__", "").startswith("__editable__")
]
"""


def _pip_install(site: Path, env: dict, isolated: bool = False) -> subprocess.CompletedProcess:
    """A non-editable install of this checkout into ``site``; ``isolated`` keeps pip's build
    isolation, as a plain ``pip install .`` does."""
    isolation = [] if isolated else ["--no-build-isolation"]
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation]
    return subprocess.run(
        [*command, "--target", str(site), str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _in_child(site: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python *args`` importing fused_optim from the install in ``site``."""
    return subprocess.run(
        [sys.executable, *args],
        env=_child_env(site),
        cwd=site,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _without_required_build(env: dict) -> dict:
    """CI requires the C++ build (FUSED_OPTIM_REQUIRE_CPU_BUILD=1); a pure-Python install
    is what a developer without a compiler gets, so it runs without that requirement."""
    env = dict(env)
    env.pop("FUSED_OPTIM_REQUIRE_CPU_BUILD", None)
    return env


def test_required_cpu_build_fails_the_install_instead_of_warning(tmp_path):
    env = dict(os.environ, FUSED_OPTIM_SKIP_CUDA_BUILD="1", FUSED_OPTIM_REQUIRE_CPU_BUILD="1")
    env["FUSED_OPTIM_SKIP_CPU_BUILD"] = "1"  # the cheapest way for the build to be missing
    done = _pip_install(tmp_path / "site", env)
    assert done.returncode != 0
    assert "FUSED_OPTIM_SKIP_CPU_BUILD and FUSED_OPTIM_REQUIRE_CPU_BUILD exclude each other" in (
        done.stdout + done.stderr
    )


@pytest.fixture(scope="module")
def pure_install(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("pure-python-install")
    env = dict(os.environ, FUSED_OPTIM_SKIP_CPU_BUILD="1", FUSED_OPTIM_SKIP_CUDA_BUILD="1")
    done = _pip_install(site, _without_required_build(env))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not list((site / "fused_optim").glob("_C_*")), "an extension was built anyway"
    # An editable install of the checkout (the usual dev setup) maps fused_optim._C_* to the
    # checkout's builds through a finder of its own; children drop it at startup.
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return site


def _child_env(site: Path) -> dict:
    env = _without_required_build(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_pure_python_install_falls_back_and_explains(pure_install):
    done = _in_child(pure_install, "-c", f"SITE = {str(pure_install)!r}\n" + CHECKS)
    assert done.returncode == 0, done.stderr[-3000:]
    # Auto falls back to Triton (interpreted: this process set TRITON_INTERPRET=1) or the
    # reference, never to the missing extension.
    assert any(f"auto backend: [{name!r}]" in done.stdout for name in ("triton", "reference"))


def test_pure_python_install_passes_cpu_tests(pure_install):
    """A share of the suite (API, errors, state_dict, AMP, parity of the CPU backends) against
    the pure-Python install, with the Triton interpreter as in every test process."""
    files = [str(ROOT / "tests" / name) for name in ("test_api.py", "test_errors.py")]
    files += [str(ROOT / "tests" / name) for name in ("test_state_dict.py", "test_amp.py")]
    where = _in_child(pure_install, "-c", "import fused_optim; print(fused_optim.__file__)")
    assert where.stdout.startswith(str(pure_install)), where.stdout + where.stderr
    pytest_args = ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files)
    done = _in_child(pure_install, *pytest_args, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout


BUILT_CHECKS = """
import warnings

import torch

warnings.simplefilter("error")  # the slow-default warning would mean the build is missing
import fused_optim
from fused_optim.backends import available_backends, cpu

assert fused_optim.__file__.startswith(SITE), fused_optim.__file__
assert cpu._C_cpu.__file__.startswith(SITE), cpu._C_cpu.__file__
model = torch.nn.Linear(32, 8)
opt = fused_optim.AdamW(model.parameters(), lr=1e-3)
model(torch.randn(4, 32)).square().sum().backward()
before = [p.detach().clone() for p in model.parameters()]
opt.step()
assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
assert opt.group_backends() == ["cpu"], opt.group_backends()
print("cpu isa:", cpu.cpu_isa())
"""


def test_plain_pip_install_builds_the_cpu_backend(tmp_path):
    """``pip install .`` with pip's build isolation (which hides the installed torch from the
    build) still compiles the C++ CPU backend against the installed torch, and the default
    backend for CPU tensors is then ``cpu``. FUSED_OPTIM_REQUIRE_CPU_BUILD (CI sets it) turns a
    pure-Python fallback into a failed install here, so the check cannot pass without the build.
    """
    site = tmp_path / "site"
    env = dict(os.environ, FUSED_OPTIM_SKIP_CUDA_BUILD="1", FUSED_OPTIM_REQUIRE_CPU_BUILD="1")
    done = _pip_install(site, env, isolated=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list((site / "fused_optim").glob("_C_cpu*")), "no C++ CPU extension in the install"
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    checked = _in_child(site, "-c", f"SITE = {str(site)!r}\n" + BUILT_CHECKS)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "cpu isa:" in checked.stdout
