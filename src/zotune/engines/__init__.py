"""Engines own where parameters live and evaluate probe plans (contract: ``engines/base.py``)."""
from .base import Update
from .in_memory import InMemoryEngine
from .reference import ReferenceEngine

ENGINES = {"in-memory": InMemoryEngine, "reference": ReferenceEngine}
"""Engines by name. Each takes ``(tensors, direction, chunk_size=, master_weights=, threads=,
rng_device=)`` and must agree with ``in-memory`` (tests/test_conformance.py)."""

__all__ = ["ENGINES", "InMemoryEngine", "ReferenceEngine", "Update"]
