"""Pure-torch reference backend: the oracle for kernel tests and the last-resort fallback.

Implements the contract of ``backends.contract`` (``sgd(work, hypers, flags, context)`` and
``adam(...)``) one tensor at a time, each tensor with its own group's hyperparameters.

State tensors may have another dtype than their params (fp32 or bf16 states); each backend
reads and writes them in their own dtype. The math here runs in fp32 for fp16/bf16 tensors
(fp64 for fp64 tensors) and rounds once at the store, which is what the fused kernels do, with
torch.optim's for-loop order of operations. Every fp32 operation is correctly rounded on every
CPU (``correctly_rounded``: torch's own fp32 CPU sqrt is not, and whether its lerp, addcmul and
add(alpha=) fuse depends on the instruction set), so the kernels' fp32 results equal this
backend's bit for bit anywhere. The stochastic-rounding bits are the kernels' bits,
so both backends round the same fp32 value the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_optim.backends import compiled
from fused_optim.backends import correctly_rounded as cr
from fused_optim.backends.contract import AdamFlags, SgdFlags, StepContext, Work

NAME = "reference"
SUPPORTS_SPARSE = True


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math runs in for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


MASK32 = 0xFFFFFFFF


def _mul32(h, constant: int):
    """(h * constant) mod 2^32 for uint32 values held in int64 (no intermediate overflows)."""
    return ((h & 0xFFFF) * constant + ((((h >> 16) * constant) & 0xFFFF) << 16)) & MASK32


def mix32(h):
    """murmur3's 32-bit finalizer, as the Triton kernels compute it (ints or int64 tensors)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _memory_order_index(t: Tensor) -> Tensor:
    """Each element's position in the memory the kernels walk: ``t``'s own for a dense tensor,
    that of a dense copy laid out by ``empty_like`` otherwise (the launch plans' staging)."""
    index = torch.empty_like(t, dtype=torch.int64)
    count = t.numel()
    flat = index.as_strided((count,), (1,), index.storage_offset())
    flat.copy_(torch.arange(count, device=t.device))
    return index


def random_bits(seed: int, step: int, index: int, t: Tensor) -> Tensor:
    """The kernels' 32 random bits for every element of ``t`` (int64 holding uint32)."""
    key = mix32((int(seed) & MASK32) ^ 0x9E3779B9)
    key = mix32(key ^ (int(step) & MASK32))
    key = mix32(key ^ (int(index) & MASK32))
    offsets = _memory_order_index(t)
    return mix32(mix32(key ^ (offsets >> 32)) ^ (offsets & MASK32))


def _from_bits16(bits: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(dtype)


def round_stochastic(x: Tensor, bits: Tensor, dtype: torch.dtype) -> Tensor:
    """fp32 ``x`` rounded to bf16/fp16 up or down with probability proportional to proximity,
    bitwise as the kernels do it."""
    if dtype == torch.bfloat16:
        x_bits = x.view(torch.int32).to(torch.int64) & MASK32
        rounded = ((x_bits + (bits & 0xFFFF)) & MASK32) >> 16
        rounded = torch.where(x != x, (x_bits >> 16) | 0x40, rounded)
        return _from_bits16(rounded, dtype)
    nearest = x.to(torch.float16)
    nearest32 = nearest.to(torch.float32)
    nearest_bits = nearest.view(torch.int16).to(torch.int64) & 0xFFFF
    away_from_zero = nearest32.abs() < x.abs()
    other_bits = torch.where(away_from_zero, nearest_bits + 1, nearest_bits - 1) & 0xFFFF
    other32 = _from_bits16(other_bits, dtype).to(torch.float32)
    probability = (x - nearest32) / (other32 - nearest32)
    uniform = (bits >> 8).to(torch.float32) * (1.0 / 16777216.0)
    take_other = (x != nearest32) & (uniform < probability)
    return _from_bits16(torch.where(take_other, other_bits, nearest_bits), dtype)


class _Writer:
    """Stores results, or nothing at all when GradScaler found an inf/NaN (decided on the
    device: ``torch.where`` keeps the old values, no host sync)."""

    def __init__(self, found_inf: Tensor | None, device: torch.device):
        self.keep_old = None if found_inf is None else found_inf.to(device) != 0

    def __call__(self, destination: Tensor, value: Tensor) -> None:
        value = value.to(destination.dtype)
        if self.keep_old is not None:
            value = torch.where(self.keep_old, destination, value)
        destination.copy_(value)


def _prepared_grad(grad: Tensor, ctype, context: StepContext, write: _Writer) -> Tensor:
    """The gradient the update reads, in ``ctype``: unscaled (GradScaler), then clipped
    (``context.grad_coef``, as torch's ``grad.mul_(coef)``), and written back when the contract
    says so."""
    g = grad.to(ctype)
    written = context.grad_scale is not None
    if written:
        g = g / context.grad_scale.to(device=grad.device, dtype=ctype)
    if context.grad_coef is not None:
        coef = context.grad_coef.to(device=grad.device, dtype=ctype)
        g = (g.to(grad.dtype).to(ctype) * coef).to(grad.dtype).to(ctype)
        written = written or context.write_grads
    if written:
        write(grad, g)
    return g


def _clipped_sparse_grad(grad: Tensor, context: StepContext) -> Tensor:
    if context.grad_coef is None:
        return grad
    coef = context.grad_coef.to(grad.device)
    if context.write_grads:
        return grad.mul_(coef)
    return grad * coef


def _add_scaled(complex_arithmetic: bool):
    """torch's ``base.add(x, alpha=alpha)``: one fused multiply-add on real tensors; on complex
    ones (whose real views the kernels update) the product is rounded before the add."""
    if complex_arithmetic:
        return lambda base, x, alpha: base + x * alpha
    return lambda base, x, alpha: cr.fma(x, alpha, base)


def _write_param(write, param, master, p, stochastic_rounding, seed, step, index) -> None:
    if master is not None:
        write(master, p)
    if stochastic_rounding and param.dtype in (torch.bfloat16, torch.float16):
        step_value = float(step.item()) if isinstance(step, Tensor) else float(step)
        bits = random_bits(seed, int(step_value), index, param)
        p = round_stochastic(p.to(torch.float32), bits, param.dtype)
    write(param, p)


def _sparse_sgd(p, g, lr, momentum, dampening, nesterov, momentum_buffers, i) -> Tensor:
    """Sparse gradients keep torch.optim's own sparse arithmetic (weight decay is refused
    before this, as torch.optim refuses it)."""
    if momentum != 0:
        buf = momentum_buffers[i]
        if buf is None:
            buf = g.clone()
            momentum_buffers[i] = buf
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    if isinstance(lr, Tensor):
        return p.addcmul_(g.to_dense(), lr.to(p.dtype), value=-1)
    return p.add_(g, alpha=-lr)


def sgd(work: Work, hypers, flags: SgdFlags, context: StepContext) -> list[Tensor | None]:
    """SGD on every tensor of ``work`` (see ``backends.contract``); returns new momentum
    buffers. A step traced by torch.compile runs this code, untraced, in the custom op of
    ``backends.compiled`` (the compiler would round differently)."""
    if torch.compiler.is_compiling():
        return compiled.sgd(NAME, work, hypers, flags, context)
    params, grads = work.params, work.grads
    momentum_buffers = list(work.column("momentum_buffer")) or [None] * len(params)
    created: list[Tensor | None] = [None] * len(params)
    master_params, steps, param_indices = work.masters, work.steps, work.indices
    found_inf = context.found_inf
    stochastic_rounding, seed = context.stochastic_rounding, context.seed
    nesterov, maximize = flags.nesterov, flags.maximize
    add_scaled = _add_scaled(flags.complex_arithmetic)
    new_buffer_dtype = work.new_state_dtype
    for i, param in enumerate(params):
        hyper = hypers[work.groups[i]]
        lr, momentum, dampening, weight_decay = (
            hyper.lr, hyper.momentum if flags.momentum else 0.0, hyper.dampening,
            hyper.weight_decay,
        )  # fmt: skip
        grad = grads[i]
        write = _Writer(found_inf, param.device)
        ctype = compute_dtype(param.dtype)
        if grad.is_sparse:
            # Sparse gradients keep torch.optim's own sparse arithmetic.
            ctype = param.dtype
            g = _clipped_sparse_grad(grad, context)
        else:
            g = _prepared_grad(grad, ctype, context, write)
        master = master_params[i] if master_params else None
        p = (param if master is None else master).to(ctype, copy=True)
        if maximize:
            g = -g
        buffer_before = momentum_buffers[i]
        if g.is_sparse:
            p = _sparse_sgd(p, g, lr, momentum, dampening, nesterov, momentum_buffers, i)
            created[i] = momentum_buffers[i] if momentum_buffers[i] is not buffer_before else None
        else:
            if weight_decay != 0:
                g = add_scaled(g, p, weight_decay)
            if momentum != 0:
                buf_store = momentum_buffers[i]
                if buf_store is None:
                    buf = g.clone()
                    created[i] = buf.to(new_buffer_dtype or grad.dtype)
                else:
                    buf = buf_store.to(ctype)
                    buf = add_scaled(buf * momentum, g, 1 - dampening)
                    write(buf_store, buf)
                g = add_scaled(g, buf, momentum) if nesterov else buf
            # torch.optim: p.add_(g, alpha=-lr)
            p = add_scaled(p, g, -lr.to(ctype) if isinstance(lr, Tensor) else -lr)
        step = steps[i] if steps else 0
        index = param_indices[i] if param_indices else 0
        _write_param(write, param, master, p, stochastic_rounding, seed, step, index)
    return created


def launch_sgd(work: Work, buffers, new_buffers, hypers, flags: SgdFlags, context) -> None:
    """SGD for the custom op of ``backends.compiled``: ``buffers`` all allocated, those flagged
    in ``new_buffers`` start from this step's gradient (unless GradScaler skips it)."""
    if flags.momentum:
        new = new_buffers or [0] * len(buffers)
        work.states["momentum_buffer"] = [None if n else b for b, n in zip(buffers, new)]
    created = sgd(work, hypers, flags, context)
    found_inf = context.found_inf
    if any(t is not None for t in created) and (found_inf is None or not bool(found_inf)):
        for buffer, tensor in zip(buffers, created):
            if tensor is not None:
                buffer.copy_(tensor)


def launch_adam(work: Work, hypers, flags: AdamFlags, context: StepContext) -> None:
    """Adam/AdamW for the custom op of ``backends.compiled``."""
    adam(work, hypers, flags, context)


def adam(work: Work, hypers, flags: AdamFlags, context: StepContext) -> list[Tensor | None]:
    """Adam/AdamW on every tensor of ``work`` (see ``backends.contract``; traced by
    torch.compile, through the custom op of ``backends.compiled``)."""
    if torch.compiler.is_compiling():
        return compiled.adam(NAME, work, hypers, flags, context)
    params, grads, steps = work.params, work.grads, work.steps
    exp_avgs, exp_avg_sqs = work.column("exp_avg"), work.column("exp_avg_sq")
    max_exp_avg_sqs = work.column("max_exp_avg_sq")
    master_params, param_indices = work.masters, work.indices
    found_inf = context.found_inf
    stochastic_rounding, seed = context.stochastic_rounding, context.seed
    amsgrad, maximize = flags.amsgrad, flags.maximize
    decoupled_weight_decay = flags.decoupled_weight_decay
    add_scaled = _add_scaled(flags.complex_arithmetic)
    for i, param in enumerate(params):
        hyper = hypers[work.groups[i]]
        lr, beta1, beta2, eps = hyper.lr, hyper.beta1, hyper.beta2, hyper.eps
        weight_decay = hyper.weight_decay
        write = _Writer(found_inf, param.device)
        ctype = compute_dtype(param.dtype)
        master = master_params[i] if master_params else None
        p = (param if master is None else master).to(ctype, copy=True)
        g = _prepared_grad(grads[i], ctype, context, write)
        m = exp_avgs[i].to(ctype, copy=True)
        v = exp_avg_sqs[i].to(ctype, copy=True)
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled_weight_decay:
                # With a tensor lr, torch.optim computes this in the lr tensor's dtype.
                p = p * (1 - lr * weight_decay)
            else:
                g = add_scaled(g, p, weight_decay)
        m = cr.lerp(m, g, 1 - beta1)
        v = cr.fma(g * (1 - beta2), g, v * beta2)
        step = steps[i]
        if flags.tensor_bias_corrections or step.device.type != "cpu":
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
            write(max_exp_avg_sqs[i], vmax)
            denom = cr.sqrt(vmax) / bc2_sqrt + eps
        else:
            denom = cr.sqrt(v) / bc2_sqrt + eps
        neg_step_size = -step_size.to(ctype) if isinstance(step_size, Tensor) else -step_size
        # torch.optim: p.addcdiv_(m, denom, value=-step_size), i.e. p + (-step_size * m) / denom
        p = p + (m * neg_step_size) / denom
        write(exp_avgs[i], m)
        write(exp_avg_sqs[i], v)
        index = param_indices[i] if param_indices else 0
        _write_param(write, param, master, p, stochastic_rounding, seed, step, index)
    return [None] * len(params)
