"""DistZO2-style distributed ZO training on ``torch.distributed`` (docs/distributed.md).

``topology``: the process group, the ``(dp, pertp)`` DeviceMesh, counted collectives;
``checks``: every rank starts the same run; ``engines/distributed.py``: the engine wrapper that
divides points and data among ranks; ``run``: the rank-aware parts of ``zotune train``;
``cost``: the step-time model behind ``zotune plan``.
"""
from .topology import DEFAULT_TIMEOUT, MODES, Collectives, RankFailure, Topology, init, mesh_shape, shutdown

__all__ = ["DEFAULT_TIMEOUT", "MODES", "Collectives", "RankFailure", "Topology", "init", "mesh_shape",
           "shutdown"]
