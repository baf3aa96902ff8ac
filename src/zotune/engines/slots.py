"""How the offload engine brings blocks through the compute device: a ring of fixed slots.

A *slot* is pre-allocated once: a compute buffer (the block's parameters are bound to it while it
works, in the compute dtype), and when the block has an fp32 master apart from its compute copy
(``engines/wire.py``) a master buffer and, for a low-precision tier, a staging buffer. The
:class:`Ring` schedules N blocks over S slots, block k in slot k mod S:

    load(k)    into its slot, after the drain of the block that used the slot before (k - S)
    compute(k) after load(k); with S >= 2, load(k + 1) is issued before compute(k) (prefetch)
    store(k)   after compute(k) (drain: the write-back)

It only orders operations through the events the three operations return, so one schedule
serves two executors: :class:`_Threads` (CPU compute: a reader and a writer thread for the disk
tier, futures as events; or everything inline) and :class:`_Cuda` (a copy stream and a drain
stream beside the compute stream, CUDA events between them, pinned host buffers, and **no host
synchronisation inside the loop**: the host waits once, after the last drain). Three slots are
what overlap needs: one computing, one being filled, one draining; a slot is filled only after
its drain event (ZO2's allocator race, research/zo2_distzo2.md H1, cannot happen: no buffer is
ever freed or reallocated).

If ``compute(k)`` raises (Ctrl-C inside block k's forward), the block is still written back if
its parameters were bound (the moves it made are then in the tier, matching the engine's
bookkeeping), the in-flight operations are waited for, and a prefetched block is dropped unused.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch



@dataclass
class Slot:
    compute: torch.Tensor
    master: torch.Tensor | None = None
    staging: torch.Tensor | None = None


class Ring:
    """The slot schedule (module docstring); ``ops`` provides ``load(k, s, after)``,
    ``compute(k, s, after)``, ``store(k, s, after)`` (each returning an event or None),
    ``rescue(k, s)`` (store a block whose compute raised, when it had been bound) and ``wait``."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a ring needs at least one slot, got {slots}")
        self.slots = slots

    def run(self, count: int, ops) -> None:
        n = self.slots
        drained: list = [None] * n
        loaded: dict = {}
        computing = None
        try:
            if count:
                loaded[0] = ops.load(0, 0, drained[0])
            for k in range(count):
                s = k % n
                if n >= 2 and k + 1 < count:
                    loaded[k + 1] = ops.load(k + 1, (k + 1) % n, drained[(k + 1) % n])
                computing = k
                done = ops.compute(k, s, loaded.pop(k))
                drained[s] = ops.store(k, s, done)
                computing = None
                if n == 1 and k + 1 < count:
                    loaded[k + 1] = ops.load(k + 1, 0, drained[0])
        except BaseException:
            if computing is not None:
                drained[computing % n] = ops.rescue(computing, computing % n)
            for event in [*drained, *loaded.values()]:  # in flight: finished, errors dropped
                try:
                    ops.wait(event)
                except Exception:  # noqa: BLE001 - the first error is the one raised
                    pass
            raise
        for event in [*drained, *loaded.values()]:
            ops.wait(event)


class BlockStreamer:
    """Runs work on the engine's offloaded blocks, each resident in a slot while it runs.

    Modes (chosen by the engine): ``inplace`` (host-memory tier, CPU compute, one dtype: the
    tier buffer *is* the compute memory, no copy); otherwise the ring of slots. ``master``: the
    block tensors have an fp32 master apart from the compute copy (``transfer_dtype`` or a
    low-precision tier); ``tier_is_master``: that master is the host tier's buffer itself."""

    def __init__(self, engine, *, overlap: bool, compute_dtype: torch.dtype, master: bool,
                 storage_dtype: torch.dtype) -> None:
        self.engine, self.tier, self.blocks = engine, engine.tier, engine._blocks
        self.device = engine._compute_device
        self.cuda = self.device.type == "cuda"
        self.compute_dtype, self.master, self.storage_dtype = compute_dtype, master, storage_dtype
        self.low_storage = storage_dtype != engine._blocks[0].dtype
        host_tier = self.tier.kind == "cpu" and not self.cuda
        self.inplace = host_tier and not master
        self.tier_is_master = host_tier and master and not self.low_storage
        self.threads = overlap and self.tier.kind == "disk" and not self.cuda
        self.ring = Ring(3 if (self.threads or (overlap and self.cuda)) else 1)
        self._slots: list[Slot] = []
        self._io = None
        self.offsets = {}  # per block: (layout tensor index, element offset in the block)
        for unit in engine._block_units:
            b = self.blocks[unit.block]
            where = {id(p): off for p, off in zip(b.params, b.offsets)}
            self.offsets[unit.block] = [(ti, where[id(engine.tensors[ti].param)]) for ti in unit.tensors]

    # ------------------------------------------------------------------ slots
    def slots(self) -> list[Slot]:
        numel = max(b.numel for b in self.blocks)
        model_dtype, store_dtype = self.blocks[0].dtype, self.storage_dtype
        while len(self._slots) < self.ring.slots:
            new = lambda dtype: torch.empty(numel, dtype=dtype, device=self.device)  # noqa: E731
            need_master = self.master and not self.tier_is_master
            need_staging = self.low_storage and (self.tier.kind == "disk" or self.cuda)
            self._slots.append(Slot(new(self.compute_dtype), new(model_dtype) if need_master else None,
                                    new(store_dtype) if need_staging else None))
        return self._slots

    def fill(self, slot: Slot, j: int) -> None:
        """Block ``j`` from the tier into ``slot`` (the master, then the compute copy)."""
        n = self.blocks[j].numel
        if not self.master:
            self._read(j, slot.compute)
            return
        master = self._master(slot, j)
        if not self.tier_is_master:
            if self.low_storage:
                low = self.tier.view(j) if slot.staging is None else self._read(j, slot.staging)
                master.copy_(low)
            else:
                self._read(j, master)
        slot.compute[:n].copy_(master)

    def drain(self, slot: Slot, j: int, unit) -> None:
        """Block ``j`` from ``slot`` back to the tier (the master; for a low-precision tier an
        exact cast: the engine rounded the master stochastically when it updated it; nothing when
        the master is the tier buffer itself)."""
        n = self.blocks[j].numel
        if not self.master:
            self._write(j, slot.compute[:n])
        elif self.low_storage:
            out = self.tier.view(j) if slot.staging is None else slot.staging[:n]
            out.copy_(slot.master[:n])
            if slot.staging is not None:
                self._write(j, out)
        elif not self.tier_is_master:
            self._write(j, slot.master[:n])

    def _master(self, slot: Slot, j: int) -> torch.Tensor:
        return self.tier.view(j) if self.tier_is_master else slot.master[:self.blocks[j].numel]

    def _read(self, j: int, out: torch.Tensor) -> torch.Tensor:
        if self.cuda:  # pinned host buffer -> device, on the caller's (copy) stream
            src = self.tier.view(j)
            self.tier.bytes_read += src.numel() * src.element_size()
            return out[:src.numel()].copy_(src, non_blocking=True)
        return self.tier.load(j, out)

    def _write(self, j: int, src: torch.Tensor) -> None:
        if self.cuda:  # device -> pinned host buffer, on the caller's (drain) stream
            dst = self.tier.view(j)
            self.tier.bytes_written += dst.numel() * dst.element_size()
            dst.copy_(src[:dst.numel()], non_blocking=True)
        else:
            self.tier.store(j, src, {"moves": self.engine._block_units[j].done})

    def bind(self, slot: Slot, unit) -> None:
        """The block's parameters (and masters) are views of ``slot`` while it works."""
        b = self.blocks[unit.block]
        b.bind(slot.compute[:b.numel])
        if self.master:
            master = self._master(slot, unit.block)
            for ti, off in self.offsets[unit.block]:
                t = self.engine.tensors[ti]
                t.master = master[off:off + t.param.numel()]
        unit.fresh = True

    def materialise(self, unit) -> None:
        """A slot filled from a master holds the master: put the unit's current point on it
        (only when no move has rewritten it since; extra draws, ``lookup_numbers_drawn``)."""
        engine = self.engine
        if unit.fresh and unit.current and self.master:
            for ti in unit.tensors:
                if engine.tensors[ti].role == "zo":
                    for c in range(len(engine.tensors[ti].chunks)):
                        engine.lookup_numbers_drawn += engine._move_chunk(ti, c, unit.current, None,
                                                                          unit.current)
        unit.fresh = False

    def rebind(self, unit) -> None:
        """The block's parameters back on their tier storage (no master between uses)."""
        self.blocks[unit.block].bind(self.tier.view(unit.block))
        if self.master:
            for ti, _ in self.offsets[unit.block]:
                self.engine.tensors[ti].master = None

    # ------------------------------------------------------------------ running
    def run(self, units, work) -> None:
        """``work(unit)`` for each block unit in order, each offloaded block resident while it
        runs; per-block times go to the engine's ``timing``."""
        timing = self.engine.timing
        offloaded = [u for u in units if u.offloaded]
        if self.inplace or not offloaded:
            for unit in units:
                start = time.perf_counter()
                work(unit)
                timing.compute[unit.block] += time.perf_counter() - start
            return
        ops = _Cuda(self, offloaded, work) if self.cuda else _Threads(self, offloaded, work)
        for unit in units:  # resident blocks run in order between the offloaded ones
            if unit.offloaded:
                continue
            start = time.perf_counter()
            work(unit)
            timing.compute[unit.block] += time.perf_counter() - start
        try:
            self.ring.run(len(offloaded), ops)
        finally:
            ops.finish()
            timing.bytes_read = self.tier.bytes_read

    def outside_calls(self, base, table) -> list:
        """On CUDA, hooks that bring each offloaded block through slot 0 when the model is
        called from outside the engine (evaluation, generation): its blocks live on the host
        between uses. Nothing is written back (such a call does not move parameters)."""
        if not self.cuda:
            return []
        handles = []
        for unit in self.engine._block_units:
            if not unit.offloaded:
                continue
            module = table.block_module(base, unit.block)

            def pre(module, args, unit=unit):
                if not self.engine._streaming:
                    slot = self.slots()[0]
                    self.fill(slot, unit.block)  # on the current stream: ordered with the compute
                    self.bind(slot, unit)
                    self.materialise(unit)

            def post(module, args, output, unit=unit):
                if not self.engine._streaming:
                    self.rebind(unit)
            handles += [module.register_forward_pre_hook(pre, prepend=True), module.register_forward_hook(post)]
        return handles

    def close(self) -> None:
        if self._io is not None:
            for pool in self._io:
                pool.shutdown()
            self._io = None


class _Threads:
    """CPU compute: loads on a reader thread and write-backs on a writer thread (``threads``),
    or everything inline; futures are the events."""

    def __init__(self, streamer: BlockStreamer, units, work) -> None:
        self.st, self.units, self.work = streamer, units, work
        self.slots = streamer.slots()
        self.bound: set[int] = set()
        if streamer.threads and streamer._io is None:
            streamer._io = (ThreadPoolExecutor(1, thread_name_prefix="zotune-offload-read"),
                            ThreadPoolExecutor(1, thread_name_prefix="zotune-offload-write"))
        self.io = streamer._io if streamer.threads else None

    def _submit(self, pool: int, fn):
        return fn() if self.io is None else self.io[pool].submit(fn)

    def wait(self, event) -> None:
        if event is not None:
            event.result()

    def load(self, k, s, after):
        unit, timing = self.units[k], self.st.engine.timing

        def fn():
            self.wait(after)  # the slot's previous block has drained
            start = time.perf_counter()
            self.st.fill(self.slots[s], unit.block)
            timing.load[unit.block] += time.perf_counter() - start
        return self._submit(0, fn)

    def compute(self, k, s, after):
        unit, timing = self.units[k], self.st.engine.timing
        start = time.perf_counter()
        self.wait(after)
        timing.wait += time.perf_counter() - start
        self.st.bind(self.slots[s], unit)
        self.bound.add(k)
        start = time.perf_counter()
        self.work(unit)
        timing.compute[unit.block] += time.perf_counter() - start
        return None

    def store(self, k, s, after):
        unit, timing = self.units[k], self.st.engine.timing

        def fn():
            start = time.perf_counter()
            self.st.drain(self.slots[s], unit.block, unit)
            timing.store[unit.block] += time.perf_counter() - start
        return self._submit(1, fn)

    def rescue(self, k, s):
        return self.store(k, s, None) if k in self.bound else None

    def finish(self) -> None:
        for k in self.bound:  # after every store has finished (Ring.run waited for them)
            self.st.rebind(self.units[k])


class _Cuda:
    """CUDA compute: fills on a copy stream, drains on a drain stream, compute on the current
    stream, ordered by CUDA events; the host waits only in :meth:`finish` (after the loop).
    Not run in this project's tests (no GPU); its schedule is :class:`Ring`'s, which is."""

    def __init__(self, streamer: BlockStreamer, units, work) -> None:
        self.st, self.units, self.work = streamer, units, work
        self.slots = streamer.slots()
        device = streamer.device
        if not hasattr(streamer, "_streams"):
            streamer._streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        self.copy, self.drain = streamer._streams
        self.compute_stream = torch.cuda.current_stream(device)
        self.bound: set[int] = set()

    @staticmethod
    def _event(stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, event) -> None:
        pass  # the host waits once, in finish(); a fill dropped by a stop is ordered before the
        # next fill of its slot on the same copy stream

    def load(self, k, s, after):
        with torch.cuda.stream(self.copy):
            if after is not None:
                self.copy.wait_event(after)
            self.st.fill(self.slots[s], self.units[k].block)
            return self._event(self.copy)

    def compute(self, k, s, after):
        self.compute_stream.wait_event(after)
        self.st.bind(self.slots[s], self.units[k])
        self.bound.add(k)
        self.work(self.units[k])
        return self._event(self.compute_stream)

    def store(self, k, s, after):
        with torch.cuda.stream(self.drain):
            if after is not None:
                self.drain.wait_event(after)
            self.st.drain(self.slots[s], self.units[k].block, self.units[k])
            return self._event(self.drain)

    def rescue(self, k, s):
        return self.store(k, s, self._event(self.compute_stream)) if k in self.bound else None

    def finish(self) -> None:
        self.drain.synchronize()  # the one host wait of a pass: the tier buffers are then current
        for k in self.bound:
            self.st.rebind(self.units[k])
