"""Triton backend: one kernel launch per (device, dtype) group and step.

Same entry points and signatures as ``backends.reference``. Runs on CUDA, ROCm and XPU tensors,
and on CPU tensors through the Triton interpreter when ``TRITON_INTERPRET=1`` was set before
triton was imported.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

NAME = "triton"
SUPPORTS_SPARSE = False

try:
    import triton.language as tl

    from . import kernels, plan
    from .plan import plan_for

    _IMPORT_ERROR: BaseException | None = None
except ImportError as error:  # pragma: no cover - depends on the machine
    _IMPORT_ERROR = error

__all__ = ["BLOCK", "NAME", "adam", "interpreting", "is_available", "sgd"]

GPU_DEVICE_TYPES = ("cuda", "xpu")


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available(device: torch.device) -> tuple[bool, str]:
    """Whether this backend can update tensors on ``device``, and why not if it cannot."""
    if _IMPORT_ERROR is not None:
        return False, f"triton could not be imported: {_IMPORT_ERROR!r}"
    if interpreting():
        return True, ""
    if device.type in GPU_DEVICE_TYPES:
        return True, ""
    return False, (
        f"Triton kernels need a CUDA, ROCm or XPU device (got {device.type!r}); "
        "set TRITON_INTERPRET=1 before triton is imported to run them on the CPU"
    )


def _tl_dtype(dtype: torch.dtype):
    return {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }[dtype]


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _lr_args(lr: float | Tensor, device: torch.device, fallback: Tensor):
    """(pointer argument, scalar argument, LR_FROM_POINTER, LR_DTYPE) for a float or tensor lr.

    A tensor lr on the params' device is read by the kernel; one elsewhere (a CPU scalar) is
    read here. Either way the scalar math around it runs in its dtype, as in torch.optim.
    """
    if not isinstance(lr, Tensor):
        return fallback, float(lr), False, tl.float64
    if lr.device == device:
        return lr, 0.0, True, _tl_dtype(lr.dtype)
    return fallback, float(lr.item()), False, _tl_dtype(lr.dtype)


def _launch(kernel, launch_plan, grads, grad_dtype: torch.dtype, args: tuple, flags: dict):
    launch_plan.bind_grads(grads, grad_dtype)
    if launch_plan.num_blocks == 0:
        return
    launch_plan.stage_in()
    kernel[(launch_plan.num_blocks,)](
        launch_plan.tensor_table,
        launch_plan.grad_table,
        launch_plan.block_table,
        *args,
        BLOCK=launch_plan.block,
        ALIGNED=launch_plan.aligned,
        num_warps=plan.NUM_WARPS,
        # The kernel spells out torch.optim's roundings (and its fmas): the compiler must not
        # fuse other multiplies and adds into fmas behind its back.
        enable_fp_fusion=False,
        **flags,
    )
    launch_plan.stage_out()


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
    cache: dict,
) -> None:
    if not params:
        return
    dtype = params[0].dtype
    has_momentum = momentum != 0
    states: list[list[Tensor]] = []
    is_new = torch.zeros(len(params), dtype=torch.int64)
    if has_momentum:
        if any(buf is None for buf in momentum_buffers):  # `in` would compare tensors
            for i, buf in enumerate(momentum_buffers):
                if buf is None:
                    # Same layout as the param, so the kernel walks both as one span.
                    momentum_buffers[i] = torch.empty_like(params[i])
                    is_new[i] = 1
        states = [momentum_buffers]  # type: ignore[list-item]
    launch_plan = plan_for(cache, "sgd", params, states, is_new, dtype)
    lr_tensor, lr_value, lr_from_pointer, _ = _lr_args(
        lr, launch_plan.device, launch_plan.tensor_table
    )
    _launch(
        kernels.sgd_kernel,
        launch_plan,
        grads,
        dtype,
        (lr_tensor, lr_value, float(momentum), float(dampening), float(weight_decay)),
        dict(
            PARAM_DTYPE=_tl_dtype(dtype),
            GRAD_DTYPE=_tl_dtype(dtype),
            STATE_DTYPE=_tl_dtype(dtype),
            COMPUTE_DTYPE=_compute_dtype(dtype),
            HAS_MOMENTUM=has_momentum,
            NESTEROV=bool(nesterov),
            MAXIMIZE=bool(maximize),
            LR_FROM_POINTER=lr_from_pointer,
        ),
    )


def _step_values(steps: list[Tensor]) -> Tensor:
    """The step counts as one host tensor: the shared buffer the optimizer keeps them in (its
    ``step`` states are consecutive 0-dim views of it), or a stack of separate tensors."""
    buffer = steps[0]._base
    if buffer is not None and buffer.dim() == 1 and buffer.numel() == len(steps):
        start, size = buffer.data_ptr(), buffer.element_size()
        if list(map(Tensor.data_ptr, steps)) == list(range(start, start + size * len(steps), size)):
            return buffer
    return torch.stack([s.reshape(()) for s in steps])


def _step_offsets(steps: list[Tensor]) -> tuple[float, Tensor]:
    """The largest step and each tensor's distance below it, read from host-side step tensors."""
    values = _step_values(steps).to(torch.float64)
    base = float(values.max())
    return base, (base - values).to(torch.int64)


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
    cache: dict,
) -> None:
    if not params:
        return
    if capturable and len({s.dtype for s in steps}) > 1:
        # The kernel reads steps of one dtype: split a group whose steps mix float32/float64.
        for step_dtype in {s.dtype for s in steps}:
            keep = [i for i, s in enumerate(steps) if s.dtype == step_dtype]

            def take(values, keep=keep):
                return [values[i] for i in keep] if values else []

            adam(
                take(params),
                take(grads),
                take(exp_avgs),
                take(exp_avg_sqs),
                take(max_exp_avg_sqs),
                take(steps),
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                amsgrad=amsgrad,
                maximize=maximize,
                decoupled_weight_decay=decoupled_weight_decay,
                capturable=True,
                cache=cache.setdefault(step_dtype, {}),
            )
        return
    dtype = params[0].dtype
    states = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    if capturable:
        # Steps live on the device; the kernel reads each one through its address.
        base_step, aux = 1.0, torch.tensor(list(map(Tensor.data_ptr, steps)), dtype=torch.int64)
    else:
        # Steps live on the host, as in torch.optim's default path: no device read needed.
        base_step, aux = _step_offsets(steps)
    launch_plan = plan_for(cache, "adam", params, states, aux, dtype)
    lr_tensor, lr_value, lr_from_pointer, lr_dtype = _lr_args(
        lr, launch_plan.device, launch_plan.tensor_table
    )
    _launch(
        kernels.adam_kernel,
        launch_plan,
        grads,
        dtype,
        (
            lr_tensor,
            lr_value,
            float(beta1),
            float(beta2),
            float(eps),
            float(weight_decay),
            base_step,
            1 - beta1**base_step,
            (1 - beta2**base_step) ** 0.5,
        ),
        dict(
            PARAM_DTYPE=_tl_dtype(dtype),
            GRAD_DTYPE=_tl_dtype(dtype),
            STATE_DTYPE=_tl_dtype(dtype),
            STEP_DTYPE=_tl_dtype(steps[0].dtype),
            COMPUTE_DTYPE=_compute_dtype(dtype),
            AMSGRAD=bool(amsgrad),
            MAXIMIZE=bool(maximize),
            DECOUPLED_WEIGHT_DECAY=bool(decoupled_weight_decay),
            LR_FROM_POINTER=lr_from_pointer,
            LR_DTYPE=lr_dtype,
            STEP_FROM_POINTER=bool(capturable),
        ),
    )
