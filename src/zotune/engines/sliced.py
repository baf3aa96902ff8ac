r"""Sliced offload: each rank of a node stores, loads and writes back only its slice of a block.

DistZO2's communication strategy (research/zo2_distzo2.md, sections 9.2 and 13.9) on the offload
engine (``engines/offload.py``). The ranks of one node (the *slice group*,
``distributed/slices.py``) cut every streamed block into ``R`` contiguous slices at chunk
boundaries of the parameter layout; rank ``k`` owns slice ``k`` of every block. For each block of a
pass over the blocks, every rank

1. loads its own slice from its own storage (``1/R`` of the block over its own host link),
2. all-gathers the slices over the group (gloo on CPU, NCCL on GPU: the device-to-device link),
   so every rank holds the whole block in its compute slot,
3. moves the block to its points and runs them (the offload engine's arithmetic, unchanged),
4. writes back only its own slice.

**Host storage is sharded by slice owner**: with ``offload_to="cpu"`` each rank's slices are
shared-memory files (``/dev/shm``), with ``"disk"`` safetensors files under
``offload_dir/rank-NNNNN/`` (atomic write-back as the disk tier's); a node therefore holds one
copy of the model instead of one per rank.

**Same numbers as unsliced.** Every rank assembles the block it would have held unsliced and
makes the same chunk moves on it, so losses and parameters are bitwise the unsliced (and the
in-memory) engine's (tests/test_sliced_offload.py). A rank stores the slice it owns after its own
moves: under data parallelism every rank made the same moves, so the slices agree; under point
parallelism the ranks visited different points, but their ZO tensors have master copies and
every move rewrites them as ``round(master + point)``, so a block's stored values between steps
never enter the arithmetic. Because slices are whole chunks, the values a rank stores are whole
chunks, each the result of the moves of its own key. (Every rank still regenerates the whole
block's directions: it needs the whole block at its own points for its forward.)

**Between uses** the blocks' parameters are views of the node's slices (every rank maps the
others' files; a tensor cut by a slice boundary is a copy assembled from its pieces), so rank 0
evaluates and writes checkpoints from an ordinary module, with no collective. Each pass over the
blocks ends with one 8-byte barrier so that every slice is written before anyone reads it; a
value written through the parameters (loading a checkpoint, :meth:`write`) is pushed into the
owner's storage.

**Collectives.** Every pass over the blocks is collective: all ranks of the group must stream the
same blocks in the same order. So a rank with no points to evaluate (point parallelism with more
ranks than points) still serves its slices, an update applied immediately (``defer=False``) is
replayed at once (one more pass; the unsliced engine fuses it into the next upload), and
:meth:`catch_up` streams every block whenever it streams any. Call ``flush()`` on every rank
before one rank alone reads or evaluates the model (``zotune train`` does).

Cost per step and rank: the unsliced engine's draws and compute; storage traffic ``1/R`` of the
blocks each way; an all-gather of ``max_k len_k`` elements per block and one 8-byte barrier.
On a CPU compute device host storage *is* compute memory, so slicing saves memory (one copy per
node), not time; the time gain is for GPUs behind one host (PCIe per GPU, NVLink between them).
"""
from __future__ import annotations

import os
import struct
import tempfile
import time
from pathlib import Path

import torch

from ..distributed.slices import SliceGroup, block_cuts, slice_group
from ..errors import ZotuneError
from .offload import OffloadEngine
from .tiers import DiskTier, OffloadError


def _read_range(block, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Elements ``start:stop`` of ``block``'s flat layout, from its parameters' current values."""
    for p, off in zip(block.params, block.offsets):
        lo, hi = max(start, off), min(stop, off + p.numel())
        if lo < hi:
            out[lo - start:hi - start].copy_(p.data.reshape(-1)[lo - off:hi - off])
    return out


def _check_all(group: SliceGroup, error: Exception | None, what: str) -> None:
    """Raise on every rank of the group if any rank failed (not a hang at the next collective)."""
    if group.size > 1:
        flags = group.comm.all_gather(torch.tensor([int(error is None)]), group.group, what)
        ok = all(int(f[0]) for f in flags)
    else:
        ok = error is None
    if error is not None:
        raise error
    if not ok:
        raise OffloadError("another rank of this node could not create its slice storage (its "
                           "error says why); stopping this rank too")


class SharedSliceTier:
    """Host memory, sliced: this rank's slice of each block in a shared-memory file that every
    rank of the node maps (the files are unlinked once mapped: the memory is freed when the last
    rank exits, however it exits)."""

    kind = "cpu"

    def __init__(self, blocks, cuts: dict, group: SliceGroup, root: str | None = None) -> None:
        self.blocks = {b.index: b for b in blocks}
        self.cuts, self.group = cuts, group
        self.bytes_read = self.bytes_written = 0
        if root is None:
            root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
                else tempfile.gettempdir()
        token = group.agree(int.from_bytes(os.urandom(7), "little"), "start: slice storage name")
        self.dir = Path(root) / f"zotune-slices-{token:014x}"
        k = group.index
        own, error = {}, None
        try:
            self.dir.mkdir(exist_ok=True)
            for b in blocks:
                start, stop = cuts[b.index][k]
                own[b.index] = _read_range(b, start, stop, self._map(b.index, k, create=True))
        except OSError as err:
            error = OffloadError(f"shared memory {root!r} cannot hold this rank's slices "
                                 f"({err.strerror or err}); free memory or use --offload-to disk")
        try:
            _check_all(group, error, "start: slice storage")
        except ZotuneError:
            for j in self.blocks:
                self._path(j, k).unlink(missing_ok=True)
            raise
        self.slices = {j: [own[j] if r == k else self._map(j, r) for r in range(group.size)]
                       for j in self.blocks}
        group.barrier("start: slice storage")
        for j in self.blocks:
            self._path(j, k).unlink(missing_ok=True)
        group.barrier("start: slice storage")
        if k == 0:
            try:
                self.dir.rmdir()
            except OSError:
                pass

    def _path(self, j: int, r: int) -> Path:
        return self.dir / f"rank-{self.group.ranks[r]:05d}-block-{j:05d}"

    def _map(self, j: int, r: int, create: bool = False) -> torch.Tensor:
        b = self.blocks[j]
        start, stop = self.cuts[j][r]
        if stop == start:
            return torch.empty(0, dtype=b.dtype)
        path, nbytes = self._path(j, r), (stop - start) * b.params[0].element_size()
        if create:  # allocated now: a full tmpfs is an error here, not a SIGBUS at a later write
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            finally:
                os.close(fd)
        return torch.from_file(str(path), shared=True, size=stop - start, dtype=b.dtype)

    def own(self, j: int) -> torch.Tensor:
        """This rank's slice of block ``j`` (its storage)."""
        return self.slices[j][self.group.index]

    def sources(self, j: int) -> list[torch.Tensor]:
        """Every owner's slice of block ``j``, in slice order."""
        return self.slices[j]

    def load(self, j: int, out: torch.Tensor) -> torch.Tensor:
        src = self.own(j)
        self.bytes_read += src.numel() * src.element_size()
        return out[:src.numel()].copy_(src)

    def store(self, j: int, src: torch.Tensor, meta: dict | None = None) -> None:
        dst = self.own(j)
        self.bytes_written += dst.numel() * dst.element_size()
        dst.copy_(src[:dst.numel()])

    def close(self) -> None:
        pass


class _Slice:
    """One block's slice, in the shape :class:`DiskTier` expects of a block (one flat tensor)."""

    def __init__(self, block, start: int, stop: int, values: torch.Tensor) -> None:
        self.index, self.dtype = block.index, block.dtype
        self.names, self.params, self.offsets = ["slice"], [values], [0]
        self.start, self.stop, self.block_numel = start, stop, block.numel
        self.numel = stop - start
        self.nbytes = self.numel * block.params[0].element_size()

    def bind(self, flat: torch.Tensor) -> None:  # the engine binds the parameters itself
        pass


class DiskSliceTier(DiskTier):
    """Disk, sliced: this rank's slices as safetensors files under ``directory/rank-NNNNN/``
    (the disk tier's files, written back atomically, with ``slice_start``, ``slice_stop`` and
    ``block_numel`` in the metadata). ``directory`` must be shared by the ranks of a node."""

    def __init__(self, directory, blocks, cuts: dict, group: SliceGroup, *, fsync: bool = True,
                 page_cache: bool = True) -> None:
        self.root, self.cuts, self.group = Path(directory).expanduser(), cuts, group
        k = group.index
        slices = []
        for b in blocks:
            start, stop = cuts[b.index][k]
            slices.append(_Slice(b, start, stop, _read_range(b, start, stop,
                                                              torch.empty(stop - start, dtype=b.dtype))))
        error = None
        try:
            super().__init__(self.rank_dir(k), slices, fsync=fsync, page_cache=page_cache)
        except OffloadError as err:
            error = err
        _check_all(group, error, "start: slice storage")

    def rank_dir(self, r: int) -> Path:
        """The directory of slice owner ``r`` (by its global rank, unique across nodes)."""
        return self.root / f"rank-{self.group.ranks[r]:05d}"

    def _header(self, j: int, meta: dict) -> bytes:
        s = self.blocks[j]
        return super()._header(j, {**meta, "slice_start": s.start, "slice_stop": s.stop,
                                   "block_numel": s.block_numel})

    def own(self, j: int) -> torch.Tensor:
        return self.view(j)

    def sources(self, j: int) -> list[torch.Tensor]:
        """Every owner's slice of block ``j`` (memory maps of their files, as they are now)."""
        out = []
        for r, (start, stop) in enumerate(self.cuts[j]):
            if r == self.group.index:
                out.append(self.view(j))
                continue
            dtype = self.blocks[j].dtype
            if stop == start:
                out.append(torch.empty(0, dtype=dtype))
                continue
            path = self.rank_dir(r) / self.path(j).name
            with open(path, "rb") as f:
                offset = 8 + struct.unpack("<Q", f.read(8))[0]
            size = offset + (stop - start) * self.blocks[j].params[0].element_size()
            raw = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
            out.append(raw[offset:].view(dtype))
        return out


class SlicedOffloadEngine(OffloadEngine):
    """The offload engine with every block sliced among the ranks of a node; see the module
    docstring.

    Args: as :class:`~zotune.engines.offload.OffloadEngine`, plus
        topology: this rank's place in the mesh (``zotune.distributed.init``); the slice group
            is the ranks of its node (``LOCAL_WORLD_SIZE``).

    ``overlap`` has no effect: a pass loads, gathers, computes and writes back each block in
    order on the calling thread (a GPU pipeline would gather block j+1 while j computes).
    """

    def __init__(self, tensors, direction, *, topology, **options) -> None:
        if topology is None:
            raise ZotuneError("sliced offload slices blocks among the ranks of a parallel run: "
                              "pass parallel='ddp', 'pertp' or '2d' (--parallel)")
        for key in ("transfer_dtype", "storage_dtype"):
            if options.get(key) not in (None, "fp32", torch.float32):
                raise ZotuneError(f"sliced offload streams fp32 blocks in this version; {key}="
                                  f"{options[key]!r} is not supported with it (drop --offload-sliced "
                                  f"or --{key.replace('_', '-')})")
        self.slice_group = slice_group(topology)
        self.cuts: dict[int, list[tuple[int, int]]] = {}
        self._staging: torch.Tensor | None = None
        super().__init__(tensors, direction, **options)
        self._block_of = {ti: u.block for u in self._block_units if u.offloaded for ti in u.tensors}
        self._settle()

    def _make_tier(self, offloaded, offload_dir, *, fsync: bool, page_cache: bool):
        chunks = {id(t.param): t.chunks for t in self.tensors}
        for b in offloaded:
            self.cuts[b.index] = block_cuts(b.offsets, [p.numel() for p in b.params],
                                            [chunks.get(id(p)) for p in b.params], self.slice_group.size)
        if self.offload_to == "cpu":
            return SharedSliceTier(offloaded, self.cuts, self.slice_group)
        return DiskSliceTier(offload_dir, offloaded, self.cuts, self.slice_group, fsync=fsync,
                             page_cache=page_cache)

    # ------------------------------------------------------------------ slices
    def gather_bytes(self) -> int:
        """Bytes this rank sends in the all-gathers of one pass over the blocks."""
        if self.slice_group.size == 1:
            return 0
        item = self._blocks[0].params[0].element_size()
        return sum(max(e - s for s, e in cuts) * item for cuts in self.cuts.values())

    def _assemble(self, j: int, slot: torch.Tensor) -> None:
        """Block ``j`` into ``slot``: this rank's slice from its storage, the others' gathered."""
        cuts, group = self.cuts[j], self.slice_group
        width = max(e - s for s, e in cuts)
        need = (group.size + 1) * width
        if self._staging is None or self._staging.numel() < need or self._staging.dtype != slot.dtype:
            self._staging = torch.empty(need, dtype=slot.dtype, device=slot.device)
        send = self._staging[:width]
        parts = [self._staging[(r + 1) * width:(r + 2) * width] for r in range(group.size)]
        self.tier.load(j, send)
        group.gather(send, parts)
        for (s, e), part in zip(cuts, parts):
            slot[s:e].copy_(part[:e - s])

    def _bind_between_uses(self, j: int) -> None:
        """Point block ``j``'s parameters at the node's slices (a tensor cut by a slice boundary:
        a copy assembled from its pieces)."""
        block, cuts, sources = self._blocks[j], self.cuts[j], self.tier.sources(j)
        for p, off in zip(block.params, block.offsets):
            n = p.numel()
            owner = next((r for r, (s, e) in enumerate(cuts) if s <= off and off + n <= e), None)
            if owner is not None:
                s = cuts[owner][0]
                p.data = sources[owner][off - s:off - s + n].view(p.shape)
                continue
            flat = torch.empty(n, dtype=block.dtype)
            for (s, e), src in zip(cuts, sources):
                lo, hi = max(s, off), min(e, off + n)
                if lo < hi:
                    flat[lo - off:hi - off].copy_(src[lo - s:hi - s])
            p.data = flat.view(p.shape)

    def _settle(self) -> None:
        """Wait until every rank wrote its slices, then bind the parameters to them."""
        self.slice_group.barrier()
        for j in self.cuts:
            self._bind_between_uses(j)

    def _push(self, j: int) -> None:
        """Write this rank's slice of block ``j`` from its parameters' current values."""
        s, e = self.cuts[j][self.slice_group.index]
        self.tier.store(j, _read_range(self._blocks[j], s, e, torch.empty(e - s, dtype=self._blocks[j].dtype)))

    # ------------------------------------------------------------------ streaming
    def _stream(self, units, work) -> None:
        """Run ``work(unit)`` for each block unit in order; an offloaded block is assembled in
        the compute slot, worked on, and this rank's slice written back (module docstring)."""
        timing, streamed = self.timing, False
        for unit in units:
            if not unit.offloaded:
                start = time.perf_counter()
                work(unit)
                timing.compute[unit.block] += time.perf_counter() - start
                continue
            streamed = True
            j, block = unit.block, self._blocks[unit.block]
            slot = self.streamer.slots()[0].compute[:block.numel]
            start = time.perf_counter()
            self._assemble(j, slot)
            timing.load[j] += time.perf_counter() - start
            block.bind(slot)
            start = time.perf_counter()
            work(unit)
            timing.compute[j] += time.perf_counter() - start
            start = time.perf_counter()
            s, e = self.cuts[j][self.slice_group.index]
            self.tier.store(j, slot[s:e], {"moves": unit.done})
            timing.store[j] += time.perf_counter() - start
        if streamed:
            self._settle()
        timing.bytes_read = self.tier.bytes_read

    def catch_up(self, every: bool = False) -> None:
        """As the offload engine's, but a pass streams every block whenever it streams any (or
        with ``every``): the ranks of the group must gather the same blocks."""
        end = self._end()
        self.partial = None  # as the offload engine's: a stopped evaluation is redone after this
        for unit in (*self._pre_units, *self._post_units):
            self._advance(unit, end)
        if every or any(u.done < end for u in self._block_units):
            self._stream(self._block_units, lambda unit: self._advance(unit, end))
        self._trim()

    def checkpoint_groups(self, params: dict) -> list:
        """None: between uses the parameters already are views of the node's slices (or copies
        assembled from them), so a checkpoint reads and writes them as ordinary tensors, and
        :meth:`load_state_dict` pushes what a load wrote into the owners' storage."""
        return []

    # ------------------------------------------------------------------ contract
    def evaluate(self, plan, objective) -> list:
        """The offload engine's; a rank with no points still takes part in the pass (its slices)."""
        if plan.num_points == 0:
            self.catch_up(every=True)
            return []
        return super().evaluate(plan, objective)

    def apply(self, update, defer: bool = False) -> None:
        """As in-memory; an immediate update is replayed at once (a collective pass) so that no
        rank is left with blocks behind that only it would stream."""
        super().apply(update, defer)
        if not defer:
            self.catch_up()

    def sync(self, ti: int) -> None:
        """As in-memory, and the tensor's block slice pushed into this rank's storage."""
        super().sync(ti)
        j = self._block_of.get(ti)
        if j is not None:
            self._push(j)
            self._settle()

    def load_state_dict(self, state: dict) -> None:
        """As the offload engine's; the parameters (a loaded checkpoint) are pushed into the
        slices."""
        super().load_state_dict(state)
        for j in self.cuts:
            self._push(j)
        self._settle()
