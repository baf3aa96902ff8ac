r"""The in-memory engine: parameters stay where they are and are perturbed in place, chunk by chunk.

It implements the engine contract (``engines/base.py``) with one primitive,
``move(point, update)``: bring the parameters from wherever they are now (base plus the current
perturbation) to ``base' + point``, where ``base'`` is the base after ``update``. ``evaluate``,
``apply`` and ``flush`` are sequences of moves:

    MeZO step:      evaluate: move(+eps z) . f+ . move(-eps z) . f-     apply: move((), update)
    deferred step:  evaluate: move(+eps z_t, update_{t-1}) . f+ . move(-eps z_t) . f-
                    apply(update_t, defer=True) holds it for the next evaluation

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
A probe that rounds back to the master (its ulp exceeds ``eps |z|``) is no probe at all;
:meth:`InMemoryEngine.probe_coverage` measures how often that happens per tensor (see
``engines/precision.py`` for what the optimizer does about it).

Updates come from any gradient source: ``ZOGrad`` terms are regenerated from their keys inside the
sweep (fused into the same draw as the perturbation); ``SparseGrad`` and ``DenseGrad`` chunks are
read from their tensors; all go through the same per-chunk rule maths.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import rng
from ..directions import Direction, Position, draw
from ..layout import ParamLayout, TensorSpec
from ..plan import ProbePlan, Terms, ZOGrad, coef_at, coef_from_state
from .base import Update, check_update, dense_chunk

LOW_PRECISION = (torch.float16, torch.bfloat16)
PARALLEL_MIN_NUMEL = 1 << 22
"""Below this many trainable elements a sweep runs serially: thread hand-off would cost more."""


class _Tensor:
    """One tensor as the sweeps see it: its spec's fixed fields copied to plain attributes (the
    per-chunk loop reads them thousands of times a step), its role read live from the layout."""

    __slots__ = ("spec", "param", "master", "name", "tensor_id", "group", "decays", "start", "chunks")

    def __init__(self, spec: TensorSpec, param: torch.Tensor, master: torch.Tensor | None) -> None:
        self.spec, self.param, self.master = spec, param, master
        self.name, self.tensor_id, self.group = spec.name, spec.tensor_id, spec.group
        self.decays, self.start, self.chunks = spec.decays, spec.start, spec.chunks

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def flat(self) -> torch.Tensor:  # not cached: someone may rebind param.data
        return self.param.data.view(-1)


class InMemoryEngine:
    """Evaluates probe plans by in-place perturbation of the model's own parameters.

    Args:
        tensors: ``(name, parameter, group index, decays[, role])`` for each trainable tensor;
            names key the random numbers, so they must be unique and stable across runs (they
            are made canonical: wrapper prefixes do not change them).
        direction: the direction distribution.
        chunk_size: elements per chunk (capped by the direction's own limit).
        master_weights: ``"auto"`` (fp32 master for bf16/fp16 tensors), ``True`` or ``False``.
        threads: worker threads for CPU sweeps; default ``torch.get_num_threads()``.
        rng_device: where random numbers are drawn (default: the parameters' device type).
    """

    def __init__(self, tensors, direction: Direction, *, chunk_size: int = rng.DEFAULT_CHUNK_SIZE,
                 master_weights: bool | str = "auto", threads: int | None = None,
                 rng_device: str | None = None) -> None:
        if master_weights not in (True, False, "auto"):
            raise ValueError(f"master_weights must be True, False or 'auto', got {master_weights!r}")
        self.direction = direction
        limit = direction.max_chunk_size()
        self.chunk_size = min(chunk_size, limit) if limit else chunk_size
        tensors = list(tensors)
        self.layout = ParamLayout.build(tensors, chunk_size=self.chunk_size,
                                        direction=getattr(direction, "name", type(direction).__name__),
                                        rng_device=rng_device)
        self.tensors: list[_Tensor] = []
        for spec, entry in zip(self.layout, tensors):
            p = entry[1]
            if not p.is_floating_point():
                raise TypeError(f"parameter {spec.name!r} has dtype {p.dtype}; ZO training needs floating point")
            if not p.data.is_contiguous():
                raise ValueError(f"parameter {spec.name!r} is not contiguous; call .contiguous() on it first")
            use_master = master_weights is True or (master_weights == "auto" and p.dtype in LOW_PRECISION)
            master = p.data.float().reshape(-1).clone() if use_master else None
            self.tensors.append(_Tensor(spec, p, master))
        self.numel = self.layout.numel
        check = getattr(direction, "check_size", None)
        if check is not None:
            check(self.numel)
        self.rng_device = torch.device(self.layout.rng_device)
        self.current: Terms = ()
        self.pending: Update | None = None
        self.partial: tuple[ProbePlan, list] | None = None  # an evaluation stopped half-way
        self.threads = threads or torch.get_num_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self.numbers_drawn = 0.0
        self.sweeps = 0

    @property
    def device(self) -> torch.device:
        """Where the forward runs (the model runner takes its device from here)."""
        return self.tensors[0].param.device

    # ------------------------------------------------------------ contract
    def evaluate(self, plan: ProbePlan, objective: Callable[[], object]) -> list:
        """``objective()`` at every point of ``plan``, in order; a held update is fused into the
        first move. The parameters stay at the last point (``apply`` or ``flush`` move them on)."""
        # An evaluation stopped by an exception (Ctrl-C in the objective) keeps its values: asked
        # again for the same plan it continues at the point where it stopped, because moving back
        # to the first point would round differently from the path an uninterrupted run takes.
        values = self.partial[1] if self.partial is not None and self.partial[0] == plan else []
        self.partial = (plan, values)
        for i in range(len(values), plan.num_points):
            pending, self.pending = self.pending, None
            self.move(plan.point_terms(i), pending)
            values.append(objective())
        self.partial = None
        return values

    def apply(self, update: Update, defer: bool = False) -> None:
        """Apply ``update`` now (one sweep, which also removes the perturbation), or hold it to
        fuse into the next evaluation's first move (``defer``)."""
        check_update(update)
        pending, self.pending = self.pending, None
        if pending is not None:  # a second update before any evaluation: apply the first in place
            self.move(self.current, pending)
        if defer:
            self.pending = update
        else:
            self.move((), update)

    def flush(self) -> None:
        """Apply a held update and remove any perturbation."""
        pending, self.pending = self.pending, None
        self.move((), pending)

    def move(self, point: Terms = (), update: Update | None = None) -> None:
        """Set the parameters to ``base' + sum_j a_j z_j`` for ``point = ((key, a_j), ...)``."""
        check_update(update)
        point = tuple((k, a) for k, a in point if a != 0.0)
        if update is None and point == self.current:
            return
        jobs = [(t.spec.index, c) for t in self.tensors for c in range(len(t.chunks))
                if t.role == "zo" or (update is not None and update.touches(t.spec.index, t.role))]
        drawn = sum(self._map(lambda job: self._move_chunk(job[0], job[1], point, update), jobs))
        self.numbers_drawn += drawn
        self.sweeps += 1
        self.current = point

    def base(self, ti: int) -> torch.Tensor:
        """Flat view of tensor ``ti``'s unperturbed value: the fp32 master if it has one, else the
        parameter. Only meaningful with no perturbation applied (``current == ()``); write to it,
        then call :meth:`sync`."""
        if self.current or self.pending is not None:
            raise RuntimeError("base() needs the unperturbed parameters; call flush() first")
        t = self.tensors[ti]
        return t.master if t.master is not None else t.flat

    def parameter(self, i: int) -> torch.Tensor:
        """The live Parameter of layout tensor ``i`` (for backprop through the model)."""
        return self.tensors[i].param

    def sync(self, ti: int) -> None:
        """Copy a master copy that was written through :meth:`base` into its parameter."""
        t = self.tensors[ti]
        if t.master is not None:
            t.flat.copy_(t.master)

    def read(self, ti: int) -> torch.Tensor:
        """A copy of tensor ``ti``'s unperturbed value, in its shape (fp32 for master tensors)."""
        return self.base(ti).clone().view(self.tensors[ti].param.shape)

    def write(self, ti: int, values: torch.Tensor) -> None:
        """Set tensor ``ti``'s unperturbed value (and its master copy) to ``values``."""
        self.base(ti).copy_(values.reshape(-1))
        self.sync(ti)

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

        jobs = self.layout.chunk_jobs()
        for ti, g in self._map(chunk_gram, jobs):
            out[ti] += g
        self.sweeps += 1
        self.numbers_drawn += n * sum(self.tensors[ti].chunks[c][1] - self.tensors[ti].chunks[c][0]
                                      for ti, c in jobs) * self.direction.numbers_per_element
        return out

    def probe_coverage(self, eps: float, sample: int = 1 << 16) -> list[float]:
        """Per tensor, the fraction of elements a probe ``round(master + eps z)`` actually moves
        (estimated on the first ``sample`` elements with a fixed key); 1.0 for tensors without a
        master copy, whose probes are not rounded to a lower precision."""
        out = []
        for t in self.tensors:
            if t.master is None:
                out.append(1.0)
                continue
            m = t.master[: min(sample, t.master.numel())]
            z = torch.randn(m.numel(), generator=rng.generator(rng.mix(0x434F5645, t.tensor_id)))
            low = t.param.dtype
            moved = (m + eps * z.to(m.device)).to(low) != m.to(low)
            out.append(float(moved.float().mean()) if m.numel() else 1.0)
        return out

    def state_dict(self) -> dict:
        """The current perturbation and the fp32 master copies (copies)."""
        partial = None if self.partial is None or not self.partial[1] else {
            "keys": list(self.partial[0].keys), "points": [[list(t) for t in p] for p in self.partial[0].points],
            "values": [v.detach().clone() if torch.is_tensor(v) else v for v in self.partial[1]]}
        return {"current": [[k, a] for k, a in self.current],
                "masters": [None if t.master is None else t.master.clone() for t in self.tensors],
                "partial": partial}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; master copies are copied in place (the engine keeps its own
        buffers), and a missing or misshapen one is an error rather than a silent replacement."""
        masters = state["masters"]
        if len(masters) != len(self.tensors):
            raise ValueError(f"engine state has {len(masters)} tensors, this engine {len(self.tensors)}")
        for t, m in zip(self.tensors, masters):
            if (m is None) != (t.master is None):
                raise ValueError(f"engine state {'has no' if m is None else 'has a'} master copy of "
                                 f"{t.name!r}, this engine {'has one' if m is None else 'has none'} "
                                 "(master_weights differs)")
            if m is not None:
                if m.shape != t.master.shape:
                    raise ValueError(f"master copy of {t.name!r} has shape {tuple(m.shape)}, expected "
                                     f"{tuple(t.master.shape)}")
                t.master.copy_(m)
        self.current = tuple((int(k), coef_from_state(a)) for k, a in state["current"])
        partial = state.get("partial")
        self.partial = None if partial is None else (
            ProbePlan(tuple(int(k) for k in partial["keys"]),
                      tuple(tuple((int(j), coef_from_state(a)) for j, a in p) for p in partial["points"])),
            list(partial["values"]))

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
        if out.device.type != self.rng_device.type:  # numbers drawn where the run records them
            values, sign = draw(self.direction, key, t.tensor_id, c, position,
                                torch.empty(out.numel(), dtype=out.dtype, device=self.rng_device))
            return out.copy_(values), sign
        return draw(self.direction, key, t.tensor_id, c, position, out)

    def _move_chunk(self, ti: int, ci: int, point: Terms, update: Update | None,
                    current: Terms | None = None, target: torch.Tensor | None = None) -> float:
        """Move one chunk from ``current`` (default: the engine's) to ``point`` after ``update``,
        in place in the parameter or (``target``, tensors without a master) in a copy of it."""
        t = self.tensors[ti]
        if current is None:
            current = self.current
        s, e = t.chunks[ci]
        n = e - s
        zo = t.role == "zo"
        if update is not None and not update.touches(ti, t.role):
            update = None
        lr = update.lr[t.group] if update else 0.0
        wd = update.weight_decay[t.group] if update and t.decays else 0.0
        keyed = update is not None and isinstance(update.grad, ZOGrad)
        fused = update is None or (keyed and update.rule.fused)
        # Coupled (L2) decay equals decoupled decay for SGD; it differs only for stateful rules.
        coupled = wd if update is not None and update.coupled_decay and not fused else 0.0
        decay = 1.0 - lr * wd if not coupled else 1.0
        # Coefficients may differ by tensor (KerZOO's per-tensor r, per-tensor clipping).
        tid = t.tensor_id
        grad_terms = tuple((k, coef_at(c, tid)) for k, c in update.grad.terms) if keyed and zo else ()
        point = tuple((k, coef_at(a, tid)) for k, a in point) if zo else ()
        current = tuple((k, coef_at(a, tid)) for k, a in current) if zo else ()
        if t.master is not None:
            return self._move_chunk_master(t, ci, point, update, decay, fused, lr, grad_terms, coupled)

        x = t.flat[s:e] if target is None else target
        zbuf, gbuf = self._buffers(n, x.dtype, x.device)
        drawn = 0.0
        if coupled and current:  # the L2 term needs the unperturbed x: restore it first
            for k, a in current:
                z, sign = self._draw(k, t, ci, zbuf)
                drawn += n * self.direction.numbers_per_element
                x.add_(z, alpha=-a * sign)
            current = ()
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
        g = None
        if not fused:
            g = gbuf.zero_() if keyed else dense_chunk(update.grad, ti, t.param, s, e, gbuf)
            if g is not None and coupled:
                g.add_(x, alpha=coupled)
        if decay != 1.0 and (g is not None or fused):
            x.mul_(decay)
        for k, (alpha, cg) in coef.items():
            if alpha == 0.0 and cg == 0.0:
                continue
            z, sign = self._draw(k, t, ci, zbuf)
            drawn += n * self.direction.numbers_per_element
            if alpha != 0.0:
                x.add_(z, alpha=alpha * sign)
            if cg != 0.0:
                g.add_(z, alpha=cg * sign)
        if g is not None and lr != 0.0:
            update.rule.apply_chunk(x, g, update.state_slices(ti, s, e), lr, update.step)
        return drawn

    def _move_chunk_master(self, t, ci, point, update, decay, fused, lr, grad_terms, coupled) -> float:
        s, e = t.chunks[ci]
        n = e - s
        m = t.master[s:e]
        zbuf, tbuf = self._buffers(n, m.dtype, m.device)
        drawn = 0.0
        if update is not None:
            keyed = isinstance(update.grad, ZOGrad)
            g = None
            if fused or keyed:
                g = None if fused else tbuf.zero_()
            else:
                g = dense_chunk(update.grad, t.spec.index, t.param, s, e, tbuf)
            if g is not None and coupled:
                g.add_(m, alpha=coupled)
            if decay != 1.0 and (g is not None or fused):
                m.mul_(decay)
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
                update.rule.apply_chunk(m, g, update.state_slices(t.spec.index, s, e), lr, update.step)
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

