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

from .. import rng
from ..plan import ProbePlan, ZOGrad

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
    """Kernel-weighted two-sided SPSA (KerZOO, paper form). See the module docstring.

    Args:
        eps: perturbation scale (> 0).
        order: kernel order, 1, 3 (KerZOO's default) or 5.
        num_probes: probes per step.
        schedule: interval schedule, ``constant`` (default), ``linear`` or ``harmonic``.
        s0, shrink_steps, s_min: the schedule's parameters.
    """

    def __init__(self, eps: float = 1e-3, order: int = 3, num_probes: int = 1, *,
                 schedule: str = "constant", s0: float = 1.0, shrink_steps: int = 4000,
                 s_min: float = 1e-4) -> None:
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
        self.eps, self.order, self.num_probes = float(eps), order, int(num_probes)
        self.schedule, self.s0, self.shrink_steps, self.s_min = schedule, s0, shrink_steps, s_min
        self.one_sided = False

    @property
    def forward_passes(self) -> int:
        return 2 * self.num_probes

    def _scale(self, step: int) -> float:
        return self.eps * interval(self.schedule, step, s0=self.s0, shrink_steps=self.shrink_steps,
                                   s_min=self.s_min)

    def plan(self, key_of: Callable[[int], int], step: int = 0) -> ProbePlan:
        keys = tuple(key_of(j) for j in range(self.num_probes))
        scale = self._scale(step)
        points = []
        for j, key in enumerate(keys):
            a = scale * probe_scalar(key)
            points += [((j, a),), ((j, -a),)]
        return ProbePlan(keys, tuple(points))

    def combine(self, plan: ProbePlan, losses: Sequence[float], second_moment: float = 1.0,
                step: int = 0) -> ZOGrad:
        kernel, scale = KERNELS[self.order], self._scale(step)
        norm = 1.0 / (self.num_probes * second_moment)
        terms = []
        for j, key in enumerate(plan.keys):
            diff = (losses[2 * j] - losses[2 * j + 1]) / (2 * scale)
            terms.append((key, diff * kernel(probe_scalar(key)) * norm))
        return ZOGrad(tuple(terms))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
