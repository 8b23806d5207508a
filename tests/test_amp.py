"""GradScaler support, the fused way (``_step_supports_amp_scaling`` is True for GradScaler).

``torch.amp.GradScaler`` sets ``optimizer.grad_scale`` (None once the user called
``scaler.unscale_(opt)``) and ``optimizer.found_inf`` before ``optimizer.step()``. The kernels
divide the gradients by ``grad_scale`` and write them back unscaled; when ``found_inf`` is
nonzero nothing changes at all (params, every state tensor, ``step``). ``opt.step_skipped`` (a
0-dim bool tensor on the device) and ``opt.last_step_skipped`` (a bool) record the outcome.

The oracle is torch.optim's for-loop path (``foreach=False``) driven by a separate GradScaler
with the same scale and the same injected infs/NaNs (GradScaler unscales its gradients and skips
its ``step()``), with torch.optim's arithmetic rounded correctly
(``fused_optim.testing.correctly_rounded_optimizer``: torch's own fp32 CPU sqrt is off by an ulp
for a share of inputs that depends on the CPU). fp32 params, states and gradients must match it
bitwise, on every CPU. Both backends are covered: the Triton kernels (run by the interpreter
here) and the pure-torch reference.

Models are tiny (Linear(8, 16) - Tanh - Linear(16, 4)) and runs short: interpreted kernels are
slow.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import fused_optim
from fused_optim import testing

from cases import cpu_backends

# Skipped steps still evaluate the masked-off lanes (e.g. 0/0 with step 0) in Triton's
# interpreter, which numpy reports; nothing is stored from them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

BACKENDS = ["triton", "reference"]
INIT_SCALE = 2.0**10  # a power of two: unscaling is exact
STEPS = 6
# Iteration -> the value injected into one gradient element after backward: an inf on the
# very first step (no state exists yet) and a NaN on a later one (state exists).
INJECT = {0: math.inf, 3: math.nan}

FUSED = {name: getattr(fused_optim, name) for name in testing.OPTIMIZERS}
TORCH = {name: getattr(torch.optim, name) for name in testing.OPTIMIZERS}

CASES = [
    pytest.param("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}, id="SGD-momentum"),
    pytest.param("SGD", {"lr": 0.1}, id="SGD-plain"),
    pytest.param(
        "SGD",
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        id="SGD-nesterov",
    ),
    pytest.param("Adam", {"lr": 0.01}, id="Adam"),
    pytest.param("Adam", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}, id="Adam-amsgrad"),
    pytest.param("AdamW", {"lr": 0.01}, id="AdamW"),
    pytest.param("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}, id="AdamW-amsgrad"),
]
# A smaller set where each case costs several runs.
MAIN_CASES = [CASES[0], CASES[4], CASES[6]]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    return model.to(dtype)


def make_inputs(steps: int = STEPS, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randn(5, 8, generator=gen).to(dtype) for _ in range(steps)]


def make_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)


def make_pair(name: str, config: dict, backend: str, dtype: torch.dtype = torch.float32):
    """(model, fused optimizer, identical model copy, torch.optim for-loop optimizer)."""
    model = make_model(dtype)
    ref_model = copy.deepcopy(model)
    opt = FUSED[name](model.parameters(), backend=backend, **copy.deepcopy(config))
    exact_torch = testing.correctly_rounded_optimizer(TORCH[name])
    ref = exact_torch(ref_model.parameters(), foreach=False, **copy.deepcopy(config))
    assert not getattr(ref, "_step_supports_amp_scaling", False)
    return model, opt, ref_model, ref


def loss_of(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).float().square().mean()


def scaled_backward(model, opt, scaler, x, inject: float | None = None) -> None:
    """zero_grad, scaled backward, then (optionally) poison one gradient element."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss_of(model, x)).backward()
    if inject is not None:
        with torch.no_grad():
            next(model.parameters()).grad[0, 0] = inject


def clone_params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def clone_grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def snapshot(opt) -> dict[int, dict[str, Tensor]]:
    """A deep copy of the optimizer's state, keyed by param index as in state_dict."""
    return {
        index: {key: value.clone() for key, value in entry.items()}
        for index, entry in opt.state_dict()["state"].items()
    }


def assert_fresh(name: str, entry: dict[str, Tensor]) -> None:
    """A state entry that a skipped first step may leave: equivalent to no state at all."""
    assert name != "SGD", f"a skipped step created SGD state {sorted(entry)}"
    assert float(entry["step"]) == 0, entry["step"]
    for key, value in entry.items():
        assert value.count_nonzero() == 0, f"fresh state {key} is not all zeros"


def assert_nothing_changed(name, model, opt, params_before, state_before) -> None:
    """Params and every state tensor (``step`` too) bitwise as before the step; no new state
    beyond a fresh (all-zero) Adam entry; no momentum buffer created."""
    for i, (before, p) in enumerate(zip(params_before, model.parameters())):
        assert torch.equal(before, p.detach()), f"param {i} changed on a skipped step"
    state_after = snapshot(opt)
    for index, entry in state_before.items():
        assert set(state_after[index]) == set(entry), index
        for key, value in entry.items():
            after = state_after[index][key]
            assert after.dtype == value.dtype and after.shape == value.shape, (index, key)
            assert torch.equal(after, value), f"state {index}.{key} changed on a skipped step"
    for index in set(state_after) - set(state_before):
        assert_fresh(name, state_after[index])
    if name == "SGD" and not state_before:
        assert len(opt.state) == 0, "a skipped first step left SGD state entries"
        assert all("momentum_buffer" not in s for s in opt.state.values())


def assert_all_moved(model, params_before) -> None:
    for i, (before, p) in enumerate(zip(params_before, model.parameters())):
        assert not torch.equal(before, p.detach()), f"param {i} did not move"


def max_abs(a: Tensor, b: Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_matches(name, model, opt, ref_model, ref) -> None:
    """fp32 params and every state entry bitwise equal to torch.optim's for-loop rounded
    correctly (``step`` too); same keys, dtypes, shapes."""
    for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
        assert torch.equal(p, q), f"param {i}: max abs diff {max_abs(p, q):.3g}"
    got, want = opt.state_dict()["state"], ref.state_dict()["state"]
    for index in set(got) - set(want):
        assert_fresh(name, got[index])  # torch.optim skipped its first step: no state yet
    assert set(want) <= set(got)
    for index, entry in want.items():
        assert set(got[index]) == set(entry), index
        for key, value in entry.items():
            mine = got[index][key]
            assert mine.dtype == value.dtype and mine.shape == value.shape, (index, key)
            assert torch.equal(mine.cpu(), value.cpu()), (index, key, max_abs(mine, value))


def assert_step_flag(opt, skipped: bool) -> None:
    flag = opt.step_skipped
    assert isinstance(flag, Tensor)
    assert flag.dtype == torch.bool and flag.dim() == 0
    assert flag.device == next(iter(opt.param_groups[0]["params"])).device
    assert bool(flag) is skipped
    assert opt.last_step_skipped is skipped


def assert_steps_on_param_device(opt) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if step is not None:
                assert step.device == p.device


# --------------------------------------------------------------------------------------------
# 1. Injected inf/NaN: skipped steps change nothing; the whole run matches torch.optim
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,config", CASES)
def test_skipped_steps_change_nothing_and_run_matches_torch(name, config, backend):
    model, opt, ref_model, ref = make_pair(name, config, backend)
    scaler, ref_scaler = make_scaler(), make_scaler()
    for it, x in enumerate(make_inputs()):
        inject = INJECT.get(it)
        skipped = inject is not None
        params_before, state_before = clone_params(model), snapshot(opt)
        scale_before = scaler.get_scale()

        scaled_backward(model, opt, scaler, x, inject)
        scaler.step(opt)
        scaler.update()
        scaled_backward(ref_model, ref, ref_scaler, x, inject)
        ref_scaler.step(ref)
        ref_scaler.update()

        assert_step_flag(opt, skipped)
        if skipped:
            assert scaler.get_scale() == scale_before / 2  # the scale backs off
            assert_nothing_changed(name, model, opt, params_before, state_before)
        else:
            assert scaler.get_scale() == scale_before
            assert_all_moved(model, params_before)
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert_steps_on_param_device(opt)
        assert_matches(name, model, opt, ref_model, ref)

    assert scaler.get_scale() == ref_scaler.get_scale() == INIT_SCALE / 2 ** len(INJECT)
    state = opt.state_dict()["state"]
    if name == "SGD" and not config.get("momentum"):
        assert state == {}
    else:
        assert len(state) == len(list(model.parameters()))
    if name != "SGD":
        for entry in state.values():
            assert float(entry["step"]) == STEPS - len(INJECT)


# --------------------------------------------------------------------------------------------
# 2. found_inf with grad_scale None, set by hand
# --------------------------------------------------------------------------------------------


def set_amp(opt, found_inf: float | None) -> None:
    """What GradScaler does after the user's ``unscale_``: grad_scale None, found_inf set."""
    if found_inf is None:
        for attr in ("grad_scale", "found_inf"):
            if hasattr(opt, attr):
                delattr(opt, attr)
    else:
        opt.grad_scale = None
        opt.found_inf = torch.tensor(found_inf)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,config", CASES)
def test_found_inf_without_grad_scale_changes_nothing(name, config, backend):
    model, opt, ref_model, ref = make_pair(name, config, backend)
    # Iteration -> found_inf (None: a plain step without GradScaler's attributes). The first
    # step is skipped; 2.0 is what GradScaler's sum over devices may hand over.
    schedule = [1.0, 0.0, 2.0, 0.0, None]
    for it, (x, found_inf) in enumerate(zip(make_inputs(len(schedule)), schedule)):
        skipped = bool(found_inf)
        params_before, state_before = clone_params(model), snapshot(opt)
        opt.zero_grad(set_to_none=True)
        loss_of(model, x).backward()
        grads_before = clone_grads(model)
        set_amp(opt, found_inf)
        opt.step()
        set_amp(opt, None)

        assert_step_flag(opt, skipped)
        for g, p in zip(grads_before, model.parameters()):
            assert torch.equal(p.grad, g), "grad_scale None: the grads must not be rewritten"
        if skipped:
            assert_nothing_changed(name, model, opt, params_before, state_before)
            if it == 0:
                assert not any("momentum_buffer" in s for s in opt.state.values())
                if name == "SGD":
                    assert opt.state_dict()["state"] == {}
        else:
            assert_all_moved(model, params_before)
            ref.zero_grad(set_to_none=True)
            loss_of(ref_model, x).backward()
            ref.step()
        assert_matches(name, model, opt, ref_model, ref)


# --------------------------------------------------------------------------------------------
# 3. The unscaled grads are written back to p.grad
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,config", MAIN_CASES)
def test_unscaled_grads_are_written_back(name, config, backend):
    model, opt, ref_model, ref = make_pair(name, config, backend)
    scaler, ref_scaler = make_scaler(), make_scaler()
    for x in make_inputs(3):
        params_before = clone_params(model)
        scaled_backward(model, opt, scaler, x)
        scaled = clone_grads(model)
        scale = scaler.get_scale()
        assert scale == INIT_SCALE
        scaler.step(opt)
        scaler.update()
        scaled_backward(ref_model, ref, ref_scaler, x)
        ref_scaler.step(ref)  # torch.optim's path unscales p.grad in place too
        ref_scaler.update()

        assert_step_flag(opt, False)
        assert_all_moved(model, params_before)
        for i, (g, p, q) in enumerate(zip(scaled, model.parameters(), ref_model.parameters())):
            assert torch.equal(p.grad, g / scale), f"grad {i} is not the unscaled grad"
            assert not torch.equal(p.grad, g), f"grad {i} was left scaled"
            assert torch.equal(p.grad, q.grad), f"grad {i} differs from torch.optim's"
        assert_matches(name, model, opt, ref_model, ref)


# --------------------------------------------------------------------------------------------
# 4. User unscale_, then clip, then step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,config", CASES)
def test_unscale_clip_step_matches_torch(name, config, backend):
    model, opt, ref_model, ref = make_pair(name, config, backend)
    scaler, ref_scaler = make_scaler(), make_scaler()
    max_norm = 0.05
    inject_at = {2: math.inf}  # also a skip with grad_scale None, from GradScaler itself
    for it, x in enumerate(make_inputs(5)):
        inject = inject_at.get(it)
        skipped = inject is not None
        params_before, state_before = clone_params(model), snapshot(opt)
        norms = []
        for m, o, s in ((model, opt, scaler), (ref_model, ref, ref_scaler)):
            scaled_backward(m, o, s, x, inject)
            s.unscale_(o)
            norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm))
        clipped = clone_grads(model)
        scale_before = scaler.get_scale()
        for o, s in ((opt, scaler), (ref, ref_scaler)):
            s.step(o)
            s.update()

        assert torch.equal(norms[0], norms[1])
        assert_step_flag(opt, skipped)
        if skipped:
            assert scaler.get_scale() == scale_before / 2
            assert_nothing_changed(name, model, opt, params_before, state_before)
        else:
            assert norms[0] > max_norm, "the grads were not clipped"
            assert_all_moved(model, params_before)
            # grad_scale is None after unscale_: the grads must not be unscaled again.
            for i, (g, p, q) in enumerate(zip(clipped, model.parameters(), ref_model.parameters())):
                assert torch.equal(p.grad, g), f"grad {i} was rewritten after unscale_"
                assert torch.equal(p.grad, q.grad), f"grad {i} differs from torch.optim's"
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert_matches(name, model, opt, ref_model, ref)


# --------------------------------------------------------------------------------------------
# 5. The flag: a device tensor, False after a plain step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,config", MAIN_CASES)
def test_step_skipped_flag_without_scaler(name, config, backend):
    model, opt, ref_model, ref = make_pair(name, config, backend)
    assert isinstance(type(opt).last_step_skipped, property)
    assert_step_flag(opt, False)  # before any step
    scaler = make_scaler()
    x0, x1, x2 = make_inputs(3)

    params_before = clone_params(model)
    opt.zero_grad()
    loss_of(model, x0).backward()
    opt.step()
    assert_step_flag(opt, False)
    assert_all_moved(model, params_before)

    # A skipped GradScaler step, then a plain step again: the flag follows the last step.
    params_before, state_before = clone_params(model), snapshot(opt)
    scaled_backward(model, opt, scaler, x1, math.nan)
    scaler.step(opt)
    scaler.update()
    assert_step_flag(opt, True)
    assert_nothing_changed(name, model, opt, params_before, state_before)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")

    params_before = clone_params(model)
    opt.zero_grad()
    loss_of(model, x2).backward()
    opt.step()
    assert_step_flag(opt, False)
    assert_all_moved(model, params_before)

    # The same sequence on torch.optim (its skipped step is no step at all).
    for x in (x0, x2):
        ref.zero_grad()
        loss_of(ref_model, x).backward()
        ref.step()
    assert_matches(name, model, opt, ref_model, ref)


# --------------------------------------------------------------------------------------------
# 6. bf16/fp16 params under GradScaler: both backends agree bitwise
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,config", MAIN_CASES)
def test_low_precision_backends_agree_bitwise(name, config, dtype):
    config = testing.adapt_config(name, config, dtype)  # fp16 Adam: eps=0.1, as torch's tests
    model = make_model(dtype)
    models = {backend: copy.deepcopy(model) for backend in BACKENDS}
    opts = {b: FUSED[name](m.parameters(), backend=b, **config) for b, m in models.items()}
    scalers = {backend: make_scaler() for backend in BACKENDS}
    inject_at = {1: math.inf}
    for it, x in enumerate(make_inputs(4, dtype)):
        inject = inject_at.get(it)
        skipped = inject is not None
        for backend in BACKENDS:
            m, o, s = models[backend], opts[backend], scalers[backend]
            params_before, state_before = clone_params(m), snapshot(o)
            scale_before = s.get_scale()
            scaled_backward(m, o, s, x, inject)
            scaled = clone_grads(m)
            s.step(o)
            s.update()
            assert_step_flag(o, skipped)
            assert all(p.dtype == dtype for p in m.parameters())
            if skipped:
                assert s.get_scale() == scale_before / 2
                assert_nothing_changed(name, m, o, params_before, state_before)
            else:
                assert_all_moved(m, params_before)
                for g, p in zip(scaled, m.parameters()):
                    assert torch.equal(p.grad, g / scale_before)
        a, b = (models[backend] for backend in BACKENDS)
        for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
            assert torch.equal(p, q), f"param {i}: triton and reference differ ({max_abs(p, q)})"
            assert torch.equal(p.grad, q.grad), f"grad {i}: triton and reference differ"
        state_a, state_b = (snapshot(opts[backend]) for backend in BACKENDS)
        assert set(state_a) == set(state_b)
        for index, entry in state_a.items():
            assert set(entry) == set(state_b[index])
            for key, value in entry.items():
                other = state_b[index][key]
                assert value.dtype == other.dtype, (index, key)
                assert torch.equal(value, other), (index, key)
                if key != "step":
                    assert value.dtype == dtype  # torch.optim's format: states in param dtype


# --------------------------------------------------------------------------------------------
# 7. Who is told the step unscales: GradScaler, and nobody else (Lightning's clipping check)
# --------------------------------------------------------------------------------------------


def _lightning_optimizer_handles_unscaling(optimizer) -> bool:
    """What Lightning's precision plugins (lightning.pytorch.plugins.precision.amp) check before
    clipping gradients, also under bf16 autocast: clipping is refused when this is True."""
    return getattr(optimizer, "_step_supports_amp_scaling", False)


@pytest.mark.parametrize("backend", cpu_backends())
def test_grad_scaler_alone_is_told_the_step_unscales(backend):
    """GradScaler hands the step grad_scale and found_inf (the kernels unscale and skip), while
    code outside torch's amp, Lightning's clipping check among it, reads False."""
    model, opt, _, _ = make_pair("AdamW", {"lr": 0.01}, backend)
    assert _lightning_optimizer_handles_unscaling(opt) is False
    seen = []
    original_step = opt.step

    def recording_step(*args, **kwargs):
        seen.append((getattr(opt, "grad_scale", "absent"), getattr(opt, "found_inf", "absent")))
        return original_step(*args, **kwargs)

    opt.step = recording_step
    scaler = make_scaler()
    scaled_backward(model, opt, scaler, make_inputs(1)[0])
    scaler.step(opt)
    ((grad_scale, found_inf),) = seen
    assert isinstance(grad_scale, Tensor) and isinstance(found_inf, Tensor)
    assert float(grad_scale) == INIT_SCALE and float(found_inf) == 0


@pytest.mark.parametrize("backend", cpu_backends())
def test_bf16_autocast_with_gradient_clipping_as_lightning_runs_it(backend):
    """Lightning's ``Trainer(precision="bf16-mixed", gradient_clip_val=1.0)``: bf16 autocast, no
    scaler, its clipping check, ``clip_grad_norm_``, ``step``. It trains, and matches torch.optim
    (whose step gets the same grads) bitwise."""
    model, opt, ref_model, ref = make_pair("AdamW", {"lr": 0.01, "weight_decay": 0.1}, backend)
    before = clone_params(model)
    for x in make_inputs(4):
        for m, o in ((model, opt), (ref_model, ref)):
            if _lightning_optimizer_handles_unscaling(o):
                raise RuntimeError("the optimizer does not allow for gradient clipping")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(m, x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            o.step()
            o.zero_grad()
    assert_all_moved(model, before)
    assert_matches("AdamW", model, opt, ref_model, ref)
