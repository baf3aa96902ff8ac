r"""The reference engine: the engine contract done the obvious way, to test the fast ones against.

It keeps its own copy of every unperturbed tensor (``base``), writes each point as
``p = base + sum_j a_j z_j`` with every direction materialised whole, and applies an update by
materialising the whole gradient tensor (``sum_k c_k z_k`` for a ZOGrad, a scatter for a
SparseGrad, the tensor itself for a DenseGrad) and calling the rule's maths once per tensor.
No fusion, no chunk loop, no threads, no in-place restore: slow and parameter-sized, but each line
is the definition. Its directions are the in-memory engine's (same keys, chunks and positions),
so both must give the same losses and parameters within rounding (tests/test_conformance.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import rng
from ..directions import Direction, materialize
from ..layout import ParamLayout
from ..plan import ProbePlan, Terms, ZOGrad, coef_at, coef_from_state
from .base import Update, check_update, dense_chunk
from .in_memory import LOW_PRECISION


class ReferenceEngine:
    """Evaluates plans by writing each point from a stored base; see the module docstring.

    Args: as :class:`~zotune.engines.InMemoryEngine` (``threads`` is accepted and ignored).
    Memory: one extra copy of the trainable parameters (fp32 for bf16/fp16 ones, like masters).
    """

    def __init__(self, tensors, direction: Direction, *, chunk_size: int = rng.DEFAULT_CHUNK_SIZE,
                 master_weights: bool | str = "auto", threads: int | None = None,
                 rng_device: str | None = None) -> None:
        del threads
        tensors = list(tensors)
        self.direction = direction
        limit = direction.max_chunk_size()
        self.chunk_size = min(chunk_size, limit) if limit else chunk_size
        self.layout = ParamLayout.build(tensors, chunk_size=self.chunk_size,
                                        direction=getattr(direction, "name", type(direction).__name__),
                                        rng_device=rng_device)
        self.params = [entry[1] for entry in tensors]
        for spec, p in zip(self.layout, self.params):
            if not p.is_floating_point():
                raise TypeError(f"parameter {spec.name!r} has dtype {p.dtype}; ZO training needs floating point")
        low = [master_weights is True or (master_weights == "auto" and p.dtype in LOW_PRECISION)
               for p in self.params]
        self._base = [p.detach().reshape(-1).to(torch.float32 if m else p.dtype, copy=True)
                      for p, m in zip(self.params, low)]
        self.has_master = low
        self.numel = self.layout.numel
        self.current: Terms = ()
        self.pending: Update | None = None
        self.numbers_drawn = 0.0
        self.sweeps = 0

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def _z(self, key: int, i: int) -> torch.Tensor:
        spec = self.layout[i]
        return materialize(self.direction, key, spec.tensor_id, spec.numel, self.chunk_size,
                           dtype=self._base[i].dtype, device=self.params[i].device,
                           tensor_start=spec.start, total=self.numel)

    def _write_point(self, point: Terms) -> None:
        for i, (spec, p) in enumerate(zip(self.layout, self.params)):
            value = self._base[i].clone()
            if spec.role == "zo":
                for key, a in point:
                    value += coef_at(a, spec.tensor_id) * self._z(key, i)
            p.data.view(-1).copy_(value)
        self.current = tuple(point)

    def evaluate(self, plan: ProbePlan, objective: Callable[[], object]) -> list:
        values = []
        for i in range(plan.num_points):
            if self.pending is not None:
                self._apply(self.pending)
                self.pending = None
            self._write_point(plan.point_terms(i))
            values.append(objective())
        return values

    def apply(self, update: Update, defer: bool = False) -> None:
        check_update(update)
        if self.pending is not None:
            self._apply(self.pending)
            self.pending = None
        if defer:
            self.pending = update
            return
        self._apply(update)
        self._write_point(())

    def flush(self) -> None:
        if self.pending is not None:
            self._apply(self.pending)
            self.pending = None
        self._write_point(())

    def move(self, point: Terms = (), update: Update | None = None) -> None:
        if update is not None:
            self._apply(update)
        self._write_point(tuple((k, a) for k, a in point if a != 0.0))

    def _apply(self, update: Update) -> None:
        for i, spec in enumerate(self.layout):
            if not update.touches(i, spec.role):
                continue
            x = self._base[i]
            if isinstance(update.grad, ZOGrad):
                g = torch.zeros_like(x)
                for key, c in update.grad.terms:
                    g += coef_at(c, spec.tensor_id) * self._z(key, i)
            else:
                g = dense_chunk(update.grad, i, self.params[i], 0, x.numel(), torch.empty_like(x))
                if g is None:
                    continue
            lr = update.lr[spec.group]
            wd = update.weight_decay[spec.group] if spec.decays else 0.0
            if update.coupled_decay and not (update.rule.fused and isinstance(update.grad, ZOGrad)):
                g = g + wd * x
            else:
                x.mul_(1.0 - lr * wd)
            if lr != 0.0:
                update.rule.apply_chunk(x, g, update.state_slices(i, 0, x.numel()), lr, update.step)

    def base(self, i: int) -> torch.Tensor:
        if self.current or self.pending is not None:
            raise RuntimeError("base() needs the unperturbed parameters; call flush() first")
        return self._base[i]

    def parameter(self, i: int) -> torch.Tensor:
        """The live Parameter of layout tensor ``i`` (for backprop through the model)."""
        return self.params[i]

    def sync(self, i: int) -> None:
        self.params[i].data.view(-1).copy_(self._base[i])

    def read(self, i: int) -> torch.Tensor:
        return self.base(i).clone().view(self.params[i].shape)

    def write(self, i: int, values: torch.Tensor) -> None:
        self.base(i).copy_(values.reshape(-1))
        self.sync(i)

    def gram(self, keys: Sequence[int]) -> list[torch.Tensor]:
        out = []
        for i, spec in enumerate(self.layout):
            if spec.role != "zo":
                out.append(torch.zeros(len(keys), len(keys), dtype=torch.float64))
                continue
            z = torch.stack([self._z(k, i).double() for k in keys])
            out.append(z @ z.T)
        return out

    def probe_coverage(self, eps: float, sample: int = 1 << 16) -> list[float]:
        out = []
        for i, p in enumerate(self.params):
            if not self.has_master[i]:
                out.append(1.0)
                continue
            m = self._base[i][:sample]
            z = torch.randn(m.numel(), generator=rng.generator(rng.mix(0x434F5645, self.layout[i].tensor_id)))
            out.append(float(((m + eps * z).to(p.dtype) != m.to(p.dtype)).float().mean()))
        return out

    def state_dict(self) -> dict:
        return {"current": [[k, a] for k, a in self.current],
                "masters": [b.clone() if m else None for b, m in zip(self._base, self.has_master)]}

    def load_state_dict(self, state: dict) -> None:
        self.current = tuple((int(k), coef_from_state(a)) for k, a in state["current"])
        for i, (b, m) in enumerate(zip(self._base, state["masters"])):
            if m is not None:
                b.copy_(m)
            else:  # the parameters hold the point: base = p - point
                value = self.params[i].detach().reshape(-1).to(b.dtype).clone()
                if self.layout[i].role == "zo":
                    for key, a in self.current:
                        value -= coef_at(a, self.layout[i].tensor_id) * self._z(key, i)
                b.copy_(value)

    def close(self) -> None:
        pass
