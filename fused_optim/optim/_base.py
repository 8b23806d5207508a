"""What SGD, Adam and AdamW share: backend choice, the step skeleton, pickling, state placement.

No update math lives here: the layer checks arguments, creates state in torch.optim's format,
splits each param group by (device, dtype) and hands the tensor lists to the backend that
``backends.select_backend`` chose.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..backends import select_backend, validate_request


def scalar_dtype() -> torch.dtype:
    """dtype of a fresh ``step`` tensor, by torch.optim's rule (follows the default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def real_view(t: Tensor | None) -> Tensor | None:
    """Complex tensors are updated as their real views, as torch.optim does."""
    if t is not None and torch.is_complex(t):
        return torch.view_as_real(t)
    return t


class Bucket:
    """The tensors of one param group that share a device and a dtype, and their backend."""

    __slots__ = ("backend", "cache_key", "indices")

    def __init__(self, backend: ModuleType, cache_key: tuple, indices: list[int]):
        self.backend = backend
        self.cache_key = cache_key
        self.indices = indices

    def take(self, values: list) -> list:
        return [values[i] for i in self.indices]


class FusedOptimizerMixin:
    """Mixed into subclasses of the torch.optim classes; overrides ``step`` and pickling."""

    param_groups: list[dict[str, Any]]
    state: dict

    def _setup_fused(self, backend: str | None, differentiable: bool) -> None:
        validate_request(backend)
        if differentiable:
            raise NotImplementedError(
                f"fused_optim.{type(self).__name__} does not support differentiable=True: its "
                f"kernels update tensors in place outside autograd. Use torch.optim."
                f"{type(self).__name__}(..., differentiable=True) to differentiate through "
                "the optimizer step."
            )
        self._backend = backend
        self._plan_caches: dict[tuple, dict] = {}
        # GradScaler must unscale gradients itself and skip step() on inf/NaN.
        self._step_supports_amp_scaling = False

    @property
    def backend(self) -> str | None:
        """The backend asked for at construction (None: chosen per device)."""
        return self._backend

    def group_backends(self) -> list[str]:
        """Name of the backend each param group's tensors are updated by ("a+b" if mixed)."""
        names = []
        for group in self.param_groups:
            chosen = {
                select_backend(self._backend, p.device, self._sparse(p)).NAME
                for p in group["params"]
            }
            names.append("+".join(sorted(chosen)))
        return names

    @staticmethod
    def _sparse(p: Tensor) -> bool:
        return p.grad is not None and p.grad.is_sparse

    def _buckets(self, group_index: int, params: list[Tensor], sparse: bool) -> list[Bucket]:
        """Split a group's tensors by (device, real dtype) and pick each part's backend."""
        by_key: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            dtype = p.dtype.to_real() if p.is_complex() else p.dtype
            by_key.setdefault((p.device, dtype), []).append(i)
        return [
            Bucket(select_backend(self._backend, device, sparse), (group_index, device, dtype), idx)
            for (device, dtype), idx in by_key.items()
        ]

    def _cache(self, bucket: Bucket) -> dict:
        return self._plan_caches.setdefault(bucket.cache_key, {})

    def _graph_capture_check(self) -> None:
        check = (
            getattr(self, "_accelerator_graph_capture_health_check", None)
            or self._cuda_graph_capture_health_check
        )
        check()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the
                loss.
        """
        self._graph_capture_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every group before touching any: an error leaves params and state as they were.
        prepared = [
            self._prepare_group(index, group) for index, group in enumerate(self.param_groups)
        ]
        for group, work in zip(self.param_groups, prepared):
            if work is not None:
                self._update_group(group, *work)
        return loss

    def _prepare_group(self, index: int, group: dict) -> tuple | None:
        raise NotImplementedError

    def _update_group(self, group: dict, params: list[Tensor], grads: list[Tensor], buckets):
        raise NotImplementedError

    def _collect(self, index: int, group: dict, sparse_error: str | None) -> tuple | None:
        """(params, grads, buckets) of the params that have a gradient, or None if none do."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        grads = [p.grad for p in params]
        sparse = any(g.is_sparse for g in grads)
        if sparse and sparse_error is not None:
            raise RuntimeError(sparse_error)
        return params, grads, self._buckets(index, params, sparse)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._plan_caches = {}
        self._place_loaded_state()

    def _place_loaded_state(self) -> None:
        """Hook for subclasses to move loaded state where their step expects it."""

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # type: ignore[misc]
        state["_backend"] = self._backend
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        # Unpickling brings the backend in the state; torch's load_state_dict calls
        # __setstate__ without it, and the backend chosen at construction stays.
        backend = state.pop("_backend", getattr(self, "_backend", None))
        super().__setstate__(state)  # type: ignore[misc]
        self._backend = backend
        self._plan_caches = {}
        self._step_supports_amp_scaling = False
