"""zotune: zeroth-order training and fine-tuning from forward passes only."""
from .directions import Gaussian, Pooled, Rademacher, Uniform, make_direction
from .errors import ZotuneError
from .estimators import SPSA
from .optim import METHODS, ZOOptimizer
from .plan import ProbePlan, ZOGrad

__version__ = "0.1.0"

__all__ = ["ZOOptimizer", "METHODS", "SPSA", "ProbePlan", "ZOGrad", "Gaussian", "Pooled",
           "Rademacher", "Uniform", "make_direction", "ZotuneError", "__version__"]
