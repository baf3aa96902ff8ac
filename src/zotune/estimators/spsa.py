"""SPSA: simultaneous-perturbation finite differences along random directions."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from ..plan import ProbePlan, ZOGrad


class SPSA:
    r"""n-probe SPSA, two-sided (MeZO) or one-sided.

    Two-sided, with directions of second moment :math:`m` (E[z z^T] = m I):

    .. math::
        \hat g = \frac{1}{n m} \sum_{j=1}^{n} \frac{L(\theta + \epsilon z_j) - L(\theta - \epsilon z_j)}{2\epsilon} z_j

    One-sided: :math:`\frac{1}{n m} \sum_j \frac{L(\theta + \epsilon z_j) - L(\theta)}{\epsilon} z_j`.

    What it estimates: :math:`\nabla L` up to :math:`O(\epsilon^2)` (two-sided; exact on quadratics)
    or :math:`O(\epsilon)` (one-sided); precisely, the gradient of the Gaussian-smoothed loss for
    Gaussian z. Cost: 2n forward passes (two-sided) or n + 1 (one-sided); no memory beyond the
    parameters. Reference: Spall (1992); MeZO, Malladi et al. (2023), Algorithms 1 and 2.

    Args:
        eps: perturbation scale :math:`\epsilon` (> 0). MeZO uses 1e-3 for full fine-tuning.
        num_probes: directions per step, n >= 1. MeZO's n-SPSA averages their estimates.
        one_sided: use the forward difference against the unperturbed loss.
    """

    feedback = "losses"

    def __init__(self, eps: float = 1e-3, num_probes: int = 1, one_sided: bool = False) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if int(num_probes) != num_probes or num_probes < 1:
            raise ValueError(f"num_probes must be an integer >= 1, got {num_probes}")
        self.eps = float(eps)
        self.num_probes = int(num_probes)
        self.one_sided = bool(one_sided)

    @property
    def forward_passes(self) -> int:
        return self.num_probes + 1 if self.one_sided else 2 * self.num_probes

    def plan(self, key_of: Callable[[int], int], step: int = 0) -> ProbePlan:
        """Points to evaluate; ``key_of(j)`` gives probe j's direction key."""
        keys = tuple(key_of(j) for j in range(self.num_probes))
        if self.one_sided:
            points = ((),) + tuple(((j, self.eps),) for j in range(self.num_probes))
        else:
            points = tuple(p for j in range(self.num_probes)
                           for p in (((j, self.eps),), ((j, -self.eps),)))
        return ProbePlan(keys, points)

    def combine(self, plan: ProbePlan, losses: Sequence[float], second_moment: float = 1.0,
                step: int = 0) -> ZOGrad:
        """The estimate from the losses at ``plan``'s points, in the same order."""
        n, scale = self.num_probes, 1.0 / (self.num_probes * second_moment)
        if self.one_sided:
            base = losses[0]
            coeffs = [(losses[1 + j] - base) / self.eps for j in range(n)]
        else:
            coeffs = [(losses[2 * j] - losses[2 * j + 1]) / (2 * self.eps) for j in range(n)]
        return ZOGrad(tuple((plan.keys[j], c * scale) for j, c in enumerate(coeffs)))

    def state_dict(self) -> dict:
        """No state evolves (the estimate is a function of the step's losses); the settings are
        saved so a checkpoint is not continued with another estimator."""
        return {"estimator": "spsa", "eps": self.eps, "num_probes": self.num_probes,
                "one_sided": self.one_sided}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state)


def check_settings(estimator, state: dict) -> None:
    """Raise ValueError if a saved estimator's settings differ from ``estimator``'s."""
    mine = estimator.state_dict()
    diff = [k for k in mine if k in state and state[k] != mine[k]]
    if diff:
        raise ValueError("state dict was made with another estimator: " + ", ".join(
            f"{k}={state[k]!r} (here {mine[k]!r})" for k in diff))
