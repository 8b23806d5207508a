"""Pure-torch reference backend: the oracle for kernel tests and the last-resort fallback.

Every backend in this package has the same two entry points with the same signatures:

``sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
maximize, cache)``

``adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
weight_decay, amsgrad, maximize, decoupled_weight_decay, capturable, cache)``

All lists hold real tensors (complex parameters arrive as ``torch.view_as_real`` views) of one
device and dtype. ``steps`` have already been incremented for this step. A ``None`` entry in
``momentum_buffers`` is a buffer that does not exist yet: the backend creates it, initialised to
the (decayed) gradient exactly as torch.optim does, and puts it into the list. ``lr`` is a Python
float or a one-element tensor on the parameters' device. ``cache`` is a dict the backend may keep
launch plans in.

The math here runs in fp32 for fp16/bf16 tensors (fp64 for fp64 tensors) and rounds once at the
store, which is what the fused kernels do, with torch.optim's for-loop order of operations.
"""

from __future__ import annotations

import torch
from torch import Tensor

NAME = "reference"
SUPPORTS_SPARSE = True


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math runs in for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lerp_(start: Tensor, end: Tensor, weight: float) -> Tensor:
    # torch.lerp's formula, evaluated in the caller's compute dtype.
    return start.lerp_(end, weight)


def sgd(
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
    cache: dict | None = None,
) -> None:
    for i, param in enumerate(params):
        grad = grads[i]
        ctype = compute_dtype(param.dtype)
        if grad.is_sparse:
            # Sparse gradients keep torch.optim's own sparse arithmetic.
            ctype = param.dtype
        p = param.to(ctype)
        g = grad.to(ctype)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            buf_store = momentum_buffers[i]
            if buf_store is None:
                buf = g.clone()
                momentum_buffers[i] = buf.to(grad.dtype)
            else:
                buf = buf_store.to(ctype).mul_(momentum).add_(g, alpha=1 - dampening)
                buf_store.copy_(buf)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        if isinstance(lr, Tensor):
            p = p.addcmul_(g.to_dense() if g.is_sparse else g, lr.to(ctype), value=-1)
        else:
            p = p.add_(g, alpha=-lr)
        param.copy_(p)


def adam(
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
    cache: dict | None = None,
) -> None:
    for i, param in enumerate(params):
        ctype = compute_dtype(param.dtype)
        p = param.to(ctype)
        g = grads[i].to(ctype)
        m = exp_avgs[i].to(ctype)
        v = exp_avg_sqs[i].to(ctype)
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled_weight_decay:
                # With a tensor lr, torch.optim computes this in the lr tensor's dtype.
                p = p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m = _lerp_(m, g, 1 - beta1)
        v = v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = steps[i]
        if capturable:
            step_f64 = step.to(device=param.device, dtype=torch.float64)
            bias_correction1: float | Tensor = 1 - beta1**step_f64
            bc2_sqrt: float | Tensor = (1 - beta2**step_f64).sqrt().to(ctype)
        else:
            step_value = step.item()
            bias_correction1 = 1 - beta1**step_value
            bc2_sqrt = (1 - beta2**step_value) ** 0.5
        if isinstance(lr, Tensor) and isinstance(bias_correction1, Tensor):
            bias_correction1 = bias_correction1.to(lr.dtype)
        step_size = lr / bias_correction1
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(ctype), v)
            max_exp_avg_sqs[i].copy_(vmax)
            denom = (vmax.sqrt() / bc2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
        if isinstance(step_size, Tensor):
            p = p.add_((m * -step_size.to(ctype)) / denom)
        else:
            p = p.addcdiv_(m, denom, value=-step_size)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        param.copy_(p)
