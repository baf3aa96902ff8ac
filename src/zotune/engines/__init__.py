"""Engines own where parameters live and evaluate probe plans (contract: ``engines/base.py``)."""
from .base import Update
from .batched import BatchedEngine
from .in_memory import InMemoryEngine
from .offload import OffloadEngine
from .reference import ReferenceEngine

ENGINES = {"in-memory": InMemoryEngine, "reference": ReferenceEngine, "offload": OffloadEngine,
           "batched": BatchedEngine}
"""Engines by name. Each takes ``(tensors, direction, chunk_size=, master_weights=, threads=,
rng_device=)`` and must agree with ``in-memory`` (tests/test_conformance.py). ``offload`` also
needs ``model=`` (``needs_model``) and takes the offload options (tests/test_offload.py);
``batched`` (all points of a plan in one vmapped forward per model call) needs ``model=`` and takes
``points_per_forward`` (tests/test_batched_engine.py)."""

__all__ = ["ENGINES", "BatchedEngine", "InMemoryEngine", "OffloadEngine", "ReferenceEngine", "Update"]
