"""Test setup: run the real Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the top of
the first module pytest imports. On a CUDA machine the GPU tests set their own environment.
"""

import os

if os.environ.get("FUSED_OPTIM_TEST_COMPILED") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
