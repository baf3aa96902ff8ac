r"""Coordinate plans: the points of a CGE step, and how any engine evaluates them.

A coordinate-wise step (DeepZero's CGE, ``steps/coordinate.py``) needs the loss at the
parameters as they are and at :math:`\theta + \mu e_i` for every active coordinate
:math:`i = (t, j)` (tensor ``t``, flat position ``j``). Those points are not along random
directions, so they are not a :class:`~zotune.plan.ProbePlan`; a :class:`CoordinatePlan` lists
them and :func:`evaluate` walks them through the engine's unperturbed storage (``base``/``sync``),
so every engine with that contract runs them unchanged:

* point 0 is the base point, always evaluated first (feature reuse caches its block inputs and
  BatchNorm's running statistics are updated by it alone, ``OnePassStatistics``);
* a plain objective (a closure) is called once per coordinate after
  :math:`\theta_t[j] \leftarrow \mathrm{fl}(\theta_t[j] + \mu)` (the sum in float64, rounded once
  to the tensor's dtype) and the saved value is written back afterwards (bit-exact restore, also
  when the objective raises);
* an objective with ``coordinate_losses(moves)`` (``models.query_batch.QueryBatchLoss``) gets the
  moves themselves, ``(parameter, flat position, perturbed value)``, and may evaluate several at
  once (vmap over stacked copies of a block); its losses must be those of the moves one at a time.

The distributed engine evaluates a share of the coordinates per rank through the same function
(``distributed/coordinates.py``). Cost: ``1 + len(indices)`` objective evaluations (fewer calls
when batched), two scalar writes per coordinate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class CoordinatePlan:
    """The base point, then :math:`\\theta + \\mu e_i` for each ``(layout index, flat position)``
    of ``coords``, in order (``num_points = 1 + len(coords)``). Compared by identity: a step
    builds one plan and asks it once."""

    coords: tuple[tuple[int, int], ...]
    eps: float
    coordinate_wise = True  # how engines and ZOOptimizer tell it from a ProbePlan

    @property
    def num_points(self) -> int:
        return 1 + len(self.coords)


def moved_values(base: torch.Tensor, idx: torch.Tensor, eps: float) -> torch.Tensor:
    """:math:`\\mathrm{fl}(\\theta[j] + \\mu)` at the flat positions ``idx`` of ``base``: the sum in
    float64 (exactly what a Python float gives), rounded once to ``base``'s dtype."""
    return (base[idx].double() + eps).to(base.dtype)


def steps_taken(engine, plan: CoordinatePlan) -> list[float]:
    """Per coordinate, the step really taken, :math:`\\mathrm{fl}(\\theta_i + \\mu) - \\theta_i`
    in float64 (the parameters must be unperturbed)."""
    out, k, coords = [], 0, plan.coords
    while k < len(coords):
        t, e = coords[k][0], k
        while e < len(coords) and coords[e][0] == t:
            e += 1
        base = engine.base(t)
        idx = torch.tensor([i for _, i in coords[k:e]], dtype=torch.long)
        out += (moved_values(base, idx, plan.eps).double() - base[idx].double()).tolist()
        k = e
    return out


def _runs(plan: CoordinatePlan, indices) -> list[tuple[int, list[int]]]:
    """``indices`` cut into runs of one tensor: ``[(layout index, [plan coordinate k, ...]), ...]``."""
    runs: list[tuple[int, list[int]]] = []
    for k in indices:
        t = plan.coords[k][0]
        if runs and runs[-1][0] == t:
            runs[-1][1].append(k)
        else:
            runs.append((t, [k]))
    return runs


def evaluate_plan(engine, plan: CoordinatePlan, objective) -> list[float]:
    """A CGE step's plan through ``engine``: sharded across ranks by an engine that shards
    coordinates (``DistributedEngine.evaluate_coordinates``), else :func:`evaluate` on this process."""
    sharded = getattr(engine, "evaluate_coordinates", None)
    return sharded(plan, objective) if sharded is not None else evaluate(engine, plan, objective)


def evaluate(engine, plan: CoordinatePlan, objective, indices=None, costs: dict | None = None) -> list[float]:
    """The base loss, then the loss at each coordinate ``plan.coords[k]`` for ``k`` in ``indices``
    (default: all), through ``engine``'s ``base``/``sync`` (module docstring). ``costs``, when
    given, accumulates ``{layout index: [CPU seconds, coordinates]}`` of the coordinates (the
    measurement ``distributed/coordinates.py`` balances shards by)."""
    indices = range(len(plan.coords)) if indices is None else indices
    losses = [float(objective())]
    batched = getattr(objective, "coordinate_losses", None)
    for t, ks in _runs(plan, indices):
        start = time.process_time()
        flat = engine.base(t)
        if batched is not None:
            param = engine.parameter(t)
            idx = torch.tensor([plan.coords[k][1] for k in ks], dtype=torch.long)
            values = moved_values(flat, idx, plan.eps).to(param.dtype).tolist()
            got = [float(v) for v in batched([(param, i, v) for i, v in zip(idx.tolist(), values)])]
            if len(got) != len(ks):
                raise RuntimeError(f"coordinate_losses returned {len(got)} losses for {len(ks)} moves")
            losses += got
        else:
            for k in ks:
                i = plan.coords[k][1]
                old = flat[i].item()
                flat[i] = old + plan.eps  # float64 sum, rounded once on assignment
                engine.sync(t)
                try:
                    losses.append(float(objective()))
                finally:
                    flat[i] = old
                    engine.sync(t)
        if costs is not None:
            entry = costs.setdefault(t, [0.0, 0])
            entry[0] += time.process_time() - start
            entry[1] += len(ks)
    return losses
