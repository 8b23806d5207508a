"""What the fused kernels do not compute as torch.optim does is handed to torch.optim's own step.

torch.optim accepts a few configurations that no fused kernel walks: a grad (or a state loaded
from a checkpoint) whose shape is not its param's but broadcasts to it, a param listed twice in a
group (a warning, then two updates and two step counts), a grad whose dtype is not its param's
(SGD keeps it in the momentum buffer). fused_optim runs torch.optim's for-loop step for them, so
every result, state shape, dtype and step count is torch.optim's. What torch.optim rejects (a
grad or state that does not broadcast, integer params) raises its exception type and message
before anything changes: its step is replayed on copies first.

The oracle is torch.optim's for-loop step (``foreach=False``) on the same inputs, compared
bitwise: both sides run torch's own CPU math on the same machine.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fused_optim

from cases import cpu_backends

CONFIGS = [
    ("SGD", {}),
    ("SGD", {"momentum": 0.9, "weight_decay": 0.1}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("SGD", {"momentum": 0.9, "dampening": 0.2, "maximize": True}),
    ("Adam", {"weight_decay": 0.1}),
    ("Adam", {"amsgrad": True}),
    ("AdamW", {}),
    ("AdamW", {"amsgrad": True, "maximize": True}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw in CONFIGS]


def _grads_setter(shape: tuple | None = None, dtype=None):
    """Sets each param's grad to fresh data of ``shape`` and ``dtype`` (default: the param's)
    through ``.data``, the way torch lets a grad's shape and dtype differ from its param's."""

    def set_grads(params, seed):
        generator = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.ones_like(p)
            size = p.shape if shape is None else shape
            p.grad.data = torch.randn(size, generator=generator, dtype=dtype or p.dtype)

    return set_grads


def _run(module, name, kwargs, params, set_grads, steps=3, backend=None):
    extra = {"foreach": False} if module is torch.optim else {"backend": backend}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warning for a param listed twice
        opt = getattr(module, name)(params(), lr=0.05, **kwargs, **extra)
    flat = list(dict.fromkeys(p for g in opt.param_groups for p in g["params"]))
    for step in range(steps):
        set_grads(flat, step)
        opt.step()
    return opt, flat


def _assert_same_run(torch_run, fused_run) -> None:
    (torch_opt, torch_params), (fused_opt, fused_params) = torch_run, fused_run
    for a, b in zip(torch_params, fused_params):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch_state = torch_opt.state_dict()["state"]
    fused_state = fused_opt.state_dict()["state"]
    assert torch_state.keys() == fused_state.keys()
    for index, entry in torch_state.items():
        assert entry.keys() == fused_state[index].keys()
        for key, value in entry.items():
            other = fused_state[index][key]
            assert other.dtype == value.dtype and other.shape == value.shape, (key, other, value)
            torch.testing.assert_close(other, value, rtol=0, atol=0)


def _params(*shapes):
    def build():
        generator = torch.Generator().manual_seed(7)
        return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]

    return build


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grad_shape", [(1, 4), (4,), (3, 1)], ids=str)
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_broadcastable_grad_follows_torch(name, kwargs, grad_shape, backend):
    """A (1,4), (4,) or (3,1) grad on a (3,4) param: torch.optim broadcasts it (an SGD
    momentum buffer then keeps the grad's shape); so does fused_optim, bitwise, with the
    params moved."""
    params = _params((3, 4))
    set_grads = _grads_setter(grad_shape)
    torch_run = _run(torch.optim, name, kwargs, params, set_grads)
    fused_run = _run(fused_optim, name, kwargs, params, set_grads, backend=backend)
    _assert_same_run(torch_run, fused_run)
    assert not torch.equal(fused_run[1][0], params()[0])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_param_listed_twice_follows_torch(name, kwargs, backend):
    """torch.optim warns, then updates a param listed twice in a group twice per step, counting
    two steps; so does fused_optim (the kernels would update it once, or race)."""

    def params():
        first, second = _params((5,), (2, 3))()
        return [first, second, first]

    set_grads = _grads_setter()
    torch_run = _run(torch.optim, name, kwargs, params, set_grads)
    fused_run = _run(fused_optim, name, kwargs, params, set_grads, backend=backend)
    _assert_same_run(torch_run, fused_run)
    if name != "SGD":
        assert float(fused_run[0].state[fused_run[1][0]]["step"]) == 6


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name,kwargs", CONFIGS[:4], ids=IDS[:4])
def test_sgd_grad_of_another_dtype_follows_torch(name, kwargs, backend):
    """An fp64 grad on an fp32 param: torch.optim's SGD updates the param in fp64 arithmetic and
    keeps an fp64 momentum buffer; so does fused_optim."""
    params = _params((3, 4), (7,))
    set_grads = _grads_setter(dtype=torch.float64)
    torch_run = _run(torch.optim, name, kwargs, params, set_grads)
    fused_run = _run(fused_optim, name, kwargs, params, set_grads, backend=backend)
    _assert_same_run(torch_run, fused_run)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name,kwargs", [CONFIGS[2], CONFIGS[5]], ids=[IDS[2], IDS[5]])
def test_checkpoint_with_broadcastable_state_follows_torch(name, kwargs, backend):
    """A checkpoint written by torch.optim after (1,4) grads on a (3,4) param (SGD's momentum
    buffer is then (1,4)), with Adam's moments cut to (1,4) too: loaded into fused_optim, the
    next steps with (1,4) grads are torch.optim's, bitwise (the states keep their shape)."""
    params = _params((3, 4))
    set_grads = _grads_setter((1, 4))
    source, _ = _run(torch.optim, name, kwargs, params, set_grads, steps=2)
    saved = copy.deepcopy(source.state_dict())
    for entry in saved["state"].values():
        for key, value in entry.items():
            if key != "step":
                entry[key] = value[:1].clone()
    runs = []
    for module, extra in ((torch.optim, {"foreach": False}), (fused_optim, {"backend": backend})):
        ps = params()
        opt = getattr(module, name)(ps, lr=0.05, **kwargs, **extra)
        opt.load_state_dict(copy.deepcopy(saved))
        for step in range(2):
            set_grads(ps, 10 + step)
            opt.step()
        runs.append((opt, ps))
    _assert_same_run(*runs)
    assert runs[1][0].state[runs[1][1][0]][
        "exp_avg" if name != "SGD" else "momentum_buffer"
    ].shape == (1, 4)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[4]], ids=[IDS[1], IDS[4]])
def test_fallback_under_grad_scaler_unscales_and_skips(name, kwargs, backend):
    """GradScaler's ``grad_scale`` and ``found_inf`` on a step torch.optim's own step takes:
    the grads are divided by the scale (in fp32) first, and a step with ``found_inf`` changes
    nothing; the oracle divides them itself and skips that step."""
    scale = torch.tensor(1024.0)
    schedule = [0.0, 1.0, 0.0]  # found_inf per step
    params = _params((3, 4))
    set_grads = _grads_setter((1, 4))
    torch_ps, fused_ps = params(), params()
    torch_opt = getattr(torch.optim, name)(torch_ps, lr=0.05, foreach=False, **kwargs)
    fused_opt = getattr(fused_optim, name)(fused_ps, lr=0.05, backend=backend, **kwargs)
    for step, found in enumerate(schedule):
        set_grads(torch_ps, step)
        set_grads(fused_ps, step)
        if not found:
            for p in torch_ps:
                p.grad.data = p.grad.data / scale
            torch_opt.step()
        fused_opt.grad_scale, fused_opt.found_inf = scale, torch.tensor(found)
        fused_opt.step()
        del fused_opt.grad_scale, fused_opt.found_inf
        assert fused_opt.last_step_skipped == bool(found)
    _assert_same_run((torch_opt, torch_ps), (fused_opt, fused_ps))


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_fallback_with_precision_modes_raises_value_error(name):
    """The precision modes have no torch.optim counterpart to hand such a step to: a
    ValueError that names what to change, with nothing changed."""
    p = torch.nn.Parameter(torch.randn(3, 4))
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    opt = getattr(fused_optim, name)([p], lr=0.1, stochastic_rounding=True, **kwargs)
    p.grad = torch.ones_like(p)
    p.grad.data = torch.ones(1, 4)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="with state_dtype, master_weights or stochastic_rounding"):
        opt.step()
    assert torch.equal(p, before) and not opt.state.get(p)


def _two_tensor_components(t):
    return (t.a, t.b) if type(t).__name__ == "TwoTensor" else (t,)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_dispatch_subclass_params_follow_torch(name, kwargs, backend):
    """Params (and so grads and states) that are a tensor subclass with its own
    ``__torch_dispatch__`` (torch's ``TwoTensor``: a wrapper of two tensors, each op applied to
    both) have no memory the kernels could address: torch.optim's step updates them through
    their dispatch, and so does fused_optim (it crashed here before), bitwise, on both
    components, through steps where the fast path would otherwise hold."""
    two_tensor = pytest.importorskip(
        "torch.testing._internal.two_tensor", reason="this torch has no TwoTensor test subclass"
    )

    def params():
        generator = torch.Generator().manual_seed(7)
        values = [torch.randn(s, generator=generator) for s in [(3, 4), (3, 4), (5,), (5,)]]
        return [
            torch.nn.Parameter(two_tensor.TwoTensor(values[i], values[i + 1]))
            for i in range(0, 4, 2)
        ]

    def set_grads(flat, seed):
        generator = torch.Generator().manual_seed(seed)
        for p in flat:
            a, b = (torch.randn(p.shape, generator=generator) for _ in range(2))
            p.grad = two_tensor.TwoTensor(a, b)

    torch_opt, torch_params = _run(torch.optim, name, kwargs, params, set_grads, steps=5)
    fused_opt, fused_params = _run(fused_optim, name, kwargs, params, set_grads, steps=5,
                                   backend=backend)  # fmt: skip
    for theirs, ours, start in zip(torch_params, fused_params, params()):
        assert type(ours) is type(theirs)
        for a, b in zip(_two_tensor_components(theirs), _two_tensor_components(ours)):
            assert torch.equal(a, b)
        assert not torch.equal(ours.a, start.a)
        state, torch_state = fused_opt.state[ours], torch_opt.state[theirs]
        assert state.keys() == torch_state.keys()
        for key, value in torch_state.items():
            for a, b in zip(_two_tensor_components(value), _two_tensor_components(state[key])):
                assert a.dtype == b.dtype and torch.equal(a, b), key
