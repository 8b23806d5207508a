"""Gradient clipping folded into the step: what the optimizer keeps between
``clip_grad_norm_()`` and the ``step()`` that applies it.

``clip_grad_norm_()`` computes the total norm now (``backends.clip``) and arms a coefficient;
the next ``step()`` hands it to the backends (``StepContext.grad_coef``), which multiply each
gradient by it inside the update instead of rewriting the gradients first. What torch's clip
would do to the gradients in memory is kept as that coefficient, so the sequence behaves as
with torch's in-place clip:

- the coefficient belongs to the gradient tensors it was computed from (held by weak
  references, with their version counters). Gradients replaced by new tensors (a module's
  ``zero_grad()``, then backward) carry no clip, as new gradients would not after torch's; a
  gradient modified in place (another backward pass accumulating into it) makes the step
  raise, since "the clipped gradient plus the new one" is not a coefficient;
- a second clip, explicit or ``max_grad_norm``'s, sees the gradients as the first left them
  (the norm scaled by the armed coefficient) and multiplies its own coefficient into it;
- the coefficient is consumed by a step that succeeds; ``zero_grad()`` drops it.
"""

from __future__ import annotations

import weakref
from operator import attrgetter

import torch
from torch import Tensor

from ..backends.clip import check_finite, coefficient, norm_and_coefficient, total_norm
from ._state import any_dtensor

_version = attrgetter("_version")
_grad = attrgetter("grad")


def grads_of_groups(param_groups: list[dict]) -> list[Tensor]:
    """The gradients the next step reads, in param-group order, each param once (a param listed
    twice has one gradient, clipped and measured once)."""
    params = [p for group in param_groups for p in group["params"]]
    if torch.compiler.is_compiling():  # what dynamo traces (no C-level maps of ids)
        return [p.grad for p in params if p.grad is not None]
    if len(set(map(id, params))) != len(params):
        params = list({id(p): p for p in params}.values())  # first occurrences, in order
    return [g for g in map(_grad, params) if g is not None]


def apply_coefficient_(grads: list[Tensor], coef: Tensor) -> None:
    """torch's ``clip_grads_with_norm_`` multiply: each gradient, in place, by the coefficient
    (for the steps torch.optim's own code or a torch.compile trace runs)."""
    for grad in grads:
        grad.mul_(coef.to(grad.device))


def _full_value(total: Tensor) -> Tensor:
    """The norm as a plain tensor. DTensor gradients (FSDP2) give a DTensor norm, as torch's
    ``get_total_norm`` does, already reduced over the mesh dimensions the gradients are
    sharded on (torch's DTensor norm; a local shard's norm alone would be too small): its full
    value is what the coefficient needs, the DTensor is what the caller gets, as from torch."""
    full_tensor = getattr(total, "full_tensor", None)
    return total if full_tensor is None else full_tensor()


class GradClipping:
    """The clipping state of one optimizer: the constructor's ``max_grad_norm`` and
    ``write_clipped_grads``, and a coefficient armed by ``clip_grad_norm_()``."""

    def __init__(self, max_grad_norm: float | None, write_clipped_grads: bool):
        if max_grad_norm is not None:
            max_grad_norm = float(max_grad_norm)
        self.max_grad_norm = max_grad_norm
        self.write_clipped_grads = bool(write_clipped_grads)
        self.coef: Tensor | None = None
        self._bound_to: tuple[list, list[int]] | None = None
        #: The total norm the last clip computed (a 0-dim tensor), None before any.
        self.last_norm: Tensor | None = None

    def drop(self) -> None:
        self.coef = None
        self._bound_to = None

    def _armed_for(self, grads: list[Tensor]) -> Tensor | None:
        """The armed coefficient if it belongs to ``grads``: None when there is none or the
        gradients are other tensors (it is dropped); RuntimeError when one was modified in
        place since the clip (nothing is changed)."""
        if self.coef is None or torch.compiler.is_compiling() or self._bound_to is None:
            return self.coef
        refs, versions = self._bound_to
        if len(refs) != len(grads) or any(ref() is not g for ref, g in zip(refs, grads)):
            self.drop()
            return None
        if list(map(_version, grads)) != versions:
            raise RuntimeError(
                "fused_optim: a gradient was modified in place between clip_grad_norm_() and "
                "step() (another backward pass accumulating into it?), so the clipping "
                "coefficient no longer applies to it; call clip_grad_norm_() after the last "
                "backward pass, or construct the optimizer with max_grad_norm="
            )
        return self.coef

    def _arm(self, coef: Tensor, grads: list[Tensor]) -> None:
        self.coef = coef
        if not torch.compiler.is_compiling():
            self._bound_to = (list(map(weakref.ref, grads)), list(map(_version, grads)))

    def _clip(self, grads, max_norm, norm_type, grad_scale, backend) -> tuple[Tensor, Tensor]:
        """(the norm of the gradients as the armed coefficient left them, the coefficient that
        clips them to ``max_norm`` composed with it)."""
        armed = self._armed_for(grads)
        if armed is None and not any_dtensor(grads):
            return norm_and_coefficient(grads, max_norm, norm_type, grad_scale, backend)
        total = total_norm(grads, norm_type, grad_scale, backend)
        if armed is not None:
            total = total * armed.to(total.dtype)  # a norm scales with its vector
        coef = coefficient(max_norm, _full_value(total))
        if armed is not None:
            coef = coef * armed
        return total, coef

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
        if not grads:
            return total_norm(grads, norm_type)  # torch's result for no gradients
        total, coef = self._clip(grads, max_norm, norm_type, None, backend)
        if error_if_nonfinite:
            check_finite(total, norm_type)
        self.last_norm = total
        self._arm(coef, grads)
        return total

    def for_step(
        self, param_groups: list[dict], grad_scale: Tensor | None, backend: str | None
    ) -> Tensor | None:
        """The coefficient the coming step applies (None: no clipping): the armed one, with
        ``max_grad_norm``'s composed into it (its norm taken of the unscaled gradients). It
        stays armed until ``consumed()``, so a step that raises can be retried."""
        if self.coef is None and self.max_grad_norm is None:
            return None
        grads = grads_of_groups(param_groups)
        if not grads:
            return None
        if self.max_grad_norm is None:
            return self._armed_for(grads)
        total, coef = self._clip(grads, self.max_grad_norm, 2.0, grad_scale, backend)
        self.last_norm = total
        return coef

    def consumed(self) -> None:
        """The step applied the coefficient."""
        self.drop()
