"""Launch plans: the tables that let ONE kernel launch update every tensor of a bucket.

Plain torch (no triton, no extension needed). Used by every backend that walks pointer tables
(the Triton kernels and the CUDA C++ kernels); the column layout below is the one place it is
defined, and ``csrc/plan_layout.h`` spells the same numbers for C++ (a test compares them).

* ``tensor_table`` (int64, ``TABLE_COLUMNS`` per tensor): addresses of the param, up to three
  state tensors and the fp32 master weight; the element count; the step (an offset below its
  group's base step, or the address of a step tensor); the new-momentum-buffer flag (SGD); the
  param's index in the optimizer (it keys the stochastic-rounding bits); whether the step
  tensor is fp64; and the tensor's group (a row of the hyperparameter table).
* ``grad_table`` (int64, one per tensor): gradient addresses. Gradients usually move with every
  backward pass, so they live apart from the rest and are re-uploaded only when they change.
* ``block_table`` (int64 pairs): for every program, which tensor it works on and where its
  block starts.
* ``hyper_table`` (float64, ``HYPER_COLUMNS`` per group): lr, beta1 (SGD: momentum), beta2 (SGD:
  dampening), eps, weight decay, the group's base step and torch.optim's bias corrections at it,
  and (through an int64 view) the address of a tensor lr the kernel reads on the device. Built
  every step from the groups' values (a few floats per group), so nothing recompiles or rebuilds
  when a scheduler changes them.

A plan is valid only while every tensor it addresses keeps its data pointer, numel, shape,
strides, dtype and device (``signatures``); anything else rebuilds it, including grads that keep
their address but change layout. Tensors a kernel cannot walk as one dense span in the param's
memory order (a strided param, a grad or state of another layout or dtype) are *staged*: the plan
keeps a dense work tensor for each, copies into it before the launch and, for tensors the kernel
writes, back after it. The kernel never writes to a copy that is then thrown away.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from operator import attrgetter

import torch
from torch import Tensor

from .contract import AdamHyper, SgdHyper

# tensor_table columns.
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
    COL_GROUP,
) = range(11)
TABLE_COLUMNS = 11

# hyper_table columns (SGD keeps momentum and dampening where Adam keeps its betas).
(
    HYPER_LR,
    HYPER_BETA1,
    HYPER_BETA2,
    HYPER_EPS,
    HYPER_WEIGHT_DECAY,
    HYPER_BASE_STEP,
    HYPER_BIAS_CORRECTION1,
    HYPER_BIAS_CORRECTION2_SQRT,
    HYPER_LR_ADDRESS,
) = range(9)
HYPER_COLUMNS = 9
HYPER_MOMENTUM, HYPER_DAMPENING = HYPER_BETA1, HYPER_BETA2

LAYOUT = {
    name: value
    for name, value in globals().items()
    if name.startswith(("COL_", "HYPER_")) or name in ("TABLE_COLUMNS",)
}


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers exactly ``t.numel()`` consecutive elements (any dim order)."""
    if t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` store their elements in the same order."""
    if a.shape != b.shape:
        return False
    return all(sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()) if size != 1)


_dtype = attrgetter("dtype")


# The C methods themselves, for per-tensor maps here and in the optimizer's fingerprint:
# through ``torch.Tensor`` they cost several times more on nn.Parameter (its subclass dispatch).
tensor_data_ptr = torch._C.TensorBase.data_ptr
tensor_size = torch._C.TensorBase.size
tensor_stride = torch._C.TensorBase.stride
tensor_numel = torch._C.TensorBase.numel
tensor_is_contiguous = torch._C.TensorBase.is_contiguous


@contextmanager
def gc_paused():
    """Python's cyclic garbage collector held off while a step builds thousands of short-lived
    tuples (shapes, strides): collections triggered halfway through would promote them to the
    oldest generation, and its full collections (every object of the process) would then cost
    more than everything else the step does."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def signatures(tensors: list) -> tuple[list, list, list, list]:
    """What a plan's tables and stages depend on for these tensors: their addresses, dtypes,
    shapes and strides (numel follows from the shape; the device is the plan's). Built with
    C-level ``map``."""
    with gc_paused():
        return (
            list(map(tensor_data_ptr, tensors)),
            list(map(_dtype, tensors)),
            list(map(tensor_size, tensors)),
            list(map(tensor_stride, tensors)),
        )


def block_rows(numels: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(tensor index, first element) of every block of ``block`` elements that covers tensors of
    ``numels`` elements, tensor by tensor: the rows of a block table."""
    blocks_per_tensor = (numels + block - 1) // block
    tensor_index = torch.repeat_interleave(torch.arange(len(numels)), blocks_per_tensor)
    first_block = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
    block_in_tensor = torch.arange(len(tensor_index)) - first_block[tensor_index]
    return tensor_index, block_in_tensor * block


def upload(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host table to ``device`` without making the host wait for the device, from
    a copy of its own (pinned memory on CUDA, which the caching allocator keeps alive until the
    copy is done), so the caller may write ``host`` again right away; on the CPU, ``host``."""
    if device.type == "cpu":
        return host
    host = host.pin_memory() if device.type == "cuda" else host.clone()
    return host.to(device, non_blocking=True)


def step_values(steps: list[Tensor]) -> Tensor:
    """The host step counts as one tensor: the shared buffer the optimizer keeps them in (its
    ``step`` states are consecutive 0-dim views of it; no copy then), or a stack of them."""
    buffer = steps[0]._base
    if buffer is not None and buffer.dim() == 1 and buffer.numel() == len(steps):
        start, size = buffer.data_ptr(), buffer.element_size()
        if list(map(Tensor.data_ptr, steps)) == list(range(start, start + size * len(steps), size)):
            return buffer
    return torch.stack([s.reshape(()) for s in steps])


class NormPass:
    """The host side of a multi-tensor gradient norm (Triton's and the CUDA C++ ``norm_kernel``):
    one launch per gradient dtype over blocks of ``block`` elements, its tables, and the
    buffers the kernels write.

    ``launches``: (dtype, number of blocks, pointer table, block table) per launch, on the
    device. Block-table rows are (tensor, start, numel), then one row whose first entry holds
    ``max_norm``'s fp64 bits (read by the block that finishes the norm). ``partials``: fp64,
    one per block of all launches, then the combined value; ``total``: 0-dim, in ``out_dtype``;
    ``coef``: 0-dim, torch's coefficient (a value of ``out_dtype``) held in the update kernels'
    compute dtype (fp32; fp64 for an fp64 norm), which they read without a conversion.
    ``counter``: the zeroed int32 ticket counter of this device and stream (the finishing block
    sets it back to 0), so that norms on two streams never share one. Gradients that are not
    dense are copied; gradients without elements are left out."""

    _counters: dict = {}

    def __init__(self, grads: list[Tensor], block: int, out_dtype, max_norm: float | None):
        device = self.device = grads[0].device
        # C-level maps: this runs at every clipped step.
        sizes = list(map(tensor_numel, grads))
        dtypes = list(map(_dtype, grads))
        walkable = list(map(tensor_is_contiguous, grads))
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g, size, dtype, contiguous in zip(grads, sizes, dtypes, walkable):
            if size:
                dense = contiguous or is_dense(g)
                by_dtype.setdefault(dtype, []).append(g if dense else g.contiguous())
        self.launches = []
        bits = torch.tensor(0.0 if max_norm is None else max_norm, dtype=torch.float64)
        for dtype, tensors in by_dtype.items():
            numels = torch.tensor(list(map(tensor_numel, tensors)), dtype=torch.int64)
            tensor_index, starts = block_rows(numels, block)
            rows = torch.stack([tensor_index, starts, numels[tensor_index]], dim=1)
            extra = torch.zeros(1, 3, dtype=torch.int64)
            extra[0, 0] = bits.view(torch.int64)
            table = torch.cat([rows, extra]).contiguous()
            pointers = torch.tensor(list(map(tensor_data_ptr, tensors)), dtype=torch.int64)
            self.launches.append(
                (dtype, len(tensor_index), upload(pointers, device), upload(table, device))
            )
        self.keep_alive = by_dtype  # contiguous copies live until the launches are enqueued
        self.num_partials = sum(blocks for _, blocks, _, _ in self.launches)
        self.partials = torch.empty(self.num_partials + 1, dtype=torch.float64, device=device)
        self.total = torch.empty((), dtype=out_dtype, device=device)
        compute = torch.float64 if out_dtype == torch.float64 else torch.float32
        self.coef = None if max_norm is None else torch.empty((), dtype=compute, device=device)
        stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None
        key = (device, stream)
        if key not in NormPass._counters:
            NormPass._counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
        self.counter = NormPass._counters[key]

    @property
    def empty(self) -> bool:
        """No gradient has an element: nothing to launch, nothing finishes the norm."""
        return self.num_partials == 0

    @property
    def combined(self) -> Tensor:
        """The fp64 sum (or maximum) the finishing block stored."""
        return self.partials[self.num_partials]


def norm_entry_points(block: int, launch):
    """A backend's ``grad_norm`` and ``grad_norm_and_coefficient`` (``backends.clip``) over a
    norm kernel that walks a ``NormPass`` of ``block``-element blocks: ``launch(norm, kind,
    grad_scale)`` enqueues its launches (one per gradient dtype, finished by the last block)."""

    def grad_norm(grads: list[Tensor], kind: int, norm_type: float, grad_scale) -> Tensor:
        """The fp64 sum of squares or of absolute values, or the largest absolute value
        (``kind``), of the unscaled gradients, as a 0-dim tensor on their device: one launch
        per gradient dtype (fp64 partial sums per block, combined in a fixed order by the block
        that finishes; no atomics on the values, so two runs give the same bits)."""
        norm = NormPass(grads, block, torch.float64, None)
        if norm.empty:
            return torch.zeros((), dtype=torch.float64, device=grads[0].device)
        launch(norm, kind, grad_scale)
        return norm.combined

    def grad_norm_and_coefficient(
        grads: list[Tensor], kind: int, grad_scale, max_norm: float, out_dtype: torch.dtype
    ) -> tuple[Tensor, Tensor] | None:
        """The norm (the square root of the sum for kind 0) in ``out_dtype`` and torch's
        clipping coefficient for ``max_norm``, from the same launches as ``grad_norm`` and none
        other: the block that finishes the norm computes the coefficient on the device, with
        torch's operations and roundings. None when no gradient has an element."""
        norm = NormPass(grads, block, out_dtype, float(max_norm))
        if norm.empty:
            return None
        launch(norm, kind, grad_scale)
        return norm.total, norm.coef

    return grad_norm, grad_norm_and_coefficient


class Stage:
    """A dense work tensor standing in for a tensor the kernel cannot address directly."""

    __slots__ = ("source", "work", "writes_back")

    def __init__(self, source: Tensor, like: Tensor, dtype: torch.dtype, writes_back: bool):
        self.source = source
        self.work = torch.empty_like(like, dtype=dtype)
        self.writes_back = writes_back


def _resolve(t: Tensor, anchor: Tensor, dtype: torch.dtype, writes_back: bool, stages: list):
    if t.dtype == dtype and is_dense(t) and same_layout(t, anchor):
        return t
    stage = Stage(t, anchor, dtype, writes_back)
    stages.append(stage)
    return stage.work


class LaunchPlan:
    """The tables of one bucket, plus the stages its odd layouts need.

    ``state_dtype``: the dtype the kernel reads and writes states in (states of another dtype
    are staged through it). ``block``: elements per block-table entry.
    """

    def __init__(self, work, states, state_dtype, block, new_buffers, step_column, key):
        params = work.params
        masters = work.masters
        self.key = key
        self.step_column = step_column
        self.block = block
        self.state_dtype = state_dtype
        self.device = params[0].device
        self.stages: list[Stage] = []
        self.grad_stages: list[Stage] = []
        self.grad_key: tuple | None = None
        self.grad_table: Tensor | None = None
        self.grads_aligned = False
        self.anchors: list[Tensor] = []
        rows = []
        steps = work.steps
        for i, p in enumerate(params):
            anchor = p if is_dense(p) else _resolve(p, p, p.dtype, True, self.stages)
            self.anchors.append(anchor)
            row = [anchor.data_ptr()]
            for column in states:
                row.append(_resolve(column[i], anchor, state_dtype, True, self.stages).data_ptr())
            row += [0] * (COL_MASTER - len(row))
            master = masters[i] if masters else None
            if master is not None:
                master = _resolve(master, anchor, torch.float32, True, self.stages)
            step_is_double = bool(steps) and steps[i].dtype == torch.float64
            row += [
                0 if master is None else master.data_ptr(),
                p.numel(),
                0,
                int(new_buffers[i]) if new_buffers else 0,
                work.indices[i] if work.indices else 0,
                int(step_is_double),
                work.groups[i],
            ]
            rows.append(row)
        host = torch.tensor(rows, dtype=torch.int64).reshape(-1, TABLE_COLUMNS)
        if step_column is not None:
            host[:, COL_STEP] = step_column
        self.tensor_table = upload(host, self.device)
        # 16-byte aligned addresses let the kernels use vector accesses (ALIGNED flag).
        self.tensors_aligned = not bool((host[:, :COL_NUMEL] % 16).any())
        numels = host[:, COL_NUMEL]
        tensor_index, starts = block_rows(numels, block)
        self.num_blocks = len(tensor_index)
        block_host = torch.stack([tensor_index, starts], dim=1).contiguous()
        self.block_table = upload(block_host, self.device)
        self.hyper_key: list | None = None
        self.hyper_table: Tensor | None = None
        self.hyper_bits: Tensor | None = None

    def bind_grads(self, grads: list[Tensor], grad_dtype: torch.dtype, writes_back: bool) -> None:
        """Point the grad table at this step's gradients (re-uploaded only when they changed
        address, dtype, shape or strides).

        ``writes_back``: the kernel writes the gradients (unscaled by GradScaler's scale), so
        a staged gradient is copied back after the launch.
        """
        key = (signatures(grads), writes_back)
        if key == self.grad_key:
            return  # a staged grad is held by its stage, so no new grad can take its address
        self.grad_stages = []
        pointers = [
            _resolve(g, anchor, grad_dtype, writes_back, self.grad_stages).data_ptr()
            for g, anchor in zip(grads, self.anchors)
        ]
        self.grad_table = upload(torch.tensor(pointers, dtype=torch.int64), self.device)
        self.grads_aligned = not any(pointer % 16 for pointer in pointers)
        self.grad_key = key

    def bind_hypers(self, rows: list[list[float]], lr_tensors: list | None) -> Tensor:
        """The hyperparameter table for this step (uploaded only when a value changed);
        ``lr_tensors``: each group's tensor lr the kernel reads through its address, or None."""
        key = [rows, None if lr_tensors is None else list(map(Tensor.data_ptr, lr_tensors))]
        if key != self.hyper_key:
            self.hyper_table = upload(hyper_host_table(rows, lr_tensors), self.device)
            self.hyper_bits = self.hyper_table.view(torch.int64)
            self.hyper_key = key
        return self.hyper_table

    @property
    def aligned(self) -> bool:
        return self.tensors_aligned and self.grads_aligned

    def stage_in(self) -> None:
        for stage in self.stages:
            stage.work.copy_(stage.source)
        for stage in self.grad_stages:
            stage.work.copy_(stage.source)

    def stage_out(self) -> None:
        for stage in self.stages + self.grad_stages:
            if stage.writes_back:
                stage.source.copy_(stage.work)


def _key(work, states, state_dtype, new_buffers) -> tuple:
    return (
        signatures(work.params),
        [signatures(column) for column in states],
        signatures(work.masters),
        state_dtype,
        list(new_buffers) if new_buffers else None,
        work.indices,
        work.groups,
    )


def plan_for(
    work,
    name: str,
    states: list[list[Tensor]],
    state_dtype: torch.dtype,
    block: int,
    new_buffers: list[int] | None = None,
    step_column: Tensor | None = None,
) -> LaunchPlan:
    """The bucket's plan ``name`` (kept in ``work.plan``, which the optimizer owns), rebuilt
    when any tensor it addresses changed its address, dtype, shape or strides, or a per-tensor
    column changed. ``states``: the state columns, in table order. ``step_column``: each
    tensor's step offset below its group's base step, or the addresses of step tensors."""
    if not isinstance(work.plan, dict):
        work.plan = {}
    plan = work.plan.get(name)
    key = _key(work, states, state_dtype, new_buffers)
    if (
        plan is None
        or plan.key != key
        or (step_column is None) != (plan.step_column is None)
        or (step_column is not None and not torch.equal(step_column, plan.step_column))
    ):
        plan = LaunchPlan(work, states, state_dtype, block, new_buffers, step_column, key)
        work.plan[name] = plan
    return plan


# ------------------------------------------------------------------------------------------------
# Hyperparameter rows.


def step_columns(
    work, step_pointers: bool, values: Tensor | None = None, group_index: Tensor | None = None
) -> tuple[list, Tensor]:
    """(each group's base step, the table's step column).

    ``step_pointers``: the kernel reads each step from its tensor (capturable=True, GradScaler):
    the column holds the steps' addresses. Otherwise (host steps, torch.optim's default path)
    each group's base step is the largest step of its tensors and the column holds each
    tensor's offset below it, so that every tensor at its group's base step uses bias
    corrections computed exactly as torch.optim computes them. ``values``: the steps' values,
    and ``group_index``: ``work.groups`` as a tensor, when the caller keeps them."""
    if group_index is None:
        group_index = torch.tensor(work.groups, dtype=torch.int64)
    groups = int(group_index.max()) + 1 if len(group_index) else 1
    if not work.steps:
        return [0.0] * groups, None
    if step_pointers:
        return [1.0] * groups, torch.tensor(list(map(Tensor.data_ptr, work.steps)))
    values = (step_values(work.steps) if values is None else values).to(torch.float64)
    base = torch.full((groups,), float("-inf"), dtype=torch.float64)
    base = base.scatter_reduce(0, group_index, values, reduce="amax")
    return base.tolist(), (base[group_index] - values).to(torch.int64)


def bias_corrections_at(beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """Adam's bias corrections at ``step`` as torch.optim's host code computes them, in Python
    floats (fp64): ``1 - beta1 ** step`` and ``(1 - beta2 ** step) ** 0.5``."""
    return 1 - beta1**step, (1 - beta2**step) ** 0.5


def hyper_rows(hypers, base_steps: list[float], lr_on_device: bool = False) -> tuple[list, list]:
    """(rows of the hyperparameter table, the tensor lr of each group or None).

    ``lr_on_device``: the kernel reads each group's tensor lr through its address (the row's lr
    is then 0); otherwise a tensor lr is read here (a sync if it lives on a GPU).

    Adam's bias corrections at the group's base step are torch.optim's host arithmetic
    (``bias_corrections_at``)."""
    rows, lr_tensors = [], []
    for hyper, base in zip(hypers, base_steps):
        lr = hyper.lr
        lr_tensor = lr if isinstance(lr, Tensor) else None
        lr_value = 0.0 if lr_tensor is not None and lr_on_device else float(lr)
        lr_tensors.append(lr_tensor)
        if isinstance(hyper, AdamHyper):
            rows.append([
                lr_value, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay, base,
                *bias_corrections_at(hyper.beta1, hyper.beta2, base), 0.0,
            ])  # fmt: skip
        else:
            assert isinstance(hyper, SgdHyper)
            rows.append([
                lr_value, hyper.momentum, hyper.dampening, 0.0, hyper.weight_decay, base,
                1.0, 1.0, 0.0,
            ])  # fmt: skip
    return rows, lr_tensors


def hyper_host_table(rows: list[list[float]], lr_tensors: list | None) -> Tensor:
    """The hyperparameter table on the host: ``rows`` (``hyper_rows``), and the addresses of
    the tensor lrs the kernel reads (``lr_tensors``, one per group, or None) in its int64 view."""
    host = torch.tensor(rows, dtype=torch.float64)
    if lr_tensors is not None:
        addresses = torch.tensor(list(map(Tensor.data_ptr, lr_tensors)), dtype=torch.int64)
        host.view(torch.int64)[:, HYPER_LR_ADDRESS] = addresses
    return host


def hyper_tensor(hypers) -> Tensor:
    """The hyperparameter table of ``hyper_rows`` at base step 0 (lr, the betas or momentum and
    dampening, eps, weight decay; bias corrections and lr addresses left 0), on the CPU, built
    by tensor operations only. torch.compile then keeps each value a graph input (a Python
    float as a 0-dim tensor, a tensor lr as itself) instead of a constant it would recompile
    for when a scheduler changes it. A tensor lr off the CPU is left 0 (its users read it
    where it lives)."""
    one = torch.ones((), dtype=torch.float64)
    rows = []
    for hyper in hypers:
        lr = hyper.lr
        if isinstance(lr, Tensor):
            lr = lr.to(torch.float64).reshape(()) if lr.device.type == "cpu" else 0.0
        if isinstance(hyper, AdamHyper):
            values = (lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay)
        else:
            values = (lr, hyper.momentum, hyper.dampening, 0.0, hyper.weight_decay)
        rows.append(torch.stack([one * value for value in values]))
    table = torch.stack(rows)
    padding = table.new_zeros(len(rows), HYPER_COLUMNS - table.shape[1])
    return torch.cat([table, padding], dim=1)


class PlanHostStep:
    """The compiled per-step host path of a bucket that walks a launch plan
    (``contract.HostStep``), shared by the Triton and CUDA backends.

    Its grad table (the extension's ``GradTable``) checks every tensor's signature and writes
    the grads' addresses, read from the params; the grad table is uploaded only when one moved.
    Host steps (torch.optim's default path) advance by one per step here: the groups' base steps
    are kept on the host, and the grad table also checks that the step counts hold the values
    it expects (a step edited by hand sends the step down the full path) and then advances
    them, the base steps and Adam's bias corrections in the hyperparameter table, in compiled
    code and in place. ``launch(plan, context)`` enqueues the kernel on the plan with its tables
    bound. Built after a full step, so the plan exists."""

    def __init__(self, checks, plan: LaunchPlan, work, held, adam: bool, step_pointers,
                 lr_on_device: bool, launch) -> None:  # fmt: skip
        self.plan = plan
        self.adam = adam
        self.lr_on_device = lr_on_device
        self.launch = launch
        self.addresses = torch.zeros(len(work.params), dtype=torch.int64)
        self.host_steps = bool(work.steps) and not step_pointers
        values = step_values(work.steps) if self.host_steps else None
        base_steps = [0.0] * (max(work.groups) + 1)
        if self.host_steps:
            base_steps, _ = step_columns(work, False, values)
        self.base_steps = torch.tensor(base_steps, dtype=torch.float64)
        self.grad_table = checks.GradTable(work.params, held, work.grads[0].dtype, values)
        self.hypers = None
        self.table: Tensor | None = None  # the groups' values (and, for host steps, their steps)

    def check(self) -> bool:
        return not self.plan.stages and self.grad_table.check()

    def _hyper_table(self, hypers) -> Tensor | None:
        """This step's hyperparameter table on the plan's device: the groups' values (rebuilt
        when one changed) and, for host steps, the new base steps and Adam's bias corrections at
        them; None when the bound table still holds."""
        changed = hypers is not self.hypers
        if changed:
            rows, lr_tensors = hyper_rows(hypers, self.base_steps.tolist(), self.lr_on_device)
            self.table = hyper_host_table(rows, lr_tensors if self.lr_on_device else None)
            self.hypers = hypers
        if self.host_steps:
            self.grad_table.advance(self.table, self.base_steps, self.adam)
        elif not changed:
            return None
        return upload(self.table, self.plan.device)

    def run(self, hypers, context) -> None:
        plan = self.plan
        table = self._hyper_table(hypers)
        if table is not None and table is not plan.hyper_table:
            plan.hyper_table, plan.hyper_bits = table, table.view(torch.int64)
            plan.hyper_key = None  # the full path binds its own table again
        if self.grad_table.pointers(self.addresses):
            plan.grad_table = upload(self.addresses, plan.device)
            plan.grads_aligned = self.grad_table.aligned()
            plan.grad_key = None  # the full path binds its own grads again
        self.launch(plan, context)


def host_step_for(checks, work, name: str, adam: bool, step_pointers, lr_on_device, launch):
    """A ``PlanHostStep`` for the bucket's plan ``name``, or None where it does not apply (no
    extension, views, a plan that stages a tensor, a missing state, or Adam's host steps that
    are not views of one buffer)."""
    plan = work.plan.get(name) if isinstance(work.plan, dict) else None
    if checks is None or not work.own_params or plan is None or plan.stages:
        return None
    if plan.grad_stages or not work.grads:
        return None
    held = [t for column in work.states.values() for t in column] + work.masters + work.steps
    if any(t is None for t in held):
        return None
    if adam and not step_pointers and step_values(work.steps) is not work.steps[0]._base:
        return None  # the steps are not views of one buffer: read them the full way
    return PlanHostStep(checks, plan, work, held, adam, step_pointers, lr_on_device, launch)
