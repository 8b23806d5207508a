"""What SGD, Adam and AdamW share: backend choice, the step skeleton, pickling, state placement.

No update math lives here: the layer checks arguments, creates state in torch.optim's format,
splits each param group by (device, dtype) and hands the tensor lists to the backend that
``backends.select_backend`` chose.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter, methodcaller
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..backends import select_backend, validate_request


def scalar_dtype() -> torch.dtype:
    """dtype of a fresh ``step`` tensor, by torch.optim's rule (follows the default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None


def is_dtensor(t: Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def real_view(t: Tensor | None) -> Tensor | None:
    """What the backends update in place for ``t``: a DTensor's local shard (updated without
    gathering; it may be empty), and a complex tensor's real view, as torch.optim does."""
    if is_dtensor(t):
        t = t.to_local()
    if t is not None and torch.is_complex(t):
        return torch.view_as_real(t)
    return t


def scalar_value(value: float | Tensor) -> float:
    """A hyperparameter as a Python float (a 1-element tensor is read: a sync if on a GPU)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def lr_argument(lr: float | Tensor) -> float | Tensor:
    """A tensor lr stays a tensor: the backends follow torch.optim's tensor arithmetic."""
    if isinstance(lr, Tensor):
        return lr.reshape(())
    return float(lr)


def as_state_of(param: Tensor, local: Tensor) -> Tensor:
    """The inverse of ``real_view`` for a state tensor a backend created: complex again, and a
    DTensor laid out like ``param`` when ``param`` is one."""
    if param.is_complex():
        local = torch.view_as_complex(local)
    if is_dtensor(param):
        local = DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False,
            shape=param.shape, stride=param.stride(),
        )  # fmt: skip
    return local


class Bucket:
    """The tensors of one param group that share a device and a dtype, and their backend.

    ``columns`` maps a state key to that state's (real-view) tensors for the bucket, in order.
    """

    __slots__ = ("backend", "cache", "columns", "indices", "params", "whole")

    def __init__(self, backend: ModuleType, indices: list[int], whole: bool):
        self.backend = backend
        self.indices = indices
        self.whole = whole  # the bucket is the whole group, in order
        self.cache: dict = {}
        self.params: list[Tensor] = []
        self.columns: dict[str, list] = {}

    def take(self, values: list) -> list:
        return values if self.whole else [values[i] for i in self.indices]


def fingerprint(params: list[Tensor], states: list, keys: tuple[str, ...]) -> list | None:
    """What must not change for a cached GroupWork to stay valid: the params (objects and
    storage), their state dicts, and the state tensors in them. Built with C-level ``map`` so
    that checking it costs far less than rebuilding the lists it guards."""
    storage = [real_view(p) for p in params] if any(map(is_dtensor, params)) else params
    result = [list(map(id, params)), list(map(Tensor.data_ptr, storage))]
    if not keys:
        return result
    if None in states:
        return None
    result.append(list(map(id, states)))
    for key in keys:
        result.append(list(map(id, map(methodcaller("get", key), states))))
    return result


class GroupWork:
    """Everything step() needs for one param group, cached while its tensors stay where they are.

    Holds the params that had gradients, their state dicts, the per-(device, dtype) buckets with
    their backends and tensor lists, and, for Adam, one buffer whose elements are the params'
    ``step`` tensors, so that advancing every step count is one tensor operation.
    """

    def __init__(self, params, states, keys, buckets, sparse, structure):
        self.params = params
        self.states = states
        self.keys = keys
        self.buckets = buckets
        self.sparse = sparse
        self.structure = structure
        # Gradients need unwrapping too when params are complex or DTensors.
        self.has_complex = any(p.is_complex() or is_dtensor(p) for p in params)
        self.step_buffer: Tensor | None = None
        self.steps: list[Tensor] = []
        real_params = [real_view(p) for p in params]
        for bucket in buckets:
            bucket.params = bucket.take(real_params)
            bucket.columns = {
                key: bucket.take(
                    [
                        state.get(key) if key == "step" else real_view(state.get(key))
                        for state in states
                    ]
                )
                for key in keys
            }
        self.fingerprint = fingerprint(params, states, keys)

    def matches(self, params, states, sparse, structure) -> bool:
        return (
            sparse == self.sparse
            and structure == self.structure
            and fingerprint(params, states, self.keys) == self.fingerprint
        )

    def real_grads(self, grads: list[Tensor]) -> list[Tensor]:
        return [real_view(g) for g in grads] if self.has_complex else grads


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
        self._group_work: dict[int, GroupWork] = {}
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

    def _buckets(self, params: list[Tensor], sparse: bool) -> list[Bucket]:
        """Split a group's tensors by (device, real dtype) and pick each part's backend."""
        by_key: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            dtype = p.dtype.to_real() if p.is_complex() else p.dtype
            by_key.setdefault((p.device, dtype), []).append(i)
        whole = len(by_key) == 1
        return [
            Bucket(select_backend(self._backend, device, sparse), indices, whole)
            for (device, _), indices in by_key.items()
        ]

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
        for index, (group, work) in enumerate(zip(self.param_groups, prepared)):
            if work is not None:
                self._update_group(index, group, *work)
        return loss

    # What each algorithm provides.
    def _state_keys(self, group: dict) -> tuple[str, ...]:
        raise NotImplementedError

    def _check_group(self, group: dict, grads: list[Tensor], sparse: bool) -> None:
        """Raise torch.optim's error for bad input in this group; change nothing."""

    def _init_states(self, group: dict, params: list[Tensor]) -> list[dict]:
        raise NotImplementedError

    def _run(self, group: dict, work: GroupWork, grads: list[Tensor]) -> None:
        raise NotImplementedError

    def _structure(self, group: dict) -> tuple:
        """Group settings that change which state exists or where it lives."""
        return (self._state_keys(group), group.get("capturable", False))

    def _prepare_group(self, index: int, group: dict):
        """(params, grads, cached work or fresh buckets), or None when no param has a grad."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        grads = [p.grad for p in params]
        sparse = any(map(attrgetter("is_sparse"), grads))
        self._check_group(group, grads, sparse)
        work = self._group_work.get(index)
        states = list(map(self.state.get, params)) if self._state_keys(group) else []
        if work is not None and work.matches(params, states, sparse, self._structure(group)):
            return params, grads, work
        # Backends are chosen (and may refuse) here, before anything is changed.
        return params, grads, self._buckets(params, sparse)

    def _update_group(self, index: int, group: dict, params, grads, work) -> None:
        if not isinstance(work, GroupWork):
            sparse = any(map(attrgetter("is_sparse"), grads))
            states = self._init_states(group, params)
            work = GroupWork(
                params, states, self._state_keys(group), work, sparse, self._structure(group)
            )
            self._group_work[index] = work
        self._run(group, work, grads)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._group_work = {}
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
        self._group_work = {}
        self._step_supports_amp_scaling = False
