"""The standard directions: Gaussian, Rademacher, uniform and pooled.

Each direction turns ``(chunk key, n)`` into the n numbers of one chunk of z. Estimators only need
``E[z] = 0`` and ``E[z z^T] = m I``; ``second_moment`` declares ``m`` so they can stay unbiased.
``numbers_per_element`` declares how many fresh random numbers one element costs, which is what
benchmarks and the PeZO comparison count.

Directions:
    gaussian    z ~ N(0, I): MeZO (Malladi et al., 2023).
    rademacher  z_i = +-1 with probability 1/2 each; 16 signs from each 16-bit random word.
    uniform     z_i ~ U(-sqrt 3, sqrt 3): unit variance, PeZO's uniform numbers with the static
                scaling (Tan et al., 2025) that keeps MeZO's lr and eps valid.
    pooled      a window of a pre-drawn Gaussian pool at a key-dependent offset, with a
                key-dependent sign: PeZO's random-number reuse, made safe (see ``Pooled``).
"""
from __future__ import annotations

import math

import torch

from .. import rng


class Gaussian:
    """Standard normal directions, as MeZO. Cost: one Gaussian number per element."""

    name = "gaussian"
    second_moment = 1.0
    numbers_per_element = 1.0

    def chunk(self, key: int, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        out.normal_(generator=rng.generator(key, out.device))
        return out, 1.0

    def max_chunk_size(self) -> int | None:
        return None


class Uniform:
    """Uniform directions on (-sqrt 3, sqrt 3): unit variance, lighter tails (kurtosis 1.8 vs 3)."""

    name = "uniform"
    second_moment = 1.0
    numbers_per_element = 1.0
    _half_width = math.sqrt(3.0)

    def chunk(self, key: int, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        out.uniform_(-self._half_width, self._half_width, generator=rng.generator(key, out.device))
        return out, 1.0

    def max_chunk_size(self) -> int | None:
        return None


class Rademacher:
    """Random signs. Each 16-bit random word gives 16 signs, so one element costs 1/16 number."""

    name = "rademacher"
    second_moment = 1.0
    numbers_per_element = 1.0 / 16
    _bits = 16

    def __init__(self) -> None:
        self._shifts: dict[torch.device, torch.Tensor] = {}

    def chunk(self, key: int, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        n = out.numel()
        words = torch.empty((n + self._bits - 1) // self._bits, dtype=torch.int32, device=out.device)
        words.random_(0, 1 << self._bits, generator=rng.generator(key, out.device))
        shifts = self._shifts.get(out.device)
        if shifts is None:
            shifts = torch.arange(self._bits, dtype=torch.int32, device=out.device)
            self._shifts[out.device] = shifts
        bits = (words.unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)[:n]
        out.copy_(bits).mul_(2).sub_(1)
        return out, 1.0

    def max_chunk_size(self) -> int | None:
        return None


class Pooled:
    """Windows of one pre-drawn Gaussian pool: no random numbers are generated per step.

    For each chunk key, the chunk's direction is ``sign * pool[o : o + n]`` where the offset ``o``
    and the sign come from the key. Reading a window is a view, so a sweep costs only the add.

    Why this avoids PeZO's subspace pitfall (research/pezo_elasticzo.md, section 2.4): PeZO reads
    the pool as one cyclic stream, so elements ``i`` and ``i + N`` always share a number and the
    whole run is confined to an N-dimensional subspace. Here every (step, probe, tensor, chunk)
    draws its own offset, and a chunk is never longer than the pool (``max_chunk_size``), so no
    two elements of a chunk share a number and the windows seen over steps span the whole space.

    Args:
        pool_size: numbers in the pool (default 2**22, 16 MiB in fp32).
        pool_seed: key of the pool's own draw.
    """

    name = "pooled"
    second_moment = 1.0
    numbers_per_element = 0.0

    def __init__(self, pool_size: int = 1 << 22, pool_seed: int = 0) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self.pool_size = pool_size
        self.pool_seed = pool_seed
        self._pools: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def pool_numbers(self) -> int:
        """Random numbers drawn once, when the pool is built."""
        return self.pool_size

    def max_chunk_size(self) -> int | None:
        return self.pool_size

    def _pool(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        pool = self._pools.get((dtype, device))
        if pool is None:
            pool = torch.empty(self.pool_size, dtype=torch.float32)
            pool.normal_(generator=rng.generator(rng.mix(self.pool_seed, 0x504F4F4C)))
            # The pool is followed by a copy of its start so that every window is contiguous.
            pool = torch.cat([pool, pool]).to(dtype=dtype, device=device)
            self._pools[(dtype, device)] = pool
        return pool

    def chunk(self, key: int, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        n = out.numel()
        if n > self.pool_size:
            raise ValueError(f"chunk of {n} elements is longer than the pool ({self.pool_size})")
        h = rng.splitmix64(key)
        offset = (h >> 1) % self.pool_size
        sign = 1.0 if h & 1 else -1.0
        return self._pool(out.dtype, out.device)[offset : offset + n], sign
