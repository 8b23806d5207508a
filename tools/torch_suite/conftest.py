"""pytest plugin for running PyTorch's optimizer tests against fused_optim (tools/torch_suite).

Environment variables (all optional):

FUSED_OPTIM_SWAP=1
    Swap fused_optim's classes in. This happens when pytest loads this conftest, i.e. before the
    test modules are imported and parametrized:
      * ``torch.testing._internal.common_optimizers.optim_db``: the ``optim_cls`` of the Adam,
        AdamW and SGD OptimizerInfo entries become fused_optim.Adam / AdamW / SGD. Test ids do
        not change (they use ``optim_cls.__name__``, and the fused classes keep those names).
      * pytorch_test/optim/test_lrscheduler.py: its module-level names ``SGD`` and ``Adam``
        (imported there from torch.optim) become the fused classes, after import and before any
        test runs. Explicit ``torch.optim.AdamW(...)`` calls in that file stay torch's.
      * pytorch_test/optim/test_optim_upstream.py (PyTorch's test/optim/test_optim.py, collected
        through the shim pytorch_test/optim/test_optim.py): its module-level ``SGD``, ``Adam``
        and ``AdamW`` (imported there from torch.optim, and what TestDifferentiableOptimizer and
        TestSGDComplexForeach construct) become the fused classes the same way.
    torch.optim itself is never patched (fused_optim's constructors call torch.optim.Adam.__init__
    etc. by name).
FUSED_OPTIM_DEFAULT_BACKEND=<name>
    With FUSED_OPTIM_SWAP=1: the swapped-in classes pass ``backend=<name>`` (e.g. "reference")
    unless a test passes one or passes differentiable=True (which runs torch.optim's own step
    and rejects backend= with a ValueError, by design). The subclasses keep the names Adam /
    AdamW / SGD.
FUSED_OPTIM_TRACE=<path.json>
    With FUSED_OPTIM_SWAP=1: record, per test, how fused_optim took its steps (fused backend
    calls by backend name, torch.optim's own step for differentiable=True, and the torch.optim
    fallback for configurations the kernels do not take; "fused:<backend>" counts backend calls
    of steps that had grads to update) and write it to <path.json>. It wraps
    private methods of fused_optim.optim._base.FusedOptimizerMixin; only a diagnostic.
FUSED_OPTIM_SUITE_ALL=1
    Do not filter. By default, tests collected from pytorch_test/test_optim.py are kept only if
    they are TestOptimRenewedCPU tests parametrized over the Adam, AdamW or SGD OptimizerInfo
    (their id contains ``_Adam_cpu``, ``_AdamW_cpu`` or ``_SGD_cpu``); everything else in that
    file (the other optimizers, TestLRScheduler and TestDifferentiableOptimizer imported into
    it, non-optim_db tests) is deselected. From pytorch_test/optim/test_optim.py (the shim) and
    test_optim_upstream.py, only the TestDifferentiableOptimizer tests of SGD, Adam and AdamW
    (``DIFFERENTIABLE_TESTS``) and TestSGDComplexForeach are kept; the gradchecks of RMSprop,
    Adadelta, Adagrad, Adamax, ASGD, Rprop, NAdam and RAdam are deselected. Tests from
    pytorch_test/optim/test_lrscheduler.py are all kept.
"""

from __future__ import annotations

import os
import re
import sys

import torch

SWAP = os.environ.get("FUSED_OPTIM_SWAP", "") == "1"
DEFAULT_BACKEND = os.environ.get("FUSED_OPTIM_DEFAULT_BACKEND") or None
FILTER = os.environ.get("FUSED_OPTIM_SUITE_ALL", "") != "1"

SWAPPED_NAMES = ("Adam", "AdamW", "SGD")
# The optims() parametrizer puts the OptimizerInfo name right before the device suffix.
OPTIM_ID = re.compile(r"_(Adam|AdamW|SGD)_cpu(_|$)")
# PyTorch's test/optim/test_optim.py: the TestDifferentiableOptimizer tests that construct SGD,
# Adam or AdamW (test_sgd, test_adam, test_adamw, test_adam[w]_differentiable_*, and the SGD
# hyperparameter gradchecks test_differentiable_lr / _weight_decay / _weight_decay_and_lr).
DIFFERENTIABLE_TESTS = re.compile(
    r"test_(sgd|adam|adamw)"
    r"|test_adamw?_differentiable_\w+"
    r"|test_differentiable_(lr|weight_decay|weight_decay_and_lr)"
)
DIFFERENTIABLE_FILES = ("test_optim.py", "test_optim_upstream.py")  # under pytorch_test/optim/
DIFFERENTIABLE_CLASSES = ("TestDifferentiableOptimizer", "TestSGDComplexForeach")


def _with_default_backend(cls: type, backend: str) -> type:
    """A subclass of ``cls`` with the same name whose ``backend`` defaults to ``backend``."""

    def __init__(self, params, *args, **kwargs):
        # differentiable=True runs torch.optim's own step and refuses any backend= (by design,
        # a ValueError): leave those constructions alone.
        if not kwargs.get("differentiable", False):
            kwargs.setdefault("backend", backend)
        cls.__init__(self, params, *args, **kwargs)

    sub = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    sub.__qualname__ = cls.__qualname__
    return sub


def _fused_classes() -> dict[str, type]:
    import fused_optim

    classes = {name: getattr(fused_optim, name) for name in SWAPPED_NAMES}
    if DEFAULT_BACKEND:
        classes = {n: _with_default_backend(c, DEFAULT_BACKEND) for n, c in classes.items()}
    return classes


FUSED = _fused_classes() if SWAP else {}
_swapped_db: list[str] = []

if SWAP:
    from torch.testing._internal import common_optimizers

    for info in common_optimizers.optim_db:
        name = info.optim_cls.__name__
        if name in FUSED and info.optim_cls is getattr(torch.optim, name):
            info.optim_cls = FUSED[name]
            _swapped_db.append(name)
    if sorted(_swapped_db) != sorted(SWAPPED_NAMES):
        raise RuntimeError(f"FUSED_OPTIM_SWAP: expected to swap {SWAPPED_NAMES}, did {_swapped_db}")


TRACE = os.environ.get("FUSED_OPTIM_TRACE") if SWAP else None
_trace: dict[str, dict[str, int]] = {}
_current: dict[str, int] | None = None


def _install_trace() -> None:
    from fused_optim.optim import _base

    mixin = _base.FusedOptimizerMixin

    def count(key: str) -> None:
        if _current is not None:
            _current[key] = _current.get(key, 0) + 1

    step, torch_step, fallback = mixin._step, mixin._torch_step, mixin._torch_fallback_step

    def traced_step(self, context):
        count("step() calls")
        result = step(self, context)
        plan = self._plan
        if plan is not None:
            for bucket in plan.buckets:
                count("fused:" + getattr(bucket.backend, "NAME", type(bucket.backend).__name__))
        return result

    def traced_torch_step(self, closure):
        if self._differentiable():
            count("step() calls")
        count("torch_step(differentiable)" if self._differentiable() else "torch_step(inner)")
        return torch_step(self, closure)

    def traced_fallback(self, suspects, context):
        count("torch_fallback")
        return fallback(self, suspects, context)

    mixin._step = traced_step
    mixin._torch_step = traced_torch_step
    mixin._torch_fallback_step = traced_fallback


if TRACE:
    _install_trace()


def pytest_runtest_call(item):
    global _current
    if TRACE:
        _current = _trace.setdefault(item.nodeid, {})


def pytest_sessionfinish(session):
    if TRACE:
        import json

        with open(TRACE, "w") as f:
            json.dump(_trace, f, indent=1, sort_keys=True)


def pytest_report_header(config):
    if not SWAP:
        return ["torch_suite: BASELINE (torch.optim classes)"]
    lines = [
        "torch_suite: SWAPPED, optim_db entries now "
        + ", ".join(f"{n} -> {FUSED[n].__module__}.{FUSED[n].__qualname__}" for n in _swapped_db)
    ]
    if DEFAULT_BACKEND:
        lines.append(f"torch_suite: default backend={DEFAULT_BACKEND!r}")
    return lines


_patched_names: list[str] = []


def _patch_module(module, names: tuple[str, ...]) -> None:
    """Module-level names bound to torch.optim's classes become the fused classes."""
    for name in names:
        current = getattr(module, name, None)
        if current is getattr(torch.optim, name):
            setattr(module, name, FUSED[name])
            _patched_names.append(f"{module.__name__}.{name}")


def pytest_terminal_summary(terminalreporter):
    if SWAP:
        terminalreporter.write_line(
            "torch_suite: swapped optim_db entries: "
            + ", ".join(_swapped_db)
            + "; patched module names: "
            + (", ".join(_patched_names) or "none")
        )


def _keep(item) -> bool:
    path = item.path.name
    cls = item.cls.__name__ if item.cls is not None else ""
    if path == "test_optim.py" and item.path.parent.name == "pytorch_test":
        return cls.startswith("TestOptimRenewed") and OPTIM_ID.search(item.name) is not None
    if path in DIFFERENTIABLE_FILES and item.path.parent.name == "optim":
        if cls == "TestDifferentiableOptimizer":
            return DIFFERENTIABLE_TESTS.fullmatch(item.name) is not None
        return cls in DIFFERENTIABLE_CLASSES
    return True


def _swap_module_names(items) -> None:
    """FUSED_OPTIM_SWAP=1: module-level torch.optim names of the modules the kept tests use."""
    seen = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.endswith("test_lrscheduler"):
            if id(module) not in seen:
                seen.add(id(module))
                _patch_module(module, ("SGD", "Adam"))
        # TestDifferentiableOptimizer / TestSGDComplexForeach are collected from the shim (and
        # test/test_optim.py imports the former); their test functions read SGD, Adam and AdamW
        # from the module that defines them, optim.test_optim_upstream.
        cls = getattr(item, "cls", None)
        if cls is not None and cls.__name__ in DIFFERENTIABLE_CLASSES:
            defining = sys.modules.get(cls.__module__)
            if defining is not None and id(defining) not in seen:
                seen.add(id(defining))
                _patch_module(defining, SWAPPED_NAMES)


def pytest_collection_modifyitems(session, config, items):
    if FILTER:
        kept, dropped = [], []
        for item in items:
            (kept if _keep(item) else dropped).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
    if SWAP:
        _swap_module_names(items)
