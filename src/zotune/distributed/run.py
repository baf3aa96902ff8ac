"""The rank-aware parts of ``zotune train``: what each rank does besides the ZO step.

``train.py`` asks :func:`current` and stays one loop for one process and for many:

* rank 0 is the writer: it holds the run directory's lock, writes config.json, metrics.jsonl,
  checkpoints (atomically, once), ``best/`` and the summary, and runs the evaluations; the other
  ranks skip them and wait at their next collective;
* every rank reads the same checkpoint on ``--resume`` (checkpoints hold no rank-specific state,
  so a run may resume with another world size or mode);
* the global batch of a step (``--batch-size``) is split into ``dp`` equal shards, one per
  data-parallel rank (:meth:`RunContext.shard`);
* at start every rank checks that all ranks have the same seed and configuration
  (``checks.agree``; the engine checks the parameter layout): a clear error, not a hang;
* a Ctrl-C or SIGTERM that reaches any rank stops every rank after the same step
  (:meth:`RunContext.agree_on_stop`: one 8-byte gather a step), so rank 0's checkpoint is the
  state of all of them; a rank that dies ends the others with :class:`~.topology.RankFailure`
  at their next collective (at once on gloo; after ``--dist-timeout`` if it hangs).
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import ZotuneError
from .checks import agree
from .topology import Topology, check_batch, init, shutdown


class RunContext:
    """One process's role in a run: everything is local when ``topology`` is None."""

    def __init__(self, topology: Topology | None = None) -> None:
        self.topology = topology

    @property
    def is_writer(self) -> bool:
        return self.topology is None or self.topology.is_writer

    def optimizer_options(self) -> dict:
        """Extra ``ZOOptimizer`` options: the mesh, when distributed."""
        return {} if self.topology is None else {"parallel": self.topology}

    def start(self, cfg) -> None:
        """Check that every rank runs the same settings (the seed first, so its message shows
        the values) and that the batch divides among the data-parallel ranks."""
        if self.topology is None:
            return
        agree(self.topology, "run seed", cfg.run.seed, show=True)
        agree(self.topology, "configuration", cfg.saved())
        check_batch(self.topology, cfg.data.batch_size)

    def check_optimizer(self, opt) -> None:
        if self.topology is not None and getattr(opt.projection, "search", None) == "fo":
            raise ZotuneError("dizo-fo's first-order search computes gradients on each rank's own "
                              "data, which would differ between ranks; use --method dizo (a ZO "
                              "search) with --parallel, or run it in one process")

    def shard(self, batch: list) -> list:
        """This rank's share of the step's global batch."""
        return batch if self.topology is None else self.topology.shard(batch)

    def barrier(self, what: str) -> None:
        if self.topology is not None and self.topology.world > 1:
            self.topology.comm.barrier(what)

    def decide(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (``--max-time``: the ranks' clocks differ)."""
        if self.topology is None or self.topology.world == 1:
            return flag
        seen = self.topology.comm.all_gather(torch.tensor([int(flag)]), None, "max-time decision")
        return bool(seen[0][0])

    def agree_on_stop(self, signals) -> None:
        """Make a stop signal seen by any rank a stop of every rank after this step."""
        if self.topology is None or self.topology.world == 1:
            return
        signals.agreed_only = True  # from the first step on, a rank stops only where all do
        flag = torch.tensor([signals.requested or 0], dtype=torch.int64)
        seen = [int(t[0]) for t in self.topology.comm.all_gather(flag, None, "stop flag")]
        # a signal that arrives during the gather is in the next step's flag
        signals.agree(next((s for s in seen if s), None))


_current = RunContext()


def current() -> RunContext:
    """The context of the running ``train`` (local outside one)."""
    return _current


def topology_for(cfg) -> Topology | None:
    e = cfg.engine
    if e.parallel == "none":
        return None
    return init(e.parallel, e.pertp, timeout=e.dist_timeout,
                device_type="cuda" if str(cfg.model.device).startswith("cuda") or (
                    cfg.model.device == "auto" and torch.cuda.is_available()) else "cpu")


@contextlib.contextmanager
def context(cfg):
    """The run's :class:`RunContext` for the block (joins the process group for
    ``--parallel``; leaves it afterwards)."""
    global _current
    outer = _current
    topology = topology_for(cfg)
    _current = RunContext(topology)
    finished = False
    try:
        yield _current
        finished = True
    finally:
        _current = outer
        if topology is not None:
            shutdown(together=finished)
