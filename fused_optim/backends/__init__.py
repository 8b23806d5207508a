"""Backend selection: the ONE place that decides which implementation updates which tensors.

``select_backend(request, device)`` returns a backend module implementing the contract of
``backends.contract`` (``sgd`` and ``adam`` entry points on one bucket of tensors, and
optionally a compiled ``host_step``).

* ``request=None`` (auto): the fused C++ CPU backend for CPU tensors when it is built; Triton for
  CUDA/ROCm/XPU tensors and (without the C++ backend) whenever ``TRITON_INTERPRET=1``; the CUDA
  C++ backend for CUDA tensors when Triton is missing; the pure-torch reference otherwise. Auto
  never fails: it falls back to the reference silently, and ``Optimizer.group_backends()`` tells
  what it chose.
* ``request="triton"`` / ``"cuda"`` / ``"cpu"`` / ``"reference"``: exactly that backend, or a
  ``BackendUnavailableError`` (a ``RuntimeError``) that says why it cannot run on that device.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

from . import reference

BACKENDS = ("triton", "cuda", "cpu", "reference")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


_MODULES: dict[str, ModuleType] = {"reference": reference}


def _module(name: str) -> ModuleType:
    """The backend module ``name``, imported on first use (triton and the extensions load only
    when asked for) and then looked up, which torch.compile can trace."""
    module = _MODULES.get(name)
    if module is None:
        module = _MODULES[name] = importlib.import_module(f"{__name__}.{name}")
    return module


def validate_request(request: str | None) -> None:
    if request is not None and request not in BACKENDS:
        raise ValueError(f"Invalid backend: {request!r}; expected None or one of {BACKENDS}")


_warned_slow_cpu_default = False


def _warn_slow_cpu_default() -> None:
    """Once per process: CPU tensors get the pure-torch reference backend because the C++ CPU
    extension is not built, a silent several-fold slowdown otherwise."""
    global _warned_slow_cpu_default
    if _warned_slow_cpu_default:
        return
    _warned_slow_cpu_default = True
    reason = _module("cpu").is_available(torch.device("cpu"))[1]
    warnings.warn(
        "fused_optim: CPU tensors are updated by the pure-torch reference backend, several "
        f"times slower than the fused C++ one, because {reason}",
        RuntimeWarning,
        stacklevel=3,
    )


def select_backend(
    request: str | None, device: torch.device, sparse_grads: bool = False
) -> ModuleType:
    """The backend module that updates tensors on ``device`` for this request.

    Sparse gradients (SGD only, as in torch.optim) need a backend with ``SUPPORTS_SPARSE``.
    """
    validate_request(request)
    if request is None:
        if sparse_grads:
            return reference
        if device.type == "cpu":
            cpu_backend = _module("cpu")
            if cpu_backend.is_available(device)[0]:
                return cpu_backend
        # GPUs: Triton, else the CUDA C++ extension when it is built.
        for name in ("triton", "cuda"):
            backend = _module(name)
            if backend.is_available(device)[0]:
                return backend
        if device.type == "cpu":
            _warn_slow_cpu_default()
        return reference
    backend = _module(request)
    available, reason = backend.is_available(device)
    if available and sparse_grads and not backend.SUPPORTS_SPARSE:
        available, reason = False, "it does not support sparse gradients"
    if not available:
        raise BackendUnavailableError(f"backend={request!r} is unavailable: {reason}")
    return backend


def preload(request: str | None, devices) -> None:
    """Import the backend modules that steps on ``devices`` will use, so that a step traced by
    torch.compile finds them imported (an import cannot be traced). Refuses nothing: an
    unavailable backend still fails at the first step, with its reason."""
    validate_request(request)
    if request is not None:
        _module(request)
        return
    for device in set(devices):
        select_backend(None, torch.device(device))


_python_host_checks = False


def use_python_host_checks(enabled: bool) -> None:
    """Make ``host_checks()`` answer with the plain-Python checks even where the extension is
    built: what an install without it runs (for benchmarks and tests)."""
    global _python_host_checks
    _python_host_checks = bool(enabled)


def host_checks():
    """The step checks of the optimizer's fast path (``StepChecks``, ``GradTable``,
    ``values_unchanged``, ``adam_bias_corrections``, ``advance_steps``): the C++ extension's where
    it is built, else their plain-Python twin (``backends.python_checks``)."""
    cpu_backend = _module("cpu")
    if _python_host_checks or cpu_backend._IMPORT_ERROR is not None:
        from . import python_checks

        return python_checks
    return cpu_backend._C_cpu


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` on this machine."""
    device = torch.device(device)
    return [name for name in BACKENDS if _module(name).is_available(device)[0]]
