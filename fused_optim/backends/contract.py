"""The one typed contract between the optimizers and every backend.

A backend is a module with ``NAME``, ``SUPPORTS_SPARSE``, ``is_available(device)`` and two
entry points:

``sgd(work: Work, hypers: Sequence[SgdHyper], flags: SgdFlags, context: StepContext)
-> list[Tensor | None]``

``adam(work: Work, hypers: Sequence[AdamHyper], flags: AdamFlags, context: StepContext)
-> list[Tensor | None]``

One call updates every tensor of one *bucket*: the tensors of ALL param groups that share a
device, a param dtype, a state dtype, master weights or not, and the flags that change the code
(``SgdFlags``, ``AdamFlags``). ``work.groups[i]`` is the index in ``hypers`` of tensor ``i``'s
group; per-group values (lr, betas, eps, weight decay, momentum, dampening) are data, never code,
so a change of any of them between steps changes no plan and compiles nothing.

A backend never writes into the caller's lists. It returns, per tensor, the state tensor it
created on this step (SGD's momentum buffer on its first step) or ``None``. The dtype of a new
momentum buffer is ``work.new_state_dtype`` (decided once, by the optimizer).

Everything in ``Work`` is a real tensor (complex params arrive as ``torch.view_as_real`` views,
DTensors as their local shards) on ``work.device``. ``steps`` have already been advanced for this
step. ``work.plan`` is a slot the backend may keep its launch plan in between steps (see
``backends.plan``); the optimizer owns it and drops it whenever the bucket is rebuilt.

A backend may also offer a *host step* (``host_step(work, hypers, flags, context)``, a
``HostStep`` or None):
an object built once per bucket that checks, then runs, later steps with the per-tensor host work
(collecting grads from the params, checking that every tensor kept its signature, filling the
tables) in compiled code. The optimizer uses host steps only when ``work.own_params`` (the params
in ``work`` are the optimizer's own tensors, not views), only when every bucket has one, and only
after its own checks that the params, grads and state are those the plan was built for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

#: State keys of each algorithm, in the order of the plans' state columns.
SGD_STATE_KEYS = ("momentum_buffer",)
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True)
class SgdHyper:
    """One param group's SGD hyperparameters (``lr`` may be a 1-element tensor)."""

    lr: float | Tensor
    momentum: float
    dampening: float
    weight_decay: float


@dataclass(frozen=True)
class AdamHyper:
    """One param group's Adam/AdamW hyperparameters (``lr`` may be a 1-element tensor)."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


@dataclass(frozen=True)
class SgdFlags:
    """What changes SGD's code (so splits launches): momentum present, nesterov, maximize, and
    whether the params are real views of complex ones (``complex_arithmetic``: torch.optim's
    ``add(..., alpha=...)`` on complex tensors rounds the product before adding, where on real
    ones it is one fused multiply-add)."""

    momentum: bool
    nesterov: bool
    maximize: bool
    complex_arithmetic: bool = False


@dataclass(frozen=True)
class AdamFlags:
    """What changes Adam's code: amsgrad, maximize, decoupled weight decay, and whether the bias
    corrections are computed with tensor arithmetic (``capturable=True`` or under GradScaler, as
    torch.optim does: ``sqrt`` instead of ``** 0.5``), and whether the params are real views of
    complex ones (``complex_arithmetic``: the L2 term is added as on complex tensors, see
    ``SgdFlags``)."""

    amsgrad: bool
    maximize: bool
    decoupled_weight_decay: bool
    tensor_bias_corrections: bool = False
    complex_arithmetic: bool = False


@dataclass(frozen=True)
class StepContext:
    """What one ``step()`` brings besides tensors and hyperparameters.

    ``grad_scale``/``found_inf``: GradScaler's tensors (unscale the gradients and write them back
    unscaled; change nothing at all when ``found_inf`` is nonzero). ``stochastic_rounding`` and
    ``seed``: round low-precision param writes at random with counter-based bits of (seed, step,
    param index, element index).

    ``grad_coef``: gradient clipping's coefficient, a 0-dim tensor on the params' device (see
    ``backends.clip``): after the unscale, each gradient is rounded to its dtype and multiplied
    by the coefficient's value in the compute dtype (fp32, or fp64 for fp64 params), the product
    rounded to the gradient's dtype: torch's ``grad.mul_(coef)`` on the CPU. (On CUDA torch
    casts the coefficient to the gradient's dtype first; the two differ only when gradients of
    several dtypes are clipped together, the coefficient then being fp32 for bf16 gradients.)
    The clipped gradient is written back when the unscale writes it back (``grad_scale``) or
    when ``write_grads`` asks; otherwise the gradients in memory stay as they were. Every
    backend applies it in its update.
    """

    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    stochastic_rounding: bool = False
    seed: int = 0
    grad_coef: Tensor | None = None
    write_grads: bool = False

    @property
    def stores_grads(self) -> bool:
        """Whether the backend stores the gradients it prepared: always with the unscale, with
        a clipping coefficient when ``write_grads`` asks."""
        return self.grad_scale is not None or (self.grad_coef is not None and self.write_grads)


@dataclass(eq=False)
class Work:
    """The tensors of one bucket, in one order, and what the backend keeps between steps.

    ``states`` maps a state key (``SGD_STATE_KEYS`` / ``ADAM_STATE_KEYS``) to that state's tensors
    (``None`` where SGD's momentum buffer does not exist yet). ``steps`` and ``masters`` are
    empty when unused. ``indices`` are the params' positions in the optimizer (state_dict
    numbering; they key the stochastic-rounding bits). ``handle`` is set in steps traced by
    torch.compile: it names where the custom ops of ``backends.compiled`` keep the bucket's
    launch plans (0: none, plans are built per call).
    """

    params: list[Tensor]
    grads: list[Tensor]
    states: dict[str, list[Any]]
    groups: list[int]
    steps: list[Tensor] = field(default_factory=list)
    masters: list[Tensor] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    new_state_dtype: torch.dtype | None = None
    own_params: bool = False
    plan: Any = None
    handle: int = 0

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def column(self, key: str) -> list:
        return self.states.get(key) or []


class HostStep(Protocol):
    """A bucket's compiled per-step host path (see the module docstring)."""

    def check(self) -> bool:
        """Whether every tensor kept its signature and every param has a grad; changes nothing."""
        ...

    def run(self, hypers: Sequence[Any], context: StepContext) -> None:
        """One step of the bucket, grads read from the params (after ``check()``)."""
        ...


class Backend(Protocol):
    """What every backend module provides (checked by tests/test_contract.py)."""

    NAME: str
    SUPPORTS_SPARSE: bool

    def is_available(self, device: torch.device) -> tuple[bool, str]: ...

    def sgd(
        self, work: Work, hypers: Sequence[SgdHyper], flags: SgdFlags, context: StepContext
    ) -> list[Tensor | None]: ...

    def adam(
        self, work: Work, hypers: Sequence[AdamHyper], flags: AdamFlags, context: StepContext
    ) -> list[Tensor | None]: ...


def lr_dtype(lr: float | Tensor) -> torch.dtype:
    """The dtype the scalar math around ``lr`` runs in: fp64 for a float lr (torch.optim's host
    arithmetic), the tensor's dtype for a tensor lr (torch.optim's tensor arithmetic)."""
    return lr.dtype if isinstance(lr, Tensor) else torch.float64


def lr_argument(lr: float | Tensor) -> float | Tensor:
    """A tensor lr stays a (0-dim) tensor: the backends follow torch.optim's tensor arithmetic."""
    if isinstance(lr, Tensor):
        return lr.reshape(())
    return float(lr)


def hyper_value(value: float | Tensor) -> float:
    """A hyperparameter as a Python float (a tensor is read: a sync if it lives on a GPU)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


# ------------------------------------------------------------------------------------------------
# Keyword form: one group's step from plain lists and keywords. For tests, benchmarks and callers
# that drive a backend on raw tensor lists; it builds the typed objects and calls the contract.


def run_sgd(
    backend,
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
    work: Work | None = None,
    steps: list[Tensor] | None = None,
    master_params: list[Tensor] | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    param_indices: list[int] | None = None,
    new_buffer_dtype: torch.dtype | None = None,
    grad_coef: Tensor | None = None,
    write_grads: bool = False,
) -> Work:
    """SGD on one group through ``backend``; new momentum buffers are put into
    ``momentum_buffers``. Pass the returned ``Work`` back as ``work`` to reuse its plan."""
    if not params:
        return work
    work = _work(work, params, grads, {"momentum_buffer": list(momentum_buffers)}, steps,
                 master_params, param_indices)  # fmt: skip
    work.new_state_dtype = new_buffer_dtype or params[0].dtype
    created = backend.sgd(
        work,
        [SgdHyper(lr, float(momentum), float(dampening), hyper_value(weight_decay))],
        SgdFlags(momentum != 0, bool(nesterov), bool(maximize)),
        _context(grad_scale, found_inf, stochastic_rounding, seed, grad_coef, write_grads),
    )
    for i, buffer in enumerate(created):
        if buffer is not None:
            momentum_buffers[i] = buffer
    return work


def run_adam(
    backend,
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
    work: Work | None = None,
    master_params: list[Tensor] | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    param_indices: list[int] | None = None,
    grad_coef: Tensor | None = None,
    write_grads: bool = False,
) -> Work:
    """Adam on one group through ``backend`` (``steps`` already advanced). Pass the returned
    ``Work`` back as ``work`` to reuse its plan."""
    if not params:
        return work
    states = {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sq"] = max_exp_avg_sqs
    work = _work(work, params, grads, states, steps, master_params, param_indices)
    backend.adam(
        work,
        [AdamHyper(lr, float(beta1), float(beta2), float(eps), float(weight_decay))],
        AdamFlags(
            bool(amsgrad),
            bool(maximize),
            bool(decoupled_weight_decay),
            bool(capturable) or found_inf is not None,
        ),
        _context(grad_scale, found_inf, stochastic_rounding, seed, grad_coef, write_grads),
    )
    return work


def _context(grad_scale, found_inf, stochastic_rounding, seed, grad_coef, write_grads):
    return StepContext(grad_scale, found_inf, bool(stochastic_rounding), int(seed), grad_coef,
                       bool(write_grads))  # fmt: skip


def _work(work, params, grads, states, steps, masters, indices) -> Work:
    fresh = Work(
        params=list(params),
        grads=list(grads),
        states={key: list(column) for key, column in states.items()},
        groups=[0] * len(params),
        steps=list(steps or []),
        masters=list(masters or []),
        indices=list(indices) if indices is not None else [0] * len(params),
    )
    if work is not None:
        fresh.plan = work.plan
    return fresh
