"""The total gradient norm for clipping, and clipping's coefficient, as torch computes them.

``total_norm(grads, norm_type, grad_scale, backend)`` is ``torch.nn.utils.get_total_norm`` of the
gradients, unscaled when ``grad_scale`` is given: a 0-dim tensor on the first gradient's device,
in the dtype torch's result has (the gradients' dtypes promoted), without a host sync. The fused
pass unscales each element as the kernels do (rounded to the gradient's dtype, as GradScaler
writes it); torch's path divides the norm by the scale.

Where every gradient lives on a device whose backend offers ``grad_norm`` for the norm asked
for (the C++ CPU backend: 1-, 2-, p- (p > 0) and inf-norms; Triton and CUDA C++: 1-, 2- and
inf-norms) and the gradients are real and dense, one multi-tensor pass computes it: fp64 partial
sums of |g|^p (or the largest |g|) per chunk of elements, combined in a fixed order, so that two
runs give the same bits whatever the thread count. Anything else (complex, sparse or DTensor
gradients, other norms, the reference backend) goes through torch's own ``get_total_norm``
(deterministic too). The Triton and CUDA C++ passes (``grad_norm_and_coefficient``) also
compute the clipping coefficient on the device, in the block that finishes the norm
(``norm_and_coefficient``).

``coefficient(max_norm, total)`` is torch's ``clamp(max_norm / (total + 1e-6), max=1)``, with
the same tensor operations in the same dtype.
"""

from __future__ import annotations

import math
from functools import reduce
from operator import attrgetter

import torch
from torch import Tensor

from . import select_backend

#: The grad_norm kinds of the C++ op (csrc/cpu/kernel_api.h's NormKind).
_SQUARES, _ABS, _POWER, _MAX = 0, 1, 2, 3

_FUSED_DTYPES = {torch.float32, torch.float64, torch.bfloat16, torch.float16}
_dtype, _device, _is_sparse = attrgetter("dtype"), attrgetter("device"), attrgetter("is_sparse")


def _result_dtype(grads: list[Tensor]) -> torch.dtype:
    """The dtype of torch's norm of ``grads``: their dtypes promoted."""
    return reduce(torch.promote_types, set(map(_dtype, grads)))


def _kind(norm_type: float) -> int | None:
    if norm_type == 2.0:
        return _SQUARES
    if norm_type == 1.0:
        return _ABS
    if norm_type == math.inf:
        return _MAX
    if math.isfinite(norm_type) and norm_type > 0:
        return _POWER
    return None  # 0, negative, -inf, NaN: torch's own definitions


def _fused_backends(grads: list[Tensor], request: str | None, kind: int) -> dict | None:
    """Each device's backend (its module, which offers ``grad_norm``) when every gradient can
    take the fused pass (checked with C-level maps: this runs at every clipped step)."""
    if set(map(type, grads)) != {Tensor} or not set(map(_dtype, grads)) <= _FUSED_DTYPES:
        return None  # DTensor and other subclasses, complex and integer dtypes
    if any(map(_is_sparse, grads)):
        return None
    chosen: dict[torch.device, object] = {}
    for device in set(map(_device, grads)):
        try:
            backend = select_backend(request, device)
        except RuntimeError:
            return None
        norm = getattr(backend, "grad_norm", None)
        if norm is None or kind not in getattr(backend, "GRAD_NORM_KINDS", (kind,)):
            return None
        chosen[device] = backend
    return chosen


def _fused_pass(grads: list[Tensor], norm_type: float, backend: str | None):
    """(norm kind, the backends of ``_fused_backends``), the backends None where torch's
    ``get_total_norm`` computes the norm."""
    kind = _kind(norm_type)
    # The compiler traces torch's own operations; torch refuses the inf-norm of an empty tensor.
    torch_only = torch.compiler.is_compiling() or kind is None
    torch_only = torch_only or (kind == _MAX and any(g.numel() == 0 for g in grads))
    return kind, None if torch_only else _fused_backends(grads, backend, kind)


def total_norm(
    grads: list[Tensor],
    norm_type: float = 2.0,
    grad_scale: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """``torch.nn.utils.get_total_norm(grads, norm_type)`` of the unscaled gradients (see the
    module docstring); ``backend`` is the optimizer's backend request."""
    norm_type = float(norm_type)
    if not grads:
        return torch.tensor(0.0)  # torch's result for no gradients
    kind, fused = _fused_pass(grads, norm_type, backend)
    if fused is None:
        total = torch.nn.utils.get_total_norm(grads, norm_type)
        if grad_scale is None or norm_type == 0.0:  # the 0-"norm" counts, and does not scale
            return total
        # A norm scales with its vector: no unscaled copy of every gradient (GradScaler's
        # scales are powers of 2, so dividing the gradients first would round the same way).
        return total / grad_scale.to(device=total.device, dtype=total.dtype)
    first_device = grads[0].device
    if len(fused) == 1:
        by_device = {first_device: grads}
    else:
        by_device = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
    partials = [
        fused[device].grad_norm(device_grads, kind, norm_type, grad_scale).to(first_device)
        for device, device_grads in by_device.items()
    ]
    combined = partials[0]
    for partial in partials[1:]:
        combined = torch.maximum(combined, partial) if kind == _MAX else combined + partial
    if kind == _SQUARES:
        total = combined.sqrt()
    elif kind == _POWER:
        total = combined.pow(1.0 / norm_type)
    else:
        total = combined
    return total.to(_result_dtype(grads))


def check_finite(total: Tensor, norm_type: float) -> None:
    """torch's ``error_if_nonfinite=True``: a RuntimeError, with its message, when the total
    norm is NaN or infinite (reading the flag is a host sync on a GPU)."""
    if torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )


def norm_and_coefficient(
    grads: list[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    grad_scale: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(total_norm(grads, ...), coefficient(max_norm, total))`` for non-empty ``grads``. Where
    every gradient is on one device whose backend offers ``grad_norm_and_coefficient`` (Triton,
    CUDA C++), both come from its norm pass alone: the coefficient is computed on the device by
    the program that finishes the norm, with the same operations and roundings, and no other
    operation runs (one launch per gradient dtype in all)."""
    norm_type = float(norm_type)
    kind, fused = _fused_pass(grads, norm_type, backend)
    if fused is not None and len(fused) == 1:
        both = getattr(next(iter(fused.values())), "grad_norm_and_coefficient", None)
        out_dtype = _result_dtype(grads)
        done = None if both is None else both(grads, kind, grad_scale, float(max_norm), out_dtype)
        if done is not None:
            return done
    total = total_norm(grads, norm_type, grad_scale, backend)
    return total, coefficient(max_norm, total)


def coefficient(max_norm: float, total: Tensor) -> Tensor:
    """torch's clipping coefficient, ``clamp(max_norm / (total + 1e-6), max=1)``, with its
    tensor operations in ``total``'s dtype."""
    return torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
