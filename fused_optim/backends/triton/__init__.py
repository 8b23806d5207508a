"""Triton backend: one kernel launch per (device, dtype) group and step.

Same entry points and signatures as ``backends.reference``. Runs on CUDA, ROCm and XPU tensors,
and on CPU tensors through the Triton interpreter when ``TRITON_INTERPRET=1`` was set before
triton was imported.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .._tables import step_offsets

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


def _launch(kernel, launch_plan, grads, args: tuple, flags: dict, amp: tuple):
    grad_scale, found_inf = amp
    launch_plan.bind_grads(grads, grads[0].dtype, writes_back=grad_scale is not None)
    if launch_plan.num_blocks == 0:
        return
    device, fallback = launch_plan.device, launch_plan.tensor_table
    launch_plan.stage_in()
    kernel[(launch_plan.num_blocks,)](
        launch_plan.tensor_table,
        launch_plan.grad_table,
        launch_plan.block_table,
        args[0],
        fallback if grad_scale is None else grad_scale.to(device, non_blocking=True),
        fallback if found_inf is None else found_inf.to(device, non_blocking=True),
        *args[1:],
        GRAD_DTYPE=_tl_dtype(grads[0].dtype),
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        BLOCK=launch_plan.block,
        ALIGNED=launch_plan.aligned,
        num_warps=plan.NUM_WARPS,
        # The kernel spells out torch.optim's roundings (and its fmas): the compiler must not
        # fuse other multiplies and adds into fmas behind its back.
        enable_fp_fusion=False,
        **flags,
    )
    launch_plan.stage_out()


def _extra_columns(
    steps: list[Tensor], step_from_pointer: bool, new_buffers: list[int], indices: list[int] | None
) -> tuple[float, Tensor]:
    """The launch's base step and the table's (step, new buffer, param index) columns."""
    count = len(new_buffers)
    if not steps:
        base_step, step_column = 0.0, torch.zeros(count, dtype=torch.int64)
    elif step_from_pointer:
        # Steps live on the device; the kernel reads each one through its address.
        base_step = 1.0
        step_column = torch.tensor(list(map(Tensor.data_ptr, steps)), dtype=torch.int64)
    else:
        # Steps live on the host, as in torch.optim's default path: no device read needed.
        base_step, step_column = step_offsets(steps)
    index_column = torch.tensor(indices if indices is not None else [0] * count, dtype=torch.int64)
    new_column = torch.tensor(new_buffers, dtype=torch.int64)
    return base_step, torch.stack([step_column, new_column, index_column], dim=1)


def _reads_steps_from_device(steps: list[Tensor], capturable: bool, found_inf) -> bool:
    """Whether the kernel reads step counts from memory: with capturable=True, under
    GradScaler (whose skip decides the step on the device), and for steps not on the CPU."""
    return bool(steps) and (capturable or found_inf is not None or steps[0].device.type != "cpu")


def _precision_flags(params, master_params, stochastic_rounding: bool, steps) -> dict:
    return dict(
        HAS_MASTER=bool(master_params),
        STOCHASTIC_ROUNDING=bool(stochastic_rounding)
        and params[0].dtype in (torch.bfloat16, torch.float16),
        STEP_DTYPE=_tl_dtype(steps[0].dtype) if steps else tl.float32,
    )


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
    dtype = params[0].dtype
    steps = steps or []
    has_momentum = momentum != 0
    states: list[list[Tensor]] = []
    new_buffers = [0] * len(params)
    state_dtype = dtype
    if has_momentum:
        existing = [buf for buf in momentum_buffers if buf is not None]
        state_dtype = existing[0].dtype if existing else (new_buffer_dtype or dtype)
        for i, buf in enumerate(momentum_buffers):
            if buf is None:
                # Same layout as the param, so the kernel walks both as one span.
                momentum_buffers[i] = torch.empty_like(params[i], dtype=state_dtype)
                new_buffers[i] = 1
        states = [momentum_buffers]  # type: ignore[list-item]
    from_pointer = _reads_steps_from_device(steps, False, found_inf)
    base_step, extra = _extra_columns(steps, from_pointer, new_buffers, param_indices)
    launch_plan = plan_for(cache, "sgd", params, states, master_params or [], extra, state_dtype)
    lr_tensor, lr_value, lr_from_pointer, _ = _lr_args(
        lr, launch_plan.device, launch_plan.tensor_table
    )
    _launch(
        kernels.sgd_kernel,
        launch_plan,
        grads,
        (
            lr_tensor,
            lr_value,
            float(momentum),
            float(dampening),
            float(weight_decay),
            base_step,
            int(seed) & 0xFFFFFFFF,
        ),
        dict(
            PARAM_DTYPE=_tl_dtype(dtype),
            STATE_DTYPE=_tl_dtype(state_dtype),
            COMPUTE_DTYPE=_compute_dtype(dtype),
            HAS_MOMENTUM=has_momentum,
            NESTEROV=bool(nesterov),
            MAXIMIZE=bool(maximize),
            LR_FROM_POINTER=lr_from_pointer,
            STEP_FROM_POINTER=from_pointer,
            **_precision_flags(params, master_params, stochastic_rounding, steps),
        ),
        (grad_scale, found_inf),
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
    cache: dict,
    master_params: list[Tensor] | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    param_indices: list[int] | None = None,
) -> None:
    if not params:
        return
    from_pointer = _reads_steps_from_device(steps, capturable, found_inf)
    if from_pointer and len({s.dtype for s in steps}) > 1:
        # The kernel reads steps of one dtype: split a group whose steps mix float32/float64.
        for step_dtype in {s.dtype for s in steps}:
            keep = [i for i, s in enumerate(steps) if s.dtype == step_dtype]

            def take(values, keep=keep):
                return [values[i] for i in keep] if values else values

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
                capturable=capturable,
                cache=cache.setdefault(step_dtype, {}),
                master_params=take(master_params),
                grad_scale=grad_scale,
                found_inf=found_inf,
                stochastic_rounding=stochastic_rounding,
                seed=seed,
                param_indices=take(param_indices),
            )
        return
    dtype = params[0].dtype
    state_dtype = exp_avgs[0].dtype
    states = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    base_step, extra = _extra_columns(steps, from_pointer, [0] * len(params), param_indices)
    launch_plan = plan_for(cache, "adam", params, states, master_params or [], extra, state_dtype)
    lr_tensor, lr_value, lr_from_pointer, lr_dtype = _lr_args(
        lr, launch_plan.device, launch_plan.tensor_table
    )
    _launch(
        kernels.adam_kernel,
        launch_plan,
        grads,
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
            int(seed) & 0xFFFFFFFF,
        ),
        dict(
            PARAM_DTYPE=_tl_dtype(dtype),
            STATE_DTYPE=_tl_dtype(state_dtype),
            COMPUTE_DTYPE=_compute_dtype(dtype),
            AMSGRAD=bool(amsgrad),
            MAXIMIZE=bool(maximize),
            DECOUPLED_WEIGHT_DECAY=bool(decoupled_weight_decay),
            LR_FROM_POINTER=lr_from_pointer,
            LR_DTYPE=lr_dtype,
            STEP_FROM_POINTER=from_pointer,
            **_precision_flags(params, master_params, stochastic_rounding, steps),
        ),
        (grad_scale, found_inf),
    )
