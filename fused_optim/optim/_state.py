"""State layout: the precision modes, where ``step`` lives, and the views the backends update.

* ``Precision``: the precision modes chosen at construction.
* ``real_view`` / ``as_state_of``: a complex param or state as its real view, a DTensor as its
  local shard, and back.
* ``gather_steps`` / ``advance_steps``: every ``step`` of a plan as 0-dim views of one buffer per
  (device, dtype), so that advancing them all is one operation whatever the number of groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends import host_checks

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None

LOW_PRECISION = (torch.bfloat16, torch.float16)
MASTER_KEY = "master_param"
# The first state tensor whose dtype tells the dtype of a param's states.
STATE_DTYPE_KEYS = ("exp_avg", "momentum_buffer")


def scalar_dtype() -> torch.dtype:
    """dtype of a fresh ``step`` tensor, by torch.optim's rule (follows the default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def is_dtensor(t: Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_dtensor_type(kind: type) -> bool:
    return DTensor is not None and issubclass(kind, DTensor)


def any_dtensor(tensors: list[Tensor]) -> bool:
    """``any(map(is_dtensor, tensors))`` at C speed: the distinct types are few."""
    return any(map(is_dtensor_type, set(map(type, tensors))))


def any_dispatch_subclass(tensors: list[Tensor]) -> bool:
    """Whether any of ``tensors`` is a tensor subclass with its own ``__torch_dispatch__``
    (a wrapper such as torch's ``TwoTensor``, or a quantized or float8 weight), other than a
    DTensor (whose local shard the kernels update): the kernels cannot address its memory, and
    torch.optim's step reaches it through its dispatch. Checked on the distinct types only."""
    plain = Tensor.__torch_dispatch__
    return any(
        kind.__torch_dispatch__ is not plain and not is_dtensor_type(kind)
        for kind in set(map(type, tensors))
    )


def needs_views(tensors: list[Tensor]) -> bool:
    """Whether any of ``tensors`` is complex or a DTensor (then ``real_view`` is not identity)."""
    return any_dtensor(tensors) or any(map(Tensor.is_complex, tensors))


def real_view(t: Tensor | None) -> Tensor | None:
    """What the backends update in place for ``t``: a DTensor's local shard (updated without
    gathering; it may be empty), and a complex tensor's real view, as torch.optim does."""
    if is_dtensor(t):
        t = t.to_local()
    if t is not None and torch.is_complex(t):
        return torch.view_as_real(t)
    return t


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

    @property
    def off(self) -> bool:
        """No mode is on: torch.optim's numbers (the seed alone changes nothing)."""
        return self.state_dtype is None and not self.master_weights and not self.stochastic_rounding

    def state_dtype_for(self, p: Tensor) -> torch.dtype:
        """dtype of a new state tensor for ``p`` (real: a complex param's states are complex,
        and the backends see their real views)."""
        if self.state_dtype is None or p.is_complex() or p.dtype == torch.float64:
            return p.dtype
        return self.state_dtype

    def wants_master(self, p: Tensor) -> bool:
        return self.master_weights and p.dtype in LOW_PRECISION

    def new_master(self, p: Tensor) -> Tensor:
        """An fp32 copy of ``p`` in ``p``'s layout."""
        return torch.empty_like(p, dtype=torch.float32).copy_(p)


def bucket_state_dtype(precision: Precision, p: Tensor, state: dict | None) -> torch.dtype:
    """The (real) dtype of ``p``'s states: that of an existing state, else the precision rule."""
    existing = [state[key] for key in STATE_DTYPE_KEYS if state and state.get(key) is not None]
    dtype = existing[0].dtype if existing else precision.state_dtype_for(p)
    return real_dtype(dtype)


_REAL_DTYPES = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``real_view``s of ``dtype`` (``dtype.to_real()``, which torch.compile
    cannot trace)."""
    return _REAL_DTYPES.get(dtype, dtype)


def new_step(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=scalar_dtype(), device=device)


def gather_steps(states: list[dict], devices: list[torch.device]) -> list[Tensor]:
    """Move each ``state["step"]`` to its device in ``devices`` and make the steps that share a
    (device, dtype) consecutive views of one buffer, each of its own shape (0-dim, or the
    shape (1,) of some checkpoints, kept as torch.optim keeps it). Returns the buffers."""
    by_key: dict[tuple, list[int]] = {}
    for i, (state, device) in enumerate(zip(states, devices)):
        step = state["step"]
        if step.device != device:
            step = state["step"] = step.to(device)
        by_key.setdefault((step.device, step.dtype), []).append(i)
    buffers = []
    for positions in by_key.values():
        buffer = torch.stack([states[i]["step"].reshape(()) for i in positions])
        for j, i in enumerate(positions):
            shape = states[i]["step"].shape
            states[i]["step"] = buffer[j] if not shape else buffer[j].view(shape)
        buffers.append(buffer)
    return buffers


def advance_steps(buffers: list[Tensor], found_inf: Tensor | None, traced: bool = False) -> None:
    """Add one to every step count; under GradScaler add ``found_inf == 0`` (on the device)
    instead, so that a skipped step leaves them unchanged. Eager steps add in the extension
    where it is built (contiguous CPU buffers, the usual case: a torch dispatch saved per step);
    a ``traced`` step (torch.compile) adds with torch operations."""
    if not buffers:
        return
    if found_inf is None:
        if traced or not host_checks().advance_steps(buffers):
            torch._foreach_add_(buffers, 1)
        return
    for buffer in buffers:
        buffer.add_((found_inf.to(buffer.device, non_blocking=True) == 0).to(buffer.dtype))
