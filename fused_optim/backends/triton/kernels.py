"""Triton kernels: one per algorithm, flags as ``tl.constexpr``, hyperparameters as runtime fp64.

Both kernels walk a launch plan (see ``plan.py``) so that ONE launch updates every tensor of a
(device, dtype) group:

* ``tensor_table`` (int64, ``TABLE_COLUMNS`` per tensor): data pointers of the param and up to
  three state tensors, the element count, and one auxiliary value (Adam: the step offset or the
  address of the step tensor; SGD: 1 when the momentum buffer is new this step).
* ``grad_table`` (int64, one per tensor): gradient data pointers. Gradients are re-allocated by
  every backward pass, so they live apart from the rest and are re-uploaded only when they move.
* ``block_table`` (int64 pairs): for every program, which tensor it works on and where its block
  starts.

Each element of param, grad and state is loaded once and stored once. The math runs in
``COMPUTE_DTYPE`` (fp32, or fp64 for fp64 tensors) and rounds once, at the store.
"""

import triton
import triton.language as tl

# Column layout of tensor_table.
COL_PARAM, COL_STATE0, COL_STATE1, COL_STATE2, COL_NUMEL, COL_AUX = range(6)
TABLE_COLUMNS = 6


@triton.jit
def _as_f64(x):
    # Runtime scalars arrive as fp64 when compiled and as Python floats when interpreted.
    return x * tl.full([], 1.0, tl.float64)


@triton.jit
def _sqrt(x):
    # Correctly rounded, like torch.sqrt (tl.sqrt is the fast approximation for fp32).
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _div(x, y):
    # Correctly rounded, like torch's division (fp32 "/" is approximate on GPUs).
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """Cast the fp32/fp64 result to the storage dtype, rounding to nearest even.

    fp32 -> bf16 is done on the bits: GPUs round to nearest even, but Triton's interpreter
    truncates, and the CPU tests must see the same numbers the GPU produces.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        quiet_nan = (bits >> 16) | 0x40
        bits16 = tl.where(x != x, quiet_nan, rounded).to(tl.uint16)
        return bits16.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _block_location(block_table, tensor_table, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_table + 2 * pid)
    start = tl.multiple_of(tl.load(block_table + 2 * pid + 1), BLOCK)
    row = tensor_table + tensor * 6
    numel = tl.load(row + 4)
    offsets = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offsets < numel
    full = start + BLOCK <= numel
    return tensor, row, offsets, mask, full


@triton.jit
def _pointer(table_entry, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    address = tl.load(table_entry)
    if ALIGNED:
        # Every address in the tables is 16-byte aligned (checked on the host): lets the
        # compiler use 16-byte vector loads and stores.
        address = tl.multiple_of(address, 16)
    return address.to(tl.pointer_type(DTYPE))


@triton.jit
def _load(pointers, mask, full):
    # Whole blocks load without a mask, so that they can be vectorised; the last block of a
    # tensor is masked.
    if full:
        value = tl.load(pointers)
    else:
        value = tl.load(pointers, mask=mask, other=0.0)
    return value


@triton.jit
def _store(pointers, value, mask, full):
    if full:
        tl.store(pointers, value)
    else:
        tl.store(pointers, value, mask=mask)


@triton.jit
def sgd_kernel(
    tensor_table,
    grad_table,
    block_table,
    lr_ptr,
    lr: tl.float64,
    momentum: tl.float64,
    dampening: tl.float64,
    weight_decay: tl.float64,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_FROM_POINTER: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """p <- p - lr * d, where g = (+/-)grad + weight_decay * p and d = g (no momentum),
    buf = momentum * buf + (1 - dampening) * g (buf = g when new), d = buf or g + momentum * buf."""
    tensor, row, offsets, mask, full = _block_location(block_table, tensor_table, BLOCK)
    param_ptr = _pointer(row + 0, PARAM_DTYPE, ALIGNED) + offsets
    grad_ptr = _pointer(grad_table + tensor, GRAD_DTYPE, ALIGNED) + offsets

    p = _load(param_ptr, mask, full).to(COMPUTE_DTYPE)
    g = _load(grad_ptr, mask, full).to(COMPUTE_DTYPE)
    if MAXIMIZE:
        g = -g
    wd64 = _as_f64(weight_decay)
    g = tl.where(wd64 != 0, tl.fma(p, wd64.to(COMPUTE_DTYPE), g), g)

    if HAS_MOMENTUM:
        buf_ptr = _pointer(row + 1, STATE_DTYPE, ALIGNED) + offsets
        # A new buffer holds uninitialised memory: it is not read, and tl.where discards it.
        new_buffer = tl.load(row + 5)
        is_new = new_buffer != 0
        old_buffer_mask = offsets < tl.load(row + 4) * (1 - new_buffer)
        buf = _load(buf_ptr, old_buffer_mask, full & (new_buffer == 0)).to(COMPUTE_DTYPE)
        mom = _as_f64(momentum).to(COMPUTE_DTYPE)
        one_minus_dampening = (1.0 - _as_f64(dampening)).to(COMPUTE_DTYPE)
        buf = tl.where(is_new, g, tl.fma(g, one_minus_dampening, buf * mom))
        _store(buf_ptr, _round_to(buf, STATE_DTYPE), mask, full)
        if NESTEROV:
            g = tl.fma(buf, mom, g)
        else:
            g = buf

    if LR_FROM_POINTER:
        lr64 = tl.load(lr_ptr).to(tl.float64)
    else:
        lr64 = _as_f64(lr)
    p = tl.fma(g, (-lr64).to(COMPUTE_DTYPE), p)
    _store(param_ptr, _round_to(p, PARAM_DTYPE), mask, full)


@triton.jit
def adam_kernel(
    tensor_table,
    grad_table,
    block_table,
    lr_ptr,
    lr: tl.float64,
    beta1: tl.float64,
    beta2: tl.float64,
    eps: tl.float64,
    weight_decay: tl.float64,
    base_step: tl.float64,
    base_bias_correction1: tl.float64,
    base_bias_correction2_sqrt: tl.float64,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    STEP_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED_WEIGHT_DECAY: tl.constexpr,
    LR_FROM_POINTER: tl.constexpr,
    LR_DTYPE: tl.constexpr,
    STEP_FROM_POINTER: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Adam (Kingma & Ba, as torch.optim computes it), AdamW when DECOUPLED_WEIGHT_DECAY:

    g = (+/-)grad [+ weight_decay * p unless decoupled]; p *= 1 - lr * weight_decay if decoupled
    m = lerp(m, g, 1 - beta1); v = beta2 * v + (1 - beta2) * g * g; vmax = max(vmax, v) (amsgrad)
    p += (-lr / (1 - beta1^t)) * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)
    """
    tensor, row, offsets, mask, full = _block_location(block_table, tensor_table, BLOCK)
    param_ptr = _pointer(row + 0, PARAM_DTYPE, ALIGNED) + offsets
    exp_avg_ptr = _pointer(row + 1, STATE_DTYPE, ALIGNED) + offsets
    exp_avg_sq_ptr = _pointer(row + 2, STATE_DTYPE, ALIGNED) + offsets
    grad_ptr = _pointer(grad_table + tensor, GRAD_DTYPE, ALIGNED) + offsets

    # Per-tensor scalars, in fp64 like torch.optim's host-side arithmetic. Tensors at the
    # group's step use the host's bias corrections (bitwise torch's); the others, and steps
    # read from device memory, compute beta^t here.
    b1 = _as_f64(beta1)
    b2 = _as_f64(beta2)
    wd64 = _as_f64(weight_decay)
    if STEP_FROM_POINTER:
        step = tl.load(_pointer(row + 5, STEP_DTYPE, False)).to(tl.float64)
        bias_correction1 = 1.0 - tl.exp2(step * tl.log2(b1))
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(b2)))
    else:
        step_offset = tl.load(row + 5).to(tl.float64)
        bias_correction1 = _as_f64(base_bias_correction1)
        bias_correction2_sqrt = _as_f64(base_bias_correction2_sqrt)
        if step_offset != 0:
            step = _as_f64(base_step) - step_offset
            bias_correction1 = 1.0 - tl.exp2(step * tl.log2(b1))
            bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(b2)))
    # The scalar math around lr runs in LR_DTYPE: fp64 for a float lr (torch.optim's host
    # arithmetic), the tensor's dtype for a tensor lr (torch.optim's tensor arithmetic).
    if LR_FROM_POINTER:
        lr_t = tl.load(lr_ptr).to(LR_DTYPE)
    else:
        lr_t = _as_f64(lr).to(LR_DTYPE)
    neg_step_size64 = (-_div(lr_t, bias_correction1.to(LR_DTYPE))).to(tl.float64)
    decay64 = (1.0 - lr_t * wd64.to(LR_DTYPE)).to(tl.float64)
    neg_step_size = neg_step_size64.to(COMPUTE_DTYPE)

    p = _load(param_ptr, mask, full).to(COMPUTE_DTYPE)
    g = _load(grad_ptr, mask, full).to(COMPUTE_DTYPE)
    m = _load(exp_avg_ptr, mask, full).to(COMPUTE_DTYPE)
    v = _load(exp_avg_sq_ptr, mask, full).to(COMPUTE_DTYPE)
    if MAXIMIZE:
        g = -g
    if DECOUPLED_WEIGHT_DECAY:
        p = p * decay64.to(COMPUTE_DTYPE)
    else:
        g = tl.where(wd64 != 0, tl.fma(p, wd64.to(COMPUTE_DTYPE), g), g)

    # torch.lerp(m, g, w): m + w * (g - m) for |w| < 0.5, else g - (1 - w) * (g - m).
    w = (1.0 - b1).to(COMPUTE_DTYPE)
    diff = g - m
    if w < 0.5:
        m = tl.fma(w, diff, m)
    else:
        m = tl.fma(w - 1.0, diff, g)
    # torch: v.mul_(beta2).addcmul_(g, g, value=1 - beta2), i.e. fma((1 - beta2) * g, g, v * beta2)
    v = tl.fma((1.0 - b2).to(COMPUTE_DTYPE) * g, g, v * b2.to(COMPUTE_DTYPE))

    if AMSGRAD:
        max_ptr = _pointer(row + 3, STATE_DTYPE, ALIGNED) + offsets
        vmax = _load(max_ptr, mask, full).to(COMPUTE_DTYPE)
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        _store(max_ptr, _round_to(vmax, STATE_DTYPE), mask, full)
        denom = _div(_sqrt(vmax), bias_correction2_sqrt.to(COMPUTE_DTYPE))
    else:
        denom = _div(_sqrt(v), bias_correction2_sqrt.to(COMPUTE_DTYPE))
    denom = denom + _as_f64(eps).to(COMPUTE_DTYPE)
    p = p + _div(neg_step_size * m, denom)

    _store(exp_avg_ptr, _round_to(m, STATE_DTYPE), mask, full)
    _store(exp_avg_sq_ptr, _round_to(v, STATE_DTYPE), mask, full)
    _store(param_ptr, _round_to(p, PARAM_DTYPE), mask, full)
