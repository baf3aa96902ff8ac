r"""ZO-RankSGD's estimator: a gradient direction from a ranking (or any comparisons) of m points.

Tang, Rybin and Chang, "Zeroth-Order Optimization Meets Human Feedback: Provable Learning via
Ranking Oracles", ICLR 2024 (arXiv 2303.03751); research/ranksgd_deepzero.md, part A.

The m points are :math:`y_i = x + \mu \xi_i` with unit-variance :math:`\xi_i` (Gaussian by
default), regenerated from keys like every other direction. An oracle names the best k of them,
best first, or gives comparisons; each comparison ``(i better than j)`` is an edge of a DAG E and
contributes the pairwise estimate :math:`\xi_j - \xi_i` (A.2). Averaged over the edges:

.. math::
    \tilde g = \frac{1}{|E|} \sum_{(i \to j) \in E} (\xi_j - \xi_i)
             = \frac{1}{|E|} \sum_{i=1}^{m} c_i \xi_i, \qquad
    c_i = \mathrm{indeg}(i) - \mathrm{outdeg}(i)

(the points known to be better than i minus the points known to be worse). For a top-k ranking
the weights have a closed form: the point at position r (0 = best) gets :math:`c = 2r - (m - 1)`,
an unranked point :math:`c = +k`, and :math:`|E| = k(k-1)/2 + k(m-k)`. :math:`\tilde g` is an
ascent direction; the step is :math:`x \leftarrow x - \eta \tilde g`. As :math:`\mu \to 0`,
:math:`E[\tilde g] = \frac{2}{\sqrt\pi} \nabla f / \|\nabla f\|` for k = m (a normalised
direction: ranks carry no magnitude), longer for k < m (table A.3).

``legacy=True`` reproduces the authors' released code (``optimizer.py``): ranked weights
:math:`m - 2r` instead of :math:`m - 1 - 2r` (an extra pull towards the top k when k < m,
zero-mean noise when k = m) and directions built from :math:`y_i - x = \mu \xi_i`, i.e. an extra
factor :math:`\mu` in the step.

Cost: m forward passes (points) and one ranking per step; O(m) scalars, no memory beyond the
parameters (the xi are regenerated from their keys, as MeZO's z).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..feedback import Edges, Losses, Ranking
from ..plan import ProbePlan, ZOGrad
from .spsa import check_settings


def ranking_weights(order: Sequence[int], num_points: int, *, legacy: bool = False) -> tuple[list[float], int]:
    """``(c, |E|)`` of a top-k ranking ``order`` (best first) of ``num_points`` points, closed form.

    Exact: ranked position r gets ``2r - (m - 1)``, unranked ``+k``; ``legacy``: ``2r - m`` for the
    ranked (the authors' code). |E| = k(k-1)/2 + k(m-k) either way."""
    m, k = num_points, len(order)
    c = [float(k)] * m
    for r, i in enumerate(order):
        c[i] = float(2 * r - (m if legacy else m - 1))
    return c, k * (k - 1) // 2 + k * (m - k)


def edge_weights(pairs: Sequence[tuple[int, int]], num_points: int) -> tuple[list[float], int]:
    """``(c, |E|)`` of comparisons ``(better, worse)``: c = in-degree - out-degree, a scatter-add
    over the edges (any DAG, duplicates counted; an inconsistent cycle is counted as given)."""
    if not pairs:
        return [0.0] * num_points, 0
    edges = torch.tensor(pairs, dtype=torch.long)
    c = (torch.bincount(edges[:, 1], minlength=num_points)
         - torch.bincount(edges[:, 0], minlength=num_points))
    return [float(v) for v in c.tolist()], len(pairs)


def dag_weights(feedback: Ranking | Edges, *, legacy: bool = False) -> tuple[list[float], int]:
    """``(c, |E|)`` of a ranking (closed form) or an edge list (scatter-add)."""
    if isinstance(feedback, Ranking):
        return ranking_weights(feedback.order, feedback.num_points, legacy=legacy)
    if legacy:
        raise ValueError("legacy=True reproduces the authors' weights for top-k rankings; an edge "
                         "list has no such form (use legacy=False)")
    return edge_weights(feedback.pairs, feedback.num_points)


def rank_direction(xis: torch.Tensor, feedback: Ranking | Edges | Sequence[int]) -> torch.Tensor:
    r"""The ascent estimate :math:`\tilde g = \frac{1}{|E|}\sum_i c_i \xi_i` from materialised
    directions ``xis`` (shape ``[m, d]``) and a ranking (``Ranking`` or a list of indices, best
    first) or ``Edges``. A dense reference (it stores the xi); the optimizer regenerates them."""
    if not isinstance(feedback, (Ranking, Edges)):
        feedback = Ranking(tuple(feedback), xis.shape[0])
    c, size = dag_weights(feedback)
    if size == 0:
        raise ValueError("no comparisons: the direction is undefined")
    return torch.tensor(c, dtype=xis.dtype, device=xis.device) @ xis / size


class RankEstimator:
    r"""The (m, k) ranking estimator of ZO-RankSGD (see the module docstring for the maths).

    Args:
        mu: smoothing radius: the points are ``x + mu xi_i`` (> 0).
        m: points per step (>= 2).
        k: how many of them the oracle ranks, best first (1 <= k <= m; default m). A callable
            objective's losses are cut to their top k, so it sees what an (m, k) oracle gives.
        legacy: the authors' code's weights (m - 2r) and extra factor mu.
    """

    feedback = "edges"   # the coarsest form: losses, rankings and edge lists all convert to it
    one_sided = True     # the step's result is not the mean of +-eps losses

    def __init__(self, mu: float = 0.01, m: int = 10, k: int | None = None, *, legacy: bool = False) -> None:
        if not (isinstance(mu, (int, float)) and mu > 0):
            raise ValueError(f"mu (the smoothing radius) must be > 0, got {mu!r}")
        if isinstance(m, bool) or int(m) != m or m < 2:
            raise ValueError(f"m (points per step) must be an integer >= 2, got {m!r}")
        k = m if k is None else k
        if isinstance(k, bool) or int(k) != k or not 1 <= k <= m:
            raise ValueError(f"k (points ranked per step) must be an integer in 1..m={m}, got {k!r}")
        self.mu, self.m, self.k, self.legacy = float(mu), int(m), int(k), bool(legacy)

    num_probes = property(lambda self: self.m)
    forward_passes = property(lambda self: self.m)

    def plan(self, key_of: Callable[[int], int], step: int = 0) -> ProbePlan:
        """The m points x + mu xi_j, one key each."""
        keys = tuple(key_of(j) for j in range(self.m))
        return ProbePlan(keys, tuple(((j, self.mu),) for j in range(self.m)))

    def as_comparisons(self, feedback, num_points: int) -> Ranking | Edges:
        """Losses (or a plain list of them) become their top k (ties by index); rankings and edges
        pass through."""
        if isinstance(feedback, (list, tuple)):
            feedback = Losses(tuple(feedback))
        if isinstance(feedback, Losses):
            return feedback.ranking(self.k)
        if isinstance(feedback, (Ranking, Edges)):
            return feedback
        raise ValueError(f"a ranking estimator combines Losses, Ranking or Edges, got {type(feedback).__name__}")

    def combine(self, plan: ProbePlan, feedback, second_moment: float = 1.0, step: int = 0) -> ZOGrad | None:
        """``sum_i (c_i / |E|) xi_i`` as keys and coefficients (times mu when ``legacy``); None
        (skip the step) when there is no comparison."""
        feedback = self.as_comparisons(feedback, plan.num_points)
        c, size = dag_weights(feedback, legacy=self.legacy)
        if size == 0:
            return None
        scale = (self.mu if self.legacy else 1.0) / size
        return ZOGrad(tuple((key, ci * scale) for key, ci in zip(plan.keys, c)))

    def state_dict(self) -> dict:
        """The settings (nothing evolves), checked on load."""
        return {"estimator": "rank", "mu": self.mu, "m": self.m, "k": self.k, "legacy": self.legacy}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state)
