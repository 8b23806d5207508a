"""Constructor signatures are torch.optim's plus `backend` and the precision modes (keyword-only,
off by default); kernel hyperparameters are runtime."""

from __future__ import annotations

import inspect

import pytest
import torch

import fused_optim
from fused_optim.backends.triton import kernels


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_signature_is_torch_plus_backend_and_precision_modes(name):
    ours = inspect.signature(getattr(fused_optim, name).__init__).parameters
    theirs = inspect.signature(getattr(torch.optim, name).__init__).parameters
    extra = {
        "backend": None,
        "state_dtype": None,
        "master_weights": False,
        "stochastic_rounding": False,
        "seed": 0,
    }
    assert list(ours) == [*theirs, *extra]
    for key, param in theirs.items():
        assert ours[key].kind == param.kind, key
        assert ours[key].default == param.default, key
    for key, default in extra.items():
        assert ours[key].kind == inspect.Parameter.KEYWORD_ONLY, key
        assert ours[key].default is default or ours[key].default == default, key


@pytest.mark.parametrize(
    "kernel,hyperparameters",
    [
        (kernels.sgd_kernel, ["lr", "momentum", "dampening", "weight_decay"]),
        (
            kernels.adam_kernel,
            ["lr", "beta1", "beta2", "eps", "weight_decay", "base_step"],
        ),
    ],
    ids=["sgd", "adam"],
)
def test_hyperparameters_are_runtime_fp64_and_flags_constexpr(kernel, hyperparameters):
    # A constexpr (or specialised) hyperparameter would recompile the kernel whenever an LR
    # scheduler changes it.
    annotations = {
        name: param.annotation for name, param in inspect.signature(kernel.fn).parameters.items()
    }
    for name in hyperparameters:
        assert str(annotations[name]).endswith("fp64"), (name, annotations[name])
    flags = [name for name in annotations if name.isupper()]
    assert flags and all("constexpr" in str(annotations[name]) for name in flags)
