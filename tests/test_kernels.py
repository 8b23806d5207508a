"""The Triton kernels on raw tensor lists: shapes, layouts, dtypes, many tensors, one launch.

The oracle is the pure-torch reference backend, which does the same fp32 math and rounds once;
results must agree within torch.testing's default tolerance for the dtype, and every non-empty
tensor must have moved.
"""

from __future__ import annotations

import pytest
import torch

import fused_optim
from fused_optim.backends import BackendUnavailableError, contract, reference, select_backend
from fused_optim.backends import triton as triton_backend
from fused_optim.backends.triton import kernels

from cases import AUTO_CPU, BLOCK, DTYPES, SHAPES

# Zero-size tensors first, in the middle and last.
LIST_SHAPES = [(0,), *SHAPES[1:5], (0, 3), *SHAPES[5:], (0,)]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]
SGD_KW = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False)
ADAM_KW = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01)


def test_block_size_matches_the_cases():
    assert triton_backend.BLOCK == BLOCK


def random_like_list(shapes, dtype, scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def clone_all(tensors):
    return [t.clone() for t in tensors]


def run_adam(backend, params, grads_per_step, states, steps, **flags):
    work = None
    for grads in grads_per_step:
        torch._foreach_add_(steps, 1)
        work = contract.run_adam(backend, params, grads, *states, steps, **ADAM_KW, **flags,
                                 work=work)  # fmt: skip


def run_sgd(backend, params, grads_per_step, buffers, nesterov=False):
    work = None
    kw = {**SGD_KW, "nesterov": nesterov, "dampening": 0.0 if nesterov else 0.1}
    for grads in grads_per_step:
        work = contract.run_sgd(backend, params, grads, buffers, **kw, maximize=False, work=work)


def assert_lists_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def assert_all_moved(after, before):
    for i, (a, b) in enumerate(zip(after, before)):
        if a.numel():
            assert not torch.equal(a, b), f"tensor {i} did not move"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "flags",
    [
        dict(amsgrad=True, maximize=False, decoupled_weight_decay=False),
        dict(amsgrad=False, maximize=True, decoupled_weight_decay=True),
    ],
    ids=["adam-amsgrad", "adamw-maximize"],
)
def test_adam_kernel_matches_reference_on_all_shapes(dtype, flags):
    params0 = random_like_list(LIST_SHAPES, dtype)
    grads_per_step = [random_like_list(LIST_SHAPES, dtype) for _ in range(3)]
    results = []
    for backend in (triton_backend, reference):
        params = clone_all(params0)
        states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        steps = [torch.tensor(0.0) for _ in params]
        run_adam(backend, params, grads_per_step, states, steps, **flags)
        results.append((params, states))
    (params, states), (ref_params, ref_states) = results
    assert_lists_close(params, ref_params, "param")
    for k, (column, ref_column) in enumerate(zip(states, ref_states)):
        if k < 2 or flags["amsgrad"]:
            assert_lists_close(column, ref_column, f"state{k}")
    assert_all_moved(params, params0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_sgd_kernel_matches_reference_on_all_shapes(dtype, nesterov):
    params0 = random_like_list(LIST_SHAPES, dtype)
    grads_per_step = [random_like_list(LIST_SHAPES, dtype) for _ in range(3)]
    results = []
    for backend in (triton_backend, reference):
        params = clone_all(params0)
        buffers = [None] * len(params)
        run_sgd(backend, params, grads_per_step, buffers, nesterov)
        results.append((params, buffers))
    (params, buffers), (ref_params, ref_buffers) = results
    assert_lists_close(params, ref_params, "param")
    assert_lists_close(buffers, ref_buffers, "momentum_buffer")
    assert_all_moved(params, params0)


def layouts():
    """(name, make_param, make_grad): the layouts a param and its gradient can come in."""

    def noncontiguous_param():
        base = torch.randn(6, 10)
        return base[:, ::2], base  # a strided view: the kernel cannot walk it as one span

    def transposed_param():
        base = torch.randn(9, 5)
        return base.t(), base

    def channels_last_param():
        t = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
        return t, t

    def contiguous_param():
        t = torch.randn(5, 9)
        return t, t

    return {
        "noncontiguous": (noncontiguous_param, lambda p: torch.randn(p.shape)),
        "transposed": (transposed_param, lambda p: torch.randn(p.shape)),
        "channels_last": (
            channels_last_param,
            lambda p: torch.randn(p.shape).to(memory_format=torch.channels_last),
        ),
        "grad-strides-differ": (contiguous_param, lambda p: torch.randn(p.shape[::-1]).t()),
        "channels-last-param-contiguous-grad": (
            channels_last_param,
            lambda p: torch.randn(p.shape),
        ),
    }


LAYOUTS = layouts()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_layouts_update_the_real_param_in_place(layout, name):
    make_param, make_grad = LAYOUTS[layout]
    param, base = make_param()
    twin_base = base.clone()
    # The same view of a copy of the storage, for torch.optim.
    twin = torch.as_strided(twin_base, param.shape, param.stride(), param.storage_offset())
    base_before = base.clone()
    param.requires_grad_()
    twin.requires_grad_()
    if name == "SGD":
        ours = fused_optim.SGD([param], lr=0.1, momentum=0.9)
        theirs = torch.optim.SGD([twin], lr=0.1, momentum=0.9, foreach=False)
    else:
        ours = fused_optim.Adam([param], lr=0.1)
        theirs = torch.optim.Adam([twin], lr=0.1, foreach=False)
    for _ in range(3):
        grad = make_grad(param)
        param.grad = grad
        twin.grad = grad.clone()
        ours.step()
        theirs.step()
    # The update landed in the caller's tensor (and its storage), not in a copy.
    torch.testing.assert_close(base, twin_base)
    assert not torch.equal(
        param.detach(),
        torch.as_strided(base_before, param.shape, param.stride(), param.storage_offset()),
    )
    if layout == "noncontiguous":
        # Columns outside the view are untouched.
        assert torch.equal(base[:, 1::2], base_before[:, 1::2])
    for key, value in theirs.state[twin].items():
        torch.testing.assert_close(ours.state[param][key], value)


def count_launches(monkeypatch, kernel) -> list[int]:
    calls: list[int] = []
    original = kernel.run

    def counting_run(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", counting_run)
    return calls


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_hundreds_of_tensors_one_launch_per_step(monkeypatch, name):
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 300, (300,), generator=gen).tolist()
    params = [torch.randn(n, generator=gen).requires_grad_() for n in sizes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    initial = [p.detach().clone() for p in params]
    kernel = kernels.sgd_kernel if name == "SGD" else kernels.adam_kernel
    calls = count_launches(monkeypatch, kernel)
    kw = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    ours = getattr(fused_optim, name)(params, **kw, backend="triton")
    theirs = getattr(torch.optim, name)(twins, **kw, foreach=False)
    for step in range(3):
        for p, t in zip(params, twins):
            g = torch.randn(p.shape, generator=gen)
            p.grad, t.grad = g, g.clone()
        ours.step()
        theirs.step()
        assert len(calls) == step + 1, f"{len(calls)} launches after {step + 1} steps"
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t)
    assert_all_moved([p.detach() for p in params], initial)


def test_plan_is_cached_and_rebuilt_only_when_tensors_move():
    params = [torch.randn(100).requires_grad_() for _ in range(4)]
    opt = fused_optim.Adam(params, lr=0.01, backend="triton")
    for p in params:
        p.grad = torch.randn(100)
    opt.step()
    step_plan = opt._plan
    first = step_plan.buckets[0].work.plan["triton"]
    # New gradient tensors and a new lr: same work, same plan, grads re-bound.
    for p in params:
        p.grad = torch.randn(100)
    opt.param_groups[0]["lr"] = 0.02
    opt.step()
    assert opt._plan is step_plan and step_plan.buckets[0].work.plan["triton"] is first
    # A param whose storage moved (as module.to() does): rebuilt, and the new storage is updated.
    params[1].data = torch.randn(100)
    moved = params[1].detach().clone()
    opt.step()
    assert opt._plan is not step_plan or step_plan.buckets[0].work.plan["triton"] is not first
    assert not torch.equal(params[1].detach(), moved)
    # A state tensor replaced by hand (as offloading code does): the new one is updated.
    new_exp_avg = opt.state[params[2]]["exp_avg"].clone()
    opt.state[params[2]]["exp_avg"] = new_exp_avg
    before = new_exp_avg.clone()
    opt.step()
    assert not torch.equal(new_exp_avg, before)


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        select_backend("triton", torch.device("cpu"))
    # Auto falls back silently: to the C++ CPU backend when it is built, else the reference.
    fallback = "cpu" if AUTO_CPU == "cpu" else "reference"
    assert select_backend(None, torch.device("cpu")).NAME == fallback
    opt = fused_optim.SGD([torch.randn(3, requires_grad=True)], backend="triton")
    opt.param_groups[0]["params"][0].grad = torch.randn(3)
    before = opt.param_groups[0]["params"][0].detach().clone()
    with pytest.raises(BackendUnavailableError):
        opt.step()
    assert torch.equal(opt.param_groups[0]["params"][0].detach(), before)


def test_available_backends_under_the_interpreter():
    built = ["cpu"] if AUTO_CPU == "cpu" else []
    assert fused_optim.available_backends("cpu") == ["triton", *built, "reference"]


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_unaligned_views_into_one_flat_buffer(name):
    # Params packed in one flat buffer (as flat-parameter wrappers and sharded optimizers keep
    # them): dense, but not 16-byte aligned, so the kernel must not assume vector alignment.
    flat = torch.randn(1 + 7 + BLOCK + 3 + 2 * BLOCK + 5)
    twin_flat = flat.clone()
    sizes = [7, BLOCK + 3, 2 * BLOCK, 5]
    offsets = [1, 8, 8 + BLOCK + 3, 8 + 3 * BLOCK + 3]
    params = [flat[o : o + n] for o, n in zip(offsets, sizes)]
    twins = [twin_flat[o : o + n] for o, n in zip(offsets, sizes)]
    assert any(p.data_ptr() % 16 for p in params)
    for t in (*params, *twins):
        t.requires_grad_()
    kw = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    ours = getattr(fused_optim, name)(params, **kw, backend="triton")
    theirs = getattr(torch.optim, name)(twins, **kw, foreach=False)
    before = flat.clone()
    for _ in range(2):
        for p, t in zip(params, twins):
            p.grad = torch.randn(p.shape)
            t.grad = p.grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(flat, twin_flat)
    assert flat[0] == before[0]  # outside every view
    assert_all_moved(params, [before[o : o + n] for o, n in zip(offsets, sizes)])
