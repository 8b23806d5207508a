"""A cached launch plan is valid only while every tensor it addresses keeps its address, dtype,
shape and strides; anything else rebuilds it (fused_optim.backends.plan.signatures).

Two silent-corruption reproductions: a param whose ``.data`` is replaced by a shorter view at
the same address (a stale plan walked the old extent and wrote outside the param), and a
gradient whose memory comes back with another layout (a stale plan updated with the old
layout). Every backend this machine runs is checked against torch.optim's for-loop.
"""

from __future__ import annotations

import pytest
import torch

import fused_optim
from fused_optim.testing import correctly_rounded_optimizer

BACKENDS = [b for b in ("triton", "cpu", "reference") if b in fused_optim.available_backends("cpu")]
OPTIMIZERS = {"SGD": {"lr": 0.1, "momentum": 0.9}, "AdamW": {"lr": 0.1}}

# Every test runs with the fast path's checks of the C++ extension and with their Python twin.
pytestmark = pytest.mark.usefixtures("host_checks")


def pair(name: str, backend: str, params, ref_params, config=None):
    config = OPTIMIZERS[name] if config is None else config
    exact_torch = correctly_rounded_optimizer(getattr(torch.optim, name))
    ours = getattr(fused_optim, name)(params, backend=backend, **config)
    return ours, exact_torch(ref_params, foreach=False, **config)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_param_shrunk_at_the_same_address_rebuilds_the_plan(name, backend):
    base, ref_base = torch.zeros(2048), torch.zeros(2048)
    p, q = torch.nn.Parameter(base[:1024]), torch.nn.Parameter(ref_base[:1024])
    opt, ref = pair(name, backend, [p], [q], {"lr": 0.1})  # SGD: no state at all
    p.grad, q.grad = torch.ones(1024), torch.ones(1024)
    opt.step()
    ref.step()
    assert torch.equal(base, ref_base)
    # Same address, 8 elements (AdamW: torch.optim needs fresh states of the new size).
    p.data, q.data = base[:8], ref_base[:8]
    if name != "SGD":
        opt.state.clear()
        ref.state.clear()
    p.grad, q.grad = torch.full((8,), 2.0), torch.full((8,), 2.0)
    outside = base[8:].clone()
    opt.step()
    ref.step()
    assert torch.equal(base[8:], outside), "the step wrote outside the param"
    assert torch.equal(base, ref_base)
    assert not torch.equal(base[:8], outside[:8])  # it moved


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_memory_coming_back_transposed_rebuilds_the_staging(name, backend):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 4, generator=gen))
    v = torch.nn.Parameter(w.detach().clone())
    opt, ref = pair(name, backend, [w], [v])
    buf = torch.randn(16, generator=gen)
    for view in (buf.view(4, 4), buf.view(4, 4).t(), buf.view(4, 4)):
        w.grad, v.grad = view, view.clone()
        before = w.detach().clone()
        opt.step()
        ref.step()
        assert not torch.equal(w, before)
        assert torch.equal(w, v), f"max diff {(w - v).abs().max().item():.3g}"
