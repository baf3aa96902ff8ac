"""Counter-based random keys: every random number in zotune is addressed, none is global.

A direction is never stored. Its numbers are regenerated from a key built from
``(run seed, step, probe, tensor name, chunk)``, so any engine can rebuild exactly the slice of a
direction it holds, in any order, on any rank, after any restart (DESIGN.md, invariants 1 and 2).
``torch.manual_seed`` and the global generator are never used.

Keys are 63-bit integers mixed with SplitMix64 (Steele et al., 2014), a bijective 64-bit finaliser
whose outputs for consecutive inputs are statistically independent; each key seeds its own
``torch.Generator``.
"""
from __future__ import annotations

import hashlib

import torch

MASK64 = (1 << 64) - 1
MASK63 = (1 << 63) - 1

DEFAULT_CHUNK_SIZE = 1 << 20
"""Elements per chunk: large enough that per-chunk Python overhead is negligible (about 3 us of
generator setup against about 5 ms of sampling), small enough that a chunk buffer is 4 MiB."""


def splitmix64(x: int) -> int:
    """One SplitMix64 step: a bijective mix of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def mix(*parts: int) -> int:
    """Combine integers into one 63-bit key; order matters, every part changes the result."""
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = splitmix64(h ^ (p & MASK64))
    return h & MASK63


def name_id(name: str) -> int:
    """A stable 63-bit id of a tensor name (independent of Python's per-process hash seed)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & MASK63


def probe_seed(run_seed: int, step: int, probe: int) -> int:
    """The key of direction ``probe`` of step ``step``: the only thing a ZO gradient stores."""
    return mix(run_seed, step, probe)


def chunk_seed(probe_key: int, tensor_id: int, chunk: int) -> int:
    """The key of one chunk of one tensor of one direction."""
    return mix(probe_key, tensor_id, chunk)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator seeded with ``seed``, on ``device``."""
    return torch.Generator(device=device).manual_seed(seed)


def chunk_bounds(numel: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` cutting ``numel`` elements into chunks of ``chunk_size``."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [(s, min(s + chunk_size, numel)) for s in range(0, numel, chunk_size)]
