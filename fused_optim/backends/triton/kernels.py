"""Triton kernels: one per algorithm, flags as ``tl.constexpr``, hyperparameters as data.

Both kernels walk the launch plan of ``backends/plan.py`` (its tensor, grad, block and
hyperparameter tables, with the column layout defined there) so that ONE launch updates every
tensor of a bucket, across param groups: each tensor's row names its group, and the group's row
of the hyperparameter table holds its lr, betas or momentum, eps, weight decay, base step and
bias corrections (fp64), or the address of a tensor lr the kernel reads on the device.

Each element of param (or master), grad and state is loaded once and stored once. The math runs
in ``COMPUTE_DTYPE`` (fp32, or fp64 for fp64 tensors) and rounds once, at the store. GradScaler's
unscale (``HAS_GRAD_SCALE``) and skip (``HAS_FOUND_INF``) happen in the same pass: a skipped
step stores nothing at all.
"""

import triton
import triton.language as tl

from .. import plan as layout

# The table layouts of backends/plan.py, as compile-time constants of the kernels.
ROW = tl.constexpr(layout.TABLE_COLUMNS)
COL_PARAM = tl.constexpr(layout.COL_PARAM)
COL_STATE0 = tl.constexpr(layout.COL_STATE0)
COL_STATE1 = tl.constexpr(layout.COL_STATE1)
COL_STATE2 = tl.constexpr(layout.COL_STATE2)
COL_MASTER = tl.constexpr(layout.COL_MASTER)
COL_NUMEL = tl.constexpr(layout.COL_NUMEL)
COL_STEP = tl.constexpr(layout.COL_STEP)
COL_NEW_BUFFER = tl.constexpr(layout.COL_NEW_BUFFER)
COL_INDEX = tl.constexpr(layout.COL_INDEX)
COL_STEP_IS_DOUBLE = tl.constexpr(layout.COL_STEP_IS_DOUBLE)
COL_GROUP = tl.constexpr(layout.COL_GROUP)
HYPER_ROW = tl.constexpr(layout.HYPER_COLUMNS)
HYPER_LR = tl.constexpr(layout.HYPER_LR)
HYPER_BETA1 = tl.constexpr(layout.HYPER_BETA1)
HYPER_BETA2 = tl.constexpr(layout.HYPER_BETA2)
HYPER_EPS = tl.constexpr(layout.HYPER_EPS)
HYPER_WEIGHT_DECAY = tl.constexpr(layout.HYPER_WEIGHT_DECAY)
HYPER_BASE_STEP = tl.constexpr(layout.HYPER_BASE_STEP)
HYPER_BIAS_CORRECTION1 = tl.constexpr(layout.HYPER_BIAS_CORRECTION1)
HYPER_BIAS_CORRECTION2_SQRT = tl.constexpr(layout.HYPER_BIAS_CORRECTION2_SQRT)
HYPER_LR_ADDRESS = tl.constexpr(layout.HYPER_LR_ADDRESS)


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
def _mix32(h):
    # murmur3's 32-bit finalizer: a bijection of uint32 in which every input bit flips about
    # half of the output bits. Written out in backends/reference.py too (bitwise the same).
    h = h ^ (h >> 16)
    h = h * tl.full([], 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full([], 0xC2B2AE35, tl.uint32)
    h = h ^ (h >> 16)
    return h


@triton.jit
def _random_bits(seed, step, index, start, offsets):
    """32 counter-based random bits per element: a hash of (seed, step, param index, element
    index). The same inputs give the same bits on every run, device and resume."""
    seed32 = (seed * tl.full([], 1, tl.int64)).to(tl.uint32)
    key = _mix32(seed32 ^ tl.full([], 0x9E3779B9, tl.uint32))
    key = _mix32(key ^ step.to(tl.int64).to(tl.uint32))
    key = _mix32(key ^ index.to(tl.uint32))
    # Blocks never straddle a 2^32 boundary (BLOCK divides it): the high word is per block.
    key = _mix32(key ^ (start >> 32).to(tl.uint32))
    return _mix32(key ^ offsets.to(tl.uint32))


@triton.jit
def _round_stochastic(x, bits, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to bf16/fp16 up or down, with probability proportional to proximity."""
    if DTYPE == tl.bfloat16:
        # Adding 16 random bits below the kept ones, then truncating, rounds up with
        # probability (dropped bits) / 2^16.
        x_bits = x.to(tl.uint32, bitcast=True)
        rounded = (x_bits + (bits & 0xFFFF)) >> 16
        quiet_nan = (x_bits >> 16) | 0x40
        bits16 = tl.where(x != x, quiet_nan, rounded).to(tl.uint16)
        return bits16.to(tl.bfloat16, bitcast=True)
    else:
        # fp16: take the nearest value, and move one ulp towards x with probability
        # |x - nearest| / ulp (at most 1/2), using 24 random bits.
        nearest = x.to(tl.float16)
        nearest32 = nearest.to(tl.float32)
        nearest_bits = nearest.to(tl.uint16, bitcast=True).to(tl.uint32)
        away_from_zero = tl.abs(nearest32) < tl.abs(x)
        other_bits = tl.where(away_from_zero, nearest_bits + 1, nearest_bits - 1)
        other32 = other_bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        probability = _div(x - nearest32, other32 - nearest32)
        uniform = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)
        take_other = (x != nearest32) & (uniform < probability)
        result_bits = tl.where(take_other, other_bits, nearest_bits).to(tl.uint16)
        return result_bits.to(tl.float16, bitcast=True)


@triton.jit
def _round_param(x, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, seed, step, row, start, offsets):
    if STOCHASTIC and (DTYPE == tl.bfloat16 or DTYPE == tl.float16):
        bits = _random_bits(seed, step, tl.load(row + COL_INDEX), start, offsets)
        return _round_stochastic(x.to(tl.float32), bits, DTYPE)
    else:
        return _round_to(x, DTYPE)


@triton.jit
def _block_location(
    block_table, tensor_table, found_inf_ptr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_table + 2 * pid)
    start = tl.multiple_of(tl.load(block_table + 2 * pid + 1), BLOCK)
    row = tensor_table + tensor * ROW
    numel = tl.load(row + COL_NUMEL)
    if HAS_FOUND_INF:
        # GradScaler found an inf/NaN: the block counts as empty, nothing is loaded or stored.
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    offsets = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offsets < numel
    full = start + BLOCK <= numel
    return tensor, row, start, offsets, mask, full, numel


@triton.jit
def _pointer(table_entry, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    pointer = tl.load(table_entry).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # Every address in the tables is 16-byte aligned (checked on the host): lets the
        # compiler use 16-byte vector loads and stores.
        pointer = tl.multiple_of(pointer, 16)
    return pointer


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
def _step_of(row, hyper, STEP_FROM_POINTER: tl.constexpr):
    """This tensor's step count (fp64): read from its step tensor (fp32 or fp64), or its
    group's base step minus the tensor's offset."""
    if STEP_FROM_POINTER:
        address = tl.load(row + COL_STEP)
        if tl.load(row + COL_STEP_IS_DOUBLE) != 0:
            step = tl.load(address.to(tl.pointer_type(tl.float64)))
        else:
            step = tl.load(address.to(tl.pointer_type(tl.float32))).to(tl.float64)
    else:
        step = tl.load(hyper + HYPER_BASE_STEP) - tl.load(row + COL_STEP).to(tl.float64)
    return step


@triton.jit
def _beta_power(beta, step):
    """``beta ** step`` (fp64) for a whole step count, as Python's float ``**`` gives it to
    torch.optim (to within the last bits: exp2 and log2 are not its pow), sign included: a
    negative beta (torch.optim checks betas only when the optimizer is built) to an odd power is
    negative, where exp2(step * log2(beta)) alone is NaN."""
    magnitude = tl.exp2(step * tl.log2(tl.abs(beta)))
    odd = step - 2.0 * tl.floor(step * 0.5) == 1.0
    return tl.where((beta < 0) & odd, -magnitude, magnitude)


@triton.jit
def _lr_of(hyper, hyper_bits, LR_FROM_POINTER: tl.constexpr, LR_DTYPE: tl.constexpr):
    """The group's lr in LR_DTYPE: read through the tensor lr's address, or from the table."""
    if LR_FROM_POINTER:
        lr = tl.load(tl.load(hyper_bits + HYPER_LR_ADDRESS).to(tl.pointer_type(LR_DTYPE)))
    else:
        lr = tl.load(hyper + HYPER_LR).to(LR_DTYPE)
    return lr


@triton.jit
def _load_grad(
    grad_ptr,
    mask,
    full,
    grad_scale_ptr,
    grad_coef_ptr,
    COMPUTE_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_GRAD_COEF: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    """The gradient in COMPUTE_DTYPE: unscaled (g / grad_scale) when GradScaler left the
    unscaling to the optimizer, then clipped (torch's ``grad.mul_(coef)``: the gradient rounded to
    its dtype times the coefficient's value, the product rounded to the grad's dtype), and
    written back with WRITE_GRAD (always with the unscale)."""
    g = _load(grad_ptr, mask, full).to(COMPUTE_DTYPE)
    if HAS_GRAD_SCALE:
        g = _div(g, tl.load(grad_scale_ptr).to(COMPUTE_DTYPE))
    if HAS_GRAD_COEF:
        coef = tl.load(grad_coef_ptr).to(COMPUTE_DTYPE)
        g = _round_to(g, GRAD_DTYPE).to(COMPUTE_DTYPE) * coef
        g = _round_to(g, GRAD_DTYPE).to(COMPUTE_DTYPE)
    if WRITE_GRAD:
        _store(grad_ptr, _round_to(g, GRAD_DTYPE), mask, full)
    return g


@triton.jit
def _add_scaled(base, x, alpha, COMPLEX_ARITHMETIC: tl.constexpr):
    """torch's ``base.add(x, alpha=alpha)``: one fma on real tensors; on complex ones (whose real
    views the kernel walks) the product is rounded before the add (launches disable fp fusion)."""
    if COMPLEX_ARITHMETIC:
        return base + x * alpha
    else:
        return tl.fma(x, alpha, base)


@triton.jit
def sgd_kernel(
    tensor_table,
    grad_table,
    block_table,
    hyper_table,
    hyper_bits,
    grad_scale_ptr,
    grad_coef_ptr,
    found_inf_ptr,
    seed: tl.int64,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    COMPLEX_ARITHMETIC: tl.constexpr,
    LR_FROM_POINTER: tl.constexpr,
    LR_DTYPE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_GRAD_COEF: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
    STEP_FROM_POINTER: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """p <- p - lr * d, where g = (+/-)grad + weight_decay * p and d = g (no momentum),
    buf = momentum * buf + (1 - dampening) * g (buf = g when new), d = buf or g + momentum * buf.

    With HAS_MASTER, p is the fp32 master weight and the param gets its rounded value."""
    tensor, row, start, offsets, mask, full, numel = _block_location(
        block_table, tensor_table, found_inf_ptr, HAS_FOUND_INF, BLOCK
    )
    group = tl.load(row + COL_GROUP)
    hyper = hyper_table + group * HYPER_ROW
    hyper_row_bits = hyper_bits + group * HYPER_ROW
    param_ptr = _pointer(row + COL_PARAM, PARAM_DTYPE, ALIGNED) + offsets
    grad_ptr = _pointer(grad_table + tensor, GRAD_DTYPE, ALIGNED) + offsets

    if HAS_MASTER:
        master_ptr = _pointer(row + COL_MASTER, tl.float32, ALIGNED) + offsets
        p = _load(master_ptr, mask, full).to(COMPUTE_DTYPE)
    else:
        p = _load(param_ptr, mask, full).to(COMPUTE_DTYPE)
    g = _load_grad(
        grad_ptr, mask, full, grad_scale_ptr, grad_coef_ptr, COMPUTE_DTYPE, GRAD_DTYPE,
        HAS_GRAD_SCALE, HAS_GRAD_COEF, WRITE_GRAD,
    )  # fmt: skip
    if MAXIMIZE:
        g = -g
    wd64 = tl.load(hyper + HYPER_WEIGHT_DECAY)
    g = tl.where(wd64 != 0, _add_scaled(g, p, wd64.to(COMPUTE_DTYPE), COMPLEX_ARITHMETIC), g)

    if HAS_MOMENTUM:
        buf_ptr = _pointer(row + COL_STATE0, STATE_DTYPE, ALIGNED) + offsets
        # A new buffer holds uninitialised memory: it is not read, and tl.where discards it.
        new_buffer = tl.load(row + COL_NEW_BUFFER)
        is_new = new_buffer != 0
        old_buffer_mask = offsets < numel * (1 - new_buffer)
        buf = _load(buf_ptr, old_buffer_mask, full & (new_buffer == 0)).to(COMPUTE_DTYPE)
        mom = tl.load(hyper + HYPER_BETA1).to(COMPUTE_DTYPE)
        one_minus_dampening = (1.0 - tl.load(hyper + HYPER_BETA2)).to(COMPUTE_DTYPE)
        buf = tl.where(
            is_new, g, _add_scaled(buf * mom, g, one_minus_dampening, COMPLEX_ARITHMETIC)
        )
        _store(buf_ptr, _round_to(buf, STATE_DTYPE), mask, full)
        if NESTEROV:
            g = _add_scaled(g, buf, mom, COMPLEX_ARITHMETIC)
        else:
            g = buf

    lr64 = _lr_of(hyper, hyper_row_bits, LR_FROM_POINTER, LR_DTYPE).to(tl.float64)
    p = _add_scaled(p, g, (-lr64).to(COMPUTE_DTYPE), COMPLEX_ARITHMETIC)
    if HAS_MASTER:
        _store(master_ptr, p, mask, full)
    step = 0.0
    if STOCHASTIC_ROUNDING:
        step = _step_of(row, hyper, STEP_FROM_POINTER)
    rounded = _round_param(p, PARAM_DTYPE, STOCHASTIC_ROUNDING, seed, step, row, start, offsets)
    _store(param_ptr, rounded, mask, full)


@triton.jit
def adam_kernel(
    tensor_table,
    grad_table,
    block_table,
    hyper_table,
    hyper_bits,
    grad_scale_ptr,
    grad_coef_ptr,
    found_inf_ptr,
    seed: tl.int64,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED_WEIGHT_DECAY: tl.constexpr,
    COMPLEX_ARITHMETIC: tl.constexpr,
    LR_FROM_POINTER: tl.constexpr,
    LR_DTYPE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_GRAD_COEF: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
    STEP_FROM_POINTER: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Adam (Kingma & Ba, as torch.optim computes it), AdamW when DECOUPLED_WEIGHT_DECAY:

    g = (+/-)grad [+ weight_decay * p unless decoupled]; p *= 1 - lr * weight_decay if decoupled
    m = lerp(m, g, 1 - beta1); v = beta2 * v + (1 - beta2) * g * g; vmax = max(vmax, v) (amsgrad)
    p += (-lr / (1 - beta1^t)) * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)

    With HAS_MASTER, p is the fp32 master weight and the param gets its rounded value.
    """
    tensor, row, start, offsets, mask, full, _ = _block_location(
        block_table, tensor_table, found_inf_ptr, HAS_FOUND_INF, BLOCK
    )
    group = tl.load(row + COL_GROUP)
    hyper = hyper_table + group * HYPER_ROW
    param_ptr = _pointer(row + COL_PARAM, PARAM_DTYPE, ALIGNED) + offsets
    exp_avg_ptr = _pointer(row + COL_STATE0, STATE_DTYPE, ALIGNED) + offsets
    exp_avg_sq_ptr = _pointer(row + COL_STATE1, STATE_DTYPE, ALIGNED) + offsets
    grad_ptr = _pointer(grad_table + tensor, GRAD_DTYPE, ALIGNED) + offsets

    # Per-tensor scalars, in fp64 like torch.optim's host-side arithmetic. Tensors at their
    # group's base step use the host's bias corrections (bitwise torch's); the others, and
    # steps read from device memory, compute beta^t here.
    b1 = tl.load(hyper + HYPER_BETA1)
    b2 = tl.load(hyper + HYPER_BETA2)
    wd64 = tl.load(hyper + HYPER_WEIGHT_DECAY)
    step = _step_of(row, hyper, STEP_FROM_POINTER)
    if STEP_FROM_POINTER:
        bias_correction1 = 1.0 - _beta_power(b1, step)
        bias_correction2_sqrt = tl.sqrt(1.0 - _beta_power(b2, step))
    else:
        bias_correction1 = tl.load(hyper + HYPER_BIAS_CORRECTION1)
        bias_correction2_sqrt = tl.load(hyper + HYPER_BIAS_CORRECTION2_SQRT)
        if step != tl.load(hyper + HYPER_BASE_STEP):
            bias_correction1 = 1.0 - _beta_power(b1, step)
            bias_correction2_sqrt = tl.sqrt(1.0 - _beta_power(b2, step))
    # The scalar math around lr runs in LR_DTYPE: fp64 for a float lr (torch.optim's host
    # arithmetic), the tensor's dtype for a tensor lr (torch.optim's tensor arithmetic).
    lr_t = _lr_of(hyper, hyper_bits + group * HYPER_ROW, LR_FROM_POINTER, LR_DTYPE)
    if LR_DTYPE == tl.bfloat16 or LR_DTYPE == tl.float16:
        # torch's bf16/fp16 tensor arithmetic: each operation in fp32, rounded to the lr's dtype.
        lr32 = lr_t.to(tl.float32)
        step_size = _round_to(tl.div_rn(lr32, bias_correction1.to(tl.float32)), LR_DTYPE)
        neg_step_size64 = -(step_size.to(tl.float64))
        product = _round_to(lr32 * wd64.to(tl.float32), LR_DTYPE).to(tl.float32)
        decay64 = _round_to(1.0 - product, LR_DTYPE).to(tl.float64)
    else:
        neg_step_size64 = (-_div(lr_t, bias_correction1.to(LR_DTYPE))).to(tl.float64)
        decay64 = (1.0 - lr_t * wd64.to(LR_DTYPE)).to(tl.float64)
    neg_step_size = neg_step_size64.to(COMPUTE_DTYPE)

    if HAS_MASTER:
        master_ptr = _pointer(row + COL_MASTER, tl.float32, ALIGNED) + offsets
        p = _load(master_ptr, mask, full).to(COMPUTE_DTYPE)
    else:
        p = _load(param_ptr, mask, full).to(COMPUTE_DTYPE)
    g = _load_grad(
        grad_ptr, mask, full, grad_scale_ptr, grad_coef_ptr, COMPUTE_DTYPE, GRAD_DTYPE,
        HAS_GRAD_SCALE, HAS_GRAD_COEF, WRITE_GRAD,
    )  # fmt: skip
    m = _load(exp_avg_ptr, mask, full).to(COMPUTE_DTYPE)
    v = _load(exp_avg_sq_ptr, mask, full).to(COMPUTE_DTYPE)
    if MAXIMIZE:
        g = -g
    if DECOUPLED_WEIGHT_DECAY:
        p = p * decay64.to(COMPUTE_DTYPE)
    else:
        g = tl.where(wd64 != 0, _add_scaled(g, p, wd64.to(COMPUTE_DTYPE), COMPLEX_ARITHMETIC), g)

    # torch.lerp(m, g, w): m + w * (g - m) for |w| < 0.5, else g - (1 - w) * (g - m).
    w = (1.0 - b1).to(COMPUTE_DTYPE)
    diff = g - m
    if tl.abs(w) < 0.5:
        m = tl.fma(w, diff, m)
    else:
        m = tl.fma(w - 1.0, diff, g)
    # torch: v.mul_(beta2).addcmul_(g, g, value=1 - beta2), i.e. fma((1 - beta2) * g, g, v * beta2)
    v = tl.fma((1.0 - b2).to(COMPUTE_DTYPE) * g, g, v * b2.to(COMPUTE_DTYPE))

    if AMSGRAD:
        max_ptr = _pointer(row + COL_STATE2, STATE_DTYPE, ALIGNED) + offsets
        vmax = _load(max_ptr, mask, full).to(COMPUTE_DTYPE)
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        _store(max_ptr, _round_to(vmax, STATE_DTYPE), mask, full)
        denom = _div(_sqrt(vmax), bias_correction2_sqrt.to(COMPUTE_DTYPE))
    else:
        denom = _div(_sqrt(v), bias_correction2_sqrt.to(COMPUTE_DTYPE))
    denom = denom + tl.load(hyper + HYPER_EPS).to(COMPUTE_DTYPE)
    p = p + _div(neg_step_size * m, denom)

    _store(exp_avg_ptr, _round_to(m, STATE_DTYPE), mask, full)
    _store(exp_avg_sq_ptr, _round_to(v, STATE_DTYPE), mask, full)
    if HAS_MASTER:
        _store(master_ptr, p, mask, full)
    rounded = _round_param(p, PARAM_DTYPE, STOCHASTIC_ROUNDING, seed, step, row, start, offsets)
    _store(param_ptr, rounded, mask, full)


@triton.jit
def norm_kernel(
    pointer_table,
    block_table,
    partials,
    grad_scale_ptr,
    counter,
    first_partial,
    num_partials,
    total_out,
    coef_out,
    GRAD_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    KIND: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    OPMATH_DTYPE: tl.constexpr,
    COEF: tl.constexpr,
    FINAL_BLOCK: tl.constexpr,
):
    """A gradient norm in one pass, finished by its last program (``backends.clip``).

    Each program reduces one block of a gradient in fp64: the sum of squares (KIND 0) or of
    absolute values (1), or the largest absolute value, NaN if any is NaN (3), of the gradient
    (unscaled first with HAS_GRAD_SCALE, rounded to its dtype as GradScaler writes it), and
    stores it at ``partials[first_partial + pid]``. ``block_table`` rows: (tensor, start,
    numel), then one row whose first entry holds max_norm's fp64 bits; ``pointer_table``: each
    tensor's address. A norm over gradients of several dtypes is one launch per dtype, their
    programs numbered on from each other's (``first_partial``; ``num_partials`` in all).

    The program that increments ``counter`` last (launches run in stream order, so it is in
    the last launch) combines the partials in index order, FINAL_BLOCK lanes at a time (a fixed
    order: two runs give the same bits; no atomics on the values), stores the fp64 result at
    ``partials[num_partials]``, the norm (the square root of the sum for KIND 0) rounded to
    OUT_DTYPE (through fp32, as torch converts fp64) at ``total_out`` and, with COEF, torch's
    clipping coefficient ``clamp(max_norm / (total + 1e-6), max=1)`` at ``coef_out`` (held in
    OPMATH_DTYPE): torch computes ``max_norm / x`` as ``x.reciprocal() * max_norm``, each
    operation in OPMATH_DTYPE and rounded to OUT_DTYPE. It then sets ``counter`` back to 0 for
    the next norm."""
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_table + 3 * pid)
    start = tl.load(block_table + 3 * pid + 1)
    numel = tl.load(block_table + 3 * pid + 2)
    offsets = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offsets < numel
    g = tl.load(_pointer(pointer_table + tensor, GRAD_DTYPE, False) + offsets, mask=mask, other=0)
    g = g.to(COMPUTE_DTYPE)
    if HAS_GRAD_SCALE:
        g = _round_to(_div(g, tl.load(grad_scale_ptr).to(COMPUTE_DTYPE)), GRAD_DTYPE)
    x = tl.abs(g.to(tl.float64))
    if KIND == 0:
        partial = tl.sum(x * x, axis=0)
    elif KIND == 1:
        partial = tl.sum(x, axis=0)
    else:
        any_nan = tl.sum((x != x).to(tl.int32), axis=0) > 0
        largest = tl.max(tl.where(mask, x, 0.0), axis=0)
        partial = tl.where(any_nan, float("nan"), largest)
    tl.store(partials + first_partial + pid, partial)
    # Every thread's part of the store is done before the ticket releases it to the finisher.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    if ticket == num_partials - 1:
        lanes = tl.arange(0, FINAL_BLOCK)
        acc = tl.zeros([FINAL_BLOCK], dtype=tl.float64)
        nans = tl.zeros([FINAL_BLOCK], dtype=tl.int32)
        for first in range(0, num_partials, FINAL_BLOCK):
            index = first + lanes
            v = tl.load(partials + index, mask=index < num_partials, other=0.0, volatile=True)
            if KIND == 3:
                nans += (v != v).to(tl.int32)
                acc = tl.maximum(acc, tl.where(v != v, 0.0, v))
            else:
                acc += v
        if KIND == 3:
            combined = tl.where(tl.sum(nans, axis=0) > 0, float("nan"), tl.max(acc, axis=0))
        else:
            combined = tl.sum(acc, axis=0)
        tl.store(partials + num_partials, combined)
        total = tl.sqrt(combined) if KIND == 0 else combined
        if OUT_DTYPE != tl.float64:
            total = _round_to(total.to(tl.float32), OUT_DTYPE)
        tl.store(total_out, total)
        if COEF:
            max_norm = tl.load(block_table + 3 * tl.num_programs(0)).to(tl.float64, bitcast=True)
            t = total.to(OPMATH_DTYPE)
            shifted = _round_to(t + tl.full([], 1e-6, OPMATH_DTYPE), OUT_DTYPE).to(OPMATH_DTYPE)
            one = tl.full([], 1.0, OPMATH_DTYPE)
            inverse = _round_to(_div(one, shifted), OUT_DTYPE).to(OPMATH_DTYPE)
            coef = _round_to(inverse * max_norm.to(OPMATH_DTYPE), OUT_DTYPE).to(OPMATH_DTYPE)
            tl.store(coef_out, tl.where(coef > 1.0, one, coef))
        tl.store(counter, 0)
