"""The compiled GPU backends on a real CUDA device: Triton and the CUDA C++ kernels.

Skipped without a CUDA device. Run with the Triton kernels compiled (not interpreted):

    FUSED_OPTIM_TEST_COMPILED=1 python -m pytest tests/test_gpu.py

Checks, for every GPU backend that is available (Triton; CUDA C++ when fused_optim._C_cuda is
built):

* parity with the pure-torch reference (same math) and with torch's own fused optimizers, for
  SGD, Adam and AdamW on fp32 and bf16, many tensors in one launch, aligned and misaligned;
* one launch over the tensors of three param groups, each with its own hyperparameters (float
  lrs, and device tensor lrs the kernels read), equal to the reference with the same Work;
* a tensor of more than 2^31 elements: the elements past 2^31 get the reference's update,
  stochastic-rounding bits included (64-bit indexing end to end);
* GradScaler's skip: with found_inf set, params, states and grads stay bitwise the same;
* capture and replay of ``opt.step()`` in a CUDA graph with capturable=True match eager steps;
* gradient clipping in the step (``max_grad_norm``) agrees with the reference, without a sync.

Backends are driven through ``backends.contract`` (``run_sgd``/``run_adam``, the keyword form,
or typed calls on a ``Work``). Sized to run in well under two minutes on an H100/H200.
"""

from __future__ import annotations

import os

import pytest
import torch

import fused_optim
from fused_optim.backends import BACKENDS, contract, reference
from fused_optim.backends.contract import (
    AdamFlags,
    AdamHyper,
    SgdFlags,
    SgdHyper,
    StepContext,
    Work,
)

from cases import ADAM_GROUPS, SGD_GROUPS

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
)

DEVICE = torch.device("cuda")


def _triton_backend():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None, "TRITON_INTERPRET=1 (run with FUSED_OPTIM_TEST_COMPILED=1)"
    from fused_optim.backends import triton as module

    available, reason = module.is_available(DEVICE)
    return (module if available else None), reason


def _cuda_backend():
    from fused_optim.backends import cuda as module

    available, reason = module.is_available(DEVICE)
    return (module if available else None), reason


def backend_params():
    """pytest params of the GPU backend modules, skipped with the reason when unavailable."""
    params = []
    for name, factory in (("triton", _triton_backend), ("cuda", _cuda_backend)):
        if torch.cuda.is_available():
            module, reason = factory()
        else:
            module, reason = None, "no CUDA device"
        marks = () if module is not None else pytest.mark.skip(reason=f"{name}: {reason}")
        params.append(pytest.param(module, id=name, marks=marks))
    return params


def optimizer_backends():
    """Backend names the optimizers accept that can run here (``cuda`` once registered)."""
    params = []
    for name, factory in (("triton", _triton_backend), ("cuda", _cuda_backend)):
        if name not in BACKENDS:
            reason = f"{name!r} is not in fused_optim.backends.BACKENDS"
        elif not torch.cuda.is_available():
            reason = "no CUDA device"
        else:
            module, reason = factory()
            if module is not None:
                params.append(pytest.param(name, id=name))
                continue
        params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=reason)))
    return params


# Many tensors in one launch: empty, tiny, odd and chunk-straddling sizes.
SHAPES = [(0,), (), (1,), (7,), (1023,), (4096,), (4097,), (3, 5, 7), (65537,), (257, 129)]
SGD_KW = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False)
ADAM_KW = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01)
ALGORITHMS = {
    "sgd": None,
    "adam": dict(amsgrad=False, maximize=False, decoupled_weight_decay=False),
    "adamw-amsgrad": dict(amsgrad=True, maximize=False, decoupled_weight_decay=True),
}


def make_tensors(dtype, misaligned: bool, count_steps: int = 3, seed: int = 0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(shape):
        if not misaligned:
            return torch.randn(shape, device=DEVICE, generator=generator).to(dtype)
        # A view one element into its storage: not 16-byte aligned.
        numel = torch.Size(shape).numel()
        flat = torch.randn(numel + 1, device=DEVICE, generator=generator).to(dtype)
        return flat[1:].view(shape)

    params = [randn(s) for s in SHAPES]
    grads = [[randn(s) for s in SHAPES] for _ in range(count_steps)]
    return params, grads


def run_backend(module, algorithm, params, grads_per_step, **extra):
    """Steps of one group through the contract's keyword form, reusing the Work (its plan)."""
    params = [p.clone() for p in params]
    work = None
    if algorithm == "sgd":
        buffers = [None] * len(params)
        for grads in grads_per_step:
            work = contract.run_sgd(
                module, params, [g.clone() for g in grads], buffers, **SGD_KW, maximize=False,
                work=work,
            )  # fmt: skip
        return params, buffers
    flags = ALGORITHMS[algorithm]
    states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.tensor(0.0) for _ in params]
    for grads in grads_per_step:
        torch._foreach_add_(steps, 1)
        work = contract.run_adam(
            module,
            params,
            [g.clone() for g in grads],
            *states,
            steps,
            **ADAM_KW,
            **flags,
            work=work,
            **extra,
        )
    return params, states[0] + states[1]


def run_torch_fused(algorithm, params, grads_per_step):
    params = [p.clone().requires_grad_(True) for p in params]
    if algorithm == "sgd":
        kw = dict(SGD_KW)
        optimizer = torch.optim.SGD(params, **kw, fused=True)
    else:
        flags = ALGORITHMS[algorithm]
        cls = torch.optim.AdamW if flags["decoupled_weight_decay"] else torch.optim.Adam
        optimizer = cls(
            params,
            lr=ADAM_KW["lr"],
            betas=(ADAM_KW["beta1"], ADAM_KW["beta2"]),
            eps=ADAM_KW["eps"],
            weight_decay=ADAM_KW["weight_decay"],
            amsgrad=flags["amsgrad"],
            fused=True,
        )
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach() for p in params]


def assert_lists_close(actual, expected, what, **tolerance):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, msg=lambda m, i=i: f"{what}[{i}]: {m}", **tolerance)


@pytest.mark.parametrize("module", backend_params())
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
def test_parity_with_reference_and_torch_fused(module, algorithm, dtype, misaligned):
    params0, grads = make_tensors(dtype, misaligned)
    params, states = run_backend(module, algorithm, params0, grads)
    expected_params, expected_states = run_backend(reference, algorithm, params0, grads)
    assert_lists_close(params, expected_params, "param")
    assert_lists_close(states, expected_states, "state")
    for p, p0 in zip(params, params0):
        if p.numel():
            assert not torch.equal(p, p0)
    assert_lists_close(params, run_torch_fused(algorithm, params0, grads), "param vs torch fused")


# Three groups with their own hyperparameters, their tensors interleaved in one bucket.
GROUPS = [0, 1, 2, 1, 0, 2, 2, 1, 0, 1]


def run_groups(module, algorithm, params0, grads_per_step, tensor_lr):
    """Typed calls on one Work spanning three groups; lrs change every step (a scheduler)."""
    params = [p.clone() for p in params0]
    steps = [torch.tensor(float(i % 4)) for i in range(len(params))]  # per-group base steps
    if algorithm == "sgd":
        states = {"momentum_buffer": [None] * len(params)}
    else:
        states = {k: [torch.zeros_like(p) for p in params] for k in ("exp_avg", "exp_avg_sq")}
    work = Work(params=params, grads=[], states=states, groups=list(GROUPS), steps=steps,
                indices=list(range(len(params))), new_state_dtype=params[0].dtype)  # fmt: skip
    for step, grads in enumerate(grads_per_step):
        torch._foreach_add_(steps, 1)
        work.grads = [g.clone() for g in grads]
        hypers = []
        for values in ADAM_GROUPS if algorithm == "adam" else SGD_GROUPS:
            lr = values["lr"] * (1.0 - 0.1 * step)
            values = {**values, "lr": torch.tensor(lr, device=DEVICE) if tensor_lr else lr}
            hypers.append(AdamHyper(**values) if algorithm == "adam" else SgdHyper(**values))
        if algorithm == "adam":
            flags = AdamFlags(amsgrad=False, maximize=False, decoupled_weight_decay=True)
            module.adam(work, hypers, flags, StepContext())
        else:
            flags = SgdFlags(momentum=True, nesterov=False, maximize=False)
            created = module.sgd(work, hypers, flags, StepContext())
            for i, t in enumerate(created):
                if t is not None:
                    work.states["momentum_buffer"][i] = t
    return params, [t for column in work.states.values() for t in column]


@pytest.mark.parametrize("module", backend_params())
@pytest.mark.parametrize("algorithm", ["sgd", "adam"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "device-tensor-lr"])
def test_one_launch_updates_three_groups(module, algorithm, tensor_lr):
    params0, grads = make_tensors(torch.float32, False)
    params, states = run_groups(module, algorithm, params0, grads, tensor_lr)
    expected_params, expected_states = run_groups(reference, algorithm, params0, grads, tensor_lr)
    assert_lists_close(params, expected_params, "param")
    assert_lists_close(states, expected_states, "state")


def test_backends_agree_with_each_other():
    modules = [m for m, _ in (_triton_backend(), _cuda_backend()) if m is not None]
    if len(modules) < 2:
        pytest.skip("needs both the Triton and the CUDA C++ backend")
    params0, grads = make_tensors(torch.float32, False)
    for algorithm in ALGORITHMS:
        results = [run_backend(m, algorithm, params0, grads)[0] for m in modules]
        assert_lists_close(results[0], results[1], f"{algorithm} triton vs cuda")


# ----------------------------------------------------------------------------------------------
# More than 2^31 elements.

BIG = 2**31 + 4099
TAIL = 8192


def _tail_bits(seed: int, step: int, index: int, start: int, count: int):
    """reference.random_bits for elements start..start+count-1 of a dense tensor."""
    key = reference.mix32((seed & reference.MASK32) ^ 0x9E3779B9)
    key = reference.mix32(key ^ (step & reference.MASK32))
    key = reference.mix32(key ^ (index & reference.MASK32))
    offsets = torch.arange(start, start + count, device=DEVICE, dtype=torch.int64)
    return reference.mix32(reference.mix32(key ^ (offsets >> 32)) ^ (offsets & reference.MASK32))


@pytest.mark.parametrize("module", backend_params())
def test_tensor_of_more_than_2_to_the_31_elements(module):
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * BIG * 2 + (1 << 30):
        pytest.skip(f"needs ~{5 * BIG * 2 / 2**30:.0f} GiB of free GPU memory")
    dtype = torch.bfloat16
    param = torch.randn(BIG, device=DEVICE, dtype=dtype)
    grad = torch.randn(BIG, device=DEVICE, dtype=dtype)
    exp_avg = torch.randn(BIG, device=DEVICE, dtype=dtype).abs_()
    exp_avg_sq = torch.randn(BIG, device=DEVICE, dtype=dtype).abs_()
    tail = slice(BIG - TAIL, BIG)
    head = slice(0, TAIL)
    try:
        # Adam, bf16 states, round to nearest: the tail and the head against the reference.
        saved = {
            where: [t[where].clone() for t in (param, grad, exp_avg, exp_avg_sq)]
            for where in ("tail", "head")
        }
        step = torch.tensor(3.0)
        contract.run_adam(
            module, [param], [grad], [exp_avg], [exp_avg_sq], [], [step],
            **ADAM_KW, amsgrad=False, maximize=False, decoupled_weight_decay=True,
        )  # fmt: skip
        for where, index in (("tail", tail), ("head", head)):
            p, g, m, v = saved[where]
            contract.run_adam(
                reference, [p], [g], [m], [v], [], [torch.tensor(3.0)],
                **ADAM_KW, amsgrad=False, maximize=False, decoupled_weight_decay=True,
            )  # fmt: skip
            torch.testing.assert_close(param[index], p, msg=lambda m, w=where: f"{w}: {m}")
            torch.testing.assert_close(exp_avg[index], m)
            torch.testing.assert_close(exp_avg_sq[index], v)

        # SGD with stochastic rounding: the random bits hash the 64-bit element index.
        seed, index, step_value = 1234, 3, 7
        p_tail, g_tail = param[tail].clone(), grad[tail].clone()
        contract.run_sgd(
            module, [param], [grad], [None], lr=0.05, momentum=0.0, dampening=0.0,
            weight_decay=0.0, nesterov=False, maximize=False,
            steps=[torch.tensor(float(step_value))], stochastic_rounding=True, seed=seed,
            param_indices=[index],
        )  # fmt: skip
        # The kernels' fp32 fma(g, -lr, p), from the exact fp64 product (48 significant bits).
        neg_lr = torch.tensor(-0.05, dtype=torch.float32).item()
        exact = (p_tail.double() + g_tail.double() * neg_lr).float()
        bits = _tail_bits(seed, step_value, index, BIG - TAIL, TAIL)
        expected = reference.round_stochastic(exact, bits, dtype)
        assert torch.equal(param[tail], expected), "stochastic rounding past 2^31 differs"
    finally:
        del param, grad, exp_avg, exp_avg_sq
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# GradScaler's skip.


@pytest.mark.parametrize("module", backend_params())
@pytest.mark.parametrize("algorithm", ["sgd", "adamw-amsgrad"])
def test_found_inf_stores_nothing(module, algorithm):
    params, grads_per_step = make_tensors(torch.float32, False, count_steps=1)
    grads = grads_per_step[0]
    grad_scale = torch.tensor(4.0, device=DEVICE)
    work = None
    if algorithm == "sgd":
        buffers = [torch.randn_like(p) for p in params]
        tensors = params + grads + buffers

        def step(found_inf):
            nonlocal work
            work = contract.run_sgd(
                module, params, grads, buffers, **SGD_KW, maximize=False, work=work,
                grad_scale=grad_scale, found_inf=found_inf,
            )  # fmt: skip
    else:
        states = [[torch.rand_like(p) for p in params] for _ in range(3)]
        steps = [torch.tensor(5.0, device=DEVICE) for _ in params]
        tensors = params + grads + states[0] + states[1] + states[2] + steps

        def step(found_inf):
            nonlocal work
            work = contract.run_adam(
                module, params, grads, *states, steps, **ADAM_KW, **ALGORITHMS[algorithm],
                capturable=True, work=work, grad_scale=grad_scale, found_inf=found_inf,
            )  # fmt: skip

    before = [t.clone() for t in tensors]
    step(torch.tensor(1.0, device=DEVICE))
    for i, (after, old) in enumerate(zip(tensors, before)):
        assert torch.equal(after, old), f"tensor {i} changed although found_inf was set"
    step(torch.tensor(0.0, device=DEVICE))
    for g, g0 in zip(grads, before[len(params) : 2 * len(params)]):
        torch.testing.assert_close(g, g0 / 4.0)  # unscaled and written back
    assert any(not torch.equal(p, p0) for p, p0 in zip(params, before) if p.numel())


# ----------------------------------------------------------------------------------------------
# CUDA graphs.


@pytest.mark.parametrize("backend", optimizer_backends())
def test_cuda_graph_capture_and_replay_match_eager(backend):
    torch.manual_seed(0)
    shapes = [(1000, 17), (4097,), (3,), (256, 256)]
    initial = [torch.randn(s, device=DEVICE) for s in shapes]
    grads = [[torch.randn(s, device=DEVICE) for s in shapes] for _ in range(8)]
    warmup, replays = 3, 5

    def make():
        params = [p.clone().requires_grad_(True) for p in initial]
        lr = torch.tensor(1e-2, device=DEVICE)
        optimizer = fused_optim.AdamW(
            params, lr=lr, weight_decay=0.1, capturable=True, backend=backend
        )
        return params, optimizer

    eager_params, eager = make()
    for step_grads in grads[: warmup + replays]:
        for p, g in zip(eager_params, step_grads):
            p.grad = g.clone()
        eager.step()

    params, optimizer = make()
    static_grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step_grads in grads[:warmup]:
            for g, value in zip(static_grads, step_grads):
                g.copy_(value)
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    for step_grads in grads[warmup : warmup + replays]:
        for g, value in zip(static_grads, step_grads):
            g.copy_(value)
        graph.replay()
    torch.cuda.synchronize()

    for i, (p, e) in enumerate(zip(params, eager_params)):
        torch.testing.assert_close(p, e, rtol=0, atol=0, msg=lambda m, i=i: f"param {i}: {m}")
    for p, e in zip(params, eager_params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(optimizer.state[p][key], eager.state[e][key], rtol=0, atol=0)


@pytest.mark.parametrize("module", backend_params())
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_compiled_step_matches_eager_on_the_gpu(module, name):
    """torch.compile(opt.step) (inductor, fullgraph) on CUDA params: the traced step's custom
    op (``backends.compiled``) gives the bits of eager steps while lr changes every step, and
    compiles nothing after the first steps."""
    from torch._dynamo.utils import counters

    results, graphs = [], []
    for compiled in (True, False):
        torch.manual_seed(0)
        params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in (4097, (64, 33), 1)]
        kwargs = dict(momentum=0.9) if name == "SGD" else dict(weight_decay=0.1)
        opt = getattr(fused_optim, name)(params, lr=0.01, backend=module.NAME, **kwargs)
        step = opt.step
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            step = torch.compile(step, fullgraph=True)
        for number in range(6):
            generator = torch.Generator(device=DEVICE).manual_seed(number)
            for p in params:
                p.grad = torch.randn(p.shape, device=DEVICE, generator=generator)
            opt.param_groups[0]["lr"] = 0.01 / (number + 1)
            step()
            if compiled:
                graphs.append(counters["stats"]["unique_graphs"])
        torch._dynamo.reset()
        results.append([p.detach().clone() for p in params])
    assert graphs[3] == graphs[-1], graphs
    for c, e in zip(*results):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", optimizer_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_clip_in_the_step_matches_the_reference_without_a_sync(backend, dtype):
    """``max_grad_norm`` on the GPU: 3 steps agree with the reference backend's (the same norm,
    the coefficient applied the same way; as close as the parity test above), the norm matches
    torch's ``get_total_norm``, and steps after the first make no host sync."""
    gen = torch.Generator().manual_seed(3)
    sizes = [1, 7, 1024, 4097, 65537]
    init = [torch.randn(n, generator=gen).to(DEVICE, dtype) for n in sizes]
    grads = [[torch.randn(n, generator=gen).to(DEVICE, dtype) for n in sizes] for _ in range(3)]
    runs = {}
    for name in (backend, "reference"):
        params = [t.clone().requires_grad_() for t in init]
        opt = fused_optim.AdamW(params, lr=1e-2, max_grad_norm=0.5, backend=name)
        norms = []
        for step, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            if step >= 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            norms.append(opt.last_grad_norm)
            expected = torch.nn.utils.get_total_norm(step_grads)
            torch.testing.assert_close(norms[-1].float(), expected.float(), rtol=1e-2, atol=0)
        runs[name] = params
    assert_lists_close(runs[backend], runs["reference"], "param")
    for a, start in zip(runs[backend], init):
        assert not torch.equal(a, start)


@pytest.mark.parametrize("backend", optimizer_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_clipped_step_is_two_kernels_with_torch_s_coefficient(backend, dtype):
    """A clipped step on one bucket runs 2 device kernels whatever the number of tensors and
    groups: the norm pass (whose last block computes the norm and the coefficient) and the
    update. The coefficient is torch's ``clamp(max_norm / (total + 1e-6), max=1)`` of the
    returned norm, bitwise."""
    from fused_optim.backends import clip as clip_backend

    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen).to(DEVICE, dtype).requires_grad_()
              for n in [3, 4096, 70001] * 20]  # fmt: skip
    groups = [{"params": params[i::3], "lr": 0.01 * (i + 1)} for i in range(3)]
    opt = fused_optim.AdamW(groups, backend=backend)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, dtype)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            total = opt.clip_grad_norm_(0.5)
            coef = opt._clipping.coef
            opt.step()
            torch.cuda.synchronize()
        expected = clip_backend.coefficient(0.5, total).to(coef.dtype)
        assert torch.equal(coef, expected), (float(coef), float(expected))
        if step == 0:
            continue  # the first step also creates the state
        device = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = [
            name for name in device if not ("memcpy" in name.lower() or "memset" in name.lower())
        ]
        assert len(kernels) == 2, kernels
