"""Gradient clipping folded into the step: ``opt.clip_grad_norm_()`` and ``max_grad_norm=``.

* The total norm against the exact (fp64) norm and torch's ``get_total_norm``: within one
  rounding of the result's dtype, deterministic across calls, thread counts and kernel builds.
* The step: bitwise torch.optim's arithmetic (rounded correctly) after torch's
  ``grad.mul_(coef)`` with the coefficient of the returned norm, on every CPU backend; over the
  recipe's 7 steps, within torch's own fused-vs-for-loop agreement of torch's
  ``clip_grad_norm_`` + torch.optim.
* Gradients stay as they were unless asked; stale clips, GradScaler, errors, no gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fused_optim
from fused_optim.backends import clip as clip_backend
from fused_optim.backends import cpu as cpu_backend
from fused_optim.backends import plan as plans
from fused_optim.testing import correctly_rounded_optimizer

from cases import cpu_backends

MAX_NORM = 0.5
CLASSES = {
    "SGD": (fused_optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "Adam": (fused_optim.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "AdamW": (fused_optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


def _grads(dtype, seed=0, empty=True):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1,), (7,), (1025,), (70001,), (33, 17)] + ([(3, 0)] if empty else [])
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]
    grads[-1 if not empty else -2] = grads[-1 if not empty else -2].t()  # non-contiguous
    return grads


def _ulp(x: torch.Tensor) -> float:
    """One unit in the last place of ``x`` in its own dtype."""
    return float(torch.nextafter(x.abs(), torch.tensor(math.inf, dtype=x.dtype)) - x.abs())


NORMS = [2.0, 1.0, math.inf, 3.0, 0.5]


def _norm_backends():
    """The backends with a fused norm pass: the C++ CPU one and Triton (interpreted here)."""
    return [param for param in cpu_backends() if param.id in ("cpu", "triton")]


@pytest.mark.parametrize("backend", _norm_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_type", NORMS)
def test_total_norm_is_the_exact_norm_within_one_rounding(norm_type, dtype, backend):
    if backend == "triton" and norm_type not in (1.0, 2.0, math.inf):
        pytest.skip("Triton's norm pass covers the 1-, 2- and inf-norms (others are torch's)")
    grads = _grads(dtype, empty=norm_type != math.inf)
    fused = clip_backend._fused_backends(grads, backend, clip_backend._kind(norm_type))
    assert fused is not None  # the backend's own pass, not torch's
    ours = clip_backend.total_norm(grads, norm_type, None, backend)
    assert torch.equal(ours, clip_backend.total_norm(grads, norm_type, None, backend))
    theirs = torch.nn.utils.get_total_norm(grads, norm_type)
    exact = _exact_norm(grads, norm_type)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == ()
    if exact > torch.finfo(dtype).max:  # fp16's 0.5-norm overflows, as torch's does
        assert ours.isinf() and theirs.isinf()
        return
    error = abs(ours.double().item() - exact)
    if dtype == torch.float64:
        # fp64 sums of 70k terms, each rounded once: far below this, far above a lost tensor.
        assert error <= 1e-13 * exact, (ours.item(), exact)
    else:
        # fp64 sums of exact squares: the exact norm rounded once to the result's dtype (one
        # ulp); torch's fp32 sums are further off.
        assert error <= _ulp(ours), (ours.item(), exact, theirs.item())
        assert error <= abs(theirs.double().item() - exact) + _ulp(ours)


def _exact_norm(grads, norm_type) -> float:
    """The norm from Python's exactly rounded ``math.fsum`` of the values' powers."""
    values = [abs(x) for g in grads for x in g.double().flatten().tolist()]
    if norm_type == math.inf:
        return max(values)
    return math.fsum(x**norm_type for x in values) ** (1.0 / norm_type)


def test_total_norm_of_a_missing_tensor_is_caught():
    """The bound above still catches a pass that skips one small tensor."""
    grads = _grads(torch.float32)
    exact = _exact_norm(grads, 2.0)
    without = clip_backend.total_norm(grads[1:])  # drops the 1-element tensor
    assert abs(without.double().item() - exact) > _ulp(without)


@pytest.mark.skipif(not cpu_backend.is_available(torch.device("cpu"))[0], reason="no C++ backend")
def test_total_norm_is_deterministic_across_threads_and_builds():
    grads = [*_grads(torch.float32, empty=False), torch.randn(300000)]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, threads):
            torch.set_num_threads(count)
            for isa in cpu_backend.supported_isas():
                previous = cpu_backend.set_isa(isa)
                try:
                    for norm_type in NORMS[:-1]:
                        results.append(
                            (count, isa, norm_type, clip_backend.total_norm(grads, norm_type))
                        )
                finally:
                    cpu_backend.set_isa(previous)
    finally:
        torch.set_num_threads(threads)
    first = {norm_type: value for _, _, norm_type, value in results[: len(NORMS) - 1]}
    for count, isa, norm_type, value in results:
        assert torch.equal(value, first[norm_type]), (count, isa, norm_type)


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    return model.to(dtype)


def _backward(model, step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 16, generator=gen, dtype=dtype) * (step + 1)
    model.zero_grad()
    (model(x) ** 2).sum().backward()


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("backend", cpu_backends())
def test_step_is_torch_after_torch_s_clip_with_the_returned_norm(backend, name):
    """``clip_grad_norm_`` + ``step()`` equals torch.optim's arithmetic (rounded correctly)
    after ``grad.mul_(clamp(max_norm / (norm + 1e-6), max=1))`` with the returned norm, bit for
    bit, over 5 steps (some clipped, some not), and leaves the gradients as they were."""
    ours_cls, torch_cls, kwargs = CLASSES[name]
    dtype = torch.float32  # torch's fp32 arithmetic has a correctly rounded oracle; fp64 not
    ours_model, torch_model = _model(dtype=dtype), _model(dtype=dtype)
    ours = ours_cls(ours_model.parameters(), backend=backend, **kwargs)
    theirs = correctly_rounded_optimizer(torch_cls)(torch_model.parameters(), **kwargs)
    initial = [p.detach().clone() for p in ours_model.parameters()]
    clipped = 0
    for step in range(5):
        _backward(ours_model, step, dtype)
        _backward(torch_model, step, dtype)
        max_norm = MAX_NORM if step % 2 == 0 else 1e6
        total = ours.clip_grad_norm_(max_norm)
        grads = [p.grad.clone() for p in ours_model.parameters()]
        expected = torch.nn.utils.get_total_norm([p.grad for p in torch_model.parameters()])
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
        torch.nn.utils.clip_grads_with_norm_(torch_model.parameters(), max_norm, total)
        clipped += bool(total > max_norm)
        ours.step()
        theirs.step()
        for g, p in zip(grads, ours_model.parameters()):
            assert torch.equal(g, p.grad)  # not rewritten
        for a, b in zip(ours_model.parameters(), torch_model.parameters()):
            assert torch.equal(a, b), (step, (a - b).abs().max())
    assert clipped >= 2
    for a, start in zip(ours_model.parameters(), initial):
        assert not torch.equal(a, start)


@pytest.mark.parametrize("backend", _norm_backends())  # the reference is the oracle here
def test_bf16_step_equals_the_reference_backend(backend):
    """bf16 params and grads: the clipped gradient is rounded in bf16 as torch's mul_ does; every
    backend gives the reference's bits."""
    models = [_model(dtype=torch.bfloat16) for _ in range(2)]
    opts = [
        fused_optim.AdamW(models[0].parameters(), lr=1e-2, backend=backend, max_grad_norm=0.25),
        fused_optim.AdamW(models[1].parameters(), lr=1e-2, backend="reference"),
    ]
    for step in range(4):
        for model in models:
            _backward(model, step, torch.bfloat16)
        opts[1].clip_grad_norm_(0.25)
        opts[0].step()
        opts[1].step()
        assert torch.equal(opts[0].last_grad_norm, opts[1].last_grad_norm)
        for a, b in zip(*(m.parameters() for m in models)):
            assert torch.equal(a, b), (step, (a - b).abs().max())


def test_recipe_is_within_torch_s_own_fused_agreement():
    """Against torch's ``clip_grad_norm_`` + torch.optim.AdamW's for-loop over 7 steps: within
    4x the distance between that and the same clip + torch's ``fused=True`` step, measured in
    the same run (the norms differ in their last bits, so the params do too)."""
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    models = [_model() for _ in range(3)]
    ours = fused_optim.AdamW(models[0].parameters(), max_grad_norm=MAX_NORM, **kwargs)
    forloop = torch.optim.AdamW(models[1].parameters(), foreach=False, **kwargs)
    fused = torch.optim.AdamW(models[2].parameters(), fused=True, **kwargs)
    for step in range(7):
        for model in models:
            _backward(model, step)
        for model in models[1:]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        for opt in (ours, forloop, fused):
            opt.step()

    def distance(a, b):
        return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))

    torch_own = distance(models[1], models[2])
    scale = max(p.abs().max().item() for p in models[1].parameters())
    assert distance(models[0], models[1]) <= 4 * max(torch_own, scale * 2.0**-23)


@pytest.mark.parametrize("backend", cpu_backends())
def test_write_clipped_grads_writes_torch_s_clipped_grads(backend):
    model, twin = _model(), _model()
    opt = fused_optim.SGD(model.parameters(), lr=0.1, backend=backend, write_clipped_grads=True)
    _backward(model, 0)
    _backward(twin, 0)
    total = opt.clip_grad_norm_(MAX_NORM)
    torch.nn.utils.clip_grads_with_norm_(twin.parameters(), MAX_NORM, total)
    opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("backend", cpu_backends())
def test_max_grad_norm_equals_clip_grad_norm_each_step(backend):
    models = [_model(), _model()]
    automatic = fused_optim.Adam(models[0].parameters(), backend=backend, max_grad_norm=MAX_NORM)
    explicit = fused_optim.Adam(models[1].parameters(), backend=backend)
    for step in range(3):
        for model in models:
            _backward(model, step)
        total = explicit.clip_grad_norm_(MAX_NORM)
        automatic.step()
        explicit.step()
        assert torch.equal(automatic.last_grad_norm, total)
        for a, b in zip(*(m.parameters() for m in models)):
            assert torch.equal(a, b)
    assert automatic.launches_per_step() == 1


def test_cpu_fast_path_keeps_running_with_clipping():
    if not cpu_backend.is_available(torch.device("cpu"))[0]:
        pytest.skip("the C++ CPU backend is not built")
    model = _model()
    opt = fused_optim.AdamW(model.parameters(), backend="cpu", max_grad_norm=MAX_NORM)
    for step in range(4):
        _backward(model, step)
        opt.step()
    assert opt._plan.fast is not None and opt._plan.fast.succeeded


def test_a_clip_of_grads_modified_in_place_raises_and_changes_nothing():
    """Another backward pass accumulating into clipped gradients: torch would update with the
    clipped gradients plus the new ones, which no coefficient expresses. The step raises with
    nothing changed; after zero_grad() training goes on."""
    model = _model()
    opt = fused_optim.AdamW(model.parameters())
    _backward(model, 0)
    opt.clip_grad_norm_(MAX_NORM)
    (model(torch.randn(2, 16)) ** 2).sum().backward()  # accumulates into the grads
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="modified in place between clip_grad_norm_"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.state == {} or all(s["step"] == 0 for s in opt.state.values())
    opt.zero_grad()
    _backward(model, 1)
    opt.step()
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("backend", cpu_backends())
def test_a_clip_of_replaced_grads_does_not_apply(backend):
    """A module's zero_grad() (the optimizer is not told) and a new backward pass: the new
    gradient tensors carry no clip, as after torch's in-place clip, even when they reuse the
    old tensors' ids."""
    models = [_model(), _model()]
    opts = [fused_optim.SGD(m.parameters(), lr=0.1, backend=backend) for m in models]
    _backward(models[0], 0)
    opts[0].clip_grad_norm_(1e-3)
    for model, opt in zip(models, opts):
        _backward(model, 1)  # model.zero_grad() inside: new gradient tensors
        opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_two_clips_compose_as_torch_s_in_place_clips():
    """clip_grad_norm_(a) then clip_grad_norm_(b), and an explicit clip under max_grad_norm:
    each later clip sees the gradients as the earlier one left them, as torch's in-place clips
    would; the returned norms are those torch's calls return."""
    for first, second, automatic in ((0.5, 10.0, None), (10.0, 0.5, None), (0.5, None, 0.2)):
        models = [_model(), _model()]
        ours = fused_optim.SGD(models[0].parameters(), lr=0.1, max_grad_norm=automatic)
        theirs = torch.optim.SGD(models[1].parameters(), lr=0.1)
        for model in models:
            _backward(model, 2)
        norms = [ours.clip_grad_norm_(first)]
        expected = [torch.nn.utils.clip_grad_norm_(models[1].parameters(), first)]
        if second is not None:
            norms.append(ours.clip_grad_norm_(second))
            expected.append(torch.nn.utils.clip_grad_norm_(models[1].parameters(), second))
        if automatic is not None:
            expected.append(torch.nn.utils.clip_grad_norm_(models[1].parameters(), automatic))
        ours.step()
        theirs.step()
        if automatic is not None:
            norms.append(ours.last_grad_norm)
        for mine, torch_norm in zip(norms, expected, strict=True):
            torch.testing.assert_close(mine, torch_norm, rtol=1e-5, atol=0)
        for a, b in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_step_that_raises_keeps_the_clip_armed():
    """The coefficient is consumed by a step that succeeds: a step refused by torch.optim's
    checks (a bad lr set between steps) leaves it armed for the retry."""
    models = [_model(), _model()]
    opts = [fused_optim.SGD(m.parameters(), lr=0.1) for m in models]
    for model in models:
        _backward(model, 0)
    opts[0].clip_grad_norm_(MAX_NORM)
    opts[0].param_groups[0]["lr"] = "0.1"
    with pytest.raises(TypeError):
        opts[0].step()
    opts[0].param_groups[0]["lr"] = 0.1
    opts[0].step()
    torch.nn.utils.clip_grad_norm_(models[1].parameters(), MAX_NORM)
    opts[1].step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_param_listed_twice_is_measured_and_clipped_once():
    """The norm covers each param once and its gradient is clipped once, also on the step
    torch.optim's own code runs for a duplicated param (two updates, as torch.optim)."""
    a, b = (nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(i)))
            for i in range(2))  # fmt: skip
    twins = [nn.Parameter(t.detach().clone()) for t in (a, b)]
    for p, q in zip((a, b), twins):
        p.grad = torch.randn(5) * 10
        q.grad = p.grad.clone()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = fused_optim.SGD([a, b, a], lr=0.1)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ref = torch.optim.SGD([twins[0], twins[1], twins[0]], lr=0.1)
    total = opt.clip_grad_norm_(MAX_NORM)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(twins, MAX_NORM))
    opt.step()
    ref.step()
    for p, q in zip((a, b), twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_differentiable_step_with_a_closure_clips_the_closure_s_grads():
    """differentiable=True hands the step to torch.optim's code; with a closure, the clip
    applies to the gradients the closure makes (it runs first), as torch's clip after the
    backward pass would."""
    values = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    params, twins = ([t.clone() for t in values] for _ in range(2))
    new_grads = [torch.randn(5) * 10 for _ in range(3)]
    opt = fused_optim.SGD(params, lr=0.1, differentiable=True, max_grad_norm=0.5)
    ref = torch.optim.SGD(twins, lr=0.1)

    def closure():
        for p, g in zip(params, new_grads):
            p.grad = g.clone()
        return torch.tensor(1.0)

    for p in params:
        p.grad = torch.ones(5)  # replaced by the closure's
    opt.step(closure)
    for q, g in zip(twins, new_grads):
        q.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(twins, 0.5)
    ref.step()
    for p, q, start in zip(params, twins, values):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, start)


def test_an_eager_clip_then_a_fullgraph_compiled_step():
    model, twin = _model(), _model()
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2)
    eager = fused_optim.AdamW(twin.parameters(), lr=1e-2)
    step = torch.compile(opt.step, fullgraph=True)
    try:
        for it in range(2):
            for m in (model, twin):
                _backward(m, it)
            opt.clip_grad_norm_(MAX_NORM)
            eager.clip_grad_norm_(MAX_NORM)
            step()
            eager.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        torch._dynamo.reset()


def test_zero_grad_cancels_a_clip():
    models = [_model(), _model()]
    opts = [fused_optim.SGD(m.parameters(), lr=0.1) for m in models]
    _backward(models[0], 0)
    opts[0].clip_grad_norm_(1e-3)
    opts[0].zero_grad()
    for model, opt in zip(models, opts):
        _backward(model, 1)
        opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_grad_scaler_norm_of_unscaled_grads_and_skip():
    """``max_grad_norm`` under GradScaler: the norm is that of the unscaled gradients, the step
    is torch's unscale + clip + step; an inf gradient gives an inf norm and skips the step."""
    models = [_model(), _model()]
    ours = fused_optim.AdamW(models[0].parameters(), lr=1e-2, max_grad_norm=MAX_NORM)
    theirs = correctly_rounded_optimizer(torch.optim.AdamW)(models[1].parameters(), lr=1e-2)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    for step in range(3):
        for model, scaler in zip(models, scalers):
            model.zero_grad()
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step)) * (step + 1)
            scaler.scale((model(x) ** 2).sum()).backward()
        scalers[1].unscale_(theirs)
        expected = torch.nn.utils.get_total_norm([p.grad for p in models[1].parameters()])
        scalers[0].step(ours)
        torch.testing.assert_close(ours.last_grad_norm, expected, rtol=1e-6, atol=0)
        torch.nn.utils.clip_grads_with_norm_(models[1].parameters(), MAX_NORM, ours.last_grad_norm)
        scalers[1].step(theirs)
        for scaler in scalers:
            scaler.update()
        for a, b in zip(*(m.parameters() for m in models)):
            assert torch.equal(a, b), step
    before = [p.detach().clone() for p in models[0].parameters()]
    for p in models[0].parameters():
        p.grad = torch.full_like(p, math.inf)
    scalers[0].step(ours)
    assert not torch.isfinite(ours.last_grad_norm)
    assert bool(ours.step_skipped)
    assert all(torch.equal(a, p) for a, p in zip(before, models[0].parameters()))


def test_error_if_nonfinite_is_torch_s_error_and_arms_nothing():
    model = _model()
    opt = fused_optim.SGD(model.parameters(), lr=0.1)
    _backward(model, 0)
    next(model.parameters()).grad[0, 0] = math.nan
    with pytest.raises(RuntimeError) as ours:
        opt.clip_grad_norm_(MAX_NORM, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    assert opt._clipping.coef is None


def test_no_grads_and_empty_inf_norm_as_torch():
    model = _model()
    opt = fused_optim.AdamW(model.parameters())
    total = opt.clip_grad_norm_(1.0)
    assert torch.equal(total, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    p = nn.Parameter(torch.zeros(0))
    p.grad = torch.zeros(0)
    opt = fused_optim.AdamW([p])
    with pytest.raises(RuntimeError) as ours:
        opt.clip_grad_norm_(1.0, norm_type=math.inf)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_([p], 1.0, norm_type=math.inf)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan])
def test_invalid_max_grad_norm(value):
    with pytest.raises(ValueError, match="Invalid max_grad_norm"):
        fused_optim.AdamW([nn.Parameter(torch.ones(2))], max_grad_norm=value)


def test_pickling_keeps_the_clipping_configuration():
    import copy

    opt = fused_optim.AdamW([nn.Parameter(torch.ones(2))], max_grad_norm=2.0,
                            write_clipped_grads=True)  # fmt: skip
    twin = copy.deepcopy(opt)
    assert twin._clipping.max_grad_norm == 2.0 and twin._clipping.write_clipped_grads


@pytest.mark.parametrize("backend", cpu_backends())
def test_written_grads_are_torch_s_clip_in_every_dtype(backend):
    """With gradients of four dtypes clipped together (the total norm, and so the coefficient,
    is fp64), the gradients each backend writes back are bitwise those of torch's
    ``clip_grads_with_norm_`` with the returned norm: the product of the gradient and the
    coefficient's value, rounded to the gradient's dtype (not the coefficient first)."""
    gen = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    params = [nn.Parameter(torch.randn(257, generator=gen).to(dtype)) for dtype in dtypes]
    grads = [torch.randn(257, generator=gen).to(dtype) * 3 for dtype in dtypes]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q, g in zip(params, twins, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt = fused_optim.SGD(params, lr=0.1, backend=backend, write_clipped_grads=True)
    total = opt.clip_grad_norm_(MAX_NORM)
    assert total.dtype == torch.float64 and float(total) > MAX_NORM
    torch.nn.utils.clip_grads_with_norm_(twins, MAX_NORM, total)
    opt.step()
    for p, q in zip(params, twins):
        assert torch.equal(p.grad, q.grad), p.dtype
    assert opt.launches_per_step() == 4


def _clip_parity_cases():
    from fused_optim import testing

    for name in testing.OPTIMIZERS:
        for config in testing.CONFIGS[name]:
            for dtype in testing.DTYPES.values():
                label = f"{name}[{testing.config_label(config)}]-{testing.dtype_name(dtype)}"
                yield pytest.param(name, config, dtype, id=label)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name, config, dtype", list(_clip_parity_cases()))
def test_recipe_with_max_grad_norm_matches_torch_for_every_config_and_dtype(
    name, config, dtype, backend
):
    """PyTorch's parity recipe (7 steps, frozen layer, no-grad step, zero-size param) with
    ``max_grad_norm``, for every configuration and dtype of the parity matrix: params and every
    state entry within the usual bounds of torch.optim after torch's clip, and the total norm
    within the rounding of its sum of torch's ``get_total_norm`` (testing.compare_to_torch)."""
    from fused_optim import testing

    config = testing.adapt_config(name, config, dtype)
    report = testing.compare_to_torch(
        name, config, dtype=dtype, backend=backend, max_grad_norm=1.5
    ).assert_ok()
    assert report.clipped_steps >= 3


def _triton_or_skip():
    available, reason = fused_optim.backends._module("triton").is_available(torch.device("cpu"))
    if not available:
        pytest.skip(f"backend 'triton': {reason}")
    from fused_optim.backends import triton as triton_backend

    return triton_backend


def _grad_sets():
    """Gradient lists of every result dtype, one of mixed dtypes, and ones with inf and NaN."""
    sets = [(dtype, _grads(dtype, seed=3)) for dtype in
            (torch.float32, torch.float64, torch.bfloat16, torch.float16)]  # fmt: skip
    mixed = _grads(torch.float32, seed=4)
    mixed[1], mixed[3] = mixed[1].to(torch.bfloat16), mixed[3].to(torch.float64)
    sets.append(("mixed", mixed))
    poisoned = _grads(torch.float32, seed=5)
    poisoned[2][7] = math.inf
    sets.append(("inf", poisoned))
    poisoned = _grads(torch.float32, seed=6)
    poisoned[3][70000] = math.nan
    sets.append(("nan", poisoned))
    # A norm near torch's 1e-6: the shift is visible in the coefficient.
    sets.append(("tiny", [g * 1e-8 for g in _grads(torch.float32, seed=7)]))
    return sets


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale"])
def test_triton_norm_pass_finishes_torch_s_coefficient_bitwise(norm_type, scaled):
    """Triton's norm pass computes the clipping coefficient itself, in the program that finishes
    the norm: the norm and coefficient are bitwise those of the norm's torch operations and
    torch's ``clamp(max_norm / (total + 1e-6), max=1)``, for every result dtype, mixed dtypes,
    inf and NaN, max_norm below, near and above the norm; two runs give the same bits."""
    triton_backend = _triton_or_skip()
    kind = clip_backend._kind(norm_type)
    scale = torch.tensor(1024.0) if scaled else None
    for label, grads in _grad_sets():
        if norm_type == math.inf:
            grads = [g for g in grads if g.numel()]  # torch refuses the inf-norm of nothing
        total = clip_backend.total_norm(grads, norm_type, scale, "triton")
        finite = float(total) if math.isfinite(float(total)) else 1.0
        for max_norm in (0.5 * finite, finite, 2.0 * finite, 1e-3):
            both = triton_backend.grad_norm_and_coefficient(grads, kind, scale, max_norm,
                                                            total.dtype)  # fmt: skip
            assert both is not None
            ours_total, ours_coef = both
            assert ours_total.dtype == total.dtype, label
            assert torch.equal(ours_total, total) or (total.isnan() and ours_total.isnan())
            # torch's coefficient (a value of the norm's dtype), held in the compute dtype.
            expected = clip_backend.coefficient(max_norm, total).to(ours_coef.dtype)
            compute = torch.float64 if total.dtype == torch.float64 else torch.float32
            assert ours_coef.dtype == compute
            assert ours_coef.view(-1).view(torch.uint8).tolist() == (
                expected.view(-1).view(torch.uint8).tolist()
            ), (label, max_norm, float(ours_coef), float(expected))
            again = triton_backend.grad_norm_and_coefficient(grads, kind, scale, max_norm,
                                                             total.dtype)  # fmt: skip
            assert torch.equal(again[1], ours_coef) or ours_coef.isnan()
    assert all(int(c) == 0 for c in plans.NormPass._counters.values())


def test_triton_clip_and_step_take_two_launches_and_no_torch_operations(monkeypatch):
    """``max_grad_norm`` on Triton: per step, one norm launch and one update launch for the
    bucket, and the coefficient is never computed by torch operations (they would be further
    launches on a GPU); the params are those of torch's clip + torch.optim."""
    _triton_or_skip()
    from fused_optim.backends.triton import kernels

    launches = {"norm_kernel": 0, "adam_kernel": 0}

    class Counting:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(kernels, name)

        def __getitem__(self, grid):
            launches[self.name] += 1
            return self.kernel[grid]

    for name in launches:
        monkeypatch.setattr(kernels, name, Counting(name))

    def refuse(*args, **kwargs):
        raise AssertionError("the coefficient went through torch operations")

    models = [_model(seed=2), _model(seed=2)]
    ours = fused_optim.AdamW(models[0].parameters(), lr=1e-2, backend="triton",
                             max_grad_norm=MAX_NORM)  # fmt: skip
    exact = correctly_rounded_optimizer(torch.optim.AdamW)
    theirs = exact(models[1].parameters(), lr=1e-2, foreach=False)
    monkeypatch.setattr(clip_backend, "coefficient", refuse)
    monkeypatch.setattr(clip_backend, "total_norm", refuse)
    for step in range(3):
        for model in models:
            _backward(model, step)
        before = dict(launches)
        ours.step()
        assert launches["norm_kernel"] - before["norm_kernel"] == 1
        assert launches["adam_kernel"] - before["adam_kernel"] == 1
        assert ours.launches_per_step() == 1
        total = torch.nn.utils.clip_grad_norm_(models[1].parameters(), MAX_NORM)
        theirs.step()
        assert float(total) > MAX_NORM  # the clip clipped
        torch.testing.assert_close(ours.last_grad_norm, total, rtol=1e-6, atol=0)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
