"""fp32 arithmetic that rounds correctly on every CPU, in plain torch.

torch's own fp32 CPU ops do not round identically everywhere: its ``sqrt`` (vectorized through
SLEEF/MKL) is off by one ulp for about 0.6% of inputs on AVX2 machines and about 14% on AVX-512
machines, and whether ``lerp``, ``addcmul`` and ``add(alpha=...)`` fuse their multiply and add
depends on the instruction set ATen dispatched to. The fused kernels (Triton, C++, CUDA) compute
with IEEE operations, each correctly rounded, and with the fused multiply-adds spelled out.
(``+``, ``-``, ``*`` and ``/`` on fp32 tensors are the hardware's IEEE operations in torch on
every CPU, a Python scalar operand rounded to fp32 first: they need no help.)

These helpers give the IEEE results in plain torch, independent of the CPU:

* :func:`sqrt` -- the correctly rounded square root of an fp32 tensor;
* :func:`fma` -- ``a * b + c`` with one rounding, for fp32 tensors;
* :func:`lerp` -- ATen's ``lerp`` formula with its fused multiply-add.

**Exact, and fast where torch already is.** The exact versions evaluate in fp64. fp64's own
sqrt is not trusted either (torch rounds it off by an ulp for about 1% of inputs on AVX-512): the
fp32 result is checked against the exact squares of its neighbouring midpoints and moved by one
ulp if needed. The fma keeps the exact product in fp64 and rounds the sum to odd (the exact
error from TwoSum decides), after which rounding to fp32 is correct. That costs several passes
over memory, so the first use on the CPU checks torch's own ``sqrt``, ``addcmul``,
``add(alpha=)`` and ``lerp`` against these exact versions on probe tensors (lengths that cover
the vectorized body and the scalar tail, values where a fused and an unfused multiply-add
differ): each op torch computes bitwise exactly on this CPU is used as it is, the others are
replaced (:func:`native_ops`). On this repo's AVX-512 machine that keeps the multiply-adds native
and replaces sqrt. On other devices torch's ops are used as they are.

fp64 tensors pass through torch's own ops unchanged (no exact fp64 fma exists in torch); only
fp32 gets the correctly rounded treatment. Scalars are first rounded to the tensor's dtype, as
torch does for a Python number combined with an fp32 tensor.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["applies_to", "exact_fma", "exact_sqrt", "fma", "lerp", "native_ops", "sqrt"]


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


def exact_sqrt(x: Tensor) -> Tensor:
    """The correctly rounded square root of an fp32 tensor, by exact arithmetic in fp64."""
    wide = x.double()
    root64 = torch.sqrt(wide)  # within an ulp of fp64 of the exact root
    root = root64.float()  # so within one fp32 ulp of the correctly rounded result
    here = root.double()
    # The only possible error: the exact root lies across the fp32 midpoint between `root` and
    # its neighbour towards root64. That midpoint has 25 significant bits, so its square is
    # exact in fp64, and sqrt(x) is never exactly a midpoint.
    above = root64 > here
    neighbour = torch.nextafter(root, torch.where(above, torch.inf, -torch.inf).to(root.dtype))
    mid = (here + neighbour.double()) * 0.5
    beyond = torch.where(above, wide > mid * mid, wide < mid * mid)
    # Zeros keep their (signed) root; infinities, NaNs and negatives compare False above.
    return torch.where(beyond & (root > 0), neighbour, root)


def exact_fma(a: Tensor | float, b: Tensor | float, c: Tensor | float) -> Tensor:
    """``a * b + c`` rounded once, for fp32 operands, by exact arithmetic in fp64."""
    like = _first_tensor(a, b, c)
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


def _native_fma(a: Tensor | float, b: Tensor | float, c: Tensor | float) -> Tensor:
    """torch's own multiply-add for these operands: ``add(alpha=)`` with a scalar factor,
    ``addcmul`` with two tensor factors."""
    like = _first_tensor(a, b, c)
    if not isinstance(c, Tensor):
        c = torch.full_like(like, c)
    if not isinstance(b, Tensor):
        return torch.add(c, a, alpha=b)
    if not isinstance(a, Tensor):
        return torch.add(c, b, alpha=a)
    return torch.addcmul(c, a, b)


def _lerp_formula(start: Tensor, end: Tensor, w: float, fused) -> Tensor:
    diff = end - start
    return fused(w, diff, start) if abs(w) < 0.5 else fused(w - 1.0, diff, end)


@functools.cache
def native_ops(device_type: str = "cpu") -> frozenset[str]:
    """Which of torch's fp32 ``sqrt``, ``fma`` (``addcmul`` and ``add(alpha=)``) and ``lerp``
    give the exact results on this machine's ``device_type``, checked once on probe tensors
    (CPU); on other devices all of them are taken as they are."""
    if device_type != "cpu":
        return frozenset({"sqrt", "fma", "lerp"})
    gen = torch.Generator().manual_seed(12345)
    sizes = [*range(1, 18), 1000, 65537]
    native = set()

    def agree(native_fn, exact_fn, make):
        return all(torch.equal(native_fn(*args), exact_fn(*args)) for args in map(make, sizes))

    def positive(n):
        return (torch.rand(n, generator=gen) * 4,)

    def triple(n):
        return tuple(torch.randn(n, generator=gen) for _ in range(3))

    def scaled(n):
        a, _, c = triple(n)
        return a, 0.7213, c

    def lerp_args(n):
        start, end, _ = triple(n)
        return start, end

    if agree(torch.sqrt, exact_sqrt, positive):
        native.add("sqrt")
    if agree(_native_fma, exact_fma, triple) and agree(_native_fma, exact_fma, scaled):
        native.add("fma")
    for w in (0.1, 0.9):
        if not agree(
            lambda s, e, w=w: torch.lerp(s, e, float(torch.tensor(w))),
            lambda s, e, w=w: _lerp_formula(s, e, float(torch.tensor(w)), exact_fma),
            lerp_args,
        ):
            break
    else:
        native.add("lerp")
    return frozenset(native)


def sqrt(x: Tensor) -> Tensor:
    """The correctly rounded square root (fp32; other dtypes use ``torch.sqrt``)."""
    if x.dtype != torch.float32 or "sqrt" in native_ops(x.device.type):
        return torch.sqrt(x)
    return exact_sqrt(x)


def fma(a: Tensor | float, b: Tensor | float, c: Tensor | float) -> Tensor:
    """``a * b + c`` rounded once (fp32; other dtypes use torch's ``addcmul``)."""
    like = _first_tensor(a, b, c)
    if not applies_to(a, b, c) or "fma" in native_ops(like.device.type):
        return _native_fma(a, b, c)
    return exact_fma(a, b, c)


def lerp(start: Tensor, end: Tensor, weight: float) -> Tensor:
    """ATen's ``torch.lerp`` for a scalar weight, with its one fma: ``start + w * (end - start)``
    for ``|w| < 0.5``, else ``end - (1 - w) * (end - start)``; ``w`` is first rounded to
    ``start``'s dtype."""
    w = float(torch.tensor(weight, dtype=start.dtype))
    if not applies_to(start, end) or "lerp" in native_ops(start.device.type):
        return torch.lerp(start, end, w)
    return _lerp_formula(start, end, w, exact_fma)
