"""fused_optim.backends.correctly_rounded and testing.correctly_rounded_torch: exact IEEE results
on every CPU, checked against exact rational arithmetic and numpy's hardware sqrt."""

from __future__ import annotations

import random
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


def test_sqrt_is_correctly_rounded():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.rand(200_000, generator=gen) * 2,
            torch.rand(1000, generator=gen) * 1e-38,  # fp32 subnormals
            torch.tensor([0.0, 1e-45, 3.4e38, float("inf"), 4.0, 2.0, 1.0]),
        ]
    )
    want = np.sqrt(x.numpy())  # numpy's fp32 sqrt is the hardware's, correctly rounded
    assert np.array_equal(cr.sqrt(x).numpy(), want)
    assert torch.isnan(cr.sqrt(torch.tensor([-1.0, float("nan")]))).all()
    # fp64 and others are left to torch.
    y = torch.rand(10, dtype=torch.float64)
    assert torch.equal(cr.sqrt(y), torch.sqrt(y))


def test_fma_rounds_once():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(3000, generator=gen), torch.randn(3000, generator=gen)
    c = torch.randn(3000, generator=gen) * torch.logspace(-8, 8, 3000)
    got = cr.fma(a, b, c)
    rng = random.Random(0)
    for i in rng.sample(range(3000), 600):
        exact = Fraction(a[i].item()) * Fraction(b[i].item()) + Fraction(c[i].item())
        assert got[i].item() == nearest_fp32(exact), i
    # A sum that fp64 rounds onto an fp32 midpoint: rounding to odd keeps it correct.
    a, b, c = torch.tensor([1 + 2**-20]), torch.tensor([1 - 2**-20]), torch.tensor([2.0**24 + 2])
    assert (a.double() * b.double() + c.double()).float().item() == 2.0**24 + 4  # naive: wrong
    assert cr.fma(a, b, c).item() == 2.0**24 + 2  # exact: 2^24 + 3 - 2^-40


def test_scalars_round_to_the_tensor_dtype_first():
    x = torch.tensor([1.0])
    assert cr.mul(x, 0.1).item() == (x * 0.1).item()  # torch casts 0.1 to fp32 as well
    assert cr.lerp(torch.tensor([0.0]), torch.tensor([1.0]), 0.1).item() == pytest.approx(0.1)


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
