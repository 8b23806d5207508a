"""Test cases as data: optimizer configurations, dtypes and shapes.

The configurations (the flag combinations torch's own optimizer tests use for SGD, Adam and
AdamW), the oracle's config (``reference_config``) and the one rule that changes a case for a
dtype (``adapt_config``) are public in ``fused_optim.testing``, so that the tests,
``fused-optim verify`` and users' CI run the same cases.
"""

from __future__ import annotations

import pytest
import torch

import fused_optim
from fused_optim import testing
from fused_optim.backends import select_backend

__all__ = ["AUTO_CPU", "BLOCK", "DTYPES", "OPTIMIZERS", "SHAPES", "cpu_backends", "optimizer_cases"]

OPTIMIZERS = {
    name: (getattr(torch.optim, name), getattr(fused_optim, name), testing.CONFIGS[name])
    for name in testing.OPTIMIZERS
}


def cpu_backends() -> list:
    """pytest params of every backend that updates CPU tensors (the C++ ``cpu`` backend, Triton
    through its interpreter, the reference), each skipped with its reason where it cannot run
    (the pure-Python install has no C++ extension)."""
    params = []
    for name in ("cpu", "triton", "reference"):
        available, reason = fused_optim.backends._module(name).is_available(torch.device("cpu"))
        marks = () if available else pytest.mark.skip(reason=f"backend {name!r}: {reason}")
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def optimizer_cases():
    """(name, config) pairs, with readable ids."""
    for name, (_, _, configs) in OPTIMIZERS.items():
        for config in configs:
            yield pytest.param(name, config, id=f"{name}[{testing.config_label(config)}]")


DTYPES = list(testing.DTYPES.values())  # fp64, fp32, bf16, fp16

# Shapes from the kernel's point of view: BLOCK elements per program.
BLOCK = 1024
SHAPES = [(0,), (), (1,), (7,), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (4097,), (65537,)]

# What backend=None picks for CPU tensors here: the fused C++ "cpu" backend when it is built,
# else Triton in its interpreter (the tests run with TRITON_INTERPRET=1).
AUTO_CPU = select_backend(None, torch.device("cpu")).NAME


# Hyperparameters of three param groups (tests of one launch across groups).
ADAM_GROUPS = [
    dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.0),
    dict(lr=0.003, beta1=0.8, beta2=0.95, eps=1e-8, weight_decay=0.1),
    dict(lr=0.1, beta1=0.5, beta2=0.999, eps=1e-4, weight_decay=0.01),
]
SGD_GROUPS = [
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0),
    dict(lr=0.2, momentum=0.5, dampening=0.3, weight_decay=0.1),
    dict(lr=0.01, momentum=0.99, dampening=0.1, weight_decay=0.01),
]
