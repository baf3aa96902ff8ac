r"""Coordinate shards: a CGE step's coordinates divided among point-parallel ranks.

DeepZero's forward parallelisation (research note B.6) through the point-parallel mode
(``--parallel pertp``): the sparse-CGE sum splits into disjoint coordinate groups,
:math:`\hat g = \sum_r \hat g_r`, and every rank

1. evaluates the base point and its own contiguous shard of the plan's coordinates
   (``engines/coordinates.py``: one at a time, or batched by a ``QueryBatchLoss``), all ranks on
   the same batch;
2. all-gathers the losses over its ``pertp`` group (float64 scalars: ``8 (1 + max shard)``
   bytes per rank and step) and checks that every rank saw the same base loss (a different batch
   or model on some rank is a :class:`RankFailure`, not a silent divergence);
3. returns the full loss vector, so the step program forms the same gradient on every rank and
   each applies the identical update: no parameter, gradient or mask travels.

The shards are contiguous runs of the plan (coordinates of one block stay together, so each rank
restarts its forwards from few cached blocks) of equal *measured* cost, not equal count: a
coordinate of an early block reruns more of the network than one of the head. The cost of a
coordinate is the CPU time per coordinate of its tensor, measured while evaluating (from the
second step on: the first pays one-time costs); the ranks all-gather their measurements (2
float64 per tensor, only while some tensor of the plan has none)
so they agree on the costs and cut the same shards. A tensor not measured yet costs the mean of
those measured (1 when none is: the first step splits by count). The costs are kept by tensor,
so when the masks are redrawn the new plan is cut by the same costs (research note B.10: rebuild
the shards when the mask changes; time the blocks on the hardware rather than hard-coding them).

Exactness: each coordinate's loss depends only on the parameters and the batch, not on which
rank evaluated it or what it evaluated before (feature reuse and batched queries are exact up to
the stated tolerance, and equal to one-at-a-time bitwise where the tests say so), so the sharded
step equals the single-process one (tests/test_cge_parallel.py).
"""
from __future__ import annotations

import torch

from ..engines.coordinates import CoordinatePlan
from ..engines.coordinates import evaluate as evaluate_local
from .topology import RankFailure


class CoordinateShards:
    """Per-tensor costs and the cut of a plan into equal-cost contiguous shards."""

    def __init__(self) -> None:
        self.cost: dict[int, float] = {}  # layout index -> seconds per coordinate
        self.last: list[range] = []  # the ranges of the last plan evaluated
        self.plans = 0  # plans evaluated

    def weights(self, plan: CoordinatePlan) -> torch.Tensor:
        known = list(self.cost.values())
        default = sum(known) / len(known) if known else 1.0
        return torch.tensor([self.cost.get(t, default) for t, _ in plan.coords], dtype=torch.float64)

    def split(self, plan: CoordinatePlan, ranks: int, align: int = 1) -> list[range]:
        """``ranks`` contiguous ranges of ``plan.coords`` of about equal total cost: range r ends
        where the cumulative cost is closest to ``(r + 1) / ranks`` of the total,
        moved to the nearest multiple of ``align`` from the start of its tensor's run (so a
        batched objective with a fixed P groups the coordinates as in one process)."""
        n = len(plan.coords)
        if n == 0 or ranks == 1:
            return [range(n)] + [range(n, n)] * (ranks - 1)
        cum = torch.cumsum(self.weights(plan), 0)
        total = float(cum[-1])
        def nearest(target: float) -> int:  # the cut whose cost before it is closest to target
            j = int(torch.searchsorted(cum, target).item())
            before = lambda c: float(cum[c - 1]) if c > 0 else 0.0  # noqa: E731
            return min((c for c in (j, j + 1) if c <= n), key=lambda c: (abs(before(c) - target), c))

        cuts = [0] + [self._snap(plan, nearest(total * (r + 1) / ranks), align) for r in range(ranks - 1)] + [n]
        cuts = [min(max(c, 0), n) for c in cuts]
        for r in range(1, len(cuts)):  # monotone
            cuts[r] = max(cuts[r], cuts[r - 1])
        return [range(cuts[r], cuts[r + 1]) for r in range(ranks)]

    @staticmethod
    def _snap(plan: CoordinatePlan, cut: int, align: int) -> int:
        coords, n = plan.coords, len(plan.coords)
        if align <= 1 or cut <= 0 or cut >= n or coords[cut - 1][0] != coords[cut][0]:
            return cut
        t, start, end = coords[cut][0], cut, cut
        while start > 0 and coords[start - 1][0] == t:
            start -= 1
        while end < n and coords[end][0] == t:
            end += 1
        return min(start + round((cut - start) / align) * align, end)

    def missing(self, plan: CoordinatePlan) -> bool:
        return any(t not in self.cost for t in {t for t, _ in plan.coords})

    def learn(self, gathered: list[torch.Tensor]) -> None:
        """Costs from every rank's ``[seconds, count]`` per layout tensor (row-major, one tensor
        per rank): the pooled seconds per coordinate of each tensor some rank measured."""
        total = torch.stack(gathered).sum(0).view(-1, 2)
        for t, (seconds, count) in enumerate(total.tolist()):
            if count > 0 and t not in self.cost:
                self.cost[t] = seconds / count


def evaluate_sharded(engine, plan: CoordinatePlan, objective) -> list[float]:
    """The plan's losses on every rank of ``engine`` (a ``DistributedEngine``), each rank
    evaluating the base point and its shard (module docstring)."""
    topo = engine.topology
    shards = engine.__dict__.setdefault("coordinate_shards", CoordinateShards())
    batched = getattr(objective, "coordinate_losses", None)
    ranges = shards.split(plan, topo.pertp, getattr(getattr(batched, "__self__", None), "alignment", 1))
    shards.last = ranges  # the cut this step used
    # measured from the second plan on: the first pays one-time costs (kernel warm-up, the
    # batched objective's exactness checks) that would bias the cut
    shards.plans += 1
    learning = shards.plans > 1 and shards.missing(plan)
    costs: dict = {}
    local = evaluate_local(engine.inner, plan, objective, ranges[topo.pertp_rank], costs if learning else None)
    per = max(len(r) for r in ranges)
    padded = torch.full((1 + per,), float("nan"), dtype=torch.float64)
    padded[:len(local)] = torch.tensor(local, dtype=torch.float64)
    gathered = topo.comm.all_gather(padded, topo.group("pertp"), "coordinate loss gather")
    bases = [float(g[0]) for g in gathered]
    if any(b != bases[0] and not (b != b and bases[0] != bases[0]) for b in bases):
        raise RankFailure(f"rank {topo.rank}: the ranks evaluated different base losses "
                          f"({', '.join(f'{b!r}' for b in bases)}): point parallelism needs the same "
                          "batch and parameters on every rank")
    losses = [bases[0]]
    for r, values in zip(ranges, gathered):
        losses += values[1:1 + len(r)].tolist()
    if learning:
        mine = torch.zeros(len(engine.layout), 2, dtype=torch.float64)
        for t, (seconds, count) in costs.items():
            mine[t] = torch.tensor([seconds, float(count)], dtype=torch.float64)
        shards.learn(topo.comm.all_gather(mine.view(-1), topo.group("pertp"), "coordinate cost gather"))
    return losses
