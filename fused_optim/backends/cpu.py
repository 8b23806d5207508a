"""Fused C++ CPU backend: one call per (dtype) group and step, one OpenMP parallel region.

Same entry points and signatures as ``backends.reference``. The kernels are the compiled
extension ``fused_optim._C_cpu`` (csrc/cpu, with the per-element math of csrc/math/update.h),
registered as the operators ``torch.ops.fused_optim.sgd_`` and ``torch.ops.fused_optim.adam_``
(mutable tensor-list schemas with fake implementations, so that torch.compile can trace them).
The package builds it when torch is importable at install time
(``pip install --no-build-isolation -e .``); without it this backend reports itself unavailable
with the original import error.

The kernel walks every tensor in its param's memory order in 16K-element chunks, all chunks of
all tensors in one parallel loop; the update math runs in fp32 (fp64 for fp64 params) and rounds
once at the store, with torch.optim's operation order, like the Triton kernels. AVX-512 and
AVX2+FMA builds of the kernels are chosen at run time on CPUs that have them (``cpu_isa()`` says
which runs, ``supported_isas()`` which could; ``FUSED_OPTIM_CPU_ISA=base|avx2|avx512`` forces
one). Every build gives the same bits: IEEE operations, each correctly rounded, with the fmas
spelled out.
"""

from __future__ import annotations

import torch
from torch import Tensor

NAME = "cpu"
SUPPORTS_SPARSE = False

try:
    from .. import _C_cpu  # noqa: F401  (loading it registers the operators)

    _IMPORT_ERROR: BaseException | None = None
except ImportError as error:  # pragma: no cover - depends on the build
    _IMPORT_ERROR = error

__all__ = [
    "ISAS",
    "NAME",
    "SUPPORTS_SPARSE",
    "adam",
    "cpu_isa",
    "is_available",
    "set_isa",
    "sgd",
    "supported_isas",
]

#: Every kernel build the extension has, in order of preference (last is best).
ISAS: tuple[str, ...] = ("base", "avx2", "avx512")


def is_available(device: torch.device) -> tuple[bool, str]:
    """Whether this backend can update tensors on ``device``, and why not if it cannot."""
    if _IMPORT_ERROR is not None:
        return False, (
            f"the C++ CPU extension fused_optim._C_cpu is not built ({_IMPORT_ERROR!r}); "
            'reinstall with `pip install --no-build-isolation -e ".[test]"`'
        )
    if torch.device(device).type != "cpu":
        return False, f"it runs on CPU tensors only (got {torch.device(device).type!r})"
    return True, ""


def cpu_isa() -> str:
    """The kernel build in use: ``"avx512"`` (AVX-512 F+BW+VL+DQ), ``"avx2"`` (AVX2+FMA+F16C) or
    ``"base"`` (x86-64 baseline, or portable C++ elsewhere). ``FUSED_OPTIM_CPU_ISA=base|avx2|
    avx512`` forces one (an error at the first step if this CPU cannot run it); unset or
    ``auto``, the best one this CPU supports."""
    return torch.ops.fused_optim.cpu_isa()


def set_isa(isa: str) -> str:
    """Switch the kernel build this process uses (one this CPU can run, or ``"auto"``); returns
    the previous one. For benchmarks and tests that compare builds; every build gives the same
    bits."""
    return torch.ops.fused_optim.cpu_set_isa(isa)


def supported_isas() -> list[str]:
    """The kernel builds (of :data:`ISAS`) this CPU can run, in order of preference."""
    return list(torch.ops.fused_optim.cpu_supported_isas())


if _IMPORT_ERROR is None:

    @torch.library.register_fake("fused_optim::sgd_")
    def _sgd_fake(*args, **kwargs) -> None:
        return None

    @torch.library.register_fake("fused_optim::adam_")
    def _adam_fake(*args, **kwargs) -> None:
        return None


def _lr_args(lr: float | Tensor) -> tuple[Tensor | None, float]:
    if isinstance(lr, Tensor):
        return lr, 0.0
    return None, float(lr)


def _seed(seed: int) -> int:
    return int(seed) & 0xFFFFFFFF


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    cache: dict | None = None,
    steps: list[Tensor] | None = None,
    master_params: list[Tensor] | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    param_indices: list[int] | None = None,
    new_buffer_dtype: torch.dtype | None = None,
) -> None:
    if not params:
        return
    has_momentum = momentum != 0
    new_flags = [0] * len(params)
    buffers: list[Tensor] = []
    if has_momentum:
        missing = [i for i, buf in enumerate(momentum_buffers) if buf is None]
        if missing and found_inf is not None and bool(found_inf.item()):
            # A skipped step still creates the buffers (as the reference does) and nothing else.
            from . import reference

            reference.sgd(
                params,
                grads,
                momentum_buffers,
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                maximize=maximize,
                grad_scale=grad_scale,
                found_inf=found_inf,
                new_buffer_dtype=new_buffer_dtype,
            )
            return
        for i in missing:
            dtype = new_buffer_dtype or grads[i].dtype
            momentum_buffers[i] = torch.empty_like(params[i], dtype=dtype)
            new_flags[i] = 1
        buffers = momentum_buffers  # type: ignore[assignment]
    lr_tensor, lr_value = _lr_args(lr)
    torch.ops.fused_optim.sgd_(
        params,
        grads,
        buffers,
        new_flags,
        list(steps) if steps and stochastic_rounding else [],
        list(master_params) if master_params else [],
        lr_tensor,
        lr_value,
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(maximize),
        grad_scale,
        found_inf,
        bool(stochastic_rounding),
        _seed(seed),
        list(param_indices) if param_indices else [],
    )


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    capturable: bool = False,
    cache: dict | None = None,
    master_params: list[Tensor] | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    param_indices: list[int] | None = None,
) -> None:
    if not params:
        return
    lr_tensor, lr_value = _lr_args(lr)
    # As the reference: with capturable=True or under GradScaler, torch.optim computes the bias
    # corrections with tensor arithmetic (sqrt instead of ** 0.5).
    tensor_bias_corrections = bool(capturable) or found_inf is not None
    torch.ops.fused_optim.adam_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs if amsgrad else [],
        steps,
        list(master_params) if master_params else [],
        lr_tensor,
        lr_value,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bool(amsgrad),
        bool(maximize),
        bool(decoupled_weight_decay),
        tensor_bias_corrections,
        grad_scale,
        found_inf,
        bool(stochastic_rounding),
        _seed(seed),
        list(param_indices) if param_indices else [],
    )
