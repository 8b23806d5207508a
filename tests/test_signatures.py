"""Constructor signatures are torch.optim's plus `backend`, the precision modes and the fused
gradient clipping (keyword-only, off by default); kernel hyperparameters are runtime."""

from __future__ import annotations

import inspect

import pytest
import torch

import fused_optim
from fused_optim.backends.triton import kernels


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_signature_is_torch_plus_backend_precision_modes_and_clipping(name):
    ours = inspect.signature(getattr(fused_optim, name).__init__).parameters
    theirs = inspect.signature(getattr(torch.optim, name).__init__).parameters
    extra = {
        "backend": None,
        "state_dtype": None,
        "master_weights": False,
        "stochastic_rounding": False,
        "seed": 0,
        "max_grad_norm": None,
        "write_clipped_grads": False,
    }
    assert list(ours) == [*theirs, *extra]
    for key, param in theirs.items():
        assert ours[key].kind == param.kind, key
        assert ours[key].default == param.default, key
    for key, default in extra.items():
        assert ours[key].kind == inspect.Parameter.KEYWORD_ONLY, key
        assert ours[key].default is default or ours[key].default == default, key


@pytest.mark.parametrize("kernel", [kernels.sgd_kernel, kernels.adam_kernel], ids=["sgd", "adam"])
def test_hyperparameters_are_table_data_and_flags_constexpr(kernel):
    # A constexpr (or specialised) hyperparameter would recompile the kernel whenever an LR
    # scheduler changes it: hyperparameters come from the per-group table, never as arguments.
    annotations = {
        name: param.annotation for name, param in inspect.signature(kernel.fn).parameters.items()
    }
    runtime = [name for name in annotations if not name.isupper()]
    assert runtime == [
        "tensor_table", "grad_table", "block_table", "hyper_table", "hyper_bits",
        "grad_scale_ptr", "grad_coef_ptr", "found_inf_ptr", "seed",
    ]  # fmt: skip
    flags = [name for name in annotations if name.isupper()]
    assert flags and all("constexpr" in str(annotations[name]) for name in flags)
    hyperparameters = {"LR", "BETA1", "BETA2", "EPS", "WEIGHT_DECAY", "MOMENTUM", "DAMPENING"}
    assert not hyperparameters & set(flags)
