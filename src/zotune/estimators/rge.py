r"""RGE: DeepZero's random-direction gradient estimate, with Gaussian, unit-sphere or per-tensor
normalised directions.

Forward differences against one base query along q directions (Chen et al., *DeepZero*, ICLR
2024, eq. (1); research note B.1), with :math:`\Delta_j = \ell(\theta + \mu u_j) - \ell(\theta)`
taken in fp64:

``gaussian``  :math:`u_j = z_j \sim \mathcal N(0, I)`,
    :math:`\hat g = \frac{1}{q\,m} \sum_j \frac{\Delta_j}{\mu} u_j` (m: the direction's second
    moment): :math:`E\hat g = \nabla\ell + O(\mu)`; one-sided SPSA.
``sphere``    :math:`u_j = z_j / \lVert z_j \rVert` (uniform on the unit sphere of all d
    trainable elements), :math:`\hat g = \frac{d}{q} \sum_j \frac{\Delta_j}{\mu} u_j`
    (:math:`E[u u^\top] = I/d`): :math:`E\hat g = \nabla\ell + O(\mu)`.
``layer``     each tensor's block normalised on its own, :math:`u_{j,l} = z_{j,l} / \lVert z_{j,l}
    \rVert` (so the perturbation of every tensor has norm :math:`\mu`: ZO-GraSP's directions in
    DeepZero's code), :math:`\hat g = \frac1q \sum_j \frac{\Delta_j}{\mu} u_j`, no dimension
    factor: :math:`E\hat g_l = \nabla_l\ell / d_l + O(\mu)`, the gradient scaled by one over each
    tensor's size (:math:`E[u_l u_l^\top] = I/d_l`). DeepZero's code accumulates
    :math:`\frac1q\sum_j \Delta_j u_j`, which is :math:`\mu` times this.

On a quadratic the O(mu) terms vanish in expectation (they are odd in u), which is what the
statistical tests check. Cost: q + 1 forward passes; the normalised modes also draw every
direction once more before the step (its per-tensor norms, from the engine's ``gram``), so q more
random-number sweeps and no extra memory.

:func:`rge_reference` computes the same estimate the obvious way (materialised directions,
parameters moved in place and restored), for tests and for ZO-GraSP (``sparsity/grasp.py``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..directions import Gaussian, materialize
from ..plan import ProbePlan, ZOGrad
from .. import rng

MODES = ("gaussian", "sphere", "layer")
"""The direction normalisations of :class:`RGE`."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown rge_mode {mode!r}; valid: {', '.join(MODES)}")
    return mode


class RGE:
    """One-sided random-direction estimate; see the module docstring.

    Args:
        eps: the step :math:`\\mu` (> 0; DeepZero: 5e-3).
        num_probes: q >= 1 directions per step.
        mode: ``gaussian``, ``sphere`` or ``layer``.
    """

    feedback = "losses"
    one_sided = True

    def __init__(self, eps: float = 5e-3, num_probes: int = 1, mode: str = "gaussian") -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if int(num_probes) != num_probes or num_probes < 1:
            raise ValueError(f"num_probes must be an integer >= 1, got {num_probes}")
        self.eps, self.num_probes, self.mode = float(eps), int(num_probes), check_mode(mode)
        self.engine = None
        self._scales: tuple | None = None  # (keys, [scale of probe j]) of the last plan

    @property
    def forward_passes(self) -> int:
        return self.num_probes + 1

    def attach(self, engine) -> None:
        """The engine whose ``gram`` gives the directions' norms (set by ``methods.build``)."""
        self.engine = engine

    def scales(self, keys: Sequence[int]) -> list:
        r"""Per probe, the factor ``s`` with :math:`u_j = s\,z_j`: 1 (``gaussian``),
        :math:`1/\lVert z_j\rVert` (``sphere``) or ``{tensor id: 1/||z_{j,l}||}`` (``layer``)."""
        keys = tuple(keys)
        if self.mode == "gaussian":
            return [1.0] * len(keys)
        if self._scales is not None and self._scales[0] == keys:
            return self._scales[1]
        if self.engine is None:
            raise ValueError(f"rge_mode={self.mode!r} needs the engine's norms: build it through "
                             "ZOOptimizer (methods.build attaches the engine)")
        zo = [spec for spec in self.engine.layout if spec.role == "zo"]
        out = []
        for key in keys:
            gram = self.engine.gram([key])  # one sweep: this direction's squared norm per tensor
            sq = {spec.tensor_id: float(gram[spec.index][0, 0]) for spec in zo}
            if self.mode == "sphere":
                out.append(1.0 / math.sqrt(sum(sq.values())))
            else:
                out.append({t: 1.0 / math.sqrt(v) for t, v in sq.items()})
        self._scales = (keys, out)
        return out

    def plan(self, key_of: Callable[[int], int], step: int = 0) -> ProbePlan:
        keys = tuple(key_of(j) for j in range(self.num_probes))
        scales = self.scales(keys)
        points = ((),) + tuple(((j, _times(s, self.eps)),) for j, s in enumerate(scales))
        return ProbePlan(keys, points)

    def combine(self, plan: ProbePlan, losses: Sequence[float], second_moment: float = 1.0,
                step: int = 0) -> ZOGrad:
        """The estimate from the losses at ``plan``'s points (base first), in that order."""
        q, base = self.num_probes, float(losses[0])
        scales = self.scales(plan.keys)
        if self.mode == "gaussian":
            factor = 1.0 / (q * second_moment * self.eps)
        elif self.mode == "sphere":
            d = sum(_numel(spec) for spec in self.engine.layout if spec.role == "zo")
            factor = d / (q * self.eps)
        else:
            factor = 1.0 / (q * self.eps)
        terms = tuple((plan.keys[j], _times(scales[j], (float(losses[1 + j]) - base) * factor))
                      for j in range(q))
        return ZOGrad(terms)

    def state_dict(self) -> dict:
        """Settings only (the estimate is a function of the step's losses and keys)."""
        return {"estimator": "rge", "eps": self.eps, "num_probes": self.num_probes, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        from .spsa import check_settings

        check_settings(self, state)


def _times(scale, factor: float):
    if isinstance(scale, dict):
        return {t: s * factor for t, s in scale.items()}
    return scale * factor


def _numel(spec) -> int:
    return spec.numel if isinstance(spec.numel, int) else math.prod(spec.shape)


@torch.no_grad()
def rge_reference(loss_fn: Callable[[], float], tensors: dict, keys: Sequence[int], eps: float,
                  mode: str = "layer", *, tensor_ids: dict | None = None,
                  chunk_size: int = rng.DEFAULT_CHUNK_SIZE, direction=None) -> dict:
    r"""RGE the obvious way: for each key draw :math:`z_j` tensor by tensor (the engines' numbers:
    ``directions.materialize`` with the tensor's id), move ``tensors`` in place to
    :math:`\theta + \mu u_j`, call ``loss_fn``, put the saved values back; return
    ``{name: estimate}`` (fp64, the tensors' shapes) as :class:`RGE` defines it for ``mode``.

    ``tensors``: ``{name: tensor}`` (parameters, changed in place during the call and restored
    bitwise); ``tensor_ids``: ``{name: id}`` (default ``rng.name_id(name)``, as the layout keys
    its tensors). Cost: ``len(keys) + 1`` calls of ``loss_fn``; memory: one direction."""
    check_mode(mode)
    direction = direction or Gaussian()
    ids = {n: (tensor_ids or {}).get(n, rng.name_id(n)) for n in tensors}
    saved = {n: t.detach().clone() for n, t in tensors.items()}
    d = sum(t.numel() for t in tensors.values())
    q = len(keys)
    grad = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in tensors.items()}
    base = float(loss_fn())
    try:
        for key in keys:
            z = {n: materialize(direction, key, ids[n], t.numel(), chunk_size, dtype=t.dtype)
                    .double().view(t.shape) for n, t in tensors.items()}
            if mode == "gaussian":
                u = step = z
                factor = 1.0 / (q * direction.second_moment * eps)
            elif mode == "sphere":
                norm = math.sqrt(sum(float((v * v).sum()) for v in z.values()))
                u = step = {n: v / norm for n, v in z.items()}
                factor = d / (q * eps)
            else:
                u = step = {n: v / v.norm() for n, v in z.items()}
                factor = 1.0 / (q * eps)
            for n, t in tensors.items():
                t.copy_((saved[n].double() + eps * step[n]).to(t.dtype))
            delta = float(loss_fn()) - base
            for n, t in tensors.items():
                t.copy_(saved[n])
                grad[n] += (delta * factor) * u[n]
    finally:
        for n, t in tensors.items():
            t.copy_(saved[n])
    return grad
