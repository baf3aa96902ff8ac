"""Ranking oracles: programs that answer a :class:`~zotune.ranking.RankQuery`.

An oracle is ``oracle(query) -> Ranking | Edges | Losses``. Here: the value-function oracle (an
(m, k) oracle for any objective, lower is better), a noisy one (each comparison flipped with a
probability, for robustness tests), and the mapping between the random order a person sees the
candidates in and the candidate ids (the authors' demo forgot it in its gradient rounds:
research ranksgd_deepzero.md, A.5).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from .. import rng
from ..feedback import Edges, Ranking

NOISE_TAG = 0x4E4F495345  # keys the noisy oracle's coin flips apart from every direction
DISPLAY_TAG = 0x444953504C  # keys display orders


def _finite(v: float) -> float:
    return v if math.isfinite(v) else math.inf


class ByValue:
    """The (m, k) ranking oracle of a value function: the best ``query.k`` candidates by
    ``fn()`` evaluated at each (lower is better; ``maximize=True`` for returns or rewards).

    ``fn`` takes no argument and reads the parameters as they are (the query sets them). Ties go
    to the lower index, non-finite values rank last. ``last_values`` keeps the values of the
    last call (in the objective's own sign), ``calls`` and ``evaluations`` count the work.
    """

    def __init__(self, fn: Callable[[], object], *, maximize: bool = False) -> None:
        self.fn, self.maximize = fn, bool(maximize)
        self.last_values: list[float] = []
        self.calls = self.evaluations = 0

    def values(self, query) -> list[float]:
        values = [float(v) for v in query.evaluate(self.fn)]
        self.last_values, self.calls, self.evaluations = values, self.calls + 1, self.evaluations + len(values)
        return [-v if self.maximize else v for v in values]

    def __call__(self, query) -> Ranking:
        losses = self.values(query)
        order = sorted(range(len(losses)), key=lambda i: (_finite(losses[i]), i))
        return Ranking(tuple(order[:query.k]), len(losses))


class Noisy(ByValue):
    """A value oracle whose comparisons are each wrong with probability ``flip``.

    ``form="ranking"`` (default; every round): the candidates are sorted with a comparator that
    inverts each pair's true order with probability ``flip`` (one coin per pair and round, so the
    answers are reproducible), and the best ``query.k`` returned. ``form="edges"``: gradient
    rounds answer every comparison a true top-k ranking implies, each reversed with probability
    ``flip`` (exactly the flipped-comparison model); search rounds answer a noisy ranking.
    """

    FORMS = ("ranking", "edges")

    def __init__(self, fn: Callable[[], object], flip: float = 0.1, *, seed: int = 0,
                 maximize: bool = False, form: str = "ranking") -> None:
        super().__init__(fn, maximize=maximize)
        if not 0 <= flip <= 1:
            raise ValueError(f"flip (the probability a comparison is wrong) must be in [0, 1], got {flip!r}")
        if form not in self.FORMS:
            raise ValueError(f"unknown noisy-oracle form {form!r}; valid: {', '.join(self.FORMS)}")
        self.flip, self.seed, self.form = float(flip), int(seed), form
        self.flipped = self.compared = 0

    def _coin(self, round: int, a: int, b: int) -> bool:
        lo, hi = min(a, b), max(a, b)
        u = (rng.mix(self.seed, NOISE_TAG, round, lo, hi) >> 10) / 2.0 ** 53
        return u < self.flip

    def __call__(self, query):
        losses = self.values(query)
        true = lambda a, b: (_finite(losses[a]), a) < (_finite(losses[b]), b)  # noqa: E731
        if self.form == "edges" and query.purpose == "gradient":
            order = sorted(range(len(losses)), key=lambda i: (_finite(losses[i]), i))
            pairs = Ranking(tuple(order[:query.k]), len(losses)).edges().pairs
            flips = [self._coin(query.round, a, b) for a, b in pairs]
            self.flipped, self.compared = self.flipped + sum(flips), self.compared + len(pairs)
            return Edges(tuple((b, a) if f else (a, b) for (a, b), f in zip(pairs, flips)), len(losses))

        def compare(a: int, b: int) -> int:
            better = true(a, b)
            flipped = self._coin(query.round, a, b)
            self.flipped, self.compared = self.flipped + flipped, self.compared + 1
            return -1 if better != flipped else 1

        order = sorted(range(len(losses)), key=functools.cmp_to_key(compare))
        return Ranking(tuple(order[:query.k]), len(losses))


class Display:
    """The random order a round's candidates are shown in, and the way back to candidate ids.

    ``order[p]`` is the candidate shown at display position p (a permutation drawn from
    ``(seed, round)``, so a restarted page shows the same order). :meth:`to_candidates` turns
    the positions a person picked, best first, into candidate ids for ``tell(ranking=...)``.
    """

    def __init__(self, num_points: int, seed: int = 0, round: int = 0) -> None:
        if isinstance(num_points, bool) or int(num_points) != num_points or num_points < 1:
            raise ValueError(f"num_points must be an integer >= 1, got {num_points!r}")
        gen = rng.generator(rng.mix(seed, DISPLAY_TAG, round))
        self.order: tuple[int, ...] = tuple(torch.randperm(int(num_points), generator=gen).tolist())
        self.position_of = {c: p for p, c in enumerate(self.order)}

    def __len__(self) -> int:
        return len(self.order)

    def to_candidates(self, positions: Sequence[int]) -> tuple[int, ...]:
        """Candidate ids of display ``positions`` (best first); a duplicate or unknown position is a
        ValueError naming it."""
        return to_candidates(self.order, positions)

    def to_positions(self, candidates: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.position_of[int(c)] for c in candidates)


def to_candidates(order: Sequence[int], positions: Sequence[int]) -> tuple[int, ...]:
    """Map display positions (best first) back to candidate ids through ``order`` (``order[p]``
    is the candidate shown at position p)."""
    seen, out = set(), []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < len(order):
            raise ValueError(f"display position {p!r} is not one of 0..{len(order) - 1}")
        if p in seen:
            raise ValueError(f"display position {p} is listed twice")
        seen.add(p)
        out.append(int(order[p]))
    return tuple(out)
