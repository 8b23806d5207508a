"""Everything torch.optim's SGD / Adam / AdamW support works the same in fused_optim.

Each parity test runs fused_optim and torch.optim (foreach=False, the for-loop reference) side by
side on identical fresh models and data, compares with ``torch.testing.assert_close``'s default
fp32 tolerances, and also checks that the parameters actually moved.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

import fused_optim
from fused_optim import testing

from cases import AUTO_CPU, cpu_backends

CLASSES = ("SGD", "Adam", "AdamW")

# A representative, non-trivial configuration for each class.
BASE_KWARGS = {
    "SGD": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "Adam": {"lr": 0.01, "weight_decay": 0.01, "amsgrad": True},
    "AdamW": {"lr": 0.01, "weight_decay": 0.1},
}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def batch(i: int) -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(1000 + i))


def loss_fn(model: nn.Module, i: int) -> torch.Tensor:
    return model(batch(i)).pow(2).mean() + model(batch(i)).sum() * 0.1


def train_step(model, opt, i: int) -> None:
    opt.zero_grad()
    loss_fn(model, i).backward()
    opt.step()


def initial_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_match_and_moved(fused_params, torch_params, initial) -> None:
    fused_params, torch_params = list(fused_params), list(torch_params)
    assert len(fused_params) == len(torch_params) == len(initial)
    for f, t, p0 in zip(fused_params, torch_params, initial):
        torch.testing.assert_close(f, t)
        assert not torch.equal(f, p0), "the parameter did not move"


def pair(cls_name, fused_params, torch_params, **kwargs):
    fused = getattr(fused_optim, cls_name)(fused_params, **kwargs)
    ref = getattr(torch.optim, cls_name)(torch_params, foreach=False, **kwargs)
    return fused, ref


# --------------------------------------------------------------------------------------------
# Param groups


GROUP_KWARGS = {
    "SGD": (
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
        {"lr": 0.05, "momentum": 0.5, "nesterov": True, "maximize": False},
    ),
    "Adam": (
        {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1, "amsgrad": True},
        {"lr": 0.03, "betas": (0.9, 0.999), "eps": 1e-6},
    ),
    "AdamW": (
        {"lr": 0.01, "betas": (0.85, 0.95), "weight_decay": 0.2},
        {"lr": 0.02, "weight_decay": 0.0, "amsgrad": True},
    ),
}


@pytest.mark.parametrize("cls_name", CLASSES)
def test_param_groups_with_different_hyperparameters(cls_name):
    first, second = GROUP_KWARGS[cls_name]
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    fused, ref = pair(
        cls_name,
        [{"params": mf[0].parameters(), **first}, {"params": mf[2].parameters(), **second}],
        [{"params": mt[0].parameters(), **first}, {"params": mt[2].parameters(), **second}],
        lr=0.5,
    )
    assert fused.group_backends() == [AUTO_CPU, AUTO_CPU]
    for i in range(4):
        train_step(mf, fused, i)
        train_step(mt, ref, i)
        for f, t in zip(mf.parameters(), mt.parameters()):
            torch.testing.assert_close(f, t)
    assert_match_and_moved(mf.parameters(), mt.parameters(), initial)
    for fg, tg in zip(fused.param_groups, ref.param_groups):
        assert {k: v for k, v in fg.items() if k not in ("params", "foreach")} == {
            k: v for k, v in tg.items() if k not in ("params", "foreach")
        }


@pytest.mark.parametrize("cls_name", CLASSES)
def test_add_param_group_mid_training(cls_name):
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    kwargs = BASE_KWARGS[cls_name]
    fused, ref = pair(cls_name, mf[0].parameters(), mt[0].parameters(), **kwargs)
    for i in range(2):
        train_step(mf, fused, i)
        train_step(mt, ref, i)
    # Layer 2 has not moved yet: its grads were never used.
    for p, p0 in zip(mf[2].parameters(), initial[2:]):
        assert torch.equal(p, p0)
    extra = {"lr": kwargs["lr"] * 3}
    fused.add_param_group({"params": mf[2].parameters(), **extra})
    ref.add_param_group({"params": mt[2].parameters(), **extra})
    assert len(fused.param_groups) == 2
    for i in range(2, 5):
        train_step(mf, fused, i)
        train_step(mt, ref, i)
    assert_match_and_moved(mf.parameters(), mt.parameters(), initial)
    if cls_name != "SGD":
        steps = [float(fused.state[p]["step"]) for p in mf.parameters()]
        assert steps == [5.0, 5.0, 3.0, 3.0]


@pytest.mark.parametrize("cls_name", CLASSES)
def test_params_without_grad_on_some_steps(cls_name):
    """A param skipped on some steps gets its own step count, as in torch.optim."""
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    fused, ref = pair(cls_name, mf.parameters(), mt.parameters(), **BASE_KWARGS[cls_name])
    for i in range(5):
        for model, opt in ((mf, fused), (mt, ref)):
            opt.zero_grad()
            loss_fn(model, i).backward()
            if i % 2 == 0:
                model[2].bias.grad = None
            if i == 1:
                model[0].weight.grad = None
            opt.step()
    assert_match_and_moved(mf.parameters(), mt.parameters(), initial)
    assert len(fused.state) == len(ref.state)
    if cls_name != "SGD":
        steps = [float(fused.state[p]["step"]) for p in mf.parameters()]
        assert steps == [float(ref.state[p]["step"]) for p in mt.parameters()]
        assert steps == [4.0, 5.0, 5.0, 2.0]


# --------------------------------------------------------------------------------------------
# Named parameters


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("grouped", [False, True])
def test_named_parameters(cls_name, grouped):
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)

    def params(model):
        if not grouped:
            return model.named_parameters()
        return [
            {"params": list(model[0].named_parameters(prefix="0"))},
            {"params": list(model[2].named_parameters(prefix="2")), "lr": 0.02},
        ]

    fused, ref = pair(cls_name, params(mf), params(mt), **BASE_KWARGS[cls_name])
    for i in range(3):
        train_step(mf, fused, i)
        train_step(mt, ref, i)
    assert_match_and_moved(mf.parameters(), mt.parameters(), initial)
    fused_names = [g["param_names"] for g in fused.state_dict()["param_groups"]]
    torch_names = [g["param_names"] for g in ref.state_dict()["param_groups"]]
    assert fused_names == torch_names
    assert [n for names in fused_names for n in names] == [n for n, _ in mf.named_parameters()]


# --------------------------------------------------------------------------------------------
# zero_grad, closures, hooks


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(cls_name, set_to_none):
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    fused, ref = pair(cls_name, mf.parameters(), mt.parameters(), **BASE_KWARGS[cls_name])
    for i in range(3):
        for model, opt in ((mf, fused), (mt, ref)):
            opt.zero_grad(set_to_none=set_to_none)
            for p in model.parameters():
                if set_to_none or i == 0:
                    assert p.grad is None
                else:
                    assert p.grad is not None and not p.grad.any()
            loss_fn(model, i).backward()
            opt.step()
    assert_match_and_moved(mf.parameters(), mt.parameters(), initial)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_step_with_closure_returns_loss(cls_name):
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    fused, ref = pair(cls_name, mf.parameters(), mt.parameters(), **BASE_KWARGS[cls_name])
    calls = []

    def closure_for(model, opt, i):
        def closure():
            assert torch.is_grad_enabled()
            opt.zero_grad()
            loss = loss_fn(model, i)
            loss.backward()
            calls.append(i)
            return loss

        return closure

    for i in range(3):
        fused_loss = fused.step(closure_for(mf, fused, i))
        torch_loss = ref.step(closure_for(mt, ref, i))
        assert isinstance(fused_loss, torch.Tensor)
        torch.testing.assert_close(fused_loss, torch_loss)
        assert fused_loss.requires_grad
    assert calls == [0, 0, 1, 1, 2, 2]
    assert fused.step() is None
    assert ref.step() is None
    assert_match_and_moved(mf.parameters(), mt.parameters(), initial)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_step_pre_and_post_hooks(cls_name):
    model = make_model()
    opt = getattr(fused_optim, cls_name)(model.parameters(), **BASE_KWARGS[cls_name])
    events = []

    def pre_hook(optimizer, args, kwargs):
        assert optimizer is opt
        events.append(("pre", [p.detach().clone() for p in model.parameters()]))

    def post_hook(optimizer, args, kwargs):
        assert optimizer is opt
        events.append(("post", [p.detach().clone() for p in model.parameters()]))

    pre_handle = opt.register_step_pre_hook(pre_hook)
    post_handle = opt.register_step_post_hook(post_hook)
    before = initial_of(model)
    train_step(model, opt, 0)
    after = initial_of(model)
    assert [kind for kind, _ in events] == ["pre", "post"]
    # The pre hook runs before the update, the post hook after it.
    assert all(torch.equal(a, b) for a, b in zip(events[0][1], before))
    assert all(torch.equal(a, b) for a, b in zip(events[1][1], after))
    assert not any(torch.equal(a, b) for a, b in zip(before, after))

    pre_handle.remove()
    post_handle.remove()
    train_step(model, opt, 1)
    assert len(events) == 2


# --------------------------------------------------------------------------------------------
# deepcopy and pickle


@pytest.mark.parametrize("cls_name", CLASSES)
def test_deepcopy_then_continue_both(cls_name):
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    fused, ref = pair(cls_name, mf.parameters(), mt.parameters(), **BASE_KWARGS[cls_name])
    for i in range(2):
        train_step(mf, fused, i)
        train_step(mt, ref, i)
    # Copy model and optimizer together so the copy's optimizer holds the copied params.
    mc, copied = copy.deepcopy((mf, fused))
    assert type(copied) is type(fused)
    assert copied.backend == fused.backend
    assert all(p in copied.state for p in mc.parameters())
    assert not any(p in copied.state for p in mf.parameters())
    for i in range(2, 5):
        train_step(mf, fused, i)
        train_step(mc, copied, i)
        train_step(mt, ref, i)
    for f, c in zip(mf.parameters(), mc.parameters()):
        assert torch.equal(f, c)
    assert_match_and_moved(mc.parameters(), mt.parameters(), initial)
    for pf, pc in zip(mf.parameters(), mc.parameters()):
        for key, value in fused.state[pf].items():
            assert torch.equal(copied.state[pc][key], value)
            assert copied.state[pc][key] is not value


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("backend", [None, "triton", "reference"])
def test_pickle_round_trip(cls_name, backend):
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    kwargs = BASE_KWARGS[cls_name]
    fused = getattr(fused_optim, cls_name)(mf.parameters(), backend=backend, **kwargs)
    ref = getattr(torch.optim, cls_name)(mt.parameters(), foreach=False, **kwargs)
    for i in range(2):
        train_step(mf, fused, i)
        train_step(mt, ref, i)

    mp, loaded = pickle.loads(pickle.dumps((mf, fused)))
    assert type(loaded) is type(fused)
    assert loaded.backend == backend
    assert loaded.group_backends() == fused.group_backends()
    assert len(loaded.param_groups) == len(fused.param_groups)
    for lg, fg in zip(loaded.param_groups, fused.param_groups):
        assert {k: v for k, v in lg.items() if k != "params"} == {
            k: v for k, v in fg.items() if k != "params"
        }
        assert all(a is b for a, b in zip(lg["params"], mp.parameters()))
    for pf, pp in zip(mf.parameters(), mp.parameters()):
        assert fused.state[pf].keys() == loaded.state[pp].keys()
        for key, value in fused.state[pf].items():
            assert torch.equal(loaded.state[pp][key], value)

    for i in range(2, 4):
        train_step(mp, loaded, i)
        train_step(mt, ref, i)
    assert_match_and_moved(mp.parameters(), mt.parameters(), initial)
    assert loaded.backend == backend


# --------------------------------------------------------------------------------------------
# LR schedulers


def _step_lr(opt):
    return lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def _cosine(opt):
    return lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4)


def _one_cycle(opt):
    return lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10, cycle_momentum=True)


def _cyclic(opt):
    return lr_scheduler.CyclicLR(
        opt, base_lr=0.005, max_lr=0.05, step_size_up=3, cycle_momentum=True
    )


SCHEDULER_CASES = [
    ("SGD", {"lr": 0.05, "momentum": 0.9}, _step_lr),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}, _cosine),
    ("SGD", {"lr": 0.05, "momentum": 0.9}, _one_cycle),
    ("SGD", {"lr": 0.05, "momentum": 0.9}, _cyclic),
    ("Adam", {"lr": 0.01}, _step_lr),
    ("Adam", {"lr": 0.01, "amsgrad": True}, _cosine),
    ("Adam", {"lr": 0.01}, _one_cycle),
    ("Adam", {"lr": 0.01}, _cyclic),
    ("AdamW", {"lr": 0.01}, _step_lr),
    ("AdamW", {"lr": 0.01}, _cosine),
    ("AdamW", {"lr": 0.01}, _one_cycle),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1}, _cyclic),
]


def _momentum_of(group):
    return group["momentum"] if "momentum" in group else group["betas"]


@pytest.mark.parametrize(
    ("cls_name", "kwargs", "make_scheduler"),
    [
        pytest.param(c, kw, s, id=f"{c}-{s.__name__.strip('_')}-{i}")
        for i, (c, kw, s) in enumerate(SCHEDULER_CASES)
    ],
)
def test_lr_scheduler(cls_name, kwargs, make_scheduler):
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    fused, ref = pair(cls_name, mf.parameters(), mt.parameters(), **kwargs)
    sched_f, sched_t = make_scheduler(fused), make_scheduler(ref)
    lrs = []
    for i in range(10):
        train_step(mf, fused, i)
        train_step(mt, ref, i)
        sched_f.step()
        sched_t.step()
        for f, t in zip(mf.parameters(), mt.parameters()):
            torch.testing.assert_close(f, t)
        assert fused.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        assert sched_f.get_last_lr() == sched_t.get_last_lr()
        assert _momentum_of(fused.param_groups[0]) == _momentum_of(ref.param_groups[0])
        lrs.append(fused.param_groups[0]["lr"])
    assert len(set(lrs)) > 1, "the schedule never changed the lr"
    assert_match_and_moved(mf.parameters(), mt.parameters(), initial)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_lr_scheduler_with_tensor_lr(cls_name):
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    fused = getattr(fused_optim, cls_name)(mf.parameters(), lr=torch.tensor(0.02))
    ref = getattr(torch.optim, cls_name)(mt.parameters(), lr=torch.tensor(0.02), foreach=False)
    sched_f, sched_t = _cosine(fused), _cosine(ref)
    for i in range(6):
        train_step(mf, fused, i)
        train_step(mt, ref, i)
        sched_f.step()
        sched_t.step()
        assert isinstance(fused.param_groups[0]["lr"], torch.Tensor)
        torch.testing.assert_close(fused.param_groups[0]["lr"], ref.param_groups[0]["lr"])
    assert_match_and_moved(mf.parameters(), mt.parameters(), initial)


# --------------------------------------------------------------------------------------------
# Complex parameters, tensor lr, capturable


def complex_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(6, 5, dtype=torch.complex64, generator=g).requires_grad_(),
        torch.randn(7, dtype=torch.complex64, generator=g).requires_grad_(),
    ]


def set_grads(params, i):
    g = torch.Generator().manual_seed(500 + i)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)


COMPLEX_KWARGS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("Adam", {"lr": 0.05, "weight_decay": 0.01}),
    ("Adam", {"lr": 0.05, "amsgrad": True, "maximize": True}),
    ("AdamW", {"lr": 0.05}),
    ("AdamW", {"lr": 0.05, "amsgrad": True}),
]


@pytest.mark.parametrize(("cls_name", "kwargs"), COMPLEX_KWARGS)
def test_complex_params(cls_name, kwargs):
    pf, pt = complex_params(), complex_params()
    initial = [p.detach().clone() for p in pf]
    fused, ref = pair(cls_name, pf, pt, **kwargs)
    assert fused.group_backends() == [AUTO_CPU]
    for i in range(4):
        set_grads(pf, i)
        set_grads(pt, i)
        fused.step()
        ref.step()
    assert_match_and_moved(pf, pt, initial)
    for f, t in zip(pf, pt):
        assert f.dtype == torch.complex64
        assert fused.state[f].keys() == ref.state[t].keys()
        for key, value in ref.state[t].items():
            assert fused.state[f][key].dtype == value.dtype
            torch.testing.assert_close(fused.state[f][key], value)


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_tensor_lr(cls_name, backend):
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    kwargs = dict(BASE_KWARGS[cls_name], lr=torch.tensor(0.01))
    fused = getattr(fused_optim, cls_name)(mf.parameters(), backend=backend, **kwargs)
    kwargs = dict(BASE_KWARGS[cls_name], lr=torch.tensor(0.01))
    ref = getattr(torch.optim, cls_name)(mt.parameters(), foreach=False, **kwargs)
    for i in range(3):
        train_step(mf, fused, i)
        train_step(mt, ref, i)
    assert isinstance(fused.param_groups[0]["lr"], torch.Tensor)
    assert float(fused.param_groups[0]["lr"]) == pytest.approx(0.01)
    assert_match_and_moved(mf.parameters(), mt.parameters(), initial)


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_capturable(cls_name, backend, tensor_lr):
    # torch.optim refuses capturable=True on the CPU; its default path is the reference.
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    lr = (lambda: torch.tensor(0.01)) if tensor_lr else (lambda: 0.01)
    fused = getattr(fused_optim, cls_name)(
        mf.parameters(), lr=lr(), amsgrad=True, capturable=True, backend=backend
    )
    ref = getattr(torch.optim, cls_name)(
        mt.parameters(), lr=lr(), amsgrad=True, capturable=False, foreach=False
    )
    for i in range(4):
        train_step(mf, fused, i)
        train_step(mt, ref, i)
    assert_match_and_moved(mf.parameters(), mt.parameters(), initial)
    for p in mf.parameters():
        step = fused.state[p]["step"]
        assert step.device == p.device
        assert step.dtype == torch.float32
        assert step.shape == ()
        assert float(step) == 4.0


# --------------------------------------------------------------------------------------------
# Backend reporting, class identity, accepted no-op flags


@pytest.mark.parametrize("cls_name", CLASSES)
def test_group_backends(cls_name):
    model = make_model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    opt_cls = getattr(fused_optim, cls_name)
    assert opt_cls(model.parameters()).group_backends() == [AUTO_CPU]
    assert opt_cls(model.parameters(), backend="triton").group_backends() == ["triton"]
    assert opt_cls(model.parameters(), backend="reference").group_backends() == ["reference"]
    assert opt_cls(groups).group_backends() == [AUTO_CPU, AUTO_CPU]
    if AUTO_CPU == "cpu":
        assert opt_cls(model.parameters(), backend="cpu").group_backends() == ["cpu"]
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    assert opt_cls(groups, backend="reference").group_backends() == ["reference", "reference"]
    assert opt_cls(model.parameters()).backend is None


@pytest.mark.parametrize("cls_name", CLASSES)
def test_isinstance_of_torch_class(cls_name):
    opt = getattr(fused_optim, cls_name)(make_model().parameters())
    assert isinstance(opt, getattr(torch.optim, cls_name))
    assert isinstance(opt, torch.optim.Optimizer)


def test_adamw_defaults_match_torch():
    params = list(make_model().parameters())
    fused = fused_optim.AdamW(params)
    ref = torch.optim.AdamW(params)
    assert fused.defaults == ref.defaults
    assert fused.param_groups[0]["weight_decay"] == 0.01
    assert fused.param_groups[0]["decoupled_weight_decay"] is True


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("flags", [{"fused": True}, {"foreach": False}, {"foreach": True}])
def test_fused_and_foreach_flags_are_accepted(cls_name, flags):
    mf, mt = make_model(), make_model()
    initial = initial_of(mf)
    fused = getattr(fused_optim, cls_name)(mf.parameters(), **flags, **BASE_KWARGS[cls_name])
    ref = getattr(torch.optim, cls_name)(mt.parameters(), foreach=False, **BASE_KWARGS[cls_name])
    assert fused.group_backends() == [AUTO_CPU]
    for key, value in flags.items():
        assert fused.param_groups[0][key] == value
    for i in range(3):
        train_step(mf, fused, i)
        train_step(mt, ref, i)
    assert_match_and_moved(mf.parameters(), mt.parameters(), initial)


LR_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cls_name", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("lr_dtype", LR_DTYPES, ids=str)
def test_lr_tensor_of_every_dtype_follows_torch(cls_name, lr_dtype, backend):
    """A tensor lr of any dtype torch accepts: torch.optim's arithmetic around it (fp64 and fp32
    as they are, bf16/fp16 one fp32 operation at a time rounded to the lr's dtype, an integer
    promoted to the default float dtype), bitwise; and a checkpoint whose ``step`` is an int64
    tensor."""
    lr = torch.tensor(1 if lr_dtype == torch.int64 else 0.0123, dtype=lr_dtype)
    generator = torch.Generator().manual_seed(7)
    start = torch.randn(64, generator=generator)
    grads = [torch.randn(64, generator=generator) for _ in range(3)]
    # torch.optim with its fp32 sqrt correctly rounded (torch's own CPU sqrt is off by an ulp
    # for some inputs, depending on the CPU): its arithmetic, on every machine.
    exact_torch = testing.correctly_rounded_optimizer(getattr(torch.optim, cls_name))
    results = []
    for make, kwargs in ((exact_torch, {"foreach": False}),
                         (getattr(fused_optim, cls_name), {"backend": backend})):  # fmt: skip
        params = [start.clone().requires_grad_()]
        extra = {"momentum": 0.9} if cls_name == "SGD" else {"weight_decay": 0.1}
        opt = make(params, lr=lr.clone(), **extra, **kwargs)
        for number, grad in enumerate(grads):
            params[0].grad = grad.clone()
            opt.step()
            if number == 0 and cls_name != "SGD":
                saved = copy.deepcopy(opt.state_dict())
                saved["state"][0]["step"] = saved["state"][0]["step"].to(torch.int64)
                opt.load_state_dict(saved)
        steps = [entry.get("step") for entry in opt.state_dict()["state"].values()]
        results.append((params[0].detach().clone(), steps))
    (torch_p, torch_steps), (p, steps) = results
    torch.testing.assert_close(p, torch_p, rtol=0, atol=0)
    assert not torch.equal(p, start)
    for s, t in zip(steps, torch_steps):
        assert (s is None) == (t is None)
        if s is not None:
            assert s.dtype == t.dtype and torch.equal(s, t)


COMPLEX_BITWISE = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}),
    ("SGD", {"lr": torch.tensor(0.1), "momentum": 0.9}),
    ("Adam", {"lr": 0.05, "weight_decay": 0.01}),
    ("Adam", {"lr": 0.05, "weight_decay": 0.01, "amsgrad": True, "maximize": True}),
    ("AdamW", {"lr": 0.05, "weight_decay": 0.1}),
]


# complex128 with SGD only: torch's fp64 sqrt is not correctly rounded on every CPU (an ulp off
# for about 1% of inputs on AVX-512), and no correctly rounded fp64 oracle exists in torch.
COMPLEX_BITWISE_CASES = [
    pytest.param(name, kwargs, dtype, id=f"{name}-{kwargs}-{str(dtype)[6:]}")
    for name, kwargs in COMPLEX_BITWISE
    for dtype in (torch.complex64, torch.complex128)
    if dtype == torch.complex64 or name == "SGD"
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize(("cls_name", "kwargs", "dtype"), COMPLEX_BITWISE_CASES)
def test_complex_params_follow_torchs_complex_arithmetic(cls_name, kwargs, dtype, backend):
    """torch.optim adds ``alpha * x`` to complex tensors as complex arithmetic (the product
    rounded, then the add), where on real tensors it is one fused multiply-add: SGD's weight
    decay, momentum, nesterov and update, Adam's L2 term. fused_optim gives torch.optim's bits
    (its fp32 sqrt rounded correctly, as on every CPU), a real param in the same group
    included, on several vector widths' worth of elements."""
    gen = torch.Generator().manual_seed(4)

    def params():
        g = torch.Generator().manual_seed(11)
        return [
            torch.randn(37, 29, dtype=dtype, generator=g).requires_grad_(),
            torch.randn(13, dtype=dtype.to_real(), generator=g).requires_grad_(),
        ]

    ours, theirs = params(), params()
    initial = [p.detach().clone() for p in ours]
    fused = getattr(fused_optim, cls_name)(ours, backend=backend, **kwargs)
    torch_cls = testing.correctly_rounded_optimizer(getattr(torch.optim, cls_name))
    reference = torch_cls(theirs, foreach=False, **kwargs)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, dtype=a.dtype, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        reference.step()
    for a, b, start in zip(ours, theirs, initial):
        assert torch.equal(a, b), (a - b).abs().max()
        assert not torch.equal(a, start)


def test_auto_falls_back_to_the_reference_on_cpu_with_one_warning(monkeypatch):
    """Without the C++ CPU extension (and without Triton's interpreter), CPU tensors get the
    reference backend: one RuntimeWarning per process naming the reinstall command, not a
    silent slowdown; an explicit backend="reference" says nothing."""
    backends = fused_optim.backends
    cpu = backends._module("cpu")
    monkeypatch.setattr(cpu, "_IMPORT_ERROR", ImportError("not built"))
    monkeypatch.setattr(backends._module("triton"), "is_available", lambda device: (False, ""))
    monkeypatch.setattr(backends, "_warned_slow_cpu_default", False)
    p = nn.Parameter(torch.ones(3))
    with pytest.warns(RuntimeWarning, match=r"reference backend.*pip install -v --force-reinstall"):
        opt = fused_optim.AdamW([p])
    assert opt.group_backends() == ["reference"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.grad = torch.ones(3)
        opt.step()
        fused_optim.AdamW([p])
        fused_optim.SGD([p], backend="reference").step()
    assert not torch.equal(p, torch.ones(3))
