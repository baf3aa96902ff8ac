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

Parts: the units (``units.py``), a tied table's rows per point (``rows.py``), the ring of slots
blocks go through (``slots.py``: CPU threads or CUDA streams), low-precision transfer and storage
(``wire.py``), an evaluation stopped part-way (``partial.py``); docs/offload.md.

Throughput: :attr:`OffloadEngine.timing` collects per-block transfer and compute time;
:func:`zotune.engines.throughput.throughput` says which bounds the step and the tokens per step that
would hide the transfers (research note 9.3).
"""
from __future__ import annotations

import contextlib

import torch

from .. import rng
from ..directions import Direction
from ..errors import ZotuneError
from ..models.blocks import block_table, unwrap
from ..plan import ProbePlan, Terms
from . import partial, rows, streaming, wire
from .base import MicroBatches, Update, check_update
from .in_memory import InMemoryEngine
from .partial import Pass
from .slots import BlockStreamer
from .throughput import Timing, throughput  # noqa: F401  (re-exported)
from .tiers import CpuTier, DiskTier
from .units import Unit, build_units, checkpoint_groups, place_resident

OFFLOAD_TO = ("cpu", "disk")


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
        transfer_dtype: ``"bf16"``/``"fp16"``: blocks travel and compute in it, an fp32 master
            stays in the tier; storage_dtype: ``"bf16"``: the tier stores bf16, written back
            with keyed stochastic rounding (``engines/wire.py``). Default: the model's dtype.
        device: the compute device (default: the model's); ``"cuda"`` with ``offload_to="cpu"``
            keeps the blocks in pinned host memory and moves everything else to the GPU.
    """

    needs_model = True

    def __init__(self, tensors, direction: Direction, *, chunk_size: int = rng.DEFAULT_CHUNK_SIZE,
                 master_weights="auto", threads=None, rng_device=None, model=None,
                 offload_to: str = "cpu", offload_dir=None, resident_blocks: int = 0,
                 overlap: bool = True, fsync: bool = True, page_cache: bool = True,
                 transfer_dtype=None, storage_dtype=None, device=None) -> None:
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
        base = unwrap(model)
        model_dtype = next(base.parameters()).dtype
        transfer = wire.parse_dtype(transfer_dtype, "transfer_dtype", wire.TRANSFER_DTYPES) or model_dtype
        storage = wire.parse_dtype(storage_dtype, "storage_dtype", wire.STORAGE_DTYPES) or model_dtype
        if (transfer, storage) != (model_dtype, model_dtype) and model_dtype != torch.float32:
            raise ZotuneError(f"transfer_dtype/storage_dtype keep an fp32 master of the blocks; "
                              f"this model is {model_dtype}: load it in fp32 (--dtype fp32)")
        self._compute_device = place_resident(base, table, device, offload_to)
        if rng_device is None:
            rng_device = self._compute_device.type
        super().__init__(tensors, direction, chunk_size=chunk_size, master_weights=master_weights,
                         threads=threads, rng_device=rng_device)
        self.model, self.table = model, table
        self.offload_to, self.overlap = offload_to, bool(overlap)
        self.resident_blocks = int(resident_blocks)
        self.transfer_dtype, self.storage_dtype = transfer, storage
        self._units, self._blocks = build_units(self, base)
        offloaded = [wire.stored_as(b, storage) for b in self._blocks if b.index >= self.resident_blocks]
        self.tier = self._make_tier(offloaded, offload_dir, fsync=fsync, page_cache=page_cache)
        master = (transfer, storage) != (model_dtype, model_dtype)
        self._casts = []
        if master:  # the tier (or a slot) holds the block's master: no second copy of it
            for unit in self._block_units:
                if unit.offloaded:
                    for ti in unit.tensors:
                        self.tensors[ti].master = None
            self._casts = [wire.CastToBlockDtype(table.block_module(base, j))
                           for j in range(table.num_blocks)]
        self.streamer = BlockStreamer(self, overlap=self.overlap, compute_dtype=transfer,
                                      master=master, storage_dtype=storage)
        self._casts += self.streamer.outside_calls(base, table)
        self._log: list[tuple[Terms, Update | None]] = []
        self._log_start = 0  # absolute position of _log[0]
        self._streaming = False
        self._by_rows, self._copies, self._rows = False, [], {}
        self.lookup_numbers_drawn = 0.0
        """Draws beyond the in-memory engine's (not in ``numbers_drawn``): the pre pass's rows of a tied
        table (``_rows_at``) and slots re-materialised at a point (``BlockStreamer.materialise``)."""
        self.timing = Timing()
        self.timing.reset(table.num_blocks)
        out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        self._vocab = out.weight.shape[0] if out is not None else base.config.vocab_size
        self._logit_dtype = out.weight.dtype if out is not None else torch.float32
        # A model call from outside (evaluation, generation) first brings every block up to date.
        self._hook = base.register_forward_pre_hook(self._outside_call)

    def _make_tier(self, offloaded, offload_dir, *, fsync: bool, page_cache: bool):
        """The storage of the offloaded blocks (a subclass may store them otherwise:
        ``engines/sliced.py`` keeps only this rank's slices)."""
        if self.offload_to == "cpu":
            return CpuTier(offloaded, pin=self._compute_device.type == "cuda")
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

    def _advance(self, unit: Unit, upto: int) -> None:
        """Replay the logged moves ``unit.done:upto`` on the unit's tensors (in place)."""
        rounds = unit.offloaded and self.streamer.low_storage
        for point, update in self._log[unit.done - self._log_start: upto - self._log_start]:
            jobs = [(ti, c) for ti in unit.tensors for c in range(len(self.tensors[ti].chunks))
                    if self.tensors[ti].role == "zo"
                    or (update is not None and update.touches(ti, self.tensors[ti].role))]
            current = unit.current

            def job(job, point=point, update=update, current=current):
                if not (rounds and update is not None):
                    return self._move_chunk(job[0], job[1], point, update, current)
                # a low-precision tier: the updated master is rounded to a storage number (keyed
                # stochastic rounding) before the perturbation, so a write-back at any moment
                # stores exactly what the rest of the evaluation computes from
                drawn = self._move_chunk(job[0], job[1], (), update, current)
                wire.round_chunk(self.tensors[job[0]], job[1], wire.sr_key(update))
                return drawn + self._move_chunk(job[0], job[1], point, None, ())
            self.numbers_drawn += sum(self._map(job, jobs))
            unit.current, unit.fresh = point, False
        unit.done = max(unit.done, upto)

    def _trim(self) -> None:
        low = min(u.done for u in self._units)
        del self._log[:low - self._log_start]
        self._log_start = low

    # ------------------------------------------------------------------ contract
    def evaluate(self, plan: ProbePlan, objective) -> list:
        """The objective at every point of ``plan``, one pass over the blocks (module docstring).
        An evaluation stopped by an exception continues where it stopped when asked the same
        plan again (``engines/partial.py``): bitwise the uninterrupted result."""
        num = plan.num_points
        if num == 0:
            return []
        parts = objective.parts if isinstance(objective, MicroBatches) else [objective]
        base = unwrap(self.model)
        recorded = [streaming.record(part, self._vocab, self._logit_dtype, forbid=base) for part in parts]
        calls = [call for part in recorded for call in part]
        run = self.partial if isinstance(self.partial, Pass) and self.partial.matches(plan, calls) else None
        if run is None:
            positions = []
            for i in range(num):
                pending, self.pending = self.pending, None
                self.move(plan.point_terms(i), pending)
                positions.append(self._end())
            run = Pass(plan, positions, [c.kwargs["input_ids"].cpu() for c in calls])
        self.partial = run
        self._streaming = True
        try:
            self._pre_pass(calls, run)
            self._block_pass(calls, run)
            self._post_pass(calls, run)
        finally:
            self._streaming = False
        for i in range(len(run.values), num):
            k, out = 0, []
            for part, part_calls in zip(parts, recorded):
                out.append(streaming.replay(part, part_calls, run.logits[i][k:k + len(part_calls)]))
                k += len(part_calls)
            run.values.append(out[0] if len(parts) == 1 and not isinstance(objective, MicroBatches)
                              else sum(float(v) for v in out) / len(out))
        self.partial = None
        self._trim()
        self.timing.steps += 1
        self.timing.tokens += num * sum(int(c.kwargs["attention_mask"].sum()) for c in calls)
        return run.values

    def flush(self) -> None:
        """Apply a held update and remove any perturbation, in every block (one pass over the tier)."""
        super().flush()
        self.catch_up()

    def catch_up(self) -> None:
        """Bring every unit to the end of the log: the parameters are then what the in-memory
        engine would hold (a pass over the blocks that have moves to replay)."""
        end = self._end()
        self.partial = None  # a stopped evaluation is redone (correct, not bitwise) after this
        for unit in (*self._pre_units, *self._post_units):
            self._advance(unit, end)
        behind = [u for u in self._block_units if u.done < end]
        self._stream(behind, lambda unit: self._advance(unit, end))
        self._trim()

    def load_state_dict(self, state: dict) -> None:
        """As in-memory; the parameters (the tier's storage) hold the saved base plus point,
        or, for an evaluation stopped part-way, each unit's point (``engines/partial.py``)."""
        super().load_state_dict({**state, "partial": None})
        self._log.clear()
        self._log_start = 0
        for unit in self._units:
            unit.done, unit.current = 0, self.current
        if state.get("offload_partial") is not None:
            self.partial = partial.restore(self, state["offload_partial"])

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
        run = self.partial if isinstance(self.partial, Pass) else None
        saved = partial.state(self, run) if run is not None else None
        if run is None:
            self.catch_up()
        self.partial = None
        try:
            state = super().state_dict()
        finally:
            self.partial = run
        return {**state, "offload_partial": saved}

    def checkpoint_groups(self, params: dict) -> list:
        """Offloaded blocks for streamed checkpoints, one block at a time (``checkpoint_stream``)."""
        return checkpoint_groups(self, params)

    def close(self) -> None:
        self.streamer.close()
        for cast in self._casts:  # cast hooks and CUDA evaluation hooks
            cast.remove()
        self._hook.remove()
        super().close()

    # ------------------------------------------------------------------ passes
    def _pre_pass(self, calls, run: Pass) -> None:
        """Per point and call: block 0's input; per call: every block's recorded arguments.

        Tensors used before and after the blocks (``shared``) hold one point at a time. Either
        they move with the post pass and the pre pass computes just the embedding rows it looks
        up, from copies of their chunks (``_rows_at``: extra draws, no tensor-sized copy), or,
        where that is not exact (a stateful rule's update in the moves, a master copy, a shared
        tensor that is not an embedding table), they move here and are copied per point."""
        shared = [self.tensors[ti] for ti in self._shared.tensors]
        positions = run.positions
        if run.by_rows is None:
            moves = self._log[self._shared.done - self._log_start: positions[-1] - self._log_start]
            run.by_rows = bool(shared) and bool(self._lookups) and all(
                u is None or not getattr(u.rule, "state_names", ()) for _, u in moves)
        self._by_rows = run.by_rows
        if self._by_rows and run.pre_done < len(positions):  # every point's rows, one pass over the moves
            ids = torch.cat([c.kwargs["input_ids"].reshape(-1) for c in calls]).unique()
            self._rows = {ti: (ids, self._rows_at(ti, ids, positions)) for ti in self._lookups}
        for i in range(run.pre_done, len(positions)):
            pos = positions[i]
            self._advance(self._pre_units[0], pos)
            if not self._by_rows:
                self._advance(self._shared, pos)
                if i < len(positions) - 1 and shared:
                    if len(self._copies) <= i:  # kept between steps: no allocation per step
                        self._copies.append([torch.empty_like(t.param.data) for t in shared])
                    del run.snapshots[i:]
                    run.snapshots.append([b.copy_(t.param.data) for b, t in zip(self._copies[i], shared)])
            run.args = {} if run.args is None else run.args
            with self._row_lookups(i, pos) if self._by_rows else contextlib.nullcontext():
                for c, call in enumerate(calls):
                    full = c not in run.args  # the first point records every block's arguments
                    run.hidden[i, c], sink = streaming.run_pre(call, self.table, all_blocks=full)
                    run.through[i, c] = 0
                    if full:
                        run.args[c] = sink
            run.pre_done = i + 1
        self._rows = {}

    _row_lookups = rows.row_lookups  # the tied table's rows per point (engines/rows.py)
    _rows_at = rows.rows_at

    def _block_pass(self, calls, run: Pass) -> None:
        streams = [(i, c) for i in range(len(run.positions)) for c in range(len(calls))]
        todo = [u for u in self._block_units if any(run.through[s] <= u.block for s in streams)]
        if todo and (run.args is None or len(run.args) < len(calls)):  # resumed from a checkpoint
            run.args = {c: streaming.run_pre(call, self.table, all_blocks=True)[1]
                        for c, call in enumerate(calls)}

        def compute(unit):
            block, j = self.table.block_module(self.model, unit.block), unit.block
            for i, pos in enumerate(run.positions):
                due = [c for c in range(len(calls)) if run.through[i, c] == j]
                if not due:
                    continue
                self._advance(unit, pos)
                self.streamer.materialise(unit)
                for c in due:
                    run.hidden[i, c] = streaming.run_block(block, run.hidden[i, c], run.args[c][j])
                    run.through[i, c] = j + 1

        self._stream(todo, compute)

    def _post_pass(self, calls, run: Pass) -> None:
        shared = [self.tensors[ti] for ti in self._shared.tensors]
        live = [t.param.data for t in shared]
        try:
            for i in range(len(run.logits), len(run.positions)):
                pos = run.positions[i]
                for unit in self._post_units:
                    self._advance(unit, pos)
                if self._by_rows:
                    self._advance(self._shared, pos)
                values = run.snapshots[i] if i < len(run.snapshots) else live
                for t, v in zip(shared, values):
                    t.param.data = v
                run.logits.append([streaming.run_post(call, self.table, run.hidden[i, c])
                                   for c, call in enumerate(calls)])
        finally:
            for t, v in zip(shared, live):
                t.param.data = v

    # ------------------------------------------------------------------ streaming blocks
    def _stream(self, units, work) -> None:
        """Run ``work(unit)`` for each block unit in order, each offloaded block resident while
        it runs (``engines/slots.py``: in place in host memory, or through a ring of slots)."""
        self.streamer.run(units, work)

    def _outside_call(self, module, args) -> None:
        if not self._streaming and self._log and any(u.done < self._end() for u in self._units):
            self.catch_up()
