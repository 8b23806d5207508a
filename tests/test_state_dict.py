"""state_dict format is torch.optim's, and checkpoints cross-load in both directions.

A checkpoint written by torch.optim.X loads into fused_optim.X and vice versa (through
``torch.save`` / ``torch.load(weights_only=True)``), and training resumed from it follows the
uninterrupted torch.optim run within ``torch.testing.assert_close``'s default fp32 tolerances.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fused_optim
from fused_optim import testing

from cases import cpu_backends

CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.8, "dampening": 0.3, "maximize": True}),
    ("Adam", {"lr": 0.05}),
    ("Adam", {"lr": 0.05, "amsgrad": True, "weight_decay": 0.01}),
    ("AdamW", {"lr": 0.05}),
    ("AdamW", {"lr": 0.05, "amsgrad": True, "weight_decay": 0.1}),
]
CASE_IDS = [f"{c}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for c, kw in CASES]


def expected_state_keys(cls_name: str, kwargs: dict) -> set[str]:
    if cls_name == "SGD":
        return {"momentum_buffer"} if kwargs.get("momentum", 0) else set()
    keys = {"step", "exp_avg", "exp_avg_sq"}
    return keys | {"max_exp_avg_sq"} if kwargs.get("amsgrad") else keys


def make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(6, 5, generator=g).requires_grad_(),
        torch.randn(5, generator=g).requires_grad_(),
        torch.randn(2, 3, 4, generator=g).requires_grad_(),
    ]


def clone_params(params) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def run(opt, params, steps) -> None:
    for i in steps:
        g = torch.Generator().manual_seed(100 + i)
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
        opt.step()


def roundtrip(state_dict: dict, **load_kwargs) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True, **load_kwargs)


def make(module, cls_name, params, kwargs):
    extra = {"foreach": False} if module is torch.optim else {}
    return getattr(module, cls_name)(params, **extra, **kwargs)


def assert_moved_and_close(params, reference, initial) -> None:
    for p, r, p0 in zip(params, reference, initial):
        torch.testing.assert_close(p, r)
        assert not torch.equal(p, p0), "the parameter did not move"


# --------------------------------------------------------------------------------------------
# Format


@pytest.mark.parametrize(("cls_name", "kwargs"), CASES, ids=CASE_IDS)
def test_state_dict_format_matches_torch(cls_name, kwargs):
    pf, pt = make_params(), make_params()
    fused = getattr(fused_optim, cls_name)(pf, foreach=False, **kwargs)
    ref = make(torch.optim, cls_name, pt, kwargs)
    run(fused, pf, range(3))
    run(ref, pt, range(3))

    sd_f, sd_t = fused.state_dict(), ref.state_dict()
    assert sd_f.keys() == sd_t.keys() == {"state", "param_groups"}
    assert sd_f["param_groups"] == sd_t["param_groups"]
    assert sd_f["state"].keys() == sd_t["state"].keys()
    keys = expected_state_keys(cls_name, kwargs)
    assert len(sd_f["state"]) == (len(pf) if keys else 0)
    for index, state in sd_f["state"].items():
        torch_state = sd_t["state"][index]
        assert set(state) == set(torch_state) == keys
        for key, value in torch_state.items():
            assert isinstance(state[key], torch.Tensor)
            assert state[key].dtype == value.dtype, key
            assert state[key].shape == value.shape, key
            assert state[key].device == value.device, key
            torch.testing.assert_close(state[key], value)
        if "step" in keys:
            step = state["step"]
            assert step.shape == () and step.dtype == torch.float32
            assert step.device == torch.device("cpu")
            assert float(step) == 3.0


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
def test_capturable_state_dict_format(cls_name):
    # torch.optim cannot step with capturable=True on the CPU; check torch's documented format:
    # step is a 0-dim float32 tensor on the params' device.
    params = make_params()
    opt = getattr(fused_optim, cls_name)(params, capturable=True, amsgrad=True)
    run(opt, params, range(2))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["capturable"] is True
    for index, p in enumerate(params):
        state = sd["state"][index]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert state["step"].shape == () and state["step"].dtype == torch.float32
        assert state["step"].device == p.device
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert state[key].shape == p.shape and state[key].dtype == p.dtype


# --------------------------------------------------------------------------------------------
# Cross-loading


@pytest.mark.parametrize(("cls_name", "kwargs"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_cross_load(cls_name, kwargs, direction):
    initial = make_params()
    uninterrupted = make_params()
    ref = make(torch.optim, cls_name, uninterrupted, kwargs)
    run(ref, uninterrupted, range(6))

    first, second = (
        (torch.optim, fused_optim) if direction == "torch_to_fused" else (fused_optim, torch.optim)
    )
    saved_params = make_params()
    saver = make(first, cls_name, saved_params, kwargs)
    run(saver, saved_params, range(3))
    checkpoint = roundtrip(saver.state_dict())

    resumed_params = clone_params(saved_params)
    resumed = make(second, cls_name, resumed_params, kwargs)
    resumed.load_state_dict(checkpoint)
    for p in resumed_params:
        for key, value in resumed.state[p].items():
            if key == "step":
                assert value.device == torch.device("cpu") and value.dtype == torch.float32
            else:
                assert value.dtype == p.dtype and value.shape == p.shape
    run(resumed, resumed_params, range(3, 6))
    assert_moved_and_close(resumed_params, uninterrupted, initial)
    if cls_name != "SGD":
        assert all(float(resumed.state[p]["step"]) == 6.0 for p in resumed_params)


@pytest.mark.parametrize("cls_name", ["Adam", "SGD"])
def test_cross_load_named_parameters(cls_name):
    kwargs = {"lr": 0.05, "momentum": 0.9} if cls_name == "SGD" else {"lr": 0.05}
    names = ["a", "b", "c"]
    initial = make_params()
    uninterrupted = make_params()
    ref = make(torch.optim, cls_name, list(zip(names, uninterrupted)), kwargs)
    run(ref, uninterrupted, range(4))

    saved = make_params()
    saver = make(torch.optim, cls_name, list(zip(names, saved)), kwargs)
    run(saver, saved, range(2))
    resumed_params = clone_params(saved)
    resumed = make(fused_optim, cls_name, list(zip(names, resumed_params)), kwargs)
    resumed.load_state_dict(roundtrip(saver.state_dict()))
    assert resumed.state_dict()["param_groups"][0]["param_names"] == names
    run(resumed, resumed_params, range(2, 4))
    assert_moved_and_close(resumed_params, uninterrupted, initial)


@pytest.mark.parametrize(("cls_name", "kwargs"), [CASES[2], CASES[5], CASES[7]], ids=str)
def test_load_with_map_location(cls_name, kwargs):
    initial = make_params()
    uninterrupted = make_params()
    ref = make(torch.optim, cls_name, uninterrupted, kwargs)
    run(ref, uninterrupted, range(5))

    saved = make_params()
    saver = make(fused_optim, cls_name, saved, kwargs)
    run(saver, saved, range(2))
    checkpoint = roundtrip(saver.state_dict(), map_location="cpu")
    resumed_params = clone_params(saved)
    resumed = make(fused_optim, cls_name, resumed_params, kwargs)
    resumed.load_state_dict(checkpoint)
    run(resumed, resumed_params, range(2, 5))
    assert_moved_and_close(resumed_params, uninterrupted, initial)


def _with_step_dtype(state_dict: dict, dtype: torch.dtype) -> dict:
    state_dict = copy.deepcopy(state_dict)
    for state in state_dict["state"].values():
        state["step"] = state["step"].to(dtype)
    return state_dict


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("partial", [False, True], ids=["all_params", "one_param_new"])
def test_load_float64_steps(cls_name, backend, partial):
    """A checkpoint whose steps are float64 (e.g. written elsewhere) still trains correctly.

    torch.optim keeps such steps as they are (capturable=False); with ``partial``, one param had
    no state in the checkpoint, so its fresh float32 step shares a group with float64 ones.
    """
    kwargs = {"lr": 0.05, "amsgrad": True}
    initial = make_params()
    saved = make_params()
    saver = make(torch.optim, cls_name, saved, kwargs)
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        for j, p in enumerate(saved):
            p.grad = None if partial and j == 1 else torch.randn(p.shape, generator=g)
        saver.step()
    checkpoint = _with_step_dtype(roundtrip(saver.state_dict()), torch.float64)

    ref_params, fused_params = clone_params(saved), clone_params(saved)
    ref = make(torch.optim, cls_name, ref_params, kwargs)
    ref.load_state_dict(copy.deepcopy(checkpoint))
    fused = getattr(fused_optim, cls_name)(fused_params, backend=backend, **kwargs)
    fused.load_state_dict(copy.deepcopy(checkpoint))
    assert fused.group_backends() == [backend]
    for pf, pt in zip(fused_params, ref_params):
        if pt in ref.state:
            assert fused.state[pf]["step"].dtype == ref.state[pt]["step"].dtype == torch.float64
    run(ref, ref_params, range(3, 6))
    run(fused, fused_params, range(3, 6))
    assert_moved_and_close(fused_params, ref_params, initial)
    for pf, pt in zip(fused_params, ref_params):
        step_f, step_t = fused.state[pf]["step"], ref.state[pt]["step"]
        assert step_f.device == torch.device("cpu")
        assert step_f.dtype == step_t.dtype
        assert float(step_f) == float(step_t)


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
def test_load_into_capturable_moves_steps_like_torch(cls_name):
    """Loading into capturable=True puts float32 steps on the params' device, as torch does."""
    kwargs = {"lr": 0.05, "capturable": True}
    initial = make_params()
    saved = make_params()
    saver = make(fused_optim, cls_name, saved, kwargs)
    run(saver, saved, range(2))
    checkpoint = _with_step_dtype(roundtrip(saver.state_dict()), torch.float64)

    torch_loaded = make(torch.optim, cls_name, clone_params(saved), kwargs)
    torch_loaded.load_state_dict(copy.deepcopy(checkpoint))
    resumed_params = clone_params(saved)
    resumed = make(fused_optim, cls_name, resumed_params, kwargs)
    resumed.load_state_dict(copy.deepcopy(checkpoint))
    for pf, pt in zip(resumed_params, torch_loaded.param_groups[0]["params"]):
        step_f, step_t = resumed.state[pf]["step"], torch_loaded.state[pt]["step"]
        assert step_f.dtype == step_t.dtype == torch.float32
        assert step_f.device == step_t.device == pf.device

    # Continue; torch can only run the non-capturable path on the CPU.
    uninterrupted = make_params()
    ref = make(torch.optim, cls_name, uninterrupted, dict(kwargs, capturable=False))
    run(ref, uninterrupted, range(4))
    run(resumed, resumed_params, range(2, 4))
    assert_moved_and_close(resumed_params, uninterrupted, initial)
    assert all(float(resumed.state[p]["step"]) == 4.0 for p in resumed_params)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_capturable_steps_of_mixed_dtypes(backend):
    kwargs = {"lr": 0.05}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pf = [p.float() for p in make_params()]
        pf = [p.detach().requires_grad_() for p in pf]
        pt = clone_params(pf)
        initial = [p.detach().clone() for p in pf]
        fused = fused_optim.Adam(pf, capturable=True, backend=backend, **kwargs)
        ref = torch.optim.Adam(pt, foreach=False, **kwargs)
        run(fused, pf, range(1))
        run(ref, pt, range(1))
        # As load_state_dict into capturable=True does: this step becomes float32, while the
        # other params' steps stay float64 (torch's fresh-step dtype under float64 default).
        fused.state[pf[0]]["step"] = fused.state[pf[0]]["step"].to(torch.float32)
        assert fused.state[pf[1]]["step"].dtype == torch.float64
        run(fused, pf, range(1, 3))
        run(ref, pt, range(1, 3))
    finally:
        torch.set_default_dtype(previous)
    assert_moved_and_close(pf, pt, initial)


# --------------------------------------------------------------------------------------------
# What load_state_dict must keep


@pytest.mark.parametrize("cls_name", ["SGD", "Adam", "AdamW"])
def test_load_state_dict_keeps_backend(cls_name):
    params = make_params()
    opt = getattr(fused_optim, cls_name)(params, lr=0.01, backend="reference")
    run(opt, params, range(1))
    opt.load_state_dict(roundtrip(opt.state_dict()))
    assert opt.backend == "reference"
    assert opt.group_backends() == ["reference"]


@pytest.mark.parametrize("cls_name", ["SGD", "Adam", "AdamW"])
def test_load_state_dict_replaces_hyperparameters_like_torch(cls_name):
    source_kwargs = (
        {"lr": 0.2, "momentum": 0.5, "nesterov": True}
        if cls_name == "SGD"
        else {"lr": 0.2, "betas": (0.5, 0.6), "amsgrad": True}
    )
    saved = make_params()
    saver = make(torch.optim, cls_name, saved, source_kwargs)
    run(saver, saved, range(2))
    checkpoint = roundtrip(saver.state_dict())
    fused = getattr(fused_optim, cls_name)(clone_params(saved), lr=0.001)
    ref = getattr(torch.optim, cls_name)(clone_params(saved), lr=0.001)
    fused.load_state_dict(copy.deepcopy(checkpoint))
    ref.load_state_dict(copy.deepcopy(checkpoint))
    strip = [{k: v for k, v in g.items() if k != "params"} for g in ref.param_groups]
    assert [{k: v for k, v in g.items() if k != "params"} for g in fused.param_groups] == strip
    assert fused.param_groups[0]["lr"] == 0.2


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
def test_steps_of_shape_one_keep_their_shape(cls_name, backend):
    """A checkpoint whose ``step`` tensors have shape (1,): torch.optim keeps that shape (it
    adds to them in place), and so does fused_optim, with the same params after more steps."""
    # torch.optim with its fp32 sqrt correctly rounded (torch's own CPU sqrt is off by an ulp
    # for some inputs, depending on the CPU): its arithmetic, on every machine.
    exact_torch = testing.correctly_rounded_optimizer(getattr(torch.optim, cls_name))
    results = []
    for make, kwargs in ((exact_torch, {"foreach": False}),
                         (getattr(fused_optim, cls_name), {"backend": backend})):  # fmt: skip
        torch.manual_seed(0)
        params = [torch.randn(4, requires_grad=True), torch.randn(3, 2, requires_grad=True)]
        opt = make(params, lr=0.1, **kwargs)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        saved = copy.deepcopy(opt.state_dict())
        for entry in saved["state"].values():
            entry["step"] = entry["step"].reshape(1)
        opt.load_state_dict(saved)
        for _ in range(2):
            opt.step()
        steps = [entry["step"] for entry in opt.state_dict()["state"].values()]
        results.append(([p.detach().clone() for p in params], steps))
    (torch_params, torch_steps), (params, steps) = results
    assert [s.shape for s in steps] == [s.shape for s in torch_steps] == [(1,), (1,)]
    assert all(torch.equal(s, t) for s, t in zip(steps, torch_steps))
    for p, t in zip(params, torch_params):
        torch.testing.assert_close(p, t, rtol=0, atol=0)
