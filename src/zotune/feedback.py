"""What a step asks to have evaluated, and the answers it accepts.

A step program's ``ask()`` returns a :class:`Query`: the points of a probe plan and the kind of
answer it needs. ``tell(feedback)`` consumes one of:

* :class:`Losses`: one loss per point (a callable objective, a metric, a reward);
* :class:`Ranking`: the indices of the best ``k`` points, best first (a person ranking outputs
  in a browser page, a reward model that only compares, a program);
* :class:`Edges`: pairwise comparisons ``(better, worse)``;
* :class:`~zotune.plan.DenseGrad`: gradients of the projected tensors, for steps whose search is
  first-order (DiZO-FO);
* :class:`LossesAndGrads`: one loss per point and, at the points the query names, the gradient of
  that loss with respect to ``Query.wrt`` (ElasticZO: ZO for the head, backprop for the tail, from
  the same forward passes).

Losses convert to a ranking and a ranking to edges (the information only gets coarser), so an
estimator that needs a ranking also runs from a callable objective.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from .plan import DenseGrad, ProbePlan

KINDS = ("losses", "ranking", "edges", "grad", "losses+grad")


@dataclass(frozen=True)
class Losses:
    """One loss per point of the plan, in plan order (lower is better)."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.values)

    def ranking(self, k: int | None = None) -> "Ranking":
        """The points ordered by loss, best first (ties by index); non-finite losses rank last."""
        key = lambda i: (self.values[i] if math.isfinite(self.values[i]) else math.inf, i)  # noqa: E731
        order = sorted(range(len(self.values)), key=key)
        return Ranking(tuple(order[:k] if k else order), len(self.values))


@dataclass(frozen=True)
class Ranking:
    """The top ``len(order)`` of ``num_points`` points, best first (a full ranking when equal)."""

    order: tuple[int, ...]
    num_points: int

    def __post_init__(self) -> None:
        order = tuple(int(i) for i in self.order)
        object.__setattr__(self, "order", order)
        if len(set(order)) != len(order) or not all(0 <= i < self.num_points for i in order):
            raise ValueError(f"a ranking lists distinct point indices in 0..{self.num_points - 1}, "
                             f"got {list(order)}")
        if not order:
            raise ValueError("a ranking needs at least one point")

    def edges(self) -> "Edges":
        """Every comparison the ranking implies: ranked before ranked-later, ranked before unranked."""
        rest = [i for i in range(self.num_points) if i not in self.order]
        pairs = [(a, b) for n, a in enumerate(self.order) for b in list(self.order[n + 1:]) + rest]
        return Edges(tuple(pairs), self.num_points)


@dataclass(frozen=True)
class Edges:
    """Pairwise comparisons ``(better, worse)`` among ``num_points`` points."""

    pairs: tuple[tuple[int, int], ...]
    num_points: int

    def __post_init__(self) -> None:
        pairs = tuple((int(a), int(b)) for a, b in self.pairs)
        object.__setattr__(self, "pairs", pairs)
        for a, b in pairs:
            if a == b or not (0 <= a < self.num_points and 0 <= b < self.num_points):
                raise ValueError(f"comparison ({a}, {b}) is not between two of the {self.num_points} points")


@dataclass(frozen=True)
class LossesAndGrads:
    """One loss per point and, per point, the gradient of its loss with respect to the query's
    ``wrt`` tensors (a :class:`~zotune.plan.DenseGrad`), or None where the query did not ask
    for one. It converts to :class:`Losses` (and from there to a ranking or edges)."""

    values: tuple[float, ...]
    grads: tuple[DenseGrad | None, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        object.__setattr__(self, "grads", tuple(self.grads))
        if len(self.grads) != len(self.values):
            raise ValueError(f"LossesAndGrads has {len(self.values)} losses and {len(self.grads)} gradients")

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.values)

    @property
    def losses(self) -> Losses:
        return Losses(self.values)


Feedback = Losses | Ranking | Edges | DenseGrad | LossesAndGrads


def as_kind(feedback, kind: str, num_points: int):
    """``feedback`` in the form ``kind`` needs, converting to coarser forms where possible.

    Raises ValueError naming what was given and what is needed when no conversion exists (a
    ranking cannot become losses)."""
    if isinstance(feedback, LossesAndGrads) and kind != "losses+grad":
        feedback = feedback.losses
    if kind == "losses+grad" and isinstance(feedback, LossesAndGrads):
        pass
    elif kind == "losses" and isinstance(feedback, Losses):
        pass
    elif kind == "ranking" and isinstance(feedback, (Losses, Ranking)):
        feedback = feedback.ranking() if isinstance(feedback, Losses) else feedback
    elif kind == "edges" and isinstance(feedback, (Losses, Ranking, Edges)):
        if isinstance(feedback, Losses):
            feedback = feedback.ranking()
        feedback = feedback.edges() if isinstance(feedback, Ranking) else feedback
    elif kind == "grad" and isinstance(feedback, DenseGrad):
        return feedback
    else:
        raise ValueError(f"this step needs feedback of kind {kind!r}, got {type(feedback).__name__}; "
                         f"valid kinds: {', '.join(KINDS)}")
    size = len(feedback.values) if isinstance(feedback, (Losses, LossesAndGrads)) else feedback.num_points
    if size != num_points:
        raise ValueError(f"feedback covers {size} points, the query has {num_points}")
    return feedback


@dataclass(frozen=True)
class Query:
    """What a step needs evaluated next.

    Attributes:
        plan: the points (``theta + sum_j a_j z_j``, keys regenerated by the engine).
        kind: the feedback it needs: ``losses``, ``ranking``, ``edges`` or ``grad``.
        batch: which data to evaluate on: None is the step's own batch (the closure of
            ``step``); anything else names an auxiliary batch, e.g. ``("search", j)`` for the
            j-th iteration of DiZO's search.
        wrt: for ``grad`` and ``losses+grad`` queries, the layout indices of the tensors to
            differentiate.
        grad_at: for ``losses+grad`` queries, the points (plan indices) whose gradient is wanted.
    """

    plan: ProbePlan
    kind: str = "losses"
    batch: Hashable = None
    wrt: tuple[int, ...] = ()
    grad_at: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown query kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")

    @property
    def num_points(self) -> int:
        return self.plan.num_points


CURRENT = ProbePlan((), ((),))
"""The plan with one point: the parameters as they are."""


@contextlib.contextmanager
def _grad_only(wanted, trainable):
    """``requires_grad`` on ``wanted`` only among ``trainable`` (a superset); flags restored on exit."""
    saved = [(p, p.requires_grad) for p in trainable]
    keep = {id(p) for p in wanted}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def gradient_of(loss_fn, engine, wrt) -> DenseGrad:
    """The answer to a ``grad`` query: ``d loss_fn() / d tensor`` for the layout tensors ``wrt``.

    Grad mode is on for the call, and ``requires_grad`` only on the wanted tensors (which spares
    the activations of the others); ``torch.autograd.grad`` fills no ``.grad`` buffers. A
    non-finite loss answers an empty ``DenseGrad``."""
    wanted = [engine.parameter(i) for i in wrt]
    trainable = [engine.parameter(t.index) for t in engine.layout]
    with torch.enable_grad(), _grad_only(wanted, trainable):
        loss = loss_fn()
        if not (torch.is_tensor(loss) and loss.requires_grad):
            raise RuntimeError("a gradient query needs the objective to return a tensor computed with "
                               "grad enabled; got one without a graph")
        if not torch.isfinite(loss.detach()).all():
            return DenseGrad({})
        grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    return DenseGrad({i: g for i, g in zip(wrt, grads) if g is not None})


def _nonzero(terms) -> tuple:
    return tuple((k, a) for k, a in terms if a != 0.0)


def losses_and_grads(evaluate, objectives, engine, plan: ProbePlan, wrt, grad_at) -> LossesAndGrads:
    r"""The answer to a ``losses+grad`` query: ``evaluate(objective)`` (the engine's walk over
    ``plan``'s points) with an objective that, at the points in ``grad_at``, also differentiates
    the mean of ``objectives`` with respect to the layout tensors ``wrt``.

    Only ``wrt`` have ``requires_grad`` during such a point (:func:`_grad_only`), so autograd
    records the ops downstream of them and nothing upstream: no graph, no stored activation for
    the other tensors (ElasticZO's head). Each micro-batch's graph is freed by its own backward.
    Points not in ``grad_at`` run without grad, as for ``losses``. The point being evaluated is
    read from ``engine.current`` (so an evaluation an engine continues after a stop still
    differentiates the right points), and each answer is plain containers, ``(loss, {index:
    gradient})``, which an engine may keep in its state. Cost per gradient point: one backward
    through the part of the model after the first ``wrt`` tensor."""
    wanted = [engine.parameter(i) for i in wrt]
    trainable = [engine.parameter(t.index) for t in engine.layout]
    points = [_nonzero(plan.point_terms(i)) for i in range(plan.num_points)]
    grad_points = [points[i] for i in sorted(set(grad_at))]

    def objective():
        if _nonzero(engine.current) not in grad_points:
            return float(sum(float(fn()) for fn in objectives) / len(objectives)), None
        total, grads = 0.0, None
        with torch.enable_grad(), _grad_only(wanted, trainable):
            for fn in objectives:
                loss = fn()
                if not (torch.is_tensor(loss) and loss.requires_grad):
                    raise RuntimeError("a losses+grad query needs the objective to return a tensor "
                                       "computed with grad enabled; got one without a graph")
                value = float(loss.detach())
                total += value
                if not math.isfinite(value):
                    return value, {}
                parts = torch.autograd.grad(loss / len(objectives), wanted, allow_unused=True)
                grads = list(parts) if grads is None else [a if b is None else (b if a is None else a + b)
                                                           for a, b in zip(grads, parts)]
        return total / len(objectives), {j: g for j, g in zip(wrt, grads) if g is not None}

    answers = evaluate(objective)
    return LossesAndGrads(tuple(a[0] for a in answers),
                          tuple(None if a[1] is None else DenseGrad(a[1]) for a in answers))
