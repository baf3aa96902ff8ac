r"""ZO-GraSP: DeepZero's layer-wise pruning ratios from forward passes only, and first-order GraSP
by autograd beside it.

GraSP (Wang et al., ICLR 2020) scores the weights at initialisation by
:math:`S = -\theta \odot (H g)`. DeepZero (Chen et al., ICLR 2024, section 4; research note B.3)
replaces both the gradient and the Hessian-gradient product by RGE estimates, as its code computes
them:

1. a class-balanced batch (25 images per class), mean cross-entropy, the network in train mode
   (BatchNorm on batch statistics), no temperature;
2. :math:`g_0 = \frac1q \sum_j [\ell(\theta + \mu u_j) - \ell(\theta)]\, u_j` over the conv and
   linear weights only, ``q = 192``, :math:`\mu = 5\times10^{-3}`, each tensor's block of
   :math:`u_j` of unit norm on its own (``estimators/rge.py``, mode ``layer``, times
   :math:`\mu`: the code has no 1/mu);
3. :math:`g_1`: the same at :math:`\theta + \mu g_0` with fresh directions;
4. :math:`\widehat{Hg} = (g_1 - g_0)/\mu`, :math:`S = -\theta \odot \widehat{Hg}`;
5. a global selection keeping the ``1 - s`` fraction of weights with the largest :math:`|S|`
   (PyTorch's global L1-unstructured pruning on the score), of which only the **ratio of pruned
   weights per layer** is kept: the sparse-gradient masks are random at those ratios
   (``estimators/cge.py``).

What the estimate is: in expectation (exact on a quadratic) :math:`E[\widehat{Hg}] = \mu^2 D H D
\nabla\ell` with :math:`D = \mathrm{diag}(1/d_l)` per tensor, so even with infinitely many
directions it is a layer-preconditioned GraSP score, not GraSP's; and at ``q = 192``,
:math:`\mu = 5\times10^{-3}` its noise (of order :math:`\lVert\nabla\ell\rVert / \sqrt{q d_l}`
per coordinate) exceeds that mean by orders of magnitude, so :math:`|S|` ranks the weights by
:math:`|\theta_i|/\sqrt{d_l}` times noise: large layers are pruned more (docs/methods.md).

Departure from the code: its loss function loads the perturbed weights into the network and
"restores" them from a ``state_dict()`` taken just before, whose tensors alias the parameters,
so every perturbation of :math:`g_0` stays in the weights (the queries walk). Here each query is
restored bitwise, as the algorithm states; the model (and its BatchNorm buffers) leave
:func:`zo_grasp_scores` exactly as they came.

Cost: ``2 (q + 1)`` forwards of the batch (386 at the defaults); memory: one direction and two
estimates of the prunable weights. First-order :func:`grasp_scores`: one forward, two backwards.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import rng
from ..errors import ZotuneError
from ..estimators.rge import rge_reference

NUM_PROBES, EPS, PER_CLASS = 192, 5e-3, 25
"""DeepZero's ZO-GraSP settings (research note B.7): q, mu, images per class."""
GRASP_TAG = 0x4752415350  # keys ZO-GraSP's directions apart from the training directions
RATIO_METHODS = ("zo-grasp", "grasp", "uniform")
"""Where layer-wise ratios come from (``--layer-ratios``)."""


def prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{canonical name: weight}`` of every convolution and linear layer, in module order
    (identified by name, never by position: research note B.10)."""
    from ..layout import canonical_name

    return {canonical_name(f"{name}.weight" if name else "weight"): m.weight
            for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}


def class_balanced(images: torch.Tensor, labels: torch.Tensor, per_class: int = PER_CLASS,
                   seed: int = 0, num_classes: int | None = None):
    """``(x, y)``: up to ``per_class`` examples of every class, the first ones of a seeded
    permutation (the authors take the first of a shuffled loader), in class order."""
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    gen = torch.Generator().manual_seed(rng.mix(seed, GRASP_TAG) & (2**63 - 1))
    order = torch.randperm(len(labels), generator=gen)
    picked = []
    for c in range(num_classes):
        of_c = order[labels[order] == c][:per_class]
        picked.append(of_c)
    idx = torch.cat(picked)
    if len(idx) == 0:
        raise ZotuneError("no labelled example for ZO-GraSP's class-balanced batch")
    return images[idx], labels[idx]


class _Restored:
    """Save the model's parameters and buffers (BatchNorm statistics) and put them back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.mode = self.model.training
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(self.saved[k])
        self.model.train(self.mode)


@torch.no_grad()
def zo_hessian_gradient(loss_fn: Callable[[], float], tensors: dict, *, num_probes: int = NUM_PROBES,
                        eps: float = EPS, seed: int = 0) -> tuple[dict, dict]:
    r"""``(g0, Hg)``: ZO-GraSP's two RGE estimates and their finite difference, as DeepZero's
    code forms them (see the module docstring): :math:`g_0 = \mu\,\hat g_{layer}(\theta)`,
    :math:`g_1 = \mu\,\hat g_{layer}(\theta + \mu g_0)` (fresh directions),
    :math:`Hg = (g_1 - g_0)/\mu`. ``tensors`` are moved in place and restored bitwise. Cost:
    ``2 (num_probes + 1)`` calls of ``loss_fn``."""
    keys = [[rng.probe_seed(rng.mix(seed, GRASP_TAG), r, j) for j in range(num_probes)] for r in (0, 1)]
    g0 = {n: eps * g for n, g in rge_reference(loss_fn, tensors, keys[0], eps, "layer").items()}
    saved = {n: t.detach().clone() for n, t in tensors.items()}
    try:
        for n, t in tensors.items():
            t.copy_((saved[n].double() + eps * g0[n]).to(t.dtype))
        g1 = {n: eps * g for n, g in rge_reference(loss_fn, tensors, keys[1], eps, "layer").items()}
    finally:
        for n, t in tensors.items():
            t.copy_(saved[n])
    return g0, {n: (g1[n] - g0[n]) / eps for n in tensors}


def zo_grasp_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_probes: int = NUM_PROBES,
                    eps: float = EPS, seed: int = 0) -> dict[str, torch.Tensor]:
    r"""``{weight name: S}``, :math:`S = -\theta \odot \widehat{Hg}` from forward passes only, on
    the batch ``(x, y)`` in train mode; the model is left bitwise as it was."""
    weights = prunable(model)
    with _Restored(model):
        model.train()
        loss = lambda: F.cross_entropy(model(x).double(), y)  # noqa: E731  (fp64: research note B.10)
        _, hg = zo_hessian_gradient(lambda: float(loss()), weights, num_probes=num_probes, eps=eps,
                                    seed=seed)
        return {n: -(w.detach().double() * hg[n]) for n, w in weights.items()}


def grasp_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 temperature: float = 1.0) -> dict[str, torch.Tensor]:
    r"""First-order GraSP by autograd: ``{weight name: S}``, :math:`S = -\theta \odot H g` with
    g the gradient of the mean cross-entropy of ``logits / temperature`` with respect to every
    parameter and :math:`Hg = \nabla_\theta (g \cdot \mathrm{stopgrad}(g))` (double backward;
    DeepZero's first-order baseline uses ``temperature = 200``), train mode; model restored."""
    weights = prunable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    with _Restored(model):
        model.train()
        loss = F.cross_entropy(model(x) / temperature, y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * g.detach()).sum() for g in grads)
        by_id = dict(zip(map(id, params), torch.autograd.grad(dot, params)))
        return {n: -(w.detach().double() * by_id[id(w)].double()) for n, w in weights.items()}


def layer_ratios(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    """Global selection by ``|score|``: the ``round(sparsity * N)`` weights of smallest magnitude
    (ties by position, names in order) are pruned; return each layer's pruned fraction. The ratios
    weighted by layer size sum to ``round(sparsity * N) / N`` exactly."""
    check_sparsity(sparsity)
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).abs() for n in names])
    k = int(round(sparsity * flat.numel()))
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.argsort(flat, stable=True)[:k]] = True
    out, pos = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = int(pruned[pos:pos + size].sum()) / size
        pos += size
    return out


def uniform_ratios(model: nn.Module, sparsity: float) -> dict[str, float]:
    """Every conv/linear weight at ``sparsity`` (the baseline ZO-GraSP is compared with)."""
    check_sparsity(sparsity)
    return {n: float(sparsity) for n in prunable(model)}


def check_sparsity(sparsity) -> float:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ZotuneError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def ratios_for(method: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               sparsity: float, *, seed: int = 0, num_classes: int | None = None,
               num_probes: int = NUM_PROBES, eps: float = EPS, per_class: int = PER_CLASS) -> dict:
    """The layer-wise ratios of ``method`` (``zo-grasp``, ``grasp`` or ``uniform``) for ``model``
    at its current (initial) weights, from a class-balanced batch of ``images``."""
    if method not in RATIO_METHODS:
        raise ZotuneError(f"unknown layer_ratios {method!r}; valid: {', '.join(RATIO_METHODS)}")
    check_sparsity(sparsity)
    if method == "uniform":
        return uniform_ratios(model, sparsity)
    x, y = class_balanced(images, labels, per_class, seed, num_classes)
    if method == "grasp":
        return layer_ratios(grasp_scores(model, x, y), sparsity)
    return layer_ratios(zo_grasp_scores(model, x, y, num_probes=num_probes, eps=eps, seed=seed), sparsity)


def weighted_sparsity(ratios: dict[str, float], model: nn.Module) -> float:
    """The overall sparsity of ``ratios``: their mean weighted by layer size."""
    sizes = {n: w.numel() for n, w in prunable(model).items()}
    return sum(ratios[n] * sizes[n] for n in ratios) / sum(sizes[n] for n in ratios)


def save_ratios(path: Path, ratios: dict[str, float], info: dict) -> None:
    """Write ``{**info, "ratios": ratios}`` as JSON (a temporary name, then a rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**info, "ratios": ratios}, indent=1) + "\n")
    tmp.replace(path)


def load_ratios(path: Path, model: nn.Module | None = None) -> dict:
    """The saved record (``ratios`` and how they were made); with ``model``, checked to name
    exactly its conv/linear weights with ratios in [0, 1]."""
    try:
        record = json.loads(Path(path).read_text())
        ratios = {str(n): float(r) for n, r in record["ratios"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ZotuneError(f"cannot read the layer-wise ratios {path}: {exc}") from None
    if model is not None and set(ratios) != set(prunable(model)):
        raise ZotuneError(f"{path} has ratios for {sorted(ratios)}, the model's conv/linear weights "
                          f"are {sorted(prunable(model))}")
    if not all(0.0 <= r <= 1.0 and math.isfinite(r) for r in ratios.values()):
        raise ZotuneError(f"{path}: a layer-wise ratio is outside [0, 1]")
    record["ratios"] = ratios
    return record
