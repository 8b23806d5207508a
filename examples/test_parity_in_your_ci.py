"""Check in your CI that fused_optim matches torch.optim for the settings you train with.

Copy this file into your test suite and edit ``MY_SETTINGS``; then

    pytest examples/test_parity_in_your_ci.py

Each test runs PyTorch's own parity recipe (a small MLP, 7 steps, a step without gradients, a
layer frozen then unfrozen) with fused_optim and with torch.optim's for-loop implementation, and
compares params and optimizer state after every step with torch's own tolerances (see
``fused_optim.testing``). A failure prints which tensor diverged, at which step and by how much.

On a runner without a GPU, the Triton kernels run in Triton's interpreter, which needs
``TRITON_INTERPRET=1`` before triton is imported: it is set below (or set it in your CI
environment or conftest.py). ``fused-optim verify`` runs the full matrix from the command line.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import fused_optim
from fused_optim.testing import CONFIGS, assert_matches_torch, compare_to_torch, config_label

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = fused_optim.available_backends(DEVICE)

# The optimizers and hyperparameters you train with.
MY_SETTINGS = [
    ("AdamW", {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,config", MY_SETTINGS, ids=[name for name, _ in MY_SETTINGS])
def test_my_settings_match_torch(name, config, dtype, backend):
    assert_matches_torch(name, config, dtype=dtype, device=DEVICE, backend=backend)


# The flag combinations torch's own optimizer tests use, for one optimizer.
@pytest.mark.parametrize("config", CONFIGS["AdamW"], ids=config_label)
def test_adamw_flag_combinations_match_torch(config):
    assert_matches_torch("AdamW", config, device=DEVICE)


def make_optimizer(params, **config):
    """Your project's own optimizer factory (here it just builds fused_optim.AdamW)."""
    return fused_optim.AdamW(params, **config)


def test_my_factory_matches_torch_adamw():
    # A factory, or a class that does not subclass a torch.optim class, names its reference.
    report = compare_to_torch(
        make_optimizer, {"lr": 1e-3, "weight_decay": 0.05}, reference="AdamW", device=DEVICE
    )
    print(report.summary())  # shown with pytest -s, or on failure
    report.assert_ok()
    assert report.worst_ratio <= 1  # every check within its bound
