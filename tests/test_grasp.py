"""ZO-GraSP and first-order GraSP: the Hessian-gradient estimate's mean, the global selection,
reproducibility, the ratios' sum, first-order against zeroth-order ratios, the saved file."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_rge import _quadratic
from zotune.errors import ZotuneError
from zotune.models.vision import small_cnn
from zotune.sparsity import (grasp_scores, layer_ratios, load_ratios, prunable, ratios_for, save_ratios,
                             zo_grasp_scores, zo_hessian_gradient)
from zotune.sparsity.grasp import weighted_sparsity


def _cnn(seed=0, dtype=torch.float32, widths=(4, 6)):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return small_cnn(num_classes=4, in_channels=1, widths=widths).to(dtype)


def _data(n=40, dtype=torch.float32, seed=5):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype) + y.view(-1, 1, 1, 1).to(dtype) * 0.5
    return x, y


def test_zo_hessian_gradient_mean_is_mu2_DHD_grad_on_a_quadratic():
    """E[Hg_hat] = mu^2 D A D grad, D = diag(1/d_l) (exact on a quadratic; module docstring).
    120 runs of q = 16 at mu = 1 (fixed seeds); bound: every coordinate within 4.5 standard errors,
    and the mean more than 8 standard errors from mu^2 D A grad (one D less: measured 40 at 100
    runs), so the bound discriminates."""
    tensors, flat, loss, a, c = _quadratic(1)
    grad = a @ flat() + c
    dscale = torch.tensor([1 / 3] * 3 + [1 / 6] * 6, dtype=torch.float64)
    runs = []
    for seed in range(120):
        _, hg = zo_hessian_gradient(loss, tensors, num_probes=16, eps=1.0, seed=seed)
        runs.append(torch.cat([hg["a"], hg["b"].reshape(-1)]))
    d = torch.stack(runs)
    mean, se = d.mean(0), d.std(0) / math.sqrt(len(runs))
    want = dscale * (a @ (dscale * grad))
    assert ((mean - want) / se).abs().max() < 4.5
    assert ((mean - dscale * (a @ grad)) / se).abs().max() > 8


def test_global_selection_is_pytorchs_global_l1_pruning_on_the_score():
    from torch.nn.utils import prune

    model = _cnn(1)
    g = torch.Generator().manual_seed(2)
    scores = {n: torch.randn(w.shape, generator=g) for n, w in prunable(model).items()}
    for sparsity in (0.3, 0.9):
        ratios = layer_ratios(scores, sparsity)
        copy = _cnn(1)
        modules = {f"{n}.weight": m for n, m in copy.named_modules() if hasattr(m, "weight")
                   and f"{n}.weight" in scores}
        prune.global_unstructured([(m, "weight") for m in modules.values()], pruning_method=prune.L1Unstructured,
                                  amount=sparsity,
                                  importance_scores={(m, "weight"): scores[n] for n, m in modules.items()})
        want = {n: float((m.weight_mask == 0).double().mean()) for n, m in modules.items()}
        assert ratios == pytest.approx(want, abs=1e-12)


def test_zo_grasp_ratios_are_reproducible_sum_to_the_target_and_leave_the_model():
    model = _cnn(0)
    x, y = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    sizes = {n: w.numel() for n, w in prunable(model).items()}
    total = sum(sizes.values())
    runs = [layer_ratios(zo_grasp_scores(model, x, y, num_probes=24, seed=s), 0.8) for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    for ratios in runs:
        pruned = sum(ratios[n] * sizes[n] for n in sizes)
        assert abs(pruned - round(0.8 * total)) < 1e-9  # round(s N) weights, exactly
        assert abs(weighted_sparsity(ratios, model) - 0.8) <= 0.5 / total + 1e-12
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN buffers too
    assert torch.equal(torch.random.get_rng_state(), state)


def test_first_order_hg_is_a_central_difference_of_autograd_gradients():
    model = _cnn(2, torch.float64)
    x, y = _data(dtype=torch.float64)
    scores = grasp_scores(model, x, y)
    params = list(model.parameters())

    def grads():
        model.train()
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    g = [t.detach() for t in grads()]
    h = 1e-5
    with torch.no_grad():
        for p, d in zip(params, g):
            p.add_(h * d)
    plus = grads()
    with torch.no_grad():
        for p, d in zip(params, g):
            p.sub_(2 * h * d)
    minus = grads()
    with torch.no_grad():
        for p, d in zip(params, g):
            p.add_(h * d)
    by_id = {id(p): (a - b) / (2 * h) for p, a, b in zip(params, plus, minus)}
    for name, w in prunable(model).items():
        torch.testing.assert_close(scores[name], -(w.detach() * by_id[id(w)]), rtol=1e-5, atol=1e-9)


def test_zo_grasp_ratios_against_first_order_grasp():
    """What ZO-GraSP's ratios share with first-order GraSP's on a small CNN (3 layers of 36, 216
    and 24 weights, sparsity 0.8, q = 192, mu = 5e-3). Agreement = the size-weighted mean
    |ratio difference|. Measured at seed 0: ZO vs FO 0.051 (seeds 0-3: 0.022-0.073), uniform vs
    FO 0.146. Bounds: ZO vs FO < 0.10, and ZO closer to FO than half of uniform's distance."""
    model = _cnn(3)
    x, y = _data(80)
    fo = ratios_for("grasp", model, x, y, 0.8)
    zo = ratios_for("zo-grasp", model, x, y, 0.8)
    sizes = {n: w.numel() for n, w in prunable(model).items()}
    gap = lambda a, b: sum(abs(a[n] - b[n]) * sizes[n] for n in sizes) / sum(sizes.values())  # noqa: E731
    uniform = {n: 0.8 for n in sizes}
    assert gap(zo, fo) < 0.10, (zo, fo)
    assert gap(zo, fo) < 0.5 * gap(uniform, fo), (zo, fo)


def test_ratios_file_round_trip_and_errors(tmp_path):
    model = _cnn(0)
    ratios = {n: 0.5 for n in prunable(model)}
    save_ratios(tmp_path / "r.json", ratios, {"method": "uniform", "sparsity": 0.5})
    record = load_ratios(tmp_path / "r.json", model)
    assert record["ratios"] == ratios and record["method"] == "uniform"
    with pytest.raises(ZotuneError, match="conv/linear weights"):
        load_ratios(tmp_path / "r.json", _cnn(0, widths=(4,)))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ZotuneError, match="cannot read the layer-wise ratios"):
        load_ratios(tmp_path / "bad.json")
    with pytest.raises(ZotuneError, match=r"sparsity must be in \[0, 1\)"):
        layer_ratios({"w": torch.ones(3)}, 1.0)
