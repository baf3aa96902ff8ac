"""What every engine provides, and the update it applies.

An engine owns where the parameters live. Its contract (DESIGN.md, section 1.1):

``evaluate(plan, objective) -> list``
    the objective's value at every point ``theta + sum_j a_j z_j`` of the plan, in plan order.
    An objective is a callable returning the loss of the model as it is; :class:`MicroBatches`
    is the mean of several (gradient accumulation), with its parts visible to the engine.
    The engine decides how: in place one point after another (in-memory), block by block with all
    points evaluated while a block is resident (offload; the objective is then a structured
    :class:`~zotune.objectives` object it can drive, not an opaque closure), a subset of the points
    on this rank and the rest gathered (distributed), or forwards restarted from cached block
    inputs (feature reuse). A deferred update is fused into the first move. An engine whose
    moves round differently by path (in place) keeps the values of an evaluation stopped by an
    exception, in its state, and continues it when asked the same plan again.
``apply(update, defer=False)``
    apply an :class:`Update` now, or hold it to fuse into the next evaluation (``defer``).
``flush()``
    apply any held update and remove any perturbation: the parameters are then the iterate.
``base(i)`` / ``sync(i)`` / ``read(i)`` / ``write(i, values)``
    read and write the unperturbed values of layout tensor ``i`` (DiZO's projection writes
    through them; nothing outside an engine touches its storage).
``gram(keys)``
    per tensor, the inner products of the directions of ``keys`` (per-tensor clipping).
``state_dict()`` / ``load_state_dict()``
    the current perturbation and the engine-owned buffers (fp32 master copies).

Engines must give the same losses and parameters as the in-memory engine for the same seeds; the
conformance matrix has an engine axis (``tests/test_conformance.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..plan import DenseGrad, Gradient, SparseGrad, ZOGrad


@dataclass
class Update:
    """A parameter update, applied tensor by tensor and chunk by chunk by an engine.

    Per chunk of every tensor it touches: ``x <- (1 - lr wd) x`` (decoupled decay, unless
    ``coupled_decay``: then ``g <- g + wd x``), then the rule's per-chunk maths with the chunk
    ``g`` of the gradient. ``ZOGrad`` chunks are regenerated from keys; fused rules (SGD) then
    never materialise ``g`` at all.

    Attributes:
        grad: ``ZOGrad``, ``SparseGrad`` or ``DenseGrad`` (after the step's transforms).
        rule: the update rule (``fused`` or with ``apply_chunk``).
        lr: learning rate of each parameter group, by group index.
        weight_decay: weight decay of each group, by group index.
        step: 1-based update count (Adam's bias correction, the look-ahead's tau).
        state: the rule's state tensors of a layout tensor, by index.
        coupled_decay: L2 decay added to the gradient (torch.optim.SGD/Adam) instead of
            decoupled decay (MeZO, AdamW).
    """

    grad: Gradient
    rule: object
    lr: Sequence[float]
    weight_decay: Sequence[float]
    step: int = 1
    state: Callable[[int], dict[str, torch.Tensor]] | None = None
    coupled_decay: bool = False

    def touches(self, index: int, role: str) -> bool:
        """Whether this update changes layout tensor ``index`` (of role ``role``)."""
        if isinstance(self.grad, ZOGrad):
            return role == "zo"
        if role == "frozen":
            return False
        if isinstance(self.grad, SparseGrad):
            return index in self.grad.entries
        return self.grad.tensors is None or index in self.grad.tensors

    def state_slices(self, index: int, s: int, e: int) -> dict[str, torch.Tensor]:
        if self.state is None:
            return {}
        return {name: buf.view(-1)[s:e] for name, buf in self.state(index).items()}


def dense_chunk(grad: DenseGrad | SparseGrad, index: int, param: torch.Tensor, s: int, e: int,
                out: torch.Tensor) -> torch.Tensor | None:
    """Elements ``s:e`` of tensor ``index``'s gradient written into ``out`` (None if zero)."""
    if isinstance(grad, DenseGrad):
        g = param.grad if grad.tensors is None else grad.tensors.get(index)
        if g is None:
            return None
        return out.copy_(g.reshape(-1)[s:e])
    entry = grad.entries.get(index)
    if entry is None:
        return None
    idx, values = entry
    idx = idx.reshape(-1).to(out.device)
    inside = (idx >= s) & (idx < e)
    out.zero_()
    if bool(inside.any()):
        out.index_put_((idx[inside] - s,), values.reshape(-1).to(out.device, out.dtype)[inside],
                       accumulate=True)
    return out


def check_update(update: Update | None) -> None:
    if update is not None and not isinstance(update.grad, (ZOGrad, SparseGrad, DenseGrad)):
        raise TypeError(f"an update's gradient is a ZOGrad, SparseGrad or DenseGrad, got "
                        f"{type(update.grad).__name__}")


class MicroBatches:
    """The mean of several objectives at the same point (micro-batches: gradient accumulation).

    ``parts`` stays visible, so an engine that drives the forward itself (block streaming,
    cached block inputs) can run each part its own way; plain engines just call it."""

    def __init__(self, parts) -> None:
        self.parts = list(parts)
        if not self.parts:
            raise ValueError("MicroBatches needs at least one objective")

    def __call__(self) -> float:
        return sum(float(part()) for part in self.parts) / len(self.parts)
