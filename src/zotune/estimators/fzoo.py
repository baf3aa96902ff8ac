r"""FZOO: one-sided n-probe estimates normalised by the spread of the perturbed losses.

Dang et al., "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language Models towards
Adam-Scale Speed", ICLR 2026 (arXiv 2506.09034); research/fzoo.md. With N directions u_i
(Rademacher in the paper) and the unperturbed loss :math:`l_0` of the same batch:

.. math::
    l_i = L(\theta + \epsilon u_i), \qquad
    \sigma = \mathrm{std}(l_1, \dots, l_N), \qquad
    \hat g = \frac{1}{N\,\sigma\,m} \sum_{i=1}^{N} (l_i - l_0)\, u_i \;\times
        \begin{cases} 1/\epsilon & \text{paper} \\ 1 & \text{code} \end{cases}

Since :math:`l_i - l_0 \approx \epsilon u_i^\top \nabla L` and :math:`\sigma \approx \epsilon
\|\nabla L\|`, the code's step is normalised SGD along a random projection,
:math:`\theta \leftarrow \theta - \eta P \nabla L / \|\nabla L\|` with :math:`E[P] = I`: its length
does not depend on eps or on the scale or offset of the loss (research/fzoo.md, section 2).

Forms (research/fzoo.md, section 1.3): ``scale="paper"`` divides by eps and ``std_ddof=1`` is the
paper's sample std; ``scale="code"`` and ``std_ddof=0`` (population std) are the released code's.
A step whose sigma is not finite or not above ``sigma_floor * max(1, |l_0|)`` (all losses tied, a
saturated or quantised loss) is declined (``combine`` returns None) and the step is skipped and
counted, where the code would divide by zero.

Cost: N + 1 forward passes per step (the centre first, so each move between probes is one sweep
and the last restore is fused with the update); the N contributions are applied in the same
single update sweep (summed per chunk in the fp32 master for low-precision tensors), not in N.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

from ..plan import ProbePlan, ZOGrad
from .spsa import check_settings

SCALES = ("paper", "code")


class FZOO:
    """FZOO's normalised one-sided estimator (see the module docstring for the maths).

    Args:
        eps: perturbation scale (> 0); the paper's examples use 1e-3 and 1e-4.
        num_probes: N >= 2 perturbed points per step (8 in the paper); below 4 the step is
            heavy-tailed (two nearly tied losses make sigma tiny), which is warned about.
        std_ddof: 0 (population std, the code) or 1 (sample std, the paper's formula).
        scale: ``paper`` (the step carries 1/eps) or ``code`` (it does not: lr and eps decouple).
        sigma_floor: relative floor on sigma below which the step is skipped.
    """

    feedback = "losses"
    one_sided = True

    def __init__(self, eps: float = 1e-3, num_probes: int = 8, *, std_ddof: int = 1,
                 scale: str = "paper", sigma_floor: float = 1e-12) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if isinstance(num_probes, bool) or int(num_probes) != num_probes or num_probes < 2:
            raise ValueError(f"FZOO normalises by the spread of the N perturbed losses, so num_probes "
                             f"must be an integer >= 2, got {num_probes}")
        if std_ddof not in (0, 1):
            raise ValueError(f"std_ddof must be 0 (population) or 1 (sample), got {std_ddof!r}")
        if scale not in SCALES:
            raise ValueError(f"unknown FZOO scale {scale!r}; valid: {', '.join(SCALES)}")
        if not sigma_floor >= 0:
            raise ValueError(f"sigma_floor must be >= 0, got {sigma_floor}")
        if num_probes < 4:
            warnings.warn(f"FZOO with num_probes={num_probes} is heavy-tailed (research/fzoo.md 5.3); "
                          "4 or more is safer", stacklevel=2)
        self.eps, self.num_probes = float(eps), int(num_probes)
        self.std_ddof, self.scale, self.sigma_floor = std_ddof, scale, float(sigma_floor)

    @property
    def forward_passes(self) -> int:
        return self.num_probes + 1

    def plan(self, key_of: Callable[[int], int], step: int = 0) -> ProbePlan:
        """The centre first, then theta + eps u_i for each probe."""
        keys = tuple(key_of(j) for j in range(self.num_probes))
        return ProbePlan(keys, ((),) + tuple(((j, self.eps),) for j in range(self.num_probes)))

    def sigma(self, perturbed: Sequence[float]) -> float:
        n = len(perturbed)
        mean = sum(perturbed) / n
        return math.sqrt(sum((v - mean) ** 2 for v in perturbed) / (n - self.std_ddof))

    def combine(self, plan: ProbePlan, losses: Sequence[float], second_moment: float = 1.0,
                step: int = 0) -> ZOGrad | None:
        """The normalised estimate, or None (skip the step) when sigma is degenerate."""
        base, perturbed = losses[0], list(losses[1:])
        sigma = self.sigma(perturbed)
        if not (math.isfinite(sigma) and sigma > self.sigma_floor * max(1.0, abs(base))):
            return None
        scale = 1.0 / (self.num_probes * sigma * second_moment)
        if self.scale == "paper":
            scale /= self.eps
        return ZOGrad(tuple((plan.keys[j], (v - base) * scale) for j, v in enumerate(perturbed)))

    def state_dict(self) -> dict:
        """The settings (no state evolves), checked on load."""
        return {"estimator": "fzoo", "eps": self.eps, "num_probes": self.num_probes,
                "std_ddof": self.std_ddof, "scale": self.scale, "sigma_floor": self.sigma_floor}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state)
