"""The C++ CPU backend's sources compile for aarch64 (Graviton, Grace) without x86 intrinsics.

The x86 builds (baseline, AVX2, AVX-512) are compiled by every install; this checks that the
same sources, with their x86 parts guarded, pass an aarch64 C++ compiler's syntax and semantic
check against torch's headers (``-fsyntax-only``: no aarch64 torch to link against here). It
needs a cross compiler (Debian's ``g++-aarch64-linux-gnu``, which .ci/run installs).
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
CROSS = shutil.which("aarch64-linux-gnu-g++")


def test_every_cpu_source_is_listed():
    names = {path.name for path in SOURCES}
    assert {"ops.cpp", "kernel_base.cpp", "kernel_avx2.cpp", "kernel_avx512.cpp"} <= names
    setup = (ROOT / "setup.py").read_text()
    for name in names:
        assert f"csrc/cpu/{name}" in setup, f"setup.py does not build {name}"


@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler (g++-aarch64-linux-gnu)")
@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_source_compiles_for_aarch64(source):
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    includes += [f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}"]
    flags = ["-std=c++17", "-fsyntax-only", "-fopenmp", "-ffp-contract=off", "-Werror=all"]
    done = subprocess.run(
        [CROSS, *flags, "-Wno-unknown-pragmas", *includes, str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "immintrin" not in done.stderr
