r"""PeZO's perturbation-efficient directions: reused uniform random numbers, scaled to act Gaussian.

PeZO (Tan et al., "Perturbation-efficient Zeroth-order Optimization for Hardware-friendly
On-device Training", arXiv 2504.20314, ICCAD 2025) replaces MeZO's d fresh Gaussian numbers per
draw with uniform numbers that are reused, so that an FPGA or ASIC needs little or no random-number
hardware (research/pezo_elasticzo.md, section 2). Two strategies:

* ``PeZOPool`` (pre-generation): N uniform numbers drawn once; the perturbation of probe o reads
  the pool as one endless cyclic stream from a carried-over offset,
  :math:`z_o[i] = \alpha\, P[(o_o + i) \bmod N]` with :math:`o_o = o_0 + o\,(d + \text{shift}) \bmod N`,
  where i is the flat index over all trainable tensors and :math:`o_0` comes from the run seed.
  The probe key carries the ordinal o, so the offset needs no state. Cost: zero random numbers
  per step (N once); memory N + 2**20 numbers per dtype and device, plus N + 1 prefix sums.
* ``PeZOBank`` (on-the-fly): n uniform generators ("lanes") each emit one number per clock cycle;
  W = n m elements are perturbed per cycle and the lane order rotates by one each cycle:
  :math:`u[i] = x_{((s \bmod n) + c) \bmod n}(c)` for cycle c = i // W and slot s = i mod W.
  Each lane's number is counter-based (a function of key, lane and cycle), so any chunk can be
  regenerated alone. Cost: 1/m uniform numbers per element per draw; no state.

Uniform numbers are b-bit fixed point, :math:`u = (r + 1/2) / 2^{b-1}` with integer
:math:`r \in [-2^{b-1}, 2^{b-1})` (symmetric, :math:`E[u^2] = 1/3 - 1/(3 \cdot 4^b)`), or float
U(-1, 1). The scaling :math:`\alpha` makes them stand in for Gaussians, so MeZO's lr and eps carry
over: ``static`` :math:`1/\sqrt{E[u^2]}`; ``norm_per_tensor`` (the pool's default, "adaptive")
:math:`\sqrt{d_l / \sum_{i \in l} u_i^2}`, so each tensor's perturbation has norm exactly
:math:`\sqrt{d_l}`, computed in O(1) from prefix sums of :math:`P^2`; ``norm_global`` the same over
all d; ``none`` the naive swap (an ablation: declared second moment 1, deliberately uncompensated,
so steps are about 3x too small). ``pow2`` rounds :math:`\alpha` to a power of two (a shift in
hardware): alpha is off by up to sqrt 2 and the step by up to 2 (8-bit static: 1.73 becomes 2,
steps 4/3 larger); the declared second moment stays 1, as in hardware, so compensate with lr.

Known property of the faithful pool (the note's section 2.4): within a probe, elements i and
i + N share a number whatever the offset, so every update lies in the N-dimensional span of the
alias classes {i : i = k mod N}: theta_i - theta_{i+N} never changes (tested). Use N >= the task's
intrinsic dimension, ``decorrelate_copies=True`` (the note's optional extension, not the paper's:
copy k of the pool within a probe is read shifted by k delta_o, with delta_o in [1, N) keyed per
probe, :math:`z_o[i] = \alpha\, P[(o_o + i + \lfloor i/N \rfloor \delta_o) \bmod N]`, so the
ties change from probe to probe and the directions span all d dimensions over steps but
floor(d/N) - 1 (every complete copy holds each pool number once, so the differences of the copies'
sums stay zero: tested); still zero
random numbers per step, at the cost of one copy of each chunk), or the ``pooled`` direction
(zotune's own reuse without this trap).
"""
from __future__ import annotations

import math
import threading
import warnings

import torch

from .. import rng
from .base import Position

ORDINAL_BITS = 40
SCALINGS = ("norm_per_tensor", "norm_global", "static", "none")
MAX_BITS = 16
MAX_LANES = 1024
BLOCK_NUMBERS = 1 << 14


def _uniform(n: int, bits: int | None, gen: torch.Generator) -> torch.Tensor:
    """n symmetric uniform numbers on (-1, 1) in float64: b-bit fixed point (r + 1/2) / 2^(b-1),
    or float U(-1, 1) when bits is None."""
    if bits is None:
        return torch.rand(n, generator=gen, dtype=torch.float64).mul_(2).sub_(1)
    half = 1 << (bits - 1)
    r = torch.randint(-half, half, (n,), generator=gen, dtype=torch.float64)
    return r.add_(0.5).mul_(1.0 / half)


def _second_moment(bits: int | None) -> float:
    return 1 / 3 if bits is None else 1 / 3 - 1 / (3 * 4**bits)


def _pow2(alpha: float) -> float:
    return 2.0 ** round(math.log2(alpha))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(bits, scaling, valid_scalings, pow2) -> None:
    if not (bits is None or (_is_int(bits) and 1 <= bits <= MAX_BITS)):
        raise ValueError(f"bits must be an integer from 1 to {MAX_BITS} (8 and 16 are the hardware "
                         f"widths) or None (float uniform), got {bits!r}")
    if scaling not in valid_scalings:
        raise ValueError(f"unknown scaling {scaling!r}; valid: {', '.join(valid_scalings)}")
    if not isinstance(pow2, bool):
        raise ValueError(f"pow2 must be True or False, got {pow2!r}")


class PeZOPool:
    """PeZO's pre-generated pool with a carried-over offset (strategy A). See the module docstring.

    Args:
        pool_size: N, numbers in the pool (default 2**16). Must not divide d + extra_shift.
        bits: b of the b-bit fixed-point numbers, 1 to 16 (default 8), or None (float U(-1, 1)).
        scaling: ``norm_per_tensor`` (default), ``norm_global``, ``static`` or ``none``.
        pow2: round the scale to a power of two.
        extra_shift: added to the offset's advance per probe (fixes d = 0 mod N).
        pool_seed: key of the pool's one draw.
        decorrelate_copies: read successive copies of the pool with a per-probe shift, so that
            updates leave the N-dimensional alias subspace (not in the paper; default False).

    Cost: 0 random numbers per step (N once); memory N + 2**20 numbers (the pool, tiled so every
    window is a view) plus N + 1 float64 prefix sums. With ``decorrelate_copies`` a chunk is
    copied out of the pool (one pass over it per draw) instead of viewed.
    """

    name = "pezo-pool"
    positional = True
    second_moment = 1.0
    numbers_per_element = 0.0
    window = rng.DEFAULT_CHUNK_SIZE

    def __init__(self, pool_size: int = 1 << 16, bits: int | None = 8, scaling: str = "norm_per_tensor",
                 pow2: bool = False, extra_shift: int = 0, pool_seed: int = 0,
                 decorrelate_copies: bool = False) -> None:
        if not (_is_int(pool_size) and pool_size >= 2):
            raise ValueError(f"pool_size must be an integer >= 2, got {pool_size!r}")
        _check(bits, scaling, SCALINGS, pow2)
        if not (_is_int(extra_shift) and extra_shift >= 0):
            raise ValueError(f"extra_shift must be an integer >= 0, got {extra_shift!r}")
        if not _is_int(pool_seed):
            raise ValueError(f"pool_seed must be an integer, got {pool_seed!r}")
        if not isinstance(decorrelate_copies, bool):
            raise ValueError(f"decorrelate_copies must be True or False, got {decorrelate_copies!r}")
        self.decorrelate_copies = decorrelate_copies
        self._scales: dict[tuple[int, int, int, int], float] = {}
        self.pool_size, self.bits, self.scaling, self.pow2 = pool_size, bits, scaling, pow2
        self.extra_shift, self.pool_seed = extra_shift, pool_seed
        gen = rng.generator(rng.mix(pool_seed, 0x50455A4F))
        self.pool = _uniform(pool_size, bits, gen)  # float64 master
        self._prefix = torch.cat([torch.zeros(1, dtype=torch.float64), (self.pool**2).cumsum(0)])
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
        n, c = self.pool_size, lambda j: float(self._prefix[j])
        full, rem = divmod(length, n)
        end = start + rem
        total = full * c(n) + c(min(end, n)) - c(start)
        if end > n:
            total += c(end - n)
        return total

    def shift(self, key: int) -> int:
        """delta_o in [1, N): how much further each successive copy of the pool is read within
        probe o (0 unless ``decorrelate_copies``)."""
        if not self.decorrelate_copies:
            return 0
        return 1 + rng.mix(key, 0x44454C54) % (self.pool_size - 1)

    def _segments(self, offset: int, delta: int, first: int, length: int):
        """(pool start, flat start, length) of the contiguous pool reads that make up the flat
        elements first .. first + length - 1: one per copy of the pool they touch."""
        n = self.pool_size
        if delta == 0:
            yield (offset + first) % n, first, length
            return
        end = first + length
        while first < end:
            copy = first // n
            stop = min(end, (copy + 1) * n)
            yield (offset + first + copy * delta) % n, first, stop - first
            first = stop

    def _sum_of_squares(self, offset: int, delta: int, first: int, length: int) -> float:
        return sum(self._window_sum(start, size) for start, _, size in
                   self._segments(offset, delta, first, length))

    def scale(self, offset: int, position: Position, delta: int = 0) -> float:
        """The scale alpha of the tensor at ``position`` for a stream starting at ``offset``
        (and copy shift ``delta``)."""
        if self.scaling == "none":
            return 1.0
        if self.scaling == "static":
            alpha = 1 / math.sqrt(_second_moment(self.bits))
        else:
            first, length = ((0, position.total) if self.scaling == "norm_global"
                             else (position.tensor_start, position.tensor_numel))
            cache = (offset, delta, first, length)
            alpha = self._scales.get(cache)
            if alpha is None:  # O(copies) per tensor and probe: cached for the probe's other chunks
                if len(self._scales) > 4096:
                    self._scales.clear()
                alpha = self._scales[cache] = math.sqrt(
                    length / self._sum_of_squares(offset, delta, first, length))
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
        offset, delta = self.offset(key, position.total), self.shift(key)
        pool = self._pool_view(out.dtype, out.device)
        alpha = self.scale(offset, position, delta)
        if delta == 0:
            start = (offset + position.flat_start) % self.pool_size
            return pool[start : start + n], alpha
        first = position.flat_start
        for start, flat, size in self._segments(offset, delta, first, n):
            out[flat - first : flat - first + size].copy_(pool[start : start + size])
        return out, alpha


class PeZOBank:
    """PeZO's on-the-fly bank of uniform generators with per-cycle rotation (strategy B).

    Args:
        lanes: n generators (default 16, at most 1024).
        reuse: m, numbers reused within a cycle (W = n m elements per cycle; default 1: no reuse).
            With m > 1, elements of a cycle whose slots agree mod n share a number in every
            probe (cycles are fixed by the flat index), so, as with the pool's alias classes, all
            updates lie in one fixed subspace of dimension about d/m.
        bits: b of the b-bit fixed-point numbers, 1 to 16 (default 8), or None (float U(-1, 1)).
        scaling: ``static`` (default; the norm is unknown before the numbers stream) or ``none``.
        pow2: round the scale to a power of two.

    Lane k's number at cycle c is counter-based: cycles are grouped in blocks of ``block_cycles``
    (a multiple of n, about 2**14 numbers a block), each block drawn from its own generator keyed
    by (probe key, block), so any chunk is regenerated alone by drawing the blocks it touches.
    Numbers are drawn on the chunk's device (like the other directions, CPU and CUDA streams differ).

    Cost: 1/m uniform numbers per element per draw (the counter; a chunk also draws the unused
    parts of its first and last blocks); memory: no state, and scratch buffers kept per thread of
    about 3 chunk-sized float32 buffers (the rotation reads a doubled copy), 4 with reuse.
    """

    name = "pezo-bank"
    positional = True
    second_moment = 1.0

    def __init__(self, lanes: int = 16, reuse: int = 1, bits: int | None = 8, scaling: str = "static",
                 pow2: bool = False) -> None:
        if not (_is_int(lanes) and 1 <= lanes <= MAX_LANES):
            raise ValueError(f"lanes must be an integer from 1 to {MAX_LANES}, got {lanes!r}")
        if not (_is_int(reuse) and reuse >= 1):
            raise ValueError(f"reuse must be an integer >= 1, got {reuse!r}")
        _check(bits, scaling, ("static", "none"), pow2)
        self.lanes, self.reuse, self.bits, self.scaling, self.pow2 = lanes, reuse, bits, scaling, pow2
        alpha = 1.0 if scaling == "none" else 1 / math.sqrt(_second_moment(bits))
        self.alpha = _pow2(alpha) if pow2 else alpha
        self.numbers_per_element = 1.0 / reuse
        self.block_cycles = lanes * max(1, BLOCK_NUMBERS // (lanes * lanes))
        self._local = threading.local()  # per sweep thread scratch, as the engine keeps its own

    def max_chunk_size(self) -> int | None:
        return None

    def _buf(self, name: str, numel: int, dtype, device) -> torch.Tensor:
        """A scratch buffer of this thread, kept between draws (fresh CPU buffers of megabytes
        cost more in page faults than the whole draw)."""
        scratch = self._local.__dict__.setdefault("buffers", {})
        k = (name, dtype, torch.device(device))
        buf = scratch.get(k)
        if buf is None or buf.numel() < numel:
            buf = scratch[k] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def probe_key(self, run_seed: int, step: int, probe: int, num_probes: int) -> int:
        """Fresh lane streams for every probe: the standard key (the bank needs no ordinal)."""
        return rng.probe_seed(run_seed, step, probe)

    def lane_numbers(self, key: int, block: int, device="cpu") -> torch.Tensor:
        """x_k(c) for the cycles of one block: shape (block_cycles, lanes), float32; row r is
        cycle ``block * block_cycles + r``, column k is lane k."""
        x = torch.empty(self.block_cycles, self.lanes, dtype=torch.float32, device=device)
        self._fill(key, block, block + 1, x)
        return x

    def _fill(self, key: int, b0: int, b1: int, dst: torch.Tensor) -> None:
        """Write blocks b0 to b1 - 1, each from its own generator, into ``dst`` (cycles, lanes).
        8- and 16-bit levels are cut from random 64-bit words (7 bytes or 3 half-words of a word's
        63 random bits), as a hardware generator emits words; other widths draw one number each."""
        nb, size, bits, device = b1 - b0, self.block_cycles * self.lanes, self.bits, dst.device
        gens = [rng.generator(rng.mix(key, 0x42414E4B, b), device) for b in range(b0, b1)]
        if bits in (8, 16):
            per_word, small = (7, torch.int8) if bits == 8 else (3, torch.int16)
            n_words = -(-size // per_word)
            words = self._buf("words", nb * n_words, torch.int64, device).view(nb, n_words)
            for row, gen in zip(words, gens):
                row.random_(generator=gen)
            cut = self._buf("cut", nb * n_words * per_word, small, device).view(nb, n_words, per_word)
            levels = cut.copy_(words.view(small).view(nb, n_words, -1)[:, :, :per_word]).view(nb, -1)
        else:
            levels = self._buf("levels", nb * size, torch.float32, device).view(nb, -1)
            for row, gen in zip(levels, gens):
                if bits is None:
                    row.uniform_(-1, 1, generator=gen)
                else:
                    row.random_(-(1 << (bits - 1)), 1 << (bits - 1), generator=gen)
        dst.view(nb, self.block_cycles, self.lanes).copy_(levels[:, :size].view(nb, self.block_cycles, -1))
        if bits is not None:
            dst.add_(0.5).mul_(1.0 / (1 << (bits - 1)))

    def chunk(self, key: int, out: torch.Tensor):
        raise TypeError("pezo-bank directions depend on position: engines call chunk_at")

    def chunk_at(self, key: int, position: Position, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        n, lanes, width, per_block = out.numel(), self.lanes, self.lanes * self.reuse, self.block_cycles
        if n == 0:
            return out, self.alpha
        first = position.flat_start
        c0, c1 = first // width, (first + n - 1) // width  # the cycles this chunk touches
        b0 = c0 // per_block
        b1 = c1 // per_block + 1
        rows, wide = (b1 - b0) * per_block, 2 * lanes if lanes > 1 else 1
        doubled = self._buf("doubled", rows * wide, torch.float32, out.device).view(rows, wide)
        self._fill(key, b0, b1, doubled[:, :lanes])
        r0, r1 = c0 - b0 * per_block, c1 - b0 * per_block + 1
        if lanes == 1:
            x = doubled[r0:r1]
        else:
            # Row r (cycle c = b0 * per_block + r, and c = r mod n as blocks start at multiples of
            # n) rotated left by c mod n: with rows doubled, rotated[g, j, s] = x[g n + j, (j + s)
            # mod n] is the strided view doubled[g n + j, j + s], address g 2n^2 + j (2n + 1) + s.
            doubled[:, lanes:].copy_(doubled[:, :lanes])
            rotated = doubled.as_strided((rows // lanes, lanes, lanes), (2 * lanes * lanes, 2 * lanes + 1, 1))
            g0, g1 = r0 // lanes, -(-r1 // lanes)
            rot = self._buf("rot", (g1 - g0) * lanes * lanes, torch.float32, out.device)
            x = rot.view(g1 - g0, lanes, lanes).copy_(rotated[g0:g1]).view(-1, lanes)
            x = x[r0 - g0 * lanes : r1 - g0 * lanes]
        if self.reuse > 1:  # slot s of a cycle reads lane (s mod n + c) mod n
            rep = self._buf("rep", x.shape[0] * width, torch.float32, out.device)
            x = rep.view(-1, self.reuse, lanes).copy_(x.unsqueeze(1).expand(-1, self.reuse, -1))
        a = first - c0 * width
        out.copy_(x.reshape(-1)[a : a + n])
        return out, self.alpha
