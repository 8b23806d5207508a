"""CUDA C++ backend: the multi-tensor kernels of ``csrc/cuda``, one launch per bucket and step, no
host synchronisation.

Implements the contract of ``backends.contract``: one call updates every tensor of a bucket, all
param groups included, each tensor with its own group's hyperparameters. The kernels live in the
compiled extension ``fused_optim._C_cuda`` (built by setup.py when torch has CUDA), whose import
registers the raw ops ``torch.ops.fused_optim_cuda.sgd_`` and ``adam_``. They walk the tables of
``backends.plan`` (tensor, grad, block and hyperparameter tables; C++ layout in
``csrc/plan_layout.h``), kept between steps in ``work.plan``, which the optimizer owns. A step
binds this step's gradients and hyperparameters to the bucket's plan (uploading only what
changed) and enqueues one kernel, so under CUDA-graph capture it enqueues nothing else.

torch.compile
-------------
A traced step reaches the kernels through the custom ops of ``backends.compiled``, whose real
implementations run ``launch_sgd``/``launch_adam`` below on the tensors they are given, with
the bucket's launch plans kept in the optimizer's ``SlotPool``. Eager steps run the same code
directly on the Work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import compiled, host_checks
from . import plan as plans
from .contract import AdamFlags, SgdFlags, StepContext, Work

NAME = "cuda"
SUPPORTS_SPARSE = False

try:
    from .. import _C_cuda  # noqa: F401  (registers torch.ops.fused_optim_cuda)

    _IMPORT_ERROR: BaseException | None = None
except ImportError as error:  # pragma: no cover - depends on the build
    _IMPORT_ERROR = error

__all__ = [
    "CHUNK", "GRAD_NORM_KINDS", "NAME", "SUPPORTS_SPARSE", "adam", "grad_norm",
    "grad_norm_and_coefficient", "host_step", "is_available", "launch_adam", "launch_sgd", "sgd",
]  # fmt: skip

# Elements per CUDA block (kChunk in csrc/cuda/fused_cuda.h).
CHUNK = 4096
# The name of this backend's plan in the bucket's plan dict (``backends.plan.plan_for``).
PLAN_NAME = "cuda"

PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
STEP_DTYPES = (torch.float32, torch.float64)
LR_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def is_available(device: torch.device) -> tuple[bool, str]:
    """Whether this backend can update tensors on ``device``, and why not if it cannot."""
    if _IMPORT_ERROR is not None:
        return False, (
            "the CUDA extension fused_optim._C_cuda is not built or cannot be loaded: "
            f"{_IMPORT_ERROR!r}"
        )
    if torch.device(device).type != "cuda":
        return False, f"the CUDA kernels need CUDA tensors (got {torch.device(device).type!r})"
    if torch.version.hip is not None:
        return False, "the CUDA kernels are not built for ROCm"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, ""


# ----------------------------------------------------------------------------------------------
# Steps, lr, dtypes and GradScaler's tensors.


def _state_dtype_for(param_dtype: torch.dtype, wanted: torch.dtype) -> torch.dtype:
    """The state dtype the kernel reads and writes: the states' own when it supports the pair
    (the param's, fp32 or bf16), otherwise the compute dtype (states are staged through it)."""
    if wanted in (param_dtype, torch.float32, torch.bfloat16):
        return wanted
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _reads_steps_from_device(work: Work, context: StepContext, tensor_bias_corrections: bool):
    """Whether the kernel reads each step from its tensor (the table's step column then holds
    their addresses). Steps on the params' CUDA device must be read there (capturable=True,
    GradScaler: reading them here would sync); host steps are read here, as torch.optim does.
    Where the params' device is the host (the kernels' host emulation), the steps are read
    from memory when the step asks for tensor arithmetic (capturable, GradScaler)."""
    steps = work.steps
    if not steps:
        return False
    device = work.device
    if steps[0].device != device:
        return False
    if device.type == "cpu" and not (tensor_bias_corrections or context.found_inf is not None):
        return False
    for s in steps:
        if s.device != device or s.dtype not in STEP_DTYPES or s.numel() != 1:
            raise ValueError(
                "backend='cuda' reads step counts on the device as one-element float32/float64 "
                f"tensors on {device}; got {s.dtype} on {s.device}"
            )
    return True


def _lr_kind(hypers: Sequence, device: torch.device) -> tuple[bool, torch.dtype]:
    """(the kernel reads every group's lr from its tensor on the params' device, the dtype of the
    scalar math around lr). The optimizer buckets groups by the kind of their lr, so one kind
    holds for the whole launch: fp64 math for Python floats, the tensors' dtype for fp64, fp32,
    bf16 and fp16 tensors (each operation rounded to it, as torch.optim's tensor arithmetic);
    an integer lr tensor is promoted to the default float dtype, as torch.optim promotes it,
    and used as a value."""
    lrs = [hyper.lr for hyper in hypers]
    tensors = [lr for lr in lrs if isinstance(lr, Tensor)]
    if not tensors:
        return False, torch.float64
    first = tensors[0]
    if len(tensors) != len(lrs) or any(
        t.dtype != first.dtype or t.device != first.device for t in tensors
    ):
        raise ValueError(
            "backend='cuda' updates the groups of one launch with one kind of lr: every group's "
            "a Python float, or every group's a tensor of one dtype on one device"
        )
    if first.dtype not in LR_DTYPES:
        # An integer lr: torch.optim's arithmetic promotes it to the default float dtype.
        return False, torch.get_default_dtype()
    on_device = first.device == device
    if on_device and any(t.numel() != 1 for t in tensors):
        raise ValueError("backend='cuda' reads a tensor lr as a one-element tensor")
    return on_device, first.dtype


def _amp_tensor(t: Tensor | None, device: torch.device) -> Tensor | None:
    if t is None:
        return None
    return t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())


def _compute(dtype: torch.dtype) -> torch.dtype:
    """The kernels' compute dtype for params of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_params(params: list[Tensor]) -> None:
    dtype = params[0].dtype
    if dtype not in PARAM_DTYPES:
        raise TypeError(
            f"backend='cuda' updates float32/float64/bfloat16/float16 params, got {dtype}"
        )


def _op(name: str):
    """The extension's raw op (the tests swap in the kernels' host emulation)."""
    return getattr(torch.ops.fused_optim_cuda, name)


# ----------------------------------------------------------------------------------------------
# One launch per bucket.


def _launch(
    name: str,
    work: Work,
    states: list[list[Tensor]],
    state_dtype: torch.dtype,
    hypers: Sequence,
    context: StepContext,
    uses_steps: bool,
    step_pointers: bool,
    new_buffers: list[int] | None,
    algorithm_flags: tuple[bool, ...],
) -> None:
    """Bind this step's grads and hyperparameters to the bucket's plan and launch once."""
    params = work.params
    device, dtype = work.device, params[0].dtype
    if uses_steps and work.steps:
        base_steps, step_column = plans.step_columns(work, step_pointers)
    else:
        base_steps, step_column = [0.0] * len(hypers), None
    plan = plans.plan_for(work, PLAN_NAME, states, state_dtype, CHUNK, new_buffers, step_column)
    lr_from_pointer, lr_dtype = _lr_kind(hypers, device)
    rows, lr_tensors = plans.hyper_rows(hypers, base_steps, lr_from_pointer)
    plan.bind_hypers(rows, lr_tensors if lr_from_pointer else None)
    plan.bind_grads(work.grads, dtype, writes_back=context.stores_grads)
    _enqueue(name, plan, work, context, (lr_from_pointer, lr_dtype), step_pointers,
             algorithm_flags)  # fmt: skip


def _enqueue(name, plan, work: Work, context: StepContext, lr_kind, step_pointers,
             algorithm_flags) -> None:  # fmt: skip
    """Launch the kernel once over the plan (its grad and hyperparameter tables bound)."""
    if plan.num_blocks == 0:
        return
    device, dtype = work.device, work.params[0].dtype
    stochastic = context.stochastic_rounding and dtype in (torch.bfloat16, torch.float16)
    plan.stage_in()
    _op(name)(
        plan.tensor_table,
        plan.grad_table,
        plan.block_table,
        plan.hyper_table,
        dtype,
        plan.state_dtype,
        *lr_kind,
        _amp_tensor(context.grad_scale, device),
        _amp_tensor(context.found_inf, device),
        *algorithm_flags,
        bool(work.masters),
        stochastic,
        step_pointers,
        int(context.seed) & 0xFFFFFFFF,
        plan.aligned,
        None if context.grad_coef is None else context.grad_coef.to(device, _compute(dtype)),
        context.stores_grads,
    )
    plan.stage_out()


# ----------------------------------------------------------------------------------------------
# Gradient norms for clipping (``backends.clip``).

#: The norm kinds ``grad_norm`` computes (sums of squares and of absolute values, the largest
#: absolute value: NormKind in fused_cuda.h); the others go through torch's ``get_total_norm``.
GRAD_NORM_KINDS = (0, 1, 3)


def _launch_norm(norm: plans.NormPass, kind: int, grad_scale) -> None:
    """Enqueue a norm's launches (fused_cuda.h's NormLaunch)."""
    scale = _amp_tensor(grad_scale, norm.device)
    first = 0
    for dtype, blocks, pointers, table in norm.launches:
        _op("norm_")(
            pointers, table, norm.partials, norm.counter, scale, norm.total, norm.coef, dtype,
            first, norm.num_partials, kind,
        )  # fmt: skip
        first += blocks


grad_norm, grad_norm_and_coefficient = plans.norm_entry_points(CHUNK, _launch_norm)


def launch_sgd(work, buffers, new_buffers, hypers, flags: SgdFlags, context: StepContext) -> None:
    """SGD on ``work`` with ``buffers`` (every one allocated; ``new_buffers`` flags those made
    for this step) as the momentum column."""
    dtype = work.params[0].dtype
    states = [buffers] if flags.momentum else []
    state_dtype = _state_dtype_for(dtype, buffers[0].dtype) if states else dtype
    # Steps only key the stochastic-rounding bits.
    stochastic = context.stochastic_rounding and dtype in (torch.bfloat16, torch.float16)
    step_pointers = stochastic and _reads_steps_from_device(work, context, False)
    _launch(
        "sgd_", work, states, state_dtype, hypers, context, stochastic, step_pointers,
        new_buffers, _sgd_flags(flags),
    )  # fmt: skip


def launch_adam(work, hypers, flags: AdamFlags, context: StepContext) -> None:
    """Adam/AdamW on ``work`` (every state allocated)."""
    states = _adam_states(work, flags.amsgrad)
    dtype = work.params[0].dtype
    state_dtype = _state_dtype_for(dtype, states[0][0].dtype)
    step_pointers = _reads_steps_from_device(work, context, flags.tensor_bias_corrections)
    _launch(
        "adam_", work, states, state_dtype, hypers, context, True, step_pointers, None,
        _adam_flags(flags),
    )  # fmt: skip


def _sgd_flags(flags: SgdFlags) -> tuple[bool, ...]:
    """The op's SGD flags, in its schema's order."""
    return (flags.momentum, flags.nesterov, flags.maximize, flags.complex_arithmetic)


def _adam_flags(flags: AdamFlags) -> tuple[bool, ...]:
    """The op's Adam flags, in its schema's order."""
    return (flags.amsgrad, flags.maximize, flags.decoupled_weight_decay, flags.complex_arithmetic)


def _adam_states(work: Work, amsgrad: bool) -> list[list[Tensor]]:
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 3 if amsgrad else 2]
    return [list(work.states[key]) for key in keys]


# ----------------------------------------------------------------------------------------------
# Entry points (backends.contract).


def host_step(work: Work, hypers, flags, context: StepContext):
    """The bucket's compiled host path (``plan.PlanHostStep``: the extension checks every tensor
    and fills the grad table), or None where it does not apply."""
    dtype = work.params[0].dtype if work.params else None
    if isinstance(flags, AdamFlags):
        adam, name = True, "adam_"
        step_pointers = _reads_steps_from_device(work, context, flags.tensor_bias_corrections)
        algorithm_flags = _adam_flags(flags)
    else:
        adam, name = False, "sgd_"
        stochastic = context.stochastic_rounding and dtype in (torch.bfloat16, torch.float16)
        step_pointers = stochastic and _reads_steps_from_device(work, context, False)
        algorithm_flags = _sgd_flags(flags)
    if dtype is None:
        return None
    lr_kind = _lr_kind(hypers, work.device)

    def launch(plan, context: StepContext) -> None:
        _enqueue(name, plan, work, context, lr_kind, step_pointers, algorithm_flags)

    return plans.host_step_for(
        host_checks(), work, PLAN_NAME, adam, step_pointers, lr_kind[0], launch
    )


def sgd(work: Work, hypers, flags: SgdFlags, context: StepContext) -> list[Tensor | None]:
    """SGD on every tensor of ``work`` in one launch (see ``backends.contract``); returns the
    momentum buffers it created."""
    params = work.params
    if not params:
        return []
    _check_params(params)
    if torch.compiler.is_compiling():
        _lr_kind(hypers, work.device)  # one kind of lr per launch
        return compiled.sgd(NAME, work, hypers, flags, context)
    created: list[Tensor | None] = [None] * len(params)
    buffers: list = []
    new_buffers: list[int] | None = None
    if flags.momentum:
        buffers = list(work.column("momentum_buffer")) or [None] * len(params)
        existing = [buf for buf in buffers if buf is not None]
        dtype = existing[0].dtype if existing else (work.new_state_dtype or params[0].dtype)
        new_buffers = [0] * len(params)
        for i, buf in enumerate(buffers):
            if buf is None:
                # Same layout as the param, so that the kernel walks both as one span.
                created[i] = buffers[i] = torch.empty_like(params[i], dtype=dtype)
                new_buffers[i] = 1
    launch_sgd(work, buffers, new_buffers, hypers, flags, context)
    return created


def adam(work: Work, hypers, flags: AdamFlags, context: StepContext) -> list[Tensor | None]:
    """Adam/AdamW on every tensor of ``work`` in one launch (see ``backends.contract``)."""
    params = work.params
    if not params:
        return []
    _check_params(params)
    if torch.compiler.is_compiling():
        _lr_kind(hypers, work.device)  # one kind of lr per launch
        return compiled.adam(NAME, work, hypers, flags, context)
    launch_adam(work, hypers, flags, context)
    return [None] * len(params)
