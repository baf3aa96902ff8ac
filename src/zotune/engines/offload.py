r"""The offload engine: blocks live in a storage tier and stream through the compute device.

ZO2's idea (Wang et al., 2025; research/zo2_distzo2.md), done generically from the block table
(``models/blocks.py``) instead of per-architecture rewritten forwards. The embeddings, the final
norm and the head stay resident; each transformer block lives in a tier (``engines/tiers.py``:
host memory, or safetensors files on disk) and is brought to the compute device when the forward
reaches it. **Every point of the step's plan is evaluated while the block is resident** (each
point's activations travel as their own stream), so a block crosses the link once per step, not
once per point:

    pre:    for each point p: embeddings at p -> h[p]            (resident)
    blocks: for each block j: load j (prefetched) ; for p: move j to p ; h[p] = block_j(h[p]) ;
            store j (written back behind the next block)
    post:   for each point p: final norm and head at p -> logits[p] -> the objective's loss

How the forward is driven without touching modeling code is ``engines/streaming.py``.

**Same numbers as the in-memory engine.** The engine is the in-memory engine's arithmetic
(it subclasses it and calls the same per-chunk ``_move_chunk``) on a different schedule. Every
``move(point, update)`` of the engine contract is appended to a log; each *unit* (the embeddings,
the post-block modules, every block) replays the log up to the point it needs when it is touched,
from its own current point. So each tensor goes through exactly the sequence of chunk moves the
in-memory engine makes, with the same keys: losses and parameters are bitwise equal on CPU in
fp32 (tests/test_offload.py), with or without deferred updates. An update the caller applies
immediately is replayed at the block's next touch, fused with its upload; a deferred one is fused
into the first probe's move as in-memory. ``flush()`` replays everything (one pass over the tier),
so evaluation and checkpoints see the iterate (ZO2 never flushes its lagging update). Tensors used
both before and after the blocks (a head tied to the embeddings) are one layout tensor, perturbed
and updated once; they hold one point at a time, so the pre pass either keeps a copy of them per
point but the last (host memory) or computes only the embedding rows it looks up (disk tier; see
:meth:`OffloadEngine._pre_pass`).

Cost per step (P points, N blocks): each block read once and written once; the same draws and
sweeps as in-memory; the embeddings pass and the head pass each run once more per point on an
already-computed input (a lookup; ``logits_to_keep`` positions); the objective's loss code runs
P + 1 times (once to learn its model calls).

Throughput: :attr:`OffloadEngine.timing` collects per-block transfer and compute time;
:func:`zotune.engines.throughput.throughput` says which bounds the step and the tokens per step that
would hide the transfers (research note 9.3).
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .. import rng
from ..directions import Direction
from ..errors import ZotuneError
from ..models.blocks import block_table, unwrap
from ..plan import ProbePlan, Terms
from . import streaming
from .base import MicroBatches, Update, check_update
from .in_memory import InMemoryEngine
from .throughput import Timing, throughput  # noqa: F401  (re-exported)
from .tiers import BlockParams, CpuTier, DiskTier

OFFLOAD_TO = ("cpu", "disk")


@dataclass
class _Unit:
    """Tensors moved together: the embeddings (``pre``), the post-block modules (``post``), the
    tensors used on both sides (``shared``), or one block. ``done``: log position replayed."""

    name: str
    tensors: list[int]
    block: int | None = None
    offloaded: bool = False
    done: int = 0
    current: Terms = ()


class _RowLookup(torch.nn.Module):
    """Stands in for an embedding table in the pre pass: ``rows(unique ids)`` gathered."""

    def __init__(self, rows) -> None:
        super().__init__()
        self.rows = rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        return self.rows(unique)[inverse]


class OffloadEngine(InMemoryEngine):
    """Streams a causal LM's blocks from a storage tier; see the module docstring.

    Args: as :class:`~zotune.engines.InMemoryEngine`, plus
        model: the model (its block table says what streams).
        offload_to: ``"cpu"`` (host memory) or ``"disk"`` (``offload_dir``).
        offload_dir: directory of the disk tier (created; must be writable with room for the model).
        resident_blocks: the first this many blocks stay resident (never offloaded).
        overlap: with the disk tier, read the next block and write back the last one on
            background threads while a block computes; ``False`` runs everything in order.
        fsync: ``fsync`` each block file written (disk tier).
        page_cache: ``False`` evicts the disk tier's pages after each read and write
            (:class:`~zotune.engines.tiers.DiskTier`).
    """

    needs_model = True

    def __init__(self, tensors, direction: Direction, *, chunk_size: int = rng.DEFAULT_CHUNK_SIZE,
                 master_weights="auto", threads=None, rng_device=None, model=None,
                 offload_to: str = "cpu", offload_dir=None, resident_blocks: int = 0,
                 overlap: bool = True, fsync: bool = True, page_cache: bool = True) -> None:
        if model is None:
            raise ZotuneError("engine 'offload' needs the model: ZOOptimizer(model, engine='offload', ...) "
                              "or model=model")
        if offload_to not in OFFLOAD_TO:
            raise ZotuneError(f"unknown offload_to {offload_to!r}; valid: {', '.join(OFFLOAD_TO)}")
        if offload_to == "disk" and not offload_dir:
            raise ZotuneError("offload_to='disk' needs offload_dir (--offload-dir DIR)")
        table = block_table(model)
        if table.family == "sequential" or not table.blocks:
            raise ZotuneError(f"engine 'offload' streams causal LMs with a block table; "
                              f"{type(unwrap(model)).__name__} has none (family {table.family!r})")
        if not 0 <= int(resident_blocks) <= table.num_blocks:
            raise ZotuneError(f"resident_blocks must be between 0 and {table.num_blocks}, "
                              f"got {resident_blocks}")
        super().__init__(tensors, direction, chunk_size=chunk_size, master_weights=master_weights,
                         threads=threads, rng_device=rng_device)
        self.model, self.table = model, table
        self.offload_to, self.overlap = offload_to, bool(overlap)
        self.resident_blocks = int(resident_blocks)
        base = unwrap(model)
        self._compute_device = next(base.parameters()).device
        if self._compute_device.type != "cpu":
            raise ZotuneError("engine 'offload' computes on CPU in this version (the CUDA slot "
                              "pipeline is not written yet); use --device cpu")
        self._units, self._blocks = self._build_units(base)
        offloaded = [b for b in self._blocks if b.index >= self.resident_blocks]
        self.tier = self._make_tier(offloaded, offload_dir, fsync=fsync, page_cache=page_cache)
        self._log: list[tuple[Terms, Update | None]] = []
        self._log_start = 0  # absolute position of _log[0]
        self._slots: list[torch.Tensor] = []
        self._io: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None
        self._streaming = False
        self._by_rows, self._snapshots, self._copies, self._rows = False, [], [], {}
        self.lookup_numbers_drawn = 0.0
        """Draws of the pre pass's embedding-row lookups (``_rows_at``), beyond ``numbers_drawn``."""
        self.timing = Timing()
        self.timing.reset(table.num_blocks)
        out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        self._vocab = out.weight.shape[0] if out is not None else base.config.vocab_size
        self._logit_dtype = out.weight.dtype if out is not None else torch.float32
        # A model call from outside (evaluation, generation) first brings every block up to date.
        self._hook = base.register_forward_pre_hook(self._outside_call)

    # ------------------------------------------------------------------ structure
    def _build_units(self, base):
        table = self.table
        side: dict[int, set] = {}
        for path in table.embeddings:
            for p in base.get_submodule(path).parameters():
                side.setdefault(id(p), set()).add("pre")
        for path in (table.final_norm, table.head):
            if path:
                for p in base.get_submodule(path).parameters():
                    side.setdefault(id(p), set()).add("post")
        blocks, owner = [], {}
        for j in range(table.num_blocks):
            named, seen = [], set()
            for name, p in table.block_module(base, j).named_parameters():
                if id(p) in owner and owner[id(p)] != j:
                    raise ZotuneError(f"parameter {name!r} is shared between blocks {owner[id(p)]} and "
                                      f"{j}; engine 'offload' streams blocks with their own parameters")
                if id(p) in side:
                    raise ZotuneError(f"parameter {name!r} of block {j} is also used outside the blocks; "
                                      "engine 'offload' cannot stream it")
                if id(p) not in seen:
                    seen.add(id(p))
                    owner[id(p)] = j
                    named.append((name, p))
            blocks.append(BlockParams(j, named))
        units = {name: _Unit(name, []) for name in ("pre", "post", "shared")}
        block_units = [_Unit(f"block {j}", [], block=j, offloaded=j >= self.resident_blocks)
                       for j in range(table.num_blocks)]
        for t in self.tensors:
            j = owner.get(id(t.param))
            if j is not None:
                block_units[j].tensors.append(t.spec.index)
                continue
            sides = side.get(id(t.param), set())
            units[sides.pop() if len(sides) == 1 else "shared"].tensors.append(t.spec.index)
        self._pre_units = [units["pre"], units["shared"]]
        self._post_units = [units["post"]]
        self._shared = units["shared"]
        # Shared tensors that are plain embedding tables (a tied head): the pre pass needs only the
        # rows it looks up, computed from copies of their chunks, instead of a copy per point.
        lookups = {}
        for path in table.embeddings:
            module = base.get_submodule(path)
            if isinstance(module, torch.nn.Embedding) and module.max_norm is None:
                for ti in units["shared"].tensors:
                    if self.tensors[ti].param is module.weight and self.tensors[ti].master is None:
                        lookups[ti] = path
        # Rows cost draws (the table once more per point), copies cost memory (one table per
        # point but the last): on the disk tier memory is what is short, in host memory time.
        self._lookups = (lookups if len(lookups) == len(units["shared"].tensors)
                         and self.offload_to == "disk" else {})
        self._block_units = block_units
        return [*units.values(), *block_units], blocks

    def _make_tier(self, offloaded, offload_dir, *, fsync: bool, page_cache: bool):
        """The storage of the offloaded blocks (a subclass may store them otherwise:
        ``engines/sliced.py`` keeps only this rank's slices)."""
        if self.offload_to == "cpu":
            return CpuTier(offloaded, pin=False)
        return DiskTier(offload_dir, offloaded, fsync=fsync, page_cache=page_cache)

    @property
    def device(self) -> torch.device:
        return self._compute_device

    # ------------------------------------------------------------------ the log
    def _end(self) -> int:
        return self._log_start + len(self._log)

    def move(self, point: Terms = (), update: Update | None = None) -> None:
        """Log a move to ``base' + point`` (``base'``: after ``update``); units replay it when
        touched (:meth:`_advance`), all of them at :meth:`flush`."""
        check_update(update)
        point = tuple((k, a) for k, a in point if a != 0.0)
        if update is None and point == self.current:
            return
        self._log.append((point, update))
        self.current = point
        self.sweeps += 1

    def _advance(self, unit: _Unit, upto: int) -> None:
        """Replay the logged moves ``unit.done:upto`` on the unit's tensors (in place)."""
        for point, update in self._log[unit.done - self._log_start: upto - self._log_start]:
            jobs = [(ti, c) for ti in unit.tensors for c in range(len(self.tensors[ti].chunks))
                    if self.tensors[ti].role == "zo"
                    or (update is not None and update.touches(ti, self.tensors[ti].role))]
            current = unit.current
            self.numbers_drawn += sum(self._map(
                lambda job: self._move_chunk(job[0], job[1], point, update, current), jobs))
            unit.current = point
        unit.done = max(unit.done, upto)

    def _trim(self) -> None:
        low = min(u.done for u in self._units)
        del self._log[:low - self._log_start]
        self._log_start = low

    # ------------------------------------------------------------------ contract
    def evaluate(self, plan: ProbePlan, objective) -> list:
        """The objective at every point of ``plan``, one pass over the blocks (module docstring)."""
        num = plan.num_points
        if num == 0:
            return []
        parts = objective.parts if isinstance(objective, MicroBatches) else [objective]
        base = unwrap(self.model)
        recorded = [streaming.record(part, self._vocab, self._logit_dtype, forbid=base) for part in parts]
        calls = [call for part in recorded for call in part]
        positions = []
        for i in range(num):
            pending, self.pending = self.pending, None
            self.move(plan.point_terms(i), pending)
            positions.append(self._end())
        self._streaming = True
        try:
            hidden, args = self._pre_pass(calls, positions)
            self._block_pass(hidden, args, positions)
            logits = self._post_pass(calls, hidden, positions)
        finally:
            self._streaming = False
            self._snapshots = []
        self._trim()
        self.timing.steps += 1
        self.timing.tokens += num * sum(int(c.kwargs["attention_mask"].sum()) for c in calls)
        values = []
        for i in range(num):
            k, out = 0, []
            for part, part_calls in zip(parts, recorded):
                out.append(streaming.replay(part, part_calls, logits[i][k:k + len(part_calls)]))
                k += len(part_calls)
            values.append(out[0] if len(parts) == 1 and not isinstance(objective, MicroBatches)
                          else sum(float(v) for v in out) / len(out))
        return values

    def flush(self) -> None:
        """Apply a held update and remove any perturbation, in every block (one pass over the tier)."""
        super().flush()
        self.catch_up()

    def catch_up(self) -> None:
        """Bring every unit to the end of the log: the parameters are then what the in-memory
        engine would hold (a pass over the blocks that have moves to replay)."""
        end = self._end()
        for unit in (*self._pre_units, *self._post_units):
            self._advance(unit, end)
        behind = [u for u in self._block_units if u.done < end]
        self._stream(behind, lambda unit: self._advance(unit, end))
        self._trim()

    def load_state_dict(self, state: dict) -> None:
        """As in-memory; the parameters (the tier's storage) hold the saved base plus point."""
        super().load_state_dict(state)
        self._log.clear()
        self._log_start = 0
        for unit in self._units:
            unit.done, unit.current = 0, self.current

    def base(self, ti: int) -> torch.Tensor:
        self.catch_up()
        return super().base(ti)

    def read(self, ti: int) -> torch.Tensor:
        self.catch_up()
        return super().read(ti)

    def write(self, ti: int, values: torch.Tensor) -> None:
        self.catch_up()
        super().write(ti, values)

    def state_dict(self) -> dict:
        self.catch_up()
        return super().state_dict()

    def close(self) -> None:
        if self._io is not None:
            for pool in self._io:
                pool.shutdown()
            self._io = None
        self._hook.remove()
        super().close()

    # ------------------------------------------------------------------ passes
    def _pre_pass(self, calls, positions):
        """Per point and call: block 0's input; per call: every block's recorded arguments.

        Tensors used before and after the blocks (``shared``) hold one point at a time. Either
        they move with the post pass and the pre pass computes just the embedding rows it looks
        up, from copies of their chunks (``_rows_at``: extra draws, no tensor-sized copy), or,
        where that is not exact (a stateful rule's update in the moves, a master copy, a shared
        tensor that is not an embedding table), they move here and are copied per point."""
        hidden, args, self._snapshots = {}, {}, []
        shared = [self.tensors[ti] for ti in self._shared.tensors]
        end = positions[-1]
        moves = self._log[self._shared.done - self._log_start: end - self._log_start]
        self._by_rows = bool(shared) and bool(self._lookups) and all(
            u is None or not getattr(u.rule, "state_names", ()) for _, u in moves)
        if self._by_rows:  # every point's looked-up rows, in one pass over the moves
            ids = torch.cat([c.kwargs["input_ids"].reshape(-1) for c in calls]).unique()
            self._rows = {ti: (ids, self._rows_at(ti, ids, positions)) for ti in self._lookups}
        for i, pos in enumerate(positions):
            self._advance(self._pre_units[0], pos)
            if not self._by_rows:
                self._advance(self._shared, pos)
                if i < len(positions) - 1 and shared:
                    if len(self._copies) <= i:  # kept between steps: no allocation per step
                        self._copies.append([torch.empty_like(t.param.data) for t in shared])
                    self._snapshots.append([b.copy_(t.param.data) for b, t in zip(self._copies[i], shared)])
            with self._row_lookups(i, pos) if self._by_rows else contextlib.nullcontext():
                for c, call in enumerate(calls):
                    hidden[i, c], sink = streaming.run_pre(call, self.table, all_blocks=i == 0)
                    if i == 0:
                        args[c] = sink
        self._rows = {}
        return hidden, args

    @contextlib.contextmanager
    def _row_lookups(self, i: int, upto: int):
        """The shared embedding modules replaced by lookups of their rows at point ``i``."""
        base, swapped = unwrap(self.model), []

        def rows(ti, ids):
            known, values = self._rows[ti]
            at = torch.searchsorted(known, ids).clamp(max=len(known) - 1)
            if bool((known[at] == ids).all()):
                return values[i][at]
            return self._rows_at(ti, ids, [upto])[0]  # ids the calls did not show: computed apart

        try:
            for ti, path in self._lookups.items():
                parent_path, _, child = path.rpartition(".")
                parent = base.get_submodule(parent_path) if parent_path else base
                swapped.append((parent, child, parent.get_submodule(child)))
                setattr(parent, child, _RowLookup(lambda ids, ti=ti: rows(ti, ids)))
            yield
        finally:
            for parent, child, original in reversed(swapped):
                setattr(parent, child, original)

    def _rows_at(self, ti: int, rows: torch.Tensor, positions: list[int]) -> list[torch.Tensor]:
        """Rows ``rows`` (sorted, unique) of 2-D tensor ``ti`` as they will be at each log position
        of ``positions`` (ascending): each chunk holding one of them is copied and moved along the
        log by the chunk moves :meth:`_advance` makes, so the values are bitwise the ones the
        tensor will hold. Cost: the draws of those moves on those chunks, one chunk of memory."""
        t, unit = self.tensors[ti], self._shared
        width = t.param.shape[1]
        flat_idx = (rows.to(torch.long)[:, None] * width + torch.arange(width)).reshape(-1)
        out = [torch.empty(flat_idx.numel(), dtype=t.param.dtype) for _ in positions]
        bounds = torch.tensor([s for s, _ in t.chunks] + [t.chunks[-1][1]])
        cuts = torch.searchsorted(flat_idx, bounds).tolist()
        for c, (s, e) in enumerate(t.chunks):
            lo, hi = cuts[c], cuts[c + 1]
            if lo == hi:
                continue
            scratch, current, done = t.flat[s:e].clone(), unit.current, unit.done
            for k, upto in enumerate(positions):
                for point, update in self._log[done - self._log_start: upto - self._log_start]:
                    if t.role == "zo" or (update is not None and update.touches(ti, t.role)):
                        self.lookup_numbers_drawn += self._move_chunk(ti, c, point, update, current,
                                                                      scratch)
                    current = point
                done = max(done, upto)
                out[k][lo:hi] = scratch[flat_idx[lo:hi] - s]
        return [o.view(len(rows), width) for o in out]

    def _block_pass(self, hidden, args, positions):
        def compute(unit):
            block = self.table.block_module(self.model, unit.block)
            for i, pos in enumerate(positions):
                self._advance(unit, pos)
                for c in args:
                    hidden[i, c] = streaming.run_block(block, hidden[i, c], args[c][unit.block])

        self._stream(self._block_units, compute)

    def _post_pass(self, calls, hidden, positions):
        shared = [self.tensors[ti] for ti in self._shared.tensors]
        live = [t.param.data for t in shared]
        logits = []
        try:
            for i, pos in enumerate(positions):
                for unit in self._post_units:
                    self._advance(unit, pos)
                if self._by_rows:
                    self._advance(self._shared, pos)
                values = self._snapshots[i] if i < len(self._snapshots) else live
                for t, v in zip(shared, values):
                    t.param.data = v
                logits.append([streaming.run_post(call, self.table, hidden[i, c])
                               for c, call in enumerate(calls)])
        finally:
            for t, v in zip(shared, live):
                t.param.data = v
        return logits

    # ------------------------------------------------------------------ streaming blocks
    def _stream(self, units, work) -> None:
        """Run ``work(unit)`` for each block unit in order, each offloaded block resident while
        it runs: in place in host memory (CPU tier), or loaded into a slot, worked on and
        written back (disk tier; the next load and the last write-back overlap the work)."""
        timing = self.timing
        if self.offload_to == "cpu" or not any(u.offloaded for u in units):
            for unit in units:
                start = time.perf_counter()
                work(unit)
                timing.compute[unit.block] += time.perf_counter() - start
            return
        disk = [u for u in units if u.offloaded]
        slots = self._get_slots(3 if self.overlap else 1)
        loads, stores = {}, {}
        io = self._get_io() if self.overlap else None

        def load(u, slot):
            start = time.perf_counter()
            out = self.tier.load(u.block, slot)
            timing.load[u.block] += time.perf_counter() - start
            return out

        def store(u, slot):
            start = time.perf_counter()
            self.tier.store(u.block, slot, {"moves": u.done})
            timing.store[u.block] += time.perf_counter() - start

        def submit(fn, *a):
            if io is None:
                fn(*a)
                return None
            return io[fn is store].submit(fn, *a)  # a reader and a writer thread

        order = {u.block: k for k, u in enumerate(disk)}
        for unit in units:
            if not unit.offloaded:
                start = time.perf_counter()
                work(unit)
                timing.compute[unit.block] += time.perf_counter() - start
                continue
            k = order[unit.block]
            slot = slots[k % len(slots)]
            if k == 0:
                loads[0] = submit(load, unit, slot)
            wait = time.perf_counter()
            if loads.get(k) is not None:
                loads[k].result()
            timing.wait += time.perf_counter() - wait
            if io is not None and k + 1 < len(disk):  # prefetch into the slot block k-2 drained
                if k - 2 in stores:
                    stores.pop(k - 2).result()
                    self._rebind(disk[k - 2])
                loads[k + 1] = submit(load, disk[k + 1], slots[(k + 1) % len(slots)])
            block = self._blocks[unit.block]
            block.bind(slot[:block.numel])
            start = time.perf_counter()
            work(unit)
            timing.compute[unit.block] += time.perf_counter() - start
            stores[k] = submit(store, unit, slot)
            if io is None:
                self._rebind(unit)
                stores.pop(k)
                if k + 1 < len(disk):
                    loads[k + 1] = submit(load, disk[k + 1], slots[(k + 1) % len(slots)])
        for k in sorted(stores):
            stores[k].result()
            self._rebind(disk[k])
        self.timing.bytes_read = self.tier.bytes_read

    def _rebind(self, unit: _Unit) -> None:
        """Point an offloaded block's parameters back at its tier storage."""
        self._blocks[unit.block].bind(self.tier.view(unit.block))

    def _get_slots(self, n: int) -> list[torch.Tensor]:
        numel = max(b.numel for b in self._blocks)
        dtype = self._blocks[0].dtype
        while len(self._slots) < n:
            self._slots.append(torch.empty(numel, dtype=dtype, device=self._compute_device))
        return self._slots[:n]

    def _get_io(self):
        if self._io is None:
            # One reader, one writer; a load into a slot is submitted only once the store that
            # drains that slot has finished (waited on in _stream).
            self._io = (ThreadPoolExecutor(1, thread_name_prefix="zotune-offload-read"),
                        ThreadPoolExecutor(1, thread_name_prefix="zotune-offload-write"))
        return self._io

    def _outside_call(self, module, args) -> None:
        if not self._streaming and self._log and any(u.done < self._end() for u in self._units):
            self.catch_up()
