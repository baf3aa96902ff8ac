r"""The model runner: the one place a causal LM is called, on left-padded token rows.

Rows are padded on the left, so every row ends in the last column and a candidate's scored
positions are the last ``keep`` columns; only those logits are computed, through transformers'
documented ``logits_to_keep`` argument. Positions are passed explicitly (``cumsum(mask) - 1``), so a
row's logits do not depend on how much it is padded (OPT computes exactly these itself; RoPE and
GPT-2 models otherwise shift with padding). That is what lets the runner, on CPU, split a batch into
length buckets, each padded to its own longest row (:func:`length_buckets`): a short prompt no
longer pays for the longest one. On GPUs, where small calls are launch-bound, it keeps one call.

Feature reuse: :meth:`ModelRunner.forward_from` restarts a forward at block j from a given input of
block j (captured earlier with :meth:`ModelRunner.block_inputs` or :meth:`ModelRunner.capture`),
without computing blocks 0..j-1. It uses the model's block table (``zotune.models.block_table``),
forward pre-hooks, and pass-through modules put in place of the skipped blocks for the duration of
the call; no modeling code is copied.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from zotune.models.blocks import block_table, unwrap

CPU_CALL_OVERHEAD_TOKENS = 64
"""A model call's fixed cost on CPU, in padded tokens: the best of 0-128 for SmolLM2-135M on 2
cores, SST-2 and RTE alike (0.59x and 0.57x the time of one padded call; measured by
``benchmarks/forward_buckets.py``, recorded in docs/benchmarks.md)."""


def length_buckets(lengths: list[int], overhead: float) -> list[list[int]]:
    r"""Split rows into groups, each padded to its own longest row, at the least cost.

    Groups are runs of the rows sorted by length; dynamic programming over the cut points
    minimises :math:`\sum_g (|g| \max_{i \in g} \ell_i + c)` for lengths :math:`\ell` and a
    per-call overhead c (in tokens). O(R^2) for R rows. Returns lists of row indices.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):  # group order[start:end], padded to sorted_lengths[end - 1]
            cost = best[start] + (end - start) * sorted_lengths[end - 1] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


@dataclass(frozen=True)
class ModelCall:
    """One model call as :meth:`ModelRunner.call` makes it: the runner and the model's keyword
    arguments (``input_ids``, ``attention_mask``, ``position_ids``, ``logits_to_keep``, ...)."""

    runner: "ModelRunner"
    kwargs: dict


_INTERCEPT: contextvars.ContextVar = contextvars.ContextVar("zotune_model_call", default=None)


@contextlib.contextmanager
def intercept_calls(fn):
    """Within the ``with`` block, every :meth:`ModelRunner.call` hands its :class:`ModelCall` to
    ``fn`` and uses what ``fn`` returns as the model's logits, instead of calling the model.

    This is the seam a streaming engine drives an objective through (``engines/offload.py``): it
    runs the objective once to learn its calls, computes their logits block by block for every
    point of a plan, and runs the objective again per point with those logits. The objective's own
    code (encoding, losses) runs unchanged."""
    token = _INTERCEPT.set(fn)
    try:
        yield
    finally:
        _INTERCEPT.reset(token)


@dataclass(frozen=True)
class BlockInput:
    """What block ``block`` received in one model call: its hidden states [R, L, d] and that
    call's attention mask [R, L] and position ids (None where the model takes none); exactly the
    arguments :meth:`ModelRunner.forward_from` needs to restart there."""

    block: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its input. What it returns is never used, since the
    restarted block's pre-hook replaces its input, so it fits any family's return convention (a
    tensor in transformers 5, a tuple in 4.x)."""

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs.get("hidden_states")


class ModelRunner:
    """Calls a causal LM on token rows; every model call of an objective goes through here.

    Args:
        model: a Hugging Face causal LM (or a peft, DDP or ``torch.compile`` wrapper of one).
        pad_id: token id of padding (its value never changes a logit: it is masked).
        device: where inputs are put; None (default) follows the model's first parameter at
            every call. An engine that places the model gives it explicitly.
        pad_to_multiple_of: pad each call to a multiple of this (MeZO uses 8 on GPUs).
        bucket_overhead: what one extra call costs, in padded tokens, when :meth:`forward` splits
            rows by length; ``"auto"`` (default) is :data:`CPU_CALL_OVERHEAD_TOKENS` on CPU and no
            splitting elsewhere; None never splits.

    Attributes:
        sequences_run: rows sent through the model so far (for cost accounting).
    """

    def __init__(self, model, *, pad_id: int, device: torch.device | str | None = None,
                 pad_to_multiple_of: int | None = None, bucket_overhead: float | str | None = "auto"):
        if not (bucket_overhead in ("auto", None) or (isinstance(bucket_overhead, (int, float))
                                                      and bucket_overhead >= 0)):
            raise ValueError(f"bucket_overhead must be 'auto', None or a number >= 0, got {bucket_overhead!r}")
        self.model, self.pad_id = model, pad_id
        self.device = device
        self.pad_to_multiple_of = pad_to_multiple_of
        self.bucket_overhead = bucket_overhead
        params = inspect.signature(unwrap(model).forward).parameters
        # Models without these arguments still work: padded positions, or full logits sliced.
        self.takes_position_ids = "position_ids" in params
        self.takes_logits_to_keep = "logits_to_keep" in params
        self.sequences_run = 0
        self._table = None
        self._recorders: list[tuple[list, list[BlockInput], int]] = []

    @property
    def device(self) -> torch.device:
        """The device inputs are put on (the model's first parameter's, unless given)."""
        if self._device is not None:
            return self._device
        return next(self.model.parameters()).device

    @device.setter
    def device(self, device) -> None:
        self._device = None if device is None else torch.device(device)

    @property
    def table(self):
        """The model's block table (built on first use; only feature reuse needs one)."""
        if self._table is None:
            self._table = block_table(self.model)
        return self._table

    # ------------------------------------------------------------------ full forwards

    def forward(self, rows: list[list[int]], keep: int | None) -> torch.Tensor:
        """Logits [R, keep or L, V] of the left-padded rows (last ``keep`` positions only), in the
        rows' order, split into length buckets where that is cheaper (see the module docstring)."""
        device = self.device
        overhead = self.bucket_overhead
        if overhead == "auto":
            overhead = CPU_CALL_OVERHEAD_TOKENS if device.type == "cpu" else None
        # Only the fast path splits, and only where positions are explicit (scores then do not
        # depend on a row's padding, so not on its group).
        split = keep is not None and overhead is not None and self.takes_position_ids and len(rows) > 1
        groups = length_buckets([len(r) for r in rows], overhead) if split else []
        if len(groups) > 1:
            parts = [self.padded_forward([rows[i] for i in g], keep) for g in groups]
            order = torch.tensor([i for g in groups for i in g])
            return torch.cat(parts)[order.argsort().to(device)]  # back to the rows' order
        return self.padded_forward(rows, keep)

    def pad(self, rows: list[list[int]], keep: int | None = None):
        """``(input_ids, attention_mask, position_ids)`` of the rows padded on the left to the
        longest row (at least ``keep``, rounded up to ``pad_to_multiple_of``), on the device;
        ``position_ids`` is None for models that take none."""
        length = max(max(map(len, rows)), keep or 0)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, length - len(row):] = torch.tensor(row)
            mask[r, length - len(row):] = 1
        device = self.device
        positions = (mask.cumsum(-1) - 1).clamp(min=0).to(device) if self.takes_position_ids else None
        return ids.to(device), mask.to(device), positions

    def padded_forward(self, rows: list[list[int]], keep: int | None) -> torch.Tensor:
        """Logits of the rows in one padded call."""
        return self.call(*self.pad(rows, keep), keep)

    def call(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor | None = None, keep: int | None = None) -> torch.Tensor:
        """The model call itself: logits [R, keep or L, V]; records inputs for :meth:`capture`."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if keep is not None and self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        self.sequences_run += len(input_ids)
        for seen, _, _ in self._recorders:
            seen.clear()
        hook = _INTERCEPT.get()
        logits = self.model(**kwargs).logits if hook is None else hook(ModelCall(self, kwargs))
        for seen, records, block in self._recorders:
            records += [BlockInput(block, h, attention_mask, position_ids) for h in seen]
        return logits if keep is None else logits[:, -keep:]

    # ------------------------------------------------------------------ feature reuse

    @contextlib.contextmanager
    def capture(self, block: int):
        """Within the ``with`` block, record the input of block ``block`` at every model call
        (one :class:`BlockInput` per call, so per length bucket). Yields the list it fills.

        A forward pre-hook on the block keeps a reference to its input; no copy is made. Blocks
        that :meth:`forward_from` skips record nothing; a block it restarts at records ``hidden``."""
        seen: list[torch.Tensor] = []
        records: list[BlockInput] = []

        def hook(module, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])

        handle = self.table.block_module(self.model, block).register_forward_pre_hook(
            hook, with_kwargs=True)
        entry = (seen, records, block)
        self._recorders.append(entry)
        try:
            yield records
        finally:
            handle.remove()
            self._recorders = [r for r in self._recorders if r is not entry]

    def block_inputs(self, rows: list[list[int]], block: int,
                     keep: int | None = None) -> tuple[torch.Tensor, BlockInput]:
        """One padded forward of the rows (no bucketing): its logits, and block ``block``'s input."""
        with self.capture(block) as records:
            logits = self.padded_forward(rows, keep)
        return logits, records[0]

    def forward_from(self, block: int, hidden: torch.Tensor, *, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor | None = None, keep: int | None = None) -> torch.Tensor:
        """The logits a full forward gives, computed from block ``block`` on: ``hidden`` is the
        input block ``block`` receives (a :class:`BlockInput`'s), with that call's mask and
        positions.

        Blocks before ``block`` are not run: pass-through modules stand in for them, and a forward
        pre-hook hands ``hidden`` to block ``block``. The embeddings run on padding ids (their
        output is discarded; a lookup, so cheap), so the model builds its masks and rotary
        embeddings itself. The model is restored afterwards, also on an exception.
        Cost: blocks ``block``..last, the final norm and the head (``keep`` positions)."""
        table = self.table
        if not 0 <= block < table.num_blocks:
            raise IndexError(f"block {block} out of range: the model has {table.num_blocks} blocks")

        def replace(module, args, kwargs):
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        ids = torch.full(attention_mask.shape, self.pad_id, dtype=torch.long,
                         device=attention_mask.device)
        # prepend: a capture of this same block then records `hidden`, not the pass-through's.
        handle = table.block_module(self.model, block).register_forward_pre_hook(
            replace, with_kwargs=True, prepend=True)
        try:
            with self._skipped(range(block)):
                return self.call(ids, attention_mask, position_ids, keep)
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _skipped(self, blocks):
        """Blocks ``blocks`` replaced by pass-throughs in their parent modules, then put back."""
        base, swapped = unwrap(self.model), []
        try:
            for j in blocks:
                parent_path, _, child = self.table.blocks[j].rpartition(".")
                parent = base.get_submodule(parent_path)
                original = parent.get_submodule(child)
                setattr(parent, child, _PassThrough())
                swapped.append((parent, child, original))
            yield
        finally:
            for parent, child, original in reversed(swapped):
                setattr(parent, child, original)

    # ------------------------------------------------------------------ generation

    def generate(self, rows: list[list[int]], **kwargs) -> torch.Tensor:
        """``model.generate`` on the left-padded rows; returns only the new tokens [R, T]."""
        device = self.device
        length = max(map(len, rows))
        ids = torch.tensor([[self.pad_id] * (length - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=device)
        self.sequences_run += len(rows)
        out = self.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=self.pad_id,
                                  **kwargs)
        return out[:, length:]
