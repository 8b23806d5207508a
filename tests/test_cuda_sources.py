"""The CUDA C++ backend's sources compile, without a GPU and without a CUDA build of torch.

CI has nvcc but no GPU, and its torch is a CPU build. So:

* ``csrc/cuda/fused_cuda.cu`` (kernels and their host launch code; CUDA runtime headers only)
  is compiled by nvcc for sm_90 (H100/H200 SASS) and for compute_80 (portable PTX, JIT-compiled
  by the driver on any newer GPU), in one nvcc call, with the flags setup.py uses;
* the compute_80 PTX must use 16-byte vector global loads and stores (the ``aligned`` path);
* ``csrc/cuda/fused_cuda_ops.cpp`` (the torch op binding) is syntax-checked by the host C++
  compiler against torch's headers, the CUDA runtime headers and Python's (a CPU build of torch
  ships c10's CUDA headers but not their generated config, which the check stands in for).

The backend's Python side needs no compiler: its signatures must be the reference backend's,
and without the extension it must say why it is unavailable.
"""

from __future__ import annotations

import ctypes
import importlib.util
import inspect
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from fused_optim.backends import cuda as cuda_backend
from fused_optim.backends import reference

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("_fused_optim_cuda_build", CUDA_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The nvcc flags and targets setup.py builds the extension with.
BUILD = _load_build_module()
NVCC_FLAGS = BUILD.NVCC_FLAGS
GENCODE = BUILD.GENCODE


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def _cuda_include(nvcc: str) -> Path:
    """The CUDA runtime headers: torch's CUDA_HOME, else next to nvcc (which may be a wrapper
    script elsewhere, as /usr/local/bin/nvcc is on the CI image)."""
    for home in (cpp_extension.CUDA_HOME, str(Path(nvcc).resolve().parent.parent)):
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home) / "include"
    return Path("/usr/local/cuda/include")


def test_backend_signatures_match_the_reference():
    for name in ("sgd", "adam"):
        assert inspect.signature(getattr(cuda_backend, name)) == inspect.signature(
            getattr(reference, name)
        ), name
    assert cuda_backend.NAME == "cuda"
    assert cuda_backend.SUPPORTS_SPARSE is False


def test_backend_says_why_it_is_unavailable():
    available, reason = cuda_backend.is_available(torch.device("cpu"))
    assert not available and reason
    if cuda_backend._IMPORT_ERROR is not None:
        available, reason = cuda_backend.is_available(torch.device("cuda"))
        assert not available
        assert "fused_optim._C_cuda" in reason


def test_table_layout_matches_the_header():
    header = (CUDA_DIR / "fused_cuda.h").read_text()
    assert f"kTableColumns = {cuda_backend.TABLE_COLUMNS}," in header
    assert f"kChunk = {cuda_backend.CHUNK};" in header
    for column, value in [
        ("kColMaster", cuda_backend.COL_MASTER),
        ("kColNumel", cuda_backend.COL_NUMEL),
        ("kColStep", cuda_backend.COL_STEP),
        ("kColNewBuffer", cuda_backend.COL_NEW_BUFFER),
        ("kColIndex", cuda_backend.COL_INDEX),
        ("kColStepIsDouble", cuda_backend.COL_STEP_IS_DOUBLE),
    ]:
        assert f"{column} = {value}," in header, column


def test_step_columns():
    steps = [torch.tensor(3.0), torch.tensor(2.0), torch.tensor(3.0)]
    base, extra = cuda_backend._extra_columns(steps, False, [0, 1, 0], [4, 5, 6])
    assert base == 3.0
    assert extra.tolist() == [[0, 0, 4, 0], [1, 1, 5, 0], [0, 0, 6, 0]]


def test_build_flags():
    assert "--fmad=false" in NVCC_FLAGS and "-O3" in NVCC_FLAGS and "-std=c++17" in NVCC_FLAGS
    assert "-gencode=arch=compute_90,code=sm_90" in GENCODE
    assert any("code=compute_" in flag for flag in GENCODE), "no portable PTX target"
    assert not any("native" in flag for flag in NVCC_FLAGS + GENCODE)
    assert all((ROOT / source).exists() for source in BUILD.SOURCES)


def test_launch_plan_tables():
    """The block table covers every element once, in CHUNK-sized blocks; misaligned addresses
    turn the vector path off; a strided param is staged (work tensor written back)."""
    chunk = cuda_backend.CHUNK
    storage = torch.zeros(3 * chunk + 64)
    params = [
        torch.zeros(0),
        storage[: chunk + 5],
        storage[chunk + 8 : 2 * chunk + 8],
        torch.zeros(3, 4).t(),  # dense, not contiguous: walked in memory order, not staged
        torch.zeros(10, 2)[:, 0],  # strided: staged
    ]
    grads = [torch.zeros_like(p) for p in params]
    extra = torch.zeros(len(params), 4, dtype=torch.int64)
    plan = cuda_backend._plan_for({}, "sgd", params, [], [], extra, torch.float32)
    rows = plan.block_table.tolist()
    assert rows == [[1, 0], [1, chunk], [2, 0], [3, 0], [4, 0]]
    assert plan.tensor_table.shape == (len(params), cuda_backend.TABLE_COLUMNS)
    numels = plan.tensor_table[:, cuda_backend.COL_NUMEL].tolist()
    assert numels == [p.numel() for p in params]
    assert len(plan.stages) == 1 and plan.stages[0].source is params[4]
    plan.bind_grads(grads, torch.float32, writes_back=False)
    assert plan.aligned  # torch's allocations are 64-byte aligned; chunk + 8 floats is 16n bytes
    misaligned = [storage[1 : chunk + 1]]
    plan = cuda_backend._plan_for({}, "sgd", misaligned, [], [], extra[:1], torch.float32)
    plan.bind_grads([torch.zeros(chunk)], torch.float32, writes_back=False)
    assert not plan.aligned


def test_cuda_sources_compile(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    torch_include = Path(cpp_extension.include_paths()[0])
    jobs = {}
    # Kernels: one nvcc call, both targets; --keep leaves the PTX for the checks below.
    jobs["nvcc"] = subprocess.Popen(
        [
            nvcc,
            *NVCC_FLAGS,
            *GENCODE,
            # What torch's BuildExtension adds to every nvcc call.
            *getattr(cpp_extension, "COMMON_NVCC_FLAGS", []),
            "-Xcompiler",
            "-fPIC",
            "--threads",
            "2",
            "--keep",
            "--keep-dir",
            str(tmp_path),
            "-Xcompiler",
            "-Wall",
            "-c",
            str(CUDA_DIR / "fused_cuda.cu"),
            "-o",
            str(tmp_path / "fused_cuda.o"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx and (torch_include / "c10" / "cuda" / "CUDAGuard.h").exists():
        jobs["c++"] = subprocess.Popen(
            [
                cxx,
                "-std=c++20",
                "-fsyntax-only",
                "-Wall",
                "-DC10_USING_CUSTOM_GENERATED_MACROS",
                *[f"-I{path}" for path in cpp_extension.include_paths()],
                f"-I{_cuda_include(nvcc)}",
                f"-I{sysconfig.get_paths()['include']}",
                str(CUDA_DIR / "fused_cuda_ops.cpp"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    failures = []
    for name, job in jobs.items():
        output, _ = job.communicate(timeout=600)
        if job.returncode != 0:
            failures.append(f"{name} failed ({job.returncode}):\n{output[-8000:]}")
        elif name == "nvcc" and "warning" in output.lower():
            failures.append(f"nvcc warned:\n{output[-8000:]}")
    assert not failures, "\n\n".join(failures)

    assert (tmp_path / "fused_cuda.o").stat().st_size > 0
    ptx = "\n".join(p.read_text() for p in tmp_path.glob("*.ptx"))
    assert ptx, "nvcc --keep left no PTX"
    entries = [line for line in ptx.splitlines() if line.startswith(".entry") or " .entry " in line]
    assert any("sgd_kernel" in e for e in entries) and any("adam_kernel" in e for e in entries)
    # The aligned path: 16-byte vector accesses to global memory.
    assert "ld.global.v4.f32" in ptx and "st.global.v4.f32" in ptx
    assert "ld.global.v2.f64" in ptx and "st.global.v2.f64" in ptx


# ----------------------------------------------------------------------------------------------
# The kernels themselves, run on the CPU: fused_cuda.cu built by the host compiler with
# FUSED_OPTIM_HOST_EMULATION (every CUDA thread in turn), called through the backend's own Python
# side (tables, staging, steps, lr) with the extension's op swapped for the emulation.

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    nvcc = _nvcc()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    include = _cuda_include(nvcc) if nvcc else Path("/usr/local/cuda/include")
    if cxx is None or not (include / "cuda_fp16.h").exists():
        pytest.skip("needs a host C++ compiler and the CUDA headers (cuda_fp16.h)")
    library = tmp_path_factory.mktemp("emulation") / "fused_cuda_emulated.so"
    subprocess.run(
        [
            cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared",
            "-Wall", "-Wno-unknown-pragmas", "-Werror",
            "-DFUSED_OPTIM_HOST_EMULATION", f"-I{include}", "-x", "c++",
            str(CUDA_DIR / "fused_cuda.cu"), "-o", str(library),
        ],
        check=True,
    )  # fmt: skip
    return ctypes.CDLL(str(library))


def _emulated_op(library, name):
    function = getattr(library, f"fused_optim_emulated_{name.rstrip('_')}")
    function.restype = ctypes.c_int

    def op(tensor_table, grad_table, block_table, param_dtype, state_dtype, lr, lr_value,
           grad_scale, found_inf, *rest):  # fmt: skip
        if name == "sgd_":
            momentum, dampening, wd, nesterov, maximize, master, sr, from_ptr, base, seed, al = rest
            tail_ints, tail_reals = [int(nesterov)], [momentum, dampening, wd]
        else:
            (b1, b2, eps, wd, amsgrad, maximize, decoupled, master, sr, from_ptr, base,
             bc1, bc2, seed, al) = rest  # fmt: skip
            tail_ints, tail_reals = [int(amsgrad), int(decoupled)], [b1, b2, eps, wd, bc1, bc2]
        lr_kind = 0 if lr is None else (1 if lr.dtype == torch.float32 else 2)
        pointers = [tensor_table, grad_table, block_table, lr, grad_scale, found_inf]
        pointers = (ctypes.c_void_p * 6)(*[0 if t is None else t.data_ptr() for t in pointers])
        ints = [block_table.shape[0], DTYPE_CODES[param_dtype], DTYPE_CODES[state_dtype], lr_kind]
        ints += [int(maximize), int(master), int(sr), int(from_ptr), seed, int(al), *tail_ints]
        ints = (ctypes.c_int64 * len(ints))(*ints)
        reals = [lr_value, base, *tail_reals]
        reals = (ctypes.c_double * len(reals))(*reals)
        assert function(pointers, ints, reals) == 0

    return op


@pytest.fixture
def emulated_backend(emulated_kernels, monkeypatch):
    """The backend with its raw ops swapped for the emulation, and its custom ops (registered for
    CUDA only) given their own update functions as CPU kernels, for this test only."""
    monkeypatch.setattr(cuda_backend, "_op", lambda name: _emulated_op(emulated_kernels, name))
    library = torch.library.Library("fused_optim", "IMPL")
    library.impl("cuda_sgd", cuda_backend._sgd_update, "CPU")
    library.impl("cuda_adam", cuda_backend._adam_update, "CPU")
    yield cuda_backend
    library._destroy()


EMU_SHAPES = [(0,), (), (1,), (7,), (4095,), (4096,), (4097,), (3, 5, 7), (9000,)]
EMU_SGD = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)
EMU_ADAM = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01)


def _tensors(dtype, misaligned=False, scale=1.0):
    out = []
    for shape in EMU_SHAPES:
        numel = torch.Size(shape).numel()
        flat = (torch.randn(numel + 1, dtype=torch.float64) * scale).to(dtype)
        out.append(flat[1:].view(shape) if misaligned else flat[:numel].view(shape).clone())
    return out


def _clone(tensors):
    return [None if t is None else t.clone() for t in tensors]


def _close(actual, expected, what, **tolerance):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, msg=lambda m, i=i: f"{what}[{i}]: {m}", **tolerance)


def _run_both(backend, algorithm, params, grads_per_step, states, steps=None, hyper=None, **kw):
    """Run the emulated kernels and the reference on copies; return both (params, states)."""
    hyper = {**(EMU_SGD if algorithm == "sgd" else EMU_ADAM), **(hyper or {})}
    results = []
    for module in (backend, reference):
        p, st = _clone(params), [_clone(column) for column in states]
        step_list = _clone(steps) if steps is not None else None
        cache: dict = {}
        for grads in grads_per_step:
            if step_list:
                torch._foreach_add_(step_list, 1)
            g = _clone(grads)
            if algorithm == "sgd":
                module.sgd(p, g, st[0], **hyper, cache=cache, steps=step_list, **kw)
            else:
                module.adam(p, g, *st, step_list, **hyper, cache=cache, **kw)
        results.append((p, st))
    return results


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
    ids=["fp32", "bf16", "fp16", "fp64"],
)  # fmt: skip
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_emulated_sgd_matches_reference(emulated_backend, dtype, misaligned, nesterov):
    params = _tensors(dtype, misaligned)
    grads = [_tensors(dtype, misaligned) for _ in range(3)]
    kw = dict(nesterov=nesterov, maximize=nesterov)
    hyper = dict(dampening=0.0) if nesterov else {}
    (p, st), (rp, rst) = _run_both(
        emulated_backend, "sgd", params, grads, [[None] * len(params)], hyper=hyper, **kw
    )
    _close(p, rp, "param")
    _close(st[0], rst[0], "momentum_buffer")
    assert all(not torch.equal(a, b) for a, b in zip(p, params) if a.numel())


@pytest.mark.parametrize(
    "dtype,state_dtype",
    [
        (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32), (torch.float64, torch.float64),
    ],
    ids=["fp32", "fp32-bf16states", "bf16", "bf16-fp32states", "fp16-fp32states", "fp64"],
)  # fmt: skip
@pytest.mark.parametrize(
    "flags",
    [
        dict(amsgrad=True, maximize=False, decoupled_weight_decay=False),
        dict(amsgrad=False, maximize=True, decoupled_weight_decay=True),
    ],
    ids=["adam-amsgrad", "adamw-maximize"],
)
@pytest.mark.parametrize("device_steps", [False, True], ids=["host-steps", "device-steps"])
def test_emulated_adam_matches_reference(
    emulated_backend, monkeypatch, dtype, state_dtype, flags, device_steps
):
    if not device_steps:
        monkeypatch.setattr(cuda_backend, "_steps_from_device", lambda steps, device: False)
    params = _tensors(dtype)
    grads = [_tensors(dtype) for _ in range(3)]
    states = [[torch.zeros_like(p, dtype=state_dtype) for p in params] for _ in range(3)]
    # Steps at different counts: per-tensor bias corrections (offsets or device reads).
    steps = [torch.tensor(float(i % 3)) for i in range(len(params))]
    # A tensor lr (read by the kernel, its scalar math in fp32) with device steps.
    hyper = dict(lr=torch.tensor(0.01)) if device_steps else {}
    (p, st), (rp, rst) = _run_both(
        emulated_backend, "adam", params, grads, states, steps, hyper=hyper, **flags,
        capturable=device_steps,
    )  # fmt: skip
    _close(p, rp, "param")
    for name, a, e in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), st, rst):
        if name != "max_exp_avg_sq" or flags["amsgrad"]:
            _close(a, e, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_emulated_master_weights_and_stochastic_rounding(emulated_backend, dtype):
    params = _tensors(dtype)
    masters = [p.float() for p in params]
    grads = [_tensors(dtype) for _ in range(2)]
    states = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in range(3)]
    steps = [torch.tensor(0.0) for _ in params]
    kw = dict(amsgrad=False, maximize=False, decoupled_weight_decay=True, stochastic_rounding=True,
              seed=1234, param_indices=list(range(10, 10 + len(params))))  # fmt: skip
    results = []
    for module in (emulated_backend, reference):
        p, m, st, s = _clone(params), _clone(masters), [_clone(c) for c in states], _clone(steps)
        for g in grads:
            torch._foreach_add_(s, 1)
            module.adam(p, _clone(g), *st, s, **EMU_ADAM, cache={}, master_params=m, **kw)
        results.append((p, m))
    (p, m), (rp, rm) = results
    _close(m, rm, "master")
    # Same fp32 value, same bits: the same rounding, except where the fp32 values differ.
    for a, e, ma, me in zip(p, rp, m, rm):
        same = ma == me
        assert torch.equal(a[same], e[same])


def test_emulated_grad_scale_and_found_inf(emulated_backend):
    params = _tensors(torch.float32)
    grads = _tensors(torch.float32)
    buffers = [torch.randn_like(p) for p in params]
    tensors = params + grads + buffers
    before = _clone(tensors)
    kw = dict(**EMU_SGD, nesterov=False, maximize=False, grad_scale=torch.tensor(4.0))
    emulated_backend.sgd(params, grads, buffers, **kw, found_inf=torch.tensor(1.0), cache={})
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
    expected_p, expected_g, expected_b = _clone(params), _clone(grads), _clone(buffers)
    reference.sgd(expected_p, expected_g, expected_b, **kw, found_inf=torch.tensor(0.0))
    emulated_backend.sgd(params, grads, buffers, **kw, found_inf=torch.tensor(0.0), cache={})
    _close(grads, expected_g, "grad")
    _close(params, expected_p, "param")
    _close(buffers, expected_b, "buffer")


# ----------------------------------------------------------------------------------------------
# torch.compile: each group's update is a custom op that declares the tensors the kernel writes.


def test_custom_ops_declare_what_the_kernels_write():
    written = {
        "cuda_sgd": ["params", "grads", "momentum_buffers", "master_params"],
        "cuda_adam": [
            "params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params"
        ],
    }  # fmt: skip
    for name, mutated in written.items():
        schema = getattr(torch.ops.fused_optim, name).default._schema
        for argument in schema.arguments:
            writes = argument.alias_info is not None and argument.alias_info.is_write
            assert writes == (argument.name in mutated), (name, argument.name, str(schema))
            if writes:
                assert str(argument.type) == "List[Tensor]", (name, argument.name)
        assert not schema.returns, str(schema)
        assert "Tensor(a0!)[] params" in str(schema)


def _fake_cuda_step(backend):
    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        backend.adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, **EMU_ADAM,
                     amsgrad=False, maximize=False, decoupled_weight_decay=True)  # fmt: skip
        buffers = [None] * len(params)
        backend.sgd(params, grads, buffers, **EMU_SGD, nesterov=False, maximize=False)
        return buffers

    return step


def test_custom_ops_trace_on_fake_cuda_tensors():
    """torch.compile(fullgraph=True) traces a step on fake CUDA tensors (no GPU needed) into one
    graph in which both updates are functionalized, the second reading the first's results."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Traced(Exception):
        pass

    graphs = []

    def forward_compiler(graph, example_inputs):
        graphs.append(graph)

        def run(*args):  # the graph would launch on a GPU: stop here
            raise Traced

        return run

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:
        params = [torch.empty(5, device="cuda"), torch.empty(3, 4, device="cuda")]
        tensors = [[torch.empty_like(p) for p in params] for _ in range(3)]
        steps = [torch.ones((), device="cuda") for _ in params]
    torch._dynamo.reset()
    compiled = torch.compile(
        _fake_cuda_step(cuda_backend),
        fullgraph=True,
        backend=aot_autograd(fw_compiler=forward_compiler),
    )
    with mode, pytest.raises(Traced):
        compiled(params, *tensors, steps)
    torch._dynamo.reset()
    (graph,) = graphs
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and n.args]
    updates = [n for n in calls if "auto_functionalized" in str(n.target)]
    assert [n.args[0] for n in updates] == [
        torch.ops.fused_optim.cuda_adam.default, torch.ops.fused_optim.cuda_sgd.default
    ]  # fmt: skip
    # SGD updates the params Adam wrote (the getitems of its result), not the inputs.
    sgd_bases = updates[1].kwargs["_all_bases"]
    assert all(base.op != "placeholder" for base in sgd_bases)


def test_emulated_custom_ops_under_torch_compile(emulated_backend):
    """The compiled step (custom ops functionalized, then run with their writes copied back)
    updates as the eager reference does."""
    step = _fake_cuda_step(emulated_backend)
    params = _tensors(torch.float32)
    tensors = [_tensors(torch.float32, scale=0.1).copy() for _ in range(3)]
    tensors[2] = [t.abs() for t in tensors[2]]  # exp_avg_sq >= 0
    steps = [torch.tensor(float(i % 3 + 1)) for i in range(len(params))]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for function in (compiled, _fake_cuda_step(reference)):
        p, t, s = _clone(params), [_clone(c) for c in tensors], _clone(steps)
        buffers = function(p, *t, s)
        results.append((p, t, buffers))
    torch._dynamo.reset()
    (p, t, buffers), (rp, rt, rbuffers) = results
    _close(p, rp, "param")
    for name, a, e in zip(("grad", "exp_avg", "exp_avg_sq"), t, rt):
        _close(a, e, name)
    _close(buffers, rbuffers, "momentum_buffer")


def test_emulated_custom_ops_opcheck(emulated_backend):
    """torch.library.opcheck: the declared mutations are the kernels' (schema check), the fake
    implementations agree, and AOT dispatch works."""
    params = _tensors(torch.float32)[3:6]
    grads = _tensors(torch.float32)[3:6]
    states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.tensor(2.0) for _ in params]
    scale = (torch.tensor(2.0), torch.tensor(0.0))  # grads are unscaled in place
    args = (params, grads, *states, [], steps, None, 0.01, *scale, 0.9, 0.99, 1e-6, 0.01,
            True, False, True, False, 0, None)  # fmt: skip
    torch.library.opcheck(torch.ops.fused_optim.cuda_adam.default, args)
    buffers = [torch.empty_like(p) for p in params]
    args = (params, grads, buffers, [], [], None, 0.05, None, None, 0.9, 0.0, 0.01, False, False,
            False, 0, None, [1] * len(params))  # fmt: skip
    torch.library.opcheck(torch.ops.fused_optim.cuda_sgd.default, args)


def test_emulated_cached_plans_stage_and_hold_no_tensors(emulated_backend):
    """Plans are cached per group across steps (the custom ops cannot take the optimizer's
    cache): staged tensors (a strided param and gradient, fp64 states of fp32 params) are
    re-attached on every step, and between steps a cached plan keeps none of them alive."""
    import gc
    import weakref

    base = torch.randn(9000, 3)
    params = [base[:, 1], torch.randn(4097), torch.randn(5, 7).t()]
    states = [[torch.zeros_like(p, dtype=torch.float64) for p in params] for _ in range(3)]
    steps = [torch.tensor(0.0) for _ in params]
    grads = [[torch.randn(p.shape[0], 2)[:, 0] if i == 0 else torch.randn_like(p)
              for i, p in enumerate(params)] for _ in range(3)]  # fmt: skip
    flags = dict(amsgrad=True, maximize=False, decoupled_weight_decay=False)
    (p, st), (rp, rst) = _run_both(
        emulated_backend, "adam", params, grads, states, steps, **flags, capturable=False
    )
    _close(p, rp, "param")
    for name, a, e in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), st, rst):
        _close(a, e, name)

    group, group_states, group_steps = _clone(params), [_clone(c) for c in states], _clone(steps)
    plans_before = dict(emulated_backend._plans)
    built = []
    for _ in range(3):
        emulated_backend.adam(group, _clone(grads[0]), *group_states, group_steps,
                              **EMU_ADAM, **flags)  # fmt: skip
        new = [cache for key, cache in emulated_backend._plans.items() if key not in plans_before]
        assert len(new) == 1 and "adam" in new[0]
        built.append(new[0]["adam"])
    assert built[0] is built[1] is built[2], "the plan was rebuilt although no tensor moved"
    plan = built[0]
    assert plan.stages and all(stage.source is None for stage in plan.stages + plan.grad_stages)
    assert not plan.anchors
    alive = [weakref.ref(t) for t in group]
    del group
    gc.collect()
    assert all(ref() is None for ref in alive), "a cached plan keeps params alive"
