"""The CUDA C++ backend's sources compile and its kernels match the reference, without a GPU and
without a CUDA build of torch.

CI has nvcc but no GPU, and its torch is a CPU build. So:

* ``csrc/cuda/fused_cuda.cu`` (kernels and their host launch code; CUDA runtime headers only)
  is compiled by nvcc for sm_90 (H100/H200 SASS) and for compute_80 (portable PTX, JIT-compiled
  by the driver on any newer GPU), in one nvcc call, with the flags setup.py uses;
* the compute_80 PTX must use 16-byte vector global loads and stores (the ``aligned`` path);
* ``csrc/cuda/fused_cuda_ops.cpp`` (the torch op binding) is syntax-checked by the host C++
  compiler against torch's headers, the CUDA runtime headers and Python's (a CPU build of torch
  ships c10's CUDA headers but not their generated config, which the check stands in for);
* ``csrc/plan_layout.h`` spells the table layout of ``fused_optim/backends/plan.py``;
* the kernels themselves, built by the host C++ compiler with ``FUSED_OPTIM_HOST_EMULATION``
  (every CUDA thread in turn), run behind the backend's own Python side (``backends.plan``
  tables, staging, steps, lr) in place of the extension's ops, against the reference backend,
  eagerly and under torch.compile (through the custom ops).

The backend's Python side needs no compiler: it implements ``backends.contract`` and, without
the extension, says why it is unavailable.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import importlib.util
import inspect
import math
import os
import re
import shutil
import subprocess
import sysconfig
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from fused_optim.backends import compiled, contract, reference
from fused_optim.backends import cuda as cuda_backend
from fused_optim.backends import plan as plans
from fused_optim.backends.contract import (
    AdamFlags,
    AdamHyper,
    SgdFlags,
    SgdHyper,
    StepContext,
    Work,
)

from cases import ADAM_GROUPS, SGD_GROUPS

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
PLAN_LAYOUT = ROOT / "csrc" / "plan_layout.h"


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


def test_backend_implements_the_contract():
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


def test_plans_come_from_backends_plan_only():
    """No second copy of the launch-plan code: the tables are backends.plan's, kept in the
    bucket's ``work.plan``, and no module-level plan cache remains."""
    assert cuda_backend.plans is plans
    for name in ("_Plan", "_Stage", "_resolve", "_plan_for", "_extra_columns", "_plans",
                 "_group_cache", "COL_PARAM", "TABLE_COLUMNS"):  # fmt: skip
        assert not hasattr(cuda_backend, name), name


def _camel(name: str) -> str:
    """plan.py's COL_STEP_IS_DOUBLE -> the header's kColStepIsDouble."""
    return "k" + "".join(word.capitalize() for word in name.split("_"))


def test_plan_layout_header_matches_plan_py():
    """csrc/plan_layout.h states plan.py's layout constants, all of them and nothing else."""
    text = PLAN_LAYOUT.read_text()
    pattern = r"constexpr\s+[\w:]+\s+(k\w+)\s*=\s*(\w+)\s*;"
    header: dict[str, int] = {}
    for name, value in re.findall(pattern, text):
        header[name] = int(value) if value.isdigit() else header[value]
    expected = {_camel(name): value for name, value in plans.LAYOUT.items()}
    assert header == expected
    assert set(re.findall(r"#include\s*[<\"]([^>\"]+)[>\"]", text)) == {"cstdint"}
    # fused_cuda.h takes the layout from there and keeps no copy of its own.
    cuda_header = (CUDA_DIR / "fused_cuda.h").read_text()
    assert '#include "../plan_layout.h"' in cuda_header
    assert not re.search(r"\bk(Col|Hyper)\w*\s*=", cuda_header)
    assert "kTableColumns =" not in cuda_header
    assert f"kChunk = {cuda_backend.CHUNK};" in cuda_header


def raw_op_schemas() -> dict[str, list[tuple[str, str]]]:
    """The binding's op schemas (fused_cuda_ops.cpp's m.def strings): name -> [(type, name)]."""
    text = (CUDA_DIR / "fused_cuda_ops.cpp").read_text()
    schemas = {}
    for literals in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', text):
        schema = "".join(re.findall(r'"([^"]*)"', literals))
        name, arguments = re.fullmatch(r"(\w+)\((.*)\) -> \(\)", schema).groups()
        schemas[name] = [tuple(a.strip().rsplit(" ", 1)) for a in arguments.split(",")]
    return schemas


def test_raw_ops_take_tables_and_flags_only():
    """Per-group hyperparameters are hyper-table data: no float argument in the binding's
    schemas, no scalar hyperparameter in the launch structs (only flags pick code)."""
    schemas = raw_op_schemas()
    assert set(schemas) == {"sgd_", "adam_", "norm_"}
    assert not [a for a in schemas.pop("norm_") if a[0] == "float"]  # max_norm is table data
    for name, arguments in schemas.items():
        assert arguments[:4] == [
            ("Tensor", t) for t in ("tensor_table", "grad_table", "block_table", "hyper_table")
        ]
        assert not [a for a in arguments if a[0] == "float"], (name, arguments)
    header = (CUDA_DIR / "fused_cuda.h").read_text()
    for struct in ("CommonLaunch", "SgdLaunch", "AdamLaunch"):
        body = re.search(rf"struct {struct}\b[^{{]*\{{(.*?)\n\}};", header, re.S).group(1)
        members = re.findall(r"^\s+([\w:<>]+\*?)\s+\**(\w+)", body, re.M)
        doubles = [m for m in members if m[0].startswith("double")]
        assert not doubles, (struct, doubles)
    assert "const double* hyper_table" in header


def test_build_flags():
    assert "--fmad=false" in NVCC_FLAGS and "-O3" in NVCC_FLAGS and "-std=c++17" in NVCC_FLAGS
    assert "-gencode=arch=compute_90,code=sm_90" in GENCODE
    assert any("code=compute_" in flag for flag in GENCODE), "no portable PTX target"
    assert not any("native" in flag for flag in NVCC_FLAGS + GENCODE)
    assert all((ROOT / source).exists() for source in BUILD.SOURCES)


def _work(params, groups=None, **kw) -> Work:
    return Work(
        params=list(params),
        grads=kw.pop("grads", []),
        states=kw.pop("states", {}),
        groups=list(groups) if groups is not None else [0] * len(params),
        **kw,
    )


def test_launch_plan_tables():
    """The CUDA backend's plan (backends.plan with CHUNK-sized blocks): the block table covers
    every element once; misaligned addresses turn the vector path off; a strided param is
    staged (work tensor written back)."""
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
    work = _work(params, groups=[0, 1, 0, 2, 1])
    plan = plans.plan_for(work, cuda_backend.PLAN_NAME, [], torch.float32, chunk)
    assert work.plan[cuda_backend.PLAN_NAME] is plan
    rows = plan.block_table.tolist()
    assert rows == [[1, 0], [1, chunk], [2, 0], [3, 0], [4, 0]]
    assert plan.tensor_table.shape == (len(params), plans.TABLE_COLUMNS)
    numels = plan.tensor_table[:, plans.COL_NUMEL].tolist()
    assert numels == [p.numel() for p in params]
    assert plan.tensor_table[:, plans.COL_GROUP].tolist() == [0, 1, 0, 2, 1]
    assert len(plan.stages) == 1 and plan.stages[0].source is params[4]
    plan.bind_grads(grads, torch.float32, writes_back=False)
    assert plan.aligned  # torch's allocations are 64-byte aligned; chunk + 8 floats is 16n bytes
    misaligned = _work([storage[1 : chunk + 1]])
    plan = plans.plan_for(misaligned, cuda_backend.PLAN_NAME, [], torch.float32, chunk)
    plan.bind_grads([torch.zeros(chunk)], torch.float32, writes_back=False)
    assert not plan.aligned


def test_which_steps_the_kernel_reads_from_memory():
    steps = [torch.tensor(3.0), torch.tensor(2.0)]
    work = _work([torch.zeros(3), torch.zeros(4)], steps=steps)
    host = StepContext()
    assert not cuda_backend._reads_steps_from_device(work, host, False)
    assert cuda_backend._reads_steps_from_device(work, host, True)  # capturable
    amp = StepContext(found_inf=torch.zeros(()))
    assert cuda_backend._reads_steps_from_device(work, amp, False)
    work.steps = [torch.tensor(3, dtype=torch.int64), torch.tensor(2.0)]
    with pytest.raises(ValueError, match="float32/float64"):
        cuda_backend._reads_steps_from_device(work, host, True)


def test_one_kind_of_lr_per_launch():
    cpu = torch.device("cpu")
    floats = [SgdHyper(0.1, 0.0, 0.0, 0.0), SgdHyper(0.2, 0.0, 0.0, 0.0)]
    assert cuda_backend._lr_kind(floats, cpu) == (False, torch.float64)
    tensors = [SgdHyper(torch.tensor(0.1), 0.0, 0.0, 0.0), SgdHyper(torch.tensor(0.2), 0, 0, 0)]
    assert cuda_backend._lr_kind(tensors, cpu) == (True, torch.float32)
    assert cuda_backend._lr_kind(tensors, torch.device("cuda")) == (False, torch.float32)
    with pytest.raises(ValueError, match="one kind of lr"):
        cuda_backend._lr_kind(floats[:1] + tensors[:1], cpu)


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
    assert any("norm_kernel" in e for e in entries)
    # The aligned path: 16-byte vector accesses to global memory.
    assert "ld.global.v4.f32" in ptx and "st.global.v4.f32" in ptx
    assert "ld.global.v2.f64" in ptx and "st.global.v2.f64" in ptx


# ----------------------------------------------------------------------------------------------
# The kernels themselves, run on the CPU: fused_cuda.cu built by the host compiler with
# FUSED_OPTIM_HOST_EMULATION (every CUDA thread in turn), called through the backend's own Python
# side (backends.plan tables, staging, steps, lr) with the extension's op swapped for the
# emulation.

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


# LrKind of fused_cuda.h, as the binding (fused_cuda_ops.cpp) maps (from pointer, lr dtype).
LR_KIND_CODES = {
    (False, torch.float64): 0,
    (True, torch.float32): 1,
    (True, torch.float64): 2,
    (False, torch.float32): 3,
    (True, torch.bfloat16): 4,
    (True, torch.float16): 5,
    (False, torch.bfloat16): 6,
    (False, torch.float16): 7,
}


def _lr_kind_code(lr_from_pointer: bool, lr_dtype: torch.dtype) -> int:
    return LR_KIND_CODES[(bool(lr_from_pointer), lr_dtype)]


LAUNCHES: list[str] = []


def _emulated_op(library, name):
    """The raw op ``name``, run by the emulation. Its arguments are bound by the names of the
    binding's schema (fused_cuda_ops.cpp), so the backend must pass them in that order."""
    function = getattr(library, f"fused_optim_emulated_{name.rstrip('_')}")
    function.restype = ctypes.c_int
    names = [argument for _, argument in raw_op_schemas()[name]]
    if name == "norm_":
        return _emulated_norm(function, names)
    tail_names = (
        ["momentum", "nesterov"] if name == "sgd_" else ["amsgrad", "decoupled_weight_decay"]
    ) + ["complex_arithmetic"]

    def op(*args):
        a = dict(zip(names, args, strict=True))
        hyper_table, tensor_table = a["hyper_table"], a["tensor_table"]
        assert hyper_table.dtype == torch.float64 and hyper_table.is_contiguous()
        assert hyper_table.shape[1] == plans.HYPER_COLUMNS
        groups = tensor_table[:, plans.COL_GROUP]
        assert groups.numel() == 0 or int(groups.max()) < hyper_table.shape[0]
        pointers = [a[key] for key in ("tensor_table", "grad_table", "block_table", "hyper_table",
                                       "grad_scale", "found_inf", "grad_coef")]  # fmt: skip
        if a["grad_coef"] is not None:  # the binding's check
            compute = torch.float64 if a["param_dtype"] == torch.float64 else torch.float32
            assert a["grad_coef"].dtype == compute and a["grad_coef"].numel() == 1
        pointers = (ctypes.c_void_p * 7)(*[0 if t is None else t.data_ptr() for t in pointers])
        ints = [
            a["block_table"].shape[0],
            DTYPE_CODES[a["param_dtype"]],
            DTYPE_CODES[a["state_dtype"]],
            _lr_kind_code(a["lr_from_pointer"], a["lr_dtype"]),
            *[int(a[key]) for key in ("maximize", "has_master", "stochastic_rounding",
                                      "step_from_pointer", "seed", "aligned", *tail_names,
                                      "write_grad")],
        ]  # fmt: skip
        ints = (ctypes.c_int64 * len(ints))(*ints)
        LAUNCHES.append(name)
        assert function(pointers, ints) == 0

    return op


def _emulated_norm(function, names):
    """The raw norm op, run by the emulation (arguments bound by the schema's names)."""

    def op(*args):
        a = dict(zip(names, args, strict=True))
        table = a["block_table"]
        assert table.dtype == torch.int64 and table.shape[1] == 3 and table.is_contiguous()
        assert a["partials"].numel() == a["num_partials"] + 1
        tensors = [a[key] for key in ("pointers", "block_table", "partials", "counter",
                                      "grad_scale", "total_out", "coef_out")]  # fmt: skip
        pointers = (ctypes.c_void_p * 7)(*[0 if t is None else t.data_ptr() for t in tensors])
        dtypes = [DTYPE_CODES[a["grad_dtype"]], DTYPE_CODES[a["total_out"].dtype]]
        ints = [table.shape[0] - 1, a["first_partial"], a["num_partials"], *dtypes, a["kind"]]
        LAUNCHES.append("norm_")
        assert function(pointers, (ctypes.c_int64 * len(ints))(*ints)) == 0

    return op


@pytest.fixture
def emulated_backend(emulated_kernels, monkeypatch):
    """The backend with its raw ops swapped for the emulation (the custom ops of
    ``backends.compiled`` run on any device, so a traced step reaches it too)."""
    monkeypatch.setattr(cuda_backend, "_op", lambda name: _emulated_op(emulated_kernels, name))
    LAUNCHES.clear()
    return cuda_backend


EMU_SHAPES = [(0,), (), (1,), (7,), (4095,), (4096,), (4097,), (3, 5, 7), (9000,)]
EMU_SGD = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)
EMU_ADAM = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01)


def _tensors(dtype, misaligned=False, scale=1.0, shapes=EMU_SHAPES):
    out = []
    for shape in shapes:
        numel = torch.Size(shape).numel()
        flat = (torch.randn(numel + 1, dtype=torch.float64) * scale).to(dtype)
        out.append(flat[1:].view(shape) if misaligned else flat[:numel].view(shape).clone())
    return out


def _clone(tensors):
    return [None if t is None else t.clone() for t in tensors]


def _close(actual, expected, what, **tolerance):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, msg=lambda m, i=i: f"{what}[{i}]: {m}", **tolerance)


def _run_both(backend, algorithm, params, grads_per_step, states, steps=None, hyper=None, **kw):
    """Run the emulated kernels and the reference on copies, through the contract's keyword
    form, reusing the Work (so the plan) across steps; return both (params, states)."""
    hyper = {**(EMU_SGD if algorithm == "sgd" else EMU_ADAM), **(hyper or {})}
    results = []
    for module in (backend, reference):
        p, st = _clone(params), [_clone(column) for column in states]
        step_list = _clone(steps) if steps is not None else None
        work = None
        for grads in grads_per_step:
            if step_list:
                torch._foreach_add_(step_list, 1)
            g = _clone(grads)
            if algorithm == "sgd":
                work = contract.run_sgd(module, p, g, st[0], **hyper, work=work, steps=step_list,
                                        **kw)  # fmt: skip
            else:
                work = contract.run_adam(module, p, g, *st, step_list, **hyper, work=work, **kw)
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
    assert LAUNCHES == ["sgd_"] * 3  # one launch per step for all the tensors


def test_emulated_sgd_without_momentum_and_with_a_tensor_lr(emulated_backend):
    params = _tensors(torch.float32)
    grads = [_tensors(torch.float32) for _ in range(2)]
    hyper = dict(lr=torch.tensor(0.05), momentum=0.0, dampening=0.0)
    (p, st), (rp, _) = _run_both(
        emulated_backend, "sgd", params, grads, [[None] * len(params)], hyper=hyper,
        nesterov=False, maximize=False,
    )  # fmt: skip
    _close(p, rp, "param")
    assert all(buf is None for buf in st[0])  # no momentum: no buffers made


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
def test_emulated_adam_matches_reference(emulated_backend, dtype, state_dtype, flags, device_steps):
    params = _tensors(dtype)
    grads = [_tensors(dtype) for _ in range(3)]
    states = [[torch.zeros_like(p, dtype=state_dtype) for p in params] for _ in range(3)]
    # Steps at different counts: per-tensor bias corrections (offsets or device reads).
    steps = [torch.tensor(float(i % 3)) for i in range(len(params))]
    # A tensor lr (read by the kernel, its scalar math in fp32) with steps read from memory
    # (capturable=True: the emulation's "device" is the host).
    hyper = dict(lr=torch.tensor(0.01)) if device_steps else {}
    (p, st), (rp, rst) = _run_both(
        emulated_backend, "adam", params, grads, states, steps, hyper=hyper, **flags,
        capturable=device_steps,
    )  # fmt: skip
    _close(p, rp, "param")
    for name, a, e in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), st, rst):
        if name != "max_exp_avg_sq" or flags["amsgrad"]:
            _close(a, e, name)


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
def test_emulated_host_tensor_lr_read_from_the_table(emulated_backend, monkeypatch, algorithm):
    """A host fp32 tensor lr with CUDA params: the kernel takes its value from the hyper table
    and computes in fp32, as torch.optim's tensor arithmetic (LrKind kFloat32Value). The
    emulation's params are host tensors too, so the kind is forced here."""
    monkeypatch.setattr(cuda_backend, "_lr_kind", lambda hypers, device: (False, torch.float32))
    _tensor_lr_matches_reference(emulated_backend, algorithm, dict(lr=torch.tensor(0.0123)))


def _tensor_lr_matches_reference(emulated_backend, algorithm, hyper) -> None:
    """Two steps with ``hyper`` (a tensor lr among them), emulated kernels against the
    reference, bitwise."""
    params = _tensors(torch.float32)
    grads = [_tensors(torch.float32) for _ in range(2)]
    if algorithm == "adam":
        states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        steps = [torch.tensor(float(i % 3)) for i in range(len(params))]
        kw = dict(amsgrad=False, maximize=False, decoupled_weight_decay=True)
        (p, _), (rp, _) = _run_both(emulated_backend, algorithm, params, grads, states, steps,
                                    hyper=hyper, **kw)  # fmt: skip
    else:
        (p, _), (rp, _) = _run_both(emulated_backend, algorithm, params, grads,
                                    [[None] * len(params)], hyper=hyper, nesterov=False,
                                    maximize=False)  # fmt: skip
    _close(p, rp, "param", rtol=0, atol=0)


@pytest.mark.parametrize("on_device", [True, False], ids=["pointer", "value"])
@pytest.mark.parametrize("lr_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16,
                                      torch.int64], ids=str)  # fmt: skip
@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
def test_emulated_tensor_lr_of_every_dtype_follows_the_reference(
    emulated_backend, monkeypatch, algorithm, lr_dtype, on_device
):
    """A tensor lr of every dtype torch.optim accepts, read through its address or from the
    table: the scalar math around it in its dtype (bf16/fp16: each operation in fp32 rounded
    to it; an integer lr promoted to the default float dtype), bitwise the reference backend,
    which follows torch.optim's tensor arithmetic bitwise (tests/test_api.py)."""
    if not on_device:
        real_kind = cuda_backend._lr_kind
        monkeypatch.setattr(
            cuda_backend, "_lr_kind", lambda hypers, device: (False, real_kind(hypers, device)[1])
        )
    lr = torch.tensor(2 if lr_dtype == torch.int64 else 0.0123).to(lr_dtype)
    _tensor_lr_matches_reference(emulated_backend, algorithm, dict(lr=lr, weight_decay=0.1))
    assert LAUNCHES


# Three groups with their own hyperparameters, their tensors interleaved in one bucket.
GROUPS = [0, 1, 2, 1, 0, 2, 2, 1, 0]


def _hypers(algorithm, step, tensor_lr):
    """This step's rows: a scheduler scales every group's lr, differently at every step."""
    out = []
    for values in ADAM_GROUPS if algorithm == "adam" else SGD_GROUPS:
        lr = values["lr"] * (1.0 - 0.1 * step)
        values = {**values, "lr": torch.tensor(lr) if tensor_lr else lr}
        out.append(AdamHyper(**values) if algorithm == "adam" else SgdHyper(**values))
    return out


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_emulated_one_call_updates_three_groups(emulated_backend, algorithm, tensor_lr):
    """One emulated launch per step updates the tensors of three groups, each with its own lr,
    weight decay and betas (momentum, dampening) and, for Adam, its own base step, as the
    reference does with the same Work and hyperparameters; a change of the hyperparameters
    between steps rebuilds no plan."""
    params = _tensors(torch.float32)
    grads = [_tensors(torch.float32) for _ in range(3)]
    # Steps differ within and across groups: per-group base steps and per-tensor offsets.
    steps = [torch.tensor(float(i % 4)) for i in range(len(params))]
    results = []
    for module in (emulated_backend, reference):
        LAUNCHES.clear()
        p, s = _clone(params), _clone(steps)
        if algorithm == "adam":
            states = {k: [torch.zeros_like(t) for t in p] for k in ("exp_avg", "exp_avg_sq")}
        else:
            states = {"momentum_buffer": [None] * len(p)}
        work = Work(params=p, grads=[], states=states, groups=list(GROUPS), steps=s,
                    indices=list(range(len(p))), new_state_dtype=torch.float32)  # fmt: skip
        plan_objects = []
        for step, g in enumerate(grads):
            torch._foreach_add_(s, 1)
            work.grads = _clone(g)
            hypers = _hypers(algorithm, step, tensor_lr)
            if algorithm == "adam":
                flags = AdamFlags(amsgrad=False, maximize=False, decoupled_weight_decay=True)
                created = module.adam(work, hypers, flags, StepContext())
            else:
                flags = SgdFlags(momentum=True, nesterov=False, maximize=False)
                created = module.sgd(work, hypers, flags, StepContext())
            for i, t in enumerate(created):  # as the optimizer keeps created state
                if t is not None:
                    work.states["momentum_buffer"][i] = t
            if module is emulated_backend:
                plan_objects.append(work.plan[cuda_backend.PLAN_NAME])
        if module is emulated_backend:
            assert LAUNCHES == [f"{algorithm}_"] * len(grads)
            # SGD's first step made the buffers (a new plan); then only hyperparameters moved.
            assert plan_objects[-1] is plan_objects[-2]
        results.append((p, [list(column) for column in work.states.values()]))
    (p, st), (rp, rst) = results
    _close(p, rp, "param", rtol=0, atol=0)
    for a, e in zip(st, rst):
        _close(a, e, "state", rtol=0, atol=0)
    assert all(not torch.equal(a, b) for a, b in zip(p, params) if a.numel())


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
def test_emulated_host_step_is_the_full_path(emulated_backend, algorithm):
    """The compiled host path (``host_step``: the extension checks every tensor, reads the grads
    from the params, fills the grad table; host steps advanced with Adam's bias corrections
    computed in C++) gives the bits of the full path, step after step, with fresh grads every
    step; a grad of another layout makes its check fail before anything runs."""
    params = _tensors(torch.float32, shapes=[(5,), (3, 4), (4097,), (0,), (2, 3, 7)])
    buffer = torch.zeros(len(params))  # host steps: 0-dim views of one buffer
    steps = [buffer[i] for i in range(len(params))]
    groups = [0, 1, 2, 1, 0]
    adam = algorithm == "adam"
    keys = ("exp_avg", "exp_avg_sq") if adam else ("momentum_buffer",)
    states = {k: [torch.zeros_like(p) for p in params] for k in keys}
    flags = (AdamFlags(amsgrad=False, maximize=False, decoupled_weight_decay=True) if adam
             else SgdFlags(momentum=True, nesterov=True, maximize=False))  # fmt: skip
    run = emulated_backend.adam if adam else emulated_backend.sgd
    expected = Work(params=_clone(params), grads=[], states={k: _clone(v) for k, v in
                    states.items()}, groups=groups, steps=_clone(steps))  # fmt: skip
    work = Work(params=params, grads=[], states=states, groups=groups, steps=steps,
                indices=list(range(len(params))), own_params=True)  # fmt: skip
    host = None
    for number in range(4):
        hypers = _hypers(algorithm, number, False)
        grads = _tensors(torch.float32, shapes=[tuple(p.shape) for p in params])
        for p, g in zip(params, grads):
            p.grad = g.clone()
        expected.grads = _clone(grads)
        torch._foreach_add_(expected.steps, 1)
        (reference.adam if adam else reference.sgd)(expected, hypers, flags, StepContext())
        if host is None:
            buffer.add_(1)
            work.grads = [p.grad for p in params]
            run(work, hypers, flags, StepContext())  # the full path builds the plan
            host = emulated_backend.host_step(work, hypers, flags, StepContext())
            assert host is not None
            continue
        assert host.check()  # as the optimizer: check, advance the steps, run
        buffer.add_(1)
        LAUNCHES.clear()
        host.run(hypers, StepContext())
        assert LAUNCHES == [f"{algorithm}_"]
        _close(params, expected.params, "param", rtol=0, atol=0)
    for key in keys:
        _close(states[key], expected.states[key], key, rtol=0, atol=0)
    params[1].grad = torch.randn(4, 3).t()  # same shape, other strides
    assert not host.check()


def test_emulated_three_groups_differ_from_one(emulated_backend):
    """The groups' rows are really read: the same tensors with every group on group 0's row
    end elsewhere."""
    params = _tensors(torch.float32)
    grads = _tensors(torch.float32)
    results = []
    for groups in (GROUPS, [0] * len(GROUPS)):
        p = _clone(params)
        work = Work(params=p, grads=_clone(grads), states={}, groups=list(groups))
        flags = SgdFlags(momentum=False, nesterov=False, maximize=False)
        emulated_backend.sgd(work, _hypers("sgd", 0, False), flags, StepContext())
        results.append(p)
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b) == (GROUPS[i] == 0 or a.numel() == 0), i


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_emulated_optimizer_with_three_groups(emulated_backend, monkeypatch, name):
    """The optimizers with backend='cuda' (the emulation standing in for the GPU): three param
    groups in one launch per step, a scheduler changing lr between steps, bitwise the reference
    backend's results."""
    import fused_optim

    monkeypatch.setattr(cuda_backend, "is_available", lambda device: (True, ""))
    initial = _tensors(torch.float32)
    if name == "AdamW":
        options = [{}, dict(lr=0.1, betas=(0.8, 0.95)), dict(weight_decay=0.3, eps=1e-4)]
    else:
        options = [dict(momentum=0.9), dict(lr=0.2, momentum=0.5, dampening=0.3),
                   dict(momentum=0.99, weight_decay=0.01)]  # fmt: skip
    grads = [_tensors(torch.float32) for _ in range(3)]
    results = []
    for backend in ("cuda", "reference"):
        params = [torch.nn.Parameter(t.clone()) for t in initial]
        groups = [dict(params=[p for i, p in enumerate(params) if GROUPS[i] == g], **options[g])
                  for g in range(3)]  # fmt: skip
        optimizer = getattr(fused_optim, name)(groups, lr=0.01, backend=backend)
        LAUNCHES.clear()
        for g in grads:
            for p, grad in zip(params, g):
                p.grad = grad.clone()
            optimizer.step()
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
        if backend == "cuda":
            assert optimizer.group_backends() == ["cuda"] * 3
            assert optimizer.launches_per_step() == 1
            assert len(LAUNCHES) == len(grads)
        results.append([p.detach() for p in params])
    _close(results[0], results[1], "param", rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,options",
    [
        ("SGD", dict(momentum=0.9, dampening=0.3, weight_decay=0.01)),
        ("SGD", dict(momentum=0.9, nesterov=True, maximize=True)),
        ("Adam", dict(weight_decay=0.01)),
    ],
    ids=["sgd-dampening-wd", "sgd-nesterov", "adam-l2"],
)
def test_emulated_complex_params_follow_torchs_complex_arithmetic(
    emulated_backend, monkeypatch, name, options
):
    """Complex params with real ones in one group, backend='cuda' (the emulation): bitwise the
    reference backend, whose complex arithmetic (products rounded before the add) follows
    torch.optim's (tests/test_api.py)."""
    import fused_optim

    monkeypatch.setattr(cuda_backend, "is_available", lambda device: (True, ""))
    gen = torch.Generator().manual_seed(8)
    shapes = [(33, 17), (4097,), (5,)]
    initial = [torch.randn(s, dtype=torch.complex64, generator=gen) for s in shapes]
    initial.append(torch.randn(300, generator=gen))
    grads = [
        [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in initial] for _ in range(3)
    ]
    results = []
    for backend in ("cuda", "reference"):
        params = [torch.nn.Parameter(t.clone()) for t in initial]
        optimizer = getattr(fused_optim, name)(params, lr=0.05, backend=backend, **options)
        for g in grads:
            for p, grad in zip(params, g):
                p.grad = grad.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    _close(results[0], results[1], "param", rtol=0, atol=0)
    assert not torch.equal(results[0][0], initial[0])


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
        work = None
        for g in grads:
            torch._foreach_add_(s, 1)
            work = contract.run_adam(module, p, _clone(g), *st, s, **EMU_ADAM, work=work,
                                     master_params=m, **kw)  # fmt: skip
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
    contract.run_sgd(emulated_backend, params, grads, buffers, **kw, found_inf=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
    expected_p, expected_g, expected_b = _clone(params), _clone(grads), _clone(buffers)
    contract.run_sgd(reference, expected_p, expected_g, expected_b, **kw,
                     found_inf=torch.tensor(0.0))  # fmt: skip
    contract.run_sgd(emulated_backend, params, grads, buffers, **kw, found_inf=torch.tensor(0.0))
    _close(grads, expected_g, "grad")
    _close(params, expected_p, "param")
    _close(buffers, expected_b, "buffer")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
    ids=["fp32", "bf16", "fp16", "fp64"],
)  # fmt: skip
@pytest.mark.parametrize("algorithm", ["sgd", "adam"])
@pytest.mark.parametrize(
    "scaled, write", [(False, False), (False, True), (True, False)],
    ids=["clip", "clip-written", "unscale-clip"],
)  # fmt: skip
def test_emulated_clip_coefficient_is_the_reference_s(emulated_backend, dtype, algorithm,
                                                       scaled, write):  # fmt: skip
    """Gradient clipping's coefficient in the kernel: params, states and gradients bitwise the
    reference's (unscale, then the coefficient in the grad's dtype; the grads written back only
    with the unscale or when asked)."""
    params = _tensors(dtype)
    grads = [_tensors(dtype, scale=3.0) for _ in range(2)]
    states = [[None] * len(params)] if algorithm == "sgd" else [
        [torch.zeros_like(p) for p in params] for _ in range(3)
    ]  # fmt: skip
    steps = None if algorithm == "sgd" else [torch.tensor(0.0) for _ in params]
    kw = dict(grad_coef=torch.tensor(0.3), write_grads=write)
    if scaled:
        kw["grad_scale"] = torch.tensor(4.0)
    if algorithm == "sgd":
        kw["nesterov"], kw["maximize"] = True, False
    else:
        kw.update(amsgrad=False, maximize=False, decoupled_weight_decay=True)
    grads_seen = []
    for module in (emulated_backend, reference):
        p, st = _clone(params), [_clone(column) for column in states]
        step_list = _clone(steps) if steps is not None else None
        g_all = [_clone(g) for g in grads]
        for g in g_all:
            if algorithm == "sgd":
                contract.run_sgd(module, p, g, st[0], **EMU_SGD, **kw)
            else:
                torch._foreach_add_(step_list, 1)
                contract.run_adam(module, p, g, *st, step_list, **EMU_ADAM, **kw)
        grads_seen.append((p, st, g_all))
    (p, st, g), (ep, est, eg) = grads_seen
    if dtype == torch.float64 and algorithm == "adam":
        # fp64 Adam's bias corrections round differently in the emulation and the reference,
        # clipped or not (test_emulated_adam_matches_reference's tolerance).
        _close(p, ep, "param")
        for column, expected in zip(st, est):
            _close(column, expected, "state")
    else:
        for a, b in zip(p, ep):
            assert torch.equal(a, b), (a - b).abs().max()
        for column, expected in zip(st, est):
            for a, b in zip(column, expected):
                assert (a is None and b is None) or torch.equal(a, b)
    for step_grads, expected, original in zip(g, eg, grads):
        for a, b, o in zip(step_grads, expected, original):
            assert torch.equal(a, b)
            assert torch.equal(a, o) == (not scaled and not write) or a.numel() == 0


def test_emulated_plans_live_in_the_work_and_stage_odd_layouts(emulated_backend):
    """The plan is kept in ``work.plan`` (a dict the Work owns) and reused across steps; staged
    tensors (a strided param and gradient, fp64 states of fp32 params) are updated."""
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
    work, built = None, []
    for _ in range(3):
        torch._foreach_add_(group_steps, 1)
        work = contract.run_adam(emulated_backend, group, _clone(grads[0]), *group_states,
                                 group_steps, **EMU_ADAM, **flags, work=work)  # fmt: skip
        assert isinstance(work.plan, dict)
        built.append(work.plan[cuda_backend.PLAN_NAME])
    assert built[0] is built[1] is built[2], "the plan was rebuilt although no tensor moved"
    assert built[0].stages, "nothing was staged"


# ----------------------------------------------------------------------------------------------
# torch.compile: each bucket's update is a custom op that declares the tensors the kernel writes.


def test_custom_op_declares_what_the_kernels_write():
    mutated = ["params", "grads", "state0", "state1", "state2", "master_params"]
    schema = torch.ops.fused_optim.bucket_step.default._schema
    for argument in schema.arguments:
        writes = argument.alias_info is not None and argument.alias_info.is_write
        assert writes == (argument.name in mutated), (argument.name, str(schema))
        if writes:
            assert str(argument.type) == "List[Tensor]", argument.name
    assert not schema.returns, str(schema)
    names = [argument.name for argument in schema.arguments]
    assert {"groups", "indices", "hypers", "lrs", "flags", "handle"} <= set(names), names


def _compiled_step(backend):
    """Adam, then SGD on the same params, through the contract's keyword form (one group)."""

    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        contract.run_adam(backend, params, grads, exp_avgs, exp_avg_sqs, [], steps, **EMU_ADAM,
                          amsgrad=False, maximize=False, decoupled_weight_decay=True)  # fmt: skip
        buffers = [None] * len(params)
        contract.run_sgd(backend, params, grads, buffers, **EMU_SGD, nesterov=False,
                         maximize=False)  # fmt: skip
        return buffers

    return step


def _multi_group_step(backend):
    """One SGD call over three groups, each with its own row."""

    def step(params, grads, groups):
        work = Work(params=params, grads=grads, states={}, groups=groups)
        flags = SgdFlags(momentum=False, nesterov=False, maximize=False)
        backend.sgd(work, _hypers("sgd", 0, False), flags, StepContext())

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
        _compiled_step(cuda_backend),
        fullgraph=True,
        backend=aot_autograd(fw_compiler=forward_compiler),
    )
    with mode, pytest.raises(Traced):
        compiled(params, *tensors, steps)
    torch._dynamo.reset()
    (graph,) = graphs
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and n.args]
    updates = [n for n in calls if "auto_functionalized" in str(n.target)]
    assert [n.args[0] for n in updates] == [torch.ops.fused_optim.bucket_step.default] * 2
    assert [n.kwargs["algorithm"] for n in updates] == ["adam", "sgd"]
    # SGD updates the params Adam wrote (the getitems of its result), not the inputs.
    sgd_bases = updates[1].kwargs["_all_bases"]
    assert all(base.op != "placeholder" for base in sgd_bases)
    # A Work made outside an optimizer has no slot in a SlotPool: handle 0.
    assert all(n.kwargs["handle"] == 0 for n in updates)
    assert all(n.kwargs["backend"] == "cuda" for n in updates)


def test_emulated_custom_ops_under_torch_compile(emulated_backend):
    """The compiled step (custom ops functionalized, then run with their writes copied back)
    updates as the eager reference does."""
    step = _compiled_step(emulated_backend)
    params = _tensors(torch.float32)
    tensors = [_tensors(torch.float32, scale=0.1).copy() for _ in range(3)]
    tensors[2] = [t.abs() for t in tensors[2]]  # exp_avg_sq >= 0
    steps = [torch.tensor(float(i % 3 + 1)) for i in range(len(params))]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for function in (compiled, _compiled_step(reference)):
        p, t, s = _clone(params), [_clone(c) for c in tensors], _clone(steps)
        buffers = function(p, *t, s)
        results.append((p, t, buffers))
    torch._dynamo.reset()
    (p, t, buffers), (rp, rt, rbuffers) = results
    _close(p, rp, "param")
    for name, a, e in zip(("grad", "exp_avg", "exp_avg_sq"), t, rt):
        _close(a, e, name)
    _close(buffers, rbuffers, "momentum_buffer")


def test_emulated_three_groups_under_torch_compile(emulated_backend):
    params = _tensors(torch.float32)
    grads = _tensors(torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(_multi_group_step(emulated_backend), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    results = []
    for function in (compiled, _multi_group_step(reference)):
        p = _clone(params)
        function(p, _clone(grads), list(GROUPS))
        results.append(p)
    torch._dynamo.reset()
    _close(results[0], results[1], "param")


def test_emulated_compiled_step_keeps_its_plan_in_the_slot_pool(emulated_backend):
    """A traced step's Work carries a handle of its optimizer's SlotPool: the op builds the
    bucket's plan once, keeps it in the pool and reuses it while the tensors hold; a handle
    whose pool is gone finds nothing (plans are then built per call), and the module's
    registry keeps no pool alive."""
    params = _tensors(torch.float32)
    pool = compiled.SlotPool()
    work = Work(params=params, grads=_tensors(torch.float32), states={}, groups=list(GROUPS))
    work.handle = pool.handle(3)
    flags = SgdFlags(momentum=False, nesterov=False, maximize=False)
    expected = Work(params=_clone(params), grads=_clone(work.grads), states={},
                    groups=list(GROUPS))  # fmt: skip

    def step(work, hypers):
        emulated_backend.sgd(work, hypers, flags, StepContext())

    torch._dynamo.reset()
    compiled_step = torch.compile(step, fullgraph=True)  # inductor writes in place
    plans_seen = []
    for number in range(3):
        reference.sgd(expected, _hypers("sgd", number, False), flags, StepContext())
        compiled_step(work, _hypers("sgd", number, False))
        plans_seen.append(pool.slots[3][cuda_backend.PLAN_NAME])
    torch._dynamo.reset()
    assert plans_seen[0] is plans_seen[1] is plans_seen[2], "the plan was rebuilt"
    assert list(pool.slots) == [3]
    # The last call's hyperparameters are bound to the kept plan.
    assert plans_seen[0].hyper_key[0] == plans.hyper_rows(_hypers("sgd", 2, False), [0.0] * 3)[0]
    _close(params, expected.params, "param", rtol=0, atol=0)
    handle, alive = pool.handle(3), weakref.ref(pool)
    del pool, plans_seen
    gc.collect()
    assert alive() is None, "the registry keeps a pool alive"
    assert compiled._plans(handle) is None


def test_emulated_custom_op_opcheck(emulated_backend):
    """torch.library.opcheck: the declared mutations are the kernels' (schema check), the fake
    implementation agrees, and AOT dispatch works."""
    params = _tensors(torch.float32)[3:6]
    grads = _tensors(torch.float32)[3:6]
    states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.tensor(2.0) for _ in params]
    groups, indices = [0, 1, 0], [0, 1, 2]
    scale = (torch.tensor(2.0), torch.tensor(0.0))  # grads are unscaled in place
    adam_table = plans.hyper_tensor(_hypers("adam", 0, False)[:2])
    args = ("cuda", "adam", params, grads, *states, [], steps, [], groups, indices, adam_table,
            [], [1, 0, 1, 0], *scale, False, 0, 0)  # fmt: skip
    torch.library.opcheck(torch.ops.fused_optim.bucket_step.default, args)
    buffers = [torch.empty_like(p) for p in params]
    sgd_table = plans.hyper_tensor(_hypers("sgd", 0, False)[:2])
    args = ("cuda", "sgd", params, grads, buffers, [], [], [], [], [1] * len(params), groups,
            indices, sgd_table, [], [1, 0, 0], None, None, False, 0, 0)  # fmt: skip
    torch.library.opcheck(torch.ops.fused_optim.bucket_step.default, args)


# ----------------------------------------------------------------------------------------------
# The gradient norm for clipping, run by the emulation.


def _norm_grads(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1,), (7,), (4095,), (4097,), (70001,), (33, 17), (3, 0)]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads[5] = grads[5].t()  # not contiguous: copied
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", [0, 1, 3], ids=["squares", "abs", "max"])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale"])
def test_emulated_norm_and_coefficient(emulated_backend, dtype, kind, scaled):
    """The CUDA norm pass: the fp64 sum (or maximum) within fp64 rounding of the exact one
    (math.fsum), one launch per gradient dtype and none other, and the norm and torch's clipping
    coefficient from its finishing block bitwise those of torch's operations on that sum
    (``backends.clip``), including a tiny norm near torch's 1e-6, inf and NaN; two runs give the
    same bits, and the ticket counter is back at 0."""
    from fused_optim.backends import clip as clip_backend

    scale = torch.tensor(256.0) if scaled else None
    sets = [_norm_grads(dtype, 1), [g * 1e-8 for g in _norm_grads(torch.float32, 2)]]
    mixed = _norm_grads(dtype, 3)
    mixed[2] = mixed[2].to(torch.float32)
    sets.append(mixed)
    poisoned = _norm_grads(dtype, 4)
    poisoned[4][123] = math.nan if kind == 3 else math.inf
    sets.append(poisoned)
    for grads in sets:
        LAUNCHES.clear()
        combined = emulated_backend.grad_norm(grads, kind, 2.0, scale)
        assert LAUNCHES == ["norm_"] * len({g.dtype for g in grads if g.numel()})
        unscaled = [g.double() / 256.0 if scaled else g.double() for g in grads]
        unscaled = [u.to(g.dtype).double() for u, g in zip(unscaled, grads)]
        values = [abs(x) for u in unscaled for x in u.flatten().tolist()]
        if kind == 3:
            exact = math.nan if any(v != v for v in values) else max(values)
        else:
            exact = math.fsum(v * v if kind == 0 else v for v in values)
        if math.isfinite(exact):
            assert abs(float(combined) - exact) <= 1e-13 * exact, (float(combined), exact)
        else:
            assert float(combined) == exact or (math.isnan(exact) and combined.isnan())
        out_dtype = functools.reduce(torch.promote_types, {g.dtype for g in grads})
        total = (combined.sqrt() if kind == 0 else combined).to(out_dtype)
        for max_norm in (0.5, 1e-3, 1e9):
            LAUNCHES.clear()
            ours = emulated_backend.grad_norm_and_coefficient(grads, kind, scale, max_norm,
                                                              out_dtype)  # fmt: skip
            assert LAUNCHES == ["norm_"] * len({g.dtype for g in grads if g.numel()})
            # torch's coefficient (a value of the norm's dtype), held in the compute dtype: the
            # update kernel of params of the norm's dtype takes it as it is (no conversion op).
            compute = torch.float64 if out_dtype == torch.float64 else torch.float32
            assert ours[1].to(ours[1].device, cuda_backend._compute(out_dtype)) is ours[1]
            expected = clip_backend.coefficient(max_norm, total).to(compute)
            for got, want in zip(ours, (total, expected)):
                assert got.dtype == want.dtype and got.shape == ()
                assert got.view(-1).view(torch.uint8).tolist() == (
                    want.view(-1).view(torch.uint8).tolist()
                ), (float(got), float(want), max_norm)
            again = emulated_backend.grad_norm_and_coefficient(grads, kind, scale, max_norm,
                                                               out_dtype)  # fmt: skip
            assert torch.equal(again[0], ours[0]) or ours[0].isnan()
    assert all(int(c) == 0 for c in plans.NormPass._counters.values())
