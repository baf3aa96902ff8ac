"""Who does what in a distributed ZO run: the process group, the (dp x pertp) mesh, the
collectives, and how a plan's points and a batch are divided among ranks.

DistZO2 (research/zo2_distzo2.md, section 9) runs ZO training three ways; all three are one
``DeviceMesh`` of shape ``(dp, pertp)``:

* data parallel (``ddp``, mesh ``(world, 1)``): every rank evaluates every point of the plan on
  its own shard of the batch; the losses are averaged over the ``dp`` dimension;
* point parallel (``pertp``, mesh ``(1, world)``): the points of the plan (the +eps and -eps
  probes, or n-SPSA's 2n points) are divided among ranks, all on the same batch; the losses are
  gathered over the ``pertp`` dimension;
* 2D (``2d``, mesh ``(world / pertp, pertp)``): both.

Ranks ``d * pertp .. d * pertp + pertp - 1`` form one point-parallel group (contiguous, so on one
node when ``pertp`` divides the GPUs per node: that is the group that later shares block slices
over NVLink); data-parallel groups stride across nodes, where only scalars travel anyway.

Only scalars are exchanged: every rank derives the same direction keys from (run seed, step,
probe), so no parameter and no gradient ever crosses the network. :class:`Collectives` counts
the bytes each rank puts into every collective (tests/test_distributed.py checks they are the
losses and nothing else) and turns a dead or silent peer into a one-line :class:`RankFailure`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ZotuneError

MODES = ("ddp", "pertp", "2d")
"""Parallel modes: data parallel, point (perturbation) parallel, and both on a 2D mesh."""
DEFAULT_TIMEOUT = 1800.0
"""Seconds a collective waits for the other ranks (torch's own default). A rank that dies is
seen at once on gloo (its sockets close); the timeout is for a rank that hangs, and must exceed
the longest stretch one rank works alone (rank 0's dev evaluation)."""


class RankFailure(ZotuneError):
    """Another rank died, hung past the timeout, or disagrees with this one."""


@dataclass
class Collectives:
    """The collectives of a run, with the bytes each rank contributes counted by name.

    ``sent[name]`` is the bytes this rank put into collectives of that name, ``calls[name]`` how
    many. A failure (a peer closed its connection, the timeout passed) raises :class:`RankFailure`
    naming the collective, the rank and the timeout."""

    rank: int
    timeout: float
    device: torch.device = torch.device("cpu")  # NCCL gathers CUDA tensors
    sent: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def all_gather(self, values: torch.Tensor, group, what: str) -> list[torch.Tensor]:
        """Every rank's ``values`` of ``group``, in group-rank order."""
        size = dist.get_world_size(group)
        if size == 1:  # nothing to exchange, nothing sent
            return [values.clone()]
        self.sent[what] = self.sent.get(what, 0) + values.numel() * values.element_size()
        self.calls[what] = self.calls.get(what, 0) + 1
        values = values.to(self.device)
        out = [torch.empty_like(values) for _ in range(size)]
        try:
            dist.all_gather(out, values, group=group)
        except RuntimeError as exc:  # DistBackendError and gloo's connection errors are RuntimeErrors
            raise RankFailure(failure_message(self.rank, what, self.timeout, exc)) from None
        return [o.cpu() for o in out]

    def barrier(self, what: str) -> None:
        """Wait for every rank (a one-element gather, so it fails like any other collective)."""
        self.all_gather(torch.zeros(1, dtype=torch.int64), None, what)

    def reset(self) -> None:
        self.sent.clear()
        self.calls.clear()


def failure_message(rank: int, what: str, timeout: float, exc: BaseException) -> str:
    reason = " ".join(str(exc).split())
    if "closed by peer" in reason or "Connection reset" in reason or "Broken pipe" in reason:
        why = "another rank closed its connection (it died or stopped)"
    elif "timed out" in reason.lower() or "timeout" in reason.lower():
        why = f"another rank did not answer within the timeout of {timeout:g} s (it hangs or died)"
    else:
        why = "the collective failed"
    return (f"rank {rank}: {why} during the {what}; stopping this rank too (the last complete "
            f"checkpoint is kept; resume with --resume). Backend said: {reason[:200]}")


@dataclass
class Topology:
    """This rank's place in a ``(dp, pertp)`` mesh, and the collectives over it.

    Attributes:
        mode: ``ddp``, ``pertp`` or ``2d``.
        dp, pertp: the mesh's sizes (``dp * pertp`` is the world size).
        rank, world: this process's global rank and the number of processes.
        mesh: the ``DeviceMesh`` (``None`` only for a one-process run without a process group).
        comm: the counted collectives.
    """

    mode: str
    dp: int
    pertp: int
    rank: int
    world: int
    mesh: object = None
    comm: Collectives | None = None

    @property
    def dp_rank(self) -> int:
        return self.rank // self.pertp

    @property
    def pertp_rank(self) -> int:
        return self.rank % self.pertp

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes the run's files (rank 0: one copy, one lock)."""
        return self.rank == 0

    def group(self, dim: str):
        """The process group of mesh dimension ``dim`` (``dp`` or ``pertp``) holding this rank."""
        if self.mesh is None:
            return None
        return self.mesh.get_group(dim)

    def points_of(self, num_points: int, pertp_rank: int | None = None) -> range:
        """The plan points evaluated by point-parallel rank ``pertp_rank`` (default: this one):
        contiguous runs of ``ceil(num_points / pertp)`` points, the last ones possibly shorter or
        empty."""
        p = self.pertp_rank if pertp_rank is None else pertp_rank
        per = math.ceil(num_points / self.pertp) if num_points else 0
        return range(min(num_points, p * per), min(num_points, (p + 1) * per))

    def shard(self, items: list, dp_rank: int | None = None) -> list:
        """This data-parallel rank's contiguous share of a global batch (equal shares: its size
        must be divisible by ``dp``; ``zotune train`` checks ``--batch-size`` at start)."""
        if len(items) % self.dp:
            raise ZotuneError(f"a batch of {len(items)} does not split evenly among {self.dp} "
                              f"data-parallel ranks: use a multiple of {self.dp}")
        d = self.dp_rank if dp_rank is None else dp_rank
        per = len(items) // self.dp
        return items[d * per:(d + 1) * per]

    def describe(self) -> str:
        return (f"{self.mode}: {self.world} rank(s), mesh dp={self.dp} x pertp={self.pertp}, "
                f"this rank {self.rank} (dp {self.dp_rank}, pertp {self.pertp_rank})")


def mesh_shape(mode: str, world: int, pertp: int | None = None) -> tuple[int, int]:
    """``(dp, pertp)`` for ``mode`` on ``world`` ranks (``pertp`` only for ``2d``, default 2)."""
    if mode not in MODES:
        raise ZotuneError(f"unknown parallel mode {mode!r}; valid: none, {', '.join(MODES)}")
    if mode == "ddp":
        return world, 1
    if mode == "pertp":
        return 1, world
    pertp = 2 if pertp is None else int(pertp)
    if pertp < 1 or world % pertp:
        raise ZotuneError(f"--pertp {pertp} does not divide the world size {world}: a 2d mesh is "
                          f"dp x pertp ranks; valid --pertp: "
                          f"{', '.join(str(k) for k in range(1, world + 1) if world % k == 0)}")
    return world // pertp, pertp


def check_batch(topology: Topology, batch_size: int) -> None:
    if batch_size % topology.dp:
        raise ZotuneError(f"--batch-size {batch_size} is not divisible by the {topology.dp} "
                          f"data-parallel ranks; it is the global batch, split evenly among them: "
                          f"use a multiple of {topology.dp}")


def init(mode: str, pertp: int | None = None, *, timeout: float = DEFAULT_TIMEOUT,
         backend: str | None = None, device_type: str | None = None) -> Topology:
    """Join (or start) the process group and build the mesh for ``mode``.

    Under ``torchrun`` the group is read from the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT``, set by its rendezvous, one node or many); without it, a
    one-process group on an in-memory store, so the same code runs alone. The backend is NCCL
    when CUDA is available, else gloo. A group another library already started is reused.
    """
    cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        wait = timedelta(seconds=timeout)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=wait)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=wait)
    world, rank = dist.get_world_size(), dist.get_rank()
    dp, pp = mesh_shape(mode, world, pertp)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda" if cuda else "cpu", (dp, pp), mesh_dim_names=("dp", "pertp"))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Topology(mode, dp, pp, rank, world, mesh, Collectives(rank, timeout, device))


def shutdown(*, together: bool = True) -> None:
    """Leave the process group (at the end of a run, every rank; call it before the script ends).

    ``together`` (after a finished run): wait for every rank first. A rank that tears gloo down,
    or simply exits, while a peer is still in its last collective can abort that peer ("terminate
    called without an active exception", seen under load). A peer that died already makes the
    barrier fail at once, which is ignored: the run's own result stands. Pass ``together=False``
    when leaving on an error, where peers may be inside another collective."""
    if not dist.is_initialized():
        return
    if together:
        try:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()
        except RuntimeError:
            pass
    dist.destroy_process_group()
