"""Test cases as data: optimizer configurations, dtypes and shapes, and one skip rule.

The configurations follow the flag combinations torch's own optimizer tests use for SGD, Adam
and AdamW (torch.testing._internal.common_optimizers), minus the ones that only make sense for
other implementations (foreach/fused/differentiable).
"""

from __future__ import annotations

import pytest
import torch

import fused_optim

SGD_CONFIGS = [
    {},
    {"lr": 0.01},
    {"lr": torch.tensor(0.001)},
    {"lr": 0.01, "momentum": 0.9},
    {"lr": 0.01, "momentum": 0.9, "dampening": 0.5},
    {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1},
    {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
    {"lr": 0.01, "momentum": 0.9, "maximize": True, "nesterov": True},
]

ADAM_CONFIGS = [
    {},
    {"lr": 0.01},
    {"lr": 0.01, "betas": (0.8, 0.99)},
    {"lr": 0.01, "weight_decay": 0.1},
    {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
    {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
    {"lr": 0.01, "amsgrad": True, "maximize": True},
    {"lr": 0.01, "betas": (0.6, 0.9), "eps": 1e-6},
    {"lr": torch.tensor(0.01)},
    {"capturable": True},
    {"weight_decay": 0.1, "amsgrad": True, "capturable": True},
    {"lr": torch.tensor(0.001), "amsgrad": True, "capturable": True},
    {
        "lr": torch.tensor(0.001),
        "betas": (torch.tensor([[[0.9]]]), torch.tensor([[0.99]])),
        "amsgrad": True,
        "capturable": True,
    },
]

OPTIMIZERS = {
    "SGD": (torch.optim.SGD, fused_optim.SGD, SGD_CONFIGS),
    "Adam": (torch.optim.Adam, fused_optim.Adam, ADAM_CONFIGS),
    "AdamW": (torch.optim.AdamW, fused_optim.AdamW, ADAM_CONFIGS),
}


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor({value.item():g})"
    if isinstance(value, tuple):
        return "(" + ",".join(_short(v) for v in value) + ")"
    return str(value)


def torch_reference_config(config: dict) -> dict:
    """The config for torch.optim's for-loop oracle on the CPU.

    torch.optim refuses capturable=True on CPU tensors; capturable changes where ``step`` lives,
    not the math, so the oracle runs without it. Tensor betas are given to the oracle as floats:
    fused_optim reads them as values and does the scalar math in fp64 as for float betas, while
    torch.optim's tensor-betas path does it in the tensors' fp32 (a 1e-8 relative difference,
    visible only in fp64 params). A tensor lr stays a tensor: fused_optim follows torch there.
    """
    config = {k: v for k, v in config.items() if k != "capturable"}
    if "betas" in config:
        config["betas"] = tuple(float(b) for b in config["betas"])
    return config | {"foreach": False}


def optimizer_cases():
    """(name, config) pairs, with readable ids."""
    for name, (_, _, configs) in OPTIMIZERS.items():
        for config in configs:
            label = "-".join(f"{k}={_short(v)}" for k, v in config.items()) or "defaults"
            yield pytest.param(name, config, id=f"{name}[{label}]")


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# Shapes from the kernel's point of view: BLOCK elements per program.
BLOCK = 1024
SHAPES = [(0,), (), (1,), (7,), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (4097,), (65537,)]


def adapt_config(name: str, config: dict, dtype: torch.dtype) -> dict:
    """The one place that changes a case for a dtype, and says why.

    fp16 Adam/AdamW run with eps=0.1, as torch's own fp16 Adam tests do: eps=1e-8 flushes to
    zero in fp16, and so does v for small gradients, so the step is 0/0 for torch.optim itself.
    """
    if dtype == torch.float16 and name != "SGD":
        return {**config, "eps": 0.1}
    return config
