"""The direction protocol, and where a chunk lies for directions that depend on position."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Position:
    """Where one chunk lies in the flat stream of all trainable elements (engine order).

    Attributes:
        total: trainable elements in all (d).
        tensor_start: flat index of the tensor's first element.
        tensor_numel: elements of the tensor (d_l).
        start: index of the chunk's first element inside the tensor.
    """

    total: int
    tensor_start: int
    tensor_numel: int
    start: int = 0

    @property
    def flat_start(self) -> int:
        return self.tensor_start + self.start


class Direction(Protocol):
    """Protocol of a direction distribution.

    Attributes:
        name: registry name.
        second_moment: m with E[z z^T] = m I; estimators divide by it.
        numbers_per_element: fresh random numbers one element of z costs, per draw.
        positional: optional, True for directions whose numbers depend on where a chunk lies in
            the flat parameter stream (PeZO); engines then call ``chunk_at`` instead of ``chunk``
            and the optimizer asks ``probe_key`` for the keys.
    """

    name: str
    second_moment: float
    numbers_per_element: float

    def chunk(self, key: int, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Return ``(values, sign)`` with ``z_chunk = sign * values``.

        ``out`` is a 1-D scratch buffer of the chunk's length, dtype and device; the direction may
        fill it and return it, or return a view of its own storage (no copy). ``sign`` lets a view
        carry a random sign for free.
        """
        ...

    def max_chunk_size(self) -> int | None:
        """The largest chunk this direction supports, or None for no limit."""
        ...
