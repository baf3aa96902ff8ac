"""Estimators: ``plan(key_of) -> ProbePlan`` and ``combine(plan, losses) -> ZOGrad``; pure maths on scalars."""
from .kernel import KernelSPSA
from .spsa import SPSA

__all__ = ["SPSA", "KernelSPSA"]
