r"""Batched coordinate queries: P perturbations of one block in one call, on top of feature reuse.

DeepZero's CGE evaluates :math:`\ell(\theta + \mu e_i)` for every active coordinate. With feature
reuse (``models/reuse.py``) a coordinate of block j reruns blocks j..J-1 from the cached input
:math:`z_j`, one query at a time. :class:`QueryBatchLoss` runs P moves of one tensor of block j
together, keeping the P copies' activations *folded* as one batch of P*B rows:

1. the moved tensor is stacked P times, copy p with move p written in (the value the engine
   would write, :math:`\mathrm{fl}(\theta_i + \mu)`);
2. a convolution or linear layer with P stacked weights runs as one layer with P times the output
   channels; when the block is a *stage* (a convolution, then units that work channel by channel:
   BatchNorm, ReLU, pooling) and the moved tensor belongs to output channel o (the convolution's
   weight or bias, BatchNorm's weight or bias), a move changes channel o only, so each copy is the
   cached base output of the block with that one channel recomputed (one convolution with P
   output channels: 1/C of the block's work per query; ``models/channel_moves.py``). With
   ``QueryBatch(exact=False)`` the next stage's convolution is updated incrementally too (the
   base pre-activation plus one input channel's contribution per copy), equal within round-off;
3. later units run on the folded batch: per-example modules (convolutions, linear layers,
   activations, pooling) as one call on P*B rows; train-mode BatchNorm as one call on
   ``(B, P * C, ...)``, so each copy is normalised over its own batch (per-query statistics);
   a unit of another kind under ``torch.func.vmap``, or one call per copy;
4. the loss of each copy is ``loss_fn`` on its rows of the logits, the call one query makes.

Exactness (``exact=True``, the default): every fast form is compared bitwise with the reference
(``functional_call`` per copy, the very call the one-at-a-time path makes) the first time it meets
a (unit, P, input shape) (:class:`Stacking`); where it differs (another kernel or summation order:
on this CPU a linear layer with stacked weights, vmap's batch norm, float64 stacked convolutions)
the reference is used for that shape from then on. So the losses are those of the moves one at a
time, bitwise (tests/test_query_batch.py, in float32 and float64), for any P and any grouping. With
``exact=False`` the incremental next convolution is checked the same way but kept within
``channel_moves.DELTA_TOLERANCE`` of the exact path (the losses then differ from one at a time by
round-off; every other form stays bitwise). Kernels are deterministic for fixed shapes on CPU; the
check is per shape for that reason. BatchNorm's running statistics are left alone (the base query,
a plain call, updates them once per step as ``OnePassStatistics`` arranges). P per block is fixed
(``query_batch=P``) or measured (``"auto"``, :class:`QueryBatch`: on the first step the first
groups of each block are timed at P = 1, 2, 4, ... and the fastest per query is kept). ``P = 1`` is
plain feature reuse. Cost per group: one forward of blocks j..J-1 on P*B rows (blocks j on 1/C of
it with the channel form), plus, once per shape, the reference; memory: P activations per block.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..errors import ZotuneError
from . import channel_moves as channels
from .channel_moves import CHANNEL_WISE
from .reuse import ChainLoss
from .vision import _HalvePool as HalvePool

CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
"""The P values ``auto`` times per block."""


class QueryBatch:
    """How many coordinate queries of one block run together: ``size`` fixed (an int >= 1) or
    ``"auto"`` (per block, the fastest of ``candidates`` per query, timed twice each on real
    queries the first time the block is seen; kept for the life of this object, so one object
    is shared by the steps of a run). ``chosen``: ``{block: P}``; ``timings``: ``{block: {P:
    seconds per query}}``. ``exact=False`` allows the incremental next convolution (equal within
    round-off, see the module docstring)."""

    def __init__(self, size="auto", candidates=CANDIDATES, repeats: int = 2, *, exact: bool = True) -> None:
        if size != "auto" and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
            raise ZotuneError(f"query batch must be an integer >= 1 or 'auto', got {size!r}")
        self.size, self.candidates, self.repeats = size, tuple(candidates), int(repeats)
        self.exact = bool(exact)
        self.chosen: dict[int, int] = {}
        self.stacking = Stacking()
        self.timings: dict[int, dict[int, float]] = {}
        self._trials: dict[int, list[int]] = {}

    def next_size(self, block: int) -> int:
        """P for the next group of ``block`` (a trial size while ``auto`` is measuring)."""
        if self.size != "auto":
            return self.size
        if block in self.chosen:
            return self.chosen[block]
        trials = self._trials.setdefault(block, list(self.candidates) * self.repeats)
        return trials[0]

    def record(self, block: int, size: int, seconds: float) -> None:
        """A group of ``size`` queries of ``block`` took ``seconds``."""
        if self.size != "auto" or block in self.chosen:
            return
        trials = self._trials[block]
        if trials and trials[0] == size:
            trials.pop(0)
            best = self.timings.setdefault(block, {})
            best[size] = min(best.get(size, float("inf")), seconds / size)
        if not trials:
            self.chosen[block] = min(self.timings[block], key=lambda p: (self.timings[block][p], p))


@contextlib.contextmanager
def no_running_stats(model: nn.Module):
    """Train-mode BatchNorm without running statistics for the block: batch statistics only, no
    update (the buffers are detached from the modules and put back afterwards)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
            m.running_mean = m.running_var = m.num_batches_tracked = None
    try:
        yield
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count


class QueryBatchLoss(ChainLoss):
    """:class:`~zotune.models.reuse.ChainLoss` that also answers many coordinate moves at once
    (``coordinate_losses``, which ``engines/coordinates.py`` calls); see the module docstring.

    Args:
        model, images, labels, loss_fn: as ``ChainLoss``.
        query_batch: a :class:`QueryBatch` (shared across steps, so ``auto`` measures once), an
            int P, or ``"auto"``.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 loss_fn: Callable = F.cross_entropy, query_batch="auto") -> None:
        super().__init__(model, images, labels, loss_fn)
        self.model = model
        self.query_batch = query_batch if isinstance(query_batch, QueryBatch) else QueryBatch(query_batch)
        self.where = {id(p): (k, name) for k, b in enumerate(self.blocks)
                      for name, p in b.named_parameters()}
        self.groups: list[tuple[int, int]] = []  # (block, P) of every batched call
        self.stack = self.query_batch.stacking  # the exactness checks, kept across steps
        self._pre: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block -> (its input, conv(input))

    @property
    def alignment(self) -> int:
        """Groups start at multiples of this from the start of a tensor's run (a fixed P; 1 for
        ``auto``, whose trial groups vary): coordinate shards cut there."""
        return self.query_batch.size if self.query_batch.size != "auto" else 1

    # ------------------------------------------------------------ batched queries
    def coordinate_losses(self, moves) -> list[float]:
        """The loss after each move ``(parameter, flat position, value)`` alone (the parameters
        themselves are not written, except by P = 1 groups, which restore them bit-exactly)."""
        out: list[float] = []
        k = 0
        with torch.no_grad(), no_running_stats(self.model):
            while k < len(moves):
                where = self.where.get(id(moves[k][0]))
                if where is None:
                    raise ZotuneError("coordinate_losses got a tensor that is not a parameter of the model")
                block = where[0]
                size = self.query_batch.next_size(block)
                group = [moves[k]]
                while len(group) < size and k + len(group) < len(moves) and \
                        moves[k + len(group)][0] is moves[k][0]:  # one tensor per group
                    group.append(moves[k + len(group)])
                start = time.perf_counter()
                out += self._one_by_one(group) if size == 1 else self._batched(block, group)
                self.query_batch.record(block, len(group), time.perf_counter() - start)
                self.groups.append((block, len(group)))
                k += len(group)
        return out

    def _one_by_one(self, group) -> list[float]:
        losses = []
        for param, i, value in group:
            flat = param.data.view(-1)
            old = flat[i].clone()
            flat[i] = value
            try:
                losses.append(float(ChainLoss.__call__(self)))
            finally:
                flat[i] = old
        return losses

    def _cached_input(self, block: int) -> torch.Tensor:
        """Block ``block``'s input under the current parameters of the blocks before it: the
        cached one when they are those it was computed under (always, after the base query),
        else recomputed from the first block that changed (not stored: the cache stays as
        ``ChainLoss`` left it)."""
        first = next((k for k in range(block) if self._changed(k)), block)
        z = self.images if first == 0 else self.inputs[first]
        if first == block and block and self.inputs[block] is not None:
            return self.inputs[block]
        for k in range(first, block):
            z = self.blocks[k](z)
            self.block_forwards += 1
        return z

    def _batched(self, block: int, group) -> list[float]:
        size, labels = len(group), self.labels
        x = self._cached_input(block)
        stacked, owner = self._stacked_params(block, group)
        shared, first = True, block  # x is one input for every copy until the perturbed unit
        local = self._channel_local(block, owner, stacked, group, x)
        if local is not None:
            (x, first), shared = local, False
        for k in range(first, len(self.blocks)):
            for unit in _units(self.blocks[k]):
                if unit is owner:
                    x, shared = self.stack.with_params(unit, stacked, x, size), False
                elif shared:
                    x = unit(x)
                else:
                    x = self.stack.shared_params(unit, x, size)
        self.block_forwards += size * (len(self.blocks) - block)
        self.restarts += [block] * size
        n = len(labels)
        return [float(self.loss_fn(x[p * n:(p + 1) * n], labels)) for p in range(size)]

    def _channel_local(self, block: int, owner, stacked, group, x):
        """``(folded output, next block to run)`` when block ``block`` is a stage and the moved
        tensor belongs to one output channel (``channel_moves``): each copy is the cached base
        output with its one channel recomputed (1/C of the block's work), checked bitwise against
        the general path once per shape (``Stacking``); with ``exact=False`` and a stage next,
        that stage too, incrementally (checked within ``DELTA_TOLERANCE``). None where it does
        not apply."""
        units = _units(self.blocks[block])
        (name, copies), = stacked.items()
        rows = channels.row_of_moves(owner, name, copies, group)
        if not (rows is not None and channels.is_stage(units) and block + 1 < len(self.blocks)):
            return None
        if self.inputs[block + 1] is None or any(self._changed(k) for k in range(block + 1)):
            # The cached output of this block is not the one of the current parameters (a
            # one-at-a-time group moved and restored a coordinate of this or an earlier block):
            # one restart puts the cache back (counted in block_forwards), then it is the base.
            ChainLoss.__call__(self)
            x = self._cached_input(block)
        size, base = len(group), self.inputs[block + 1]
        key = (block, id(owner), name, size, tuple(x.shape), x.dtype)

        def exact():
            kind = "channel" if units.index(owner) == 0 else "channel-bn"  # a conv's rows, or BN's
            def fast():
                return channels.with_rows(base, rows, channels.stage_rows(units, owner, name, copies, rows, x))

            def general():
                return _from_start(units, owner, stacked, x, size, self.stack)

            return self.stack._choose((kind,) + key, fast, general)

        following = _units(self.blocks[block + 1])
        if self.query_batch.exact or not channels.is_stage(following) or self._changed(block + 1):
            return exact(), block + 1
        pre = self._pre.get(block + 1)
        if pre is None or pre[0] is not base:
            pre = self._pre[block + 1] = (base, following[0](base))  # its convolution, bias included, once

        def incremental():
            y = channels.stage_rows(units, owner, name, copies, rows, x)
            return channels.next_stage(following, pre[1], base, rows, y)

        def reference():
            z = exact()
            for u in following:
                z = self.stack.shared_params(u, z, size)
            return z

        return self.stack._choose(("delta",) + key, incremental, reference,
                                  tolerance=channels.DELTA_TOLERANCE), block + 2

    def _stacked_params(self, block: int, group):
        """The unit (leaf module) owning the moved tensor, and its parameters stacked P times
        (``{name in the unit: (P, *shape)}``, the moved tensor with move p in copy p)."""
        size = len(group)
        unit, name = _owner(self.blocks[block], self.where[id(group[0][0])][1])
        base = group[0][0].detach()
        copies = base.unsqueeze(0).repeat(size, *([1] * base.dim()))
        for p, (_, i, value) in enumerate(group):
            copies.view(size, -1)[p, i] = value
        return {name: copies}, unit


def _units(module: nn.Module) -> list[nn.Module]:
    """A block as the sequence of modules it runs: a Sequential's children, flattened; any
    other module is one unit."""
    if isinstance(module, nn.Sequential):
        return [u for child in module.children() for u in _units(child)]
    return [module]


def _owner(block: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The unit of ``block`` holding parameter ``name`` (a dotted name inside ``block``), and the
    parameter's name inside that unit."""
    for unit in _units(block):
        for n, p in unit.named_parameters():
            if p is block.get_parameter(name):
                return unit, n
    raise ZotuneError(f"parameter {name!r} is not in a unit of its block")


def _from_start(units, owner, stacked, x, size, stack):
    """The general path through a whole block whose moved tensor is not its first unit's: the
    units before ``owner`` once on the shared input, ``owner`` with its P copies, the rest folded."""
    k = units.index(owner)
    for u in units[:k]:
        x = u(x)
    x = stack.with_params(owner, stacked, x, size)
    for u in units[k + 1:]:
        x = stack.shared_params(u, x, size)
    return x


FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh,
            nn.Sigmoid, nn.SiLU, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity, HalvePool)
"""Modules that treat every example alone: P copies of a batch of B run as one batch of P*B."""


class Stacking:
    """Unit-level batched forwards, each checked once against the reference (one call per copy).

    Activations of the P copies are kept *folded*, ``(P * B, ...)`` (copy p is rows
    ``p*B .. p*B + B - 1``). Fast forms: a per-example module on the folded batch; train-mode
    BatchNorm on ``(B, P * C, ...)`` (each copy's channels normalised over its own batch); a
    convolution or linear layer with P stacked weights as one layer with P times the output
    channels; BatchNorm with P stacked affine parameters on the input repeated P times. The first
    time a fast form meets a (unit, P, input shape), its result is compared bitwise with the
    reference (``functional_call`` per copy, the very call one query at a time makes); where it
    differs (another kernel, another summation order) the reference is used for that shape from
    then on. ``checks``: ``{(kind, unit type, P, shape): fast form is exact}``."""

    def __init__(self) -> None:
        self.checks: dict[tuple, bool] = {}
        self.deviations: dict[tuple, float] = {}  # the checked gap of each tolerance-checked form

    def _choose(self, key, fast, reference, tolerance: float | None = None):
        """``fast()`` where it was found exact (bitwise, or within ``tolerance`` of the largest
        value) the first time ``key`` was met, else ``reference()``; the first time, both are
        run and the reference's result is returned."""
        ok = self.checks.get(key)
        if ok is None:
            got, want = fast(), reference()
            if got.shape != want.shape:
                ok = False
            elif tolerance is None:
                ok = torch.equal(got, want)
            else:
                gap = float((got - want).abs().max() / want.abs().max().clamp_min(torch.finfo(want.dtype).tiny))
                self.deviations[key] = gap
                ok = gap <= tolerance
            self.checks[key] = bool(ok)
            return want
        return fast() if ok else reference()

    def shared_params(self, unit: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
        """``unit`` (its own parameters) on each of the ``size`` folded copies in ``x``."""
        b = x.shape[0] // size
        reference = lambda: torch.cat([unit(x[p * b:(p + 1) * b]) for p in range(size)])  # noqa: E731
        if isinstance(unit, nn.modules.batchnorm._BatchNorm) and (unit.training or unit.running_mean is None):
            fast = lambda: _bn_over_copies(unit, x, size, unit.weight, unit.bias, repeat=True)  # noqa: E731
        elif isinstance(unit, FOLDABLE) or isinstance(unit, nn.modules.batchnorm._BatchNorm):
            fast = lambda: unit(x)  # noqa: E731
        else:
            fast = lambda: torch.cat(list(vmap(unit)(x.view(size, b, *x.shape[1:]))))  # noqa: E731
        return self._choose(("shared", type(unit).__name__, id(unit), size, tuple(x.shape)), fast, reference)

    def with_params(self, unit: nn.Module, stacked: dict, x: torch.Tensor, size: int) -> torch.Tensor:
        """``unit`` with parameter copy p on the shared input ``x``, for p < ``size``, folded."""
        reference = lambda: torch.cat([functional_call(unit, {n: v[p] for n, v in stacked.items()}, (x,))  # noqa: E731
                                       for p in range(size)])
        fast = None
        if isinstance(unit, (nn.Conv2d, nn.Linear)) and unit.weight is not None:
            fast = lambda: _stacked_layer(unit, stacked, x, size)  # noqa: E731
        elif isinstance(unit, nn.modules.batchnorm._BatchNorm) and unit.training and unit.affine:
            weight, bias = (stacked.get(n, getattr(unit, n).detach().unsqueeze(0).expand(size, -1))
                            for n in ("weight", "bias"))
            fast = lambda: _bn_over_copies(unit, x.repeat(1, size, *([1] * (x.dim() - 2))), size,  # noqa: E731
                                           weight, bias, repeat=False, unfold=False)
        if fast is None:
            return reference()
        return self._choose(("params", type(unit).__name__, id(unit), size, tuple(x.shape)), fast, reference)


def _unfold_channels(y: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, P * C, ...)`` -> folded ``(P * B, C, ...)``."""
    b, c = y.shape[0], y.shape[1] // size
    return y.view(b, size, c, *y.shape[2:]).transpose(0, 1).reshape(size * b, c, *y.shape[2:])


def _bn_over_copies(bn, x, size, weight, bias, *, repeat: bool, unfold: bool = True) -> torch.Tensor:
    """Train-mode batch norm of P copies at once on ``(B, P * C, ...)``: folded input ``x``
    (``unfold``) or an input already ``(B, P * C, ...)``; ``weight``/``bias`` shared (``repeat``)
    or stacked ``(P, C)``. No running statistics are read or written."""
    if unfold:
        b = x.shape[0] // size
        x = x.view(size, b, *x.shape[1:]).transpose(0, 1).reshape(b, size * x.shape[1], *x.shape[2:])
    w = None if weight is None else (weight.repeat(size) if repeat else weight.reshape(-1))
    bb = None if bias is None else (bias.repeat(size) if repeat else bias.reshape(-1))
    return _unfold_channels(F.batch_norm(x, None, None, w, bb, True, 0.0, bn.eps), size)


def _stacked_layer(unit, stacked, x, size) -> torch.Tensor:
    """A convolution or linear layer with P stacked parameter copies as one layer with P times
    the output channels, on the shared input; folded output."""
    w = stacked.get("weight", unit.weight.detach().unsqueeze(0).expand(size, *unit.weight.shape))
    weight = w.reshape(size * w.shape[1], *w.shape[2:])
    bias = stacked.get("bias", None if unit.bias is None else unit.bias.detach().unsqueeze(0).expand(size, -1))
    bias = None if bias is None else bias.reshape(-1)
    if isinstance(unit, nn.Linear):
        y = F.linear(x, weight, bias)
        return y.view(x.shape[0], size, -1).transpose(0, 1).reshape(size * x.shape[0], -1)
    y = unit._conv_forward(x, weight, bias)
    return _unfold_channels(y, size)
