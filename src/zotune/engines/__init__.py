"""Engines own where parameters live and evaluate probe plans (contract: ``engines/base.py``)."""
from .base import Update
from .in_memory import InMemoryEngine
from .offload import OffloadEngine
from .reference import ReferenceEngine

ENGINES = {"in-memory": InMemoryEngine, "reference": ReferenceEngine, "offload": OffloadEngine}
"""Engines by name. Each takes ``(tensors, direction, chunk_size=, master_weights=, threads=,
rng_device=)`` and must agree with ``in-memory`` (tests/test_conformance.py). ``offload`` also
needs ``model=`` (``needs_model``) and takes the offload options (tests/test_offload.py)."""

__all__ = ["ENGINES", "InMemoryEngine", "OffloadEngine", "ReferenceEngine", "Update"]
