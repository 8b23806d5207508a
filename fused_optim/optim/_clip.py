"""Gradient clipping folded into the step: what the optimizer keeps between
``clip_grad_norm_()`` and the ``step()`` that applies it.

``clip_grad_norm_()`` computes the total norm now (``backends.clip``) and arms a coefficient;
the next ``step()`` hands it to the backends (``StepContext.grad_coef``), which multiply each
gradient by it inside the update instead of rewriting the gradients first. The coefficient is
bound to the gradients it was computed from: if a gradient is replaced or modified in place by
an autograd-visible operation before the step (another backward pass), the step raises instead
of applying a stale coefficient. ``zero_grad()`` drops it.
"""

from __future__ import annotations

from operator import attrgetter

import torch
from torch import Tensor

from ..backends.clip import check_finite, coefficient, total_norm

_version = attrgetter("_version")


def _full_value(total: Tensor) -> Tensor:
    """The norm as a plain tensor. DTensor gradients (FSDP2) give a DTensor norm, as torch's
    ``get_total_norm`` does, already reduced over the mesh dimensions the gradients are
    sharded on (torch's DTensor norm; a local shard's norm alone would be too small): its full
    value is what the coefficient needs, the DTensor is what the caller gets, as from torch."""
    full_tensor = getattr(total, "full_tensor", None)
    return total if full_tensor is None else full_tensor()


def grads_of_groups(param_groups: list[dict]) -> list[Tensor]:
    """The gradients the next step reads, in param-group order."""
    return [p.grad for group in param_groups for p in group["params"] if p.grad is not None]


def apply_coefficient_(grads: list[Tensor], coef: Tensor) -> None:
    """torch's ``clip_grads_with_norm_`` multiply: each gradient, in place, by the coefficient
    (for a step traced by torch.compile, and torch.optim's own steps)."""
    for grad in grads:
        grad.mul_(coef.to(grad.device))


class GradClipping:
    """The clipping state of one optimizer: the constructor's ``max_grad_norm`` and
    ``write_clipped_grads``, and a coefficient armed by ``clip_grad_norm_()``."""

    def __init__(self, max_grad_norm: float | None, write_clipped_grads: bool):
        if max_grad_norm is not None:
            max_grad_norm = float(max_grad_norm)
        self.max_grad_norm = max_grad_norm
        self.write_clipped_grads = bool(write_clipped_grads)
        self.coef: Tensor | None = None
        self._bound_to: tuple[list[int], list[int]] | None = None
        #: The total norm the last clip computed (a 0-dim tensor), None before any.
        self.last_norm: Tensor | None = None

    def clip(
        self,
        param_groups: list[dict],
        max_norm: float,
        norm_type: float,
        error_if_nonfinite: bool,
        backend: str | None,
    ) -> Tensor:
        """``clip_grad_norm_()``: the total norm, and the coefficient armed for the next step."""
        max_norm = float(max_norm)
        grads = grads_of_groups(param_groups)
        total = total_norm(grads, norm_type, None, backend)
        if error_if_nonfinite:
            check_finite(total, norm_type)
        self.last_norm = total
        if grads:
            self.coef = coefficient(max_norm, _full_value(total))
            if not torch.compiler.is_compiling():
                self._bound_to = (list(map(id, grads)), list(map(_version, grads)))
        return total

    def drop(self) -> None:
        self.coef = None
        self._bound_to = None

    def take(
        self, param_groups: list[dict], grad_scale: Tensor | None, backend: str | None
    ) -> Tensor | None:
        """The coefficient this step applies (None: no clipping), and disarms it. With
        ``max_grad_norm`` and nothing armed, the norm of the unscaled gradients is computed
        here."""
        coef, bound_to = self.coef, self._bound_to
        self.drop()
        if coef is not None:
            if bound_to is not None:
                grads = grads_of_groups(param_groups)
                if bound_to != (list(map(id, grads)), list(map(_version, grads))):
                    raise RuntimeError(
                        "fused_optim: the gradients changed between clip_grad_norm_() and "
                        "step() (another backward pass, or a gradient replaced), so the "
                        "clipping coefficient no longer applies; call clip_grad_norm_() after "
                        "the last change, or construct the optimizer with max_grad_norm="
                    )
            return coef
        if self.max_grad_norm is None:
            return None
        grads = grads_of_groups(param_groups)
        if not grads:
            return None
        total = total_norm(grads, 2.0, grad_scale, backend)
        self.last_norm = total
        return coefficient(self.max_grad_norm, _full_value(total))
