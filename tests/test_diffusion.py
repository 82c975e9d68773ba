"""The math of cfgen/diffusion.py against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from cfgen.diffusion import (ddim_step, guided_reverse, invert, log_prob_grad, timestep_grid,
                             x0_estimate)

# a_0 = 0.64 (sqrt 0.8, sqrt(1-a) 0.6), a_1 = 0.36 (sqrt 0.6, sqrt(1-a) 0.8)
ALPHAS = torch.tensor([0.64, 0.36], dtype=torch.float64)


def half_x(x, t):
    """eps(x, t) = x / 2: simple enough to do the step by hand."""
    return 0.5 * x


def two_class_linear(x, t):
    """logits = [sum x, -sum x], so p(0|x) = sigmoid(2 * sum x)."""
    s = x.flatten(1).sum(1)
    return torch.stack([s, -s], dim=1)


def test_timestep_grid_is_even_and_ends_at_t_inv():
    assert timestep_grid(1000, 25, 0.5) == list(range(0, 501, 20))
    assert timestep_grid(1000, 3, 1.0) == [0, 333, 666, 999]  # capped at T - 1
    with pytest.raises(ValueError, match="exceeds"):
        timestep_grid(10, 8, 0.5)


def test_x0_estimate_and_step_by_hand():
    x = torch.tensor([1.0], dtype=torch.float64)
    e = torch.tensor([0.5], dtype=torch.float64)
    # (1 - 0.6 * 0.5) / 0.8 = 0.875
    assert x0_estimate(x, e, 0.64).item() == pytest.approx(0.875)
    # 0.6 * 0.875 + 0.8 * 0.5 = 0.925
    assert ddim_step(x, e, 0.64, 0.36).item() == pytest.approx(0.925)


def test_one_inversion_step_by_hand():
    x0 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    u = invert(half_x, x0, ALPHAS, [0, 1])
    # e = eps(1, t0) = 0.5 -> x0-estimate 0.875 -> 0.6 * 0.875 + 0.8 * 0.5
    assert u.item() == pytest.approx(0.925)


def test_one_guided_step_by_hand():
    u = torch.full((1, 1, 1, 1), 0.925, dtype=torch.float64)
    target = torch.tensor([0])
    out = guided_reverse(half_x, two_class_linear, u, ALPHAS, [0, 1], target=target, scale=2.0)
    e = 0.5 * 0.925                                   # eps(x_t, t_1)
    g = 2.0 * (1.0 - 1.0 / (1.0 + math.exp(-1.85)))   # d/dx log sigmoid(2x) at x = 0.925
    e_hat = e - 2.0 * 0.8 * g                         # s * sqrt(1 - a_1) * g
    x0 = (0.925 - 0.8 * e_hat) / 0.6
    expected = 0.8 * x0 + 0.6 * e_hat
    assert expected == pytest.approx(1.2204, abs=1e-4)  # the same numbers worked on paper
    assert out.item() == pytest.approx(expected, rel=1e-12)


def test_log_prob_grad_is_per_sample():
    x = torch.tensor([[[[0.3]]], [[[-1.2]]]], dtype=torch.float64)
    g = log_prob_grad(two_class_linear, x, torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]))
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))
    assert g[0].item() == pytest.approx(2 * (1 - sig(0.6)))    # class 0 at x = 0.3
    assert g[1].item() == pytest.approx(-2 * sig(-2.4))        # class 1 at x = -1.2


def test_round_trip_is_exact_when_eps_is_constant():
    # With eps independent of x and t, DDIM up then down the same grid is an identity:
    # any off-by-one between the two loops would break this.
    alphas = torch.linspace(0.9999, 0.05, 1000, dtype=torch.float64)
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grid = timestep_grid(1000, 10, 0.7)
    u = invert(lambda x, t: c, x0, alphas, grid)
    assert not torch.allclose(u, x0)
    back = guided_reverse(lambda x, t: c, None, u, alphas, grid)
    assert torch.allclose(back, x0, atol=1e-12)


def test_zero_scale_ignores_the_classifier():
    u = torch.full((1, 1, 1, 1), 0.925, dtype=torch.float64)
    plain = guided_reverse(half_x, None, u, ALPHAS, [0, 1])
    zero = guided_reverse(half_x, two_class_linear, u, ALPHAS, [0, 1], target=torch.tensor([0]), scale=0.0)
    assert plain.item() == zero.item()


def test_per_sample_scales():
    u = torch.full((2, 1, 1, 1), 0.925, dtype=torch.float64)
    both = guided_reverse(half_x, two_class_linear, u, ALPHAS, [0, 1], target=torch.tensor([0, 0]),
                          scale=torch.tensor([0.0, 2.0]))
    assert both[0].item() == pytest.approx(guided_reverse(half_x, None, u[:1], ALPHAS, [0, 1]).item())
    assert both[1].item() == pytest.approx(1.2204, abs=1e-4)
