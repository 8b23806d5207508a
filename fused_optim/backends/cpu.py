"""Fused C++ CPU backend: one call per bucket and step, one OpenMP parallel region.

Implements the contract of ``backends.contract``: one call covers a bucket's tensors across
param groups (each tensor's group indexes the hyperparameter table of ``backends.plan``). The
kernels are the compiled extension ``fused_optim._C_cpu`` (csrc/cpu, with the per-element math
of csrc/math/update.h),
registered as the operators ``torch.ops.fused_optim.sgd_`` and ``torch.ops.fused_optim.adam_``
(mutable tensor-list schemas with fake implementations, so that torch.compile can trace them).
``pip install`` builds it against the torch installed in the target environment (with or
without build isolation); without it this backend reports itself unavailable with the original
import error.

The kernel walks every tensor in its param's memory order in 16K-element chunks, all chunks of
all tensors in one parallel loop; the update math runs in fp32 (fp64 for fp64 params) and rounds
once at the store, with torch.optim's operation order, like the Triton kernels. AVX-512 and
AVX2+FMA builds of the kernels are chosen at run time on CPUs that have them (``cpu_isa()`` says
which runs, ``supported_isas()`` which could; ``FUSED_OPTIM_CPU_ISA=base|avx2|avx512`` forces
one). Every build gives the same bits: IEEE operations, each correctly rounded, with the fmas
spelled out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import compiled
from . import plan as plans
from .contract import AdamFlags, SgdFlags, StepContext, Work

NAME = "cpu"
SUPPORTS_SPARSE = False

try:
    from .. import _C_cpu

    _IMPORT_ERROR: BaseException | None = None
except ImportError as error:  # pragma: no cover - depends on the build
    _IMPORT_ERROR = error

__all__ = [
    "ISAS",
    "NAME",
    "SUPPORTS_SPARSE",
    "adam",
    "cpu_isa",
    "grad_norm",
    "is_available",
    "set_isa",
    "sgd",
    "supported_isas",
]

#: Every kernel build the extension has, in order of preference (last is best).
ISAS: tuple[str, ...] = ("base", "avx2", "avx512")


def is_available(device: torch.device) -> tuple[bool, str]:
    """Whether this backend can update tensors on ``device``, and why not if it cannot."""
    if _IMPORT_ERROR is not None:
        return False, (
            f"the C++ CPU extension fused_optim._C_cpu is not built ({_IMPORT_ERROR!r}). "
            "It builds when torch is installed before fused_optim and a C++ compiler works: "
            "reinstall with `pip install -v --force-reinstall --no-deps --no-cache-dir "
            "<fused_optim or its source folder>` (-v shows why a build fails)"
        )
    if torch.device(device).type != "cpu":
        return False, f"it runs on CPU tensors only (got {torch.device(device).type!r})"
    return True, ""


def cpu_isa() -> str:
    """The kernel build in use: ``"avx512"`` (AVX-512 F+BW+VL+DQ), ``"avx2"`` (AVX2+FMA+F16C) or
    ``"base"`` (x86-64 baseline, or portable C++ elsewhere). ``FUSED_OPTIM_CPU_ISA=base|avx2|
    avx512`` forces one (an error at the first step if this CPU cannot run it); unset or
    ``auto``, the best one this CPU supports."""
    return torch.ops.fused_optim.cpu_isa()


def set_isa(isa: str) -> str:
    """Switch the kernel build this process uses (one this CPU can run, or ``"auto"``); returns
    the previous one. For benchmarks and tests that compare builds; every build gives the same
    bits."""
    return torch.ops.fused_optim.cpu_set_isa(isa)


def supported_isas() -> list[str]:
    """The kernel builds (of :data:`ISAS`) this CPU can run, in order of preference."""
    return list(torch.ops.fused_optim.cpu_supported_isas())


if _IMPORT_ERROR is None:

    @torch.library.register_fake("fused_optim::sgd_")
    def _sgd_fake(*args, **kwargs) -> None:
        return None

    @torch.library.register_fake("fused_optim::adam_")
    def _adam_fake(*args, **kwargs) -> None:
        return None


class _HostStep:
    """The compiled per-step path of one bucket (``contract.HostStep``): the extension's
    ``HostPlan`` holds the bucket's tensors and tasks; each step it reads the grads from the
    params, checks every tensor's signature, and runs the kernel. No tensor list crosses from
    Python."""

    def __init__(self, host, tensor_lr: bool):
        self.host = host
        self.tensor_lr = tensor_lr  # its value can change in place: read it every step
        self.hypers: list | None = None
        self.table: Tensor | None = None
        self.check = host.check

    def run(self, hypers, context: StepContext) -> None:
        # The optimizer hands the same list while no group value changed.
        if hypers is not self.hypers or self.tensor_lr:
            self.table = _hyper_table(hypers)
            self.hypers = hypers
        self.host.run(
            self.table, context.grad_scale, context.found_inf, context.grad_coef,
            context.write_grads,
        )  # fmt: skip


def host_step(work: Work, hypers, flags, context: StepContext) -> _HostStep | None:
    """The bucket's compiled host path, or None where it does not apply (views, new momentum
    buffers, params or states the kernel cannot walk in place)."""
    if _IMPORT_ERROR is not None or not work.own_params:
        return None
    adam = isinstance(flags, AdamFlags)
    if adam:
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 3 if flags.amsgrad else 2]
    else:
        keys = ("momentum_buffer",) if flags.momentum else ()
    states = [list(work.states[key]) for key in keys]
    if any(t is None for column in states for t in column):
        return None
    lr = hypers[0].lr  # the optimizer buckets groups by the kind of their lr
    host = _C_cpu.HostPlan.create(
        work.params,
        states,
        work.masters,
        work.steps if adam or context.stochastic_rounding else [],
        work.groups,
        work.indices,
        adam,
        flags.amsgrad if adam else flags.momentum,
        flags.maximize,
        flags.decoupled_weight_decay if adam else flags.nesterov,
        flags.tensor_bias_corrections if adam else False,
        _lr_kind(hypers),
        context.stochastic_rounding,
        _seed(context.seed),
    )
    return None if host is None else _HostStep(host, isinstance(lr, Tensor))


def grad_norm(grads: list[Tensor], kind: int, norm_type: float, grad_scale) -> Tensor:
    """One pass over ``grads`` for a gradient norm (``backends.clip``): the fp64 sum of |g|^p
    (or the largest |g|, by ``kind``) of the unscaled gradients, as a 0-dim CPU tensor, in an
    order that depends on neither the thread count nor the kernel build."""
    return torch.ops.fused_optim.grad_norm(grads, kind, norm_type, grad_scale)


def _hyper_table(hypers) -> Tensor:
    """The bucket's hyperparameter table (``backends.plan`` layout; a tensor lr is read here,
    as a CPU tensor it costs no sync). Traced by torch.compile, built by tensor operations, so
    that the group values stay graph inputs (``plan.hyper_tensor``)."""
    if torch.compiler.is_compiling():
        return plans.hyper_tensor(hypers)
    rows, _ = plans.hyper_rows(hypers, [0.0] * len(hypers))
    return plans.hyper_host_table(rows, None)


_LR_KINDS = {torch.float64: 0, torch.bfloat16: 2, torch.float16: 3}


def _lr_kind(hypers) -> int:
    """How the kernel rounds the scalar math around lr (csrc/cpu/ops.cpp's LrKind): fp64 for a
    float lr, the tensor's dtype for a tensor lr (fp32 also for an integer one, which torch
    promotes to the default float dtype). The optimizer buckets groups by the kind of their
    lr, so the first group's holds for the call."""
    lr = hypers[0].lr
    return _LR_KINDS.get(lr.dtype, 1) if isinstance(lr, Tensor) else 0


def _seed(seed: int) -> int:
    return int(seed) & 0xFFFFFFFF


def sgd(work: Work, hypers, flags: SgdFlags, context: StepContext) -> list[Tensor | None]:
    """SGD on every tensor of ``work`` in one call (see ``backends.contract``)."""
    params = work.params
    created: list[Tensor | None] = [None] * len(params)
    if not params:
        return created
    new_flags = [0] * len(params)
    buffers: list[Tensor] = []
    if flags.momentum and torch.compiler.is_compiling():
        column = work.column("momentum_buffer")
        created, buffers, new_flags = compiled.new_buffers(params, column, work.new_state_dtype)
    elif flags.momentum:
        buffers = list(work.column("momentum_buffer"))
        for i, buf in enumerate(buffers):
            if buf is None:
                dtype = work.new_state_dtype or params[i].dtype
                created[i] = buffers[i] = torch.empty_like(params[i], dtype=dtype)
                new_flags[i] = 1
        if any(new_flags) and context.found_inf is not None and bool(context.found_inf):
            return created  # a skipped step: the new buffers are discarded by the optimizer
    torch.ops.fused_optim.sgd_(
        params,
        work.grads,
        buffers,
        new_flags,
        work.steps if context.stochastic_rounding else [],
        work.masters,
        _hyper_table(hypers),
        work.groups,
        flags.momentum,
        flags.nesterov,
        flags.maximize,
        flags.complex_arithmetic,
        context.grad_scale,
        context.found_inf,
        context.stochastic_rounding,
        _seed(context.seed),
        work.indices,
        context.grad_coef,
        context.write_grads,
    )
    return created


def adam(work: Work, hypers, flags: AdamFlags, context: StepContext) -> list[Tensor | None]:
    """Adam/AdamW on every tensor of ``work`` in one call (see ``backends.contract``)."""
    params = work.params
    if not params:
        return []
    torch.ops.fused_optim.adam_(
        params,
        work.grads,
        work.states["exp_avg"],
        work.states["exp_avg_sq"],
        work.states["max_exp_avg_sq"] if flags.amsgrad else [],
        work.steps,
        work.masters,
        _hyper_table(hypers),
        work.groups,
        _lr_kind(hypers),
        flags.amsgrad,
        flags.maximize,
        flags.decoupled_weight_decay,
        flags.tensor_bias_corrections,
        flags.complex_arithmetic,
        context.grad_scale,
        context.found_inf,
        context.stochastic_rounding,
        _seed(context.seed),
        work.indices,
        context.grad_coef,
        context.write_grads,
    )
    return [None] * len(params)
