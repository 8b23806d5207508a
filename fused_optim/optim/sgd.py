"""SGD: torch.optim.SGD's arguments, defaults, state and errors; the update in one fused pass."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..backends.contract import SGD_STATE_KEYS, SgdFlags, SgdHyper, hyper_value, lr_argument
from ._base import FusedOptimizerMixin, Precision


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    r"""Stochastic gradient descent (optionally with momentum), fused.

    A drop-in replacement for :class:`torch.optim.SGD`: same arguments, defaults, errors, state
    (``momentum_buffer``) and ``state_dict`` format. For each parameter with a gradient:

    .. code-block:: text

        g = -grad if maximize else grad
        g = g + weight_decay * p                             (if weight_decay != 0)
        if momentum != 0:
            buf = g                                          (first step)
            buf = momentum * buf + (1 - dampening) * g       (later steps)
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g

    Args:
        params: iterable of parameters, named parameters or param-group dicts.
        lr (float or 1-element Tensor): learning rate. Default: 1e-3.
        momentum (float): momentum factor. Default: 0.
        dampening (float): dampening for momentum. Default: 0.
        weight_decay (float or Tensor): L2 penalty. Default: 0.
        nesterov (bool): Nesterov momentum. Default: False.
        maximize (bool): maximize the objective instead of minimizing. Default: False.
        foreach (bool, optional): accepted for compatibility; no effect. Default: None.
        differentiable (bool): run torch.optim's own step (the parent class's), which autograd
            can differentiate through, instead of the fused kernels; not combined with
            ``backend`` or the precision modes (``ValueError``). Default: False.
        fused (bool, optional): accepted for compatibility; no effect (the update is always
            fused). Default: None.
        backend (str, optional): ``None`` (auto: the C++ ``"cpu"`` backend for CPU tensors
            when built, Triton on GPUs; see :class:`fused_optim.Adam`), or exactly one of
            ``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"``. Default: None.
        state_dtype (torch.dtype, optional): dtype of new optimizer states for fp32, bf16 and
            fp16 params: ``torch.float32`` (fp32 states for bf16/fp16 params), ``torch.bfloat16``
            or ``torch.float16``. ``None`` keeps torch.optim's rule (the param's dtype).
            Default: None.
        master_weights (bool): keep an fp32 copy of every bf16/fp16 param in its state
            (``"master_param"``); the update runs on the copy and writes its rounded value to
            the param in the same pass. Default: False.
        stochastic_rounding (bool): round bf16/fp16 param writes up or down at random, with
            probability proportional to proximity, so that updates below the dtype's resolution
            are kept on average. The bits are a hash of (``seed``, step, the param's index, the
            element's index): reruns and resumes give the same result. Default: False.
        seed (int): seed of the stochastic rounding. Default: 0.
        max_grad_norm (float, optional): clip the gradients' total 2-norm to this value at
            every step, inside the update (see :meth:`clip_grad_norm_`); the norm is taken of
            the unscaled gradients under GradScaler and kept in ``last_grad_norm``.
            ``None``: no automatic clipping. Default: None.
        write_clipped_grads (bool): also write the clipped gradients back into ``.grad`` (by
            default the update reads them clipped and leaves ``.grad`` as it was, unless
            GradScaler's unscale writes it back anyway). Default: False.

    Math runs in fp32 for fp16/bf16/fp32 params (fp64 for fp64), rounded once at the store.
    With ``stochastic_rounding``, the state also holds a ``step`` count (it keys the random bits).
    Under ``torch.amp.GradScaler`` the kernel unscales the gradients (writing them back) and a
    step with ``found_inf`` set changes nothing; see :meth:`step`.
    Sparse gradients are supported as in torch.optim, through the reference backend.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        max_grad_norm: float | None = None,
        write_clipped_grads: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._setup_fused(
            backend,
            differentiable,
            Precision(state_dtype, master_weights, stochastic_rounding, seed),
            max_grad_norm,
            write_clipped_grads,
        )

    ALGORITHM = "sgd"
    _created_key = "momentum_buffer"

    def _state_keys(self, group):
        keys = ("momentum_buffer",) if group["momentum"] != 0 else ()
        # Stochastic rounding needs a step count: the random bits change every step.
        return (*keys, *self._precision_keys(with_step=self._precision.stochastic_rounding))

    def _bucket_state_keys(self, flags: SgdFlags) -> tuple[str, ...]:
        return SGD_STATE_KEYS if flags.momentum else ()

    def _check_group(self, group, grads, sparse):
        if sparse and group["weight_decay"] != 0:
            # torch.optim fails on this in the middle of its update; fail before it instead.
            raise RuntimeError(
                "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
            )
        lr = group["lr"]
        if torch.compiler.is_compiling():
            return
        # torch.optim's update, param.add_(grad, alpha=-lr): its TypeError for an lr that is
        # not a number, or a tensor of several elements.
        if not isinstance(lr, Tensor):
            _ = -lr
        elif lr.numel() != 1:
            torch.zeros(1).add_(torch.zeros(1), alpha=-lr.cpu())

    def _init_state(self, group: dict, p: Tensor) -> dict:
        # As torch.optim: state entries exist only with momentum (or a precision mode that
        # needs state), and momentum buffers on first use (the backend creates them).
        state = self.state[p]
        self._init_common_state(group, p, state, self._precision.stochastic_rounding)
        return state

    def _hyper(self, group: dict) -> SgdHyper:
        return SgdHyper(
            lr_argument(group["lr"]),
            hyper_value(group["momentum"]),
            hyper_value(group["dampening"]),
            hyper_value(group["weight_decay"]),
        )

    def _flags(self, group: dict) -> SgdFlags:
        return SgdFlags(group["momentum"] != 0, bool(group["nesterov"]), bool(group["maximize"]))
