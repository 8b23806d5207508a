"""What SGD, Adam and AdamW share: backend choice, the step skeleton, pickling, state placement.

No update math lives here: the layer checks arguments, creates state in torch.optim's format,
splits each param group by (device, dtype) and hands the tensor lists to the backend that
``backends.select_backend`` chose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


def any_dtensor(tensors: list[Tensor]) -> bool:
    """``any(map(is_dtensor, tensors))`` at C speed: the distinct types are few."""
    if DTensor is None:
        return False
    return any(issubclass(kind, DTensor) for kind in set(map(type, tensors)))


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


LOW_PRECISION = (torch.bfloat16, torch.float16)
MASTER_KEY = "master_param"
# The first state tensor whose dtype tells the dtype of a param's states.
STATE_DTYPE_KEYS = ("exp_avg", "momentum_buffer")


@dataclass(frozen=True)
class Precision:
    """The precision modes chosen at construction (all off by default: torch.optim's numbers).

    * ``state_dtype``: dtype of new optimizer states for fp32, bf16 and fp16 params (None: the
      param's dtype, as torch.optim). fp64 and complex params keep states of their own dtype.
    * ``master_weights``: bf16/fp16 params get an fp32 master copy in their state
      (``"master_param"``); the update runs on it and the param receives its rounded value.
    * ``stochastic_rounding``: bf16/fp16 param writes round up or down at random, with
      probability proportional to proximity; the bits are a hash of (``seed``, step, the param's
      index in the optimizer, the element's index), so reruns and resumes give the same result.
    """

    state_dtype: torch.dtype | None = None
    master_weights: bool = False
    stochastic_rounding: bool = False
    seed: int = 0

    def __post_init__(self):
        allowed = (None, torch.float32, torch.bfloat16, torch.float16)
        if self.state_dtype not in allowed:
            raise ValueError(
                f"Invalid state_dtype: {self.state_dtype}; expected None, torch.float32, "
                "torch.bfloat16 or torch.float16"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")

    def state_dtype_for(self, p: Tensor) -> torch.dtype:
        """dtype of a new state tensor for ``p``."""
        if self.state_dtype is None or p.is_complex() or p.dtype == torch.float64:
            return p.dtype
        return self.state_dtype

    def wants_master(self, p: Tensor) -> bool:
        return self.master_weights and p.dtype in LOW_PRECISION


class Bucket:
    """The tensors of one param group that share a device, a param dtype, a state dtype and
    whether they have master weights; and their backend.

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
    storage = [real_view(p) for p in params] if any_dtensor(params) else params
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

    def __init__(self, params, states, keys, buckets, sparse, structure, indices):
        self.params = params
        self.indices = indices  # each param's index in the optimizer (state_dict numbering)
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

    def _setup_fused(self, backend: str | None, differentiable: bool, precision: Precision) -> None:
        validate_request(backend)
        if differentiable:
            raise NotImplementedError(
                f"fused_optim.{type(self).__name__} does not support differentiable=True: its "
                f"kernels update tensors in place outside autograd. Use torch.optim."
                f"{type(self).__name__}(..., differentiable=True) to differentiate through "
                "the optimizer step."
            )
        self._backend = backend
        self._precision = precision
        self._reset_runtime_state()

    def _reset_runtime_state(self) -> None:
        self._group_work: dict[int, GroupWork] = {}
        # GradScaler hands grad_scale and found_inf to step(): the kernels unscale and skip.
        self._step_supports_amp_scaling = True
        self._amp: tuple[Tensor | None, Tensor | None] = (None, None)
        self.step_skipped: Tensor = torch.zeros((), dtype=torch.bool)

    @property
    def backend(self) -> str | None:
        """The backend asked for at construction (None: chosen per device)."""
        return self._backend

    @property
    def precision(self) -> Precision:
        """The precision modes chosen at construction."""
        return self._precision

    @property
    def last_step_skipped(self) -> bool:
        """Whether GradScaler's ``found_inf`` made the last ``step()`` a no-op.

        Reading it copies one flag from the device (a sync); ``step()`` itself never waits.
        ``step_skipped`` is the same flag as a 0-dim bool tensor, on the device.
        """
        return bool(self.step_skipped)

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

    def _bucket_key(self, p: Tensor, state: dict | None) -> tuple:
        """(device, param dtype, state dtype, has master): tensors that share one launch."""
        dtype = p.dtype.to_real() if p.is_complex() else p.dtype
        existing = [state[key] for key in STATE_DTYPE_KEYS if state and state.get(key) is not None]
        state_dtype = existing[0].dtype if existing else self._precision.state_dtype_for(p)
        if state_dtype.is_complex:
            state_dtype = state_dtype.to_real()
        return (p.device, dtype, state_dtype, self._precision.wants_master(p))

    def _buckets(self, params: list[Tensor], sparse: bool) -> list[Bucket]:
        """Split a group's tensors by ``_bucket_key`` and pick each part's backend."""
        by_key: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_key.setdefault(self._bucket_key(p, self.state.get(p)), []).append(i)
        whole = len(by_key) == 1
        return [
            Bucket(select_backend(self._backend, key[0], sparse), indices, whole)
            for key, indices in by_key.items()
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

        Under ``torch.amp.GradScaler``, the scaler sets ``grad_scale`` and ``found_inf`` on the
        optimizer before calling this: the kernels divide the gradients by ``grad_scale``
        (writing them back unscaled) and, when ``found_inf`` is nonzero, change nothing at all
        (params, states and ``step`` stay bitwise the same). ``step_skipped`` records the
        outcome on the device.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the
                loss.
        """
        self._graph_capture_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        self._amp = (grad_scale, found_inf)
        # Check every group before touching any: an error leaves params and state as they were.
        offsets = [0]
        for group in self.param_groups[:-1]:
            offsets.append(offsets[-1] + len(group["params"]))
        prepared = [
            self._prepare_group(index, group, offsets[index])
            for index, group in enumerate(self.param_groups)
        ]
        for index, (group, work) in enumerate(zip(self.param_groups, prepared)):
            if work is not None:
                self._update_group(index, group, *work)
        self._amp = (None, None)
        if found_inf is None:
            self.step_skipped = torch.zeros((), dtype=torch.bool)
        else:
            self.step_skipped = found_inf != 0
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

    def _precision_keys(self, with_step: bool) -> tuple[str, ...]:
        """State keys the precision modes add: ``step`` (when asked for) and the master."""
        keys = ("step",) if with_step else ()
        return (*keys, MASTER_KEY) if self._precision.master_weights else keys

    def _structure(self, group: dict) -> tuple:
        """Group settings that change which state exists or where it lives."""
        steps_on_device = group.get("capturable", False) or self._amp[1] is not None
        return (self._state_keys(group), steps_on_device)

    def _prepare_group(self, index: int, group: dict, offset: int):
        """(params, grads, cached work or fresh buckets, indices), or None when no param has a
        grad. ``indices`` are the params' positions in the optimizer."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        grads = [p.grad for p in params]
        sparse = any(map(attrgetter("is_sparse"), grads))
        self._check_group(group, grads, sparse)
        work = self._group_work.get(index)
        states = list(map(self.state.get, params)) if self._state_keys(group) else []
        if work is not None and work.matches(params, states, sparse, self._structure(group)):
            return params, grads, work, work.indices
        indices = [offset + i for i, p in enumerate(group["params"]) if p.grad is not None]
        # Backends are chosen (and may refuse) here, before anything is changed.
        return params, grads, self._buckets(params, sparse), indices

    def _update_group(self, index: int, group: dict, params, grads, work, indices) -> None:
        if not isinstance(work, GroupWork):
            sparse = any(map(attrgetter("is_sparse"), grads))
            states = self._init_states(group, params)
            work = GroupWork(
                params,
                states,
                self._state_keys(group),
                work,
                sparse,
                self._structure(group),
                indices,
            )
            self._group_work[index] = work
        self._run(group, work, grads)

    # State shared by the algorithms: step counts and master weights.
    def _init_common_state(self, group: dict, p: Tensor, state: dict, with_step: bool) -> None:
        """Create ``step`` (if asked for) and the master weight (if wanted) for ``p``."""
        if with_step and "step" not in state:
            device = self._step_device(group, p)
            state["step"] = torch.zeros((), dtype=scalar_dtype(), device=device)
        if self._precision.wants_master(p) and state.get(MASTER_KEY) is None:
            master = torch.empty_like(p, dtype=torch.float32)  # preserves p's layout
            state[MASTER_KEY] = master.copy_(p)

    def _step_device(self, group: dict, p: Tensor) -> torch.device:
        """Where ``step`` lives: the CPU as in torch.optim's default path, or the param's
        device with capturable=True and under GradScaler (whose skip is decided there)."""
        if group.get("capturable", False) or self._amp[1] is not None:
            return p.device
        return torch.device("cpu")

    def _gather_steps(self, group: dict, params: list[Tensor], states: list[dict]) -> None:
        """Put every ``step`` where ``_step_device`` says, and, when they share a device and
        dtype, make them 0-dim views of one buffer: advancing them all is one operation."""
        for p, state in zip(params, states):
            device = self._step_device(group, p)
            if state["step"].device != device:
                state["step"] = state["step"].to(device)
        steps = [s["step"] for s in states]
        if len({(t.device, t.dtype) for t in steps}) == 1:
            buffer = torch.stack([t.reshape(()) for t in steps])
            for i, state in enumerate(states):
                state["step"] = buffer[i]

    def _advance_steps(self, work: GroupWork) -> None:
        """Add one to every step count of the group; under GradScaler, add ``found_inf == 0``
        (on the device) instead, so that a skipped step leaves them unchanged."""
        if work.step_buffer is None:
            steps_base = work.states[0]["step"]._base
            if steps_base is not None and steps_base.numel() == len(work.states):
                work.step_buffer = steps_base
        targets = [work.step_buffer] if work.step_buffer is not None else None
        if targets is None:
            targets = [s["step"] for s in work.states]
        found_inf = self._amp[1]
        if found_inf is None:
            torch._foreach_add_(targets, 1)
            return
        for target in targets:
            target.add_((found_inf.to(target.device, non_blocking=True) == 0).to(target.dtype))

    def _precision_arguments(self, group: dict, work: GroupWork, bucket: Bucket) -> dict:
        """The backend keywords for GradScaler and the precision modes, for one bucket."""
        grad_scale, found_inf = self._amp
        masters = bucket.columns.get(MASTER_KEY)
        precision = self._precision
        return dict(
            master_params=masters if masters and masters[0] is not None else None,
            grad_scale=grad_scale,
            found_inf=found_inf,
            stochastic_rounding=precision.stochastic_rounding,
            seed=precision.seed,
            param_indices=bucket.take(work.indices) if precision.stochastic_rounding else None,
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's ``load_state_dict``, except that every state tensor keeps the dtype it
        was saved with (torch casts them to the param's dtype, which would round fp32 states
        and master weights of bf16 params). With a ``state_dtype`` mode, states are converted
        to it; master weights stay fp32."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)  # type: ignore[misc]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            entry = saved_state.get(saved_id)
            if not entry or p not in self.state:
                continue
            state = self.state[p]
            if MASTER_KEY in state and not self._precision.wants_master(p):
                # Without master weights nothing would keep it current, and a later resume
                # with master weights on would jump the param back to it.
                del state[MASTER_KEY]
            for key, value in entry.items():
                current = state.get(key)
                if key == "step" or not isinstance(value, Tensor) or current is None:
                    continue
                if not value.is_floating_point() or not isinstance(current, Tensor):
                    continue
                dtype = torch.float32 if key == MASTER_KEY else value.dtype
                if key != MASTER_KEY and self._precision.state_dtype is not None:
                    dtype = self._precision.state_dtype_for(p)
                if current.dtype != dtype:
                    state[key] = value.to(device=current.device, dtype=dtype)
        self._group_work = {}
        self._place_loaded_state()

    def _place_loaded_state(self) -> None:
        """Steps go where step() reads them: the CPU, or the params' device when capturable."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or not isinstance(state.get("step"), Tensor):
                    continue
                step = state["step"]
                if group.get("capturable", False):
                    state["step"] = step.to(device=p.device, dtype=torch.float32)
                elif step.device.type != "cpu":
                    state["step"] = step.to("cpu")

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # type: ignore[misc]
        state["_backend"] = self._backend
        state["_precision"] = self._precision
        for key in ("_group_work", "_amp", "step_skipped", "_step_supports_amp_scaling"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        # Unpickling brings the backend and precision in the state; torch's load_state_dict
        # calls __setstate__ without them, and those chosen at construction stay.
        backend = state.pop("_backend", getattr(self, "_backend", None))
        precision = state.pop("_precision", getattr(self, "_precision", Precision()))
        super().__setstate__(state)  # type: ignore[misc]
        self._backend = backend
        self._precision = precision
        self._reset_runtime_state()
