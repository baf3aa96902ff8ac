r"""KerZOO: kernel-weighted two-point estimates that cancel the O(eps^2) bias of SPSA.

Scaling each probe's perturbation by a random scalar r and weighting its finite difference by a
kernel K(r) with :math:`E[rK(r)] = 1` and :math:`E[r^3 K(r)] = 0` keeps the first-order term and
removes the third-order one from the Taylor expansion of the central difference
(research/kerzoo_dizo.md, section 2.1):

.. math::
    \hat g = \frac{1}{n m} \sum_{j=1}^{n}
        \frac{L(\theta + \epsilon s r_j u_j) - L(\theta - \epsilon s r_j u_j)}{2 \epsilon s}\, K(r_j)\, u_j,
    \qquad r_j \sim U(-1, 1)

so :math:`E[\hat g] = \nabla L + O(\epsilon^4)` (exactly :math:`\nabla L` for quartics), at the price
of a larger variance (about 6.25x MeZO's for the order-3 kernel). ``s = s_t`` is the interval
schedule; with this ("paper") normalisation the cancellation holds for every s.

Cost: 2n forward passes, no memory beyond MeZO's: r_j is a function of the probe key, so the
direction and its weight are regenerated, never stored.

Kernels are Legendre-based and normalised so that E[rK] = 1 (the order-5 coefficient is 105/64,
not the misprinted 195/64). Reference: Mi et al., "KerZOO", arXiv 2505.18886 (2025).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .. import rng
from ..plan import ProbePlan, ZOGrad, map_coef
from .spsa import check_settings

KERNELS: dict[int, Callable[[float], float]] = {
    1: lambda r: 3.0 * r,
    3: lambda r: 3.75 * r * (5.0 - 7.0 * r * r),
    5: lambda r: (105.0 / 64.0) * r * (99.0 * r**4 - 126.0 * r * r + 35.0),
}
SCHEDULES = ("constant", "linear", "harmonic")


def interval(schedule: str, step: int, *, s0: float = 1.0, shrink_steps: int = 4000,
             s_min: float = 1e-4) -> float:
    """Half-width s_t of the perturbation interval: ``constant`` s0; ``linear``
    max(s0 - t / shrink_steps, s_min) (the authors' code); ``harmonic`` 1 / (ceil((t+1)/500) + 1)
    (their older code)."""
    if schedule == "constant":
        return s0
    if schedule == "linear":
        return max(s0 - step / shrink_steps, s_min)
    return 1.0 / (-(-(step + 1) // 500) + 1)


def probe_scalar(key: int) -> float:
    """r ~ U(-1, 1) from a probe key (53 random bits; independent of the direction's numbers)."""
    return 2.0 * ((rng.mix(key, 0x4B45524E) >> 10) / 2.0**53) - 1.0


class KernelSPSA:
    r"""Kernel-weighted two-sided SPSA (KerZOO). See the module docstring for the maths.

    Options reproduce either the paper or the authors' released code
    (research/kerzoo_dizo.md, sections 2.3-2.5):

    * ``r_sharing="probe"`` (paper): one r per probe, shared by every tensor; ``"tensor"`` (code):
      an independent r for each (probe, tensor). Per-tensor r keeps the first-order term unbiased
      and cancels only within-tensor third-order terms.
    * ``normalization="paper"``: perturb by :math:`\epsilon s r`, divide the difference by
      :math:`2\epsilon s`, weight by K(r): unbiased to first order and third-order-free for every
      interval s. ``"code"``: perturb by :math:`\epsilon k` with :math:`k = s r \sim U(-s, s)`,
      divide by :math:`2\epsilon`, weight by ``code_scale * K(k)`` (the code's 15k(5 - 7k^2) is
      4x the normalised order-3 kernel). Its first-order gain is E[k K_code(k)] = 25s^2 - 21s^4
      (4 at s = 1, peak 7.4 near s = 0.77, 0 as s -> 0): a hidden learning-rate schedule, and the
      third-order term cancels only at s = 1.

    Args:
        eps: perturbation scale (> 0).
        order: kernel order, 1, 3 (KerZOO's default) or 5.
        num_probes: probes per step (the code uses 3).
        schedule: interval schedule, ``constant`` (default), ``linear`` or ``harmonic``.
        s0, shrink_steps, s_min: the schedule's parameters.
        r_sharing: ``probe`` (default) or ``tensor``.
        normalization: ``paper`` (default) or ``code``.
        code_scale: kernel multiplier under ``code`` normalisation (4, as the released code).
    """

    feedback = "losses"
    R_SHARING = ("probe", "tensor")
    NORMALIZATIONS = ("paper", "code")

    def __init__(self, eps: float = 1e-3, order: int = 3, num_probes: int = 1, *,
                 schedule: str = "constant", s0: float = 1.0, shrink_steps: int = 4000,
                 s_min: float = 1e-4, r_sharing: str = "probe", normalization: str = "paper",
                 code_scale: float = 4.0) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if order not in KERNELS:
            raise ValueError(f"kernel order must be one of {sorted(KERNELS)}, got {order!r}")
        if int(num_probes) != num_probes or num_probes < 1:
            raise ValueError(f"num_probes must be an integer >= 1, got {num_probes}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown interval schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if not 0 < s_min <= s0:
            raise ValueError(f"need 0 < s_min <= s0, got s_min={s_min}, s0={s0}")
        if not shrink_steps > 0:
            raise ValueError(f"shrink_steps must be > 0, got {shrink_steps}")
        if r_sharing not in self.R_SHARING:
            raise ValueError(f"unknown r_sharing {r_sharing!r}; valid: {', '.join(self.R_SHARING)}")
        if normalization not in self.NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; valid: "
                             f"{', '.join(self.NORMALIZATIONS)}")
        self.eps, self.order, self.num_probes = float(eps), order, int(num_probes)
        self.schedule, self.s0, self.shrink_steps, self.s_min = schedule, s0, shrink_steps, s_min
        self.r_sharing, self.normalization, self.code_scale = r_sharing, normalization, code_scale
        self.one_sided = False
        self.tensor_ids: tuple[int, ...] = ()

    def bind(self, tensor_ids) -> None:
        """The ids of the trainable tensors (``rng.name_id`` of their names), for per-tensor r."""
        self.tensor_ids = tuple(tensor_ids)

    @property
    def forward_passes(self) -> int:
        return 2 * self.num_probes

    def interval(self, step: int) -> float:
        """Half-width s_t of the interval of r at ``step``."""
        return interval(self.schedule, step, s0=self.s0, shrink_steps=self.shrink_steps,
                        s_min=self.s_min)

    def _r(self, key: int):
        """r ~ U(-1, 1) of a probe: a float, or ``{tensor id: r}`` when drawn per tensor."""
        if self.r_sharing == "probe":
            return probe_scalar(key)
        if not self.tensor_ids:
            raise RuntimeError("r_sharing='tensor' needs bind(tensor_ids) before plan()")
        return {t: probe_scalar(rng.mix(key, t)) for t in self.tensor_ids}

    def _point_and_weight(self, r: float, s: float) -> tuple[float, float]:
        """(perturbation coefficient a, weight w) of one r: the estimate adds (L+ - L-) * w * z."""
        kernel = KERNELS[self.order]
        if self.normalization == "paper":
            return self.eps * s * r, kernel(r) / (2 * self.eps * s)
        k = s * r
        return self.eps * k, self.code_scale * kernel(k) / (2 * self.eps)

    def gain_moments(self, step: int = 0) -> tuple[float, float]:
        r"""(E[g], E[g^2]) over r ~ U(-1, 1) of a probe's first-order gain g = 2 a(r) w(r): to
        first order in eps a probe adds :math:`g(r)\,(u^\top \nabla L)\,u`, where MeZO adds g = 1.

        The paper's normalisation has E[g] = 1 (unbiased) and E[g^2] = 1.8, 6.25 and 13.25 for
        orders 1, 3 and 5; the code's has 4 and 100 at s = 1 (its E[g] is the hidden schedule
        25 s^2 - 21 s^4). Exact: g^2 is a polynomial of degree 2 (order + 1) <= 12 in r,
        integrated by 8-point Gauss-Legendre."""
        nodes, weights = np.polynomial.legendre.leggauss(8)
        s = self.interval(step)
        mean = second = 0.0
        for r, weight in zip(nodes, weights):
            a, w = self._point_and_weight(float(r), s)
            gain = 2.0 * a * w
            mean += 0.5 * weight * gain
            second += 0.5 * weight * gain * gain
        return mean, second

    def _per_probe(self, key: int, step: int, which: int):
        s, r = self.interval(step), self._r(key)
        if isinstance(r, dict):
            return {t: self._point_and_weight(v, s)[which] for t, v in r.items()}
        return self._point_and_weight(r, s)[which]

    def plan(self, key_of: Callable[[int], int], step: int = 0) -> ProbePlan:
        keys = tuple(key_of(j) for j in range(self.num_probes))
        points = []
        for j, key in enumerate(keys):
            a = self._per_probe(key, step, 0)
            minus = {t: -v for t, v in a.items()} if isinstance(a, dict) else -a
            points += [((j, a),), ((j, minus),)]
        return ProbePlan(keys, tuple(points))

    def combine(self, plan: ProbePlan, losses: Sequence[float], second_moment: float = 1.0,
                step: int = 0) -> ZOGrad:
        norm = 1.0 / (self.num_probes * second_moment)
        terms = []
        for j, key in enumerate(plan.keys):
            diff = (losses[2 * j] - losses[2 * j + 1]) * norm
            terms.append((key, map_coef(self._per_probe(key, step, 1), lambda w, d=diff: d * w)))
        return ZOGrad(tuple(terms))

    def state_dict(self) -> dict:
        """The settings (r is a function of the probe key, the interval of the step): saved so a
        checkpoint is not continued with another kernel or schedule."""
        return {"estimator": "kernel", "eps": self.eps, "order": self.order, "num_probes": self.num_probes,
                "schedule": self.schedule, "s0": self.s0, "shrink_steps": self.shrink_steps,
                "s_min": self.s_min, "r_sharing": self.r_sharing, "normalization": self.normalization,
                "code_scale": self.code_scale}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state)
