"""fp32 arithmetic that rounds correctly on every CPU, in plain torch.

torch's own fp32 CPU ops do not round identically everywhere: its ``sqrt`` (vectorized through
SLEEF/MKL) is off by one ulp for about 0.6% of inputs on AVX2 machines and about 14% on AVX-512
machines, and whether ``lerp``, ``addcmul`` and ``add(alpha=...)`` fuse their multiply and add
depends on the instruction set ATen dispatched to. The fused kernels (Triton, C++, CUDA) compute
with IEEE operations, each correctly rounded, and with the fused multiply-adds spelled out.

These helpers give the same IEEE results in plain torch, independent of the CPU:

* :func:`sqrt` -- the correctly rounded square root of an fp32 tensor;
* :func:`fma` -- ``a * b + c`` with one rounding, for fp32 tensors;
* :func:`lerp` -- ATen's ``lerp`` formula with its fused multiply-add;
* :func:`mul`, :func:`div`, :func:`add`, :func:`sub` -- one rounding each.

Each evaluates in fp64 and rounds once to fp32. That is exact for +, -, *, / and sqrt: fp64
carries more than 2 x 24 + 2 bits, so rounding the fp64 result to fp32 gives the correctly
rounded fp32 result (double rounding is innocuous). fp64's own sqrt is not trusted either (torch
rounds it off by an ulp for about 1% of inputs on AVX-512): the fp32 result is checked against
the exact squares of its neighbouring midpoints and moved by one ulp if needed. The fma keeps
the exact product in fp64 and rounds the sum to odd (the exact error from TwoSum decides), after
which rounding to fp32 is correct.

fp64 tensors pass through torch's own ops unchanged (no exact fp64 fma exists in torch); only
fp32 gets the correctly rounded treatment. Scalars are first rounded to the tensor's dtype, as
torch does for a Python number combined with an fp32 tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["add", "applies_to", "div", "fma", "lerp", "mul", "sqrt", "sub"]


def applies_to(*values: Tensor | float) -> bool:
    """True if the tensors among ``values`` are fp32 (the dtype these helpers round for)."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    return bool(tensors) and all(t.dtype == torch.float32 for t in tensors)


def _wide(value: Tensor | float, like: Tensor) -> Tensor:
    """``value`` rounded to ``like``'s dtype (as torch rounds a scalar operand), then in fp64."""
    if isinstance(value, Tensor):
        return value.to(device=like.device).to(like.dtype).double()
    return torch.tensor(value, dtype=like.dtype, device=like.device).double()


def _first_tensor(*values: Tensor | float) -> Tensor:
    return next(v for v in values if isinstance(v, Tensor))


def _binary(op, a: Tensor | float, b: Tensor | float) -> Tensor:
    like = _first_tensor(a, b)
    if not applies_to(a, b):
        return op(a, b)
    return op(_wide(a, like), _wide(b, like)).to(like.dtype)


def add(a: Tensor | float, b: Tensor | float) -> Tensor:
    """``a + b``, rounded once."""
    return _binary(torch.add, a, b)


def sub(a: Tensor | float, b: Tensor | float) -> Tensor:
    """``a - b``, rounded once."""
    return _binary(torch.sub, a, b)


def mul(a: Tensor | float, b: Tensor | float) -> Tensor:
    """``a * b``, rounded once."""
    return _binary(torch.mul, a, b)


def div(a: Tensor | float, b: Tensor | float) -> Tensor:
    """``a / b``, rounded once (a true division, never a multiplication by a reciprocal)."""
    return _binary(torch.div, a, b)


def sqrt(x: Tensor) -> Tensor:
    """The correctly rounded square root (fp32; other dtypes use ``torch.sqrt``)."""
    if x.dtype != torch.float32:
        return torch.sqrt(x)
    wide = x.double()
    root = torch.sqrt(wide).float()  # within one ulp of the correctly rounded result
    ok = (wide > 0) & torch.isfinite(wide) & (root > 0)
    up = torch.nextafter(root, torch.full_like(root, torch.inf)).double()
    down = torch.nextafter(root, torch.zeros_like(root)).double()
    here = root.double()
    upper_mid = (here + up) * 0.5  # exact: 25 significant bits
    lower_mid = (here + down) * 0.5
    # Squares of 25-bit numbers are exact in fp64; sqrt(x) is never exactly a midpoint.
    result = torch.where(ok & (wide > upper_mid * upper_mid), up, here)
    result = torch.where(ok & (wide < lower_mid * lower_mid), down, result)
    return result.float()


def fma(a: Tensor | float, b: Tensor | float, c: Tensor | float) -> Tensor:
    """``a * b + c`` rounded once (fp32; other dtypes use torch's ``addcmul``)."""
    like = _first_tensor(a, b, c)
    if not applies_to(a, b, c):
        a, b, c = (torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in (a, b, c))
        return torch.addcmul(c, a, b)
    product = _wide(a, like) * _wide(b, like)  # exact: 48 significant bits
    addend = _wide(c, like)
    total = product + addend
    # TwoSum: the exact error of that addition.
    addend_part = total - product
    error = (product - (total - addend_part)) + (addend - addend_part)
    # Round to odd: an inexact sum whose last bit is even moves one ulp towards the exact value.
    even = (total.view(torch.int64) & 1) == 0
    inexact = (error != 0) & torch.isfinite(total)
    towards = torch.where(error > 0, torch.inf, -torch.inf).to(total.dtype)
    total = torch.where(inexact & even, torch.nextafter(total, towards), total)
    return total.to(like.dtype)


def lerp(start: Tensor, end: Tensor, weight: float) -> Tensor:
    """ATen's ``torch.lerp`` for a scalar weight, with its one fma: ``start + w * (end - start)``
    for ``|w| < 0.5``, else ``end - (1 - w) * (end - start)``; ``w`` is first rounded to
    ``start``'s dtype."""
    w = float(torch.tensor(weight, dtype=start.dtype))
    diff = sub(end, start)
    return fma(w, diff, start) if abs(w) < 0.5 else fma(w - 1.0, diff, end)
