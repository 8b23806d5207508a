"""Launch plans: the device tables that let one kernel launch cover a whole tensor group.

A plan is built from the tensors of one (device, dtype) group and cached in the optimizer's
per-group cache. It is rebuilt when a parameter or state tensor changes its address, dtype,
shape or strides, when the set of tensors changes, or when a per-tensor value in the table
changes. Gradients usually move with every backward pass, so their pointers are a separate,
small table that is re-uploaded (and their staging redone) when one of them changes address
or layout.

Tensors the kernel cannot walk as one dense span in the parameter's memory order (a strided
view as param, a gradient whose strides differ from the param's, a state of another layout or
dtype) are *staged*: the plan keeps a dense work tensor for each, copies into it before the launch
and, for tensors the kernel writes, back after it. The kernel never writes to a copy that is then
thrown away.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._tables import is_dense, same_layout, signatures, upload
from . import kernels

# Elements and warps per program, read when a plan is built. BLOCK=1024 with 4 warps reached
# the copy roofline on one 64M-element tensor on an H200 (benchmarks/RESULTS.md).
BLOCK = 1024
NUM_WARPS = 4


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
    """Device tables for one group of tensors, plus the stages its odd layouts need."""

    def __init__(
        self,
        params: list[Tensor],
        states: list[list[Tensor]],
        masters: list[Tensor],
        extra: Tensor,
        state_dtype: torch.dtype,
        key: tuple,
    ):
        self.key = key
        self.extra = extra
        self.block = BLOCK
        self.grad_key: tuple | None = None
        self.device = params[0].device
        self.stages: list[Stage] = []
        self.grad_stages: list[Stage] = []
        self.anchors: list[Tensor] = []
        rows = []
        extra_values = extra.tolist()
        for i, p in enumerate(params):
            anchor = _resolve(p, p, p.dtype, True, self.stages) if not is_dense(p) else p
            self.anchors.append(anchor)
            row = [anchor.data_ptr()]
            for column in states:
                row.append(_resolve(column[i], anchor, state_dtype, True, self.stages).data_ptr())
            row += [0] * (kernels.COL_MASTER - len(row))
            master = masters[i] if masters else None
            if master is not None:
                master = _resolve(master, anchor, torch.float32, True, self.stages)
            row.append(0 if master is None else master.data_ptr())
            row += [p.numel(), *extra_values[i]]
            rows.append(row)
        host = torch.tensor(rows, dtype=torch.int64).reshape(-1, kernels.TABLE_COLUMNS)
        self.tensor_table = upload(host, self.device)
        # 16-byte aligned addresses let the kernel use vector loads (ALIGNED flag).
        self.tensors_aligned = not bool((host[:, : kernels.COL_NUMEL] % 16).any())
        self.grads_aligned = False

        numels = host[:, kernels.COL_NUMEL]
        blocks_per_tensor = (numels + self.block - 1) // self.block
        self.num_blocks = int(blocks_per_tensor.sum())
        tensor_index = torch.repeat_interleave(torch.arange(len(params)), blocks_per_tensor)
        first_block = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
        block_in_tensor = torch.arange(self.num_blocks) - first_block[tensor_index]
        block_host = torch.stack([tensor_index, block_in_tensor * self.block], dim=1).contiguous()
        self.block_table = upload(block_host, self.device)
        self.grad_table: Tensor | None = None

    def bind_grads(self, grads: list[Tensor], grad_dtype: torch.dtype, writes_back: bool) -> None:
        """Point the grad table at this step's gradients (re-uploaded only when they moved).

        ``writes_back``: the kernel writes the gradients (unscaled by GradScaler's scale), so
        a staged gradient is copied back after the launch.
        """
        key = (signatures(grads), writes_back)
        if key == self.grad_key:
            return
        self.grad_stages = []
        pointers = [
            _resolve(g, anchor, grad_dtype, writes_back, self.grad_stages).data_ptr()
            for g, anchor in zip(grads, self.anchors)
        ]
        self.grad_table = upload(torch.tensor(pointers, dtype=torch.int64), self.device)
        self.grads_aligned = not any(pointer % 16 for pointer in pointers)
        self.grad_key = key

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


def plan_for(
    cache: dict,
    name: str,
    params: list[Tensor],
    states: list[list[Tensor]],
    masters: list[Tensor],
    extra: Tensor,
    state_dtype: torch.dtype,
) -> LaunchPlan:
    """The cached plan for these tensors, rebuilt when any of them changed its address, dtype,
    shape or strides (see ``_tables.signatures``), or ``extra`` changed.

    ``extra`` (int64, on the CPU, one row per tensor) holds the table's last columns: the step
    offset or step address, the new-momentum-buffer flag and the param's index.
    """
    key = (
        signatures(params),
        [signatures(column) for column in states],
        signatures(masters),
        state_dtype,
    )
    plan = cache.get(name)
    if plan is None or plan.key != key or not torch.equal(plan.extra, extra):
        plan = LaunchPlan(params, states, masters, extra, state_dtype, key)
        cache[name] = plan
    return plan
