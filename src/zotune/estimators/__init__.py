"""Estimators: ``plan(key_of) -> ProbePlan`` and ``combine(plan, feedback) -> gradient`` (or None to
skip the step); pure maths on scalars."""
from .cge import CGE
from .fzoo import FZOO
from .kernel import KernelSPSA
from .spsa import SPSA

__all__ = ["SPSA", "KernelSPSA", "FZOO", "CGE"]
