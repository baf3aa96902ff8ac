r"""The in-memory engine: parameters stay where they are and are perturbed in place, chunk by chunk.

The engine owns one operation, ``move(point, update)``: bring the parameters from wherever they
are now (base plus the current perturbation) to ``base' + point``, where ``base'`` is the base
after ``update``. Everything a ZO step does is a sequence of moves:

    MeZO step:      move(+eps z) . f+ . move(-eps z) . f- . move((), update)
    deferred step:  move(+eps z_t, update_{t-1}) . f+ . move(-eps z_t) . f-   (update_t kept pending)

One move is one sweep over the parameters, whatever it combines: restoring the old point, the
decoupled weight decay, the SGD update and the new point all reuse one draw of each direction per
chunk (DESIGN.md, invariant 3). Per chunk, with decay factor d = 1 - lr * wd:

.. math:: x \leftarrow d\,x + \sum_k (d\,\alpha^{\text{restore}}_k - \eta c_k + a_k)\, z_k

Chunks are independent (each has its own key), so they are processed by a small thread pool on
CPU: drawing random numbers is the bottleneck there and torch's CPU sampler is single-threaded.

Low precision (bf16/fp16 parameters): with ``master_weights`` on, an fp32 master copy holds the
unperturbed parameters and every move *rewrites* the low-precision tensor as
``round(master + point)``. Restoring is therefore exact (no +eps/-eps drift), and updates far below
one bf16 ulp accumulate in the master instead of being rounded away. Cost: 4 bytes per trainable
low-precision parameter. Without it, arithmetic is in place in the parameter dtype, as MeZO does.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .. import rng
from ..directions import Direction, Position, draw
from ..plan import Coef, Terms, ZOGrad, coef_at

LOW_PRECISION = (torch.float16, torch.bfloat16)
PARALLEL_MIN_NUMEL = 1 << 22
"""Below this many trainable elements a sweep runs serially: thread hand-off would cost more."""


@dataclass
class Update:
    """A parameter update to apply during a move.

    Attributes:
        grad: the ZO gradient (after the rule's scalar transform).
        rule: the update rule (``fused`` or chunk-wise).
        lr: learning rate of each tensor's group, by group index.
        weight_decay: decoupled weight decay of each group, by group index.
        step: 1-based update count (Adam's bias correction).
        state: state tensors of each trainable tensor, by tensor index (rule buffers).
    """

    grad: ZOGrad
    rule: object
    lr: Sequence[float]
    weight_decay: Sequence[float]
    step: int = 1
    state: Callable[[int], dict[str, torch.Tensor]] | None = None


@dataclass
class _Tensor:
    name: str
    param: torch.Tensor
    tensor_id: int
    group: int
    decays: bool
    master: torch.Tensor | None
    start: int = 0
    chunks: list[tuple[int, int]] = field(default_factory=list)

    @property
    def flat(self) -> torch.Tensor:
        return self.param.data.view(-1)


class InMemoryEngine:
    """Evaluates probe plans by in-place perturbation of the model's own parameters.

    Args:
        tensors: ``(name, parameter, group index, decays)`` for each trainable tensor; names key
            the random numbers, so they must be unique and stable across runs.
        direction: the direction distribution.
        chunk_size: elements per chunk (capped by the direction's own limit).
        master_weights: ``"auto"`` (fp32 master for bf16/fp16 tensors), ``True`` or ``False``.
        threads: worker threads for CPU sweeps; default ``torch.get_num_threads()``.
        master_store: where master copies live, by tensor name (the optimizer's state, so that
            they are checkpointed); created if missing.
    """

    def __init__(self, tensors, direction: Direction, *, chunk_size: int = rng.DEFAULT_CHUNK_SIZE,
                 master_weights: bool | str = "auto", threads: int | None = None,
                 master_store: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
        if master_weights not in (True, False, "auto"):
            raise ValueError(f"master_weights must be True, False or 'auto', got {master_weights!r}")
        self.direction = direction
        limit = direction.max_chunk_size()
        self.chunk_size = min(chunk_size, limit) if limit else chunk_size
        self.tensors: list[_Tensor] = []
        names = set()
        for i, (name, p, group, decays) in enumerate(tensors):
            if name in names:
                raise ValueError(f"duplicate trainable tensor name {name!r}")
            names.add(name)
            if not p.is_floating_point():
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; ZO training needs floating point")
            if not p.data.is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous; call .contiguous() on it first")
            use_master = master_weights is True or (master_weights == "auto" and p.dtype in LOW_PRECISION)
            master = None
            if use_master:
                master = (master_store(i, p) if master_store else p.data.float().reshape(-1).clone())
            t = _Tensor(name, p, rng.name_id(name), group, decays, master,
                        start=sum(u.param.numel() for u in self.tensors))
            t.chunks = rng.chunk_bounds(p.numel(), self.chunk_size)
            self.tensors.append(t)
        self.numel = sum(t.param.numel() for t in self.tensors)
        check = getattr(direction, "check_size", None)
        if check is not None:
            check(self.numel)
        self.current: Terms = ()
        self.threads = threads or torch.get_num_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self.numbers_drawn = 0.0
        self.sweeps = 0

    # ---------------------------------------------------------------- public
    def move(self, point: Terms = (), update: Update | None = None) -> None:
        """Set the parameters to ``base' + sum_j a_j z_j`` for ``point = ((key, a_j), ...)``."""
        point = tuple((k, a) for k, a in point if a != 0.0)
        if update is None and point == self.current:
            return
        jobs = [(ti, ci) for ti, t in enumerate(self.tensors) for ci in range(len(t.chunks))]
        drawn = sum(self._map(lambda job: self._move_chunk(job[0], job[1], point, update), jobs))
        self.numbers_drawn += drawn
        self.sweeps += 1
        self.current = point

    def base(self, ti: int) -> torch.Tensor:
        """Flat view of tensor ``ti``'s unperturbed value: the fp32 master if it has one, else the
        parameter. Only meaningful with no perturbation applied (``current == ()``); write to it,
        then call :meth:`sync`."""
        if self.current:
            raise RuntimeError("base() needs the unperturbed parameters; call move(()) first")
        t = self.tensors[ti]
        return t.master if t.master is not None else t.flat

    def sync(self, ti: int) -> None:
        """Copy a master copy that was written through :meth:`base` into its parameter."""
        t = self.tensors[ti]
        if t.master is not None:
            t.flat.copy_(t.master)

    def gram(self, keys: Sequence[int]) -> list[torch.Tensor]:
        """Per tensor, the float64 matrix of inner products ``<z_i, z_j>`` of the directions of
        ``keys``: one read-only sweep drawing each direction once. Per-tensor norms of any
        combination ``sum_i c_i z_i`` follow as ``c^T G c`` (used by per-tensor clipping)."""
        keys = list(keys)
        n = len(keys)
        out = [torch.zeros(n, n, dtype=torch.float64) for _ in self.tensors]

        def chunk_gram(job):
            ti, ci = job
            t = self.tensors[ti]
            s, e = t.chunks[ci]
            # draw in the dtype the sweeps draw in, so that these are the directions applied
            dtype = t.master.dtype if t.master is not None else t.param.dtype
            zs = []
            for k in keys:
                values, sign = self._draw(k, t, ci, torch.empty(e - s, dtype=dtype, device=t.param.device))
                zs.append(values.double() * sign)
            z = torch.stack(zs)
            return ti, (z @ z.T).cpu()

        jobs = [(ti, ci) for ti, t in enumerate(self.tensors) for ci in range(len(t.chunks))]
        for ti, g in self._map(chunk_gram, jobs):
            out[ti] += g
        self.sweeps += 1
        self.numbers_drawn += n * self.numel * self.direction.numbers_per_element
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # --------------------------------------------------------------- helpers
    def _map(self, fn, jobs):
        """``map(fn, jobs)``, on the thread pool for large CPU models."""
        device_is_cpu = all(t.param.device.type == "cpu" for t in self.tensors)
        if device_is_cpu and self.threads > 1 and self.numel >= PARALLEL_MIN_NUMEL:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zotune-sweep")
            return list(self._pool.map(fn, jobs))
        return list(map(fn, jobs))

    def _buffers(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Two per-thread scratch buffers of at least ``n`` elements."""
        key = (dtype, device)
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        pair = bufs.get(key)
        if pair is None or pair[0].numel() < n:
            size = max(n, self.chunk_size if self.numel >= self.chunk_size else n)
            pair = bufs[key] = (torch.empty(size, dtype=dtype, device=device),
                                torch.empty(size, dtype=dtype, device=device))
        return pair[0][:n], pair[1][:n]

    def _draw(self, key: int, t: _Tensor, c: int, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        position = Position(self.numel, t.start, t.param.numel(), t.chunks[c][0])
        return draw(self.direction, key, t.tensor_id, c, position, out)

    def _move_chunk(self, ti: int, ci: int, point: Terms, update: Update | None) -> float:
        t = self.tensors[ti]
        s, e = t.chunks[ci]
        n = e - s
        lr = update.lr[t.group] if update else 0.0
        wd = update.weight_decay[t.group] if update and t.decays else 0.0
        decay = 1.0 - lr * wd
        fused = update is None or update.rule.fused
        # Coefficients may differ by tensor (KerZOO's per-tensor r, per-tensor clipping).
        tid = t.tensor_id
        grad_terms = tuple((k, coef_at(c, tid)) for k, c in update.grad.terms) if update else ()
        point = tuple((k, coef_at(a, tid)) for k, a in point)
        current = tuple((k, coef_at(a, tid)) for k, a in self.current)
        if t.master is not None:
            return self._move_chunk_master(ti, ci, point, update, decay, fused, lr, grad_terms)

        x = t.flat[s:e]
        # Coefficients per key: [alpha applied to x, coefficient accumulated into g].
        coef: dict[int, list[float]] = {}
        for k, a in current:
            coef.setdefault(k, [0.0, 0.0])[0] -= a * decay
        for k, c in grad_terms:
            slot = coef.setdefault(k, [0.0, 0.0])
            if fused:
                slot[0] -= lr * c
            else:
                slot[1] += c
        for k, a in point:
            coef.setdefault(k, [0.0, 0.0])[0] += a
        zbuf, gbuf = self._buffers(n, x.dtype, x.device)
        if decay != 1.0:
            x.mul_(decay)
        if not fused:
            gbuf.zero_()
        drawn = 0.0
        for k, (alpha, cg) in coef.items():
            if alpha == 0.0 and cg == 0.0:
                continue
            z, sign = self._draw(k, t, ci, zbuf)
            drawn += n * self.direction.numbers_per_element
            if alpha != 0.0:
                x.add_(z, alpha=alpha * sign)
            if cg != 0.0:
                gbuf.add_(z, alpha=cg * sign)
        if not fused and lr != 0.0:
            update.rule.apply_chunk(x, gbuf, self._state_slices(update, ti, s, e), lr, update.step)
        return drawn

    def _move_chunk_master(self, ti, ci, point, update, decay, fused, lr, grad_terms) -> float:
        t = self.tensors[ti]
        s, e = t.chunks[ci]
        n = e - s
        m = t.master[s:e]
        zbuf, tbuf = self._buffers(n, m.dtype, m.device)
        drawn = 0.0
        if update is not None:
            if decay != 1.0:
                m.mul_(decay)
            g = None if fused else tbuf.zero_()
            for k, c in grad_terms:
                if c == 0.0:
                    continue
                z, sign = self._draw(k, t, ci, zbuf)
                drawn += n * self.direction.numbers_per_element
                if fused:
                    m.add_(z, alpha=-lr * c * sign)
                else:
                    g.add_(z, alpha=c * sign)
            if g is not None and lr != 0.0:
                update.rule.apply_chunk(m, g, self._state_slices(update, ti, s, e), lr, update.step)
        if point:
            target = tbuf.copy_(m)
            for k, a in point:
                if a == 0.0:
                    continue
                z, sign = self._draw(k, t, ci, zbuf)
                drawn += n * self.direction.numbers_per_element
                target.add_(z, alpha=a * sign)
            t.flat[s:e].copy_(target)
        else:
            t.flat[s:e].copy_(m)
        return drawn

    @staticmethod
    def _state_slices(update: Update, ti: int, s: int, e: int) -> dict[str, torch.Tensor]:
        return {name: buf.view(-1)[s:e] for name, buf in update.state(ti).items()}

