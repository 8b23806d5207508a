"""Triton backend: one kernel launch per bucket and step, across param groups.

Implements the contract of ``backends.contract``. Runs on CUDA, ROCm and XPU tensors, and on CPU
tensors through the Triton interpreter when ``TRITON_INTERPRET=1`` was set before triton was
imported. The kernels (``kernels.py``) walk the tables of ``backends.plan``. A step traced by
torch.compile reaches them through the custom ops of ``backends.compiled``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import compiled, host_checks
from .. import plan as plans
from ..contract import AdamFlags, SgdFlags, StepContext, Work

NAME = "triton"
SUPPORTS_SPARSE = False

try:
    import triton.language as tl

    from . import kernels

    _IMPORT_ERROR: BaseException | None = None
except ImportError as error:  # pragma: no cover - depends on the machine
    _IMPORT_ERROR = error

__all__ = [
    "BLOCK", "GRAD_NORM_KINDS", "NAME", "adam", "grad_norm", "interpreting", "is_available",
    "launch_adam", "launch_sgd", "sgd",
]  # fmt: skip

GPU_DEVICE_TYPES = ("cuda", "xpu")
# Elements and warps per program. BLOCK=1024 with 4 warps reached the copy roofline on one
# 64M-element tensor on an H200 (benchmarks/RESULTS.md).
BLOCK = 1024
NUM_WARPS = 4


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


def _lr_flags(work: Work, hypers) -> dict:
    """LR_FROM_POINTER (every group's lr is a tensor on the params' device: the kernel reads it
    there) and LR_DTYPE (the dtype of the scalar math around lr). The optimizer buckets groups
    by the kind of their lr, so one kind holds for the whole launch."""
    lr = hypers[0].lr
    if isinstance(lr, Tensor) and not lr.is_floating_point():
        # torch.optim's arithmetic promotes an integer lr to the default float dtype; the
        # kernel gets its value from the table (read here: a sync for a GPU tensor).
        return dict(LR_FROM_POINTER=False, LR_DTYPE=_tl_dtype(torch.get_default_dtype()))
    on_device = isinstance(lr, Tensor) and lr.device == work.device
    dtype = lr.dtype if isinstance(lr, Tensor) else torch.float64
    return dict(LR_FROM_POINTER=on_device, LR_DTYPE=_tl_dtype(dtype))


def _reads_steps_from_device(work: Work, context: StepContext, flags) -> bool:
    """Whether the kernel reads step counts from memory: with capturable=True, under
    GradScaler (whose skip decides the step on the device), and for steps not on the CPU."""
    if not work.steps:
        return False
    capturable = getattr(flags, "tensor_bias_corrections", False)
    return capturable or context.found_inf is not None or work.steps[0].device.type != "cpu"


def _launch(kernel, work, states, state_dtype, hypers, context, step_pointers, flags, new=None):
    """Bind this step's grads and hyperparameters to the bucket's plan and launch once."""
    base_steps, step_column = plans.step_columns(work, step_pointers)
    plan = plans.plan_for(work, "triton", states, state_dtype, BLOCK, new, step_column)
    grad_dtype = work.grads[0].dtype
    plan.bind_grads(work.grads, grad_dtype, writes_back=context.stores_grads)
    constants = _constants(plan, work, context, step_pointers, flags, grad_dtype)
    on_device = constants["LR_FROM_POINTER"]
    rows, lr_tensors = plans.hyper_rows(hypers, base_steps, on_device)
    plan.bind_hypers(rows, lr_tensors if on_device else None)
    _enqueue(kernel, plan, context, constants)


def _constants(plan, work: Work, context: StepContext, step_pointers, flags, grad_dtype) -> dict:
    """The launch's compile-time flags (everything but ALIGNED, which follows the grads)."""
    dtype = work.params[0].dtype
    return dict(
        PARAM_DTYPE=_tl_dtype(dtype),
        GRAD_DTYPE=_tl_dtype(grad_dtype),
        STATE_DTYPE=_tl_dtype(plan.state_dtype),
        COMPUTE_DTYPE=_compute_dtype(dtype),
        HAS_GRAD_SCALE=context.grad_scale is not None,
        HAS_GRAD_COEF=context.grad_coef is not None,
        WRITE_GRAD=context.stores_grads,
        HAS_FOUND_INF=context.found_inf is not None,
        HAS_MASTER=bool(work.masters),
        STOCHASTIC_ROUNDING=context.stochastic_rounding
        and dtype in (torch.bfloat16, torch.float16),
        STEP_FROM_POINTER=step_pointers,
        BLOCK=plan.block,
        num_warps=NUM_WARPS,
        # The kernel spells out torch.optim's roundings (and its fmas): the compiler must not
        # fuse other multiplies and adds into fmas behind its back.
        enable_fp_fusion=False,
        **flags,
    )


def _enqueue(kernel, plan, context: StepContext, constants: dict) -> None:
    """Launch the kernel once over the plan (its grad and hyperparameter tables bound)."""
    if plan.num_blocks == 0:
        return
    device, fallback = plan.device, plan.tensor_table

    def pointer(scalar):  # a device scalar, or any valid pointer where the flag is off
        return fallback if scalar is None else scalar.to(device, non_blocking=True)

    plan.stage_in()
    kernel[(plan.num_blocks,)](
        plan.tensor_table,
        plan.grad_table,
        plan.block_table,
        plan.hyper_table,
        plan.hyper_bits,
        pointer(context.grad_scale),
        pointer(context.grad_coef),
        pointer(context.found_inf),
        int(context.seed) & 0xFFFFFFFF,
        ALIGNED=plan.aligned,
        **constants,
    )
    plan.stage_out()


#: The kinds of ``backends.clip``'s norms ``grad_norm`` computes (sums of squares and of absolute
#: values, the largest absolute value); the others go through torch's ``get_total_norm``.
GRAD_NORM_KINDS = (0, 1, 3)
NORM_BLOCK = 4096
FINAL_BLOCK = 128


def _launch_norm(norm: plans.NormPass, kind: int, grad_scale) -> None:
    """Enqueue a norm's launches (``kernels.norm_kernel``)."""
    scale = None if grad_scale is None else grad_scale.to(norm.device, non_blocking=True)
    out_dtype = norm.total.dtype
    first = 0
    for dtype, blocks, pointers, table in norm.launches:
        kernels.norm_kernel[(blocks,)](
            pointers,
            table,
            norm.partials,
            pointers if scale is None else scale,
            norm.counter,
            first,
            norm.num_partials,
            norm.total,
            norm.total if norm.coef is None else norm.coef,
            GRAD_DTYPE=_tl_dtype(dtype),
            COMPUTE_DTYPE=_compute_dtype(dtype),
            KIND=kind,
            HAS_GRAD_SCALE=grad_scale is not None,
            BLOCK=NORM_BLOCK,
            OUT_DTYPE=_tl_dtype(out_dtype),
            OPMATH_DTYPE=_compute_dtype(out_dtype),
            COEF=norm.coef is not None,
            FINAL_BLOCK=FINAL_BLOCK,
            num_warps=NUM_WARPS,
        )
        first += blocks


grad_norm, grad_norm_and_coefficient = plans.norm_entry_points(NORM_BLOCK, _launch_norm)


def host_step(work: Work, hypers, flags, context: StepContext):
    """The bucket's compiled host path (``plan.PlanHostStep``), or None where it does not
    apply."""
    adam = isinstance(flags, AdamFlags)
    step_pointers = _reads_steps_from_device(work, context, flags)
    if adam:
        code = dict(AMSGRAD=flags.amsgrad, MAXIMIZE=flags.maximize,
                    DECOUPLED_WEIGHT_DECAY=flags.decoupled_weight_decay,
                    COMPLEX_ARITHMETIC=flags.complex_arithmetic)  # fmt: skip
        kernel = kernels.adam_kernel
    else:
        step_pointers = context.stochastic_rounding and step_pointers
        code = dict(HAS_MOMENTUM=flags.momentum, NESTEROV=flags.nesterov, MAXIMIZE=flags.maximize,
                    COMPLEX_ARITHMETIC=flags.complex_arithmetic)  # fmt: skip
        kernel = kernels.sgd_kernel
    code.update(_lr_flags(work, hypers))
    plan = work.plan.get("triton") if isinstance(work.plan, dict) and work.grads else None
    if plan is None:
        return None
    constants = _constants(plan, work, context, step_pointers, code, work.grads[0].dtype)

    def launch(plan, context: StepContext) -> None:
        _enqueue(kernel, plan, context, constants)

    return plans.host_step_for(
        host_checks(), work, "triton", adam, step_pointers, code["LR_FROM_POINTER"], launch
    )


def sgd(work: Work, hypers, flags: SgdFlags, context: StepContext) -> list[Tensor | None]:
    """SGD on every tensor of ``work`` in one launch (see ``backends.contract``)."""
    params = work.params
    if not params:
        return []
    if torch.compiler.is_compiling():
        return compiled.sgd(NAME, work, hypers, flags, context)
    created: list[Tensor | None] = [None] * len(params)
    buffers: list = []
    new_buffers = None
    if flags.momentum:
        buffers = list(work.column("momentum_buffer"))
        existing = [buf for buf in buffers if buf is not None]
        state_dtype = existing[0].dtype if existing else (work.new_state_dtype or params[0].dtype)
        new_buffers = [0] * len(params)
        for i, buf in enumerate(buffers):
            if buf is None:
                # Same layout as the param, so the kernel walks both as one span.
                created[i] = buffers[i] = torch.empty_like(params[i], dtype=state_dtype)
                new_buffers[i] = 1
    launch_sgd(work, buffers, new_buffers, hypers, flags, context)
    return created


def launch_sgd(work: Work, buffers, new_buffers, hypers, flags: SgdFlags, context) -> None:
    """SGD on ``work`` with ``buffers`` (every one allocated; ``new_buffers`` flags those made
    for this step) as the momentum column."""
    states = [buffers] if flags.momentum else []
    state_dtype = buffers[0].dtype if states else work.params[0].dtype
    step_pointers = context.stochastic_rounding and _reads_steps_from_device(work, context, flags)
    _launch(
        kernels.sgd_kernel, work, states, state_dtype, hypers, context, step_pointers,
        dict(HAS_MOMENTUM=flags.momentum, NESTEROV=flags.nesterov, MAXIMIZE=flags.maximize,
             COMPLEX_ARITHMETIC=flags.complex_arithmetic, **_lr_flags(work, hypers)),
        new_buffers,
    )  # fmt: skip


def adam(work: Work, hypers, flags: AdamFlags, context: StepContext) -> list[Tensor | None]:
    """Adam/AdamW on every tensor of ``work`` in one launch (see ``backends.contract``)."""
    params = work.params
    if not params:
        return []
    if torch.compiler.is_compiling():
        return compiled.adam(NAME, work, hypers, flags, context)
    launch_adam(work, hypers, flags, context)
    return [None] * len(params)


def launch_adam(work: Work, hypers, flags: AdamFlags, context: StepContext) -> None:
    """Adam/AdamW on ``work`` (every state allocated)."""
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 3 if flags.amsgrad else 2]
    states = [work.states[key] for key in keys]
    step_pointers = _reads_steps_from_device(work, context, flags)
    _launch(
        kernels.adam_kernel, work, states, states[0][0].dtype, hypers, context, step_pointers,
        dict(AMSGRAD=flags.amsgrad, MAXIMIZE=flags.maximize,
             DECOUPLED_WEIGHT_DECAY=flags.decoupled_weight_decay,
             COMPLEX_ARITHMETIC=flags.complex_arithmetic, **_lr_flags(work, hypers)),
    )  # fmt: skip
