"""Random training runs with the things users do between steps, fused_optim against torch.optim.

Each example builds the same params for torch.optim (its for-loop step) and fused_optim, then
before every step applies one change drawn at random: a new lr (float, or a tensor of any dtype
torch accepts), a grad of another shape (broadcastable or not) or dtype, a state entry deleted,
amsgrad or nesterov switched, betas out of range, a param's data replaced. Both must raise the
same exception (type and message; fused_optim with its params and state untouched), or both
succeed with the same results (torch.testing's default tolerances for the dtype: where fused_optim
hands the step to torch.optim, and where it does not, the one difference is torch's fp32 sqrt
rounding on this CPU).

Each run draws 25 examples per case, new ones every run (a fixed sequence under CI: see
conftest.py). A longer campaign: ``FUSED_OPTIM_FUZZ_EXAMPLES=500 python -m pytest -x
tests/test_fuzz_dropin.py``.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_optim

from cases import cpu_backends

SHAPES = [(3,), (2, 3), (4, 1)]
EXAMPLES = int(os.environ.get("FUSED_OPTIM_FUZZ_EXAMPLES", "25"))


def _configs(name: str):
    if name == "SGD":
        return st.fixed_dictionaries(
            {
                "momentum": st.sampled_from([0.0, 0.9]),
                "weight_decay": st.sampled_from([0.0, 0.1]),
                "maximize": st.booleans(),
            }
        )
    return st.fixed_dictionaries(
        {
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "amsgrad": st.booleans(),
            "maximize": st.booleans(),
        }
    )


CHANGES = [
    "none",
    "lr float",
    "lr tensor",
    "grad broadcast",
    "grad wrong shape",
    "grad float64",
    "drop state",
    "toggle flag",
    "betas out of range",
    "data float64",
    "data reshaped",
    "grad none",
    "state reshaped",
    "state float64",
    "maximize switched",
    "weight decay",
    "param group added",
]


def _apply(change, opt, params, rng: int) -> None:
    """One change between steps, the same on both sides (``rng`` picks the variant)."""
    group = opt.param_groups[0]
    p = params[rng % len(params)]
    if change == "lr float":
        group["lr"] = [0.05, 0.0, -0.01][rng % 3]
    elif change == "lr tensor":
        dtype = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64][rng % 5]
        group["lr"] = torch.tensor(1 if dtype == torch.int64 else 0.03).to(dtype)
    elif change == "grad broadcast":
        p.grad.data = torch.ones((1,) * (p.dim() - 1) + (p.shape[-1],)) * 0.5
    elif change == "grad wrong shape":
        p.grad.data = torch.ones(p.numel() + 1)
    elif change == "grad float64":
        p.grad.data = p.grad.data.double()
    elif change == "drop state":
        state = opt.state.get(p)
        if state:
            keys = sorted(state)
            del state[keys[rng % len(keys)]]
    elif change == "toggle flag":
        key = "nesterov" if "nesterov" in group else "amsgrad"
        if key == "nesterov" and group["momentum"] == 0:
            return
        group[key] = not group[key]
    elif change == "betas out of range" and "betas" in group:
        group["betas"] = [(1.0, 0.999), (0.9, 1.5), (1.5, 0.999), (-0.5, 0.9)][rng % 4]
    elif change == "data float64":
        p.data = p.data.double()
        p.grad.data = p.grad.data.double()
    elif change == "data reshaped" and p.dim() == 2:
        p.data = p.data.reshape(-1)
    elif change == "grad none":
        p.grad = None
    elif change in ("state reshaped", "state float64"):
        tensors = [k for k, v in sorted(opt.state.get(p, {}).items()) if k != "step"]
        if tensors:
            t = opt.state[p][tensors[rng % len(tensors)]]
            t.data = t.data.reshape(-1) if change == "state reshaped" else t.data.double()
    elif change == "maximize switched":
        group["maximize"] = not group["maximize"]
    elif change == "weight decay":
        group["weight_decay"] = [0.0, 0.2, -0.1][rng % 3]
    elif change == "param group added":
        gen = torch.Generator().manual_seed(rng)
        extra = torch.randn(5, generator=gen).requires_grad_()
        opt.add_param_group({"params": [extra], "lr": 0.02})
        params.append(extra)


def _grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)


def _run(module, name, config, changes, backend):
    """(per step: the exception or None, params and state after it, and what they were just
    before the step)."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    extra = {"foreach": False} if module is torch.optim else {"backend": backend}
    opt = getattr(module, name)(params, lr=0.1, **config, **extra)
    history = []
    for step, (change, rng) in enumerate(changes):
        _grads(params, step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _apply(change, opt, params, rng)
            except RuntimeError:  # a change torch itself refuses (e.g. .data of another type)
                history.append(("refused", None, None))
                break
        before = [p.detach().clone() for p in params], copy.deepcopy(list(opt.state.values()))
        try:
            opt.step()
            error = None
        except Exception as exc:  # compared with torch.optim's below
            error = exc
        after = [p.detach().clone() for p in params], copy.deepcopy(list(opt.state.values()))
        history.append((error, after, before))
        if error is not None:
            break
    return history


def _same_tree(a, b, exact: bool) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        if exact:
            assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.isnan(), b.isnan()))
        else:
            torch.testing.assert_close(a, b, equal_nan=True)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_tree(x, y, exact)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same_tree(a[key], b[key], exact)
    else:
        assert a == b


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_changes_between_steps_match_torch(name, backend, data):
    config = data.draw(_configs(name))
    changes = data.draw(
        st.lists(st.tuples(st.sampled_from(CHANGES), st.integers(0, 11)), min_size=2, max_size=4)
    )
    torch_history = _run(torch.optim, name, config, changes, None)
    fused_history = _run(fused_optim, name, config, changes, backend)
    assert len(torch_history) == len(fused_history)
    for (torch_error, torch_after, _), (fused_error, fused_after, fused_before) in zip(
        torch_history, fused_history
    ):
        if torch_error == "refused":
            assert fused_error == "refused"
            continue
        assert type(fused_error) is type(torch_error), (fused_error, torch_error)
        if torch_error is not None:
            assert str(fused_error) == str(torch_error)
            # fused_optim changed nothing (torch.optim may have, half-way through its update).
            _same_tree(fused_after, fused_before, exact=True)
        else:
            _same_tree(fused_after, torch_after, exact=False)
