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
The raw ops take only pointer tables: a compiler could neither see what they write nor keep
their writes in order. A compiled step therefore goes through the Python custom ops
``torch.ops.fused_optim.cuda_sgd`` / ``cuda_adam``: their schemas declare every tensor list the
kernel writes (params, grads, which are unscaled in place under GradScaler, states, master
weights), their fake implementations do nothing, and their real implementations run the eager
code of this module (plans, staging, launch) on the tensors they are given. Everything else a
step needs is schema data: the bucket's group and index columns (``int[]``), the groups'
hyperparameters (``float[]``, one row per group; tensor lrs as ``Tensor[]``), the flags.

A schema cannot carry ``work.plan``, so the ops take an int ``handle`` instead. ``work.plan`` of a
bucket this backend updates is a ``PlanSlot``: the dict of launch plans ``backends.plan`` keeps,
plus the handle. The Work (so the optimizer) owns the slot; the module's registry only maps
handles to slots, through weak references, so it keeps nothing alive, and a slot dropped with its
bucket disappears from it. An op reuses the slot's plan when it is valid for the tensors the op
was given (the Work's own, when the compiler let the op write them in place) and otherwise builds
one for the call, which it does not keep: functionalized copies of the bucket's tensors must not
stay alive in the optimizer's slot, nor push out the plan of its own tensors. Slots are made in
eager steps (a registry write cannot be traced): a Work first seen inside a compiled region
passes handle 0, and its op builds its plans per call.

Eager steps (``torch.compiler.is_compiling()`` is False) run the same code directly on the Work:
no dispatcher round trip through lists of thousands of tensors, and no registry look-up. This was
chosen over dropping the custom ops (raw op + plan only), which would leave compiled steps with
graph breaks and untracked writes, and over passing a prebuilt hyperparameter table through the
schema, which would need a plan (tensor addresses) while tracing on fake tensors.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from . import plan as plans
from .contract import AdamFlags, AdamHyper, SgdFlags, SgdHyper, StepContext, Work

NAME = "cuda"
SUPPORTS_SPARSE = False

try:
    from .. import _C_cuda  # noqa: F401  (registers torch.ops.fused_optim_cuda)

    _IMPORT_ERROR: BaseException | None = None
except ImportError as error:  # pragma: no cover - depends on the build
    _IMPORT_ERROR = error

__all__ = ["CHUNK", "NAME", "SUPPORTS_SPARSE", "PlanSlot", "adam", "is_available", "sgd"]

# Elements per CUDA block (kChunk in csrc/cuda/fused_cuda.h).
CHUNK = 4096
# The name of this backend's plan in the bucket's plan dict (``backends.plan.plan_for``).
PLAN_NAME = "cuda"

PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
STEP_DTYPES = (torch.float32, torch.float64)
LR_DTYPES = (torch.float32, torch.float64)


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
# The plan slot and its handle.


class PlanSlot(dict):
    """``work.plan`` of a bucket this backend updates: the launch plans ``backends.plan`` keeps
    (by name), plus the ``handle`` under which the custom ops find them (see the module doc)."""

    __slots__ = ("__weakref__", "handle")


_SLOTS: weakref.WeakValueDictionary[int, PlanSlot] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def _slot(work: Work) -> PlanSlot:
    """The Work's plan slot, made (and registered) on its first eager step."""
    slot = work.plan
    if type(slot) is not PlanSlot:
        slot = PlanSlot(slot if isinstance(slot, dict) else {})
        slot.handle = next(_HANDLES)
        _SLOTS[slot.handle] = slot
        work.plan = slot
    return slot


def _handle(work: Work) -> int:
    """The handle of the Work's plan slot, 0 when it has none yet (traceable: reads only)."""
    slot = work.plan
    return slot.handle if type(slot) is PlanSlot else 0


def _op_work(handle, params, grads, states, groups, steps, masters, indices) -> Work:
    """The Work a custom op runs on: its own tensors, and a copy of the plan dict of the slot
    ``handle`` (empty for handle 0, or once the slot is gone). ``plan_for`` reuses a plan of the
    slot that is valid for these tensors; one it builds goes into the copy, so the slot keeps
    its own (see the module doc)."""
    slot = _SLOTS.get(handle) if handle else None
    return Work(
        params=list(params),
        grads=list(grads),
        states=states,
        groups=list(groups),
        steps=list(steps),
        masters=list(masters),
        indices=list(indices),
        plan=dict(slot) if slot is not None else None,
    )


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
    holds for the whole launch: fp64 math for Python floats, the tensors' dtype for tensors (an
    lr tensor of another dtype than fp32/fp64 is used as a value, with fp64 math)."""
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
        return False, torch.float64
    on_device = first.device == device
    if on_device and any(t.numel() != 1 for t in tensors):
        raise ValueError("backend='cuda' reads a tensor lr as a one-element tensor")
    return on_device, first.dtype


def _amp_tensor(t: Tensor | None, device: torch.device) -> Tensor | None:
    if t is None:
        return None
    return t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())


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
    hyper_table = plan.bind_hypers(rows, lr_tensors if lr_from_pointer else None)
    grad_scale = context.grad_scale
    plan.bind_grads(work.grads, dtype, writes_back=grad_scale is not None)
    if plan.num_blocks == 0:
        return
    stochastic = context.stochastic_rounding and dtype in (torch.bfloat16, torch.float16)
    plan.stage_in()
    _op(name)(
        plan.tensor_table,
        plan.grad_table,
        plan.block_table,
        hyper_table,
        dtype,
        state_dtype,
        lr_from_pointer,
        lr_dtype,
        _amp_tensor(grad_scale, device),
        _amp_tensor(context.found_inf, device),
        *algorithm_flags,
        bool(work.masters),
        stochastic,
        step_pointers,
        int(context.seed) & 0xFFFFFFFF,
        plan.aligned,
    )
    plan.stage_out()


def _run_sgd(work, buffers, new_buffers, hypers, flags: SgdFlags, context: StepContext) -> None:
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
        new_buffers, (flags.momentum, flags.nesterov, flags.maximize),
    )  # fmt: skip


def _run_adam(work, states, hypers, flags: AdamFlags, context: StepContext) -> None:
    dtype = work.params[0].dtype
    state_dtype = _state_dtype_for(dtype, states[0][0].dtype)
    step_pointers = _reads_steps_from_device(work, context, flags.tensor_bias_corrections)
    _launch(
        "adam_", work, states, state_dtype, hypers, context, True, step_pointers, None,
        (flags.amsgrad, flags.maximize, flags.decoupled_weight_decay),
    )  # fmt: skip


def _adam_states(work: Work, amsgrad: bool) -> list[list[Tensor]]:
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 3 if amsgrad else 2]
    return [list(work.states[key]) for key in keys]


# ----------------------------------------------------------------------------------------------
# The updates as custom ops, for torch.compile (see the module doc).


def _lr_tensors(hypers: Sequence) -> list[Tensor]:
    """The groups' tensor lrs (all or none: ``_lr_kind`` checks), as a ``Tensor[]`` argument."""
    return [hyper.lr for hyper in hypers if isinstance(hyper.lr, Tensor)]


def _lr_float(lr: float | Tensor) -> float:
    return 0.0 if isinstance(lr, Tensor) else float(lr)


def _lr_of(lrs: list[Tensor], group: int, value: float) -> float | Tensor:
    return lrs[group] if lrs else value


SGD_HYPER_FIELDS = 4  # lr, momentum, dampening, weight_decay
ADAM_HYPER_FIELDS = 5  # lr, beta1, beta2, eps, weight_decay


def _sgd_op(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    master_params: list[Tensor],
    steps: list[Tensor],
    groups: list[int],
    indices: list[int],
    new_buffers: list[int],
    hypers: list[float],
    lrs: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    momentum: bool,
    nesterov: bool,
    maximize: bool,
    stochastic_rounding: bool,
    seed: int,
    handle: int,
) -> None:
    """One bucket's SGD step (``momentum_buffers`` empty without momentum, all allocated with
    it; ``new_buffers`` flags those allocated for this step). ``hypers``: SGD_HYPER_FIELDS per
    group, lr 0.0 where ``lrs`` holds the groups' tensor lrs."""
    if not params:
        return
    n = SGD_HYPER_FIELDS
    rows = [hypers[g : g + n] for g in range(0, len(hypers), n)]
    hyper = [SgdHyper(_lr_of(lrs, g, r[0]), r[1], r[2], r[3]) for g, r in enumerate(rows)]
    states = {"momentum_buffer": list(momentum_buffers)} if momentum else {}
    work = _op_work(handle, params, grads, states, groups, steps, master_params, indices)
    _run_sgd(
        work, list(momentum_buffers), list(new_buffers) or None, hyper,
        SgdFlags(momentum, nesterov, maximize),
        StepContext(grad_scale, found_inf, stochastic_rounding, seed),
    )  # fmt: skip


def _adam_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    master_params: list[Tensor],
    steps: list[Tensor],
    groups: list[int],
    indices: list[int],
    hypers: list[float],
    lrs: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    tensor_bias_corrections: bool,
    stochastic_rounding: bool,
    seed: int,
    handle: int,
) -> None:
    """One bucket's Adam/AdamW step (``max_exp_avg_sqs`` empty without amsgrad). ``hypers``:
    ADAM_HYPER_FIELDS per group, lr 0.0 where ``lrs`` holds the groups' tensor lrs."""
    if not params:
        return
    n = ADAM_HYPER_FIELDS
    rows = [hypers[g : g + n] for g in range(0, len(hypers), n)]
    hyper = [AdamHyper(_lr_of(lrs, g, r[0]), *r[1:]) for g, r in enumerate(rows)]
    states = {"exp_avg": list(exp_avgs), "exp_avg_sq": list(exp_avg_sqs)}
    if amsgrad:
        states["max_exp_avg_sq"] = list(max_exp_avg_sqs)
    work = _op_work(handle, params, grads, states, groups, steps, master_params, indices)
    flags = AdamFlags(amsgrad, maximize, decoupled_weight_decay, tensor_bias_corrections)
    context = StepContext(grad_scale, found_inf, stochastic_rounding, seed)
    _run_adam(work, _adam_states(work, amsgrad), hyper, flags, context)


cuda_sgd_op = torch.library.custom_op(
    "fused_optim::cuda_sgd",
    mutates_args=("params", "grads", "momentum_buffers", "master_params"),
    device_types="cuda",
)(_sgd_op)
cuda_adam_op = torch.library.custom_op(
    "fused_optim::cuda_adam",
    mutates_args=(
        "params",
        "grads",
        "exp_avgs",
        "exp_avg_sqs",
        "max_exp_avg_sqs",
        "master_params",
    ),
    device_types="cuda",
)(_adam_op)


@cuda_sgd_op.register_fake
def _(*args, **kwargs) -> None:
    return None


@cuda_adam_op.register_fake
def _(*args, **kwargs) -> None:
    return None


# ----------------------------------------------------------------------------------------------
# Entry points (backends.contract).


def sgd(work: Work, hypers, flags: SgdFlags, context: StepContext) -> list[Tensor | None]:
    """SGD on every tensor of ``work`` in one launch (see ``backends.contract``); returns the
    momentum buffers made for this step."""
    params = work.params
    created: list[Tensor | None] = [None] * len(params)
    if not params:
        return created
    _check_params(params)
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
    if not torch.compiler.is_compiling():
        _slot(work)
        _run_sgd(work, buffers, new_buffers, hypers, flags, context)
        return created
    _lr_kind(hypers, work.device)  # one kind of lr per launch
    row = [
        value
        for hyper in hypers
        for value in (_lr_float(hyper.lr), hyper.momentum, hyper.dampening, hyper.weight_decay)
    ]
    torch.ops.fused_optim.cuda_sgd(
        params,
        work.grads,
        buffers,
        work.masters,
        work.steps,
        work.groups,
        work.indices,
        new_buffers or [],
        row,
        _lr_tensors(hypers),
        context.grad_scale,
        context.found_inf,
        flags.momentum,
        flags.nesterov,
        flags.maximize,
        context.stochastic_rounding,
        int(context.seed) & 0xFFFFFFFF,
        _handle(work),
    )
    return created


def adam(work: Work, hypers, flags: AdamFlags, context: StepContext) -> list[Tensor | None]:
    """Adam/AdamW on every tensor of ``work`` in one launch (see ``backends.contract``)."""
    params = work.params
    if not params:
        return []
    _check_params(params)
    if not torch.compiler.is_compiling():
        _slot(work)
        _run_adam(work, _adam_states(work, flags.amsgrad), hypers, flags, context)
        return [None] * len(params)
    _lr_kind(hypers, work.device)  # one kind of lr per launch
    row = [
        value
        for h in hypers
        for value in (_lr_float(h.lr), h.beta1, h.beta2, h.eps, h.weight_decay)
    ]
    torch.ops.fused_optim.cuda_adam(
        params,
        work.grads,
        work.states["exp_avg"],
        work.states["exp_avg_sq"],
        work.column("max_exp_avg_sq") if flags.amsgrad else [],
        work.masters,
        work.steps,
        work.groups,
        work.indices,
        row,
        _lr_tensors(hypers),
        context.grad_scale,
        context.found_inf,
        flags.amsgrad,
        flags.maximize,
        flags.decoupled_weight_decay,
        flags.tensor_bias_corrections,
        context.stochastic_rounding,
        int(context.seed) & 0xFFFFFFFF,
        _handle(work),
    )
    return [None] * len(params)
