"""The step engine: one backend call (one launch) per bucket whatever the number of param groups,
per-group hyperparameters as data, plans owned by the optimizer, one typed backend contract.

Oracle: torch.optim's for-loop run with correctly rounded arithmetic (``testing``), bitwise for
fp32, on fresh random data; every param must move.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import fused_optim
from fused_optim.backends import contract
from fused_optim.backends import plan as plans
from fused_optim.testing import correctly_rounded_optimizer

BACKENDS = [b for b in ("triton", "cpu", "reference") if b in fused_optim.available_backends("cpu")]
NAMES = ["SGD", "Adam", "AdamW"]

# Every test runs with the fast path's checks of the C++ extension and with their Python twin.
pytestmark = pytest.mark.usefixtures("host_checks")


def group_config(name: str, index: int) -> dict:
    """Hyperparameters that differ from group to group (as layer-wise lr decay makes them)."""
    if name == "SGD":
        return dict(lr=0.1 * 0.8**index, momentum=0.5 + 0.04 * index, dampening=0.01 * index,
                    weight_decay=0.01 * (index % 3))  # fmt: skip
    return dict(lr=0.01 * 0.8**index, betas=(0.9 - 0.01 * index, 0.999 - 0.001 * index),
                eps=10.0 ** -(6 + index % 3), weight_decay=0.02 * (index % 3))  # fmt: skip


def make_pair(name, backend, num_groups, per_group=2, seed=0, common=None):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 5), (0,), (33,)]
    ours, theirs = [], []
    for g in range(num_groups):
        for k in range(per_group):
            t = torch.randn(shapes[(g + k) % len(shapes)], generator=gen)
            ours.append(torch.nn.Parameter(t.clone()))
            theirs.append(torch.nn.Parameter(t.clone()))

    def groups(params):
        return [
            {"params": params[g * per_group : (g + 1) * per_group], **group_config(name, g)}
            for g in range(num_groups)
        ]

    common = common or {}
    opt = getattr(fused_optim, name)(groups(ours), backend=backend, **common)
    exact = correctly_rounded_optimizer(getattr(torch.optim, name))
    ref = exact(groups(theirs), foreach=False, **common)
    return opt, ref, ours, theirs, gen


def set_grads(ours, theirs, gen):
    for p, q in zip(ours, theirs):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()


def assert_same(opt, ref, ours, theirs):
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key].cpu(), value.cpu()), key


class CountingKernel:
    """Stands in for a Triton kernel and counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_many_groups_one_launch_bitwise_torch(name, backend, monkeypatch):
    opt, ref, ours, theirs, gen = make_pair(name, backend, num_groups=28, per_group=1)
    counter = None
    if backend == "triton":
        from fused_optim.backends.triton import kernels

        attribute = "sgd_kernel" if name == "SGD" else "adam_kernel"
        counter = CountingKernel(getattr(kernels, attribute))
        monkeypatch.setattr(kernels, attribute, counter)
    initial = [p.detach().clone() for p in ours]
    for step in range(4):
        set_grads(ours, theirs, gen)
        opt.step()
        ref.step()
        assert opt.launches_per_step() == 1, "28 groups of one flag set must be ONE launch"
        assert counter is None or counter.launches == step + 1
        assert_same(opt, ref, ours, theirs)
    assert all(not torch.equal(p, i) for p, i in zip(ours, initial) if p.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_group_per_param_for_200_params_is_one_launch(backend):
    opt, ref, ours, theirs, gen = make_pair("AdamW", backend, num_groups=200, per_group=1)
    set_grads(ours, theirs, gen)
    opt.step()
    ref.step()
    assert opt.launches_per_step() == 1
    assert_same(opt, ref, ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_changing_every_step_keep_the_plan(name, backend):
    """A scheduler (or a hand-written group["lr"]) changes values, not code: the step plan and
    the launch plans below it stay, and the results follow torch.optim bit for bit."""
    opt, ref, ours, theirs, gen = make_pair(name, backend, num_groups=3)
    set_grads(ours, theirs, gen)
    opt.step()
    ref.step()
    step_plan = opt._plan
    launch_plans = [bucket.work.plan for bucket in step_plan.buckets]
    for step in range(3):
        for optimizer in (opt, ref):
            for g, group in enumerate(optimizer.param_groups):
                group["lr"] *= 0.5 + 0.1 * g
                group["weight_decay"] = 0.05 * ((step + g) % 2)
                if name == "SGD":
                    group["momentum"] = 0.9 - 0.1 * step
                else:
                    group["betas"] = (0.8 + 0.05 * step, 0.99 - 0.001 * g)
        set_grads(ours, theirs, gen)
        opt.step()
        ref.step()
        assert_same(opt, ref, ours, theirs)
    assert opt._plan is step_plan
    assert [bucket.work.plan for bucket in step_plan.buckets] == launch_plans


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_code_flags_split_launches(backend):
    gen = torch.Generator().manual_seed(1)
    ours = [torch.nn.Parameter(torch.randn(9, generator=gen)) for _ in range(6)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def groups(params):
        return [
            {"params": params[0:2], "nesterov": True, "momentum": 0.9},
            {"params": params[2:4], "lr": 0.3, "momentum": 0.8},
            {"params": params[4:6], "momentum": 0.7, "dampening": 0.2, "weight_decay": 0.1},
        ]

    opt = fused_optim.SGD(groups(ours), lr=0.1, backend=backend)
    ref = correctly_rounded_optimizer(torch.optim.SGD)(groups(theirs), lr=0.1, foreach=False)
    for _ in range(3):
        set_grads(ours, theirs, gen)
        opt.step()
        ref.step()
        assert_same(opt, ref, ours, theirs)
    assert opt.launches_per_step() == 2  # nesterov changes the code; lr, momentum... do not


def test_groups_at_different_steps_keep_torch_bias_corrections():
    """A group added later runs at other step counts than the first: each group's bias
    corrections are computed at its own base step, as torch.optim computes them."""
    for backend in BACKENDS:
        opt, ref, ours, theirs, gen = make_pair("Adam", backend, num_groups=1, seed=3)
        for _ in range(3):
            set_grads(ours, theirs, gen)
            opt.step()
            ref.step()
        extra = torch.randn(5, generator=gen)
        p, q = torch.nn.Parameter(extra.clone()), torch.nn.Parameter(extra.clone())
        opt.add_param_group({"params": [p], "lr": 0.02})
        ref.add_param_group({"params": [q], "lr": 0.02})
        ours, theirs = [*ours, p], [*theirs, q]
        for _ in range(2):
            set_grads(ours, theirs, gen)
            opt.step()
            ref.step()
            assert_same(opt, ref, ours, theirs)
        assert opt.launches_per_step() == 1


@pytest.mark.parametrize("name", ["triton", "cpu", "reference", "cuda"])
def test_every_backend_implements_the_contract(name):
    import importlib

    module = importlib.import_module(f"fused_optim.backends.{name}")
    assert isinstance(module.NAME, str) and module.NAME == name
    assert isinstance(module.SUPPORTS_SPARSE, bool)
    assert callable(module.is_available)
    for entry in ("sgd", "adam"):
        parameters = list(inspect.signature(getattr(module, entry)).parameters)
        assert parameters == ["work", "hypers", "flags", "context"], (name, entry, parameters)


def test_contract_types_are_frozen():
    hyper = contract.AdamHyper(0.1, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(AttributeError):
        hyper.lr = 0.2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        contract.SgdFlags(True, False, False).momentum = False  # type: ignore[misc]


def test_plans_are_owned_by_the_optimizer():
    """No module-level plan cache: dropping the optimizer drops its plans."""
    import gc
    import weakref

    params = [torch.nn.Parameter(torch.randn(10)) for _ in range(3)]
    opt = fused_optim.AdamW(params, backend=BACKENDS[0])
    for p in params:
        p.grad = torch.randn(10)
    opt.step()
    watched = weakref.ref(opt._plan)
    del opt
    gc.collect()
    assert watched() is None


def test_table_layout_is_defined_once():
    assert plans.TABLE_COLUMNS == plans.COL_GROUP + 1
    assert plans.HYPER_COLUMNS == plans.HYPER_LR_ADDRESS + 1
    columns = [value for key, value in plans.LAYOUT.items() if key.startswith("COL_")]
    assert sorted(columns) == list(range(plans.TABLE_COLUMNS))


def _edit_state_by_hand(opt, ref, ours, theirs, gen, at=1):
    # A state tensor replaced (as offloading code does): the new one is the one updated.
    for optimizer, params in ((opt, ours), (ref, theirs)):
        state = optimizer.state[params[at]]
        state["exp_avg"] = state["exp_avg"].clone()


def _clear_state(opt, ref, ours, theirs, gen, at=None):
    opt.state.clear()
    ref.state.clear()


def _drop_a_grad(opt, ref, ours, theirs, gen, at=2):
    ours[at].grad = None
    theirs[at].grad = None


def _move_a_param(opt, ref, ours, theirs, gen, at=0):
    value = torch.randn(ours[at].shape, generator=gen)
    ours[at].data = value.clone()
    theirs[at].data = value.clone()


def _add_a_param(opt, ref, ours, theirs, gen, at=None):
    value = torch.randn(6, generator=gen)
    p, q = torch.nn.Parameter(value.clone()), torch.nn.Parameter(value.clone())
    opt.param_groups[0]["params"].append(p)
    ref.param_groups[0]["params"].append(q)
    ours.append(p)
    theirs.append(q)


def _swap_state_memory(opt, ref, ours, theirs, gen, at=5):
    # The same state tensor objects, new memory (``.data``): only their addresses tell.
    for optimizer, params in ((opt, ours), (ref, theirs)):
        state = optimizer.state[params[at]]
        state["exp_avg_sq"].data = state["exp_avg_sq"].clone() * 2
        state["step"].data = state["step"].clone() + 5


def _replace_a_step(opt, ref, ours, theirs, gen, at=0):
    for optimizer, params in ((opt, ours), (ref, theirs)):
        optimizer.state[params[at]]["step"] = torch.tensor(40.0)


def _toggle_maximize(opt, ref, ours, theirs, gen, at=None):
    opt.param_groups[1]["maximize"] = True
    ref.param_groups[1]["maximize"] = True


EDITS = [_edit_state_by_hand, _clear_state, _drop_a_grad, _move_a_param, _add_a_param,
         _swap_state_memory, _replace_a_step, _toggle_maximize]  # fmt: skip


#: Edits of one param's tensors: run again on the last param of a plan large enough for the
#: extension's checks to split over threads (the second thread's share).
ONE_PARAM_EDITS = [_edit_state_by_hand, _drop_a_grad, _move_a_param, _swap_state_memory,
                   _replace_a_step]  # fmt: skip


def _steps_after_an_edit(backend, edit, per_group, at):
    opt, ref, ours, theirs, gen = make_pair("Adam", backend, num_groups=2, per_group=per_group,
                                            seed=5)  # fmt: skip
    for _ in range(3):
        set_grads(ours, theirs, gen)
        opt.step()
        ref.step()
    edit(opt, ref, ours, theirs, gen, **({} if at is None else {"at": at}))
    for _ in range(2):
        for p, q in zip(ours, theirs):
            if p.grad is not None:
                g = torch.randn(p.shape, generator=gen)
                p.grad, q.grad = g.clone(), g.clone()
        if edit is _add_a_param:
            ours[-1].grad = torch.randn(6, generator=gen)
            theirs[-1].grad = ours[-1].grad.clone()
        opt.step()
        ref.step()
        assert_same(opt, ref, ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__.strip("_"))
def test_every_change_between_steps_is_seen(backend, edit):
    """Whatever changes between two steps (through the compiled fast path where the extension
    is built), the result is torch.optim's, bit for bit."""
    _steps_after_an_edit(backend, edit, per_group=3, at=None)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ CPU backend is not built")
@pytest.mark.parametrize("edit", ONE_PARAM_EDITS, ids=lambda f: f.__name__.strip("_"))
def test_a_change_to_the_last_of_many_params_is_seen(edit):
    """600 params: the extension's host plan checks them on several threads (from 256 on); an
    edit of the last param, in the last thread's share, is seen as one of the first is."""
    _steps_after_an_edit("cpu", edit, per_group=300, at=-1)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
@pytest.mark.parametrize("edit", ONE_PARAM_EDITS, ids=lambda f: f.__name__.strip("_"))
def test_the_grad_table_sees_a_change_to_the_last_of_many_params(edit, monkeypatch):
    """The table-walking backends' per-step check (``GradTable`` in the extension, split over
    threads from 256 params on), on 600 params with the kernel launch elided (what is tested
    is the check, not the kernel): an edit of the last param makes the fast path decline."""
    from fused_optim.backends.triton import kernels

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kernels, "adam_kernel", NoLaunch())
    opt, ref, ours, theirs, gen = make_pair("Adam", "triton", num_groups=2, per_group=300)
    for _ in range(2):
        set_grads(ours, theirs, gen)
        opt.step()
        ref.step()  # the edits change both
    fast = opt._plan.fast
    assert fast is not None and all(step.check() for step in fast.steps)
    edit(opt, ref, ours, theirs, gen, at=-1)
    assert not fast.holds(opt.param_groups, opt.state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_grads_of_any_layout_every_step(backend):
    """Grads are new tensors every step (zero_grad's default), sometimes transposed views."""
    gen = torch.Generator().manual_seed(9)
    ours = [torch.nn.Parameter(torch.randn(4, 6, generator=gen)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fused_optim.AdamW(ours, lr=0.1, backend=backend)
    ref = correctly_rounded_optimizer(torch.optim.AdamW)(theirs, lr=0.1, foreach=False)
    for step in range(5):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            g = torch.randn(6, 4, generator=gen).t() if (step + i) % 2 else torch.randn(4, 6)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert_same(opt, ref, ours, theirs)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in BACKENDS])
def test_the_compiled_fast_path_is_taken(backend):
    """Later steps run through the fast path (checks in the extension, or in Python without
    it): the plan's host steps check and run, and the results stay torch.optim's bit for
    bit."""
    opt, ref, ours, theirs, gen = make_pair("AdamW", backend, num_groups=3)
    for _ in range(3):
        set_grads(ours, theirs, gen)
        opt.step()
        ref.step()
    fast = opt._plan.fast
    assert fast is not None
    calls = []
    fast.steps[0] = _Spy(fast.steps[0], calls)
    for _ in range(2):
        set_grads(ours, theirs, gen)
        opt.step()
        ref.step()
        assert_same(opt, ref, ours, theirs)
    assert calls == ["check", "run"] * 2


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
def test_the_fast_path_tracks_whether_the_grads_are_aligned():
    """The kernels' 16-byte vector path needs aligned grads: a fast-path step whose grads sit
    4 bytes off (views of a larger buffer, dense and in the param's layout, so not staged)
    turns it off, and aligned grads turn it on again; the numbers stay torch.optim's."""
    gen = torch.Generator().manual_seed(3)
    ours = [torch.nn.Parameter(torch.randn(64, generator=gen)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fused_optim.AdamW(ours, lr=0.1, backend="triton")
    ref = correctly_rounded_optimizer(torch.optim.AdamW)(theirs, lr=0.1, foreach=False)
    calls = []
    for step in range(7):
        off = step >= 2 and step % 2 == 1
        for p, q in zip(ours, theirs):
            buffer = torch.randn(65, generator=gen)
            p.grad = buffer[1:] if off else buffer[:64].clone()
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        assert_same(opt, ref, ours, theirs)
        fast = opt._plan.fast
        if step == 2:
            assert fast is not None
            fast.steps[0] = _Spy(fast.steps[0], calls)
        if step >= 2:
            assert fast.steps[0].step.plan.aligned is not off
    assert calls == ["check", "run"] * 4


class _Spy:
    def __init__(self, step, calls):
        self.step, self.calls = step, calls

    def check(self):
        self.calls.append("check")
        return self.step.check()

    def run(self, *args):
        self.calls.append("run")
        return self.step.run(*args)


def test_compiled_bias_corrections_are_pythons():
    """The fast path fills Adam's bias corrections in C++; they must be the bits of the
    Python arithmetic (backends.plan.hyper_rows) that torch.optim's host code uses."""
    checks = fused_optim.backends.host_checks()
    gen = torch.Generator().manual_seed(4)
    betas = torch.rand(500, 2, generator=gen, dtype=torch.float64) * 0.2 + 0.79
    # Steps up to 100 (where beta ** step is still above the rounding of 1 - it), then large.
    steps = torch.randint(1, 100, (500,), generator=gen).to(torch.float64)
    steps[300:] = torch.randint(0, 100_000, (200,), generator=gen).to(torch.float64)
    # Runs of groups at the same betas and step (one group per param, layer-wise lr), whose
    # corrections the extension computes once per run, next to groups that differ in one.
    betas[100:200], steps[100:200] = betas[100], steps[100]
    betas[200:210, 0], steps[200:210] = betas[199, 0], steps[199]  # beta2 differs
    betas[210:220, 1], steps[210:220] = betas[209, 1], steps[209]  # beta1 differs
    betas[220:230] = betas[219]  # the step differs
    steps = steps.tolist()
    hypers = [contract.AdamHyper(0.1, b1, b2, 1e-8, 0.0) for b1, b2 in betas.tolist()]
    rows, _ = plans.hyper_rows(hypers, steps)
    expected = torch.tensor(rows, dtype=torch.float64)
    table = expected.clone()
    table[:, plans.HYPER_BIAS_CORRECTION1] = 0.0
    table[:, plans.HYPER_BIAS_CORRECTION2_SQRT] = 0.0
    checks.adam_bias_corrections(table)
    assert torch.equal(table.view(torch.int64), expected.view(torch.int64))
    # The host step's table: the groups' values at base step 0, advanced by one step in place
    # by a grad table, whose step counts then expect one more.
    static, _ = plans.hyper_rows(hypers, [0.0] * len(hypers))
    advanced = torch.tensor(static, dtype=torch.float64)
    base_steps = torch.tensor(steps, dtype=torch.float64) - 1
    params = [torch.zeros(2)]
    params[0].grad = torch.zeros(2)
    counts = torch.full((1,), 2.0**24 - 1)  # float32: the next count is the last exact one
    table = checks.GradTable(params, [], torch.float32, counts)
    assert table.check()
    table.advance(advanced, base_steps, True)
    assert torch.equal(advanced.view(torch.int64), expected.view(torch.int64))
    assert base_steps.tolist() == steps
    assert not table.check(), "the counts have not advanced yet"
    counts.add_(1)
    assert table.check()
    table.advance(advanced, base_steps, True)
    counts.add_(1)  # 2**24 + 1 rounds to 2**24 in float32, as the expected count does
    assert table.check()
    counts.fill_(7.0)
    assert not table.check(), "a count edited by hand"
    # Counts of other dtypes (a checkpoint's int64 step, a bf16 one) advance as torch's add_
    # does (256 + 1 is 256 in bf16).
    cases = ((torch.float64, 2.0**53 - 1, True), (torch.bfloat16, 256.0, False),
             (torch.int64, 9, True))  # fmt: skip
    for dtype, start, moves in cases:
        counts = torch.full((2,), start, dtype=dtype)
        table = checks.GradTable(params, [], torch.float32, counts)
        table.advance(advanced, base_steps, True)
        assert table.check() is not moves, dtype
        counts.add_(1)
        assert table.check(), dtype


TENSOR_VALUE_EDITS = {
    "lr_filled": lambda g: g["lr"].fill_(0.05),
    "lr_memory_swapped": lambda g: setattr(g["lr"], "data", torch.tensor(0.05)),
    "beta1_filled": lambda g: g["betas"][0].fill_(0.5),
    "beta2_memory_swapped": lambda g: setattr(g["betas"][1], "data", torch.tensor(0.9)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", list(TENSOR_VALUE_EDITS))
def test_tensor_hyperparameters_edited_in_place_are_seen(backend, edit):
    """A tensor lr or beta changed in place, or given new memory through ``.data``, is the same
    object in the group: the next step (through the fast path) still uses its new value, as
    torch.optim does. (Tensor betas are read as values: the oracle has them as floats, README
    "Tensor betas".)"""
    gen = torch.Generator().manual_seed(21)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((9,), (4, 5))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    betas = (torch.tensor(0.9), torch.tensor(0.99))
    opt = fused_optim.Adam([{"params": ours, "lr": torch.tensor(0.01), "betas": betas}],
                           backend=backend)  # fmt: skip
    ref = correctly_rounded_optimizer(torch.optim.Adam)(
        [{"params": theirs, "lr": torch.tensor(0.01), "betas": tuple(map(float, betas))}],
        foreach=False,
    )
    for step in range(6):
        if step == 3:
            TENSOR_VALUE_EDITS[edit](opt.param_groups[0])
            ref.param_groups[0]["lr"].copy_(opt.param_groups[0]["lr"])
            ref.param_groups[0]["betas"] = tuple(map(float, opt.param_groups[0]["betas"]))
        set_grads(ours, theirs, gen)
        opt.step()
        ref.step()
        assert_same(opt, ref, ours, theirs)
    assert opt._plan.fast is not None or backend == "reference"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_that_gains_a_grad_is_updated(backend):
    """A param without a grad when the fast path was recorded, which then gets one: the next
    step updates it (the plan is rebuilt), as torch.optim does."""
    gen = torch.Generator().manual_seed(8)
    ours = [torch.nn.Parameter(torch.randn(5, generator=gen)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fused_optim.AdamW(ours, lr=0.1, backend=backend)
    ref = correctly_rounded_optimizer(torch.optim.AdamW)(theirs, lr=0.1, foreach=False)
    for step in range(6):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            if i == 1 and step < 3:
                continue
            g = torch.randn(5, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert_same(opt, ref, ours, theirs)
        if step == 2:
            untouched = ours[1].detach().clone()
    assert not torch.equal(ours[1], untouched)  # it moved once it had a grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_step_counts_advance_as_torch_s(backend, default_dtype):
    """Every ``step`` after five steps (the fast path's from the third on, which add in the
    extension where it is built): torch.optim's value and dtype, and its version counter
    advanced by one in-place add per step."""
    kept = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        opt, ref, ours, theirs, gen = make_pair("AdamW", backend, num_groups=2, per_group=3)
        for step in range(5):
            set_grads(ours, theirs, gen)
            opt.step()
            ref.step()
            if step == 1:
                before = [(opt.state[p]["step"]._version, ref.state[q]["step"]._version)
                          for p, q in zip(ours, theirs)]  # fmt: skip
        assert_same(opt, ref, ours, theirs)
        for (ours_before, theirs_before), p, q in zip(before, ours, theirs):
            mine, torch_s = opt.state[p]["step"], ref.state[q]["step"]
            assert mine.dtype == torch_s.dtype == default_dtype
            assert mine.item() == torch_s.item() == 5
            assert mine._version - ours_before == torch_s._version - theirs_before == 3
    finally:
        torch.set_default_dtype(kept)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("betas", [(-0.5, 0.9), (0.0, 0.9), (0.9, 0.0)], ids=str)
def test_betas_written_out_of_range_later_follow_torch(backend, betas):
    """torch.optim checks betas only when it is built: negative or zero betas written into a
    group later are used as they are, also for a param whose step is not its group's (its first
    grad came a step late), where the kernels compute beta ** step themselves (odd and even
    steps: the sign of a negative beta's power)."""
    gen = torch.Generator().manual_seed(11)
    start = [torch.randn(5, generator=gen) for _ in range(3)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    opt = fused_optim.AdamW(ours, lr=0.1, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=0.1, foreach=False)
    for step in range(4):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            g = None if step == 0 and i == 0 else torch.randn(5, generator=gen)
            p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        if step == 1:
            for optimizer in (opt, ref):
                optimizer.param_groups[0]["betas"] = betas
        opt.step()
        ref.step()
    assert float(opt.state[ours[0]]["step"]) == 3 and float(opt.state[ours[1]]["step"]) == 4
    for p, q, initial in zip(ours, theirs, start):
        torch.testing.assert_close(p.detach(), q.detach())
        assert not torch.equal(p.detach(), initial)
