"""DeepZero's RGE modes: the optimizer against the materialised reference, and their statistics."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import classification_batch, mlp, mlp_loss
from zotune import ZOOptimizer, rng
from zotune.directions import Gaussian, materialize
from zotune.estimators.rge import MODES, rge_reference
from zotune.plan import coef_at


def dense_zo(opt, grad) -> dict:
    """A ZOGrad as ``{name: fp64 tensor}``, from the engine's own directions."""
    out = {}
    for spec in opt.core.engine.layout:
        n = math.prod(spec.shape)
        g = torch.zeros(n, dtype=torch.float64)
        for key, c in grad.terms:
            g += coef_at(c, spec.tensor_id) * materialize(Gaussian(), key, spec.tensor_id, n, dtype=spec.dtype).double()
        out[spec.name] = g.view(spec.shape)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_is_its_materialised_reference_in_fp64(mode):
    model = mlp(0, torch.float64)
    x, y = classification_batch(1, dtype=torch.float64)
    opt = ZOOptimizer(model, lr=0.0, eps=1e-3, method="rge", rge_mode=mode, num_probes=5, seed=3)
    calls = [0]

    def closure():
        calls[0] += 1
        return mlp_loss(model, x, y)()

    opt.step(closure)
    assert calls[0] == 6  # q + 1
    got = dense_zo(opt, opt.last_grad)
    keys = [k for k, _ in opt.last_grad.terms]
    assert keys == [rng.probe_seed(3, 0, j) for j in range(5)]
    want = rge_reference(mlp_loss(model, x, y), dict(model.named_parameters()), keys, 1e-3, mode)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10)


def _quadratic(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(9, 9, generator=g, dtype=torch.float64)
    a = m @ m.T / 9 + torch.eye(9, dtype=torch.float64)
    c = torch.randn(9, generator=g, dtype=torch.float64)
    tensors = {"a": torch.randn(3, generator=g, dtype=torch.float64),
               "b": torch.randn(2, 3, generator=g, dtype=torch.float64)}

    def flat():
        return torch.cat([tensors["a"], tensors["b"].reshape(-1)])

    def loss():
        t = flat()
        return float(0.5 * t @ a @ t + c @ t)

    return tensors, flat, loss, a, c


def test_modes_are_unbiased_up_to_their_known_scale_on_a_quadratic():
    """On a quadratic the forward difference's O(mu) term is odd in u, so E[g] is exactly
    grad (gaussian, sphere) and grad_l / d_l (layer). 300 estimates of q = 4 each (fixed
    seeds); bound: every coordinate's mean within 4.5 standard errors. The layer mode's mean is
    also checked to be far (> 8 standard errors) from the unscaled gradient, so the bound
    discriminates the scale."""
    tensors, flat, loss, a, c = _quadratic()
    grad = a @ flat() + c
    scale = torch.tensor([1 / 3] * 3 + [1 / 6] * 6, dtype=torch.float64)
    runs = 300
    for mode in MODES:
        draws = []
        for i in range(runs):
            keys = [rng.probe_seed(11, i, j) for j in range(4)]
            g = rge_reference(loss, tensors, keys, 0.1, mode)
            draws.append(torch.cat([g["a"], g["b"].reshape(-1)]))
        d = torch.stack(draws)
        mean, se = d.mean(0), d.std(0) / math.sqrt(runs)
        target = grad * scale if mode == "layer" else grad
        z = ((mean - target) / se).abs().max().item()
        assert z < 4.5, (mode, z)
        if mode == "layer":
            far = ((mean - grad) / se).abs().max().item()
            assert far > 8, far


def test_rge_mode_errors():
    with pytest.raises(ValueError, match="rge_mode applies to method 'rge' only"):
        ZOOptimizer(mlp(0), method="mezo", rge_mode="sphere")
    with pytest.raises(ValueError, match="valid: gaussian, sphere, layer"):
        ZOOptimizer(mlp(0), method="rge", rge_mode="cube")
