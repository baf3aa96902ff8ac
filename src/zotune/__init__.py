"""zotune: zeroth-order training and fine-tuning from forward passes only."""
from .directions import Gaussian, Pooled, Rademacher, Uniform, make_direction
from .engines import ENGINES, InMemoryEngine, ReferenceEngine
from .errors import ZotuneError
from .estimators import SPSA
from .feedback import Edges, Losses, Query, Ranking
from .layout import ParamLayout
from .optim import METHODS, ZOOptimizer
from .plan import DenseGrad, ProbePlan, SparseGrad, ZOGrad
from .ranking import RankSGD

__version__ = "0.1.0"

__all__ = ["ZOOptimizer", "METHODS", "SPSA", "ProbePlan", "ZOGrad", "SparseGrad", "DenseGrad",
           "Losses", "Ranking", "Edges", "Query", "ParamLayout", "ENGINES", "InMemoryEngine",
           "ReferenceEngine", "Gaussian", "Pooled", "Rademacher", "Uniform", "make_direction",
           "ZotuneError", "RankSGD", "__version__"]
