"""Driving a model block by block, without rewriting its forward: the offload engine's forward.

An objective (a closure over zotune's objectives) calls the model only through
:meth:`ModelRunner.call` (``objectives/runner.py``). The offload engine uses that as its seam:

1. **record**: run the objective once with the calls intercepted
   (:func:`~zotune.objectives.runner.intercept_calls`); each call is recorded and answered with
   zero logits, and the objective's result is discarded. This gives the step's model calls (their
   token ids, masks, positions and ``logits_to_keep``), which do not depend on the parameters.
2. **pre** (:func:`run_pre`): per point, the model's own forward runs with every block replaced by
   a recorder, and stops at the last one: the embeddings (at this point's parameters), the
   masks and rotary embeddings the model builds, and each block's exact arguments.
3. **blocks**: the engine calls each block module itself (:func:`run_block`) with its recorded
   arguments, for every point and call while that block is resident.
4. **post** (:func:`run_post`): the model's forward again, every block a pass-through and the
   last one returning the final hidden state: final norm, head, ``logits_to_keep``.
5. **replay**: run the objective once per point with the calls answered by that point's logits
   (:func:`replay`): its own loss code turns them into the loss.

Assumption (the same as ``ModelRunner.forward_from``): the model passes each block's output to
the next block as its first argument and nothing between blocks depends on parameters. True of
the Hugging Face decoder loops of every family in ``models/blocks.py``.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ZotuneError
from ..models.blocks import unwrap
from ..objectives.runner import ModelCall, intercept_calls


class OpaqueObjective(ZotuneError):
    """The objective does not call the model through a ModelRunner."""


class _Stop(Exception):
    """Ends a forward early, once the recorders have what they need."""


class _Recorder(nn.Module):
    """Stands in for block ``j``: records its arguments, returns its input (or stops)."""

    def __init__(self, sink: dict, j: int, stop: bool) -> None:
        super().__init__()
        self.sink, self.j, self.stop = sink, j, stop

    def forward(self, *args, **kwargs):
        self.sink[self.j] = (args, kwargs)
        if self.stop:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]


class _Emit(nn.Module):
    """Stands in for a block in the post pass: returns ``value`` (the last block) or its input."""

    def __init__(self, value: torch.Tensor | None) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        if self.value is not None:
            return self.value
        return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def swapped(model: nn.Module, table, make):
    """Every block ``j`` of ``model`` replaced by ``make(j)`` for the ``with`` block."""
    base, done = unwrap(model), []
    try:
        for j, path in enumerate(table.blocks):
            parent_path, _, child = path.rpartition(".")
            parent = base.get_submodule(parent_path)
            done.append((parent, child, parent.get_submodule(child)))
            setattr(parent, child, make(j))
        yield
    finally:
        for parent, child, original in reversed(done):
            setattr(parent, child, original)


def record(objective, vocab: int, dtype: torch.dtype, *, forbid=None, engine: str = "offload") -> list[ModelCall]:
    """The model calls ``objective()`` makes, answered with zero logits (its result dropped).

    ``forbid`` is a module whose direct call (outside a runner) makes this an error; ``engine``
    names the engine in the error messages."""
    calls: list[ModelCall] = []
    runners = {}

    def answer(call: ModelCall) -> torch.Tensor:
        calls.append(call)
        rows = len(call.kwargs["input_ids"])  # already counted by the runner
        runners.setdefault(id(call.runner), (call.runner, call.runner.sequences_run - rows))
        ids = call.kwargs["input_ids"]
        keep = call.kwargs.get("logits_to_keep") or ids.shape[1]
        return torch.zeros(ids.shape[0], keep, vocab, dtype=dtype, device=ids.device)

    def direct(module, args, kwargs):
        raise OpaqueObjective(f"engine {engine!r} drives the model through zotune's ModelRunner, but this "
                              "objective calls the model directly; build it on zotune.objectives "
                              "(CandidateScorer, ModelRunner) or use engine='in-memory'")

    handle = forbid.register_forward_pre_hook(direct, with_kwargs=True) if forbid is not None else None
    try:
        with intercept_calls(answer):
            objective()
    finally:
        if handle is not None:
            handle.remove()
        for runner, count in runners.values():  # recording is not a forward pass
            runner.sequences_run = count
    if not calls:
        raise OpaqueObjective(f"engine {engine!r} needs an objective that calls the model through "
                              "zotune's ModelRunner (zotune.objectives); this one made no model call. "
                              "Use engine='in-memory' for other objectives")
    return calls


def replay(objective, calls: list[ModelCall], logits: list[torch.Tensor], engine: str = "offload"):
    """``objective()`` with its model calls answered by ``logits`` (in the recorded order)."""
    it = iter(range(len(calls)))

    def answer(call: ModelCall) -> torch.Tensor:
        k = next(it, None)
        if k is None or not torch.equal(call.kwargs["input_ids"], calls[k].kwargs["input_ids"]):
            raise ZotuneError("the objective made other model calls than when it was recorded; "
                              f"engine {engine!r} needs an objective whose model calls do not depend "
                              "on the parameters")
        return logits[k]

    with intercept_calls(answer):
        return objective()


def run_pre(call: ModelCall, table, *, all_blocks: bool) -> tuple[torch.Tensor, dict]:
    """The input of block 0 for ``call`` at the parameters as they are, and (``all_blocks``) the
    arguments of every block: ``{j: (args, kwargs)}``."""
    sink: dict = {}
    last = table.num_blocks - 1 if all_blocks else 0
    with swapped(call.runner.model, table, lambda j: _Recorder(sink, j, j == last)):
        try:
            call.runner.model(**call.kwargs)
        except _Stop:
            pass
    if last not in sink:
        raise ZotuneError(f"the model's forward did not reach block {last} of its block table; "
                          "engine 'offload' cannot stream it")
    args, kwargs = sink[0]
    return (args[0] if args else kwargs["hidden_states"]), sink


def run_block(block: nn.Module, hidden: torch.Tensor, recorded) -> torch.Tensor:
    """``block`` on ``hidden`` with the arguments the model gave it (see :func:`run_pre`)."""
    args, kwargs = recorded
    out = block(hidden, *args[1:], **kwargs) if args else block(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out


def run_post(call: ModelCall, table, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model computes from ``hidden``, the output of its last block."""
    last = table.num_blocks - 1
    with swapped(call.runner.model, table, lambda j: _Emit(hidden if j == last else None)):
        return call.runner.model(**call.kwargs).logits
