"""Estimators on a float64 quadratic: finite-difference exactness and statistical unbiasedness.

f(x) = 1/2 x^T A x + b^T x has gradient A x + b. Central differences are exact on a quadratic,
so a two-sided probe's coefficient is exactly z^T grad f; a one-sided one adds eps/2 z^T A z.
"""
import math

import pytest
import torch

from zotune import rng
from zotune.directions import DIRECTIONS, Pooled, make_direction, materialize
from zotune.estimators import SPSA

D = 8


def quadratic():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(D, D, generator=g, dtype=torch.float64)
    a = m @ m.T / D + torch.eye(D, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(D, generator=g, dtype=torch.float64)
    f = lambda v: float(0.5 * v @ a @ v + b @ v)  # noqa: E731
    return f, a, a @ x + b, x


def direction(name):
    return Pooled(pool_size=4096) if name == "pooled" else make_direction(name)


def estimate(est: SPSA, dirn, f, x, step=0):
    """Run the estimator's plan densely: returns (gradient estimate, plan, directions)."""
    plan = est.plan(lambda j: rng.probe_seed(0, step, j))
    zs = [materialize(dirn, k, 0, D, dtype=torch.float64) for k in plan.keys]
    losses = [f(x + sum(a * zs[j] for j, a in pt)) if pt else f(x) for pt in plan.points]
    grad = est.combine(plan, losses, dirn.second_moment)
    ghat = sum(c * zs[plan.keys.index(k)] for k, c in grad.terms)
    return ghat, grad, zs


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_two_sided_coefficient_is_exact_directional_derivative(name):
    f, a, true_grad, x = quadratic()
    est = SPSA(eps=0.1, num_probes=3)
    _, grad, zs = estimate(est, direction(name), f, x)
    for (key, c), z in zip(grad.terms, zs):
        assert c == pytest.approx(float(z @ true_grad) / 3, rel=1e-10, abs=1e-12)


def test_one_sided_coefficient_has_the_known_curvature_term():
    f, a, true_grad, x = quadratic()
    est = SPSA(eps=0.1, num_probes=2, one_sided=True)
    _, grad, zs = estimate(est, direction("gaussian"), f, x)
    for (key, c), z in zip(grad.terms, zs):
        expected = (float(z @ true_grad) + 0.05 * float(z @ a @ z)) / 2
        assert c == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
@pytest.mark.parametrize("one_sided", [False, True])
def test_estimate_agrees_with_autograd_gradient(name, one_sided):
    """Statistical test (fixed seed). For two-sided SPSA with unit-variance z the estimate's
    relative error is about sqrt((d + k - 2) / N) with k the kurtosis (d + 1 for Gaussian); the
    bound is 5x that. One-sided adds a bias of order eps, kept small by eps = 1e-4."""
    f, a, _, x = quadratic()
    xg = x.clone().requires_grad_(True)
    (0.5 * xg @ a @ xg + 0 * xg.sum()).backward()
    n = 4_000
    est = SPSA(eps=1e-4, num_probes=n, one_sided=one_sided)
    ghat, _, _ = estimate(est, direction(name), f, x)
    _, _, true_grad, _ = quadratic()
    rel = float((ghat - true_grad).norm() / true_grad.norm())
    assert rel < 5 * math.sqrt((D + 1) / n), rel


def test_plan_shapes_and_forward_counts():
    assert SPSA(1e-3).forward_passes == 2
    assert SPSA(1e-3, num_probes=4).forward_passes == 8
    assert SPSA(1e-3, num_probes=4, one_sided=True).forward_passes == 5
    plan = SPSA(1e-3, num_probes=2).plan(lambda j: 100 + j)
    assert plan.points == (((0, 1e-3),), ((0, -1e-3),), ((1, 1e-3),), ((1, -1e-3),))
    assert plan.point_terms(3) == ((101, -1e-3),)


@pytest.mark.parametrize("kwargs", [dict(eps=0), dict(eps=-1e-3), dict(eps=1e-3, num_probes=0),
                                    dict(eps=1e-3, num_probes=1.5)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SPSA(**kwargs)
