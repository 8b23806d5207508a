"""Test setup: run the real Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the top of
the first module pytest imports. On a CUDA machine the GPU tests set their own environment.
"""

import os

if os.environ.get("FUSED_OPTIM_TEST_COMPILED") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from hypothesis import settings

# The property tests draw new examples on every run; CI (``CI`` set: .ci/run sets it) draws a
# fixed sequence instead, so that its verdict depends on the commit, not on chance. Longer
# random campaigns run by hand (tests/test_fuzz_dropin.py's docstring says how).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    """Which C++ CPU kernel builds this machine can run, and which one the tests use."""
    from fused_optim.backends import cpu

    available, why = cpu.is_available(torch.device("cpu"))
    if not available:
        return f"fused_optim C++ CPU backend: not built ({why})"
    return (
        f"fused_optim C++ CPU backend: kernel builds this CPU runs: "
        f"{', '.join(cpu.supported_isas())} (of {', '.join(cpu.ISAS)}); in use: {cpu.cpu_isa()}"
    )


@pytest.fixture(params=["extension", "python"])
def host_checks(request):
    """Runs a test twice: with the fast path's checks of the C++ extension (where it is built;
    else both runs use the Python ones), and with their plain-Python twin
    (``backends.python_checks``), which installs without the extension run."""
    import fused_optim

    fused_optim.backends.use_python_host_checks(request.param == "python")
    yield request.param
    fused_optim.backends.use_python_host_checks(False)
