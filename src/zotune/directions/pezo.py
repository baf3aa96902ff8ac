r"""PeZO's perturbation-efficient directions: reused uniform random numbers, scaled to act Gaussian.

PeZO (Tan et al., "Perturbation-efficient Zeroth-order Optimization for Hardware-friendly
On-device Training", arXiv 2504.20314, ICCAD 2025) replaces MeZO's d fresh Gaussian numbers per
draw with uniform numbers that are reused, so that an FPGA or ASIC needs little or no random-number
hardware (research/pezo_elasticzo.md, section 2). Two strategies:

* ``PeZOPool`` (pre-generation): N uniform numbers drawn once; the perturbation of probe o reads
  the pool as one endless cyclic stream from a carried-over offset,
  :math:`z_o[i] = \alpha\, P[(o_o + i) \bmod N]` with :math:`o_o = o\,(d + \text{shift}) \bmod N`,
  where i is the flat index over all trainable tensors. Zero random numbers per step.
* ``PeZOBank`` (on-the-fly): n uniform generators ("lanes") each emit one number per clock cycle;
  W = n m elements are perturbed per cycle and the lane order rotates by one each cycle:
  :math:`u[i] = x_{((s \bmod n) + c) \bmod n}(c)` for cycle c = i // W and slot s = i mod W.
  Each lane's number is counter-based (a function of key, lane and cycle), so any chunk can be
  regenerated alone. 1/m random numbers per element.

Uniform numbers are b-bit fixed point, :math:`u = (r + 1/2) / 2^{b-1}` with integer
:math:`r \in [-2^{b-1}, 2^{b-1})` (symmetric, :math:`E[u^2] = 1/3 - 1/(3 \cdot 4^b)`), or float
U(-1, 1). The scaling :math:`\alpha` makes them stand in for Gaussians, so MeZO's lr and eps carry
over: ``static`` :math:`1/\sqrt{E[u^2]}`; ``norm_per_tensor`` (the pool's default, "adaptive")
:math:`\sqrt{d_l / \sum_{i \in l} u_i^2}`, so each tensor's perturbation has norm exactly
:math:`\sqrt{d_l}`, computed in O(1) from prefix sums of :math:`P^2`; ``norm_global`` the same over
all d; ``none`` the naive swap (an ablation: declared second moment 1, deliberately uncompensated,
so steps are about 3x too small). ``pow2`` rounds :math:`\alpha` to a power of two (a shift in
hardware; up to a sqrt 2 mismatch of the effective step).

Known property of the faithful pool (the note's section 2.4): within a probe, elements i and
i + N share a number whatever the offset, so every update lies in the N-dimensional span of the
alias classes {i : i = k mod N}: theta_i - theta_{i+N} never changes (tested). Use N >= the task's
intrinsic dimension, or the ``pooled`` direction (zotune's own reuse without this trap).
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import rng
from .base import Position

ORDINAL_BITS = 40
SCALINGS = ("norm_per_tensor", "norm_global", "static", "none")


def _uniform(n: int, bits: int | None, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """n symmetric uniform numbers on (-1, 1): b-bit fixed point, or float when bits is None."""
    if bits is None:
        return torch.rand(n, generator=gen, dtype=torch.float64, device=device).mul_(2).sub_(1)
    half = 1 << (bits - 1)
    r = torch.randint(-half, half, (n,), generator=gen, dtype=torch.int64, device=device)
    return (r.double() + 0.5) / half


def _second_moment(bits: int | None) -> float:
    return 1 / 3 if bits is None else 1 / 3 - 1 / (3 * 4**bits)


def _pow2(alpha: float) -> float:
    return 2.0 ** round(math.log2(alpha))


def _check(bits, scaling, valid_scalings, pow2) -> None:
    if bits not in (8, 16, None):
        raise ValueError(f"bits must be 8, 16 or None (float), got {bits!r}")
    if scaling not in valid_scalings:
        raise ValueError(f"unknown scaling {scaling!r}; valid: {', '.join(valid_scalings)}")
    if not isinstance(pow2, bool):
        raise ValueError(f"pow2 must be True or False, got {pow2!r}")


class PeZOPool:
    """PeZO's pre-generated pool with a carried-over offset (strategy A). See the module docstring.

    Args:
        pool_size: N, numbers in the pool (default 2**16). Must not divide d + extra_shift.
        bits: 8 (default), 16 or None (float32 uniform).
        scaling: ``norm_per_tensor`` (default), ``norm_global``, ``static`` or ``none``.
        pow2: round the scale to a power of two.
        extra_shift: added to the offset's advance per probe (fixes d = 0 mod N).
        pool_seed: key of the pool's one draw.

    Cost: 0 random numbers per step (N once); memory N + 2**20 numbers (the pool, tiled so every
    window is a view) plus N + 1 float64 prefix sums.
    """

    name = "pezo-pool"
    positional = True
    second_moment = 1.0
    numbers_per_element = 0.0
    window = rng.DEFAULT_CHUNK_SIZE

    def __init__(self, pool_size: int = 1 << 16, bits: int | None = 8, scaling: str = "norm_per_tensor",
                 pow2: bool = False, extra_shift: int = 0, pool_seed: int = 0) -> None:
        if not (isinstance(pool_size, int) and pool_size >= 2):
            raise ValueError(f"pool_size must be an integer >= 2, got {pool_size!r}")
        _check(bits, scaling, SCALINGS, pow2)
        if not (isinstance(extra_shift, int) and extra_shift >= 0):
            raise ValueError(f"extra_shift must be an integer >= 0, got {extra_shift!r}")
        self.pool_size, self.bits, self.scaling, self.pow2 = pool_size, bits, scaling, pow2
        self.extra_shift, self.pool_seed = extra_shift, pool_seed
        gen = rng.generator(rng.mix(pool_seed, 0x50455A4F))
        self.pool = _uniform(pool_size, bits, gen)  # float64 master
        squares = torch.cat([torch.zeros(1, dtype=torch.float64), (self.pool**2).cumsum(0)])
        self._prefix = squares.tolist()
        self._tiled: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self.period: int | None = None

    @property
    def pool_numbers(self) -> int:
        """Random numbers drawn once, when the pool is built."""
        return self.pool_size

    def max_chunk_size(self) -> int | None:
        return self.window

    def check_size(self, total: int) -> None:
        """Reject sizes whose offset never moves, and record the period of the directions."""
        advance = total + self.extra_shift
        if advance % self.pool_size == 0:
            raise ValueError(
                f"pool_size {self.pool_size} divides the {total} trainable elements"
                + (f" + extra_shift {self.extra_shift}" if self.extra_shift else "")
                + ": every step would reuse the same direction; use a pool size coprime to it or "
                "extra_shift >= 1")
        self.period = self.pool_size // math.gcd(self.pool_size, advance)
        if self.period < 1000:
            warnings.warn(f"pezo-pool: directions repeat every {self.period} probes (pool_size "
                          f"{self.pool_size}, {total} elements); a pool size coprime to the element "
                          "count gives the longest period", stacklevel=2)

    def probe_key(self, run_seed: int, step: int, probe: int, num_probes: int) -> int:
        """Keys carry the probe's ordinal (the offset is a function of it, so no state is kept)."""
        ordinal = step * num_probes + probe
        if ordinal >= 1 << ORDINAL_BITS:
            raise ValueError(f"probe ordinal {ordinal} exceeds 2**{ORDINAL_BITS}")
        return ((rng.mix(run_seed, 0x4F5244) & ((1 << 22) - 1)) << ORDINAL_BITS) | ordinal

    def offset(self, key: int, total: int) -> int:
        """o = o_0 + ordinal * (d + extra_shift) mod N: where this probe's stream starts in the
        pool. The register's initial value o_0 comes from the run seed (carried in the key), so
        runs with different seeds read the pool differently."""
        ordinal = key & ((1 << ORDINAL_BITS) - 1)
        return ((key >> ORDINAL_BITS) + ordinal * (total + self.extra_shift)) % self.pool_size

    def _window_sum(self, start: int, length: int) -> float:
        """Sum of squares of ``length`` pool entries read cyclically from ``start``."""
        n, c = self.pool_size, self._prefix
        full, rem = divmod(length, n)
        total = full * c[n]
        end = start + rem
        total += c[min(end, n)] - c[start]
        if end > n:
            total += c[end - n]
        return total

    def scale(self, offset: int, position: Position) -> float:
        """The scale alpha of the tensor at ``position`` for a stream starting at ``offset``."""
        if self.scaling == "none":
            return 1.0
        if self.scaling == "static":
            alpha = 1 / math.sqrt(_second_moment(self.bits))
        elif self.scaling == "norm_global":
            alpha = math.sqrt(position.total / self._window_sum(offset, position.total))
        else:
            start = (offset + position.tensor_start) % self.pool_size
            alpha = math.sqrt(position.tensor_numel / self._window_sum(start, position.tensor_numel))
        return _pow2(alpha) if self.pow2 else alpha

    def _pool_view(self, dtype, device) -> torch.Tensor:
        tiled = self._tiled.get((dtype, device))
        if tiled is None:
            reps = -(-(self.pool_size + self.window) // self.pool_size)
            tiled = self.pool.repeat(reps)[: self.pool_size + self.window].to(dtype=dtype, device=device)
            self._tiled[(dtype, device)] = tiled
        return tiled

    def chunk(self, key: int, out: torch.Tensor):
        raise TypeError("pezo-pool directions depend on position: engines call chunk_at")

    def chunk_at(self, key: int, position: Position, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        n = out.numel()
        if n > self.window:
            raise ValueError(f"chunk of {n} elements is longer than the window ({self.window})")
        offset = self.offset(key, position.total)
        start = (offset + position.flat_start) % self.pool_size
        return self._pool_view(out.dtype, out.device)[start : start + n], self.scale(offset, position)


class PeZOBank:
    """PeZO's on-the-fly bank of uniform generators with per-cycle rotation (strategy B).

    Args:
        lanes: n generators (default 16).
        reuse: m, numbers reused within a cycle (W = n m elements per cycle; default 1: no reuse).
            With m > 1, elements of a cycle whose slots agree mod n share a number.
        bits: 8 (default), 16 or None.
        scaling: ``static`` (default; the norm is unknown before the numbers stream) or ``none``.
        pow2: round the scale to a power of two.

    Cost: 1/m uniform numbers per element per draw; memory: none beyond a chunk's numbers.
    """

    name = "pezo-bank"
    positional = True
    second_moment = 1.0
    block_cycles = 256

    def __init__(self, lanes: int = 16, reuse: int = 1, bits: int | None = 8, scaling: str = "static",
                 pow2: bool = False) -> None:
        if not (isinstance(lanes, int) and lanes >= 1):
            raise ValueError(f"lanes must be an integer >= 1, got {lanes!r}")
        if not (isinstance(reuse, int) and reuse >= 1):
            raise ValueError(f"reuse must be an integer >= 1, got {reuse!r}")
        _check(bits, scaling, ("static", "none"), pow2)
        self.lanes, self.reuse, self.bits, self.scaling, self.pow2 = lanes, reuse, bits, scaling, pow2
        alpha = 1.0 if scaling == "none" else 1 / math.sqrt(_second_moment(bits))
        self.alpha = _pow2(alpha) if pow2 else alpha
        self.numbers_per_element = 1.0 / reuse

    def max_chunk_size(self) -> int | None:
        return None

    def lane_numbers(self, key: int, block: int) -> torch.Tensor:
        """x_k(c) for the cycles of one block: shape (block_cycles, lanes), float64."""
        gen = rng.generator(rng.mix(key, 0x42414E4B, block))
        return _uniform(self.block_cycles * self.lanes, self.bits, gen).view(self.block_cycles, self.lanes)

    def chunk(self, key: int, out: torch.Tensor):
        raise TypeError("pezo-bank directions depend on position: engines call chunk_at")

    def chunk_at(self, key: int, position: Position, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        n, width = out.numel(), self.lanes * self.reuse
        first = position.flat_start
        i = torch.arange(first, first + n, dtype=torch.int64)
        cycle = i // width
        lane = (i % width % self.lanes + cycle) % self.lanes
        b0, b1 = int(cycle[0]) // self.block_cycles, int(cycle[-1]) // self.block_cycles
        numbers = torch.cat([self.lane_numbers(key, b) for b in range(b0, b1 + 1)]).view(-1)
        index = (cycle - b0 * self.block_cycles) * self.lanes + lane
        out.copy_(numbers[index].to(out.device))
        return out, self.alpha
