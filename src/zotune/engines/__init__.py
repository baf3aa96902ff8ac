"""Engines own where parameters live and evaluate probe plans."""
from .in_memory import InMemoryEngine, Update

__all__ = ["InMemoryEngine", "Update"]
