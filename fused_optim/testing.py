"""Parity checks against torch.optim, for fused_optim's tests and for your CI.

:func:`compare_to_torch` runs PyTorch's own optimizer-parity recipe with an optimizer and with
torch.optim's for-loop implementation (``foreach=False``) from the same start, compares the
parameters and every state entry after every step, and returns a :class:`ParityReport`;
:func:`assert_matches_torch` does the same and raises ``AssertionError`` if they disagree::

    import torch
    from fused_optim.testing import assert_matches_torch, compare_to_torch

    assert_matches_torch("AdamW", {"lr": 0.01, "weight_decay": 0.1})
    report = compare_to_torch("SGD", {"lr": 0.01, "momentum": 0.9}, dtype=torch.bfloat16)
    print(report.summary())
    report.assert_ok()

The optimizer may also be your own: any class or ``factory(params, **config)`` returning a
``torch.optim.Optimizer``, checked against the torch.optim class it claims to match
(``reference="AdamW"``).

**The recipe** (PyTorch's, from its optimizer tests): a small MLP (4 -> 6 -> 3 with tanh) whose
last parameter has zero size, :data:`RECIPE_STEPS` iterations, no gradients at all at iteration
:data:`NO_GRAD_ITERATION` (``step()`` is still called), the first layer frozen
(``requires_grad=False``, so its gradients are ``None``) at :data:`FROZEN_ITERATIONS` and then
unfrozen. Everything is seeded from ``seed`` by a private ``torch.Generator``; the global RNG is
not touched.

**What is compared to what.** The optimizer runs the recipe, and so does torch.optim's for-loop
implementation (``foreach=False``) of the same algorithm, from the same start; after every step
the params and every state entry of the two runs are compared. The tolerances
(:func:`tolerance_for`) are torch's own figures, not tuned to fused_optim:

* fp32: ``FP32_MAX_ABS`` (max abs diff <= 3e-8 for Adam and AdamW, <= 1.2e-7 for SGD), the
  largest difference between torch's fused and for-loop implementations, measured where torch
  rounds correctly, **plus torch.optim's own rounding error on this CPU**, measured in the same
  run on the CPU: torch's fp32 CPU ``sqrt`` is not correctly rounded (one ulp off for about 0.6%
  of inputs on AVX2 machines and about 14% on AVX-512 machines), so its for-loop results move
  by an ulp or more from one CPU to the next. A third run evaluates torch.optim's own for-loop
  code with every operation rounded correctly (:func:`correctly_rounded_torch`); the distance
  between torch's actual run and that one, per step (params and states), is added to the
  bound of that step (:attr:`StepDiff.torch_rounding`). An optimizer within ``FP32_MAX_ABS`` of
  correctly rounded arithmetic therefore passes on every CPU (triangle inequality), while a
  kernel that is off by more than a rounding, or skips a tensor, still fails: torch's own
  rounding is a few ulps (5.96e-8 at most on this recipe, on the machines measured). The
  optimizer's distance from the correctly rounded run is reported too
  (:attr:`ParityReport.correctly_rounded_max_abs`: 0 for fused_optim's kernels, whose fp32
  arithmetic is correctly rounded with torch.optim's operation order; 1.4e-9 for torch's own
  ``fused=True`` AdamW).
* fp64: max abs diff <= 4 ulps of 1.0 (:data:`FP64_MAX_ABS`); torch's fp64 rounding errors are
  far below it.
* fp32 and fp64, where torch's own ``fused=True`` path disagrees with its for-loop by more than
  these figures for the config at hand (on GPUs, whose arithmetic contracts and orders
  operations differently; on the CPU, fused SGD with momentum, up to 4.8e-7, and fused Adam
  with a tensor ``lr`` in fp64, which computes the step size in the lr's fp32), the figure is
  replaced by that disagreement, measured in the same call on the same recipe and device
  (against the correctly rounded for-loop for fp32 on the CPU): a checker that fails torch's
  own implementation is wrong. The tolerance's description says when this happened.
* bf16 and fp16, where torch.optim's for-loop rounds every intermediate result to the low
  precision and a fused kernel rounds once: both are run against a float64 run of torch.optim
  from the same start, and for every tensor and step the optimizer's error must stay within
  :data:`LOW_PRECISION_FACTOR` (2) times torch.optim's own error in that dtype plus one rounding
  (the dtype's eps times the largest magnitude of the float64 result).

State entries: every one must have torch.optim's key, dtype, shape and device (with
``capturable=True``, ``step`` lives on the params' device), ``step`` must equal torch.optim's
exactly, and in fp32/fp64 every other entry is held to the same max-abs bound as the params. In
bf16/fp16 the states' differences are reported but not bounded (they are functions of gradients
taken at params that already differ by roundings, and torch's figures give no bound for them;
the params they produce are bounded), except that a non-finite value where torch.optim's is
finite fails. Finally, every parameter that torch.optim moved must have moved: a kernel that
silently skips a tensor can otherwise look close to the reference when steps are small.

**The reference.** torch.optim's class of the same name with ``foreach=False`` (its for-loop
path), built by :func:`reference_config` from the same config: ``capturable`` is dropped
(torch.optim refuses it for CPU tensors, and it changes where ``step`` lives, not the math),
tensor ``betas`` become floats (fused_optim reads them as values and does the scalar math in
fp64, as for floats; torch's tensor-betas path does it in fp32, a 1e-8 relative difference), and
``foreach``, ``fused`` and ``backend`` are removed. A tensor ``lr`` stays a tensor.

:data:`CONFIGS` is the table of flag combinations that torch's own optimizer tests use for SGD,
Adam and AdamW (``torch.testing._internal.common_optimizers``), minus those that only concern
other implementations (foreach, fused, differentiable); ``fused-optim verify`` runs all of them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import fused_optim
from fused_optim.backends import correctly_rounded as cr

__all__ = [
    "CONFIGS",
    "DTYPES",
    "FP32_MAX_ABS",
    "FP64_MAX_ABS",
    "FROZEN_ITERATIONS",
    "LOW_PRECISION_FACTOR",
    "NO_GRAD_ITERATION",
    "OPTIMIZERS",
    "PARAM_NAMES",
    "QUICK_CONFIGS",
    "RECIPE_STEPS",
    "ParityReport",
    "StepDiff",
    "Tolerance",
    "adapt_config",
    "assert_matches_torch",
    "build_params",
    "clipped_optimizer",
    "compare_to_torch",
    "config_label",
    "correctly_rounded_optimizer",
    "correctly_rounded_torch",
    "dtype_name",
    "make_inputs",
    "reference_config",
    "resolve_dtype",
    "run_distance",
    "run_recipe",
    "tolerance_for",
    "torch_counterpart",
]

# --------------------------------------------------------------------------------------------
# Cases as data
# --------------------------------------------------------------------------------------------

#: The optimizers fused_optim provides, by name.
OPTIMIZERS: tuple[str, ...] = ("SGD", "Adam", "AdamW")

#: Supported parameter dtypes, by short name, widest first.
DTYPES: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

_SGD_CONFIGS: tuple[dict[str, Any], ...] = (
    {},
    {"lr": 0.01},
    {"lr": torch.tensor(0.001)},
    {"lr": 0.01, "momentum": 0.9},
    {"lr": 0.01, "momentum": 0.9, "dampening": 0.5},
    {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1},
    {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
    {"lr": 0.01, "momentum": 0.9, "maximize": True, "nesterov": True},
)

_ADAM_CONFIGS: tuple[dict[str, Any], ...] = (
    {},
    {"lr": 0.01},
    {"lr": 0.01, "betas": (0.8, 0.99)},
    {"lr": 0.01, "weight_decay": 0.1},
    {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
    {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
    {"lr": 0.01, "amsgrad": True, "maximize": True},
    {"lr": 0.01, "betas": (0.6, 0.9), "eps": 1e-6},
    {"lr": torch.tensor(0.01)},
    {"capturable": True},
    {"weight_decay": 0.1, "amsgrad": True, "capturable": True},
    {"lr": torch.tensor(0.001), "amsgrad": True, "capturable": True},
    {
        "lr": torch.tensor(0.001),
        "betas": (torch.tensor([[[0.9]]]), torch.tensor([[0.99]])),
        "amsgrad": True,
        "capturable": True,
    },
)

#: Optimizer name -> the configurations (constructor keyword arguments) of torch's own optimizer
#: tests for it. Treat as read-only: :func:`compare_to_torch` works on deep copies.
CONFIGS: dict[str, tuple[dict[str, Any], ...]] = {
    "SGD": _SGD_CONFIGS,
    "Adam": _ADAM_CONFIGS,
    "AdamW": _ADAM_CONFIGS,
}

#: A small subset of :data:`CONFIGS` that still exercises every algorithm's main flags (momentum
#: with nesterov and weight decay, amsgrad, capturable, tensor lr): ``fused-optim verify --quick``.
QUICK_CONFIGS: dict[str, tuple[dict[str, Any], ...]] = {
    "SGD": (_SGD_CONFIGS[6], _SGD_CONFIGS[2]),
    "Adam": (_ADAM_CONFIGS[5], _ADAM_CONFIGS[11]),
    "AdamW": (_ADAM_CONFIGS[5], _ADAM_CONFIGS[11]),
}

#: torch's fused-vs-for-loop agreement in fp32 (max abs diff), by optimizer.
FP32_MAX_ABS: dict[str, float] = {"SGD": 1.2e-7, "Adam": 3e-8, "AdamW": 3e-8}
#: fp64: 4 ulps of 1.0.
FP64_MAX_ABS: float = 4 * torch.finfo(torch.float64).eps
#: bf16/fp16: the error against a float64 run may be this many times torch.optim's own error in
#: the same dtype (plus one rounding of the result).
LOW_PRECISION_FACTOR: float = 2.0

#: The recipe: iterations, the one without gradients, and those with the first layer frozen.
RECIPE_STEPS: int = 7
NO_GRAD_ITERATION: int = 2
FROZEN_ITERATIONS: tuple[int, ...] = (3, 4)
#: The recipe's parameters, in order (``nn.Sequential`` names, then the zero-size one).
PARAM_NAMES: tuple[str, ...] = ("0.weight", "0.bias", "2.weight", "2.bias", "empty")
_FROZEN_PARAMS = (0, 1)


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor({value.item():g})" if value.numel() == 1 else f"Tensor{tuple(value.shape)}"
    if isinstance(value, tuple | list):
        return "(" + ",".join(_short(v) for v in value) + ")"
    return str(value)


def config_label(config: Mapping[str, Any] | None) -> str:
    """A short readable id for a config: ``"lr=0.01-momentum=0.9"``, ``"defaults"`` if empty."""
    return "-".join(f"{k}={_short(v)}" for k, v in (config or {}).items()) or "defaults"


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A supported dtype from a ``torch.dtype`` or a name (``"bf16"``, ``"bfloat16"``, ...)."""
    if isinstance(dtype, str):
        text = dtype.strip().lower().removeprefix("torch.")
        aliases = {str(d).removeprefix("torch."): d for d in DTYPES.values()}
        aliases.update(DTYPES, half=torch.float16, float=torch.float32, double=torch.float64)
        if text not in aliases:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        return aliases[text]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; choose from {', '.join(DTYPES)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a supported dtype (``torch.bfloat16`` -> ``"bf16"``)."""
    return {d: name for name, d in DTYPES.items()}[dtype]


def adapt_config(name: str, config: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The one place that changes a case of :data:`CONFIGS` for a dtype, and says why.

    fp16 Adam/AdamW run with ``eps=0.1``, as torch's own fp16 Adam tests do: ``eps=1e-8`` flushes
    to zero in fp16, and so does ``v`` for small gradients, so the step is 0/0 for torch.optim
    itself. Everything else is returned unchanged (as a new dict).
    """
    if dtype == torch.float16 and name != "SGD":
        return {**config, "eps": 0.1}
    return dict(config)


def reference_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config for torch.optim's for-loop oracle, from the config under test.

    ``capturable`` is dropped: torch.optim refuses it for CPU tensors, and it changes where
    ``step`` lives, not the math (torch's capturable path would also compute the bias
    corrections in fp32 on the device). Tensor ``betas`` become floats: fused_optim reads them
    as values and does the scalar math in fp64 as for float betas, while torch.optim's
    tensor-betas path does it in the tensors' fp32 (a 1e-8 relative difference, visible only
    in fp64 params). ``foreach``, ``fused`` and ``backend`` are removed and ``foreach=False``
    selects the for-loop. A tensor ``lr`` stays a tensor: fused_optim follows torch there.
    """
    dropped = ("capturable", "foreach", "fused", "backend")
    result = {k: v for k, v in config.items() if k not in dropped}
    if "betas" in result:
        result["betas"] = tuple(float(b) for b in result["betas"])
    return result | {"foreach": False}


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def build_params(
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0
) -> list[Tensor]:
    """The recipe's parameters (see :data:`PARAM_NAMES`): leaf tensors that require grad.

    Drawn in fp32 (N(0, 0.25)) from ``torch.Generator().manual_seed(seed)``, then cast to
    ``dtype`` and moved to ``device``; the zero-size parameter is last.
    """
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        values = [torch.randn(p.shape, generator=gen) * 0.5 for p in model.parameters()]
    values.append(torch.zeros(0))
    return [v.to(device=device, dtype=dtype).requires_grad_() for v in values]


def make_inputs(steps: int = RECIPE_STEPS, seed: int = 0) -> list[Tensor]:
    """The recipe's fp32 CPU inputs, one (5, 4) batch per iteration, seeded by ``seed + 1``."""
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(5, 4, generator=gen) for _ in range(steps)]


def _loss(params: Sequence[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2, empty = params
    hidden = torch.tanh(x @ w1.t() + b1)
    return ((hidden @ w2.t() + b2) ** 2).mean() + empty.sum()


def run_recipe(
    factory: Callable[..., torch.optim.Optimizer],
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    device: torch.device | str = "cpu",
    steps: int = RECIPE_STEPS,
    seed: int = 0,
) -> Iterator[tuple[list[Tensor], torch.optim.Optimizer]]:
    """Run the recipe with ``factory(params, **config)``; yield ``(params, optimizer)`` after
    each iteration's ``step()`` (the same objects every time, updated in place).

    Defaults: no config, fp32, CPU, :data:`RECIPE_STEPS` (7) iterations, seed 0. The config is
    deep-copied first, so tensors in it are never shared between runs.
    """
    params = build_params(dtype, device, seed)
    inputs = make_inputs(steps, seed)
    opt = factory(params, **copy.deepcopy(dict(config or {})))
    for it in range(steps):
        opt.zero_grad(set_to_none=True)
        frozen = it in FROZEN_ITERATIONS
        for i in _FROZEN_PARAMS:
            params[i].requires_grad_(not frozen)
        if it != NO_GRAD_ITERATION:
            _loss(params, inputs[it].to(device=device, dtype=dtype)).backward()
        opt.step()
        yield params, opt


# --------------------------------------------------------------------------------------------
# torch.optim, correctly rounded
# --------------------------------------------------------------------------------------------


def _inplace(self: Tensor, value: Tensor) -> Tensor:
    self.copy_(value)
    return self


def _cr_sqrt(self, *, out=None):
    return cr.sqrt(self) if out is None else NotImplemented


def _cr_add(self, other, *, alpha=1, out=None):
    if alpha == 1 or out is not None or not isinstance(self, Tensor):
        return NotImplemented
    return cr.fma(other, alpha, self)  # ATen's vectorized a + alpha * b is one fma


def _cr_lerp(self, end, weight):
    return NotImplemented if isinstance(weight, Tensor) else cr.lerp(self, end, weight)


def _cr_addcmul(self, tensor1, tensor2, *, value=1, out=None):
    if out is not None:
        return NotImplemented
    return cr.fma(tensor1 * value, tensor2, self)  # ATen: self + (value * t1) * t2


def _cr_addcdiv(self, tensor1, tensor2, *, value=1, out=None):
    if out is not None:
        return NotImplemented
    return self + (tensor1 * value) / tensor2  # ATen: self + (value * t1) / t2


def _handlers() -> dict[Any, tuple[Callable, bool]]:
    """torch function -> (correctly rounded version, whether it writes into ``self``)."""
    table = {}
    for name, handler in (
        ("sqrt", _cr_sqrt),
        ("add", _cr_add),
        ("lerp", _cr_lerp),
        ("addcmul", _cr_addcmul),
        ("addcdiv", _cr_addcdiv),
    ):
        table[getattr(torch.Tensor, name)] = (handler, False)
        table[getattr(torch.Tensor, name + "_")] = (handler, True)
        table[getattr(torch, name)] = (handler, False)
    return table


class _CorrectlyRounded(torch.overrides.TorchFunctionMode):
    handlers = _handlers()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = self.handlers.get(func)
        if entry is not None and args and isinstance(args[0], Tensor):
            handler, in_place = entry
            self_tensor = args[0]
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            if all(
                t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors
            ) and not any(t.is_sparse or t.requires_grad for t in tensors):
                result = handler(*args, **kwargs)
                if result is not NotImplemented:
                    return _inplace(self_tensor, result) if in_place else result
        return func(*args, **kwargs)


def correctly_rounded_torch():
    """A context in which torch's fp32 CPU ``sqrt``, ``lerp``, ``addcmul``, ``addcdiv`` and
    ``add(..., alpha=...)`` (and their in-place forms) round correctly, on every CPU.

    torch.optim's for-loop step run inside it is torch.optim's own code and operation order,
    with each operation rounded as IEEE arithmetic prescribes and each multiply-add that ATen's
    vectorized CPU kernels fuse evaluated as one fused multiply-add
    (see :mod:`fused_optim.backends.correctly_rounded`). Outside it, torch's fp32 ``sqrt`` is
    off by an ulp for a share of inputs that depends on the CPU (about 0.6% on AVX2, 14% on
    AVX-512), so torch.optim's own results move by an ulp or more from machine to machine.
    Other dtypes, other devices and tensors that require grad are left to torch.
    """
    return _CorrectlyRounded()


def clipped_optimizer(
    factory: Callable[..., torch.optim.Optimizer],
    max_norm: float,
    total_norm: Callable[[], Tensor] | None = None,
    on_norm: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> Callable[..., torch.optim.Optimizer]:
    """``factory`` whose optimizers clip, before every ``step()``, the gradients of their params
    as :func:`torch.nn.utils.clip_grad_norm_` does (:func:`torch.nn.utils.get_total_norm`, then
    :func:`torch.nn.utils.clip_grads_with_norm_`): torch's recipe for what fused_optim's
    ``max_grad_norm`` does inside its step.

    ``total_norm()``, if given, supplies the norm the clip uses instead of torch's own (how
    :func:`compare_to_torch` checks the step apart from the norm's rounding); ``on_norm(own,
    used, exact)`` is told torch's own norm, the one used and the norm computed in fp64, at
    every step that has gradients."""

    def clip(with_grads: list[Tensor]) -> None:
        grads = [p.grad for p in with_grads]
        own = torch.nn.utils.get_total_norm(grads)
        used = own if total_norm is None else total_norm()
        if on_norm is not None:
            on_norm(own, used, torch.nn.utils.get_total_norm([g.double() for g in grads]))
        torch.nn.utils.clip_grads_with_norm_(with_grads, max_norm, used)

    def build(params, **kwargs):
        opt = factory(params, **kwargs)
        step = opt.step

        def clipped_step(*args, **step_kwargs):
            with_grads = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if with_grads:
                clip(with_grads)
            return step(*args, **step_kwargs)

        opt.step = clipped_step
        return opt

    return build


def correctly_rounded_optimizer(
    factory: Callable[..., torch.optim.Optimizer],
) -> Callable[..., torch.optim.Optimizer]:
    """``factory`` whose optimizers run every ``step()`` inside :func:`correctly_rounded_torch`
    (for torch.optim's classes: torch.optim's for-loop arithmetic, rounded correctly)."""

    def build(params, **kwargs):
        opt = factory(params, **kwargs)
        step = opt.step

        def correctly_rounded_step(*args, **step_kwargs):
            with correctly_rounded_torch():
                return step(*args, **step_kwargs)

        opt.step = correctly_rounded_step
        return opt

    return build


# --------------------------------------------------------------------------------------------
# Tolerances and the report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """What "agrees with torch.optim" means for one dtype.

    ``kind`` is ``"max_abs"`` (fp32, fp64: every difference <= ``atol``) or
    ``"vs_torch_error"`` (bf16, fp16: error against a float64 run <= ``factor`` x torch.optim's
    own error + ``rounding`` x the float64 result's largest magnitude).
    """

    kind: str
    atol: float | None = None
    factor: float | None = None
    rounding: float | None = None
    description: str = ""

    def short(self) -> str:
        """A compact form for tables: ``"3e-08"`` or ``"2x torch+1rnd"``."""
        if self.kind == "max_abs":
            return f"{self.atol:.2g}"
        return f"{self.factor:g}x torch+1rnd"


def tolerance_for(
    optimizer: str | None, dtype: torch.dtype, atol: float | None = None
) -> Tolerance:
    """The tolerance for an optimizer family (``"SGD"``, ``"Adam"``, ``"AdamW"``) and dtype.

    ``atol`` replaces the fp32/fp64 bound (it is an error to give it for bf16/fp16, whose rule
    is relative to torch.optim's own error). Without it, fp32 needs a known family.
    """
    dtype = resolve_dtype(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        if atol is not None:
            raise ValueError(
                "atol applies to fp32 and fp64 only; bf16/fp16 are bounded by torch.optim's "
                "own error in the same dtype"
            )
        eps = torch.finfo(dtype).eps
        return Tolerance(
            "vs_torch_error",
            factor=LOW_PRECISION_FACTOR,
            rounding=eps,
            description=(
                f"error vs a float64 torch.optim run <= {LOW_PRECISION_FACTOR:g} x torch.optim's "
                f"own {dtype_name(dtype)} error + one rounding ({eps:.3g} x |result|)"
            ),
        )
    if atol is not None:
        return Tolerance("max_abs", atol=float(atol), description=f"max abs diff <= {atol:.3g}")
    if dtype == torch.float64:
        return Tolerance(
            "max_abs", atol=FP64_MAX_ABS, description="max abs diff <= 4 ulps of 1.0 (fp64)"
        )
    if optimizer not in FP32_MAX_ABS:
        raise ValueError(
            "no default fp32 tolerance for this reference: pass atol=..., or a reference that "
            f"is one of {', '.join(FP32_MAX_ABS)} (or subclasses torch.optim.SGD/Adam)"
        )
    bound = FP32_MAX_ABS[optimizer]
    return Tolerance(
        "max_abs",
        atol=bound,
        description=(
            f"max abs diff <= {bound:.2g} (torch's fused-vs-for-loop agreement for "
            f"{optimizer} in fp32)"
        ),
    )


@dataclass
class StepDiff:
    """How the optimizer and torch.optim compare after one iteration of the recipe.

    ``*_max_abs`` / ``*_max_rel`` are against torch.optim run in the same dtype (relative
    differences over the elements where torch.optim's value is non-zero). ``error`` and
    ``reference_error`` (bf16/fp16 only, else None) are the largest errors of the optimizer
    and of torch.optim against the float64 run. ``torch_rounding`` (fp32 on the CPU, else
    None) is how far torch.optim's for-loop is from the same code evaluated with correctly
    rounded arithmetic on this CPU (params and states); it is added to this step's fp32 bound.
    ``correctly_rounded_max_abs`` is the optimizer's own distance from that correctly rounded
    run. ``worst_ratio`` is the largest difference / allowed over this step's checks (<= 1
    passes).
    """

    iteration: int
    had_grads: bool
    frozen: tuple[str, ...]
    param_max_abs: float = 0.0
    param_max_rel: float = 0.0
    state_max_abs: float = 0.0
    state_max_rel: float = 0.0
    error: float | None = None
    reference_error: float | None = None
    torch_rounding: float | None = None
    correctly_rounded_max_abs: float | None = None
    worst_ratio: float = 0.0
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in self.__dict__.items()}


def _nanmax(values) -> float:
    """max() that returns NaN if any value is NaN (Python's max() depends on the order)."""
    result = 0.0
    for value in values:
        if value is None:
            continue
        if math.isnan(value):
            return math.nan
        result = max(result, value)
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN/inf
    if isinstance(value, Tensor):
        return value.tolist() if value.numel() <= 16 else f"Tensor{tuple(value.shape)}"
    if isinstance(value, torch.dtype):
        return dtype_name(value) if value in DTYPES.values() else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


@dataclass
class ParityReport:
    """The outcome of :func:`compare_to_torch`.

    Per step in ``steps`` (:class:`StepDiff`), and overall through the properties: the max abs
    and max rel differences of params and state against torch.optim in the same dtype, the
    ``tolerance`` used, which params each run moved, and ``passed``. ``failures`` lists every
    violated check as a readable line. ``assert_ok()`` (alias ``raise_if_failed()``) raises an
    ``AssertionError`` with a summary unless ``passed``.
    """

    optimizer: str
    reference: str
    config: dict[str, Any]
    dtype: torch.dtype
    device: str
    backend: str | None
    tolerance: Tolerance
    steps: list[StepDiff] = field(default_factory=list)
    #: Non-empty params, by name: whether the optimizer / torch.optim changed them at all.
    params_moved: dict[str, bool] = field(default_factory=dict)
    reference_params_moved: dict[str, bool] = field(default_factory=dict)
    #: Failures that do not belong to one step (moved check, clipping's norms).
    final_failures: list[str] = field(default_factory=list)
    #: With ``max_grad_norm``: the largest relative difference between the optimizer's total
    #: gradient norm and torch's ``get_total_norm``, and how many steps the norm exceeded
    #: ``max_grad_norm`` (the clip scaled the gradients down).
    clip_norm_max_rel: float = 0.0
    clipped_steps: int = 0

    # Overall figures ----------------------------------------------------------------------
    @property
    def param_max_abs(self) -> float:
        return _nanmax(s.param_max_abs for s in self.steps)

    @property
    def param_max_rel(self) -> float:
        return _nanmax(s.param_max_rel for s in self.steps)

    @property
    def state_max_abs(self) -> float:
        return _nanmax(s.state_max_abs for s in self.steps)

    @property
    def state_max_rel(self) -> float:
        return _nanmax(s.state_max_rel for s in self.steps)

    @property
    def torch_rounding(self) -> float | None:
        """How far torch.optim's for-loop strayed from correctly rounded arithmetic on this CPU
        (max over steps, params and states), or None where that is not measured."""
        values = [s.torch_rounding for s in self.steps if s.torch_rounding is not None]
        return _nanmax(values) if values else None

    @property
    def correctly_rounded_max_abs(self) -> float | None:
        """The optimizer's largest difference from torch.optim's for-loop evaluated with
        correctly rounded arithmetic, or None where that is not measured."""
        values = [s.correctly_rounded_max_abs for s in self.steps]
        values = [v for v in values if v is not None]
        return _nanmax(values) if values else None

    @property
    def max_abs(self) -> float:
        """Largest abs difference from torch.optim (same dtype), params and state."""
        return _nanmax((self.param_max_abs, self.state_max_abs))

    @property
    def max_rel(self) -> float:
        """Largest relative difference from torch.optim (same dtype), params and state."""
        return _nanmax((self.param_max_rel, self.state_max_rel))

    @property
    def worst_ratio(self) -> float:
        """Largest difference / allowed over all checks (<= 1 passes; NaN if any was NaN)."""
        return _nanmax(s.worst_ratio for s in self.steps)

    @property
    def moved(self) -> bool:
        """True if torch.optim moved at least one param and this optimizer moved all of those."""
        return any(self.reference_params_moved.values()) and all(
            self.params_moved.get(name, False)
            for name, ref_moved in self.reference_params_moved.items()
            if ref_moved
        )

    @property
    def failures(self) -> list[str]:
        return [line for s in self.steps for line in s.failures] + self.final_failures

    @property
    def passed(self) -> bool:
        return not self.failures and self.moved

    # Presentation -------------------------------------------------------------------------
    def title(self) -> str:
        backend = f", backend={self.backend}" if self.backend else ""
        return (
            f"{self.optimizer} vs {self.reference} [{config_label(self.config)}, "
            f"{dtype_name(self.dtype)}, {self.device}{backend}]"
        )

    def summary(self, max_failures: int = 20) -> str:
        """A readable multi-line account: the verdict, the tolerance, the figures and up to
        ``max_failures`` (default 20) failed checks."""
        lines = [
            f"{self.title()}: {'passed' if self.passed else 'FAILED'}",
            f"  tolerance: {self.tolerance.description}",
            f"  params: max abs diff {self.param_max_abs:.3g}, max rel diff "
            f"{self.param_max_rel:.3g}; state: max abs diff {self.state_max_abs:.3g}, "
            f"max rel diff {self.state_max_rel:.3g} (vs torch.optim, same dtype)",
            f"  worst check used {self.worst_ratio:.3g} of its tolerance",
        ]
        if self.torch_rounding is not None:
            lines.insert(
                2,
                f"  torch.optim's for-loop vs correctly rounded arithmetic on this CPU: max abs "
                f"{self.torch_rounding:.3g} (added to the bound); this optimizer vs correctly "
                f"rounded torch.optim: max abs {self.correctly_rounded_max_abs:.3g}",
            )
        failures = self.failures
        for line in failures[:max_failures]:
            lines.append(f"  - {line}")
        if len(failures) > max_failures:
            lines.append(f"  ... and {len(failures) - max_failures} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def assert_ok(self) -> ParityReport:
        """Raise ``AssertionError`` with :meth:`summary` unless ``passed``; return self."""
        if not self.passed:
            raise AssertionError(self.summary())
        return self

    raise_if_failed = assert_ok

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-compatible values (non-finite floats as strings)."""
        return _jsonable(
            {
                "optimizer": self.optimizer,
                "reference": self.reference,
                "config": config_label(self.config),
                "config_values": self.config,
                "dtype": self.dtype,
                "device": self.device,
                "backend": self.backend,
                "passed": self.passed,
                "max_abs": self.max_abs,
                "max_rel": self.max_rel,
                "param_max_abs": self.param_max_abs,
                "param_max_rel": self.param_max_rel,
                "state_max_abs": self.state_max_abs,
                "state_max_rel": self.state_max_rel,
                "worst_ratio": self.worst_ratio,
                "torch_rounding": self.torch_rounding,
                "correctly_rounded_max_abs": self.correctly_rounded_max_abs,
                "clip_norm_max_rel": self.clip_norm_max_rel,
                "clipped_steps": self.clipped_steps,
                "tolerance": self.tolerance.__dict__,
                "moved": self.moved,
                "params_moved": self.params_moved,
                "reference_params_moved": self.reference_params_moved,
                "failures": self.failures,
                "steps": [s.to_dict() for s in self.steps],
            }
        )


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------

_TORCH_CLASSES = {name: getattr(torch.optim, name) for name in OPTIMIZERS}
_FUSED_CLASSES = {name: getattr(fused_optim, name) for name in OPTIMIZERS}


def torch_counterpart(optimizer: Any) -> str | None:
    """``"SGD"``, ``"Adam"`` or ``"AdamW"``: the torch.optim class that an optimizer class
    subclasses (the most specific one), or None (also for anything that is not a class)."""
    if not isinstance(optimizer, type):
        return None
    for name in ("AdamW", "Adam", "SGD"):
        if issubclass(optimizer, _TORCH_CLASSES[name]):
            return name
    return None


def _qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    for package in ("fused_optim", "torch.optim"):
        if module.startswith(package + "."):  # the public name: fused_optim.AdamW
            module = package
    return f"{module}.{name}" if module else name


def _resolve_optimizer(optimizer: Any) -> tuple[Callable, str, str | None]:
    """(factory, label, family) for a name, a class or a factory."""
    if isinstance(optimizer, str):
        if optimizer not in _FUSED_CLASSES:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}, or pass "
                "a class or factory"
            )
        cls = _FUSED_CLASSES[optimizer]
        return cls, f"fused_optim.{optimizer}", optimizer
    if not callable(optimizer):
        raise TypeError(f"optimizer must be a name, a class or a factory, got {optimizer!r}")
    family = torch_counterpart(optimizer)
    return optimizer, _qualname(optimizer), family


def _resolve_reference(reference: Any, family: str | None) -> tuple[Callable, str, bool]:
    """(factory, label, is torch.optim's own class) for the reference."""
    if reference is None:
        if family is None:
            raise ValueError(
                "cannot tell which torch.optim class this optimizer should match: pass "
                f"reference= one of {', '.join(OPTIMIZERS)} (or a class or factory)"
            )
        reference = family
    if isinstance(reference, str):
        if reference not in _TORCH_CLASSES:
            raise ValueError(
                f"unknown reference {reference!r}; choose from {', '.join(OPTIMIZERS)}"
            )
        reference = _TORCH_CLASSES[reference]
    if not callable(reference):
        raise TypeError(f"reference must be a name, a class or a factory, got {reference!r}")
    builtin = reference in _TORCH_CLASSES.values()
    label = _qualname(reference) + ("(foreach=False)" if builtin else "")
    return reference, label, builtin


def _max_abs(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


def _max_rel(a: Tensor, b: Tensor) -> float:
    """Largest |a - b| / |b| over the elements where b != 0 (the others count in max abs)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    nonzero = b != 0
    if not bool(nonzero.any()):
        return 0.0
    return ((a - b).abs()[nonzero] / b.abs()[nonzero]).max().item()


def _state_entries(
    opt: torch.optim.Optimizer, params: Sequence[Tensor]
) -> dict[str, tuple[Tensor, Any]]:
    """``"<param name>.<state key>"`` -> (param, value), in param order and sorted keys."""
    return {
        f"{name}.{key}": (p, value)
        for name, p in zip(PARAM_NAMES, params)
        for key, value in sorted(opt.state.get(p, {}).items())
    }


class _StepChecker:
    """Collects one step's figures and failures."""

    def __init__(self, step: StepDiff, tolerance: Tolerance, slack: float = 0.0):
        self.step = step
        self.tolerance = tolerance
        self.slack = slack  # torch.optim's own rounding error on this CPU (fp32, see StepDiff)
        self.errors: list[float] = []
        self.reference_errors: list[float] = []
        self.ratios: list[float] = []

    def fail(self, message: str) -> None:
        self.step.failures.append(f"iteration {self.step.iteration}: {message}")

    def check_values(
        self, what: str, ours: Tensor, theirs: Tensor, truth: Tensor | None, is_state: bool
    ) -> None:
        """Same-dtype figures, then the tolerance: against ``theirs`` (max abs), or against
        ``truth`` relative to torch.optim's own error (low precision)."""
        diff, rel = _max_abs(ours, theirs), _max_rel(ours, theirs)
        if is_state:
            self.step.state_max_abs = _nanmax((self.step.state_max_abs, diff))
            self.step.state_max_rel = _nanmax((self.step.state_max_rel, rel))
        else:
            self.step.param_max_abs = _nanmax((self.step.param_max_abs, diff))
            self.step.param_max_rel = _nanmax((self.step.param_max_rel, rel))
        tol = self.tolerance
        if tol.kind == "max_abs":
            value, allowed = diff, tol.atol + self.slack
            detail = f"max abs diff {diff:.3g} > {allowed:.3g}"
            if self.slack:
                detail += f" ({tol.atol:.3g} + torch.optim's own rounding {self.slack:.3g})"
        else:
            if ours.numel() == 0:
                return
            if is_state:
                # States are functions of gradients taken at params that already differ by
                # roundings: torch's figures give no bound for them in bf16/fp16. Their
                # differences are reported, the params they produce are bounded, and a
                # non-finite value where torch.optim has a finite one fails.
                if bool((~torch.isfinite(ours.cpu()) & torch.isfinite(theirs.cpu())).any()):
                    self.fail(f"{what}: non-finite values where torch.optim's are finite")
                return
            value = _max_abs(ours, truth)
            reference_error = _max_abs(theirs, truth)
            magnitude = truth.detach().abs().max().item()
            allowed = tol.factor * reference_error + tol.rounding * magnitude
            self.errors.append(value)
            self.reference_errors.append(reference_error)
            detail = (
                f"error vs float64 {value:.3g} > allowed {allowed:.3g} "
                f"(torch.optim's own error {reference_error:.3g})"
            )
        ratio = value / allowed if allowed > 0 else (0.0 if value == 0 else math.inf)
        self.ratios.append(ratio)
        if not value <= allowed:  # NaN fails
            self.fail(f"{what}: {detail}")

    def finish(self) -> StepDiff:
        self.step.worst_ratio = _nanmax(self.ratios)
        if self.tolerance.kind != "max_abs":
            self.step.error = _nanmax(self.errors)
            self.step.reference_error = _nanmax(self.reference_errors)
        return self.step


def _compare_step(
    checker: _StepChecker,
    params: Sequence[Tensor],
    opt: torch.optim.Optimizer,
    ref_params: Sequence[Tensor],
    ref_opt: torch.optim.Optimizer,
    truth: tuple[Sequence[Tensor], torch.optim.Optimizer] | None,
    capturable: bool,
) -> None:
    for i, name in enumerate(PARAM_NAMES):
        truth_value = truth[0][i] if truth else None
        checker.check_values(name, params[i], ref_params[i], truth_value, is_state=False)
    ours, theirs = _state_entries(opt, params), _state_entries(ref_opt, ref_params)
    truth_state = _state_entries(truth[1], truth[0]) if truth else {}
    if list(ours) != list(theirs):
        missing = [k for k in theirs if k not in ours]
        extra = [k for k in ours if k not in theirs]
        checker.fail(f"state keys differ: missing {missing}, unexpected {extra}")
    for key, (param, a) in ours.items():
        if key not in theirs:
            continue
        b = theirs[key][1]
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            if type(a) is not type(b) or a != b:
                checker.fail(f"state {key}: {a!r} != torch.optim's {b!r}")
            continue
        is_step = key.endswith(".step")
        want_device = param.device if (is_step and capturable) else b.device
        if a.dtype != b.dtype or a.shape != b.shape or a.device != want_device:
            checker.fail(
                f"state {key}: {a.dtype}, shape {tuple(a.shape)}, on {a.device}; torch.optim's: "
                f"{b.dtype}, shape {tuple(b.shape)}, on {want_device}"
            )
            continue
        if is_step:
            if not torch.equal(a.cpu(), b.cpu()):
                checker.fail(f"state {key}: {a.item()} != torch.optim's {b.item()}")
            continue
        truth_value = truth_state[key][1] if key in truth_state else None
        checker.check_values(f"state {key}", a, b, truth_value, is_state=True)


def compare_to_torch(
    optimizer: str | type | Callable[..., torch.optim.Optimizer],
    config: Mapping[str, Any] | None = None,
    *,
    reference: str | type | Callable[..., torch.optim.Optimizer] | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    steps: int = RECIPE_STEPS,
    seed: int = 0,
    backend: str | None = None,
    atol: float | None = None,
    max_grad_norm: float | None = None,
) -> ParityReport:
    """Run PyTorch's parity recipe with ``optimizer`` and with torch.optim; compare every step.

    Args:
        optimizer: ``"SGD"``, ``"Adam"`` or ``"AdamW"`` (fused_optim's class), any optimizer
            class, or any ``factory(params, **config) -> torch.optim.Optimizer``.
        config: constructor keyword arguments for both optimizers (see
            :func:`reference_config` for how the reference's copy is adapted). Default: None
            (the defaults of both).
        reference: what to compare against: a name (``"SGD"``, ``"Adam"``, ``"AdamW"``: that
            torch.optim class, run with ``foreach=False``), a class or a factory. Default: None,
            the torch.optim class the optimizer subclasses (``"AdamW"`` for fused_optim.AdamW);
            required for a factory or a class that subclasses none of them. A class or factory
            other than torch.optim's SGD/Adam/AdamW gets ``config`` unchanged.
        dtype: the params' dtype, a ``torch.dtype`` or a name (``"fp64"``, ``"fp32"``,
            ``"bf16"``, ``"fp16"``). Default: ``torch.float32``. For fp16 Adam/AdamW use
            ``eps=0.1`` as torch's own tests do (see :func:`adapt_config`): with the default
            eps torch.optim itself divides 0 by 0.
        device: where params, grads and states live. Default: ``"cpu"``. The float64 run that
            bf16/fp16 are measured against always runs on the CPU.
        steps: iterations of the recipe. Default: :data:`RECIPE_STEPS` (7). Fewer than 5 skip
            part of the recipe (no-grad iteration 2, frozen layer at 3-4).
        seed: seeds the params (and, with ``seed + 1``, the inputs). Default: 0.
        backend: passed to the optimizer as ``backend=`` unless None (fused_optim's ``"triton"``
            or ``"reference"``). Default: None (the optimizer's own default; for fused_optim,
            automatic).
        atol: replaces the default max-abs bound for fp32/fp64 (see :func:`tolerance_for`).
            Default: None (torch's figures).
        max_grad_norm: gradient clipping: the optimizer gets ``max_grad_norm=`` (fused_optim's
            clip inside its step, which must expose ``last_grad_norm``), torch.optim's runs clip
            as :func:`torch.nn.utils.clip_grad_norm_` before every step (see
            :func:`clipped_optimizer`), with the optimizer's norm, so that params and states
            compare the step within the usual bounds; the norm is checked apart: at most as far
            from the norm computed in fp64 as torch's ``get_total_norm`` is, plus two roundings
            of the result's dtype.
            Default: None (no clipping).

    Returns:
        A :class:`ParityReport`; nothing is raised for a mismatch (use
        :func:`assert_matches_torch` or ``report.assert_ok()``). Exceptions raised by either
        optimizer propagate.
    """
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    config = copy.deepcopy(dict(config or {}))
    factory, label, family = _resolve_optimizer(optimizer)
    ref_factory, ref_label, builtin = _resolve_reference(reference, family)
    ref_config = reference_config(config) if builtin else copy.deepcopy(config)
    if builtin:
        family = torch_counterpart(ref_factory)
    extra = {} if backend is None else {"backend": backend}
    built: list[torch.optim.Optimizer] = []  # the candidate optimizer, once the recipe built it
    norms: list[tuple[Tensor, Tensor, Tensor]] = []  # per clipped step: torch's, ours, fp64
    compared_reference = ref_factory
    if max_grad_norm is not None:
        # torch.optim's runs clip with the candidate's norm (the runs go in lockstep: its step
        # has run when torch.optim's runs), so that the params compare the step alone; the
        # norm itself is checked against torch's get_total_norm, within the rounding of a sum.
        extra["max_grad_norm"] = max_grad_norm
        compared_reference = clipped_optimizer(
            ref_factory, max_grad_norm, lambda: built[0].last_grad_norm,
            lambda own, used, exact: norms.append((own, used, exact)),
        )  # fmt: skip
        candidate_norm_reference = clipped_optimizer(
            ref_factory, max_grad_norm, lambda: built[0].last_grad_norm
        )
        ref_factory = clipped_optimizer(ref_factory, max_grad_norm)

    def candidate(params, **kwargs):
        built.append(factory(params, **kwargs, **extra))
        return built[-1]

    low_precision = dtype in (torch.bfloat16, torch.float16)
    if family is None and dtype == torch.float32 and atol is None:
        # A custom reference: find its algorithm from the optimizer it builds.
        probe = ref_factory(build_params(dtype, device, seed), **copy.deepcopy(ref_config))
        family = torch_counterpart(type(probe))
    tolerance = tolerance_for(family, dtype, atol)
    measure_rounding = dtype == torch.float32 and device.type == "cpu"
    if builtin and atol is None and not low_precision_dtype(dtype):
        oracle = correctly_rounded_optimizer(ref_factory) if measure_rounding else ref_factory
        tolerance = _widen_to_torch_fused(
            tolerance, ref_factory, oracle, ref_config, dtype, device, steps, seed
        )
    report = ParityReport(
        optimizer=label,
        reference=ref_label if max_grad_norm is None else f"{ref_label} + clip_grad_norm_",
        config=config if max_grad_norm is None else {**config, "max_grad_norm": max_grad_norm},
        dtype=dtype,
        device=str(device),
        backend=backend,
        tolerance=tolerance,
    )
    kw = dict(steps=steps, seed=seed)
    runs = [
        run_recipe(candidate, config, dtype, device=device, **kw),
        run_recipe(compared_reference, ref_config, dtype, device=device, **kw),
    ]
    if low_precision:
        runs.append(run_recipe(ref_factory, ref_config, torch.float64, device="cpu", **kw))
    # fp32 on the CPU: torch.optim's for-loop again, with correctly rounded arithmetic (see
    # correctly_rounded_torch). How far torch's own run is from it is torch's rounding on this
    # CPU, and goes into the bound; the candidate's distance from it is reported.
    if measure_rounding:
        exact_reference = ref_factory if max_grad_norm is None else candidate_norm_reference
        exact_factory = correctly_rounded_optimizer(exact_reference)
        runs.append(run_recipe(exact_factory, ref_config, dtype, device=device, **kw))
    capturable = bool(config.get("capturable", False))
    for it, results in enumerate(zip(*runs)):
        (params, opt), (ref_params, ref_opt) = results[:2]
        truth = results[2] if low_precision else None
        step = StepDiff(
            iteration=it,
            had_grads=it != NO_GRAD_ITERATION,
            frozen=tuple(PARAM_NAMES[i] for i in _FROZEN_PARAMS) if it in FROZEN_ITERATIONS else (),
        )
        slack = 0.0
        if measure_rounding:
            exact = results[-1]
            slack = step.torch_rounding = run_distance((ref_params, ref_opt), exact)
            step.correctly_rounded_max_abs = run_distance((params, opt), exact)
        checker = _StepChecker(step, tolerance, slack)
        _compare_step(checker, params, opt, ref_params, ref_opt, truth, capturable)
        report.steps.append(checker.finish())

    for it, (own, used, exact) in enumerate(norms):
        # The optimizer's norm may be as far from the fp64 norm as torch's own is, plus two
        # roundings to the result's dtype (torch rounds each tensor's norm and the total).
        exact_value, own_value, used_value = float(exact), float(own), float(used)
        error, torch_error = abs(used_value - exact_value), abs(own_value - exact_value)
        allowed = torch_error + 2 * torch.finfo(own.dtype).eps * abs(exact_value)
        if own_value:
            difference = abs(used_value - own_value) / abs(own_value)
            report.clip_norm_max_rel = max(report.clip_norm_max_rel, difference)
        report.clipped_steps += int(own_value > max_grad_norm)
        if not error <= allowed:
            report.final_failures.append(
                f"clipped step {it}: total norm {used_value:.9g} is {error:.3g} from the fp64 "
                f"norm {exact_value:.9g}; torch's get_total_norm {own_value:.9g} is "
                f"{torch_error:.3g} from it (allowed: that + 2 eps, {allowed:.3g})"
            )
    initial = build_params(dtype, device, seed)
    for name, p0, p, ref in zip(PARAM_NAMES, initial, params, ref_params):
        if p0.numel():
            report.params_moved[name] = not torch.equal(p.detach(), p0.detach())
            report.reference_params_moved[name] = not torch.equal(ref.detach(), p0.detach())
    if not any(report.reference_params_moved.values()):
        report.final_failures.append("torch.optim moved no parameter: nothing was compared")
    for name, ref_moved in report.reference_params_moved.items():
        if ref_moved and not report.params_moved[name]:
            report.final_failures.append(f"{name} never moved, but torch.optim moved it")
    return report


def low_precision_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _max_abs_between(a: list[Tensor], b: list[Tensor]) -> float:
    return max(
        (
            (x.detach().double() - y.detach().double()).abs().max().item()
            for x, y in zip(a, b)
            if x.numel()
        ),
        default=0.0,
    )


def run_distance(run, other) -> float:
    """Max abs difference between two runs of the recipe at the same iteration: params and
    every floating state tensor (other than ``step``) that both have."""
    (params, opt), (other_params, other_opt) = run, other
    worst = _max_abs_between(list(params), list(other_params))
    for p, q in zip(params, other_params):
        mine = opt.state.get(p, {})
        for key, value in other_opt.state.get(q, {}).items():
            if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                if key in mine and mine[key].shape == value.shape:
                    worst = max(worst, _max_abs_between([mine[key]], [value]))
    return worst


def torch_fused_agreement(
    reference: Callable[..., torch.optim.Optimizer],
    config: Mapping[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    steps: int = RECIPE_STEPS,
    seed: int = 0,
    oracle: Callable[..., torch.optim.Optimizer] | None = None,
) -> float | None:
    """Max abs difference between torch.optim's ``fused=True`` path and ``oracle`` (default:
    its for-loop path, ``reference`` itself) on this recipe and device (params and every
    floating state tensor, every step), or None where torch's fused path does not run."""
    fused_config = {**config, "foreach": False, "fused": True}
    oracle = oracle or reference
    try:
        runs = zip(
            run_recipe(reference, fused_config, dtype, device=device, steps=steps, seed=seed),
            run_recipe(oracle, config, dtype, device=device, steps=steps, seed=seed),
        )
        return max((run_distance(run, ref_run) for run, ref_run in runs), default=0.0)
    except (RuntimeError, ValueError):
        return None


def _widen_to_torch_fused(
    tolerance, reference, oracle, config, dtype, device, steps, seed
) -> Tolerance:
    """Where torch's own ``fused=True`` path disagrees with its for-loop path by more than
    torch's figure (GPU arithmetic contracts and orders operations differently; on the CPU,
    fused SGD rounds its momentum differently and fused Adam with a tensor ``lr`` computes the
    step size in the lr's dtype), the bound is that disagreement, measured on the same recipe,
    config and device (against ``oracle``: the for-loop, rounded correctly for fp32 on the CPU).
    A checker that fails torch's own implementations is wrong."""
    measured = torch_fused_agreement(reference, config, dtype, device, steps, seed, oracle)
    if measured is None or measured <= tolerance.atol:
        return tolerance
    return Tolerance(
        "max_abs",
        atol=measured,
        description=(
            f"max abs diff <= torch.optim's own fused-vs-for-loop difference for this config "
            f"on {device} ({measured:.3g}; torch's figure is {tolerance.atol:.3g})"
        ),
    )


def assert_matches_torch(
    optimizer: str | type | Callable[..., torch.optim.Optimizer],
    config: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> ParityReport:
    """:func:`compare_to_torch` with the same arguments and defaults, then raise
    ``AssertionError`` (with the report's summary) unless it passed; returns the report."""
    return compare_to_torch(optimizer, config, **kwargs).assert_ok()
