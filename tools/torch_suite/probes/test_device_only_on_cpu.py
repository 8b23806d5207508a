"""CPU probes of PyTorch tests that the suite only runs on accelerators (tools/torch_suite).

NOT PyTorch's way of running these tests, and not part of run.py's default files: on this
CPU-only machine the tests below are skipped by ``@onlyCUDA`` / ``@onlyAccelerator``. Here their
bodies (from pytorch_test/test_optim.py, unchanged: reached with ``inspect.unwrap``) are called
with ``device="cpu"``, with the same OptimizerInfo the suite would pass, so that the baseline
(torch.optim) and the swapped run (fused_optim, see ../conftest.py) can be compared on CPU. What
a body asserts about CUDA-only behaviour (e.g. the fused CUDA kernel's mixed-precision path) is
then tested against the CPU implementations, so treat outcomes as indications only.

    cd tools/torch_suite && FUSED_OPTIM_SWAP=1 python -m pytest probes -q
    python tools/torch_suite/run.py --files probes     # both modes, compared
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pytorch_test"))

import test_optim as suite
from torch.testing._internal.common_optimizers import optim_db

NAMES = ("Adam", "AdamW", "SGD")
CASES = []
for name in NAMES:
    CASES += [
        ("test_fused_does_not_step_if_foundinf", name, torch.float32, {}),
        ("test_set_default_dtype_works_with_foreach", name, torch.float64, {}),
        ("test_state_dict_cross_device", name, torch.float32, {}),
        ("test_defaults_changed_to_foreach", name, torch.float32, {}),
    ]
for name in ("Adam", "AdamW"):
    for amsgrad in (False, True):
        CASES += [
            ("test_fused_mixed_precision_state_init", name, torch.float32, {"amsgrad": amsgrad}),
            (
                "test_fused_mixed_precision_hook_skips_existing_state",
                name,
                torch.float32,
                {"amsgrad": amsgrad},
            ),
        ]
    CASES.append(("test_fused_mixed_precision_numerics", name, torch.float32, {}))


def _case_id(case) -> str:
    test, name, dtype, extra = case
    suffix = "".join(f"_{k}_{v}" for k, v in extra.items())
    return f"{test}{suffix}_{name}_cpu_{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_probe(case):
    test, name, dtype, extra = case
    info = next(i for i in optim_db if i.optim_cls.__name__ == name)
    # The generic TestOptimRenewed is removed by instantiate_device_type_tests; the CPU class
    # has these tests too (skipped at run time): their innermost function is the test's body.
    body = inspect.unwrap(getattr(suite.TestOptimRenewedCPU, _case_id(case)))
    assert body.__name__ == test, body
    instance = suite.TestOptimRenewedCPU("test_optimizer_can_be_printed_SGD_cpu_float32")
    instance.setUp()
    try:
        body(instance, "cpu", dtype, info, **extra)
    finally:
        instance.tearDown()
