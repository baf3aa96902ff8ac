"""Embedding rows of a tied table at every point of a step, for the offload engine's pre pass.

A tensor used before and after the blocks (a head tied to the embeddings) holds one point at a
time. On the disk tier the pre pass does not copy it per point: it computes only the rows the
batch looks up, at every point, by moving copies of the chunks that hold them along the logged
moves with the same chunk moves the tensor itself will make (so the rows are bitwise the values
the tensor will hold). Cost: the draws of those moves on those chunks, one chunk of memory.
"""
from __future__ import annotations

import contextlib

import torch

from ..models.blocks import unwrap


class RowLookup(torch.nn.Module):
    """Stands in for an embedding table in the pre pass: ``rows(unique ids)`` gathered."""

    def __init__(self, rows) -> None:
        super().__init__()
        self.rows = rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        return self.rows(unique)[inverse]


@contextlib.contextmanager
def row_lookups(engine, i: int, upto: int):
    """The shared embedding modules of ``engine`` replaced by lookups of their rows at point ``i``."""
    base, swapped = unwrap(engine.model), []

    def rows(ti, ids):
        known, values = engine._rows[ti]
        at = torch.searchsorted(known, ids).clamp(max=len(known) - 1)
        if bool((known[at] == ids).all()):
            return values[i][at]
        return rows_at(engine, ti, ids, [upto])[0]  # ids the calls did not show: computed apart

    try:
        for ti, path in engine._lookups.items():
            parent_path, _, child = path.rpartition(".")
            parent = base.get_submodule(parent_path) if parent_path else base
            swapped.append((parent, child, parent.get_submodule(child)))
            setattr(parent, child, RowLookup(lambda ids, ti=ti: rows(ti, ids)))
        yield
    finally:
        for parent, child, original in reversed(swapped):
            setattr(parent, child, original)


def rows_at(engine, ti: int, rows: torch.Tensor, positions: list[int]) -> list[torch.Tensor]:
    """Rows ``rows`` (sorted, unique) of 2-D tensor ``ti`` as they will be at each log position
    of ``positions`` (ascending): each chunk holding one of them is copied and moved along the
    log by the chunk moves the unit makes, so the values are bitwise the ones the tensor will
    hold. Cost: the draws of those moves on those chunks, one chunk of memory."""
    t, unit = engine.tensors[ti], engine._shared
    width = t.param.shape[1]
    flat_idx = (rows.to(torch.long)[:, None] * width + torch.arange(width)).reshape(-1)
    out = [torch.empty(flat_idx.numel(), dtype=t.param.dtype) for _ in positions]
    bounds = torch.tensor([s for s, _ in t.chunks] + [t.chunks[-1][1]])
    cuts = torch.searchsorted(flat_idx, bounds).tolist()
    log, start = engine._log, engine._log_start
    for c, (s, e) in enumerate(t.chunks):
        lo, hi = cuts[c], cuts[c + 1]
        if lo == hi:
            continue
        scratch, current, done = t.flat[s:e].clone(), unit.current, unit.done
        for k, upto in enumerate(positions):
            for point, update in log[done - start: upto - start]:
                if t.role == "zo" or (update is not None and update.touches(ti, t.role)):
                    engine.lookup_numbers_drawn += engine._move_chunk(ti, c, point, update, current,
                                                                      scratch)
                current = point
            done = max(done, upto)
            out[k][lo:hi] = scratch[flat_idx[lo:hi] - s]
    return [o.view(len(rows), width) for o in out]
