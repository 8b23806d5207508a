"""torch.compile of ``opt.step()``: the traced step (``_base._traced_step``, the custom ops of
``backends.compiled``) updates exactly as the eager step does, on every backend, with no
recompilation when a scheduler or the user changes lr, betas or weight decay every step, and
with no graph break inside fused_optim (``fullgraph=True`` holds, also for a whole training
step: forward, backward, optimizer step)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fused_optim

from cases import cpu_backends

BACKENDS = cpu_backends()
CONFIGS = {
    "AdamW": dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1),
    "Adam-amsgrad": dict(lr=0.01, amsgrad=True, weight_decay=0.01),
    "SGD-nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "SGD-dampening": dict(lr=0.05, momentum=0.8, dampening=0.3),
}


def _optimizer(name: str, params, backend: str):
    cls = getattr(fused_optim, name.split("-")[0])
    kwargs = dict(CONFIGS[name])
    first, second = params[:2], params[2:]
    return cls(
        [{"params": first}, {"params": second, "lr": kwargs["lr"] * 0.5}],
        backend=backend,
        **kwargs,
    )


def _params(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    return [torch.randn(s, generator=generator).requires_grad_() for s in shapes]


def _set_grads(params, step: int):
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def _change_hyperparameters(opt, step: int):
    """What a scheduler, or a user, writes between steps: every group's lr, and for Adam its
    betas, for SGD its momentum, and the weight decay."""
    for g, group in enumerate(opt.param_groups):
        group["lr"] = group["initial"] * (0.9**step) / (g + 1)
        group["weight_decay"] = 0.01 * (step % 3)
        if "betas" in group:
            group["betas"] = (0.9 - 0.01 * step, 0.99 + 0.001 * step)
        elif group["momentum"]:
            group["momentum"] = 0.9 - 0.02 * step


def _run(name, backend, steps, compiled: bool, graphs_at: list | None = None):
    params = _params()
    opt = _optimizer(name, params, backend)
    for group in opt.param_groups:
        group["initial"] = group["lr"]

    def step():
        opt.step()

    if compiled:
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(step, fullgraph=True, backend="aot_eager")
    for number in range(steps):
        _change_hyperparameters(opt, number)
        _set_grads(params, number)
        step()
        if graphs_at is not None:
            graphs_at.append(counters["stats"]["unique_graphs"])
    if compiled:
        torch._dynamo.reset()
    return params, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_step_is_the_eager_step_bitwise(name, backend):
    """fullgraph=True (no graph break), the states created inside the trace, two groups with
    their own values, and every value changed every step: the same bits as eager steps, and
    no graph compiled after the first steps."""
    steps = 7
    graphs: list[int] = []
    compiled_params, compiled_opt = _run(name, backend, steps, compiled=True, graphs_at=graphs)
    eager_params, eager_opt = _run(name, backend, steps, compiled=False)
    initial = _params()
    for p, e, start in zip(compiled_params, eager_params, initial):
        torch.testing.assert_close(p, e, rtol=0, atol=0)
        assert not torch.equal(p, start), "a param did not move"
    compiled_state = compiled_opt.state_dict()["state"]
    eager_state = eager_opt.state_dict()["state"]
    assert compiled_state.keys() == eager_state.keys()
    for index, entry in eager_state.items():
        assert compiled_state[index].keys() == entry.keys()
        for key, value in entry.items():
            torch.testing.assert_close(compiled_state[index][key], value, rtol=0, atol=0)
    # The first step traces without state, the second with it, the third makes the changed
    # values graph inputs; nothing after.
    assert graphs[-1] <= 3, graphs
    assert graphs[3] == graphs[-1], f"recompiled on a hyperparameter's value: {graphs}"


def test_compiled_step_with_a_scheduler_breaks_no_more_than_torch_optim():
    """LRScheduler wraps ``opt.step`` in a function dynamo never traces (a graph break torch.optim
    has as well). Beyond it: no graph break in fused_optim, and no recompilation while the
    scheduler changes lr every step."""

    def run(module):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        opt = module.AdamW(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        step = torch.compile(opt.step, backend="aot_eager")
        torch._dynamo.reset()
        counters.clear()
        graphs = []
        x = torch.randn(4, 8)
        for _ in range(8):
            model(x).sum().backward()
            step()
            scheduler.step()
            opt.zero_grad()
            graphs.append(counters["stats"]["unique_graphs"])
        breaks = sum(counters["graph_break"].values())
        torch._dynamo.reset()
        return graphs, breaks, [p.detach().clone() for p in model.parameters()]

    fused_graphs, fused_breaks, fused_params = run(fused_optim)
    torch_graphs, torch_breaks, torch_params = run(torch.optim)
    assert fused_breaks <= torch_breaks, (fused_breaks, torch_breaks)
    assert fused_graphs[-1] <= torch_graphs[-1] + 1, (fused_graphs, torch_graphs)
    assert fused_graphs[3] == fused_graphs[-1], fused_graphs
    for p, t in zip(fused_params, torch_params):
        torch.testing.assert_close(p, t)


@torch._dynamo.config.patch(trace_autograd_ops=True)  # dynamo's switch for ``loss.backward()``
def test_a_whole_training_step_compiles_with_fullgraph():
    """forward, backward and ``opt.step()`` in one ``fullgraph=True`` region, with the lr
    changed every step, against the same loop in eager mode. (``zero_grad`` stays outside:
    torch.optim's, which the classes inherit, is excluded from tracing by torch itself.)"""

    def train(compiled: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = fused_optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        x, y = torch.randn(32, 6), torch.randn(32, 1)

        def train_step():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        if compiled:
            torch._dynamo.reset()
            train_step = torch.compile(train_step, fullgraph=True, backend="aot_eager")
        losses = []
        for number in range(6):
            opt.param_groups[0]["lr"] = 0.01 / (1 + number)
            losses.append(float(train_step()))
            opt.zero_grad()
        torch._dynamo.reset()
        return losses, list(model.parameters())

    compiled_losses, compiled_params = train(True)
    eager_losses, eager_params = train(False)
    assert compiled_losses[-1] < compiled_losses[0]
    torch.testing.assert_close(compiled_losses, eager_losses)
    for p, e in zip(compiled_params, eager_params):
        torch.testing.assert_close(p, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_and_compiled_steps_interleave(backend):
    """Eager steps (with their plan, fast path and gathered step buffers), then compiled steps,
    then eager ones again: the same bits as eager steps all along."""
    params = _params()
    opt = _optimizer("AdamW", params, backend)
    eager_params = _params()
    eager_opt = _optimizer("AdamW", eager_params, backend)
    torch._dynamo.reset()
    compiled_step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    for number in range(6):
        _set_grads(params, number)
        _set_grads(eager_params, number)
        (compiled_step if 2 <= number < 4 else opt.step)()
        eager_opt.step()
    torch._dynamo.reset()
    for p, e in zip(params, eager_params):
        torch.testing.assert_close(p, e, rtol=0, atol=0)
    assert opt.state_dict()["state"][0]["step"] == 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD-nesterov"])
def test_compiled_step_under_grad_scaler_tensors(name, backend):
    """GradScaler's ``grad_scale`` and ``found_inf`` handed to a compiled step: an inf skips the
    step entirely (params, states and step counts unchanged), otherwise grads are unscaled in
    the kernel, as in eager steps."""
    results = []
    for compiled in (True, False):
        params = _params()
        opt = _optimizer(name, params, backend)
        step = opt.step
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step, fullgraph=True, backend="aot_eager")
        for number, inf in enumerate([0.0, 1.0, 0.0, 0.0]):
            _set_grads(params, number)
            for p in params:
                p.grad.mul_(1024.0)
            opt.grad_scale = torch.tensor(1024.0)
            opt.found_inf = torch.tensor(inf)
            before = [p.detach().clone() for p in params]
            step()
            if inf:
                for p, b in zip(params, before):
                    assert torch.equal(p, b), "a skipped step changed a param"
        del opt.grad_scale, opt.found_inf
        torch._dynamo.reset()
        results.append((params, opt.state_dict()["state"]))
    (compiled_params, compiled_state), (eager_params, eager_state) = results
    for p, e in zip(compiled_params, eager_params):
        torch.testing.assert_close(p, e, rtol=0, atol=0)
    for index, entry in eager_state.items():
        for key, value in entry.items():
            torch.testing.assert_close(compiled_state[index][key], value, rtol=0, atol=0)


def test_state_is_prepared_outside_the_trace_and_guarded_by_identity():
    """While dynamo traces a step it runs the optimizer's state creation eagerly
    (``compiled.prepare_state``, marked as torch.compiler.assume_constant_result marks) and
    marks every state tensor static, so that dynamo guards them by identity (as it does
    torch.optim's state) instead of checking each one's metadata on every call."""
    from torch._dynamo.utils import get_static_address_type

    from fused_optim.backends import compiled

    def probe():
        return 0

    assert torch.compiler.assume_constant_result(probe) is probe
    assert probe.__dict__ == compiled.prepare_state.__dict__ == {"_dynamo_marked_constant": True}
    params = _params()
    opt = _optimizer("AdamW", params, "cpu")
    _set_grads(params, 0)
    torch._dynamo.reset()
    torch.compile(opt.step, fullgraph=True, backend="aot_eager")()
    torch._dynamo.reset()
    tensors = [t for state in opt.state.values() for t in state.values()]
    assert len(tensors) == 3 * len(params)
    assert all(get_static_address_type(t) == "guarded" for t in tensors)


SPECIAL = {
    "complex": (
        lambda: [torch.randn(5, dtype=torch.complex64), torch.randn(3)],
        lambda ps, backend: fused_optim.AdamW(ps, lr=0.01, backend=backend),
    ),
    "tensor-lr": (
        lambda: [torch.randn(5), torch.randn(3, 2)],
        lambda ps, backend: fused_optim.Adam(ps, lr=torch.tensor(0.01), backend=backend),
    ),
    "bf16-master-weights": (
        lambda: [torch.randn(5).to(torch.bfloat16)],
        lambda ps, backend: fused_optim.AdamW(ps, lr=0.01, backend=backend, master_weights=True),
    ),
    "bf16-stochastic-rounding": (
        lambda: [torch.randn(64).to(torch.bfloat16)],
        lambda ps, backend: fused_optim.SGD(
            ps, lr=0.01, momentum=0.9, backend=backend, stochastic_rounding=True
        ),
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SPECIAL))
def test_compiled_special_params_are_the_eager_bits(case, backend):
    """Complex params (updated through real views, which the traced step stages), a tensor lr
    changed in place, bf16 params with fp32 master weights, and stochastic rounding: compiled
    steps give the bits of eager ones."""
    make_params, make_optimizer = SPECIAL[case]
    results = []
    for compiled in (True, False):
        torch.manual_seed(0)
        params = [t.requires_grad_() for t in make_params()]
        initial = [p.detach().clone() for p in params]
        opt = make_optimizer(params, backend)
        step = opt.step
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step, fullgraph=True, backend="aot_eager")
        for number in range(4):
            generator = torch.Generator().manual_seed(number)
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            lr = opt.param_groups[0]["lr"]
            if isinstance(lr, torch.Tensor):
                lr.fill_(0.01 / (number + 1))
            else:
                opt.param_groups[0]["lr"] = 0.01 / (number + 1)
            step()
        torch._dynamo.reset()
        assert all(not torch.equal(p, i) for p, i in zip(params, initial)), "a param did not move"
        results.append(params)
    for c, e in zip(*results):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_compiled_step_with_max_grad_norm_follows_the_eager_clip(backend):
    """``max_grad_norm`` under ``torch.compile(opt.step, fullgraph=True)``: the traced step takes
    torch's norm and multiplies the gradients by torch operations (the compiler reduces in its
    own order, so the norm may differ from the eager pass in its last bits); norms and params
    follow eager steps within fp32 rounding, and every step clipped."""
    torch.manual_seed(0)
    nn = torch.nn
    models = [nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    eager, traced = (fused_optim.AdamW(m.parameters(), lr=1e-2, max_grad_norm=0.5,
                                       backend=backend) for m in models)  # fmt: skip
    compiled = torch.compile(traced.step, fullgraph=True)
    for step in range(3):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step)) * (step + 1)
        for model in models:
            model.zero_grad()
            (model(x) ** 2).sum().backward()
        eager.step()
        compiled()
        assert float(eager.last_grad_norm) > 0.5
        torch.testing.assert_close(traced.last_grad_norm, eager.last_grad_norm, rtol=1e-6, atol=0)
        for a, b in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_two_optimizers_compile_with_fullgraph_in_one_process():
    """Two optimizers (a GAN's generator and discriminator, say), each step compiled with
    fullgraph=True, in one process: the second trace of the same step code must not turn the
    state-preparation key into a symbolic value (it did: dynamo refused the constant-result
    call and fullgraph failed)."""
    torch._dynamo.reset()
    models = [torch.nn.Linear(4, 4) for _ in range(2)]
    opts = [fused_optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    steps = [torch.compile(opt.step, fullgraph=True) for opt in opts]
    before = [m.weight.detach().clone() for m in models]
    for _ in range(3):
        for model, step in zip(models, steps):
            model.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            step()
    for model, start in zip(models, before):
        assert not torch.equal(model.weight, start)
    torch._dynamo.reset()
