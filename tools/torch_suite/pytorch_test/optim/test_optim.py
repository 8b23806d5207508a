"""SHIM, not a PyTorch file (written for fused_optim's tools/torch_suite harness).

Stands where PyTorch's test/optim/test_optim.py stands, so that test/test_optim.py's
``from optim.test_optim import TestDifferentiableOptimizer`` resolves, and run.py's
``differentiable`` suite runs this module.

* When ``test_optim_upstream.py`` (git-ignored: an unmodified copy of PyTorch's
  test/optim/test_optim.py, origin header at its top, see REPORT.md) sits next to this file, the
  real ``TestDifferentiableOptimizer`` (gradcheck through SGD, Adam, AdamW, ... with
  ``differentiable=True``) and, if the copy has it, ``TestSGDComplexForeach`` are re-exported
  from it. pytest collects them from this module; their test functions still live in
  ``optim.test_optim_upstream``, whose module-level ``SGD`` / ``Adam`` / ``AdamW`` conftest.py
  swaps for fused_optim's classes under ``FUSED_OPTIM_SWAP=1``.
* Without it, ``TestDifferentiableOptimizer`` is an empty class: the import resolves and nothing
  is collected.

Compatibility: the copy is newer than torch 2.13 and imports ``HardwareClassification`` from
torch.testing._internal.common_utils (an Enum newer PyTorch uses to sort test classes by
hardware; the copy only sets ``hw_classification = HardwareClassification.GENERIC`` on the class,
which torch 2.13's TestCase never reads). If the installed torch lacks it, a stand-in Enum with
upstream's member names is added to common_utils before the copy is imported. Nothing else in
torch is touched.
"""

from __future__ import annotations

import enum
from pathlib import Path

from torch.testing._internal import common_utils
from torch.testing._internal.common_utils import TestCase

UPSTREAM = Path(__file__).with_name("test_optim_upstream.py")


def _ensure_hardware_classification() -> None:
    if hasattr(common_utils, "HardwareClassification"):
        return

    class HardwareClassification(enum.Enum):
        """Stand-in (tools/torch_suite) for newer PyTorch's common_utils.HardwareClassification;
        same member names, unused by torch 2.13's test machinery."""

        GENERIC = "generic"
        ACCELERATOR = "accelerator"
        CPU = "cpu"
        CUDA = "cuda"
        MPS = "mps"
        XPU = "xpu"

    HardwareClassification.__module__ = common_utils.__name__
    common_utils.HardwareClassification = HardwareClassification


if UPSTREAM.exists():
    _ensure_hardware_classification()
    from . import test_optim_upstream as upstream

    TestDifferentiableOptimizer = upstream.TestDifferentiableOptimizer
    if hasattr(upstream, "TestSGDComplexForeach"):
        TestSGDComplexForeach = upstream.TestSGDComplexForeach
else:

    class TestDifferentiableOptimizer(TestCase):  # type: ignore[no-redef]
        """Empty stand-in: pytorch_test/optim/test_optim_upstream.py is not in place."""
