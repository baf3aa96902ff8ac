"""Random directions z, regenerated chunk by chunk from a key (DESIGN.md, section 1).

Each direction turns a chunk key into the numbers of one chunk of z. Estimators only need
``E[z] = 0`` and ``E[z z^T] = m I``; ``second_moment`` declares ``m`` so they can stay unbiased.
``numbers_per_element`` declares how many fresh random numbers one element costs, which is what
benchmarks and the PeZO comparison count.
"""
from __future__ import annotations

import torch

from .. import rng
from .base import Direction, Position
from .pezo import PeZOBank, PeZOPool
from .standard import Gaussian, Pooled, Rademacher, Uniform

DIRECTIONS = {"gaussian": Gaussian, "rademacher": Rademacher, "uniform": Uniform, "pooled": Pooled,
              "pezo-pool": PeZOPool, "pezo-bank": PeZOBank}

__all__ = ["DIRECTIONS", "Direction", "Gaussian", "PeZOBank", "PeZOPool", "Pooled", "Position",
           "Rademacher", "Uniform",
           "draw", "make_direction", "materialize", "probe_key"]


def make_direction(spec: str | Direction) -> Direction:
    """A direction from its registry name (see ``DIRECTIONS``) or as is."""
    if not isinstance(spec, str):
        return spec
    try:
        return DIRECTIONS[spec.lower()]()
    except KeyError:
        raise ValueError(
            f"unknown direction {spec!r}; valid directions: {', '.join(sorted(DIRECTIONS))}"
        ) from None


def probe_key(direction: Direction, run_seed: int, step: int, probe: int, num_probes: int) -> int:
    """The key of direction ``probe`` of step ``step``: the direction's own scheme if it has one
    (positional directions encode the probe's ordinal), else ``rng.probe_seed``."""
    own = getattr(direction, "probe_key", None)
    if own is not None:
        return own(run_seed, step, probe, num_probes)
    return rng.probe_seed(run_seed, step, probe)


def draw(direction: Direction, key: int, tensor_id: int, chunk: int, position: Position,
         out: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Chunk ``chunk`` of one tensor's direction: ``(values, sign)`` as ``Direction.chunk``."""
    if getattr(direction, "positional", False):
        return direction.chunk_at(key, position, out)
    return direction.chunk(rng.chunk_seed(key, tensor_id, chunk), out)


def materialize(direction: Direction, key: int, tensor_id: int, numel: int,
                chunk_size: int = rng.DEFAULT_CHUNK_SIZE, *, dtype=torch.float32,
                device="cpu", tensor_start: int = 0, total: int | None = None) -> torch.Tensor:
    """The whole direction of one tensor as a new 1-D tensor (allocates; for references and tests).

    ``z[s:e]`` equals the chunk regenerated alone. ``tensor_start`` and ``total`` place the tensor
    in the flat stream, for positional directions (default: the only tensor).
    """
    limit = direction.max_chunk_size()
    if limit is not None:
        chunk_size = min(chunk_size, limit)
    total = numel if total is None else total
    z = torch.empty(numel, dtype=dtype, device=device)
    for c, (s, e) in enumerate(rng.chunk_bounds(numel, chunk_size)):
        values, sign = draw(direction, key, tensor_id, c, Position(total, tensor_start, numel, s), z[s:e])
        if values.data_ptr() != z[s:e].data_ptr():
            z[s:e].copy_(values)
        if sign != 1.0:
            z[s:e].mul_(sign)
    return z
