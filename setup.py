"""Build entry point. Everything is declared in pyproject.toml; compiled extensions join here.

Compiled extensions are optional: without torch at build time (pip's build isolation hides it:
install with ``pip install --no-build-isolation -e .``), without a working C++ compiler, or when
a build fails, the package installs as pure Python and the compiled backends report themselves
unavailable.

* ``fused_optim._C_cpu`` (csrc/cpu, csrc/math): the fused C++ CPU backend. Skipped when
  ``FUSED_OPTIM_SKIP_CPU_BUILD=1``.
* ``fused_optim._C_cuda`` (csrc/cuda, csrc/math): the CUDA C++ backend, built when torch has CUDA
  and ``CUDA_HOME`` is known. Skipped when ``FUSED_OPTIM_SKIP_CUDA_BUILD=1``.

``FUSED_OPTIM_REQUIRE_CPU_BUILD=1`` (CI sets it) turns every reason the CPU extension would be
left out (torch not importable at build time, a compile or link error) into a failed install
instead of a warning, so that a broken C++ build cannot pass as a pure-Python install.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _skipped(variable: str) -> bool:
    return os.environ.get(variable, "0") not in ("", "0")


CPU_EXTENSION = "fused_optim._C_cpu"


class RequiredBuildError(RuntimeError):
    """A compiled extension the environment requires (FUSED_OPTIM_REQUIRE_CPU_BUILD=1) failed."""


def _cpu_build_required() -> bool:
    return _skipped("FUSED_OPTIM_REQUIRE_CPU_BUILD")


def _warn(message: str, required: bool = False) -> None:
    if required:
        raise RequiredBuildError(
            f"fused_optim: {message}, and FUSED_OPTIM_REQUIRE_CPU_BUILD=1 requires it"
        )
    warnings.warn(f"fused_optim: {message}; installing without it", stacklevel=2)
    print(f"WARNING: fused_optim: {message}; installing without it")


def cpu_extensions() -> list:
    """The fused C++ CPU backend, or [] when it is skipped or cannot be built here."""
    if _skipped("FUSED_OPTIM_SKIP_CPU_BUILD"):
        if _cpu_build_required():
            raise RequiredBuildError(
                "FUSED_OPTIM_SKIP_CPU_BUILD and FUSED_OPTIM_REQUIRE_CPU_BUILD exclude each other"
            )
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except Exception as error:  # torch missing (e.g. pip's build isolation)
        _warn(
            f"torch is not importable at build time ({error!r}): C++ CPU backend not built",
            required=_cpu_build_required(),
        )
        return []
    # The x86 kernel builds compile to nothing but their entry points elsewhere (aarch64).
    sources = [
        "csrc/cpu/ops.cpp",
        "csrc/cpu/kernel_base.cpp",
        "csrc/cpu/kernel_avx2.cpp",
        "csrc/cpu/kernel_avx512.cpp",
    ]
    flags = [
        "-O3",
        "-fopenmp",
        "-ffp-contract=off",  # only the fmas csrc/math/update.h spells out
        "-fno-math-errno",  # lets sqrt vectorize; sets no errno, changes no value
        "-Wno-unknown-pragmas",
    ]
    return [
        CppExtension(
            CPU_EXTENSION,
            sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def cuda_extensions() -> list:
    """The CUDA C++ backend (csrc/cuda/build.py says how), or [] when it is skipped
    (FUSED_OPTIM_SKIP_CUDA_BUILD=1) or torch has no CUDA or CUDA_HOME is unknown."""
    if _skipped("FUSED_OPTIM_SKIP_CUDA_BUILD"):
        return []
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "_fused_optim_cuda_build", ROOT / "csrc" / "cuda" / "build.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        extension = module.cuda_extension(ROOT)
    except Exception as error:
        _warn(f"CUDA C++ backend not built ({error!r})")
        return []
    return [] if extension is None else [extension]


def _build_ext_class():
    """torch's BuildExtension, made tolerant: a failed extension warns instead of failing."""
    from torch.utils.cpp_extension import BuildExtension

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except RequiredBuildError:
                raise
            except Exception as error:
                _warn(f"compiled extensions failed to build ({error!r})", _cpu_build_required())

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:
                required = ext.name == CPU_EXTENSION and _cpu_build_required()
                _warn(f"extension {ext.name} failed to build ({error!r})", required)

    return OptionalBuildExtension


def _setup_kwargs() -> dict:
    extensions = cpu_extensions() + cuda_extensions()
    if not extensions:
        return {}
    try:
        build_ext = _build_ext_class()
    except Exception as error:
        _warn(f"torch's BuildExtension is unavailable ({error!r})")
        return {}
    return {"ext_modules": extensions, "cmdclass": {"build_ext": build_ext}}


setup(**_setup_kwargs())
