"""Build entry point. Everything is declared in pyproject.toml; compiled extensions join here.

Compiled extensions are built against the torch the package will run with. A plain
``pip install .`` builds in pip's isolated environment, which hides the installed torch; setup.py
then asks the installing interpreter, outside that isolation, where its torch is, and imports
that one (``find_target_torch``), so that the extension matches the runtime torch's ABI.
``pip install --no-build-isolation .`` imports it directly. Without torch in the target
environment (``pip install fused_optim`` into an environment that has no torch yet builds before
torch is installed), without a working C++ compiler, or when a build fails, the package installs
as pure Python, and the first step on CPU tensors warns once, naming the reinstall command.

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
import subprocess
import sys
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


# What pip's isolated build environment sets to hide the installing environment's packages.
_ISOLATION_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE")


def find_target_torch() -> str | None:
    """The folder holding the target environment's ``torch`` package, or None.

    Under pip's build isolation this process sees only the build requirements. The interpreter
    pip runs it with is the one the package installs into, so the same interpreter started
    without the isolation's variables finds that environment's torch (without importing it).
    """
    environment = {k: v for k, v in os.environ.items() if k not in _ISOLATION_VARIABLES}
    probe = (
        "import importlib.util, os; spec = importlib.util.find_spec('torch'); "
        "print('\\n' + (os.path.dirname(list(spec.submodule_search_locations)[0]) if spec "
        "else ''))"
    )
    try:
        found = subprocess.run(
            [sys.executable, "-c", probe],
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    # The last line: a sitecustomize of the environment may print before the probe does.
    return (found[-1].strip() if found else "") or None


# What the isolated build brings itself, and must keep over the target environment's copies.
_BUILD_TOOLS = {"setuptools", "pkg_resources", "_distutils_hack", "wheel", "pip", "ninja"}


def _packages_only(folder: str) -> str:
    """A folder of links to the target environment's importable packages and modules, without
    its distribution metadata (*.dist-info, which would bring the other packages' setuptools
    entry points into this build) and without the build tools the isolated build has its own
    copies of; ``folder`` itself where links cannot be made."""
    import atexit
    import shutil
    import tempfile

    view = tempfile.mkdtemp(prefix="fused_optim_torch_")
    atexit.register(shutil.rmtree, view, True)
    try:
        for entry in os.scandir(folder):
            name = entry.name
            top = name.split(".")[0]
            if name.endswith((".dist-info", ".egg-info", ".pth")) or top in _BUILD_TOOLS:
                continue
            os.symlink(entry.path, os.path.join(view, name))
    except OSError:
        return folder
    return view


def _import_cpp_extension():
    """torch.utils.cpp_extension from the torch this package will run with: the importable one,
    else (pip's build isolation) the target environment's, found by ``find_target_torch``."""
    try:
        import torch.utils.cpp_extension as cpp_extension
    except ImportError:
        folder = find_target_torch()
        if folder is None or folder in sys.path:
            raise
        # After the build requirements, so that the isolated setuptools still comes first.
        sys.path.append(_packages_only(folder))
        import torch.utils.cpp_extension as cpp_extension
    return cpp_extension


def cpu_extensions() -> list:
    """The fused C++ CPU backend, or [] when it is skipped or cannot be built here."""
    if _skipped("FUSED_OPTIM_SKIP_CPU_BUILD"):
        if _cpu_build_required():
            raise RequiredBuildError(
                "FUSED_OPTIM_SKIP_CPU_BUILD and FUSED_OPTIM_REQUIRE_CPU_BUILD exclude each other"
            )
        return []
    try:
        CppExtension = _import_cpp_extension().CppExtension
    except Exception as error:  # no torch in the target environment
        _warn(
            f"torch is not installed where fused_optim installs ({error!r}): C++ CPU backend "
            "not built",
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
        "-g0",  # no debug info from Python's CFLAGS: a 2.8 MB extension instead of 36 MB
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

        _import_cpp_extension()
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
