"""Bad input gets torch.optim's exception type and message, raised before anything is touched.

Every expected error is computed by running the matching torch.optim class on the same
arguments, never hard-coded; the fused optimizer must raise exactly the same type and message.
Errors at ``step()`` and ``load_state_dict()`` must leave every parameter and all optimizer state
bitwise as they were.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_optim

from cases import cpu_backends

CLASSES = ("SGD", "Adam", "AdamW")
ADAMS = ("Adam", "AdamW")


def _raised(fn) -> BaseException:
    """The exception ``fn()`` raises (fails the test if it raises nothing)."""
    with pytest.raises(Exception) as info:  # any type; compared below
        fn()
    return info.value


def _assert_same_error(fused_error: BaseException, torch_error: BaseException) -> None:
    assert type(fused_error) is type(torch_error), (fused_error, torch_error)
    assert str(fused_error) == str(torch_error)


def _leaf(*shape) -> torch.Tensor:
    return torch.randn(*shape, requires_grad=True)


def _two_params():
    return [_leaf(3, 2), _leaf(2)]


# Each case builds FRESH arguments: (params, kwargs). Applies to the classes listed.
def _case(kwargs):
    return lambda: (_two_params(), kwargs)


def _in_two_groups():
    p = _leaf(3)
    return [{"params": [p]}, {"params": [p]}], {}


CONSTRUCTOR_CASES = [
    ("negative_lr", CLASSES, _case({"lr": -0.1})),
    ("nan_lr", ADAMS, _case({"lr": float("nan")})),
    ("negative_eps", ADAMS, _case({"eps": -1e-8})),
    ("negative_beta0", ADAMS, _case({"betas": (-0.1, 0.999)})),
    ("beta0_is_one", ADAMS, _case({"betas": (1.0, 0.999)})),
    ("negative_beta1", ADAMS, _case({"betas": (0.9, -0.5)})),
    ("beta1_is_one", ADAMS, _case({"betas": (0.9, 1.0)})),
    ("negative_weight_decay", CLASSES, _case({"weight_decay": -0.01})),
    ("negative_momentum", ("SGD",), _case({"momentum": -0.9})),
    ("nesterov_without_momentum", ("SGD",), _case({"nesterov": True})),
    (
        "nesterov_with_dampening",
        ("SGD",),
        _case({"momentum": 0.9, "dampening": 0.1, "nesterov": True}),
    ),
    ("multi_element_tensor_lr", CLASSES, _case({"lr": torch.tensor([0.1, 0.2])})),
    ("betas_float_then_tensor", ADAMS, _case({"betas": (0.9, torch.tensor(0.999))})),
    ("betas_tensor_then_float", ADAMS, _case({"betas": (torch.tensor(0.9), 0.999)})),
    (
        "multi_element_tensor_betas",
        ADAMS,
        _case({"betas": (torch.tensor([0.9, 0.8]), torch.tensor([0.99, 0.98]))}),
    ),
    (
        "tensor_betas_with_foreach",
        ADAMS,
        _case({"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True}),
    ),
    (
        "tensor_lr_foreach_not_capturable",
        ADAMS,
        _case({"lr": torch.tensor(0.01), "foreach": True, "capturable": False}),
    ),
    ("fused_and_foreach", CLASSES, _case({"fused": True, "foreach": True})),
    ("fused_and_differentiable", CLASSES, _case({"fused": True, "differentiable": True})),
    ("empty_param_list", CLASSES, lambda: ([], {})),
    ("params_as_single_tensor", CLASSES, lambda: (_leaf(3), {})),
    ("param_in_two_groups", CLASSES, _in_two_groups),
    ("non_leaf_param", CLASSES, lambda: ([_leaf(3) * 2], {})),
    ("non_tensor_param", CLASSES, lambda: ([_leaf(3), 1.0], {})),
]


@pytest.mark.parametrize(
    ("cls_name", "build"),
    [
        pytest.param(cls_name, build, id=f"{cls_name}-{case_id}")
        for case_id, classes, build in CONSTRUCTOR_CASES
        for cls_name in classes
    ],
)
def test_constructor_error_matches_torch(cls_name, build):
    torch_params, torch_kwargs = build()
    torch_error = _raised(lambda: getattr(torch.optim, cls_name)(torch_params, **torch_kwargs))

    params, kwargs = build()
    flat = [p for p in (params if isinstance(params, list) else []) if isinstance(p, torch.Tensor)]
    before = [p.detach().clone() for p in flat]
    fused_error = _raised(lambda: getattr(fused_optim, cls_name)(params, **kwargs))

    _assert_same_error(fused_error, torch_error)
    for p, b in zip(flat, before):
        assert torch.equal(p, b)
        assert not p.is_leaf or p.grad is None


@pytest.mark.parametrize("cls_name", CLASSES)
def test_differentiable_runs_torch_optims_step(cls_name):
    """differentiable=True hands the step to torch.optim's own implementation: the same values,
    the same gradients through two steps, step hooks run once, and group_backends() says so."""
    results = []
    for module in (fused_optim, torch.optim):
        torch.manual_seed(0)
        start = torch.rand(10, dtype=torch.float64, requires_grad=True)
        grad = torch.rand(10, dtype=torch.float64, requires_grad=True)
        p = start.clone()
        kwargs = {"momentum": 0.9} if cls_name == "SGD" else {"weight_decay": 0.1}
        opt = getattr(module, cls_name)([p], lr=0.1, differentiable=True, **kwargs)
        calls: list[str] = []
        opt.register_step_pre_hook(lambda *args, calls=calls: calls.append("pre"))
        opt.register_step_post_hook(lambda *args, calls=calls: calls.append("post"))
        for factor in (1.0, 2.0):
            p.grad = grad * factor
            opt.step()
        assert calls == ["pre", "post"] * 2
        results.append((p.detach(), torch.autograd.grad(p.sum(), (start, grad))))
        if module is fused_optim:
            assert opt.group_backends() == [fused_optim.optim.TORCH_OPTIM]
    (p, grads), (expected_p, expected_grads) = results
    assert torch.equal(p, expected_p)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


def _float64(generator, *shape, requires_grad=True):
    return torch.rand(*shape, dtype=torch.float64, generator=generator).requires_grad_(
        requires_grad
    )


@pytest.mark.parametrize("cls_name", CLASSES)
def test_differentiable_step_passes_gradcheck(cls_name):
    """What PyTorch's differentiable-optimizer tests check, with fused_optim's classes:
    torch.autograd.gradcheck through one step with respect to the param, its grad and every
    state tensor, and through two steps (grads taken with create_graph) with respect to tensor
    hyperparameters that require grad (lr and weight decay; Adam's betas too)."""
    cls = getattr(fused_optim, cls_name)
    gen = torch.Generator().manual_seed(0)
    if cls_name == "SGD":
        options: dict = {"momentum": 0.9}
        state = {"momentum_buffer": _float64(gen, 6)}
    else:
        options = {"amsgrad": True}
        state = {"step": torch.tensor(5.0, dtype=torch.float64)}
        state.update({key: _float64(gen, 6) for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")})
    names = [key for key, value in state.items() if value.requires_grad]

    def one_step(p, grad, *values):
        p = p.clone()
        p.grad = grad
        opt = cls([p], lr=0.5, differentiable=True, **options)
        opt.state[p].update({key: value.clone() for key, value in state.items()})
        opt.state[p].update({key: value.clone() for key, value in zip(names, values)})
        opt.step()
        return (p, *[opt.state[p][key] for key in names])

    inputs = (_float64(gen, 6), _float64(gen, 6), *[state[key] for key in names])
    assert torch.autograd.gradcheck(one_step, inputs)

    def two_steps(start, lr, weight_decay, *betas):
        p = start.clone()
        extra = {"betas": tuple(betas)} if betas else {}
        opt = cls([p], lr=lr, weight_decay=weight_decay, differentiable=True, **extra)
        weights = torch.linspace(0.5, 1.5, p.numel(), dtype=p.dtype)
        for target in (1.0, 2.0):
            loss = ((p * weights).sum() - target) ** 2
            (p.grad,) = torch.autograd.grad(loss, p, create_graph=True)
            opt.step()
        return ((p * weights).sum() - 3.0) ** 2

    hypers = [torch.tensor(value, dtype=torch.float64, requires_grad=True) for value in (0.01, 0.3)]
    if cls_name != "SGD":
        hypers += [torch.tensor(b, dtype=torch.float64, requires_grad=True) for b in (0.9, 0.99)]
    assert torch.autograd.gradcheck(two_steps, (_float64(gen, 6), *hypers))


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize(
    "extra", [{"backend": "cpu"}, {"master_weights": True}, {"state_dtype": torch.bfloat16}]
)
def test_differentiable_with_fused_only_options_raises_value_error(cls_name, extra):
    with pytest.raises(ValueError, match=r"differentiable=True runs torch\.optim"):
        getattr(fused_optim, cls_name)(_two_params(), differentiable=True, **extra)


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("backend", ["nope", "Triton", "", "rocm"])
def test_invalid_backend_raises_value_error(cls_name, backend):
    with pytest.raises(ValueError, match="Invalid backend") as info:
        getattr(fused_optim, cls_name)(_two_params(), backend=backend)
    assert repr(backend) in str(info.value)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_reference_backend_is_accepted_and_steps(cls_name):
    torch.manual_seed(1)
    params = _two_params()
    reference = [p.detach().clone().requires_grad_() for p in params]
    opt = getattr(fused_optim, cls_name)(params, lr=0.1, backend="reference")
    ref_opt = getattr(torch.optim, cls_name)(reference, lr=0.1, foreach=False)
    assert opt.backend == "reference"
    assert opt.group_backends() == ["reference"]
    initial = [p.detach().clone() for p in params]
    for _ in range(2):
        for p, r in zip(params, reference):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, r, p0 in zip(params, reference, initial):
        torch.testing.assert_close(p, r)
        assert not torch.equal(p, p0)


# --------------------------------------------------------------------------------------------
# step(): sparse gradients


def _snapshot(opt, params):
    """Deep copies of the given params and of the whole optimizer state."""
    return [p.detach().clone() for p in params], copy.deepcopy(dict(opt.state)), len(opt.state)


def _assert_tree_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
        assert a.layout == b.layout
        if a.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_tree_equal(a[key], b[key])
    else:
        assert a == b


def _assert_unchanged(opt, params, snapshot):
    before_params, before_state, before_len = snapshot
    assert len(opt.state) == before_len
    for p, b in zip(params, before_params):
        assert torch.equal(p, b)
    # Deep-copied state keys are copies of the params; compare in the original order.
    now = copy.deepcopy(dict(opt.state))
    assert len(now) == len(before_state)
    for (_, a), (_, b) in zip(now.items(), before_state.items()):
        _assert_tree_equal(a, b)


def _sparse_embedding_grad(emb: nn.Embedding, indices=(1, 2, 2, 5)):
    emb.zero_grad(set_to_none=True)
    emb(torch.tensor(indices)).pow(2).sum().backward()
    assert emb.weight.grad.is_sparse


@pytest.mark.parametrize("cls_name", ADAMS)
def test_adam_sparse_grad_matches_torch_error(cls_name):
    torch.manual_seed(0)
    emb_t = nn.Embedding(6, 3, sparse=True)
    emb_f = copy.deepcopy(emb_t)
    _sparse_embedding_grad(emb_t)
    _sparse_embedding_grad(emb_f)
    torch_error = _raised(getattr(torch.optim, cls_name)(emb_t.parameters(), foreach=False).step)
    opt = getattr(fused_optim, cls_name)(emb_f.parameters())
    before = emb_f.weight.detach().clone()
    fused_error = _raised(opt.step)
    _assert_same_error(fused_error, torch_error)
    assert torch.equal(emb_f.weight, before)
    assert len(opt.state) == 0


@pytest.mark.parametrize("cls_name", ADAMS)
@pytest.mark.parametrize("backend", [None, "triton", "reference"])
def test_adam_sparse_grad_in_second_group_touches_nothing(cls_name, backend):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    emb = nn.Embedding(6, 3, sparse=True)
    opt = getattr(fused_optim, cls_name)(
        [{"params": lin.parameters()}, {"params": emb.parameters(), "lr": 0.05}],
        lr=0.1,
        amsgrad=True,
        backend=backend,
    )
    x = torch.randn(4, 3)
    # Two good steps: group 0 has state (step == 2), group 1 has no grad yet.
    for _ in range(2):
        opt.zero_grad()
        lin(x).pow(2).sum().backward()
        opt.step()
    opt.zero_grad()
    lin(emb(torch.tensor([1, 2, 4, 5]))).pow(2).sum().backward()
    assert emb.weight.grad.is_sparse
    params = [*lin.parameters(), emb.weight]
    snapshot = _snapshot(opt, params)

    torch_error = _raised(getattr(torch.optim, cls_name)([emb.weight], foreach=False).step)
    error = _raised(opt.step)

    _assert_same_error(error, torch_error)
    _assert_unchanged(opt, params, snapshot)
    assert all(float(opt.state[p]["step"]) == 2 for p in lin.parameters())


SPARSE_SGD_CASES = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.2},
    {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    {"lr": 0.1, "momentum": 0.5, "maximize": True},
]


@pytest.mark.parametrize("kwargs", SPARSE_SGD_CASES, ids=lambda kw: "-".join(map(str, kw)))
def test_sgd_sparse_grad_matches_torch(kwargs):
    torch.manual_seed(0)
    emb_t = nn.Embedding(8, 3, sparse=True)
    emb_f = copy.deepcopy(emb_t)
    initial = emb_f.weight.detach().clone()
    opt_t = torch.optim.SGD(emb_t.parameters(), foreach=False, **kwargs)
    opt_f = fused_optim.SGD(emb_f.parameters(), **kwargs)
    for indices in [(1, 2, 2, 5), (0, 2, 7), (5, 5, 1)]:
        _sparse_embedding_grad(emb_t, indices)
        _sparse_embedding_grad(emb_f, indices)
        assert opt_f.group_backends() == ["reference"]
        opt_t.step()
        opt_f.step()
        torch.testing.assert_close(emb_f.weight, emb_t.weight)
    assert not torch.equal(emb_f.weight, initial)
    if kwargs.get("momentum", 0):
        torch.testing.assert_close(
            opt_f.state[emb_f.weight]["momentum_buffer"].to_dense(),
            opt_t.state[emb_t.weight]["momentum_buffer"].to_dense(),
        )


def test_sgd_triton_backend_rejects_sparse_grad_before_touching_anything():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    emb = nn.Embedding(6, 3, sparse=True)
    opt = fused_optim.SGD(
        [{"params": lin.parameters()}, {"params": emb.parameters()}],
        lr=0.1,
        momentum=0.9,
        backend="triton",
    )
    x = torch.randn(4, 3)
    for _ in range(2):
        opt.zero_grad()
        lin(x).pow(2).sum().backward()
        opt.step()
    opt.zero_grad()
    lin(emb(torch.tensor([1, 2, 4]))).pow(2).sum().backward()
    params = [*lin.parameters(), emb.weight]
    snapshot = _snapshot(opt, params)

    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


def test_sgd_sparse_grad_with_weight_decay_matches_torch_error():
    torch.manual_seed(0)
    emb_t = nn.Embedding(6, 3, sparse=True)
    emb_f = copy.deepcopy(emb_t)
    _sparse_embedding_grad(emb_t)
    _sparse_embedding_grad(emb_f)
    torch_error = _raised(
        torch.optim.SGD(emb_t.parameters(), lr=0.1, weight_decay=0.1, foreach=False).step
    )
    opt = fused_optim.SGD(emb_f.parameters(), lr=0.1, weight_decay=0.1)
    before = emb_f.weight.detach().clone()
    _assert_same_error(_raised(opt.step), torch_error)
    assert torch.equal(emb_f.weight, before)


def test_sgd_sparse_weight_decay_error_in_second_group_touches_nothing():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    emb = nn.Embedding(6, 3, sparse=True)
    opt = fused_optim.SGD(
        [{"params": lin.parameters()}, {"params": emb.parameters(), "weight_decay": 0.1}],
        lr=0.1,
        momentum=0.9,
    )
    x = torch.randn(4, 3)
    opt.zero_grad()
    lin(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    lin(emb(torch.tensor([1, 2, 4]))).pow(2).sum().backward()
    params = [*lin.parameters(), emb.weight]
    snapshot = _snapshot(opt, params)

    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


@pytest.mark.parametrize("cls_name", ADAMS)
def test_tensor_lr_foreach_group_added_later_raises_before_touching_anything(cls_name):
    def build(module):
        torch.manual_seed(0)
        a, b = _leaf(4), _leaf(3)
        opt = getattr(module, cls_name)([a], lr=0.1)
        opt.add_param_group({"params": [b], "lr": torch.tensor(0.1), "foreach": True})
        return opt, [a, b]

    torch_opt, torch_params = build(torch.optim)
    for p in torch_params:
        p.grad = torch.ones_like(p)
    torch_error = _raised(torch_opt.step)

    opt, params = build(fused_optim)
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    error = _raised(opt.step)
    _assert_same_error(error, torch_error)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert len(opt.state) == 0


# --------------------------------------------------------------------------------------------
# load_state_dict()


def _trained(module, cls_name, seed=0):
    torch.manual_seed(seed)
    lin1, lin2 = nn.Linear(3, 4), nn.Linear(4, 2)
    kwargs = {"momentum": 0.9} if cls_name == "SGD" else {"amsgrad": True}
    opt = getattr(module, cls_name)(
        [{"params": lin1.parameters()}, {"params": lin2.parameters(), "lr": 0.05}],
        lr=0.1,
        **kwargs,
    )
    x = torch.randn(5, 3)
    for _ in range(2):
        opt.zero_grad()
        lin2(lin1(x)).pow(2).sum().backward()
        opt.step()
    return opt, [*lin1.parameters(), *lin2.parameters()]


def _drop_group(sd):
    sd = copy.deepcopy(sd)
    sd["param_groups"] = sd["param_groups"][:1]
    return sd


def _extra_group(sd):
    sd = copy.deepcopy(sd)
    sd["param_groups"].append(dict(sd["param_groups"][1], params=[99]))
    return sd


def _short_group(sd):
    sd = copy.deepcopy(sd)
    sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:1]
    return sd


def _long_group(sd):
    sd = copy.deepcopy(sd)
    sd["param_groups"][0]["params"] = [*sd["param_groups"][0]["params"], 99]
    return sd


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("corrupt", [_drop_group, _extra_group, _short_group, _long_group])
def test_load_state_dict_errors_match_torch_and_change_nothing(cls_name, corrupt):
    torch_opt, _ = _trained(torch.optim, cls_name)
    bad_torch = corrupt(torch_opt.state_dict())
    torch_error = _raised(lambda: torch_opt.load_state_dict(bad_torch))

    opt, params = _trained(fused_optim, cls_name)
    bad = corrupt(opt.state_dict())
    snapshot = _snapshot(opt, params)
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )
    backend_before = opt.backend

    error = _raised(lambda: opt.load_state_dict(bad))

    _assert_same_error(error, torch_error)
    _assert_unchanged(opt, params, snapshot)
    assert [
        {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
    ] == groups_before
    assert [p for g in opt.param_groups for p in g["params"]] == params
    assert opt.backend == backend_before


# --------------------------------------------------------------------------------------------
# step(): fused=True applies torch's fused-path validation


# torch's fused SGD validates only the first param with a grad (a later meta param reaches its
# kernel, which raises NotImplementedError); its Adam and AdamW validate every new param.
FUSED_VALIDATION_CASES = [
    (cls_name, kind)
    for cls_name in CLASSES
    for kind in ("meta", "complex", *(("float64-then-meta",) if cls_name != "SGD" else ()))
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cls_name,kind", FUSED_VALIDATION_CASES)
def test_fused_true_rejects_what_torch_fused_rejects(cls_name, kind, backend):
    """``fused=True`` with a param on the meta device or a complex param: torch.optim's
    RuntimeError and message, at the first step, raised before any param, state or step count
    changes (also when a valid param comes first)."""

    def params():
        bad = (torch.randn(3, dtype=torch.complex64) if kind == "complex"
               else torch.empty(3, device="meta"))  # fmt: skip
        first = [torch.randn(4, dtype=torch.float64)] if kind.startswith("float64") else []
        out = [t.requires_grad_() for t in [*first, bad]]
        for p in out:
            p.grad = torch.ones_like(p)
        return out

    kwargs = {"momentum": 0.9} if cls_name == "SGD" else {}
    torch_error = _raised(
        lambda: getattr(torch.optim, cls_name)(params(), fused=True, **kwargs).step()
    )
    fused_params = params()
    opt = getattr(fused_optim, cls_name)(fused_params, fused=True, backend=backend, **kwargs)
    snapshot = _snapshot(opt, [p for p in fused_params if p.device.type != "meta"])
    _assert_same_error(_raised(opt.step), torch_error)
    _assert_unchanged(opt, [p for p in fused_params if p.device.type != "meta"], snapshot)


def _errors_after(cls_name, backend, corrupt, first_step=False):
    """(torch.optim's error, fused_optim's error, (fused_optim's optimizer, params, what they
    held just before its failing step)) for the same ``corrupt(opt, params)``, applied after
    one step (or before the first)."""
    errors, runs = [], []
    for module, kwargs in ((torch.optim, {"foreach": False}), (fused_optim, {"backend": backend})):
        params = _two_params()
        extra = {"momentum": 0.9} if cls_name == "SGD" else {}
        opt = getattr(module, cls_name)(params, lr=0.1, **extra, **kwargs)
        for p in params:
            p.grad = torch.ones_like(p)
        if not first_step:
            opt.step()
        corrupt(opt, params)
        # The state dicts' values only: deepcopy cannot copy params whose grad changed dtype.
        before = [p.detach().clone() for p in params], copy.deepcopy(list(opt.state.values()))
        errors.append(_raised(opt.step))
        runs.append((opt, params, before))
    return errors[0], errors[1], runs[1]


def _assert_untouched(opt, params, before) -> None:
    params_before, states_before = before
    for p, b in zip(params, params_before):
        assert p.dtype == b.dtype and torch.equal(p, b)
    states = list(opt.state.values())
    assert len(states) == len(states_before)
    for a, b in zip(states, states_before):
        _assert_tree_equal(a, b)


def _drop_state(key):
    def corrupt(opt, params):
        del opt.state[params[0]][key]

    return corrupt


def _set_group(key, value):
    def corrupt(opt, params):
        opt.param_groups[0][key] = value

    return corrupt


def _drop_group_key(key):
    def corrupt(opt, params):
        del opt.param_groups[0][key]

    return corrupt


def _grad_data(shape):
    def corrupt(opt, params):
        params[0].grad.data = torch.ones(shape)

    return corrupt


def _state_data(key, shape):
    def corrupt(opt, params):
        opt.state[params[0]][key].data = torch.zeros(shape)

    return corrupt


STEP_CORRUPTIONS = [
    ("Adam", "exp_avg missing", _drop_state("exp_avg")),
    ("Adam", "exp_avg_sq missing", _drop_state("exp_avg_sq")),
    ("AdamW", "step missing", _drop_state("step")),
    ("Adam", "beta1 set to 1", _set_group("betas", (1.0, 0.999))),
    ("AdamW", "beta1 set to -1", _set_group("betas", (-1.0, 0.999))),
    ("Adam", "lr a string", _set_group("lr", "0.1")),
    ("SGD", "lr a string", _set_group("lr", "0.1")),
    ("Adam", "lr a 2-element tensor", _set_group("lr", torch.tensor([0.1, 0.2]))),
    ("Adam", "amsgrad switched on mid-run", _set_group("amsgrad", True)),
    ("AdamW", "amsgrad switched on mid-run", _set_group("amsgrad", True)),
    ("Adam", "betas missing from the group", _drop_group_key("betas")),
    ("SGD", "momentum missing from the group", _drop_group_key("momentum")),
    ("AdamW", "weight_decay missing from the group", _drop_group_key("weight_decay")),
    ("SGD", "lr a 2-element tensor", _set_group("lr", torch.tensor([0.1, 0.2]))),
    # params[0] is (3, 2): shapes that do not broadcast to it, set through .data.
    ("Adam", "grad of a shape that does not broadcast", _grad_data((5, 2))),
    ("SGD", "grad of a shape that does not broadcast", _grad_data((3, 5))),
    ("AdamW", "grad of the same numel, another shape", _grad_data((6,))),
    ("SGD", "grad of the same numel, another shape", _grad_data((2, 3))),
    ("Adam", "exp_avg_sq of another shape", _state_data("exp_avg_sq", (4, 2))),
    ("AdamW", "exp_avg of the same numel, another shape", _state_data("exp_avg", (6,))),
    ("SGD", "momentum buffer of another shape", _state_data("momentum_buffer", (3, 3))),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize(
    "cls_name,what,corrupt", STEP_CORRUPTIONS, ids=[f"{c}-{w}" for c, w, _ in STEP_CORRUPTIONS]
)
def test_step_errors_match_torch_and_change_nothing(cls_name, what, corrupt, backend):
    """State or values a later step cannot use (a state entry deleted, amsgrad switched on
    after steps without it, beta1 set to +-1 after construction, an lr that is not a number):
    torch.optim's exception type and message, raised before any param, state or step count
    changes."""
    torch_error, fused_error, fused_run = _errors_after(cls_name, backend, corrupt)
    _assert_same_error(fused_error, torch_error)
    _assert_untouched(*fused_run)


def _grad_float64(opt, params):
    params[0].grad.data = params[0].grad.data.double()


def _param_data_float64(opt, params):
    params[1].data = params[1].data.double()
    params[1].grad.data = params[1].grad.data.double()


def _param_int64(opt, params):
    # An integer tensor cannot require grad: torch.optim takes it as a plain tensor.
    params[1].requires_grad_(False)
    params[1].data = params[1].data.long()
    params[1].grad = torch.ones_like(params[1])


# (corruption, whether the optimizer stepped before it). p.data and its grad made fp64 before
# the first step is no error: the states are then created in fp64.
DTYPE_CORRUPTIONS = [
    pytest.param(_grad_float64, False, id="fp64-grad-with-state"),
    pytest.param(_grad_float64, True, id="fp64-grad-first-step"),
    pytest.param(_param_data_float64, False, id="fp64-data-with-state"),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("first_step", [True, False], ids=["first-step", "with-state"])
def test_integer_param_raises_torchs_error(cls_name, first_step, backend):
    """A param (and its grad) of an integer dtype: torch.optim raises in its update (SGD:
    alpha must not be a floating point number; Adam: lerp not implemented for Long, or a cast
    error); fused_optim raises the same before any param, state or step count changes."""
    torch_error, fused_error, fused_run = _errors_after(cls_name, backend, _param_int64, first_step)
    _assert_same_error(fused_error, torch_error)
    _assert_untouched(*fused_run)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cls_name", CLASSES)
def test_checkpoint_state_of_another_shape_raises_torchs_error(cls_name, backend):
    """A checkpoint whose state tensor does not broadcast to its param (the wrong model's
    checkpoint): torch.optim's load accepts it and its step raises; fused_optim's step raises
    the same, changing nothing."""

    def corrupt(opt, params):
        saved = opt.state_dict()
        key = "momentum_buffer" if cls_name == "SGD" else "exp_avg"
        saved["state"][0][key] = torch.zeros(4, 4)
        opt.load_state_dict(saved)

    torch_error, fused_error, fused_run = _errors_after(cls_name, backend, corrupt)
    _assert_same_error(fused_error, torch_error)
    _assert_untouched(*fused_run)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("corrupt,first_step", DTYPE_CORRUPTIONS)
def test_grad_of_another_dtype_raises_torchs_error(cls_name, corrupt, first_step, backend):
    """An fp64 grad for an fp32 param (or p.data and its grad replaced by fp64 ones): torch.optim
    fails in its first update op (exp_avg.lerp_(grad, ...)); fused_optim raises the same error
    before anything changes, also on the first step."""
    torch_error, fused_error, fused_run = _errors_after(cls_name, backend, corrupt, first_step)
    _assert_same_error(fused_error, torch_error)
    _assert_untouched(*fused_run)


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
def test_checkpoint_without_step_raises_torchs_key_error(cls_name):
    """A checkpoint whose state lacks ``step``: torch.optim's load_state_dict raises
    KeyError('step'); so does fused_optim's (the count is not restarted on top of the loaded
    moments)."""
    errors = []
    for module in (torch.optim, fused_optim):
        params = _two_params()
        opt = getattr(module, cls_name)(params, lr=0.1)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        saved = copy.deepcopy(opt.state_dict())
        del saved["state"][0]["step"]
        fresh = getattr(module, cls_name)(_two_params(), lr=0.1)
        errors.append(_raised(lambda fresh=fresh, saved=saved: fresh.load_state_dict(saved)))
    _assert_same_error(errors[1], errors[0])


AFTER_CONSTRUCTION = [
    ("Adam", "eps", -1e-3),
    ("Adam", "eps", 0.0),
    ("Adam", "betas", (0.9, 1.0)),
    ("Adam", "betas", (0.9, 1.5)),
    ("AdamW", "betas", (0.9, -1.5)),
    ("Adam", "betas", (1.5, 0.999)),
    ("AdamW", "betas", (-0.7, 0.999)),
    ("AdamW", "weight_decay", -0.5),
    ("Adam", "lr", -0.1),
    ("Adam", "lr", 0),
    ("SGD", "momentum", -0.5),
    ("SGD", "dampening", 2.0),
    ("SGD", "weight_decay", -0.1),
    ("SGD", "nesterov", True),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize(
    "cls_name,key,value", AFTER_CONSTRUCTION, ids=[f"{c}-{k}={v}" for c, k, v in AFTER_CONSTRUCTION]
)
def test_values_torch_rejects_only_at_construction_behave_as_in_torch(
    cls_name, key, value, backend
):
    """Values torch.optim's constructor rejects, set in a group afterwards: torch.optim's step
    computes with them (a negative eps or weight decay, beta1 above 1: its lerp weight below
    -0.5 takes ATen's other formula) or raises (beta2 above 1: its bias correction's square root
    is complex, and its update cannot write it into a real param). fused_optim gives the same
    bits, NaN and inf included (torch.optim's fp32 sqrt rounded correctly, as on every CPU), or
    the same error with nothing changed."""
    outcomes = []
    for module in (torch.optim, fused_optim):
        gen = torch.Generator().manual_seed(1)
        p = torch.randn(50, generator=gen).requires_grad_()
        extra = {"momentum": 0.9} if cls_name == "SGD" else {}
        if module is torch.optim:
            cls = fused_optim.testing.correctly_rounded_optimizer(getattr(torch.optim, cls_name))
            opt = cls([p], lr=0.1, foreach=False, **extra)
        else:
            opt = getattr(fused_optim, cls_name)([p], lr=0.1, backend=backend, **extra)
        for step in range(3):
            p.grad = torch.randn(50, generator=gen)
            if step == 1:
                opt.param_groups[0][key] = value
            before = p.detach().clone(), copy.deepcopy(list(opt.state.values()))
            try:
                opt.step()
            except Exception as error:  # compared below
                outcomes.append((error, opt, [p], before))
                break
        else:
            outcomes.append((None, opt, [p], None))
    (torch_error, _, torch_params, _), (fused_error, opt, params, before) = outcomes
    if torch_error is not None:
        _assert_same_error(fused_error, torch_error)
        _assert_untouched(opt, params, ([before[0]], before[1]))
    else:
        assert fused_error is None, fused_error
        torch.testing.assert_close(params[0], torch_params[0], rtol=0, atol=0, equal_nan=True)
