"""What SGD, Adam and AdamW share: backend choice, the step skeleton, pickling, state placement.

No update math lives here. ``step()`` checks every group, builds (or reuses) the optimizer's
``StepPlan`` (``_engine``: buckets across param groups, one backend call each), reads each
group's hyperparameters into the contract's frozen dataclasses (``backends.contract``) and calls
the backends. State layout (step buffers, real views of complex and DTensor params, the
precision modes) lives in ``_state``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _device_dtype_check_for_fused

from ..backends import host_checks, preload, select_backend, validate_request
from ..backends.compiled import SlotPool, prepare_state
from ..backends.contract import StepContext, Work
from ..backends.plan import gc_paused, tensor_size
from ..backends.reference import compute_dtype
from ._clip import GradClipping, apply_coefficient_, grads_of_groups
from ._engine import (
    FastPath,
    StepPlan,
    fingerprint,
    flat,
    grads_of,
    group_values,
    is_sparse_any,
    lr_kind,
    params_with_grads,
    state_fingerprint,
)
from ._state import (
    LOW_PRECISION,
    MASTER_KEY,
    Precision,
    advance_steps,
    any_dispatch_subclass,
    as_state_of,
    bucket_state_dtype,
    gather_steps,
    is_dtensor,
    new_step,
    real_dtype,
    real_view,
)

__all__ = ["MASTER_KEY", "TORCH_OPTIM", "FusedOptimizerMixin", "Precision"]

_dtype = attrgetter("dtype")
_shape = tensor_size


@contextmanager
def _amp_attributes_hidden(optimizer):
    """GradScaler's ``grad_scale`` and ``found_inf`` removed while torch.optim's for-loop step
    runs (it asserts they are absent), then put back."""
    hidden = {
        k: optimizer.__dict__.pop(k) for k in ("grad_scale", "found_inf") if k in optimizer.__dict__
    }
    try:
        yield
    finally:
        optimizer.__dict__.update(hidden)


def unscale_grad_(grad: Tensor, grad_scale: Tensor) -> None:
    """``grad / grad_scale`` in fp32 (fp64 for fp64 grads), written back, as the kernels do."""
    compute = compute_dtype(grad.dtype)
    grad.copy_(grad.to(compute) / grad_scale.to(device=grad.device, dtype=compute))


def _traced_grads_prepared(work: Work, context: StepContext) -> StepContext:
    """The context a traced step's op gets (``backends.compiled``'s ops take no clipping
    coefficient): the coefficient is applied to the gradients here, after their unscale, by
    torch operations, as torch does (both write them)."""
    if context.grad_coef is None:
        return context
    if context.grad_scale is not None:
        for grad in work.grads:
            unscale_grad_(grad, context.grad_scale)
    apply_coefficient_(work.grads, context.grad_coef)
    return replace(context, grad_scale=None, grad_coef=None)


#: What ``group_backends()`` reports for groups that torch.optim's own step updates.
TORCH_OPTIM = "torch.optim (differentiable)"


class FusedOptimizerMixin:
    """Mixed into subclasses of the torch.optim classes; overrides ``step`` and pickling.

    Each algorithm provides ``ALGORITHM`` (the backends' entry point), ``_state_keys``,
    ``_check_group``, ``_init_state``, ``_hyper`` and ``_flags``.
    """

    param_groups: list[dict[str, Any]]
    state: dict
    ALGORITHM = ""

    def _setup_fused(
        self,
        backend: str | None,
        differentiable: bool,
        precision: Precision,
        max_grad_norm: float | None = None,
        write_clipped_grads: bool = False,
    ) -> None:
        validate_request(backend)
        if max_grad_norm is not None and not 0.0 <= float(max_grad_norm) < float("inf"):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}")
        if differentiable and (backend is not None or not precision.off):
            raise ValueError(
                f"differentiable=True runs torch.optim.{type(self).__name__}'s own implementation "
                "(fused_optim's kernels update tensors in place outside autograd); it cannot be "
                "combined with backend= or the precision modes (state_dtype, master_weights, "
                "stochastic_rounding)"
            )
        self._backend = backend
        self._precision = precision
        self._clipping = GradClipping(max_grad_norm, write_clipped_grads)
        self._reset_runtime_state()
        preload(backend, [p.device for group in self.param_groups for p in group["params"]])

    def _reset_runtime_state(self) -> None:
        self._plan: StepPlan | None = None
        # Launch plans of traced steps, and their state preparation (backends.compiled).
        self._slot_pool = SlotPool(self, type(self)._prepare_traced_state)
        self._launches = 0
        self._amp: tuple[Tensor | None, Tensor | None] = (None, None)
        self._not_skipped = torch.zeros((), dtype=torch.bool)
        self.step_skipped: Tensor = self._not_skipped

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True when torch's GradScaler asks, False for anyone else.

        GradScaler reads this in ``step()``: True makes it hand the optimizer ``grad_scale`` and
        ``found_inf`` instead of unscaling and syncing on the host, and the kernels unscale and
        skip on the device. Other code reads it to learn whether the optimizer unscales grads
        by itself: Lightning's precision plugins refuse gradient clipping when it is True, also
        under bf16 autocast, where no scaler exists and nothing needs unscaling. Under fp16 with
        a scaler, Lightning unscales before clipping (``scaler.unscale_``), and the step that
        follows gets ``grad_scale=None`` and the unscale's ``found_inf``: the fused skip
        stays."""
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return caller.startswith(("torch.amp.", "torch.cuda.amp.", "torch.distributed."))

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        """torch.optim's constructors set it with ``fused=True``; the getter above decides."""

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
        """Name of the backend each param group's tensors are updated by ("a+b" if mixed;
        ``TORCH_OPTIM`` when ``differentiable=True`` hands the step to torch.optim)."""
        names = []
        for group in self.param_groups:
            if self._differentiable():
                names.append(TORCH_OPTIM)
                continue
            chosen = {
                select_backend(self._backend, p.device, self._sparse(p)).NAME
                for p in group["params"]
            }
            names.append("+".join(sorted(chosen)))
        return names

    def launches_per_step(self) -> int:
        """Backend calls (kernel launches) the last ``step()`` made: one per bucket of (backend,
        device, param dtype, state dtype, master weights, code flags), whatever the number of
        param groups."""
        return self._launches

    @torch.no_grad()
    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> Tensor:
        """Clip the gradients of every param the next ``step()`` updates, as
        :func:`torch.nn.utils.clip_grad_norm_` would, but inside the update.

        Computes the total ``norm_type``-norm of the gradients now (one multi-tensor pass on
        the C++ CPU and Triton backends; torch's ``get_total_norm`` elsewhere) and returns it
        as a 0-dim tensor on the params' device, without a host sync. The next ``step()``
        multiplies each gradient by ``clamp(max_norm / (total_norm + 1e-6), max=1)`` (torch's
        coefficient and
        ``grad.mul_(coef)``'s rounding) as it reads it: the fused kernels leave the gradients in
        memory as they were (``write_clipped_grads=True`` at construction writes them), which
        saves the pass that rewrites them; steps that torch.optim's own code runs
        (``differentiable=True``, configurations the kernels hand to torch.optim) and steps
        traced by ``torch.compile`` multiply the gradients in place, as torch's clip does.
        The clip belongs to the current gradient tensors: new ones (a module's
        ``zero_grad()`` and backward) carry none; one modified in place (another backward pass)
        makes the step raise; a second clip composes with the first, as torch's in-place clips
        would; ``zero_grad()`` cancels it.

        Args:
            max_norm (float): max norm of the gradients.
            norm_type (float): type of the p-norm; ``inf`` for the infinity norm. Default: 2.0.
            error_if_nonfinite (bool): raise a RuntimeError when the total norm is NaN or
                infinite (reading it is a host sync on a GPU). Default: False.
            foreach (bool, optional): accepted for compatibility; no effect. Default: None.

        Under ``torch.amp.GradScaler``, call ``scaler.unscale_(optimizer)`` first, as with
        torch, or let ``max_grad_norm=`` clip inside ``step()``, where the norm is taken of the
        unscaled gradients and a step that GradScaler skips stays skipped.
        """
        return self._clipping.clip(
            self.param_groups, max_norm, norm_type, error_if_nonfinite, self._backend
        )

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The total gradient norm the last clip computed (by ``clip_grad_norm_()`` or, with
        ``max_grad_norm``, by ``step()``): a 0-dim tensor on the params' device, or None."""
        return self._clipping.last_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad``; it also cancels a clip armed by ``clip_grad_norm_()``."""
        self._clipping.drop()
        super().zero_grad(set_to_none)  # type: ignore[misc]

    @staticmethod
    def _sparse(p: Tensor) -> bool:
        return p.grad is not None and p.grad.is_sparse

    def _graph_capture_check(self) -> None:
        check = (
            getattr(self, "_accelerator_graph_capture_health_check", None)
            or self._cuda_graph_capture_health_check
        )
        check()

    def _differentiable(self) -> bool:
        # Set at construction, as torch.optim's own step reads it (its grad mode): O(1) per step.
        return bool(self.defaults.get("differentiable"))

    def _torch_step(self, closure):
        """torch.optim's own ``step`` (the parent class's), without the hooks torch wrapped
        around it a second time: ``step()`` has already run them."""
        for cls in type(self).__mro__:
            if cls.__module__.startswith("torch.optim") and "step" in cls.__dict__:
                torch_step = cls.__dict__["step"]
                while getattr(torch_step, "hooked", False):
                    torch_step = torch_step.__wrapped__
                return torch_step(self, closure)
        raise TypeError(f"{type(self).__name__} has no torch.optim parent with a step")

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

        With ``differentiable=True`` the step is torch.optim's own (the parent class's), which
        autograd can differentiate through.
        """
        clipping = self._clipping
        if self._differentiable():
            if clipping.coef is None and clipping.max_grad_norm is None:
                return self._torch_step(closure)
            # The closure's backward first: the clip applies to the gradients it makes.
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            coef = clipping.for_step(self.param_groups, None, self._backend)
            if coef is not None:
                apply_coefficient_(grads_of_groups(self.param_groups), coef)
            clipping.consumed()
            self._torch_step(None)
            return loss
        self._graph_capture_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        coef = clipping.for_step(self.param_groups, grad_scale, self._backend)
        self._amp = (grad_scale, found_inf)
        try:
            self._step(StepContext(
                grad_scale, found_inf, self._precision.stochastic_rounding, self._precision.seed,
                coef, clipping.write_clipped_grads,
            ))  # fmt: skip
        finally:
            self._amp = (None, None)
        clipping.consumed()
        if found_inf is None:
            self.step_skipped = self._not_skipped
        else:
            self.step_skipped = found_inf != 0
        return loss

    def _read_groups(self) -> tuple[list, list, list, list, list, list]:
        """(params with grads, their grads, sparse, structure, hyperparameters, state keys) of
        every group. Checks every group before touching any: an error leaves params and state
        as they were."""
        groups = self.param_groups
        with_grads = params_with_grads(groups)
        grads = [grads_of(params) for params in with_grads]
        sparse, structure, hypers, keys = [], [], [], []
        for group, params, group_grads in zip(groups, with_grads, grads):
            is_sparse = bool(params) and is_sparse_any(group_grads)
            if params:
                self._check_group(group, group_grads, is_sparse)
                if group.get("fused"):
                    # torch.optim's fused-path validation, with its message (devices, dtypes).
                    for p in params:
                        _device_dtype_check_for_fused(p)
            sparse.append(is_sparse)
            structure.append(self._structure(group) if params else None)
            hypers.append(self._hyper(group) if params else None)
            keys.append(self._state_keys(group) if params else ())
        return with_grads, grads, sparse, structure, hypers, keys

    def _traced_step(self, context: StepContext) -> None:
        """``step()`` while torch.compile traces it. The compiler's guards check what a plan's
        fingerprint checks in eager steps (the same params, grads, states and group structure),
        so nothing is cached here: the buckets are built in the trace (Python the compiled step
        never runs again), and each bucket's update is one op of the graph whose hyperparameter
        table is built by tensor operations, so that a scheduler's new lr or betas are graph
        inputs, not recompiles (``backends.compiled``). The state is created outside the trace,
        after the checks (``_prepare_traced_state``)."""
        with_grads, grads, sparse, structure, hypers, keys = self._read_groups()
        if not flat(with_grads):
            return
        prepare_state(self._slot_pool.key)
        plan = self._build_plan(with_grads, keys, structure, sparse, traced=True)
        advance_steps([state["step"] for state in plan.states if "step" in state],
                      context.found_inf, traced=True)  # fmt: skip
        flat_grads = plan.real_grads(flat(grads))
        pool = self._slot_pool
        for number, bucket in enumerate(plan.buckets):
            work = bucket.work
            work.grads = bucket.take(flat_grads)
            work.handle = pool.handle(number)
            written: list[tuple[Tensor, Tensor]] = []
            if plan.views:
                work = self._traced_copies(plan, bucket, written)
            # The compiled ops take no clipping coefficient: it is applied by torch operations.
            bucket_context = _traced_grads_prepared(work, context)
            created = getattr(bucket.backend, self.ALGORITHM)(
                work, bucket.hypers(hypers), bucket.flags, bucket_context
            )
            for view, copy in written:
                view.copy_(copy)
            self._launches += 1
            for position, tensor in zip(bucket.positions, created):
                if tensor is not None:
                    plan.states[position][self._created_key] = as_state_of(
                        plan.params[position], tensor
                    )

    def _traced_copies(self, plan: StepPlan, bucket, written: list) -> Work:
        """The bucket's Work with the real views of complex and DTensor params (and of their
        grads and states) replaced by copies, for a traced step: the compiler cannot let an op
        write through views of its inputs. ``written`` receives (view, copy) pairs to copy back
        after the update (grads too: GradScaler's unscale writes them)."""
        work = bucket.work
        viewed = [p.is_complex() or is_dtensor(p) for p in bucket.take(plan.params)]

        def copies(column: list) -> list:
            out = list(column)
            for i, flag in enumerate(viewed):
                if flag and out[i] is not None:
                    out[i] = out[i].clone()
                    written.append((column[i], out[i]))
            return out

        return Work(
            params=copies(work.params),
            grads=copies(work.grads),
            states={key: copies(column) for key, column in work.states.items()},
            groups=work.groups,
            steps=work.steps,
            masters=copies(work.masters) if work.masters else [],
            indices=work.indices,
            new_state_dtype=work.new_state_dtype,
            own_params=False,
            handle=work.handle,
        )

    def _prepare_traced_state(self) -> None:
        """Create the state of every param with a grad (in a group that keeps state) and mark
        every state tensor static for torch.compile. Runs eagerly while dynamo traces a step
        (``backends.compiled.prepare_state``), after the groups were checked."""
        from torch._dynamo import mark_static_address

        for group in self.param_groups:
            keys = self._state_keys(group)
            for p in group["params"]:
                if keys and p.grad is not None:
                    self._init_state(group, p)
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    mark_static_address(value, guard=True)

    def _step(self, context: StepContext) -> None:
        self._launches = 0
        if torch.compiler.is_compiling():
            self._traced_step(context)
            return
        plan = self._plan
        if plan is not None and plan.fast is not None:
            if self._fast_step(plan, context):
                plan.fast.succeeded = True
                return
            # The full path runs this step: build the fast path again after it (its host steps
            # track state that this step changes), unless it never held for this plan.
            plan.fast_tried = not plan.fast.succeeded
            plan.fast = None
        with gc_paused():
            self._full_step(context)

    def _full_step(self, context: StepContext) -> None:
        """The step without the compiled fast path: read and check every group, check the plan
        (building it again if anything changed), then one backend call per bucket."""
        with_grads, grads, sparse, structure, hypers, keys = self._read_groups()
        params = flat(with_grads)
        if not params:
            return
        check = self._check_value(with_grads, keys)
        plan = self._plan
        rebuild = plan is None or not plan.matches(check, structure, sparse)
        all_grads = flat(grads)
        grad_dtypes = list(map(_dtype, all_grads))
        # Per-param state checks, only when the plan (params, state dicts and tensors) or a
        # grad's dtype changed since they last passed.
        if rebuild or grad_dtypes != plan.grad_dtypes:
            for group, group_params in zip(self.param_groups, with_grads):
                if group_params:
                    self._check_state(group)
        odd = self._outside_kernels(with_grads, all_grads, grad_dtypes, keys, rebuild)
        if odd is not None:
            self._torch_fallback_step(odd, context)
            return
        if rebuild:
            plan = self._plan = self._build_plan(with_grads, keys, structure, sparse)
        plan.grad_dtypes = grad_dtypes
        advance_steps(plan.step_buffers, context.found_inf)
        flat_grads = plan.real_grads(all_grads)
        run = self.ALGORITHM
        created_state = False
        for bucket in plan.buckets:
            work = bucket.work
            work.grads = bucket.take(flat_grads)
            created = getattr(bucket.backend, run)(
                work, bucket.hypers(hypers), bucket.flags, context
            )
            self._launches += 1
            if any(t is not None for t in created):
                created_state |= self._keep_created(plan, bucket, created, context.found_inf)
        if created_state:
            plan.check = self._check_value(with_grads, keys)
            plan.fast_tried = False
        elif not plan.fast_tried:
            plan.fast_tried = True
            plan.fast = self._fast_path(plan, hypers, context)

    def _outside_kernels(
        self, with_grads, grads, grad_dtypes, keys, rebuild: bool
    ) -> list[Tensor] | None:
        """What the fused kernels do not update as torch.optim does, and torch.optim's own step
        must: None when nothing; else the params whose step may raise (replayed first).

        - a grad, or a state tensor, whose shape is not its param's (set through ``.data`` or
          a checkpoint): torch.optim broadcasts it, or raises;
        - a param of an integer or bool dtype: torch.optim raises;
        - without precision modes, a grad whose dtype is not its param's, or a state whose
          dtype is not its grad's (but fp32 states of bf16/fp16 params, which the kernels
          update as torch.optim does): torch.optim raises (Adam), or keeps the grad's dtype in
          the momentum buffer (SGD);
        - a param listed twice in a group: torch.optim updates it twice, counting two steps;
        - a param, grad or state that is a tensor subclass with its own ``__torch_dispatch__``
          (not a DTensor): its memory is not the kernels' to address (nothing to replay: the
          list is empty when only these are found).

        Grads are checked on every full-path step (the fast path's checks cover them); states,
        dtypes and repeats when the plan is rebuilt (its fingerprint covers the state tensors'
        shapes and dtypes, and the params' storage).
        """
        params = flat(with_grads)
        shapes = list(map(_shape, params))
        suspects: set[int] = set()
        if list(map(_shape, grads)) != shapes:
            suspects.update(i for i, (g, s) in enumerate(zip(grads, shapes)) if g.shape != s)
        torch_numbers = self._precision.off
        if torch_numbers and grad_dtypes != list(map(_dtype, params)):
            suspects.update(i for i, (g, p) in enumerate(zip(grads, params)) if g.dtype != p.dtype)
        repeated = False
        foreign = any_dispatch_subclass(params) or any_dispatch_subclass(grads)
        if rebuild:
            state_keys = {key for key in flat([list(k) for k in keys])} - {"step", MASTER_KEY}
            states = [v for p in params for v in self.state.get(p, {}).values()]
            states = [v for v in states if isinstance(v, Tensor)]
            foreign = foreign or any_dispatch_subclass(states)
            for i, (p, g) in enumerate(zip(params, grads)):
                if not (p.is_floating_point() or p.is_complex()):
                    suspects.add(i)
                state = self.state.get(p)
                if not state or not state_keys:
                    continue
                for key in state_keys & state.keys():
                    value = state[key]
                    if not isinstance(value, Tensor):
                        continue
                    if value.shape != p.shape or (
                        torch_numbers
                        and value.dtype != g.dtype
                        and not (value.dtype == torch.float32 and p.dtype in LOW_PRECISION)
                    ):
                        suspects.add(i)
            repeated = any(len(set(map(id, ps))) != len(ps) for ps in with_grads)
        if not suspects and not repeated and not foreign:
            return None
        return [params[i] for i in sorted(suspects)]

    def _torch_fallback_step(self, suspects: list[Tensor], context: StepContext) -> None:
        """The step torch.optim's for-loop takes, for a configuration ``_outside_kernels``
        found (rare by construction: these are what torch.optim itself accepts with a warning,
        broadcasts, or rejects). Its errors are found first by replaying its step on copies of
        the params that may raise, and raised before anything changes. GradScaler's unscale and
        skip are applied here, as the kernels would (a host sync). The precision modes have no
        torch.optim equivalent: with them, a ValueError."""
        self._replay_on_copies(suspects)
        if not self._precision.off:
            raise ValueError(
                "fused_optim: with state_dtype, master_weights or stochastic_rounding, every "
                "grad and state must have its param's shape, every param a floating-point "
                "dtype, and no param may be listed twice in a group"
            )
        grad_scale, found_inf = context.grad_scale, context.found_inf
        if found_inf is not None and bool(found_inf != 0):
            return
        grads = grads_of_groups(self.param_groups)
        if grad_scale is not None:
            for grad in grads:
                unscale_grad_(grad, grad_scale)
        if context.grad_coef is not None:
            apply_coefficient_(grads, context.grad_coef)
        with _amp_attributes_hidden(self):
            self._torch_step(None)
        self._plan = None

    def _replay_on_copies(self, suspects: list[Tensor]) -> None:
        """Run torch.optim's step on copies of ``suspects`` (with copies of their grads and
        state, in their own groups) and let its exception through: torch.optim's type and
        message, with nothing of the optimizer's touched."""
        if not suspects:
            return
        chosen = set(map(id, suspects))
        groups = []
        state: dict = defaultdict(dict)
        for group in self.param_groups:
            copies = []
            for p in group["params"]:
                if id(p) not in chosen or p.grad is None:
                    continue
                twin = p.detach().clone()
                twin.grad = torch.zeros_like(twin)
                twin.grad.data = p.grad.detach().clone()  # any shape and dtype, as p's
                copies.append(twin)
                if p in self.state:
                    state[twin] = {
                        k: v.clone() if isinstance(v, Tensor) else v
                        for k, v in self.state[p].items()
                    }
            if copies:
                groups.append({**group, "params": copies})
        kept = self.param_groups, self.state
        self.param_groups, self.state = groups, state
        try:
            with _amp_attributes_hidden(self):
                self._torch_step(None)
        finally:
            self.param_groups, self.state = kept

    def _context_kind(self, context: StepContext) -> tuple[bool, bool, bool, bool]:
        """What of the context a compiled host step was built for (its kernel flags)."""
        clipped = context.grad_coef is not None
        return (context.grad_scale is None, context.found_inf is None, clipped,
                clipped and context.write_grads)  # fmt: skip

    def _fast_path(self, plan: StepPlan, hypers: list, context: StepContext):
        """The plan's compiled per-step path, or None (no extension, views, a backend without a
        host step, or a bucket it does not apply to)."""
        if plan.views:
            return None
        checks = host_checks()
        if checks is None:
            return None
        steps = []
        for bucket in plan.buckets:
            factory = getattr(bucket.backend, "host_step", None)
            step = (
                factory(bucket.work, bucket.hypers(hypers), bucket.flags, context)
                if factory
                else None
            )
            if step is None:
                return None
            steps.append(step)
        raw = group_values(self.param_groups)
        kind = self._context_kind(context)
        return FastPath(checks, plan, self.param_groups, self.state, steps, kind, raw, hypers)

    def _fast_step(self, plan: StepPlan, context: StepContext) -> bool:
        """One step through the plan's compiled path; False (nothing changed) when any check
        fails, and the full path runs instead."""
        fast = plan.fast
        if fast.context_kind != self._context_kind(context):
            return False
        groups = self.param_groups
        if fast.reread or not fast.checks.values_unchanged(groups, fast.raw):
            raw = group_values(groups)
            # A value changed (a scheduler's lr): read the groups again, check them (raising
            # torch.optim's errors before anything changes), and keep the plan if no flag did.
            if len(groups) != len(plan.structure):
                return False
            structure = [
                None if old is None else self._structure(group)
                for group, old in zip(groups, plan.structure)
            ]
            if structure != plan.structure:
                return False
            hypers = [self._hyper(g) if s is not None else None for g, s in zip(groups, structure)]
            for group, s in zip(groups, structure):
                if s is not None:
                    self._check_group(group, [], False)
            fast.raw, fast.hypers = raw, hypers
            fast.bucket_hypers = [bucket.hypers(hypers) for bucket in plan.buckets]
        if not fast.holds(groups, self.state):
            return False
        advance_steps(plan.step_buffers, context.found_inf)
        for step, bucket_hypers in zip(fast.steps, fast.bucket_hypers):
            step.run(bucket_hypers, context)
        self._launches = len(fast.steps)
        return True

    def _check_value(self, with_grads: list[list[Tensor]], keys: list[tuple]) -> list:
        """The fingerprint a plan is valid for: the params with grads, and the state dicts and
        state tensors of those whose group keeps state."""
        check = fingerprint(flat(with_grads))
        stateful = [(ps, k) for ps, k in zip(with_grads, keys) if ps and k]
        if stateful:
            params = flat([ps for ps, _ in stateful])
            state_keys = tuple(sorted({key for _, k in stateful for key in k}))
            check.append(state_fingerprint(list(map(self.state.get, params)), state_keys))
        return check

    def _build_plan(self, with_grads, keys, structure, sparse, traced=False) -> StepPlan:
        """Choose each bucket's backend (which may refuse: nothing is changed yet), create the
        states, gather the step counts (not in a traced step: the steps stay where they are),
        and build the buckets."""
        groups = self.param_groups
        params, group_of, indices, bucket_keys = [], [], [], []
        offset = 0
        for g, (group, group_params) in enumerate(zip(groups, with_grads)):
            if group_params:
                flags = self._flags(group)
                kind = lr_kind(group["lr"])
                for i, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    params.append(p)
                    group_of.append(g)
                    indices.append(offset + i)
                    state = self.state.get(p)
                    dtype = real_dtype(p.dtype)
                    # torch.optim's arithmetic on complex tensors rounds differently.
                    code = replace(flags, complex_arithmetic=True) if p.is_complex() else flags
                    bucket_keys.append((
                        real_view(p).device, code, sparse[g], dtype,
                        bucket_state_dtype(self._precision, p, state),
                        self._precision.wants_master(p), kind,
                    ))  # fmt: skip
            offset += len(group["params"])
        by_key: dict[tuple, list[int]] = {}
        for i, key in enumerate(bucket_keys):
            by_key.setdefault(key, []).append(i)
        # Backends are chosen (and may refuse) here, before anything is changed.
        backends = {key: select_backend(self._backend, key[0], key[2]) for key in by_key}
        states = []
        step_devices = []
        for group, group_params, group_keys in zip(groups, with_grads, keys):
            for p in group_params:
                state = self._init_state(group, p) if group_keys else {}
                states.append(state)
                if "step" in state:
                    step_devices.append((state, self._step_device(group, p)))
        plan = StepPlan(params, states, group_of, indices, None, structure, sparse)
        if step_devices and not traced:
            plan.step_buffers = gather_steps(*map(list, zip(*step_devices)))
        master_key = MASTER_KEY if self._precision.master_weights else None
        for key, positions in by_key.items():
            flags = key[1]
            state_keys = self._bucket_state_keys(flags)
            plan.add_bucket(backends[key], flags, positions, state_keys, master_key, key[4])
        if not traced:
            plan.check = self._check_value(with_grads, keys)
        return plan

    def _keep_created(self, plan: StepPlan, bucket, created, found_inf) -> bool:
        """Put the state tensors a backend created into the state (and the bucket's columns);
        whether any was kept. Under GradScaler the kernel decided on the device whether the
        step ran; reading its verdict is a host sync, paid only on the step that creates state.
        A skipped first step leaves no trace."""
        keep = found_inf is None or not bool(found_inf != 0)
        key = self._created_key
        column = bucket.work.states[key]
        for j, (position, tensor) in enumerate(zip(bucket.positions, created)):
            if tensor is None:
                continue
            p = plan.params[position]
            if keep:
                plan.states[position][key] = as_state_of(p, tensor)
                column[j] = tensor
            elif not self.state.get(p):
                self.state.pop(p, None)
        return keep

    # What each algorithm provides.
    _created_key = ""

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        """The state keys a group's params have (empty: no state entry at all)."""
        raise NotImplementedError

    def _bucket_state_keys(self, flags) -> tuple[str, ...]:
        """The state columns a bucket with these flags hands to its backend."""
        raise NotImplementedError

    def _check_group(self, group: dict, grads: list[Tensor], sparse: bool) -> None:
        """Raise torch.optim's error for bad input in this group; change nothing."""

    def _check_state(self, group: dict) -> None:
        """Raise torch.optim's error for state (or a grad's dtype) this group's step would fail
        on; change nothing. Runs in eager steps when the step plan is rebuilt or a grad's dtype
        changed (the plan's fingerprint and the fast path's checks cover everything else)."""

    def _init_state(self, group: dict, p: Tensor) -> dict:
        raise NotImplementedError

    def _hyper(self, group: dict):
        raise NotImplementedError

    def _flags(self, group: dict):
        raise NotImplementedError

    def _precision_keys(self, with_step: bool) -> tuple[str, ...]:
        """State keys the precision modes add: ``step`` (when asked for) and the master."""
        keys = ("step",) if with_step else ()
        return (*keys, MASTER_KEY) if self._precision.master_weights else keys

    def _structure(self, group: dict) -> tuple:
        """Group settings that change which state exists, where it lives, or the code."""
        steps_on_device = group.get("capturable", False) or self._amp[1] is not None
        return (self._state_keys(group), steps_on_device, self._flags(group), lr_kind(group["lr"]))

    # State shared by the algorithms: step counts and master weights.
    def _init_common_state(self, group: dict, p: Tensor, state: dict, with_step: bool) -> None:
        """Create ``step`` (if asked for) and the master weight (if wanted) for ``p``."""
        if with_step and "step" not in state:
            state["step"] = new_step(self._step_device(group, p))
        if self._precision.wants_master(p) and state.get(MASTER_KEY) is None:
            state[MASTER_KEY] = self._precision.new_master(p)

    def _step_device(self, group: dict, p: Tensor) -> torch.device:
        """Where ``step`` lives: the CPU as in torch.optim's default path, or the param's
        device with capturable=True and under GradScaler (whose skip is decided there)."""
        if group.get("capturable", False) or self._amp[1] is not None:
            return p.device
        return torch.device("cpu")

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
        self._plan = None
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
        state["_clipping"] = GradClipping(
            self._clipping.max_grad_norm, self._clipping.write_clipped_grads
        )
        runtime = ("_plan", "_slot_pool", "_launches", "_not_skipped", "_amp", "step_skipped")
        for key in runtime:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        # Unpickling brings the backend and precision in the state; torch's load_state_dict
        # calls __setstate__ without them, and those chosen at construction stay.
        backend = state.pop("_backend", getattr(self, "_backend", None))
        precision = state.pop("_precision", getattr(self, "_precision", Precision()))
        clipping = state.pop("_clipping", getattr(self, "_clipping", None))
        super().__setstate__(state)  # type: ignore[misc]
        self._backend = backend
        self._precision = precision
        self._clipping = clipping or GradClipping(None, False)
        self._reset_runtime_state()
