r"""Batched probe evaluation: the points of a plan evaluated together, one forward per model call.

FZOO's "batched evaluation" (Dang et al., ICLR 2026; research/fzoo.md, section 1.4) in zotune's
terms. The objective is recorded once (``engines/streaming.py``: its model calls, answered with
zero logits); then, for a group of P points of the plan, the trainable tensors are materialised
per point,

.. math:: W_p = W + \sum_j a_{pj}\, z_j \qquad (p = 1..P),

stacked along a new leading axis, and every recorded call runs once under
``torch.vmap(torch.func.functional_call)`` over that axis: each point's activations are one slice
of a batch of P streams, the frozen tensors are shared. The objective is then replayed once per
point with that point's logits, so its loss code runs unchanged (as with the offload engine).
The model's own parameters stay at the base: a held update is applied first (one sweep), and the
step's update is one more; no perturb/restore sweeps.

Numbers: ``W_p`` is computed as ``base + a z`` directly, chunk by chunk from the same keys the
in-memory engine draws, where the in-memory engine reaches it by moving in place from the previous
point; in fp32 the two differ by round-off (losses within about 1e-6 relative, tested with a
stated tolerance; float64 within 1e-10). With master weights (bf16/fp16) both compute
``round(master + a z)``, so the perturbed weights are the same.

Cost, P points of a plan (``points_per_forward`` caps P; a plan of more points runs in groups):

* memory: P x the bytes of the trainable tensors for the stacks (FZOO's 9 points on SmolLM2-135M
  with full parameters: about 4.8 GB in fp32; under LoRA a few MB), plus P x one forward's
  activations; the in-memory engine needs neither;
* draws: each distinct key once per chunk to build the stacks, plus the update sweep (FZOO: 2N,
  against the in-memory engine's 3N - 1);
* compute: the same FLOPs as P forwards. It pays where one large call beats P small ones (a GPU
  at small batch, launch-bound); on CPU it does not (measured in docs/benchmarks.md), so it is
  off by default. Attention falls back to a loop over the P streams inside vmap where PyTorch has
  no batching rule for the fused CPU kernel.
"""
from __future__ import annotations

import torch

from .. import rng
from ..directions import Direction
from ..errors import ZotuneError
from ..models.blocks import unwrap
from ..plan import ProbePlan, Terms, coef_at
from . import streaming
from .base import MicroBatches
from .in_memory import InMemoryEngine


class BatchedEngine(InMemoryEngine):
    """The in-memory engine, evaluating the points of a plan together (module docstring).

    Args: as :class:`~zotune.engines.InMemoryEngine`, plus
        model: the model the objective calls through zotune's ``ModelRunner``.
        points_per_forward: at most this many points per batched forward (memory: that many
            copies of the trainable tensors); None: all the points of the plan.
    """

    needs_model = True

    def __init__(self, tensors, direction: Direction, *, chunk_size: int = rng.DEFAULT_CHUNK_SIZE,
                 master_weights="auto", threads=None, rng_device=None, model=None,
                 points_per_forward: int | None = None) -> None:
        if model is None:
            raise ZotuneError("engine 'batched' needs the model: ZOOptimizer(model, engine='batched', ...)")
        if points_per_forward is not None and (isinstance(points_per_forward, bool)
                                               or int(points_per_forward) != points_per_forward
                                               or points_per_forward < 1):
            raise ZotuneError(f"points_per_forward must be an integer >= 1 or None, got {points_per_forward!r}")
        super().__init__(tensors, direction, chunk_size=chunk_size, master_weights=master_weights,
                         threads=threads, rng_device=rng_device)
        self.model = model
        self.points_per_forward = None if points_per_forward is None else int(points_per_forward)
        base = unwrap(model)
        out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        self._vocab = out.weight.shape[0] if out is not None else base.config.vocab_size
        self._logit_dtype = out.weight.dtype if out is not None else torch.float32
        self.stack_bytes = 0
        """Bytes of the per-point weight stacks of the last batched forward (its memory cost)."""

    def evaluate(self, plan: ProbePlan, objective) -> list:
        """The objective at every point of ``plan``, the points of a group in one forward per call."""
        num = plan.num_points
        if num <= 1:
            return super().evaluate(plan, objective)
        backprop = [t.name for t in self.tensors if t.role == "backprop"]
        if backprop:
            raise ZotuneError(f"engine 'batched' evaluates points without autograd; tensor {backprop[0]!r} "
                              "is trained by backprop (a tail): use engine='in-memory'")
        parts = objective.parts if isinstance(objective, MicroBatches) else [objective]
        self.flush()  # the model at the base: a held update applied, no perturbation left
        recorded = [streaming.record(part, self._vocab, self._logit_dtype, forbid=unwrap(self.model),
                                     engine="batched") for part in parts]
        calls = [call for part in recorded for call in part]
        group = self.points_per_forward or num
        logits: list[list[torch.Tensor]] = [[] for _ in range(num)]
        for start in range(0, num, group):
            points = list(range(start, min(num, start + group)))
            stacks = self._stacks([plan.point_terms(i) for i in points])
            self.stack_bytes = sum(s.numel() * s.element_size() for s in stacks.values())
            for call in calls:
                out = self._batched_call(call, stacks)
                for j, i in enumerate(points):
                    logits[i].append(out[j])
            del stacks
        values = []
        for i in range(num):
            k, out = 0, []
            for part, part_calls in zip(parts, recorded):
                out.append(streaming.replay(part, part_calls, logits[i][k:k + len(part_calls)], "batched"))
                k += len(part_calls)
            values.append(out[0] if len(parts) == 1 and not isinstance(objective, MicroBatches)
                          else sum(float(v) for v in out) / len(out))
        return values

    # ------------------------------------------------------------------ helpers
    def _stacks(self, points: list[Terms]) -> dict[int, torch.Tensor]:
        """Per perturbed tensor (layout index), its values at each point, stacked: [P, *shape]."""
        stacks = {t.spec.index: torch.empty((len(points), *t.param.shape), dtype=t.param.dtype,
                                            device=t.param.device)
                  for t in self.tensors if t.role == "zo"}

        def chunk(job) -> float:
            ti, ci = job
            t = self.tensors[ti]
            s, e = t.chunks[ci]
            base = t.master[s:e] if t.master is not None else t.flat[s:e]
            out = stacks[ti].view(len(points), -1)[:, s:e]
            keys = {k for point in points for k, _ in point}
            zs, drawn = {}, 0.0
            for k in sorted(keys):  # each key drawn once per chunk, shared by the points using it
                z, sign = self._draw(k, t, ci, torch.empty(e - s, dtype=base.dtype, device=base.device))
                zs[k] = (z, sign)
                drawn += (e - s) * self.direction.numbers_per_element
            for p, point in enumerate(points):
                target = base.clone()
                for k, a in point:
                    a = coef_at(a, t.tensor_id)
                    if a != 0.0:
                        z, sign = zs[k]
                        target.add_(z, alpha=a * sign)
                out[p].copy_(target)
            return drawn

        jobs = [(ti, ci) for ti in stacks for ci in range(len(self.tensors[ti].chunks))]
        self.numbers_drawn += sum(self._map(chunk, jobs))
        self.sweeps += 1
        return stacks

    def _batched_call(self, call, stacks: dict[int, torch.Tensor]) -> torch.Tensor:
        """Logits [P, ...] of one recorded model call at every point of the stacks."""
        module = call.runner.model
        names = {id(p): n for n, p in module.named_parameters()}
        params = {}
        for i, stack in stacks.items():
            name = names.get(id(self.tensors[i].param))
            if name is None:
                raise ZotuneError(f"tensor {self.tensors[i].name!r} is not a parameter of the model the "
                                  "objective calls; engine 'batched' cannot place its per-point values")
            params[name] = stack

        def forward(ps):
            return torch.func.functional_call(module, ps, args=(), kwargs=call.kwargs, strict=False).logits

        try:
            with torch.no_grad():
                return torch.vmap(forward, randomness="error")(params)
        except RuntimeError as err:
            if "randomness" not in str(err):
                raise
            raise ZotuneError("engine 'batched' needs a deterministic forward (the points share one "
                              "call): put the model in eval mode (model.eval()), which turns dropout off") from None
