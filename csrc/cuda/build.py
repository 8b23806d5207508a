"""How setup.py builds the CUDA C++ backend (``fused_optim._C_cuda``).

setup.py's ``cuda_extensions()`` can load this file (csrc is not a package) and call
:func:`cuda_extension`::

    spec = importlib.util.spec_from_file_location("_cuda_build", ROOT / "csrc/cuda/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    extension = module.cuda_extension(ROOT)  # None when torch has no CUDA or CUDA_HOME is unset
"""

from __future__ import annotations

import os
from pathlib import Path

SOURCES = ["csrc/cuda/fused_cuda.cu", "csrc/cuda/fused_cuda_ops.cpp"]
# sm_90 SASS for H100/H200 and compute_80 PTX that the driver JIT-compiles for any newer GPU.
# FUSED_OPTIM_CUDA_GENCODE (";"-separated gencode flags) replaces the list.
GENCODE = [
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_80,code=compute_80",
]
# --fmad=false: only the fmas csrc/math/update.h spells out. c++17 is enough for the kernels,
# which include no torch header; the binding (.cpp) gets torch's own -std (c++20 in torch 2.13).
NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++17"]
CXX_FLAGS = ["-O3", "-ffp-contract=off"]


def gencode_flags() -> list[str]:
    override = os.environ.get("FUSED_OPTIM_CUDA_GENCODE", "").strip()
    if override:
        return [flag for flag in override.split(";") if flag]
    return list(GENCODE)


def cuda_extension(root: Path):
    """The CUDAExtension, or None when torch is not a CUDA build or nvcc's CUDA_HOME is unknown.

    Caller handles FUSED_OPTIM_SKIP_CUDA_BUILD and import errors of torch.
    """
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None:
        return None
    root = Path(root)
    return CUDAExtension(
        "fused_optim._C_cuda",
        SOURCES,  # relative to setup.py, as setuptools requires
        include_dirs=[str(root / "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + gencode_flags()},
    )
