"""fused_optim.backends.correctly_rounded and testing.correctly_rounded_torch: exact IEEE results
on every CPU, checked against exact rational arithmetic and numpy's hardware sqrt."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from fused_optim import testing
from fused_optim.backends import correctly_rounded as cr


def nearest_fp32(exact: Fraction) -> float:
    """The fp32 value nearest to ``exact`` (ties to even), by exact comparison."""
    guess = np.float32(float(exact))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess]
    candidates.append(np.nextafter(guess, np.float32(np.inf)))

    def key(c):
        return (abs(Fraction(float(c)) - exact), int(np.float32(c).view(np.int32)) & 1)

    return float(min(candidates, key=key))


@pytest.mark.parametrize("sqrt", [cr.sqrt, cr.exact_sqrt], ids=["dispatched", "exact"])
def test_sqrt_is_correctly_rounded(sqrt):
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.rand(200_000, generator=gen) * 2,
            torch.rand(1000, generator=gen) * 1e-38,  # fp32 subnormals
            torch.tensor([0.0, 1e-45, 3.4e38, float("inf"), 4.0, 2.0, 1.0]),
        ]
    )
    want = np.sqrt(x.numpy())  # numpy's fp32 sqrt is the hardware's, correctly rounded
    assert np.array_equal(sqrt(x).numpy(), want)
    assert torch.isnan(sqrt(torch.tensor([-1.0, float("nan")]))).all()
    # fp64 and others are left to torch.
    y = torch.rand(10, dtype=torch.float64)
    assert torch.equal(cr.sqrt(y), torch.sqrt(y))


@pytest.mark.parametrize("fma", [cr.fma, cr.exact_fma], ids=["dispatched", "exact"])
def test_fma_rounds_once(fma):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(3000, generator=gen), torch.randn(3000, generator=gen)
    c = torch.randn(3000, generator=gen) * torch.logspace(-8, 8, 3000)
    got = fma(a, b, c)
    rng = random.Random(0)
    for i in rng.sample(range(3000), 600):
        exact = Fraction(a[i].item()) * Fraction(b[i].item()) + Fraction(c[i].item())
        assert got[i].item() == nearest_fp32(exact), i
    # A sum that fp64 rounds onto an fp32 midpoint: rounding to odd keeps it correct.
    a, b, c = torch.tensor([1 + 2**-20]), torch.tensor([1 - 2**-20]), torch.tensor([2.0**24 + 2])
    assert (a.double() * b.double() + c.double()).float().item() == 2.0**24 + 4  # naive: wrong
    assert fma(a, b, c).item() == 2.0**24 + 2  # exact: 2^24 + 3 - 2^-40


def test_the_torch_ops_kept_native_are_exact_on_other_data():
    """native_ops() decided once, on its probes, which of torch's ops are exact here; they must
    stay exact on other data (and sizes) too."""
    native = cr.native_ops("cpu")
    gen = torch.Generator().manual_seed(99)
    for n in (3, 31, 4099, 300_001):
        a, b, c = (torch.randn(n, generator=gen) * 3 for _ in range(3))
        if "sqrt" in native:
            assert torch.equal(cr.sqrt(a.abs()), cr.exact_sqrt(a.abs()))
        if "fma" in native:
            assert torch.equal(cr.fma(a, b, c), cr.exact_fma(a, b, c))
            assert torch.equal(cr.fma(a, -1.7, c), cr.exact_fma(a, -1.7, c))
        if "lerp" in native:
            for w in (0.001, 0.45, 0.999):
                want = cr._lerp_formula(a, b, float(torch.tensor(w)), cr.exact_fma)
                assert torch.equal(cr.lerp(a, b, w), want)


def test_scalars_round_to_the_tensor_dtype_first():
    fp32_tenth = float(torch.tensor(0.1))
    for fma in (cr.fma, cr.exact_fma):
        assert fma(torch.tensor([1.0]), 0.1, torch.tensor([0.0])).item() == fp32_tenth
    assert cr.lerp(torch.tensor([0.0]), torch.tensor([1.0]), 0.1).item() == fp32_tenth


def test_mode_changes_only_fp32_cpu_math():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(2)) * 2
    with testing.correctly_rounded_torch():
        inside = x.sqrt()
        y = x.clone()
        y.add_(x, alpha=0.3)
        wide = x.double().sqrt()
        tracked = x.clone().requires_grad_().sqrt()
    assert torch.equal(inside, cr.sqrt(x))
    assert torch.equal(y, cr.fma(x, 0.3, x))
    assert torch.equal(wide, x.double().sqrt())  # fp64: torch's own
    assert torch.equal(tracked.detach(), x.sqrt())  # autograd: torch's own


def test_unfused_torch_multiply_adds_are_replaced():
    """ATen's portable (no-AVX2) kernels do not fuse a * b + c: the probe must notice and the
    helpers must still round once."""
    script = (
        "import torch\n"
        "from fused_optim.backends import correctly_rounded as cr\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "assert 'fma' not in cr.native_ops() and 'lerp' not in cr.native_ops()\n"
        "g = torch.Generator().manual_seed(1)\n"
        "a, b, c = (torch.randn(10007, generator=g) for _ in range(3))\n"
        "assert not torch.equal(torch.addcmul(c, a, b), cr.exact_fma(a, b, c))\n"
        "assert torch.equal(cr.fma(a, b, c), cr.exact_fma(a, b, c))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
