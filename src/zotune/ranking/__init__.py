"""Optimisation from rankings: ZO-RankSGD's ask/tell optimizer, oracles and the ``zotune rank`` CLI.

* :class:`RankSGD` and :class:`RankQuery` (``optim.py``): rounds of candidates and their answers;
* oracles (``oracles.py``): :class:`ByValue` (any objective, lower is better), :class:`Noisy`
  (comparisons flipped with a probability), :class:`Display` (display positions back to
  candidate ids);
* the maths: :func:`~zotune.estimators.rank.rank_direction` and ``estimators/rank.py``.
"""
from ..estimators.rank import RankEstimator, dag_weights, edge_weights, rank_direction, ranking_weights
from .optim import RankQuery, RankSGD
from .oracles import ByValue, Display, Noisy, to_candidates

__all__ = ["RankSGD", "RankQuery", "ByValue", "Noisy", "Display", "to_candidates", "RankEstimator",
           "rank_direction", "dag_weights", "edge_weights", "ranking_weights"]
