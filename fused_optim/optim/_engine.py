"""The step engine: which tensors one ``step()`` updates, in which buckets, by which backend.

A ``StepPlan`` covers every param group at once. Its buckets cut across groups: all tensors that
share (backend, device, param dtype, state dtype, master weights, the algorithm's code flags)
are updated by ONE backend call, whatever group they belong to; each group's hyperparameters
are a row the kernel reads (``backends.contract``). The plan is owned by the optimizer and
valid while its fingerprint holds: the same params with grads (objects and storage), the same
state dicts and state tensors, and the same per-group structure (flags, lr kind, which states
exist). Anything else builds a new plan; launch plans below it (``backends.plan``) further check
every tensor's address, dtype, shape and strides.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, methodcaller

import torch
from torch import Tensor

from ..backends.contract import Work
from ..backends.plan import tensor_data_ptr
from ._state import any_dtensor, needs_views, real_view

_grad = attrgetter("grad")


def fingerprint(params: list[Tensor]) -> list:
    """What must not change about the params for a plan to stay valid: the objects and their
    storage. Built with C-level ``map``, so that checking costs far less than rebuilding."""
    storage = [real_view(p) for p in params] if any_dtensor(params) else params
    return [list(map(id, params)), list(map(tensor_data_ptr, storage))]


def state_fingerprint(states: list, keys: tuple[str, ...]) -> list | None:
    """The same for state: the state dicts, and the tensors under ``keys`` in them, with the
    shapes and dtypes (which ``.data`` can change) of those the step's checks read, and the
    addresses of the ``step`` counts (a step moved by ``.data`` is no longer a view of the
    plan's step buffer, which the step advances); None when a param has no state yet."""
    if None in states:
        return None
    result = [list(map(id, states))]
    for key in keys:
        column = list(map(methodcaller("get", key), states))
        result.append(list(map(id, column)))
        if key != "step":
            result.append(list(map(getattr, column, repeat("shape"), repeat(None))))
            result.append(list(map(getattr, column, repeat("dtype"), repeat(None))))
        else:
            result.append(addresses(column))
    return result


def addresses(tensors: list) -> list:
    """Each tensor's data pointer (None for anything else)."""
    try:
        return list(map(tensor_data_ptr, tensors))
    except TypeError:
        return [t.data_ptr() if isinstance(t, Tensor) else None for t in tensors]


class Bucket:
    """One backend call: ``positions`` index the plan's flat tensor list, ``group_ids`` map the
    bucket's local group numbers (``work.groups``) to the optimizer's param groups."""

    __slots__ = ("backend", "flags", "group_ids", "positions", "whole", "work")

    def __init__(self, backend, flags, positions: list[int], whole: bool):
        self.backend = backend
        self.flags = flags
        self.positions = positions
        self.whole = whole
        self.group_ids: list[int] = []
        self.work: Work | None = None

    def take(self, values: list) -> list:
        return values if self.whole else [values[i] for i in self.positions]

    def hypers(self, group_hypers: list) -> list:
        """This bucket's rows of the optimizer's per-group hyperparameters (``work.groups``
        index them)."""
        return [group_hypers[g] for g in self.group_ids]


class StepPlan:
    """Every tensor of one step, flattened over the param groups, and its buckets.

    ``params``/``states``/``group_of``/``indices`` are flat over the groups that have grads;
    ``steps`` are the buffers holding every ``step`` state (see ``_state.gather_steps``).
    """

    def __init__(self, params, states, group_of, indices, check, structure, sparse):
        self.params = params
        self.states = states
        self.group_of = group_of
        self.indices = indices
        self.check = check
        self.structure = structure
        self.sparse = sparse
        self.views = needs_views(params)
        self.step_buffers: list[Tensor] = []
        self.buckets: list[Bucket] = []
        self.fast: FastPath | None = None
        self.fast_tried = False
        self.grad_dtypes: list | None = None  # of the last step's grads (see _base._step)

    def matches(self, check, structure, sparse) -> bool:
        return structure == self.structure and sparse == self.sparse and check == self.check

    def real_grads(self, grads: list[Tensor]) -> list[Tensor]:
        return [real_view(g) for g in grads] if self.views else grads

    def add_bucket(self, backend, flags, positions: list[int], state_keys, master_key, dtype):
        """A bucket of the flat tensors at ``positions``, updated by ``backend`` with ``flags``;
        ``dtype`` is the dtype of the states it creates."""
        bucket = Bucket(backend, flags, positions, len(positions) == len(self.params))
        real_params = [real_view(p) for p in self.params] if self.views else self.params
        groups = bucket.take(self.group_of)
        bucket.group_ids = sorted(set(groups))
        local = {g: i for i, g in enumerate(bucket.group_ids)}
        states = bucket.take(self.states)
        masters = [real_view(s.get(master_key)) for s in states] if master_key else []
        bucket.work = Work(
            params=bucket.take(real_params),
            grads=[],
            states={key: [real_view(s.get(key)) for s in states] for key in state_keys},
            groups=[local[g] for g in groups],
            steps=[s["step"] for s in states] if states and "step" in states[0] else [],
            masters=masters if any(m is not None for m in masters) else [],
            indices=bucket.take(self.indices),
            new_state_dtype=dtype,
            own_params=not self.views,
        )
        self.buckets.append(bucket)


def params_with_grads(param_groups: list[dict]) -> list[list[Tensor]]:
    """Each group's params that have a gradient, in order."""
    return [[p for p in group["params"] if p.grad is not None] for group in param_groups]


def grads_of(params: list[Tensor]) -> list[Tensor]:
    if torch.compiler.is_compiling():
        return [p.grad for p in params]  # what dynamo traces (it cannot call attrgetter)
    return list(map(_grad, params))


def is_sparse_any(grads: list[Tensor]) -> bool:
    return any(g.is_sparse for g in grads)


def flat(lists: list[list]) -> list:
    out: list = []
    for part in lists:
        out += part
    return out


def holds_tensor(values: tuple) -> bool:
    """Whether a group's recorded values (``group_values``) hold a tensor, directly or in a
    tuple (betas); the params are not values."""
    return any(
        isinstance(v, Tensor) or (isinstance(v, tuple) and any(isinstance(x, Tensor) for x in v))
        for v in values
        if not isinstance(v, list)
    )


def lr_kind(lr) -> tuple | None:
    """What about a group's lr changes the kernel's code: a tensor lr's dtype and device."""
    return (lr.dtype, lr.device) if isinstance(lr, Tensor) else None


def group_values(param_groups: list[dict]) -> list[tuple]:
    """Each group's values, as the extension's ``values_unchanged`` compares them (by identity;
    a list value other than the params as a tuple of its items, so that an item written into
    it counts as a change)."""
    return [
        tuple(
            tuple(v) if isinstance(v, list) and key != "params" else v for key, v in group.items()
        )
        for group in param_groups
    ]


class FastPath:
    """The compiled per-step path of a plan: checks in the extension (``StepChecks``, recorded
    once) that the param groups list the same params with grads and the state the same dicts and
    tensors, then each bucket's host step (``backends.contract.HostStep``) checks its tensors and
    runs, collecting the grads from the params itself. Per-group values are compared as a whole
    (``raw``) and read again only when one changed. Built once per plan; any failed check falls
    back to the full path."""

    def __init__(self, checks, plan: StepPlan, param_groups, state, steps, kind, raw, hypers):
        self.checks = checks
        self.succeeded = False
        self.steps = steps
        self.context_kind = kind  # what the host steps were built for (_context_kind)
        self.raw = raw
        # A tensor value (an lr, a beta) can change in place, or its memory through ``.data``,
        # while the group holds the same object: such groups are read again every step.
        self.reread = any(map(holds_tensor, raw))
        self.hypers = hypers
        self.bucket_hypers = [bucket.hypers(hypers) for bucket in plan.buckets]
        flat_params = flat([group["params"] for group in param_groups])
        dicts = [s for s in plan.states if s]
        entry_ids = []  # per dict: its size, then its values' ids
        for entries in dicts:
            entry_ids += [len(entries), *map(id, entries.values())]
        self.recorded = checks.StepChecks(
            flat_params,
            [p.grad is not None for p in flat_params],
            list(map(id, state.values())),
            dicts,
            entry_ids,
        )

    def holds(self, param_groups, state) -> bool:
        return self.recorded.holds(param_groups, state) and all(step.check() for step in self.steps)
