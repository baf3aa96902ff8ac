r"""``RankSGD``: ZO-RankSGD behind an ask/tell interface for oracles that only rank.

The optimiser is a :class:`~zotune.optim.ZOOptimizer` with the ``ranksgd`` preset (the rank
estimator, ``estimators/rank.py``, and its step programs, ``steps/rank.py``); this class only
gives the rounds a shape a person, a reward model or a program can answer::

    opt = zotune.RankSGD(params, lr=0.05, mu=0.01, m=10, k=10, seed=0)
    query = opt.ask()                   # RankQuery: m candidates around the parameters
    for i in range(len(query)):
        with query.at(i):               # the parameters are candidate i inside the block
            show(render(model))
    opt.tell(ranking=[3, 0, 7])         # the best query.k candidate indices, best first
    # or opt.tell(edges=[(better, worse), ...]); or opt.step(oracle) with a callable oracle

Directions are regenerated from keys by the same engines as every other method, so RankSGD runs
on an LLM at MeZO's memory. ``state_dict()`` holds a pending query: a checkpoint between ``ask``
and ``tell`` resumes exactly (the parameters are saved by the caller, as with any torch
optimizer).
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence

import torch

from ..feedback import Edges, Losses, Query, Ranking
from ..optim import ZOOptimizer
from ..plan import ProbePlan


class RankQuery:
    """One round's candidates: ``len(query)`` points; the answer names the best ``query.k``.

    Attributes:
        round: the number of rounds answered before this one (0-based; a stale answer names an
            older round).
        step: the optimisation step the round belongs to.
        purpose: ``"gradient"`` (m points x + mu xi_i, rank the best k) or ``"search"`` (step
            sizes along the direction and x itself, pick the best one).
        k: how many of the points the answer must name, best first.
        query: the underlying :class:`~zotune.feedback.Query` (plan and kind).
    """

    def __init__(self, opt: "RankSGD", query: Query, *, round: int, step: int, purpose: str, k: int) -> None:
        self._opt, self.query = opt, query
        self.round, self.step, self.purpose, self.k = round, step, purpose, k

    def __len__(self) -> int:
        return self.query.num_points

    @property
    def plan(self) -> ProbePlan:
        return self.query.plan

    @property
    def current(self) -> int | None:
        """The index of the unperturbed point x in a search round (the last), else None."""
        return len(self) - 1 if self.purpose == "search" else None

    def _check_pending(self) -> None:
        if self._opt.pending_round != self.round:
            raise RuntimeError(f"round {self.round} is no longer pending (the optimizer is at round "
                               f"{self._opt.pending_round}); call ask() for the current one")

    @contextlib.contextmanager
    def at(self, i: int):
        """The parameters set to candidate ``i`` inside the block, restored to x after it."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self):
            raise IndexError(f"candidate index {i!r} is not in 0..{len(self) - 1}")
        self._check_pending()
        engine = self._opt.core.engine
        try:
            engine.evaluate(ProbePlan(self.plan.keys, (self.plan.points[i],)), lambda: None)
            yield i
        finally:
            engine.flush()

    @torch.no_grad()
    def evaluate(self, fn: Callable[[], object]) -> list:
        """``fn()`` at every candidate in order (one engine pass), parameters restored after."""
        self._check_pending()
        engine = self._opt.core.engine
        try:
            return engine.evaluate(self.plan, fn)
        finally:
            engine.flush()

    def __repr__(self) -> str:
        return (f"RankQuery(round={self.round}, step={self.step}, purpose={self.purpose!r}, "
                f"points={len(self)}, k={self.k})")


def _param_groups(params):
    """A model, a tensor, tensors, ``named_parameters()`` or param groups, as torch.optim takes them."""
    if isinstance(params, torch.nn.Module):
        return list(params.named_parameters()), params
    if isinstance(params, torch.Tensor):
        return [params], None
    return params, None


class RankSGD(ZOOptimizer):
    r"""ZO-RankSGD (Tang, Rybin and Chang, ICLR 2024): minimise f from rankings of perturbed points.

    Each gradient round shows :math:`y_i = x + \mu \xi_i`, i = 1..m, and is told the best k,
    best first (or pairwise comparisons). With :math:`c_i` = (points known better than i) -
    (points known worse) and E the known comparisons,

    .. math::
        \tilde g = \frac{1}{|E|} \sum_i c_i \xi_i, \qquad x \leftarrow x - \eta\, \tilde g

    (closed form for top-k: position r gets :math:`2r - m + 1`, unranked points :math:`k`). ``mode``
    adds the ranking line search or the authors' human loop (``steps/rank.py``).

    Args:
        params: a model, a tensor, tensors, ``named_parameters()`` or param groups. Plain
            tensors are trained whatever their ``requires_grad``; parameters of a model only if
            they require grad (frozen ones stay frozen).
        lr: step size eta (the largest one a search round tries).
        mu: smoothing radius of the candidates.
        m, k: candidates per gradient round and how many of them are ranked (default m).
        mode: ``plain``, ``line-search`` (A.5) or ``human`` (the authors' loop).
        line_search: step sizes per search round (default 5; ``human``: m - 2); gamma: their ratio.
        momentum: heavy-ball beta over keys; decay: per-step factor on eta.
        adaptive: re-centre the search grid on the chosen step after every search round (not in
            the paper; a fixed grid stalls once all its steps are too long).
        legacy: the authors' code's weights (m - 2r) and extra factor mu.
        seed: run seed (keys of every xi). **options: any other :class:`ZOOptimizer` option
            (``direction``, ``update``, ``schedule``, ``engine``, ...).

    Cost per step: m candidate evaluations (plus l + 1, or l + 2 in ``human`` mode, for the
    search round) and one or two rankings; memory: the parameters (xi regenerated from keys).
    """

    def __init__(self, params, lr: float = 0.05, mu: float = 0.01, m: int = 10, k: int | None = None, *,
                 mode: str = "plain", line_search: int | None = None, gamma: float = 0.5,
                 momentum: float = 0.0, momentum_tol: float = 1e-6, decay: float = 1.0,
                 adaptive: bool = False, legacy: bool = False, seed: int = 0, weight_decay: float = 0.0, **options) -> None:
        params, model = _param_groups(params)
        if model is not None:
            options.setdefault("model", model)
        rank = {"m": m, "k": k, "legacy": legacy, "mode": mode, "line_search": line_search,
                "gamma": gamma, "momentum": momentum, "momentum_tol": momentum_tol, "decay": decay, "adaptive": adaptive}
        super().__init__(params, lr=lr, eps=mu, method="ranksgd", weight_decay=weight_decay, seed=seed,
                         rank=rank, **options)

    @staticmethod
    def _trainable(p: torch.Tensor) -> bool:
        return p.requires_grad or not isinstance(p, torch.nn.Parameter)

    # ------------------------------------------------------------ rounds
    program = property(lambda self: self.core.program)
    rounds = property(lambda self: self.core.program.rounds)
    moves = property(lambda self: self.core.program.moves)
    m = property(lambda self: self.core.estimator.m)
    k = property(lambda self: self.core.estimator.k)
    mu = property(lambda self: self.core.estimator.mu)

    @property
    def pending_round(self) -> int | None:
        """The round a query is pending for (asked, not yet told), else None."""
        return self.core.program.rounds if self.core._asked else None

    def ask(self) -> RankQuery:
        """The pending round's candidates, or the next round's (starting a step when needed).
        Asking again before ``tell`` returns the same round."""
        query = self.core.ask()
        if query is None:  # the last step just finished: start the next
            query = self.core.ask()
        program = self.core.program
        return RankQuery(self, query, round=program.rounds, step=program.step,
                         purpose=program.phase, k=program.wanted(self.core))

    def tell(self, feedback: Ranking | Edges | Losses | Sequence[int] | None = None, *,
             ranking: Sequence[int] | None = None, edges: Sequence[tuple[int, int]] | None = None,
             losses: Sequence[float] | None = None, round: int | None = None) -> None:
        """Answer the pending round with one of: ``ranking`` (candidate indices, best first, at
        least ``query.k`` of them), ``edges`` (``(better, worse)`` pairs; gradient rounds only),
        ``losses`` (one value per candidate, lower is better; cut to the top k) or a
        ``Ranking``/``Edges``/``Losses`` object. ``round`` (optional) must name the pending round:
        a stale answer is refused and changes nothing."""
        given = [x for x in (feedback, ranking, edges, losses) if x is not None]
        if len(given) != 1:
            raise ValueError("tell() takes exactly one of: a feedback object, ranking=, edges=, losses=")
        if self.pending_round is None:
            raise RuntimeError("tell() needs a pending query: call ask() first")
        if round is not None and round != self.pending_round:
            raise ValueError(f"the answer is for round {round}, the pending round is {self.pending_round}")
        n = self.core.program.plan(self.core).num_points
        if ranking is not None or (feedback is not None and not isinstance(feedback, (Ranking, Edges, Losses))):
            order = ranking if ranking is not None else feedback
            feedback = Ranking(tuple(_index(i) for i in order), n)
        elif edges is not None:
            feedback = Edges(tuple((_index(a), _index(b)) for a, b in edges), n)
        elif losses is not None:
            feedback = Losses(tuple(losses))
        self.core.tell(feedback)
        self.core.ask()  # the next round of this step is pending now, or the step is closed

    @torch.no_grad()
    def step(self, oracle: Callable | None = None) -> float:
        """One whole step: ``oracle(query)`` answers every round (a ``Ranking``, ``Edges``,
        ``Losses`` or a list of indices, best first); a callable of no arguments is a loss
        closure instead, ranked by value (lower is better). Returns the step's value where the
        answers carried values (the chosen point's in a search, else the candidates' mean), nan
        otherwise."""
        if oracle is None:
            raise ValueError("RankSGD.step needs an oracle: oracle(query) -> ranking, or a loss closure")
        closure = _takes_no_arguments(oracle)
        while True:
            query = self.ask()  # continues a step whose round is pending, else starts one
            answer = Losses(query.evaluate(oracle)) if closure else oracle(query)
            self.core.forward_passes += len(query)
            self.tell(answer)
            if self.core.idle:
                return self.core.last_result


def _index(i) -> int:
    if isinstance(i, bool) or int(i) != i:
        raise ValueError(f"a candidate index is an integer, got {i!r}")
    return int(i)


def _takes_no_arguments(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                   and p.default is p.empty for p in params)
