"""How a block is sliced among the ranks that share one host (DistZO2's communication strategy).

Sliced offload (``engines/sliced.py``; research/zo2_distzo2.md, section 9.2) keeps each streamed
block in host storage **once per node**, cut into ``R`` contiguous slices, one per rank of the
node (the *slice group*). To compute on a block, each rank loads only its slice from its own
storage (``1/R`` of the block over its own host link) and an all-gather over the fast link
between the devices assembles the whole block on every rank; afterwards each rank writes back
only its slice.

Slices are cut only at **chunk boundaries** of the parameter layout (a tensor outside the layout
counts as one piece): every chunk lies wholly in one slice, so a stored slice is a set of whole
chunks, each of which the engine moves with the random numbers of its own key. Cuts are placed at
the boundaries nearest to ``k * numel / R``; a block whose chunks are fewer than ``R`` or very
uneven gets unequal (possibly empty) slices. The all-gather needs equal parts, so every slice is
padded to the block's longest: per block and step each rank sends ``max_k len_k`` elements.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ZotuneError
from .topology import Collectives, RankFailure, Topology, failure_message

SLICE_GATHER = "slice all-gather"
"""Name under which :class:`~.topology.Collectives` counts the bytes of the block slices."""
SLICE_BARRIER = "slice barrier"
"""Name of the one 8-byte barrier after every pass over the blocks (the slices are written)."""


def block_cuts(offsets: list[int], numels: list[int], chunks: list[list[tuple[int, int]] | None],
               parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous element ranges ``(start, stop)`` covering a block's flat buffer.

    Args:
        offsets, numels: each parameter's element offset in the block and its size.
        chunks: each parameter's layout chunks (``(s, e)`` relative to the parameter), or
            ``None`` for a parameter outside the layout (then it is one piece).
        parts: the number of slices ``R``.

    Cut ``k`` (``0 < k < R``) is the chunk boundary nearest to ``k * numel / R`` that is not
    before cut ``k - 1`` (ties: the lower one), so the ranges are ordered and disjoint."""
    total = sum(numels)
    bounds = {0, total}
    for off, n, ch in zip(offsets, numels, chunks):
        if ch:
            bounds.update(off + e for _, e in ch)
        else:
            bounds.add(off + n)
    bounds = sorted(bounds)
    cuts = [0]
    for k in range(1, parts):
        target = k * total / parts
        cuts.append(min((b for b in bounds if b >= cuts[-1]), key=lambda b: (abs(b - target), b)))
    cuts.append(total)
    return [(cuts[k], cuts[k + 1]) for k in range(parts)]


@dataclass
class SliceGroup:
    """The ranks that share a node's host storage, and this rank's place among them.

    Attributes:
        comm: the run's counted collectives.
        group: the process group (``None``: the whole world).
        size: ``R``, the number of slices of each block.
        index: this rank's slice (its rank in ``group``).
        ranks: the global ranks of the group, in slice order.
    """

    comm: Collectives | None
    group: object
    size: int
    index: int
    ranks: list[int]

    def gather(self, mine: torch.Tensor, out: list[torch.Tensor], what: str = SLICE_GATHER) -> None:
        """``out[k] <- slice k`` of every rank of the group (all the same length as ``mine``),
        on whatever device the tensors are (gloo: CPU, NCCL: CUDA); the bytes are counted."""
        if self.size == 1:
            out[0].copy_(mine)
            return
        comm = self.comm
        comm.sent[what] = comm.sent.get(what, 0) + mine.numel() * mine.element_size()
        comm.calls[what] = comm.calls.get(what, 0) + 1
        try:
            dist.all_gather(out, mine, group=self.group)
        except RuntimeError as exc:
            raise RankFailure(failure_message(comm.rank, what, comm.timeout, exc)) from None

    def barrier(self, what: str = SLICE_BARRIER) -> None:
        """Wait for every rank of the group (8 bytes each)."""
        if self.size > 1:
            self.comm.all_gather(torch.zeros(1, dtype=torch.int64), self.group, what)

    def agree(self, value: int, what: str) -> int:
        """Slice 0's ``value`` (an int64) on every rank of the group."""
        if self.size == 1:
            return int(value)
        seen = self.comm.all_gather(torch.tensor([int(value)], dtype=torch.int64), self.group, what)
        return int(seen[0][0])


def slice_group(topology: Topology | None) -> SliceGroup:
    """The slice group of this rank: the ranks of its node.

    torchrun numbers ranks node by node and sets ``LOCAL_WORLD_SIZE`` (the ranks of a node);
    without it the whole world is taken as one node. All ranks must call this together (it
    creates the process groups of every node)."""
    if topology is None or topology.comm is None or topology.world == 1:
        return SliceGroup(None if topology is None else topology.comm, None, 1, 0,
                          [0 if topology is None else topology.rank])
    world = topology.world
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local < 1 or world % local:
        raise ZotuneError(f"LOCAL_WORLD_SIZE={local} does not divide the world size {world}; "
                          "sliced offload slices each block among the ranks of one node")
    if local == world:
        return SliceGroup(topology.comm, None, world, topology.rank, list(range(world)))
    group, _ = dist.new_subgroups(group_size=local)
    node = topology.rank // local
    return SliceGroup(topology.comm, group, local, dist.get_rank(group),
                      list(range(node * local, (node + 1) * local)))
