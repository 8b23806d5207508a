"""SGD: torch.optim.SGD's arguments, defaults, state and errors; the update in one fused pass."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizerMixin, real_view


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
        differentiable (bool): must be False (True raises ``NotImplementedError``).
            Default: False.
        fused (bool, optional): accepted for compatibility; no effect (the update is always
            fused). Default: None.
        backend (str, optional): ``None`` (auto: Triton on GPUs and under
            ``TRITON_INTERPRET=1``, the pure-torch reference otherwise), ``"triton"`` or
            ``"reference"``. Default: None.

    Math runs in fp32 for fp16/bf16/fp32 params (fp64 for fp64), rounded once at the store.
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
        self._setup_fused(backend, differentiable)

    def _prepare_group(self, index, group):
        collected = self._collect(index, group, sparse_error=None)
        if collected is not None and group["weight_decay"] != 0:
            if any(g.is_sparse for g in collected[1]):
                # torch.optim fails on this in the middle of its update; fail before it instead.
                raise RuntimeError(
                    "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
                )
        return collected

    def _update_group(self, group, params, grads, buckets):
        momentum = group["momentum"]
        lr = group["lr"]
        buffers: list[Tensor | None] = []
        if momentum != 0:
            buffers = [real_view(self.state[p].get("momentum_buffer")) for p in params]
        real_params = [real_view(p) for p in params]
        real_grads = [real_view(g) for g in grads]
        for bucket in buckets:
            bucket_buffers = bucket.take(buffers) if momentum != 0 else []
            bucket.backend.sgd(
                bucket.take(real_params),
                bucket.take(real_grads),
                bucket_buffers,
                lr=_lr_for(lr, real_params[bucket.indices[0]]),
                momentum=momentum,
                dampening=group["dampening"],
                weight_decay=_as_float(group["weight_decay"]),
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                cache=self._cache(bucket),
            )
            for i, buf in zip(bucket.indices, bucket_buffers):
                if buffers[i] is None:
                    p = params[i]
                    self.state[p]["momentum_buffer"] = (
                        torch.view_as_complex(buf) if p.is_complex() else buf
                    )


def _as_float(value: float | Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _lr_for(lr: float | Tensor, param: Tensor) -> float | Tensor:
    """A tensor lr on the params' device is read by the kernel; anything else becomes a float."""
    if isinstance(lr, Tensor):
        if lr.device == param.device:
            return lr.reshape(())
        return float(lr.item())
    return float(lr)
