"""An offload evaluation stopped part-way (Ctrl-C inside block k's forward), kept to continue.

The in-memory engine keeps a stopped evaluation's values and continues at the point where it
stopped, because moving back would round differently from the uninterrupted path
(``engines/base.py``). The offload engine evaluates every point block by block, so its progress
is finer: which points' embeddings are done, how many blocks each (point, model call) stream
has been through (its hidden state after them), which points' logits are done, which values
were replayed. A :class:`Pass` holds all of it; asked the same plan again, the engine logs no new
move and continues every stage where it stopped, each unit at the position it had reached, so
the result is bitwise the uninterrupted one.

Across a checkpoint (:func:`state`, :func:`restore`): every unit is first brought to at least the
evaluation's first point (the blocks the pass had not reached get their first move, with the
held update, early: the same chunk moves in the same order), so the moves still to replay carry
no update and are rebuilt from the plan alone. Saved: per unit the point it is at, the hidden
states, the tied table's per-point copies (host-memory tier), the logits and values done.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..plan import ProbePlan, coef_from_state


@dataclass
class Pass:
    plan: ProbePlan
    positions: list[int]
    ids: list[torch.Tensor]                      # each model call's input ids (to match on resume)
    hidden: dict = field(default_factory=dict)    # (point, call) -> hidden state
    through: dict = field(default_factory=dict)   # (point, call) -> blocks it has been through
    pre_done: int = 0                             # points whose embeddings are done
    by_rows: bool | None = None                   # the tied table's rows (True) or copies
    snapshots: list = field(default_factory=list)  # copies of the tied tensors per point
    logits: list = field(default_factory=list)    # per point: the logits of every call
    values: list = field(default_factory=list)    # per point: the objective's value
    args: dict | None = None                      # per call: every block's arguments (recomputed)

    def matches(self, plan: ProbePlan, calls) -> bool:
        return (self.plan == plan and len(calls) == len(self.ids)
                and all(torch.equal(c.kwargs["input_ids"].cpu(), i) for c, i in zip(calls, self.ids)))


def _terms(point) -> tuple:
    return tuple((k, a) for k, a in point if a != 0.0)


def state(engine, run: Pass) -> dict:
    """``run`` as plain containers and tensors (see the module docstring); brings every unit of
    ``engine`` to at least the evaluation's first point first."""
    first = run.positions[0]
    for unit in (*engine._pre_units, *engine._post_units):
        if unit.done < first:
            engine._advance(unit, first)
    behind = [u for u in engine._block_units if u.done < first]
    engine._streaming = True
    try:
        engine._stream(behind, lambda unit: engine._advance(unit, first))
    finally:
        engine._streaming = False

    def at(unit) -> int:
        return max(i for i, pos in enumerate(run.positions) if pos == unit.done)

    moved = [True] + [run.positions[i] > run.positions[i - 1] for i in range(1, len(run.positions))]
    return {"keys": list(run.plan.keys), "points": [[list(t) for t in p] for p in run.plan.points],
            "moved": moved, "at": {u.name: at(u) for u in engine._units},
            "ids": [i.clone() for i in run.ids],
            "hidden": [[i, c, run.through[i, c], h.detach().cpu().clone()] for (i, c), h in run.hidden.items()],
            "pre_done": run.pre_done, "by_rows": run.by_rows,
            "snapshots": [[s.detach().cpu().clone() for s in snap] for snap in run.snapshots],
            "logits": [[x.detach().cpu().clone() for x in row] for row in run.logits],
            "values": [v.detach().clone() if torch.is_tensor(v) else v for v in run.values]}


def restore(engine, saved: dict) -> Pass:
    """The :class:`Pass` of :func:`state`, with ``engine``'s log and units set to match."""
    plan = ProbePlan(tuple(int(k) for k in saved["keys"]),
                     tuple(tuple((int(j), coef_from_state(a)) for j, a in p) for p in saved["points"]))
    points = [_terms(plan.point_terms(i)) for i in range(plan.num_points)]
    engine._log, engine._log_start = [(points[0], None)], 0  # move 0: replayed by every unit
    positions = [1]
    for i in range(1, plan.num_points):
        if saved["moved"][i]:
            engine._log.append((points[i], None))
        positions.append(len(engine._log))
    for unit in engine._units:
        i = saved["at"][unit.name]
        unit.done, unit.current = positions[i], points[i]
    engine.current = points[-1]
    device = engine.device
    run = Pass(plan, positions, list(saved["ids"]), pre_done=saved["pre_done"], by_rows=saved["by_rows"])
    for i, c, through, h in saved["hidden"]:
        run.hidden[i, c], run.through[i, c] = h.to(device), through
    run.snapshots = [[s.to(device) for s in snap] for snap in saved["snapshots"]]
    run.logits = [[x.to(device) for x in row] for row in saved["logits"]]
    run.values = list(saved["values"])
    return run
