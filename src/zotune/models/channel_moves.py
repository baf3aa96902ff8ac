r"""Coordinate moves that change one channel of a stage's output (batched queries, ``query_batch.py``).

A *stage* is a block ``Conv2d -> channel-wise units`` (BatchNorm, activations, pooling: each output
channel depends on the same channel only), the form of DeepZero's CNN family. A move of a
parameter that belongs to output channel o (a row of the convolution's weight, its bias, BN's
weight or bias) changes channel o of the stage's output and nothing else. Two consequences:

1. **The stage itself** (:func:`stage_rows`): copy p's output is the cached base output with
   channel :math:`o_p` recomputed: one convolution with P output channels (one per copy) and the
   channel-wise units on those P channels, 1/C of the stage's work per query. Bitwise equal to
   the full stage (the same kernels on the same channel's data; ``Stacking`` checks it).
2. **The next stage's convolution** (:func:`next_stage`, only where the caller allows it, i.e.
   ``QueryBatch(exact=False)``): it is linear in its input, and copy p's input differs from the base
   input :math:`z` by :math:`\delta_p` in channel :math:`o_p` only, so

   .. math:: \mathrm{conv}(z + \delta_p e_{o_p}) = \mathrm{conv}(z) + W_{:, o_p} \star \delta_p

   (zero padding keeps it exact in real arithmetic): the base pre-activation, computed once,
   plus a convolution with one input channel per copy (one grouped convolution for the P copies,
   1/C_in of the next convolution's work). In floating point the sum is taken in another order
   than the full convolution's, so the result equals it within fp32 round-off, not bitwise;
   ``Stacking`` compares it once per shape with the exact path and keeps it only within
   :data:`DELTA_TOLERANCE` (relative to the largest activation). A CGE loss difference over
   :math:`\mu = 5\cdot10^{-3}` then moves by about :math:`10^{-7}/\mu` of the loss, far below the
   finite difference's own truncation error.

What this saves on DeepZero's 12,610-parameter CNN: a query of the first stage reruns the second
stage (the costliest, 16x16 maps) in full under the exact path; with (2) its convolution costs
1/18 of that (``benchmarks/deepzero.py --modes reuse,batched,delta``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vision import _HalvePool as HalvePool

CHANNEL_WISE = (nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.GELU,
                nn.MaxPool2d, nn.AvgPool2d, nn.Identity, HalvePool)
"""Modules after a convolution through which one changed channel stays one changed channel."""

DELTA_TOLERANCE = 1e-5
"""Largest |incremental - exact| / max |exact| accepted for the incremental next convolution
(fp32 round-off of a 3x3 convolution over tens of channels is about 1e-7 of it)."""

_BN = nn.modules.batchnorm._BatchNorm


def is_stage(units: list[nn.Module]) -> bool:
    """``units`` (a block's leaf modules in order) are ``Conv2d`` (dense, zero padding) followed
    by channel-wise units only."""
    return (bool(units) and isinstance(units[0], nn.Conv2d) and units[0].groups == 1
            and units[0].padding_mode == "zeros" and all(isinstance(u, CHANNEL_WISE) for u in units[1:]))


def row_of_moves(owner: nn.Module, name: str, copies: torch.Tensor, group) -> torch.Tensor | None:
    """The output channel each move of ``group`` changes, or None when ``owner.name`` is not a
    per-output-channel parameter (a convolution's weight or bias, BatchNorm's weight or bias)."""
    if not (isinstance(owner, (nn.Conv2d, _BN)) and name in ("weight", "bias")):
        return None
    per = copies[0].numel() // copies.shape[1]  # coordinates per output channel
    return torch.tensor([i // per for _, i, _ in group])


def _batch_norm(u, y, rows=None, copies: int = 1, weight=None, bias=None):
    """``u`` (BatchNorm) on ``y``, whose channels are ``u``'s channels ``rows`` (or all of them
    ``copies`` times over); train mode: batch statistics, no running statistics touched."""
    def pick(t):
        if t is None:
            return None
        t = t.detach()
        return t[rows] if rows is not None else t.repeat(copies)
    w = weight if weight is not None else pick(u.weight)
    b = bias if bias is not None else pick(u.bias)
    if u.training or u.running_mean is None:
        return F.batch_norm(y, None, None, w, b, True, 0.0, u.eps)
    return F.batch_norm(y, pick(u.running_mean), pick(u.running_var), w, b, False, 0.0, u.eps)


def stage_rows(units, owner, name: str, copies: torch.Tensor, rows: torch.Tensor,
               x: torch.Tensor) -> torch.Tensor:
    """Copy p's channel ``rows[p]`` of the stage's output, ``(B, P, H', W')``: the stage's units
    on the P channels, with parameter copy p of ``owner.name`` in channel p (``copies``: ``(P,
    *shape)``). Cost: a convolution with P output channels on ``x``, then channel-wise units."""
    pick = torch.arange(len(rows))

    def param(u, n):
        if u is owner and n == name:
            return copies[pick, rows]
        t = getattr(u, n)
        return None if t is None else t.detach()[rows]

    conv = units[0]
    y = conv._conv_forward(x, param(conv, "weight"), param(conv, "bias"))
    for u in units[1:]:
        y = _batch_norm(u, y, rows, weight=param(u, "weight"), bias=param(u, "bias")) if isinstance(u, _BN) else u(y)
    return y


def with_rows(base: torch.Tensor, rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The P copies of ``base`` (``(B, C, ...)``), copy p's channel ``rows[p]`` replaced by
    ``y[:, p]``; folded ``(P * B, C, ...)``."""
    size = len(rows)
    out = base.unsqueeze(0).repeat(size, *([1] * base.dim()))
    out[torch.arange(size), :, rows] = y.transpose(0, 1)
    return out.view(size * base.shape[0], *base.shape[1:])


def next_stage(units, pre: torch.Tensor, base: torch.Tensor, rows: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    """The next stage's output for each copy, folded ``(P * B, C2, ...)``, incrementally: copy p's
    input is ``base`` with channel ``rows[p]`` equal to ``y[:, p]``, so its pre-activation is
    ``pre + W[:, rows[p]] * (y[:, p] - base[:, rows[p]])`` (one grouped convolution, one input
    channel per copy), then the channel-wise units on all P copies at once, laid out as
    ``(B, P * C2, ...)``. Equal to the full stage within round-off (see the module docstring)."""
    conv, size = units[0], len(rows)
    delta = y - base[:, rows]                                     # (B, P, H, W)
    w = conv.weight.detach()[:, rows].transpose(0, 1)             # (P, C2, k, k)
    w = w.reshape(size * conv.out_channels, 1, *conv.kernel_size)
    z = F.conv2d(delta, w, None, conv.stride, conv.padding, conv.dilation, groups=size)
    z = z + pre.repeat(1, size, *([1] * (pre.dim() - 2)))
    for u in units[1:]:
        z = _batch_norm(u, z, copies=size) if isinstance(u, _BN) else u(z)
    b, c = z.shape[0], z.shape[1] // size
    return z.view(b, size, c, *z.shape[2:]).transpose(0, 1).reshape(size * b, c, *z.shape[2:])
