r"""The distributed engine: any engine, with the plan's points and the batch divided among ranks.

It wraps another engine (in-memory now; block streaming later, unchanged) and changes only
``evaluate``. On a ``(dp, pertp)`` mesh (``distributed/topology.py``), rank ``(d, p)``

1. evaluates the points ``topology.points_of(n, p)`` of the plan (all of them when ``pertp = 1``)
   with the inner engine, on its own objective (its shard ``d`` of the batch);
2. all-gathers those losses over its ``pertp`` group: the full loss vector of shard ``d``;
3. all-gathers that vector over its ``dp`` group and averages it over shards, in shard order:

.. math:: L_i = \frac{1}{D} \sum_{d=0}^{D-1} L_i^{(d)}

which is exactly :class:`~zotune.engines.base.MicroBatches` over the ``D`` shards (the same sum,
in the same order, in float64), so data parallelism is bitwise a single process averaging those
micro-batches, and every rank holds bitwise the same losses. The step program then forms the same
gradient (keys from the run seed and step, coefficients from the losses) on every rank and each
applies the identical update: no parameter or gradient travels. Per step each rank sends
``8 * ceil(n / pertp) + 8 * n`` bytes (``n`` = points of the plan: 16 + 16 for MeZO on 2 ranks).

Point parallelism needs each rank's iterate to be bitwise the same whichever points it visited.
The in-memory engine perturbs in place, so restoring ``+eps z`` and restoring ``-eps z`` round
differently; with a master copy (``master_weights=True``) every point is written afresh as
``round(master + point)`` and the master only ever takes updates, so the path does not matter.
``pertp`` and ``2d`` therefore build the inner engine with master copies (4 bytes a parameter;
``methods.build`` asks :func:`engine_options`). The copies of float32 tensors equal the
parameters whenever no point is applied, so :meth:`DistributedEngine.state_dict` leaves them out
and :meth:`load_state_dict` rebuilds them from the parameters: checkpoints of every mode and world
size are interchangeable.

Cost per rank and step: ``ceil(n / pertp)`` forward passes on ``B / dp`` examples, and the inner
engine's sweeps (every rank regenerates the whole direction: the price of sending no parameters).
"""
from __future__ import annotations

import torch

from ..distributed.checks import agree, layout_summary
from ..distributed.topology import Topology
from ..plan import ProbePlan


def path_independent(engine) -> bool:
    """Whether ``engine``'s parameters after a move depend only on the point (not on the points
    visited before): the reference engine always; the in-memory engine when every ZO tensor has a
    master copy."""
    tensors = getattr(engine, "tensors", None)
    if tensors is None or not hasattr(tensors[0], "master"):
        return hasattr(engine, "_base")  # the reference engine writes every point from its base
    return all(t.master is not None for t in tensors if t.role == "zo")


def engine_options(parallel, master_weights):
    """The inner engine's ``master_weights`` for a parallel mode: ``auto`` is on for point
    parallelism (an explicit False is then refused by :class:`DistributedEngine`)."""
    mode = parallel.mode if isinstance(parallel, Topology) else parallel
    return True if mode in ("pertp", "2d") and master_weights == "auto" else master_weights


class DistributedEngine:
    """``inner`` evaluated on a mesh of ranks; see the module docstring.

    Args:
        inner: any engine (the engine contract of ``engines/base.py``).
        topology: this rank's place in the mesh (``zotune.distributed.init``).
        seed: the run seed, checked equal on every rank at construction, together with the
            parameter layout (a mismatch is a :class:`RankFailure` on every rank, not a hang).
    """

    def __init__(self, inner, topology: Topology, *, seed: int = 0) -> None:
        self.__dict__["inner"] = inner
        self.topology = topology
        if topology.pertp > 1 or topology.mode in ("pertp", "2d"):
            bad = [t.name for t in inner.layout if t.role == "zo" and t.dtype == torch.float64]
            if bad:
                raise ValueError(f"point parallelism keeps float32 master copies; float64 "
                                 f"parameters ({bad[0]}, ...) would lose precision: use float32 "
                                 "or bfloat16 parameters, or --parallel ddp")
            if not path_independent(inner):
                raise ValueError("point parallelism needs an engine whose points do not depend on "
                                 "the path: master_weights='auto' or True (in-memory, offload), or "
                                 "engine='reference'")
        agree(topology, "run seed", int(seed), show=True)
        agree(topology, "parameter layout", layout_summary(inner.layout))
        self._derived = [self._derived_master(i) for i in range(len(inner.layout))]

    # ----------------------------------------------------------- delegation
    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    current = property(lambda self: self.inner.current,
                       lambda self, value: setattr(self.inner, "current", value))
    pending = property(lambda self: self.inner.pending,
                       lambda self, value: setattr(self.inner, "pending", value))
    numbers_drawn = property(lambda self: self.inner.numbers_drawn,
                             lambda self, value: setattr(self.inner, "numbers_drawn", value))

    # ------------------------------------------------------------ contract
    def evaluate(self, plan: ProbePlan, objective) -> list:
        """Every point's loss, averaged over data-parallel shards; this rank evaluates only its
        share of the points (module docstring)."""
        topo = self.topology
        n = plan.num_points
        mine = topo.points_of(n)
        sub = ProbePlan(plan.keys, tuple(plan.points[i] for i in mine))
        local = [float(v) for v in self.inner.evaluate(sub, objective)]
        per = len(topo.points_of(n, 0))
        padded = torch.full((per,), float("nan"), dtype=torch.float64)
        padded[:len(local)] = torch.tensor(local, dtype=torch.float64)
        shard = [float("nan")] * n
        for p, values in enumerate(topo.comm.all_gather(padded, topo.group("pertp"), "pertp loss gather")):
            for j, i in enumerate(topo.points_of(n, p)):
                shard[i] = float(values[j])
        if topo.dp == 1:
            return shard
        shards = topo.comm.all_gather(torch.tensor(shard, dtype=torch.float64), topo.group("dp"),
                                      "dp loss gather")
        return [sum(float(s[i]) for s in shards) / topo.dp for i in range(n)]

    def evaluate_coordinates(self, plan, objective) -> list:
        """A CGE step's coordinate plan, a shard per point-parallel rank (distributed/coordinates.py)."""
        from ..distributed.coordinates import evaluate_sharded
        return evaluate_sharded(self, plan, objective)

    def apply(self, update, defer: bool = False) -> None:
        self.inner.apply(update, defer)

    def flush(self) -> None:
        self.inner.flush()

    # ---------------------------------------------------------- checkpoint
    def _derived_master(self, i: int) -> bool:
        """Whether tensor ``i``'s master copy exists only for point parallelism (a float32
        parameter), so that it equals the parameter whenever no point is applied."""
        tensors = getattr(self.inner, "tensors", None)
        return (tensors is not None and getattr(tensors[i], "master", None) is not None
                and tensors[i].param.dtype == torch.float32)

    def state_dict(self) -> dict:
        """The inner engine's state, without the master copies point parallelism added (they
        equal the parameters when no point is applied), so any mode and world size can load it."""
        state = self.inner.state_dict()
        if not self.inner.current and "masters" in state:
            state["masters"] = [None if derived else m for m, derived in zip(state["masters"], self._derived)]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a state of any mode: missing derived master copies are taken from the
        parameters (load the checkpoint's parameters first, as ``zotune train`` does)."""
        if "masters" in state and not state.get("current"):
            state = dict(state)
            state["masters"] = [self.inner.parameter(i).detach().reshape(-1).clone()
                                if m is None and derived else m
                                for i, (m, derived) in enumerate(zip(state["masters"], self._derived))]
        self.inner.load_state_dict(state)


def wrap(engine, parallel, *, seed: int = 0) -> DistributedEngine:
    """``engine`` on the mesh ``parallel`` names: a :class:`Topology`, or a mode (``ddp``,
    ``pertp``, ``2d``; ``2d`` with 2 point-parallel ranks) for the process group started by
    ``torchrun`` (or a one-process group)."""
    from ..distributed.topology import init

    topology = parallel if isinstance(parallel, Topology) else init(parallel)
    return DistributedEngine(engine, topology, seed=seed)
