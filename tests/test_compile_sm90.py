"""The Triton kernels compile for an H100/H200 (sm_90) with every kind of flag set.

The CI machine has no GPU: the other tests run the kernels in Triton's interpreter, which does
not compile them. Here each kernel is compiled ahead of time for sm_90 (Triton's own compiler
down to PTX and a cubin, no device needed), so that a kernel that only the interpreter accepts
fails CI instead of a user's GPU run. The compiler cannot run where TRITON_INTERPRET=1 was set
before triton was imported (every test process), so one child process without it compiles all
cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl

POINTERS = {
    "tensor_table": "*i64",
    "grad_table": "*i64",
    "block_table": "*i64",
    "hyper_table": "*fp64",
    "hyper_bits": "*i64",
    "pointer_table": "*i64",
    "partials": "*fp64",
}


def compile_for_sm90(kernel, constants: dict, types: dict | None = None):
    """``types``: the signature of arguments the rules below do not cover."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif types and name in types:
            signature[name] = types[name]
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            assert name == "seed", name  # hyperparameters are table data, never arguments
            signature[name] = "i64"
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    target = GPUTarget("cuda", 90, 32)
    options = {"num_warps": 4, "enable_fp_fusion": False}
    return triton.compile(source, target=target, options=options)


COMMON = dict(ALIGNED=True, BLOCK=1024, LR_FROM_POINTER=False, MAXIMIZE=False)
COMMON.update(COMPLEX_ARITHMETIC=False)
PLAIN = dict(HAS_GRAD_SCALE=False, HAS_FOUND_INF=False, HAS_MASTER=False)
PLAIN.update(HAS_GRAD_COEF=False, WRITE_GRAD=False)
PLAIN.update(STOCHASTIC_ROUNDING=False, STEP_FROM_POINTER=False)


def dtypes(param, state=None, compute=tl.float32):
    return dict(
        PARAM_DTYPE=param, GRAD_DTYPE=param, STATE_DTYPE=state or param, COMPUTE_DTYPE=compute
    )


AMP_AND_PRECISION = dict(
    HAS_GRAD_SCALE=True,
    HAS_GRAD_COEF=True,  # unscale, then clip, and the clipped gradient written back
    WRITE_GRAD=True,
    HAS_FOUND_INF=True,
    HAS_MASTER=True,
    STOCHASTIC_ROUNDING=True,
    STEP_FROM_POINTER=True,
)

SGD_CASES = {
    "fp32": {**dtypes(tl.float32), **PLAIN, "HAS_MOMENTUM": True, "NESTEROV": False},
    "fp64-nesterov-lr-pointer": {
        **dtypes(tl.float64, compute=tl.float64),
        **PLAIN,
        "HAS_MOMENTUM": True,
        "NESTEROV": True,
        "LR_FROM_POINTER": True,
    },
    "bf16-fp32-states-amp-master-sr": {
        **dtypes(tl.bfloat16, tl.float32),
        **AMP_AND_PRECISION,
        "HAS_MOMENTUM": True,
        "NESTEROV": False,
    },
    "fp16-sr-no-momentum": {
        **dtypes(tl.float16),
        **PLAIN,
        "STOCHASTIC_ROUNDING": True,
        "HAS_MOMENTUM": False,
        "NESTEROV": False,
    },
}

ADAM_CASES = {
    "fp32": {**dtypes(tl.float32), **PLAIN, "AMSGRAD": False, "DECOUPLED_WEIGHT_DECAY": True},
    "fp64-amsgrad-capturable": {
        **dtypes(tl.float64, compute=tl.float64),
        **PLAIN,
        "STEP_FROM_POINTER": True,
        "AMSGRAD": True,
        "DECOUPLED_WEIGHT_DECAY": False,
        "LR_FROM_POINTER": True,
    },
    "bf16-fp32-states-amp-master-sr": {
        **dtypes(tl.bfloat16, tl.float32),
        **AMP_AND_PRECISION,
        "AMSGRAD": True,
        "DECOUPLED_WEIGHT_DECAY": True,
        "MAXIMIZE": True,
    },
    "fp32-bf16-states": {
        **dtypes(tl.float32, tl.bfloat16),
        **PLAIN,
        "AMSGRAD": False,
        "DECOUPLED_WEIGHT_DECAY": False,
    },
    "fp16-sr-unaligned": {
        **dtypes(tl.float16),
        **PLAIN,
        "STOCHASTIC_ROUNDING": True,
        "AMSGRAD": False,
        "DECOUPLED_WEIGHT_DECAY": True,
        "ALIGNED": False,
    },
}


def compile_all() -> dict:
    """{case: {"error": message} or {"ptx_v4_loads": bool, "ptx_v4_stores": bool}}."""
    from fused_optim.backends.triton import kernels

    jobs = []
    for name, flags in SGD_CASES.items():
        constants = {**COMMON, "LR_DTYPE": tl.float64, **flags}
        if constants["LR_FROM_POINTER"]:
            constants["LR_DTYPE"] = tl.float32
        jobs.append(("sgd-" + name, kernels.sgd_kernel, constants))
    for name, flags in ADAM_CASES.items():
        constants = {**COMMON, "LR_DTYPE": tl.float64, **flags}
        if constants["LR_FROM_POINTER"]:
            constants["LR_DTYPE"] = tl.float32
        jobs.append(("adam-" + name, kernels.adam_kernel, constants))
    for kind, kind_name in ((0, "squares"), (1, "abs"), (3, "max")):
        for dtype_name, dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
            constants = dict(GRAD_DTYPE=dtype, COMPUTE_DTYPE=tl.float32, KIND=kind, BLOCK=4096)
            constants["HAS_GRAD_SCALE"] = dtype_name == "bf16"
            # The program that finishes the norm, with torch's clipping coefficient.
            constants.update(OUT_DTYPE=dtype, OPMATH_DTYPE=tl.float32, COEF=True, FINAL_BLOCK=128)
            out = "*" + dtype_name
            types = dict(counter="*i32", first_partial="i64", num_partials="i64",
                         total_out=out, coef_out="*fp32")  # fmt: skip
            jobs.append((f"norm-{kind_name}-{dtype_name}", kernels.norm_kernel, constants, types))
    results = {}
    for name, kernel, constants, *types in jobs:
        try:
            compiled = compile_for_sm90(kernel, constants, *types)
        except Exception as error:  # reported by the test of that case
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        ptx = compiled.asm["ptx"]
        results[name] = {
            "cubin_bytes": len(compiled.asm["cubin"]),
            "ptx_v4_loads": "ld.global.v4" in ptx,
            "ptx_v4_stores": "st.global.v4" in ptx,
        }
    return results


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the triton build
        pytest.skip(f"this triton cannot compile ahead of time: {error!r}")
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"sgd-{name}" for name in SGD_CASES])
def test_sgd_kernel_compiles_for_sm90(compiled, case):
    assert "error" not in compiled[case], compiled[case]
    assert compiled[case]["cubin_bytes"] > 0


@pytest.mark.parametrize("case", [f"adam-{name}" for name in ADAM_CASES])
def test_adam_kernel_compiles_for_sm90(compiled, case):
    assert "error" not in compiled[case], compiled[case]
    assert compiled[case]["cubin_bytes"] > 0


def test_aligned_fp32_adam_uses_16_byte_vector_accesses(compiled):
    """The alignment hints reach the compiler: whole blocks load and store 4 floats at once."""
    assert compiled["adam-fp32"]["ptx_v4_loads"]
    assert compiled["adam-fp32"]["ptx_v4_stores"]


if __name__ == "__main__":
    print(json.dumps(compile_all()))


NORM_CASES = [f"norm-{k}-{d}" for k in ("squares", "abs", "max") for d in ("fp32", "bf16")]


@pytest.mark.parametrize("case", NORM_CASES)
def test_norm_kernel_compiles_for_sm90(compiled, case):
    assert "error" not in compiled[case], compiled[case]
    assert compiled[case]["cubin_bytes"] > 0
