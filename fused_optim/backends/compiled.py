"""Steps traced by torch.compile: the updates of the plan-walking backends as one custom op.

A launch plan (``backends.plan``) holds tensor addresses, which a trace on fake tensors does not
have, and a launch through pointer tables is invisible to a compiler: it could neither see what
the kernel writes nor keep those writes in order. A traced step therefore reaches the Triton
and CUDA kernels (and the reference's code, which a compiler would round differently) through
one op, ``torch.ops.fused_optim.bucket_step``:

* its schema names every tensor list the kernel writes (params, grads, which are unscaled in
  place under GradScaler, states, master weights); its fake implementation does nothing;
* its real implementation runs the backend's eager launch (``launch_sgd``/``launch_adam``)
  on the tensors it is given;
* the groups' hyperparameters travel as ONE float64 tensor in the plan's hyperparameter layout
  (``plan.hyper_tensor``), built by tensor operations, so that the compiler keeps a scheduler's
  lr, betas or weight decay as graph inputs instead of constants it recompiles for. Tensor lrs
  travel as tensors.

A schema cannot carry a plan, so the op takes an int ``handle``. Each optimizer owns a
``SlotPool``: a block of handles reserved at its construction (in eager code; a registry write
cannot be traced) and registered here by a weak reference, so the registry keeps nothing alive
and a handle of a dead optimizer finds nothing. A traced step passes ``pool.handle(bucket)``;
the op keeps that bucket's launch plans in the pool, valid while every tensor keeps its
address, shape, strides and dtype (``plan.signatures``). Handle 0 builds plans per call.

State: while dynamo traces a step, ``prepare_state`` runs outside the trace (dynamo calls it
instead of tracing it) and lets the optimizer create its missing state and mark every state
tensor static; the compiled step then guards the state by identity, as dynamo does for
torch.optim's own state, instead of checking every state tensor's metadata on every call.

The C++ CPU backend needs none of the op: its kernel takes tensor lists, so its own op
(``torch.ops.fused_optim.adam_``/``sgd_``) is traced directly with the same table.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref

import torch
from torch import Tensor

from . import plan as plans
from .contract import AdamFlags, AdamHyper, SgdFlags, SgdHyper, StepContext, Work

__all__ = ["SlotPool", "adam", "sgd"]

SLOTS_PER_POOL = 1 << 20


class SlotPool:
    """The launch plans of one optimizer's traced steps: a plan dict per bucket number,
    found by the custom op through ``handle(bucket)``. Owned by the optimizer, which it knows
    by a weak reference and ``prepare(owner)`` runs on (see ``prepare_state``)."""

    __slots__ = ("__weakref__", "base", "key", "owner", "prepare", "slots")

    def __init__(self, owner=None, prepare=None) -> None:
        number = next(_POOL_NUMBERS)
        self.key = str(number)  # prepare_state's argument
        self.base = number * SLOTS_PER_POOL
        self.slots: dict[int, dict] = {}
        self.owner = None if owner is None else weakref.ref(owner)
        self.prepare = prepare
        _POOLS[number] = self

    def handle(self, bucket: int) -> int:
        return self.base + bucket


_POOLS: weakref.WeakValueDictionary[int, SlotPool] = weakref.WeakValueDictionary()
_POOL_NUMBERS = itertools.count(1)


def _plans(handle: int) -> dict | None:
    """The plan dict of ``handle`` (None for 0, or once its optimizer is gone)."""
    pool = _POOLS.get(handle // SLOTS_PER_POOL) if handle else None
    return None if pool is None else pool.slots.setdefault(handle % SLOTS_PER_POOL, {})


def prepare_state(pool_key: str) -> int:
    """Run, while dynamo traces a step and outside the trace, the ``prepare`` of the pool
    ``pool_key`` names (``SlotPool.key``): the optimizer creates its missing state there,
    eagerly, and marks its state tensors static (``torch._dynamo.mark_static_address``), so
    that the compiled step guards them by identity, as dynamo does for torch.optim's own state,
    instead of checking every tensor's metadata on every call. Returns 0 (dynamo keeps the
    result as a constant). The key is a string: dynamo keeps strings constant, where an int
    that differs between two optimizers' traces of the same code would become symbolic, which
    a constant-result function cannot take (two optimizers compiled with fullgraph=True)."""
    pool = _POOLS.get(int(pool_key))
    owner = None if pool is None or pool.owner is None else pool.owner()
    if owner is not None and pool.prepare is not None:
        pool.prepare(owner)
    return 0


# What ``torch.compiler.assume_constant_result`` does (dynamo then calls the function while
# tracing instead of tracing it), spelled out because calling it would import dynamo (seconds)
# with fused_optim; tests/test_compile.py checks the two agree.
prepare_state._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _module(name: str):
    """The backend module ``name`` (imported by the package when the step was traced)."""
    from . import _module as load  # the package imports this module

    return load(name)


def _hypers(table: Tensor, lrs: list[Tensor], adam: bool) -> list:
    """The contract's per-group hyperparameters from a ``plan.hyper_tensor`` table."""
    hypers = []
    for g, row in enumerate(table.tolist()):
        lr = lrs[g] if lrs else row[plans.HYPER_LR]
        b1, b2, eps, decay = row[plans.HYPER_BETA1 : plans.HYPER_WEIGHT_DECAY + 1]
        hypers.append(AdamHyper(lr, b1, b2, eps, decay) if adam else SgdHyper(lr, b1, b2, decay))
    return hypers


@torch.library.custom_op(
    "fused_optim::bucket_step",
    mutates_args=("params", "grads", "state0", "state1", "state2", "master_params"),
)
def _bucket_step(
    backend: str,
    algorithm: str,
    params: list[Tensor],
    grads: list[Tensor],
    state0: list[Tensor],
    state1: list[Tensor],
    state2: list[Tensor],
    master_params: list[Tensor],
    steps: list[Tensor],
    new_buffers: list[int],
    groups: list[int],
    indices: list[int],
    hypers: Tensor,
    lrs: list[Tensor],
    flags: list[int],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    stochastic_rounding: bool,
    seed: int,
    handle: int,
) -> None:
    """One bucket's step of ``algorithm`` ("sgd" or "adam") on ``backend``.

    The state columns are, for SGD, the momentum buffers (empty without momentum, all
    allocated with it; ``new_buffers`` flags those allocated for this step); for Adam,
    exp_avg, exp_avg_sq and max_exp_avg_sq (empty without amsgrad). ``flags`` are the fields
    of ``SgdFlags``/``AdamFlags`` in order, as 0 or 1."""
    if not params:
        return
    adam = algorithm == "adam"
    code = (AdamFlags if adam else SgdFlags)(*map(bool, flags))
    work = Work(
        params=list(params),
        grads=list(grads),
        states={},
        groups=list(groups),
        steps=list(steps),
        masters=list(master_params),
        indices=list(indices),
        plan=_plans(handle),
    )
    context = StepContext(grad_scale, found_inf, stochastic_rounding, seed)
    module = _module(backend)
    if adam:
        work.states = {"exp_avg": list(state0), "exp_avg_sq": list(state1)}
        if code.amsgrad:
            work.states["max_exp_avg_sq"] = list(state2)
        module.launch_adam(work, _hypers(hypers, lrs, True), code, context)
        return
    if code.momentum:
        work.states = {"momentum_buffer": list(state0)}
    new = list(new_buffers) or None
    module.launch_sgd(work, list(state0), new, _hypers(hypers, lrs, False), code, context)


@_bucket_step.register_fake
def _(*args, **kwargs) -> None:
    return None


def _tensor_lrs(hypers) -> list[Tensor]:
    """The groups' tensor lrs (the optimizer buckets groups by the kind of their lr: all or
    none)."""
    return [hyper.lr for hyper in hypers if isinstance(hyper.lr, Tensor)]


def new_buffers(params: list[Tensor], buffers: list, dtype) -> tuple[list, list, list[int]]:
    """(the created buffers, the full momentum column, the new-buffer flags) for a traced step:
    missing buffers are allocated as zeros (a step that GradScaler skips leaves them zero) and
    flagged, so that the kernel starts them from the gradient."""
    created: list[Tensor | None] = [None] * len(params)
    flags = [0] * len(params)
    column = list(buffers)
    for i, buf in enumerate(column):
        if buf is None:
            created[i] = column[i] = torch.zeros_like(params[i], dtype=dtype or params[i].dtype)
            flags[i] = 1
    return created, column, flags


def _call(backend, algorithm, work, columns, new, hypers, flags, context) -> None:
    torch.ops.fused_optim.bucket_step(
        backend, algorithm, work.params, work.grads, *columns, work.masters, work.steps, new,
        work.groups, work.indices, plans.hyper_tensor(hypers), _tensor_lrs(hypers),
        [int(getattr(flags, field.name)) for field in dataclasses.fields(flags)],
        context.grad_scale, context.found_inf, context.stochastic_rounding,
        int(context.seed) & 0xFFFFFFFF, work.handle,
    )  # fmt: skip


def sgd(backend: str, work: Work, hypers, flags: SgdFlags, context: StepContext) -> list:
    """A traced SGD step of ``backend`` on ``work`` through the custom op; returns the momentum
    buffers it created (``contract``)."""
    created: list[Tensor | None] = [None] * len(work.params)
    buffers: list[Tensor] = []
    new: list[int] = []
    if flags.momentum:
        column = work.column("momentum_buffer")
        created, buffers, new = new_buffers(work.params, column, work.new_state_dtype)
    columns = (buffers, [], [])
    _call(backend, "sgd", work, columns, new if any(new) else [], hypers, flags, context)
    return created


def adam(backend: str, work: Work, hypers, flags: AdamFlags, context: StepContext) -> list:
    """A traced Adam/AdamW step of ``backend`` on ``work`` through the custom op."""
    states = work.states
    columns = (states["exp_avg"], states["exp_avg_sq"], work.column("max_exp_avg_sq"))
    _call(backend, "adam", work, columns, [], hypers, flags, context)
    return [None] * len(work.params)
