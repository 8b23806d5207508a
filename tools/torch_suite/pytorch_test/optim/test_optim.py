"""SHIM, not a PyTorch file (written for fused_optim's tools/torch_suite harness).

PyTorch's test/test_optim.py does ``from optim.test_optim import TestDifferentiableOptimizer``.
The real test/optim/test_optim.py (gradcheck tests of torch.optim's functional
``differentiable=True`` paths) was not copied: its tests call torch.optim's classes and functional
APIs directly and are not parametrized over optim_db, so swapping fused_optim in would not change
what they test. This empty class only satisfies the import; it contributes no tests.
"""

from torch.testing._internal.common_utils import TestCase


class TestDifferentiableOptimizer(TestCase):
    pass
