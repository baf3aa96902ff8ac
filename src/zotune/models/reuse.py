r"""Feature reuse for coordinate-wise ZO (DeepZero, research note B.5): a loss that restarts the
forward of a chain model at the first block whose parameters changed.

Write the model as a chain :math:`z_0 = x,\ z_{k+1} = F_k(z_k; \theta_k)` (the children of an
``nn.Sequential``: small CNN stages, ResNet-20's stem, basic blocks, pool and head). Moving a
coordinate of :math:`\theta_j` leaves :math:`z_0 .. z_j` unchanged, so :class:`ChainLoss` keeps
every block input of its batch with the parameters they were computed under, and each call

1. finds the first block j whose parameters differ from those the cache was computed under
   (an exact comparison of the values, O(d) per call, far below a forward: a coordinate moved
   and restored is equal again; version counters would not do, engines write through ``.data``
   views that do not share them);
2. runs blocks j .. J-1 from the cached :math:`z_j`, updating the cache of blocks after j.

It needs no hint from the optimizer and works with any engine, any order of coordinates and any
step program: it is exact whatever changes. The loss is bit-for-bit the full forward's (the
cached inputs are the very tensors the full forward computes; CPU kernels are deterministic for
fixed shapes), including BatchNorm in train mode (batch statistics are recomputed in block j and
after; running statistics too, which ``OnePassStatistics`` restores after the first pass).
Exactness needs what the paper states: each block depends only on its input and its own
parameters, the same batch for every query, no dropout. Cost: one full forward for the base
query, then per coordinate of block j the forward of blocks j..J-1 (plus, once per block change,
a restart at the block just left); memory: one activation per block for the batch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZotuneError


class ChainLoss:
    """``loss_fn(model(images), labels)`` with feature reuse (see the module docstring).

    Args:
        model: an ``nn.Sequential`` (its children are the chain's blocks).
        images, labels: the step's batch (the same for every call).
        loss_fn: ``(logits, labels) -> loss`` (default: mean cross-entropy).
    Attributes: ``block_forwards`` (blocks run so far), ``restarts`` (the block each call began at).
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 loss_fn: Callable = F.cross_entropy) -> None:
        if not isinstance(model, nn.Sequential):
            raise ZotuneError(f"feature reuse needs a chain model (an nn.Sequential), got "
                              f"{type(model).__name__}")
        self.blocks = list(model.children())
        self.params = [list(b.parameters()) for b in self.blocks]
        self.images, self.labels, self.loss_fn = images, labels, loss_fn
        self.inputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.values: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self.block_forwards, self.restarts = 0, []

    def _changed(self, k: int) -> bool:
        params = self.params[k]
        if self.inputs[k] is None:
            return True
        return not all(torch.equal(p, v) for p, v in zip(params, self.values[k]))

    def _record(self, k: int) -> None:
        self.values[k] = [p.detach().clone() for p in self.params[k]]

    def __call__(self) -> torch.Tensor:
        start = next((k for k in range(len(self.blocks)) if self._changed(k)), len(self.blocks))
        if start == len(self.blocks):
            start = len(self.blocks) - 1  # nothing changed: rerun the last block (keeps BN behaviour)
        self.restarts.append(start)
        z = self.images if start == 0 else self.inputs[start]
        for k in range(start, len(self.blocks)):
            if k > start or start == 0:  # inputs[start] stays: it was computed under blocks < start
                self.inputs[k] = z
            self._record(k)
            z = self.blocks[k](z)
            self.block_forwards += 1
        return self.loss_fn(z, self.labels)
