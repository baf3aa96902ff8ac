"""KerZOO's kernel-weighted estimator: exact kernel moments and a measurable bias reduction."""
import math

import numpy as np
import pytest
import torch

import zotune
from zotune import rng
from zotune.directions import Gaussian, materialize
from zotune.estimators import SPSA, KernelSPSA
from zotune.estimators.kernel import KERNELS, interval, probe_scalar


def moment(order: int, power: int) -> float:
    """E[r^power K(r)] for r ~ U(-1, 1), by 30-point Gauss-Legendre (exact for these polynomials)."""
    x, w = np.polynomial.legendre.leggauss(30)
    return float(sum(wi * xi**power * KERNELS[order](xi) for xi, wi in zip(x, w)) / 2)


@pytest.mark.parametrize("order", [1, 3, 5])
def test_first_moment_is_one(order):
    assert moment(order, 1) == pytest.approx(1.0, abs=1e-12)


def test_higher_moments_vanish_as_designed():
    assert moment(3, 3) == pytest.approx(0.0, abs=1e-12)
    assert moment(5, 3) == pytest.approx(0.0, abs=1e-12) and moment(5, 5) == pytest.approx(0.0, abs=1e-12)
    assert moment(1, 3) == pytest.approx(3 / 5)  # order 1 does not cancel the eps^2 term
    x, w = np.polynomial.legendre.leggauss(30)  # variance inflation E[r^2 K^2] of the order-3 kernel
    assert float(sum(wi * (xi * KERNELS[3](xi)) ** 2 for xi, wi in zip(x, w)) / 2) == pytest.approx(6.25)


def test_probe_scalar_is_uniform_and_keyed():
    r = np.array([probe_scalar(rng.probe_seed(0, s, 0)) for s in range(20000)])
    assert r.min() > -1 and r.max() < 1
    assert abs(r.mean()) < 0.02 and abs((r**2).mean() - 1 / 3) < 0.01
    assert probe_scalar(123) == probe_scalar(123) != probe_scalar(124)


def mean_estimate(estimator, f, x, n):
    """Average of n single-probe estimates, computed densely (float64)."""
    total = torch.zeros_like(x)
    for s in range(n):
        plan = estimator.plan(lambda j: rng.probe_seed(11, s, j))
        zs = [materialize(Gaussian(), k, 0, x.numel(), dtype=torch.float64) for k in plan.keys]
        losses = [f(x + sum(a * zs[j] for j, a in pt)) for pt in plan.points]
        for (key, c), z in zip(estimator.combine(plan, losses).terms, zs):
            total += c * z
    return total / n


def test_kernel_removes_the_eps_squared_bias_on_a_quartic():
    """f(x) = sum x^4 / 4: MeZO's mean estimate is grad f + 3 eps^2 x (Gaussian z), the order-3
    kernel's is grad f exactly (no fifth derivative). Statistical, fixed keys: both checked at 4
    standard errors, and MeZO's bias is > 10 standard errors, so the comparison is significant."""
    x = torch.ones(3, dtype=torch.float64)
    f = lambda v: float((v**4).sum() / 4)  # noqa: E731
    grad, eps, n = x**3, 0.5, 6000
    mezo = mean_estimate(SPSA(eps), f, x, n)
    kernel = mean_estimate(KernelSPSA(eps, order=3), f, x, n)
    se_mezo, se_kernel = 0.06, 0.15  # sample standard errors at this n: measured 0.059 and 0.13
    assert torch.all((mezo - (grad + 3 * eps**2 * x)).abs() < 4 * se_mezo)
    assert torch.all((mezo - grad).abs() > 10 * se_mezo)
    assert torch.all((kernel - grad).abs() < 4 * se_kernel)


def test_plan_scales_points_by_r_and_the_schedule():
    est = KernelSPSA(1e-2, schedule="linear", s0=1.0, shrink_steps=100)
    plan = est.plan(lambda j: 77 + j, step=50)
    a = 1e-2 * 0.5 * probe_scalar(77)
    assert plan.points == (((0, a),), ((0, -a),))
    assert interval("harmonic", 0) == 0.5 and interval("harmonic", 500) == pytest.approx(1 / 3)
    assert interval("linear", 10**6, shrink_steps=4000) == 1e-4


@pytest.mark.parametrize("kwargs", [dict(eps=0), dict(order=2), dict(num_probes=0),
                                    dict(schedule="step"), dict(s0=0.1, s_min=1.0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        KernelSPSA(**{"eps": 1e-3, **kwargs})


def test_kerzoo_preset_trains_and_resumes():
    g = torch.Generator().manual_seed(0)
    a, target = torch.randn(32, 6, generator=g), torch.randn(32, generator=g)
    model = torch.nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    loss = lambda: ((model(a)[:, 0] - target) ** 2).mean()  # noqa: E731
    opt = zotune.ZOOptimizer(model.parameters(), lr=0.01, eps=1e-3, method="kerzoo", seed=2)
    start = float(loss().detach())
    for _ in range(300):
        opt.step(loss)
    assert float(loss().detach()) < 0.8 * start
    assert math.isfinite(opt.last_losses[0])
    with pytest.raises(ValueError, match="two-sided"):
        zotune.ZOOptimizer(model.parameters(), method="kerzoo", one_sided=True)


# ------------------------------------------------------------ the authors' code: kerzoo-code
def code_gain(s: float, power: int = 1) -> float:
    """E[k^power K_code(k)] for k ~ U(-s, s), K_code = 4 K_3 (exact quadrature)."""
    x, w = np.polynomial.legendre.leggauss(30)
    return float(sum(wi * (s * xi) ** power * 4 * KERNELS[3](s * xi) for xi, wi in zip(x, w)) / 2)


@pytest.mark.parametrize("s", [1.0, 0.77, 0.5, 0.1])
def test_code_normalisation_gain_is_the_notes_closed_form(s):
    """The code's first-order gain 25s^2 - 21s^4 (4 at s = 1) and third-order residue
    15s^4(1 - s^2), zero only at s = 1 (research note, section 2.4)."""
    assert code_gain(s) == pytest.approx(25 * s**2 - 21 * s**4, rel=1e-12)
    assert code_gain(s, 3) == pytest.approx(15 * s**4 * (1 - s**2), abs=1e-12)


def dense_estimate(est, f, tensors, key):
    """One estimate, densely: per-tensor perturbations and weights as the engine applies them."""
    from zotune.plan import coef_at
    plan = est.plan(lambda j: key + j)
    ids = [rng.name_id(name) for name in tensors]
    zs = {(j, t): materialize(Gaussian(), k, t, tensors[name].numel(), dtype=torch.float64)
          for j, k in enumerate(plan.keys) for name, t in zip(tensors, ids)}
    losses = []
    for pt in plan.points:
        shifted = {name: tensors[name] + sum(coef_at(a, t) * zs[j, t] for j, a in pt)
                   for name, t in zip(tensors, ids)}
        losses.append(f(shifted))
    grad = est.combine(plan, losses)
    return {name: sum(coef_at(c, t) * zs[j, t] for j, (_, c) in enumerate(grad.terms))
            for name, t in zip(tensors, ids)}


def test_per_tensor_r_draws_one_r_per_tensor_and_is_unbiased_to_first_order():
    """r drawn per (probe, tensor): points differ by tensor, and on a linear function
    (f = sum a . x) the mean estimate is a (first-order unbiased)."""
    tensors = {"w1": torch.zeros(3, dtype=torch.float64), "w2": torch.zeros(2, dtype=torch.float64)}
    a = {"w1": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
         "w2": torch.tensor([3.0, 1.0], dtype=torch.float64)}
    est = KernelSPSA(0.1, r_sharing="tensor")
    est.bind([rng.name_id("w1"), rng.name_id("w2")])
    point = est.plan(lambda j: 5).points[0][0][1]
    assert isinstance(point, dict) and len(set(point.values())) == 2
    f = lambda xs: float(sum((a[n] * xs[n]).sum() for n in xs))  # noqa: E731
    n = 4000
    mean = {k: torch.zeros_like(v) for k, v in tensors.items()}
    for s in range(n):
        est_s = dense_estimate(est, f, tensors, rng.probe_seed(3, s, 0))
        for k in mean:
            mean[k] += est_s[k] / n
    # per-element variance of one estimate is about 6.25 * |a|^2 (order-3 kernel): SE ~ 0.15
    for k in mean:
        assert torch.all((mean[k] - a[k]).abs() < 4 * 2.5 * float(a[k].norm()) / n**0.5)


def test_per_tensor_r_needs_bind():
    with pytest.raises(RuntimeError, match="bind"):
        KernelSPSA(1e-3, r_sharing="tensor").plan(lambda j: 1)
    with pytest.raises(ValueError, match="r_sharing"):
        KernelSPSA(1e-3, r_sharing="layer")
    with pytest.raises(ValueError, match="normalization"):
        KernelSPSA(1e-3, normalization="mine")


def test_linear_coupling_equals_the_codes_recursion():
    """ZO-SGD with the ``agd`` rule follows the code's x/c recursion: gradients at
    y = tau c + (1 - tau) x, c <- c - lr g, x <- tau c + (1 - tau) x, tau_k = 6 / (k + 6)."""
    g = torch.Generator().manual_seed(0)
    a, target = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, generator=g,
                                                                                 dtype=torch.float64)
    model = torch.nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.normal_(generator=g)
    loss = lambda w: float(((a @ w.view(-1) - target) ** 2).mean())  # noqa: E731
    lr, eps = 0.05, 1e-3
    x = model.weight.detach().clone().view(-1)
    c = x.clone()
    opt = zotune.ZOOptimizer(model.named_parameters(), lr=lr, eps=eps, update="agd", seed=4)
    for k in range(12):
        opt.step(lambda: loss(model.weight))
        tau = 6 / (k + 6)
        y = tau * c + (1 - tau) * x
        z = materialize(Gaussian(), rng.probe_seed(4, k, 0), rng.name_id("weight"), 5, dtype=torch.float64)
        grad = (loss(y + eps * z) - loss(y - eps * z)) / (2 * eps) * z
        c = c - lr * grad
        x = tau * c + (1 - tau) * x
        torch.testing.assert_close(model.weight.detach().view(-1), x, rtol=1e-9, atol=1e-12)


def test_per_tensor_clipping_caps_each_tensors_update_norm():
    """With clip C, each tensor's update is -lr * g_b * min(1, C / ||g_b||): its norm is lr * C
    when clipped (the norms come from the Gram matrix of the step's directions, exactly)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 1)).double()
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    loss = lambda: ((model(x) - y) ** 2).mean()  # noqa: E731
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, clip = 0.1, 1e-3
    opt = zotune.ZOOptimizer(model.named_parameters(), lr=lr, eps=1e-3, method="kerzoo",
                             num_probes=3, clip_norm=clip, seed=0)
    opt.step(loss)
    for n, p in model.named_parameters():
        assert float((p.detach() - before[n]).norm()) == pytest.approx(lr * clip, rel=1e-6)
    with pytest.raises(ValueError, match="clip_norm"):
        zotune.ZOOptimizer(model.parameters(), clip_norm=0.0)


def test_kerzoo_code_preset_options():
    model = torch.nn.Linear(4, 2)
    opt = zotune.ZOOptimizer(model.named_parameters(), method="kerzoo-code")
    est = opt.estimator
    assert (est.num_probes, est.r_sharing, est.normalization, est.schedule) == (3, "tensor", "code", "linear")
    assert opt.clip_norm == 4e5 and opt.rule.name == "agd" and not opt.defer_update
    assert opt.forward_passes == 0 and est.forward_passes == 6


@pytest.mark.parametrize("order,normalization,s", [(1, "paper", 1.0), (3, "paper", 1.0), (5, "paper", 1.0),
                                                   (3, "code", 1.0), (3, "code", 0.6)])
def test_gain_moments_are_what_the_estimator_applies(order, normalization, s):
    """gain_moments (Gauss-Legendre) against, first, a 200,000-point midpoint sum of the kernel
    formula and, second, the mean and mean square of the coefficient that plan() and combine()
    actually give on a loss with unit directional derivative (L(+-a) = +-a), over 20,000 probe
    keys (tolerance 5 standard errors)."""
    est = KernelSPSA(1e-3, order=order, normalization=normalization, schedule="linear", s0=1.0,
                     shrink_steps=100, s_min=1e-4)
    step = round((1.0 - s) * 100)
    r = (np.arange(200_000) + 0.5) / 100_000 - 1.0
    kernel = np.vectorize(KERNELS[order])
    gain = r * kernel(r) if normalization == "paper" else 4.0 * (s * r) * kernel(s * r)
    mean, second = est.gain_moments(step)
    assert mean == pytest.approx(float(np.mean(gain)), rel=1e-6, abs=1e-9)
    assert second == pytest.approx(float(np.mean(gain**2)), rel=1e-6)
    applied = []
    for key in range(20_000):
        plan = est.plan(lambda j, k=key: k, step=step)
        (_, a), = plan.points[0]
        applied.append(est.combine(plan, [a, -a], step=step).terms[0][1])
    applied = np.array(applied)
    n = len(applied)
    assert abs(applied.mean() - mean) < 5 * applied.std() / math.sqrt(n)
    assert abs((applied**2).mean() - second) < 5 * (applied**2).std() / math.sqrt(n)
    if normalization == "paper":
        assert mean == pytest.approx(1.0, abs=1e-12)
        assert second == pytest.approx({1: 1.8, 3: 6.25, 5: 13.2512}[order], rel=1e-4)


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_cli_default_lr_keeps_mezos_descent_margin_for_a_kernel(trainable):
    """A kernel estimator's default lr is MeZO's times E[g]/E[g^2] (1/6.25 for the order-3
    kernel), rounded to 3 significant figures: for the kerzoo preset, for --kernel-* options on
    another method, not with --estimator spsa."""
    from zotune.config import DEFAULT_LR, TrainConfig

    def lr(**flat):
        return TrainConfig.from_flat(trainable=trainable, **flat).resolved().method.lr

    mezo = DEFAULT_LR[trainable]
    assert lr(method="mezo") == mezo
    assert lr(method="kerzoo") == pytest.approx(mezo / 6.25, rel=5e-3)
    assert lr(method="mezo", estimator="kernel") == pytest.approx(mezo / 6.25, rel=5e-3)
    assert lr(method="dizo", kernel_order=1) == pytest.approx(mezo / 1.8, rel=5e-3)
    assert lr(method="kerzoo", estimator="spsa") == mezo
    assert lr(method="kerzoo-code") == pytest.approx(mezo * 4 / 100, rel=5e-3)  # code scale 4
    assert lr(method="kerzoo", lr=0.5) == 0.5
