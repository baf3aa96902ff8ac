"""Step programs (ask/tell state machines) and the core that runs them."""
from .coordinate import CoordinateStep
from .core import StepCore
from .elastic import ElasticStep
from .estimate import ConservativeStep, EstimateStep
from .search import ProjectionStep

__all__ = ["StepCore", "EstimateStep", "ConservativeStep", "ElasticStep", "ProjectionStep", "CoordinateStep"]
