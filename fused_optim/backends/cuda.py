"""CUDA C++ backend: the multi-tensor kernels of ``csrc/cuda``, one launch per (device, dtype)
group and step, no host synchronisation.

Same entry points and signatures as ``backends.reference``. The kernels live in the compiled
extension ``fused_optim._C_cuda`` (built by setup.py when torch has CUDA), whose import registers
the ops ``torch.ops.fused_optim_cuda.sgd_`` and ``adam_``. Each op walks device tables that this
module builds and caches per parameter group (see ``csrc/cuda/fused_cuda.h``):

* ``tensor_table`` (int64, ``TABLE_COLUMNS`` per tensor): addresses of the param, up to three
  states and the fp32 master weight, the element count, the step (an offset below the launch's
  base step, or the address of a step tensor), the new-momentum-buffer flag, the param's index and
  whether the step tensor is fp64;
* ``grad_table`` (int64): gradient addresses, re-uploaded only when a gradient moves;
* ``block_table`` (int64 pairs): (tensor, first element) for every CUDA block of ``CHUNK``
  elements.

Tables are uploaded once through pinned memory with ``non_blocking=True`` and reused while no
tensor moves, so a step enqueues one kernel and, under CUDA-graph capture, nothing else.

For torch.compile, each group's whole update (tables, staging, launch) runs inside the custom ops
``torch.ops.fused_optim.cuda_sgd`` and ``cuda_adam``, whose schemas declare every tensor list the
kernel writes and whose fake implementations do nothing; plans are then cached in this module
(``_group_cache``), not in the optimizer's ``cache`` dict, which cannot pass through an op.
Tensors the kernel cannot walk as one dense span in the param's memory order (strided params,
gradients or states of another layout or dtype) are staged through dense work tensors.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from ._tables import is_dense, same_layout, signatures, step_offsets, upload

NAME = "cuda"
SUPPORTS_SPARSE = False

try:
    from .. import _C_cuda  # noqa: F401  (registers torch.ops.fused_optim_cuda)

    _IMPORT_ERROR: BaseException | None = None
except ImportError as error:  # pragma: no cover - depends on the build
    _IMPORT_ERROR = error

__all__ = ["CHUNK", "NAME", "SUPPORTS_SPARSE", "adam", "is_available", "sgd"]

# Column layout of tensor_table: must match csrc/cuda/fused_cuda.h.
(
    COL_PARAM,
    COL_STATE0,
    COL_STATE1,
    COL_STATE2,
    COL_MASTER,
    COL_NUMEL,
    COL_STEP,
    COL_NEW_BUFFER,
    COL_INDEX,
    COL_STEP_IS_DOUBLE,
) = range(10)
TABLE_COLUMNS = 10
# Elements per CUDA block (kChunk in fused_cuda.h).
CHUNK = 4096

PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
STEP_DTYPES = (torch.float32, torch.float64)


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


def _state_dtype_for(param_dtype: torch.dtype, wanted: torch.dtype) -> torch.dtype:
    """The state dtype the kernel reads and writes: the states' own when it supports the pair
    (the param's, fp32 or bf16), otherwise the compute dtype (states are staged through it)."""
    if wanted in (param_dtype, torch.float32, torch.bfloat16):
        return wanted
    return torch.float64 if param_dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Launch plans.


class _Stage:
    """A dense work tensor standing in for a tensor the kernel cannot address directly.

    ``where`` says which of the step's tensors ``source`` is, so that a cached plan holds the
    caller's tensor only while a step runs (see ``_Plan.attach``)."""

    __slots__ = ("source", "where", "work", "writes_back")

    def __init__(self, source, like: Tensor, dtype: torch.dtype, writes_back: bool, where):
        self.source: Tensor | None = source
        self.where = where
        self.work = torch.empty_like(like, dtype=dtype)
        self.writes_back = writes_back


def _resolve(t, anchor, dtype: torch.dtype, writes_back: bool, stages: list, where=None):
    if t.dtype == dtype and is_dense(t) and same_layout(t, anchor):
        return t
    stage = _Stage(t, anchor, dtype, writes_back, where)
    stages.append(stage)
    return stage.work


class _Plan:
    """Device tables for one group of tensors, plus the stages its odd layouts need."""

    def __init__(self, params, states, masters, extra: Tensor, state_dtype, key):
        self.key = key
        self.extra = extra
        self.device = params[0].device
        self.state_dtype = state_dtype
        self.stages: list[_Stage] = []
        self.grad_stages: list[_Stage] = []
        self.anchors: list[Tensor] = []
        self.param_work: list[Tensor | None] = []
        self.grad_key: tuple | None = None
        self.grad_table: Tensor | None = None
        self.grads_aligned = False
        rows = []
        for i, p in enumerate(params):
            dense = is_dense(p)
            anchor = p if dense else _resolve(p, p, p.dtype, True, self.stages, ("param", i))
            self.anchors.append(anchor)
            self.param_work.append(None if dense else anchor)
            row = [anchor.data_ptr()]
            for j, column in enumerate(states):
                state = _resolve(column[i], anchor, state_dtype, True, self.stages, ("state", j, i))
                row.append(state.data_ptr())
            row += [0] * (COL_MASTER - len(row))
            master = masters[i] if masters else None
            if master is not None:
                master = _resolve(master, anchor, torch.float32, True, self.stages, ("master", i))
            row.append(0 if master is None else master.data_ptr())
            row.append(p.numel())
            row += extra[i].tolist()
            rows.append(row)
        host = torch.tensor(rows, dtype=torch.int64).reshape(-1, TABLE_COLUMNS)
        self.tensor_table = upload(host, self.device)
        # 16-byte aligned addresses let the kernel use 16-byte vector accesses.
        self.tensors_aligned = not bool((host[:, :COL_NUMEL] % 16).any())
        numels = host[:, COL_NUMEL]
        blocks_per_tensor = (numels + CHUNK - 1) // CHUNK
        tensor_index = torch.repeat_interleave(torch.arange(len(params)), blocks_per_tensor)
        first_block = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
        block_in_tensor = torch.arange(int(blocks_per_tensor.sum())) - first_block[tensor_index]
        block_host = torch.stack([tensor_index, block_in_tensor * CHUNK], dim=1).contiguous()
        self.block_table = upload(block_host, self.device)
        self.num_blocks = block_host.shape[0]

    def attach(self, params, states, masters) -> None:
        """Point the stages and anchors at this step's tensors (those the plan was built for, or
        new ones with the same signatures)."""
        for stage in self.stages:
            kind, *index = stage.where
            if kind == "param":
                stage.source = params[index[0]]
            elif kind == "state":
                stage.source = states[index[0]][index[1]]
            else:
                stage.source = masters[index[0]]
        self.anchors = [p if work is None else work for p, work in zip(params, self.param_work)]

    def detach(self) -> None:
        """Drop the references to the caller's tensors (a cached plan must not keep them alive)."""
        for stage in self.stages + self.grad_stages:
            stage.source = None
        self.anchors = []

    def bind_grads(self, grads: list[Tensor], dtype: torch.dtype, writes_back: bool) -> None:
        """Point the grad table at this step's gradients (re-uploaded only when they moved)."""
        key = (signatures(grads), writes_back)
        if key == self.grad_key:
            for stage in self.grad_stages:
                stage.source = grads[stage.where]
            return
        self.grad_stages = []
        pointers = [
            _resolve(g, anchor, dtype, writes_back, self.grad_stages, i).data_ptr()
            for i, (g, anchor) in enumerate(zip(grads, self.anchors))
        ]
        self.grad_table = upload(torch.tensor(pointers, dtype=torch.int64), self.device)
        self.grads_aligned = not any(pointer % 16 for pointer in pointers)
        self.grad_key = key

    @property
    def aligned(self) -> bool:
        return self.tensors_aligned and self.grads_aligned

    def stage_in(self) -> None:
        for stage in self.stages + self.grad_stages:
            stage.work.copy_(stage.source)

    def stage_out(self) -> None:
        for stage in self.stages + self.grad_stages:
            if stage.writes_back:
                stage.source.copy_(stage.work)


def _plan_for(cache, name, params, states, masters, extra, state_dtype) -> _Plan:
    key = (
        signatures(params),
        [signatures(column) for column in states],
        signatures(masters),
        state_dtype,
    )
    if cache is None:
        cache = {}
    plan = cache.get(name)
    if plan is None or plan.key != key or not torch.equal(plan.extra, extra):
        plan = _Plan(params, states, masters, extra, state_dtype, key)
        cache[name] = plan
    else:
        plan.attach(params, states, masters)
    return plan


# ----------------------------------------------------------------------------------------------
# Steps, lr and GradScaler's tensors.


def _extra_columns(
    steps: list[Tensor],
    from_pointer: bool,
    new_buffers: list[int],
    indices: list[int] | None,
) -> tuple[float, Tensor]:
    """The launch's base step and the (step, new buffer, index, step is fp64) columns."""
    count = len(new_buffers)
    is_double = torch.zeros(count, dtype=torch.int64)
    if not steps:
        base_step, step_column = 0.0, torch.zeros(count, dtype=torch.int64)
    elif from_pointer:
        base_step = 1.0
        step_column = torch.tensor(list(map(Tensor.data_ptr, steps)), dtype=torch.int64)
        is_double = torch.tensor([s.dtype == torch.float64 for s in steps], dtype=torch.int64)
    else:
        base_step, step_column = step_offsets(steps)
    index_column = torch.tensor(indices if indices is not None else [0] * count, dtype=torch.int64)
    new_column = torch.tensor(new_buffers, dtype=torch.int64)
    return base_step, torch.stack([step_column, new_column, index_column, is_double], dim=1)


def _steps_from_device(steps: list[Tensor], device: torch.device) -> bool:
    """Whether the kernel reads the step counts from the params' device memory (they are there
    with capturable=True and under GradScaler); host steps are read here, as torch.optim does."""
    if not steps or steps[0].device != device:
        return False
    for s in steps:
        if s.device != device or s.dtype not in STEP_DTYPES or s.numel() != 1:
            raise ValueError(
                "backend='cuda' reads step counts on the device as one-element float32/float64 "
                f"tensors on {device}; got {s.dtype} on {s.device}"
            )
    return True


def _lr_arguments(lr: float | Tensor, device: torch.device) -> tuple[Tensor | None, float]:
    """(device lr tensor or None, float lr). A CPU tensor lr is copied to the device (outside
    of CUDA-graph capture), so that the scalar math runs in its dtype, as in torch.optim."""
    if not isinstance(lr, Tensor):
        return None, float(lr)
    if lr.dtype not in (torch.float32, torch.float64):
        return None, float(lr)
    if lr.device == device:
        return lr.reshape(()), 0.0
    if torch.cuda.is_current_stream_capturing():
        return None, float(lr)
    return lr.reshape(()).to(device, non_blocking=True), 0.0


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


def _uses_stochastic_rounding(params: list[Tensor], stochastic_rounding: bool) -> bool:
    return bool(stochastic_rounding) and params[0].dtype in (torch.bfloat16, torch.float16)


def _op(name: str):
    """The extension's op (the tests swap in the kernels' host emulation)."""
    return getattr(torch.ops.fused_optim_cuda, name)


def _run(op, plan: _Plan, grads, grad_scale, found_inf, *args) -> None:
    try:
        plan.bind_grads(grads, plan.anchors[0].dtype, writes_back=grad_scale is not None)
        if plan.num_blocks == 0:
            return
        plan.stage_in()
        op(plan.tensor_table, plan.grad_table, plan.block_table, *args, plan.aligned)
        plan.stage_out()
    finally:
        plan.detach()


# ----------------------------------------------------------------------------------------------
# The updates as custom ops: torch.compile sees which tensors a step writes.
#
# The raw ops take only pointer tables, so a compiler could neither see their writes nor keep them
# in order. Each group's whole update (table building, staging, launch) therefore runs inside a
# Python custom op whose schema declares every tensor list the kernel writes (params, grads, which
# are unscaled in place under GradScaler, states, master weights) and whose fake implementation
# does nothing. Its arguments are schema types, so the optimizer's ``cache`` dict cannot be passed
# through: plans are kept here, per (algorithm, param addresses), least recently used dropped
# (enough entries for every group of a model, so that steps, CUDA-graph capture included, reuse
# their tables and upload nothing).

PLAN_CACHE_SIZE = 32
_plans: OrderedDict[tuple, dict] = OrderedDict()


def _group_cache(name: str, params: list[Tensor]) -> dict:
    """The plan cache of one group of params. Between steps a plan holds its tables and work
    tensors only, none of the caller's tensors; ``_plan_for`` checks every tensor's address,
    dtype, shape and strides before reusing it."""
    key = (name, tuple(map(Tensor.data_ptr, params)))
    cache = _plans.get(key)
    if cache is None:
        cache = _plans[key] = {}
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return cache


def _lr_input(lr: float | Tensor) -> tuple[Tensor | None, float]:
    if isinstance(lr, Tensor):
        return lr, 0.0
    return None, float(lr)


def _sgd_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    master_params: list[Tensor],
    steps: list[Tensor],
    lr: Tensor | None,
    lr_value: float,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    stochastic_rounding: bool,
    seed: int,
    param_indices: list[int] | None,
    new_buffers: list[int],
) -> None:
    """One group's SGD step (``momentum_buffers`` empty without momentum, all allocated with
    it; ``new_buffers`` flags those allocated for this step)."""
    if not params:
        return
    dtype, device = params[0].dtype, params[0].device
    states = [momentum_buffers] if momentum_buffers else []
    state_dtype = _state_dtype_for(dtype, momentum_buffers[0].dtype) if states else dtype
    stochastic = _uses_stochastic_rounding(params, stochastic_rounding)
    from_pointer = stochastic and _steps_from_device(steps, device)
    base_step, extra = _extra_columns(
        steps if stochastic else [], from_pointer, list(new_buffers), param_indices
    )
    cache = _group_cache("sgd", params)
    plan = _plan_for(cache, "sgd", params, states, master_params, extra, state_dtype)
    lr_tensor, lr_value = _lr_arguments(lr if lr is not None else lr_value, device)
    _run(
        _op("sgd_"),
        plan,
        grads,
        grad_scale,
        found_inf,
        dtype,
        state_dtype,
        lr_tensor,
        lr_value,
        _amp_tensor(grad_scale, device),
        _amp_tensor(found_inf, device),
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(maximize),
        bool(master_params),
        stochastic,
        from_pointer,
        base_step,
        int(seed) & 0xFFFFFFFF,
    )


def _adam_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    master_params: list[Tensor],
    steps: list[Tensor],
    lr: Tensor | None,
    lr_value: float,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    stochastic_rounding: bool,
    seed: int,
    param_indices: list[int] | None,
) -> None:
    """One group's Adam/AdamW step."""
    if not params:
        return
    dtype, device = params[0].dtype, params[0].device
    state_dtype = _state_dtype_for(dtype, exp_avgs[0].dtype)
    states = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    from_pointer = _steps_from_device(steps, device)
    base_step, extra = _extra_columns(steps, from_pointer, [0] * len(params), param_indices)
    cache = _group_cache("adam", params)
    plan = _plan_for(cache, "adam", params, states, master_params, extra, state_dtype)
    lr_tensor, lr_value = _lr_arguments(lr if lr is not None else lr_value, device)
    _run(
        _op("adam_"),
        plan,
        grads,
        grad_scale,
        found_inf,
        dtype,
        state_dtype,
        lr_tensor,
        lr_value,
        _amp_tensor(grad_scale, device),
        _amp_tensor(found_inf, device),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bool(amsgrad),
        bool(maximize),
        bool(decoupled_weight_decay),
        bool(master_params),
        _uses_stochastic_rounding(params, stochastic_rounding),
        from_pointer,
        base_step,
        # torch.optim's host arithmetic at the base step (bitwise its bias corrections).
        1 - beta1**base_step,
        (1 - beta2**base_step) ** 0.5,
        int(seed) & 0xFFFFFFFF,
    )


_SGD_OP_NAME = "fused_optim::cuda_sgd"
_ADAM_OP_NAME = "fused_optim::cuda_adam"

cuda_sgd_op = torch.library.custom_op(
    _SGD_OP_NAME,
    mutates_args=("params", "grads", "momentum_buffers", "master_params"),
    device_types="cuda",
)(_sgd_update)
cuda_adam_op = torch.library.custom_op(
    _ADAM_OP_NAME,
    mutates_args=(
        "params",
        "grads",
        "exp_avgs",
        "exp_avg_sqs",
        "max_exp_avg_sqs",
        "master_params",
    ),
    device_types="cuda",
)(_adam_update)


@cuda_sgd_op.register_fake
def _(*args, **kwargs) -> None:
    return None


@cuda_adam_op.register_fake
def _(*args, **kwargs) -> None:
    return None


# ----------------------------------------------------------------------------------------------
# Entry points.


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
    # ``cache`` is not used: plans are cached per group here (see _group_cache).
    if not params:
        return
    _check_params(params)
    new_buffers = [0] * len(params)
    buffers: list[Tensor] = []
    if momentum != 0:
        existing = [buf for buf in momentum_buffers if buf is not None]
        wanted = existing[0].dtype if existing else (new_buffer_dtype or params[0].dtype)
        for i, buf in enumerate(momentum_buffers):
            if buf is None:
                # Same layout as the param, so that the kernel walks both as one span.
                momentum_buffers[i] = torch.empty_like(params[i], dtype=wanted)
                new_buffers[i] = 1
        buffers = list(momentum_buffers)  # type: ignore[arg-type]
    lr_tensor, lr_value = _lr_input(lr)
    torch.ops.fused_optim.cuda_sgd(
        params,
        grads,
        buffers,
        master_params or [],
        steps or [],
        lr_tensor,
        lr_value,
        grad_scale,
        found_inf,
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(maximize),
        bool(stochastic_rounding),
        int(seed) & 0xFFFFFFFF,
        param_indices,
        new_buffers,
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
    # ``cache`` is not used: plans are cached per group here (see _group_cache).
    if not params:
        return
    _check_params(params)
    lr_tensor, lr_value = _lr_input(lr)
    torch.ops.fused_optim.cuda_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs if amsgrad else [],
        master_params or [],
        steps,
        lr_tensor,
        lr_value,
        grad_scale,
        found_inf,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bool(amsgrad),
        bool(maximize),
        bool(decoupled_weight_decay),
        bool(stochastic_rounding),
        int(seed) & 0xFFFFFFFF,
        param_indices,
    )
