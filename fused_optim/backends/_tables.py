"""Layout checks and host-side table helpers shared by the backends that walk pointer tables
(Triton and CUDA C++). Plain torch: usable whether or not triton or an extension is installed."""

from __future__ import annotations

from operator import attrgetter

import torch
from torch import Tensor


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


def signatures(tensors: list[Tensor]) -> tuple[list, list, list, list]:
    """What a launch plan's tables and stages depend on for these tensors: their addresses,
    dtypes, shapes and strides (numel follows from the shape; the device is the plan's). A plan
    is valid only while every tensor it addresses keeps its signature: a tensor that changes
    shape or layout at the same address (``p.data = base[:8]``, a grad that comes back
    transposed) must rebuild it, or the kernel walks the old extent and layout. Built with
    C-level ``map`` (about 0.3 us per tensor)."""
    return (
        list(map(Tensor.data_ptr, tensors)),
        list(map(_dtype, tensors)),
        list(map(Tensor.size, tensors)),
        list(map(Tensor.stride, tensors)),
    )


_dtype = attrgetter("dtype")


def same_layout(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` store their elements in the same order."""
    if a.shape != b.shape:
        return False
    return all(sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()) if size != 1)


def upload(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host table to ``device`` without making the host wait for the device
    (through pinned memory on CUDA, which the caching allocator keeps alive until the copy)."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
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


def step_offsets(steps: list[Tensor]) -> tuple[float, Tensor]:
    """The largest step and each tensor's distance below it, read from host-side step tensors."""
    values = step_values(steps).to(torch.float64)
    base = float(values.max())
    return base, (base - values).to(torch.int64)
