"""Estimators: ``plan(key_of) -> ProbePlan`` and ``combine(plan, losses) -> ZOGrad``; pure maths on scalars."""
from .spsa import SPSA

__all__ = ["SPSA"]
