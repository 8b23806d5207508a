"""Adam and AdamW: torch.optim's arguments, defaults, state and errors; one fused pass."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..backends.contract import ADAM_STATE_KEYS, AdamFlags, AdamHyper, hyper_value, lr_argument
from ._base import FusedOptimizerMixin, Precision
from ._state import real_dtype

SPARSE_ERROR = "Adam does not support sparse gradients, please consider SparseAdam instead"


class Adam(FusedOptimizerMixin, torch.optim.Adam):
    r"""Adam (Kingma & Ba), fused; AdamW when ``decoupled_weight_decay=True``.

    A drop-in replacement for :class:`torch.optim.Adam`: same arguments, defaults, errors, state
    (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and ``state_dict`` format. For
    each parameter with a gradient, at step t:

    .. code-block:: text

        g = -grad if maximize else grad
        p = p * (1 - lr * weight_decay)        (decoupled_weight_decay, AdamW)
        g = g + weight_decay * p               (otherwise, L2; only if weight_decay != 0)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_max = max(v_max, v)                  (amsgrad; then v_max replaces v below)
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Args:
        params: iterable of parameters, named parameters or param-group dicts.
        lr (float or 1-element Tensor): learning rate. Default: 1e-3.
        betas (tuple of two floats or 1-element Tensors): moment coefficients.
            Default: (0.9, 0.999).
        eps (float): added to the denominator. Default: 1e-8.
        weight_decay (float): L2 penalty (decoupled decay coefficient for AdamW). Default: 0.
        amsgrad (bool): use the AMSGrad variant. Default: False.
        foreach (bool, optional): accepted for compatibility; no effect. Default: None.
        maximize (bool): maximize the objective. Default: False.
        capturable (bool): keep ``step`` on the params' device and read it (and a tensor lr)
            there, so the step can be captured in a CUDA graph. Default: False.
        differentiable (bool): run torch.optim's own step (the parent class's), which autograd
            can differentiate through, instead of the fused kernels; not combined with
            ``backend`` or the precision modes (``ValueError``). Default: False.
        fused (bool, optional): accepted for compatibility; no effect. Default: None.
        decoupled_weight_decay (bool): AdamW's decoupled weight decay. Default: False.
        backend (str, optional): which implementation updates the tensors. ``None`` (auto):
            the fused C++ ``"cpu"`` backend for CPU tensors when it is built, ``"triton"`` for
            GPU tensors (``"cuda"``, the CUDA C++ extension, when Triton is missing), the
            pure-torch ``"reference"`` otherwise; ``group_backends()`` says what it chose.
            ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``: exactly that backend, or a
            ``RuntimeError`` saying why it cannot run there. Default: None.
        state_dtype (torch.dtype, optional): dtype of new optimizer states for fp32, bf16 and
            fp16 params: ``torch.float32`` (fp32 states for bf16/fp16 params), ``torch.bfloat16``
            or ``torch.float16``. ``None`` keeps torch.optim's rule (the param's dtype).
            Default: None.
        master_weights (bool): keep an fp32 copy of every bf16/fp16 param in its state
            (``"master_param"``); the update runs on the copy and writes its rounded value to
            the param in the same pass. Default: False.
        stochastic_rounding (bool): round bf16/fp16 param writes up or down at random, with
            probability proportional to proximity, so that updates below the dtype's resolution
            are kept on average. The bits are a hash of (``seed``, step, the param's index, the
            element's index): reruns and resumes give the same result. Default: False.
        seed (int): seed of the stochastic rounding. Default: 0.
        max_grad_norm (float, optional): clip the gradients' total 2-norm to this value at
            every step, inside the update (see :meth:`clip_grad_norm_`); the norm is taken of
            the unscaled gradients under GradScaler and kept in ``last_grad_norm``.
            ``None``: no automatic clipping. Default: None.
        write_clipped_grads (bool): also write the clipped gradients back into ``.grad`` (by
            default the update reads them clipped and leaves ``.grad`` as it was, unless
            GradScaler's unscale writes it back anyway). Default: False.

    A tensor ``lr`` on the params' device is read by the kernel (no host sync), and the scalar
    math that involves it runs in its dtype, as torch.optim does. Tensor ``betas`` are read as
    values (a host sync if they live on a GPU) and used like float betas, in fp64.

    ``step`` is a 0-dim float32 tensor (float64 under a float64 default dtype) on the CPU, or on
    the params' device when ``capturable=True`` or under ``torch.amp.GradScaler`` (whose skip is
    decided on the device), as torch.optim keeps it. Math runs in fp32 for
    fp16/bf16/fp32 params (fp64 for fp64), with bias corrections in fp64, rounded once at the
    store.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        max_grad_norm: float | None = None,
        write_clipped_grads: bool = False,
    ) -> None:
        torch.optim.Adam.__init__(
            self,
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._setup_fused(
            backend,
            differentiable,
            Precision(state_dtype, master_weights, stochastic_rounding, seed),
            max_grad_norm,
            write_clipped_grads,
        )

    ALGORITHM = "adam"

    def _state_keys(self, group):
        keys = ("step", "exp_avg", "exp_avg_sq")
        if group["amsgrad"]:
            keys = (*keys, "max_exp_avg_sq")
        return (*keys, *self._precision_keys(with_step=False))

    def _bucket_state_keys(self, flags: AdamFlags) -> tuple[str, ...]:
        return ADAM_STATE_KEYS if flags.amsgrad else ADAM_STATE_KEYS[:2]

    def _check_group(self, group, grads, sparse):
        if sparse:
            raise RuntimeError(SPARSE_ERROR)
        if group["foreach"] and isinstance(group["lr"], Tensor) and not group["capturable"]:
            raise RuntimeError(
                "lr as a Tensor is not supported for capturable=False and foreach=True"
            )
        if torch.compiler.is_compiling():
            return  # values are graph inputs there: checking them would specialize on them
        lr, beta1 = group["lr"], group["betas"][0]
        if not isinstance(lr, Tensor):
            _ = lr / 1.0  # torch.optim's step size, lr / bias_correction1: its TypeError
        elif lr.numel() != 1 and not group["capturable"]:
            # torch.optim's update, param.addcdiv_(exp_avg, denom, value=-step_size), with a
            # step size of several elements: its TypeError.
            torch.zeros(1).addcdiv_(torch.zeros(1), torch.ones(1), value=-(lr.cpu() / 1.0))
        if group["capturable"]:
            return  # tensor arithmetic: no host errors, as in torch.optim
        beta2 = group["betas"][1]
        host_beta1 = isinstance(beta1, (int, float)) and abs(beta1) == 1
        host_beta2 = isinstance(beta2, (int, float)) and abs(beta2) > 1
        if not (host_beta1 or host_beta2):
            return
        for p in group["params"]:
            if p.grad is None:
                continue
            step = self.state.get(p, {}).get("step")
            step = float(step) + 1 if step is not None else 1.0
            if host_beta1:
                # torch.optim's host arithmetic divides by 1 - beta1 ** step: where that is 0
                # it raises ZeroDivisionError (before its update touches anything, as here).
                _ = lr / (1 - beta1**step)
            if host_beta2 and 1 - beta2**step < 0:
                # Its bias_correction2 ** 0.5 is then complex, and its update,
                # param.addcdiv_(exp_avg, denom, ...), fails to write a complex denominator
                # into the real param: that error, from the same operation on one element.
                dtype = real_dtype(p.dtype)
                root = (1 - beta2**step) ** 0.5
                one = torch.ones(1, dtype=dtype)
                torch.zeros(1, dtype=dtype).addcdiv_(one, one / root)

    def _check_state(self, group: dict) -> None:
        # torch.optim's _init_group reads these from every param's non-empty state, in this
        # order: a missing one is its KeyError, raised before the update (amsgrad switched on
        # after steps without it finds no max_exp_avg_sq). States or grads of other dtypes
        # and shapes are replayed through torch.optim's step (``_outside_kernels``).
        keys = ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group["amsgrad"] else ()))
        for p in group["params"]:
            state = self.state.get(p)
            if p.grad is None or not state:
                continue
            for key in (*keys, "step"):
                if key not in state:
                    raise KeyError(key)

    def _init_state(self, group: dict, p: Tensor) -> dict:
        state = self.state[p]
        self._init_common_state(group, p, state, with_step=True)
        dtype = self._precision.state_dtype_for(p)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=state["exp_avg"].dtype)
        return state

    def _hyper(self, group: dict) -> AdamHyper:
        beta1, beta2 = group["betas"]
        return AdamHyper(
            lr_argument(group["lr"]),
            hyper_value(beta1),
            hyper_value(beta2),
            hyper_value(group["eps"]),
            hyper_value(group["weight_decay"]),
        )

    def _flags(self, group: dict) -> AdamFlags:
        return AdamFlags(
            bool(group["amsgrad"]),
            bool(group["maximize"]),
            bool(group["decoupled_weight_decay"]),
            bool(group["capturable"]) or self._amp[1] is not None,
        )


class AdamW(Adam, torch.optim.AdamW):
    r"""AdamW (Loshchilov & Hutter), fused: :class:`Adam` with decoupled weight decay.

    A drop-in replacement for :class:`torch.optim.AdamW`: same arguments, defaults (note
    ``weight_decay=1e-2``), errors, state and ``state_dict`` format. The update is Adam's with

    .. code-block:: text

        p = p * (1 - lr * weight_decay)

    applied before the moment update, and no weight decay in the gradient. Arguments are those
    of :class:`Adam` without ``decoupled_weight_decay`` (always True), plus ``backend`` (None,
    ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``; default None, as in :class:`Adam`)
    and the precision modes ``state_dtype``
    (default None), ``master_weights`` (default False), ``stochastic_rounding`` (default False)
    and ``seed`` (default 0), and the fused gradient clipping's ``max_grad_norm`` (default None)
    and ``write_clipped_grads`` (default False), as in :class:`Adam`.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        max_grad_norm: float | None = None,
        write_clipped_grads: bool = False,
    ) -> None:
        torch.optim.AdamW.__init__(
            self,
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        self._setup_fused(
            backend,
            differentiable,
            Precision(state_dtype, master_weights, stochastic_rounding, seed),
            max_grad_norm,
            write_clipped_grads,
        )
