"""The fused C++ CPU backend (backend="cpu", fused_optim._C_cpu) on raw tensor lists and end to end.

Oracles: the pure-torch reference backend (same fp32 math, one rounding at the store) and
torch.optim's for-loop (foreach=False) through fused_optim.testing's parity recipe, with the same
pinned bounds as test_parity.py. Stochastic rounding must be bitwise the reference's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fused_optim.backends import BackendUnavailableError, contract, reference, select_backend
from fused_optim.backends import cpu as cpu_backend
from fused_optim.testing import adapt_config, compare_to_torch

from cases import DTYPES, SHAPES, optimizer_cases

CPU = torch.device("cpu")
AVAILABLE, WHY = cpu_backend.is_available(CPU)
if not AVAILABLE and os.environ.get("FUSED_OPTIM_REQUIRE_CPU_BUILD", "0") not in ("", "0"):
    # CI builds the extension and requires it: a broken build must fail, not skip.
    raise RuntimeError(f"FUSED_OPTIM_REQUIRE_CPU_BUILD=1 but the C++ CPU backend is missing: {WHY}")
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"the C++ CPU extension is not built: {WHY}")

# Zero-size tensors first, in the middle and last; sizes around the kernel's block and chunk.
LIST_SHAPES = [(0,), *SHAPES[1:5], (0, 3), *SHAPES[5:], (16384 + 5,), (3, 40000), (0,)]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]
SGD_KW = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False)
ADAM_KW = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01)
ADAM_FLAGS = {
    "adam-amsgrad": dict(amsgrad=True, maximize=False, decoupled_weight_decay=False),
    "adamw-maximize": dict(amsgrad=False, maximize=True, decoupled_weight_decay=True),
    "adamw": dict(amsgrad=False, maximize=False, decoupled_weight_decay=True),
}
FP32_MAX_ABS = {"SGD": 1.2e-7, "Adam": 3e-8, "AdamW": 3e-8}
FP64_MAX_ABS = 4 * torch.finfo(torch.float64).eps


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randoms(shapes, dtype, scale=1.0, generator=None):
    return [
        (torch.randn(s, dtype=torch.float64, generator=generator) * scale).to(dtype) for s in shapes
    ]


def clone_all(tensors):
    return [t.clone() for t in tensors]


def assert_lists_close(actual, expected, what, exact=False):
    for i, (a, e) in enumerate(zip(actual, expected)):
        if exact:
            assert a.dtype == e.dtype and torch.equal(a, e), f"{what}[{i}] differs"
        else:
            torch.testing.assert_close(a, e, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def run_adam(backend, params, grads_per_step, states, steps, **kw):
    for grads in grads_per_step:
        torch._foreach_add_(steps, 1)
        contract.run_adam(backend, params, grads, *states, steps, **{**ADAM_KW, **kw})


def run_sgd(backend, params, grads_per_step, buffers, **kw):
    for grads in grads_per_step:
        contract.run_sgd(backend, params, grads, buffers, **{**SGD_KW, "maximize": False, **kw})


def adam_both(params0, grads_per_step, state_dtype=None, masters0=None, **kw):
    """(params, states, masters) after the cpu backend and after the reference."""
    results = []
    for backend in (cpu_backend, reference):
        params = clone_all(params0)
        states = [
            [torch.zeros_like(p, dtype=state_dtype or p.dtype) for p in params] for _ in range(3)
        ]
        steps = [torch.tensor(0.0) for _ in params]
        masters = clone_all(masters0) if masters0 is not None else None
        grads = [clone_all(g) for g in grads_per_step]
        run_adam(backend, params, grads, states, steps, master_params=masters, **kw)
        results.append((params, states, masters))
    return results


# ------------------------------------------------------------------------ kernels vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("flags", list(ADAM_FLAGS.values()), ids=list(ADAM_FLAGS))
def test_adam_matches_reference_on_all_shapes(dtype, flags):
    params0 = randoms(LIST_SHAPES, dtype)
    grads = [randoms(LIST_SHAPES, dtype) for _ in range(3)]
    (params, states, _), (ref_params, ref_states, _) = adam_both(params0, grads, **flags)
    assert_lists_close(params, ref_params, "param")
    for k in range(3 if flags["amsgrad"] else 2):
        assert_lists_close(states[k], ref_states[k], f"state{k}")
    for i, (a, b) in enumerate(zip(params, params0)):
        # (A lone bf16/fp16 element may stay put: its three updates can cancel.)
        assert a.numel() <= 1 or not torch.equal(a, b), f"param {i} did not move"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(nesterov=True, dampening=0.0), dict(momentum=0.0), dict(maximize=True)],
    ids=["momentum", "nesterov", "plain", "maximize"],
)
def test_sgd_matches_reference_on_all_shapes(dtype, kw):
    params0 = randoms(LIST_SHAPES, dtype)
    grads = [randoms(LIST_SHAPES, dtype) for _ in range(3)]
    results = []
    for backend in (cpu_backend, reference):
        params = clone_all(params0)
        buffers = [None] * len(params)
        run_sgd(backend, params, [clone_all(g) for g in grads], buffers, **kw)
        results.append((params, buffers))
    (params, buffers), (ref_params, ref_buffers) = results
    assert_lists_close(params, ref_params, "param")
    if kw.get("momentum", 0.9):
        assert [b.dtype for b in buffers] == [p.dtype for p in params]
        assert_lists_close(buffers, ref_buffers, "momentum_buffer")
    else:
        assert buffers == [None] * len(params)


def layouts():
    """name -> (make param, make grad) for a dtype: strided, transposed and channels_last
    params, grads whose layout differs from the param's."""

    def channels_last(*shape, dtype):
        return torch.randn(*shape).to(dtype).to(memory_format=torch.channels_last)

    return {
        "strided": (
            lambda dtype: torch.randn(6, 10).to(dtype)[:, ::2],
            lambda p: torch.randn(p.shape).to(p.dtype),
        ),
        "transposed": (
            lambda dtype: torch.randn(9, 5).to(dtype).t(),
            lambda p: torch.randn(p.shape).to(p.dtype),
        ),
        "channels_last": (
            lambda dtype: channels_last(2, 3, 4, 5, dtype=dtype),
            lambda p: channels_last(*p.shape, dtype=p.dtype),
        ),
        "grad-strides-differ": (
            lambda dtype: torch.randn(5, 9).to(dtype),
            lambda p: torch.randn(p.shape[::-1]).to(p.dtype).t(),
        ),
        "channels-last-param-contiguous-grad": (
            lambda dtype: channels_last(2, 3, 4, 5, dtype=dtype),
            lambda p: torch.randn(p.shape).to(p.dtype),
        ),
    }


@pytest.mark.parametrize("layout", list(layouts()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layouts_update_the_real_tensors_in_place(layout, dtype):
    make_param, make_grad = layouts()[layout]
    results = []
    for backend in (cpu_backend, reference):
        torch.manual_seed(0)
        # The params are the (possibly strided) views themselves: the update must land there.
        params = [make_param(dtype), torch.randn(33).to(dtype)]
        strides = [p.stride() for p in params]
        grads = [[make_grad(params[0]), torch.randn(33).to(dtype)] for _ in range(2)]
        states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        steps = [torch.tensor(0.0) for _ in params]
        run_adam(backend, params, grads, [*states, []], steps, **ADAM_FLAGS["adamw"])
        assert [p.stride() for p in params] == strides
        results.append((params, states, grads))
    (params, states, grads), (ref_params, ref_states, ref_grads) = results
    assert_lists_close(params, ref_params, "param")
    assert_lists_close(states[0], ref_states[0], "exp_avg")
    assert_lists_close(states[1], ref_states[1], "exp_avg_sq")
    assert_lists_close(grads[1], ref_grads[1], "grad", exact=True)


@pytest.mark.parametrize("layout", list(layouts()))
def test_sgd_on_layouts(layout):
    make_param, make_grad = layouts()[layout]
    torch.manual_seed(1)
    param = make_param(torch.float32)
    grad = make_grad(param)
    expected = param.clone()
    contract.run_sgd(reference, [expected], [grad.clone()], [None], **SGD_KW, maximize=False)
    buffers = [None]
    contract.run_sgd(cpu_backend, [param], [grad.clone()], buffers, **SGD_KW, maximize=False)
    torch.testing.assert_close(param, expected)
    assert buffers[0].shape == param.shape


@pytest.mark.parametrize(
    "param_dtype,state_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float64, torch.float32),
    ],
    ids=["bf16-params-fp32-states", "fp32-params-bf16-states", "fp16-fp32", "fp64-fp32"],
)
def test_states_of_another_dtype(param_dtype, state_dtype):
    params0 = randoms(LIST_SHAPES, param_dtype)
    grads = [randoms(LIST_SHAPES, param_dtype) for _ in range(3)]
    (params, states, _), (ref_params, ref_states, _) = adam_both(
        params0, grads, state_dtype=state_dtype, **ADAM_FLAGS["adam-amsgrad"]
    )
    assert all(s.dtype == state_dtype for column in states for s in column)
    assert_lists_close(params, ref_params, "param")
    for k in range(3):
        assert_lists_close(states[k], ref_states[k], f"state{k}")
    # SGD: an existing buffer of another dtype, and new buffers of new_buffer_dtype.
    results = []
    for backend in (cpu_backend, reference):
        params = clone_all(params0)
        buffers = [torch.zeros_like(p, dtype=state_dtype) for p in params[:4]]
        buffers += [None] * (len(params) - 4)
        run_sgd(
            backend, params, [clone_all(g) for g in grads], buffers, new_buffer_dtype=state_dtype
        )
        results.append((params, buffers))
    assert_lists_close(results[0][0], results[1][0], "sgd param")
    assert_lists_close(results[0][1], results[1][1], "sgd buffer")


def edge_values(n: int) -> torch.Tensor:
    """fp32 values that stress bf16/fp16 rounding: ties, subnormals, overflow, inf, NaN."""
    special = torch.tensor(
        [
            0.0,
            -0.0,
            1.0,
            1.0 + 2**-8,
            1.0 + 2**-9,
            -(1.0 + 3 * 2**-9),
            65504.0,
            65519.0,
            65520.0,
            1e6,
            3e38,
            float("inf"),
            float("-inf"),
            float("nan"),
            2**-24,
            3 * 2**-26,
            1e-40,
            -1e-40,
            6.1e-5,
            2**-14 - 2**-25,
        ]
    )
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int64).to(torch.int32)
    return torch.cat([special, bits.view(torch.float32), torch.randn(n) * 100])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_rounding_is_bitwise_the_reference(dtype):
    """lr=0 SGD with fp32 master weights stores SR(master): the rounding alone, on edge values."""
    masters0 = [edge_values(5000), edge_values(20000).reshape(20, -1), torch.zeros(0)]
    masters0.append(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))
    results = []
    for backend in (cpu_backend, reference):
        masters = clone_all(masters0)
        params = [m.to(dtype) for m in masters]
        grads = [torch.ones_like(m) for m in masters]
        for step in (1, 2):
            contract.run_sgd(
                backend,
                params,
                grads,
                [None] * len(params),
                lr=0.0,
                momentum=0.0,
                dampening=0.0,
                weight_decay=0.0,
                nesterov=False,
                maximize=False,
                master_params=masters,
                steps=[torch.tensor(float(step))] * len(params),
                stochastic_rounding=True,
                seed=2**40 + 17,
                param_indices=[5, 2**33 + 1, 0, 9],
            )
        results.append(params)
    for i, (a, b) in enumerate(zip(*results)):
        # NaN stays NaN; its payload bits are torch's conversion's business.
        assert torch.equal(a.isnan(), b.isnan()), f"param {i}: NaNs differ"
        keep = ~b.isnan()
        assert torch.equal(a[keep].view(torch.int16), b[keep].view(torch.int16)), f"param {i}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_master_weights_and_stochastic_rounding(dtype, stochastic):
    masters0 = randoms(LIST_SHAPES, torch.float32)
    params0 = [m.to(dtype) for m in masters0]
    grads = [randoms(LIST_SHAPES, dtype, 0.1) for _ in range(3)]
    kw = dict(stochastic_rounding=stochastic, seed=1234, param_indices=list(range(3, 3 + 17)))
    # Adam: torch's sqrt (the reference's) is not always correctly rounded, ours is, so the
    # fp32 values may differ by an ulp in rare elements, and so may their rounding.
    (params, _, m), (ref_params, _, ref_m) = adam_both(
        params0, grads, masters0=masters0, **ADAM_FLAGS["adamw"], **kw
    )
    assert_lists_close(m, ref_m, "master")
    flat, ref_flat = (
        torch.cat([p.flatten() for p in params]),
        torch.cat([p.flatten() for p in ref_params]),
    )
    assert (flat != ref_flat).float().mean() < 1e-3
    torch.testing.assert_close(flat, ref_flat, atol=0, rtol=2 * torch.finfo(dtype).eps)
    # SGD (bitwise the reference's fp32 math) with and without master weights, and a
    # channels_last param: bitwise.
    conv = [torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)]
    for with_masters in (True, False):
        results = []
        for backend in (cpu_backend, reference):
            masters = clone_all(masters0) + clone_all(conv)
            params = [t.to(dtype) for t in masters]
            steps = [torch.tensor(7.0) for _ in params]
            buffers = [None] * len(params)
            for seed in range(2):
                generator = torch.Generator().manual_seed(seed)
                g = randoms([p.shape for p in params], dtype, 0.1, generator)
                contract.run_sgd(
                    backend,
                    params,
                    g,
                    buffers,
                    **SGD_KW,
                    maximize=False,
                    steps=steps,
                    master_params=masters if with_masters else None,
                    seed=99,
                    stochastic_rounding=stochastic,
                )
            results.append((params, masters))
        assert_lists_close(results[0][0], results[1][0], "sgd param", exact=True)
        assert_lists_close(results[0][1], results[1][1], "sgd master", exact=True)


def test_stochastic_rounding_rounds_both_ways():
    param = torch.full((100_000,), 1.0, dtype=torch.bfloat16)
    grad = torch.full((100_000,), 1.0, dtype=torch.bfloat16)
    # 1 - 1e-3 is between two bf16 values: nearest rounding would never move the param.
    contract.run_sgd(
        cpu_backend,
        [param],
        [grad],
        [None],
        lr=1e-3,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        maximize=False,
        steps=[torch.tensor(1.0)],
        stochastic_rounding=True,
        seed=5,
    )
    assert set(param.unique().tolist()) == {0.99609375, 1.0}


# ------------------------------------------------------------------------------ GradScaler, lr


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grad_scale_unscales_and_writes_back(algorithm, dtype):
    params0 = randoms(LIST_SHAPES, dtype)
    grads0 = randoms(LIST_SHAPES, dtype, 1024.0)
    amp = dict(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    results = []
    for backend in (cpu_backend, reference):
        params, grads = clone_all(params0), clone_all(grads0)
        if algorithm == "adam":
            states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
            steps = [torch.tensor(0.0) for _ in params]
            run_adam(backend, params, [grads], states, steps, **ADAM_FLAGS["adamw"], **amp)
        else:
            run_sgd(backend, params, [grads], [None] * len(params), **amp)
        results.append((params, grads))
    assert_lists_close(results[0][0], results[1][0], "param")
    assert_lists_close(results[0][1], results[1][1], "grad", exact=True)


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
def test_found_inf_touches_nothing(algorithm):
    params = randoms(LIST_SHAPES, torch.float32)
    grads = randoms(LIST_SHAPES, torch.float32)
    grads[3][0] = float("inf")
    states = [[torch.rand_like(p) for p in params] for _ in range(3)]
    before = [clone_all(t) for t in (params, grads, *states)]
    amp = dict(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    if algorithm == "adam":
        steps = [torch.tensor(1.0) for _ in params]
        contract.run_adam(
            cpu_backend,
            params,
            grads,
            *states,
            steps,
            **ADAM_KW,
            **ADAM_FLAGS["adam-amsgrad"],
            **amp,
        )
    else:
        contract.run_sgd(cpu_backend, params, grads, states[0], **SGD_KW, maximize=False, **amp)
    for name, now, then in zip(
        ["param", "grad", "s0", "s1", "s2"], (params, grads, *states), before
    ):
        assert_lists_close(now, then, name, exact=True)
    # New SGD buffers under a skipped step: params and grads stay untouched too (the optimizer
    # discards the buffers; tests/test_amp.py checks that no state is left).
    fresh = [clone_all(params), clone_all(grads)]
    buffers = [None] * len(params)
    contract.run_sgd(cpu_backend, *fresh, buffers, **SGD_KW, maximize=False, **amp)
    assert_lists_close(fresh[0], params, "param", exact=True)
    assert_lists_close(fresh[1], grads, "grad", exact=True)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("capturable", [False, True])
def test_tensor_lr_and_per_tensor_steps(lr_dtype, capturable):
    params0 = randoms(LIST_SHAPES, torch.float32)
    grads = randoms(LIST_SHAPES, torch.float32)
    states0 = [[torch.rand_like(p) for p in params0] for _ in range(3)]
    results = []
    for backend in (cpu_backend, reference):
        params = clone_all(params0)
        states = [clone_all(column) for column in states0]
        # Tensors at different steps (a param frozen for a while, or added later).
        steps = [torch.tensor(float(1 + i % 5)) for i in range(len(params))]
        contract.run_adam(
            backend,
            params,
            clone_all(grads),
            *states,
            steps,
            **{**ADAM_KW, "lr": torch.tensor(0.01, dtype=lr_dtype)},
            **ADAM_FLAGS["adamw"],
            capturable=capturable,
        )
        results.append(params)
    assert_lists_close(results[0], results[1], "param")


def test_thread_count_does_not_change_the_result():
    params0 = randoms([(100_000,), (3,), (50_000,)], torch.float32)
    grads = randoms([(100_000,), (3,), (50_000,)], torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            params = clone_all(params0)
            states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
            steps = [torch.tensor(0.0) for _ in params]
            run_adam(cpu_backend, params, [grads], states, steps, **ADAM_FLAGS["adamw"])
            results.append(params)
    finally:
        torch.set_num_threads(threads)
    assert_lists_close(results[0], results[1], "param", exact=True)


_ISA_SCRIPT = """
import sys, torch
from fused_optim.backends import contract, cpu, reference
g = torch.Generator().manual_seed(3)
out = {}
for backend in (cpu, reference):
    out[backend.NAME] = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        g.manual_seed(3)
        p = [torch.randn(5000, generator=g).to(dtype) for _ in range(2)]
        s = [[torch.zeros_like(x) for x in p] for _ in range(3)]
        for step in range(1, 3):
            gr = [torch.randn(5000, generator=g).to(dtype) for _ in p]
            steps = [torch.tensor(float(step))] * 2
            contract.run_adam(backend, p, gr, *s, steps, lr=0.01, beta1=0.9, beta2=0.99,
                              eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False,
                              decoupled_weight_decay=False)
            b = [None, None]
            contract.run_sgd(backend, p, gr, b, lr=0.1, momentum=0.9, dampening=0.0,
                             weight_decay=0.1, nesterov=True, maximize=False)
        out[backend.NAME].append(p + s[0] + s[1] + s[2])
torch.save((cpu.cpu_isa(), out), sys.argv[1])
"""


def _run_isa(isa: str, tmp_path) -> tuple[str, dict[str, list[list[torch.Tensor]]]]:
    path = tmp_path / f"isa_{isa}.pt"
    env = {**os.environ, "FUSED_OPTIM_CPU_ISA": isa}
    subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], check=True, env=env, timeout=120)
    return torch.load(path)


def test_supported_isas_are_recorded():
    """Which kernel builds this CPU runs (also printed in the pytest header)."""
    supported = cpu_backend.supported_isas()
    assert supported[0] == "base" and set(supported) <= set(cpu_backend.ISAS)
    assert supported == [isa for isa in cpu_backend.ISAS if isa in supported]  # preference order
    assert cpu_backend.cpu_isa() == supported[-1] or os.environ.get("FUSED_OPTIM_CPU_ISA")


@pytest.mark.parametrize("isa", cpu_backend.ISAS)
def test_every_isa_build_gives_the_same_bits(isa, tmp_path):
    """Each kernel build this CPU can run gives the bits of the baseline build, and for fp32,
    bf16 and fp16 the bits of the pure-torch reference (correctly rounded fp32 math)."""
    if isa not in cpu_backend.supported_isas():
        runs = ", ".join(cpu_backend.supported_isas())
        pytest.skip(f"this CPU cannot run the {isa} kernels (it runs: {runs})")
    used, results = _run_isa(isa, tmp_path)
    assert used == isa
    base_used, base_results = _run_isa("base", tmp_path) if isa != "base" else (used, results)
    assert base_used == "base"
    ours, ref, base = results["cpu"], results["reference"], base_results["cpu"]
    for d, name in enumerate(("fp32", "bf16", "fp16", "fp64")):
        assert_lists_close(ours[d], base[d], f"{isa} vs base, {name}", exact=True)
        if name != "fp64":  # torch's own fp64 sqrt is not correctly rounded everywhere
            assert_lists_close(ours[d], ref[d], f"{isa} vs reference, {name}", exact=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_switching_builds_in_process_gives_the_same_bits(dtype):
    """cpu.set_isa (what the benchmark uses to time every build in one run): each build this
    CPU runs, on the fast single-pass path (AdamW, no amsgrad) with odd sizes and tails."""
    results = []
    previous = cpu_backend.cpu_isa()
    try:
        for isa in cpu_backend.supported_isas():
            assert cpu_backend.set_isa(isa) in cpu_backend.ISAS
            assert cpu_backend.cpu_isa() == isa
            gen = torch.Generator().manual_seed(5)
            shapes = [(37,), (16384 + 29,), (0,), (1000, 3)]
            params = randoms(shapes, dtype, generator=gen)
            states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
            steps = [torch.tensor(0.0) for _ in params]
            grads = [randoms(shapes, dtype, generator=gen) for _ in range(3)]
            run_adam(cpu_backend, params, grads, states, steps, **ADAM_FLAGS["adamw"])
            results.append(params + states[0] + states[1])
    finally:
        cpu_backend.set_isa(previous)
    for other in results[1:]:
        assert_lists_close(other, results[0], "tensor", exact=True)
    with pytest.raises(RuntimeError, match="is not a kernel build this CPU can run"):
        cpu_backend.set_isa("no-such-isa")
    assert cpu_backend.cpu_isa() == previous


def test_forcing_an_isa_this_cpu_lacks_is_an_error(tmp_path):
    missing = [isa for isa in cpu_backend.ISAS if isa not in cpu_backend.supported_isas()]
    wanted = missing[0] if missing else "no-such-isa"
    with pytest.raises(subprocess.CalledProcessError) as raised:
        subprocess.run(
            [sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "x.pt")],
            check=True,
            env={**os.environ, "FUSED_OPTIM_CPU_ISA": wanted},
            timeout=120,
            capture_output=True,
            text=True,
        )
    assert f"FUSED_OPTIM_CPU_ISA={wanted} is not a kernel build this CPU can run" in (
        raised.value.stderr
    )


# ------------------------------------------------------------------ end to end vs torch.optim


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,config", list(optimizer_cases()))
def test_recipe_matches_torch_for_loop(name, config, dtype):
    report = compare_to_torch(name, adapt_config(name, config, dtype), dtype=dtype, backend="cpu")
    report.assert_ok()
    if dtype == torch.float32:
        assert report.correctly_rounded_max_abs == 0, report.summary()  # see test_parity.py
        assert report.max_abs <= FP32_MAX_ABS[name] + report.torch_rounding
    elif dtype == torch.float64:
        assert report.max_abs <= FP64_MAX_ABS


# ------------------------------------------------------------------------ selection, compile


def test_auto_selection_prefers_the_cpu_backend():
    assert select_backend(None, CPU) is cpu_backend
    assert select_backend("cpu", CPU) is cpu_backend
    # Sparse gradients still go to the reference.
    assert select_backend(None, CPU, sparse_grads=True) is reference
    with pytest.raises(BackendUnavailableError, match="sparse"):
        select_backend("cpu", CPU, sparse_grads=True)


def test_unbuilt_extension_is_reported_with_the_original_error(monkeypatch):
    error = ImportError("libfoo.so: cannot open shared object file")
    monkeypatch.setattr(cpu_backend, "_IMPORT_ERROR", error)
    available, reason = cpu_backend.is_available(CPU)
    assert not available and "libfoo.so" in reason
    with pytest.raises(BackendUnavailableError, match=r"backend='cpu' is unavailable.*libfoo"):
        select_backend("cpu", CPU)
    assert select_backend(None, CPU) is not cpu_backend


def test_meta_device_is_not_cpu():
    assert not cpu_backend.is_available(torch.device("meta"))[0]


def test_optimizer_uses_it_by_default():
    import fused_optim

    model = torch.nn.Linear(4, 3)
    opt = fused_optim.AdamW(model.parameters(), lr=0.1)
    assert opt.group_backends() == ["cpu"]
    model(torch.randn(2, 4)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_ops_trace_under_torch_compile():
    params = randoms([(10,), (0,), (7, 3)], torch.float32)
    grads = randoms([(10,), (0,), (7, 3)], torch.float32)
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.tensor(1.0) for _ in params]
    hyper = torch.tensor([[0.01, 0.9, 0.99, 1e-8, 0.01, 0, 0, 0, 0]], dtype=torch.float64)

    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        torch.ops.fused_optim.adam_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            [],
            hyper,
            [0] * len(params),
            0,  # lr_kind: a float lr
            False,
            False,
            True,
            False,
            False,  # complex_arithmetic
            None,
            None,
            False,
            0,
            [],
        )

    expected = [clone_all(t) for t in (params, grads, *states)]
    step(*expected, steps)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(params, grads, *states, steps)
    for now, then in zip((params, grads, *states), expected):
        assert_lists_close(now, then, "tensor", exact=True)
