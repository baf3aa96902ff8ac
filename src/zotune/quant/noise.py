"""Keyed integer random numbers for ElasticZO-INT8: perturbation signs and rounding noise.

Every number comes from zotune's counter-based keys (``zotune.rng``), addressed by
``(run seed, step, stream, tensor name, chunk)`` exactly like the float methods' directions, so a
resumed run regenerates the same numbers and no generator state needs saving.

Streams: ``PERTURBATION`` is probe 0 of a step, so the int8 Rademacher signs are the same signs the
float ``rademacher`` direction draws for that key; rounding noise of the head (ZO) and tail (BP)
updates have their own probe ids far from any probe a ZO estimator uses.
"""
from __future__ import annotations

import torch

from .. import rng

PERTURBATION = 0
ZO_ROUNDING = 1 << 40
BP_ROUNDING = (1 << 40) + 1

_SIGN_BITS = 16
_EXPAND_WORDS = 2048
_SHIFTS: dict = {}


def stream_key(seed: int, step: int, stream: int, name: str, chunk: int = 0) -> int:
    """The key of one chunk of one tensor's numbers of one stream at one step."""
    return rng.chunk_seed(rng.probe_seed(seed, step, stream), rng.name_id(name), chunk)


def rademacher_int8(seed: int, step: int, name: str, numel: int, device: torch.device | str = "cpu",
                    chunk_size: int = rng.DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """``numel`` signs in {-1, +1} as int8, 16 signs per 16-bit random word, chunked by keys.

    Bit-identical to ``zotune.directions.Rademacher`` for the same chunk keys (tested).
    Cost: numel/16 random words.
    """
    out = torch.empty(numel, dtype=torch.int8, device=device)
    shifts = _SHIFTS.get(torch.device(device))
    if shifts is None:
        shifts = _SHIFTS[torch.device(device)] = torch.arange(_SIGN_BITS, dtype=torch.int16, device=device)
    for c, (lo, hi) in enumerate(rng.chunk_bounds(numel, chunk_size)):
        n = hi - lo
        words = torch.empty((n + _SIGN_BITS - 1) // _SIGN_BITS, dtype=torch.int32, device=device)
        words.random_(0, 1 << _SIGN_BITS, generator=rng.generator(stream_key(seed, step, PERTURBATION, name, c), device))
        words = words.to(torch.int16)  # the 16 random bits, two's complement: bit k is still (w >> k) & 1
        for w0 in range(0, len(words), _EXPAND_WORDS):  # bounded temporaries (int16, 64 KiB)
            block = words[w0:w0 + _EXPAND_WORDS]
            bits = (block.unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)
            start = lo + w0 * _SIGN_BITS
            stop = min(hi, start + bits.numel())
            out[start:stop] = bits[:stop - start].mul_(2).sub_(1)
    return out


def rounding_generator(seed: int, step: int, stream: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of the stochastic-rounding noise of one tensor's update at one step.

    One generator per (step, tensor): an update tensor is a single chunk (weights of the small
    networks this method targets are far below ``rng.DEFAULT_CHUNK_SIZE``).
    """
    return rng.generator(stream_key(seed, step, stream, name), device)
