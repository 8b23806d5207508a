"""The step checks of the optimizer's fast path in plain Python: what the C++ extension's
``StepChecks``, ``GradTable``, ``values_unchanged``, ``adam_bias_corrections`` and
``advance_steps`` do (``csrc/cpu/ops.cpp``), for installs without the extension.

Same contract, same answers (tests/test_engine.py and tests/test_plan_validity.py run every
test with both): a check
changes nothing and answers False for anything it does not recognise, and the full step then
runs. Every per-tensor test is a C-level ``map`` over one list (an address, a dtype, a shape, a
strides tuple), compared as a whole with what was recorded; only a mismatch looks closer. The
shapes and strides built here are short-lived tuples by the thousand, so the checks run with
Python's cyclic garbage collector paused (``plan.gc_paused``).
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter, is_, itemgetter

import torch
from torch import Tensor

from .plan import (
    HYPER_BASE_STEP,
    HYPER_BETA1,
    HYPER_BETA2,
    HYPER_BIAS_CORRECTION1,
    HYPER_BIAS_CORRECTION2_SQRT,
    bias_corrections_at,
    gc_paused,
    is_dense,
    same_layout,
    signatures,
    tensor_data_ptr,
)

_grad = attrgetter("grad")
_dtype = attrgetter("dtype")
_device = attrgetter("device")
_params = itemgetter("params")


def values_unchanged(groups: list, values: list) -> bool:
    """Whether every param group still holds the very objects of ``values`` (one tuple of the
    group's values per group, a list value as a tuple of its items), by identity."""
    if len(groups) != len(values):
        return False
    try:
        if list(map(len, groups)) != list(map(len, values)):
            return False
        current = chain.from_iterable(map(dict.values, groups))
    except TypeError:
        return False  # a group that is not a dict
    if all(map(is_, current, chain.from_iterable(values))):
        return True
    for group, recorded in zip(groups, values):
        for value, expected in zip(group.values(), recorded):
            if value is expected:
                continue
            if not (isinstance(value, list) and isinstance(expected, tuple)):
                return False
            if len(value) != len(expected) or not all(map(is_, value, expected)):
                return False
    return True


class StepChecks:
    """What the fast path checks before each step, recorded once per step plan: the params of
    every group (identity, and which have a grad), the state dicts (identity, insertion order)
    and, in each of ``dicts``, the entries (identity, insertion order)."""

    def __init__(self, params, with_grad, dict_ids, dicts, entry_ids):
        self.params = list(params)  # kept alive: the ids compared stay theirs
        self.param_ids = list(map(id, self.params))
        self.without_grad = [i for i, has in enumerate(with_grad) if not has]
        self.dict_ids = list(dict_ids)
        self.dicts = list(dicts)
        # entry_ids: for each dict its number of entries, then the ids of its values.
        sizes, ids, position = [], [], 0
        for _ in self.dicts:
            if position >= len(entry_ids):
                break
            size = entry_ids[position]
            sizes.append(size)
            ids += entry_ids[position + 1 : position + 1 + size]
            position += 1 + size
        self.sizes, self.entry_ids = sizes, ids
        self.valid = position == len(entry_ids) and len(sizes) == len(self.dicts)

    def holds(self, param_groups: list, state: dict) -> bool:
        """Changes nothing. Of the grads, only that the params recorded without one still have
        none: every param recorded with one is in a bucket, whose ``GradTable.check()`` (run
        next by the fast path, which exists only where every bucket has one) reads its grad."""
        if not self.valid:
            return False
        try:
            params = list(chain.from_iterable(map(_params, param_groups)))
        except (TypeError, KeyError):
            return False  # a group that is not a dict, or has no params
        if list(map(id, params)) != self.param_ids:
            return False
        if self.without_grad and any(params[i].grad is not None for i in self.without_grad):
            return False
        if len(state) != len(self.dict_ids) or list(map(id, state.values())) != self.dict_ids:
            return False
        dicts = self.dicts
        if list(map(len, dicts)) != self.sizes:
            return False
        return list(map(id, chain.from_iterable(map(dict.values, dicts)))) == self.entry_ids


class GradTable:
    """The per-step host work of a table-walking bucket (Triton, CUDA): ``check()`` verifies
    that every param and held tensor (states, masters, steps) kept its address, dtype, shape and
    strides, and that every param has a grad the kernel walks in place (dense, in the param's
    layout, on its device, of the bucket's grad dtype); ``pointers(out)`` writes the grads'
    addresses into ``out`` when one moved. Given ``step_values`` (the host step counts, one
    tensor), ``check()`` also verifies that they hold the values expected, which start at their
    values now and ``advance()`` moves by one per step."""

    def __init__(self, params: list[Tensor], held: list[Tensor], grad_dtype: torch.dtype,
                 step_values: Tensor | None = None):  # fmt: skip
        self.step_values = step_values
        self.expected = None if step_values is None else step_values.clone()
        self.params = list(params)
        # 0-dim tensors (step counts, the states of 0-dim params) are read as one element at
        # their address: their address and dtype are what can change under the kernel.
        self.held = [t for t in held if t.dim()]
        self.scalars = [t for t in held if not t.dim()]
        self.grad_dtype = grad_dtype
        with gc_paused():
            self.param_signature = signatures(self.params)
            self.held_signature = signatures(self.held)
            self.scalar_signature = self._scalar_signature()
            self.devices = list(map(_device, self.params))
        self.on_cpu = all(d.type == "cpu" for d in self.devices)
        self.last: list | None = None
        self.addresses: list | None = None  # of the grads check() found

    def check(self) -> bool:
        with gc_paused():
            return self._check()

    def _check(self) -> bool:
        self.addresses = None
        params = self.params
        if signatures(params) != self.param_signature:
            return False
        grads = list(map(_grad, params))
        try:
            addresses, dtypes, sizes, strides = signatures(grads)
        except (TypeError, RuntimeError):
            return False  # a missing grad (None), or one without strides (sparse)
        _, _, param_sizes, param_strides = self.param_signature
        if dtypes.count(self.grad_dtype) != len(dtypes) or sizes != param_sizes:
            return False
        if strides != param_strides:
            # Dense grads in the param's order may still differ in the strides of size-1 dims.
            for g, p, stride, expected in zip(grads, params, strides, param_strides):
                if stride != expected and not (is_dense(g) and same_layout(g, p)):
                    return False
        if not self.on_cpu and list(map(_device, grads)) != self.devices:
            return False
        if signatures(self.held) != self.held_signature:
            return False
        if self.scalars and self._scalar_signature() != self.scalar_signature:
            return False
        if self.expected is not None and not torch.equal(self.step_values, self.expected):
            return False
        self.addresses = addresses
        return True

    def advance(self, table: Tensor, base_steps: Tensor, adam: bool) -> None:
        """One host step taken: the step counts ``check()`` expects and every group's base step
        advance by one, and ``table`` gets the new base steps and, for Adam, the bias
        corrections at them, in place."""
        if self.expected is not None:
            self.expected.add_(1)
        base_steps.add_(1)
        table[:, HYPER_BASE_STEP] = base_steps
        if adam:
            adam_bias_corrections(table)

    def _scalar_signature(self) -> tuple[list, list]:
        scalars = self.scalars
        return list(map(tensor_data_ptr, scalars)), list(map(_dtype, scalars))

    def pointers(self, out: Tensor) -> bool:
        """Write the addresses of the grads the last ``check()`` found (read again without a
        successful one) into ``out`` (int64, one per param) when any changed since the last
        call; return whether it did."""
        addresses = self.addresses
        if addresses is None:
            addresses = list(map(tensor_data_ptr, map(_grad, self.params)))
        if addresses == self.last:
            return False
        out.copy_(torch.tensor(addresses, dtype=torch.int64))
        self.last = addresses
        return True

    def aligned(self) -> bool:
        """Whether every address the last ``pointers()`` call wrote is a multiple of 16
        bytes (the kernels' vector loads)."""
        return not any(address % 16 for address in self.last or ())

    def reset(self) -> None:
        """Forget the last addresses (the next ``pointers()`` writes the table)."""
        self.last = None


def adam_bias_corrections(table: Tensor) -> None:
    """Adam's bias corrections in a hyperparameter table, in place, from each row's betas and
    base step, with Python's float arithmetic as torch.optim computes them
    (``plan.bias_corrections_at``)."""
    inputs = table[:, [HYPER_BETA1, HYPER_BETA2, HYPER_BASE_STEP]]
    if bool((inputs == inputs[:1]).all()):
        rows = inputs[:1].tolist()  # every group at the same betas and step: the usual case
    else:
        rows = inputs.tolist()
    distinct = {row: None for row in map(tuple, rows)}
    for row in distinct:
        distinct[row] = bias_corrections_at(*row)
    values = torch.tensor([distinct[row] for row in map(tuple, rows)], dtype=torch.float64)
    table[:, HYPER_BIAS_CORRECTION1] = values[:, 0]
    table[:, HYPER_BIAS_CORRECTION2_SQRT] = values[:, 1]


def advance_steps(buffers: list[Tensor]) -> bool:
    """Add one to every step-count buffer (torch's in-place add); True."""
    torch._foreach_add_(buffers, 1)
    return True


__all__ = [
    "GradTable",
    "StepChecks",
    "adam_bias_corrections",
    "advance_steps",
    "values_unchanged",
]
