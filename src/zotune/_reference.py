"""A faithful restatement of MeZO's reference step, kept beside the fast path as its baseline.

MeZO (Malladi et al., 2023; princeton-nlp/MeZO ``large_models/trainer.py``, ``zo_step`` and
``zo_update``) does, per step, for every trainable tensor in ``named_parameters`` order:

1. ``p.data = p.data + eps * z``       (z drawn afresh: a newly allocated tensor)
2. loss+ = L(theta)
3. ``p.data = p.data - 2 * eps * z``   (z drawn again)
4. loss- = L(theta)
5. ``p.data = p.data + eps * z``       (z drawn a third time: restore)
6. pg = (loss+ - loss-) / (2 eps)
7. ``p.data = p.data - lr * (pg * z + wd * p.data)`` (z drawn a fourth time; no wd on biases and
   layer norms)

Four full draws of z per step, each allocating, and every intermediate allocated too. The one
departure from MeZO: instead of reseeding the global generator with a NumPy-drawn seed, z comes
from zotune's keyed generators (same key scheme as ``ZOOptimizer``), so that the reference and the
fast path see identical directions and their trajectories can be compared step by step.
"""
from __future__ import annotations

import math

import torch

from . import rng
from .directions import Direction, Gaussian, materialize
from .optim import decays


class MeZOReference:
    """MeZO's step as the authors' code runs it (see module docstring); for tests and benchmarks.

    Args:
        named_params: ``(name, parameter)`` pairs; tensors without ``requires_grad`` are skipped.
        lr, eps, weight_decay, seed: as in ``ZOOptimizer``.
        direction: the distribution of z (MeZO: Gaussian).
        chunk_size: must match the optimizer being compared, since z is keyed per chunk.
    """

    def __init__(self, named_params, lr: float = 1e-6, eps: float = 1e-3, *, weight_decay: float = 0.0,
                 seed: int = 0, direction: Direction | None = None,
                 chunk_size: int = rng.DEFAULT_CHUNK_SIZE) -> None:
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        self.lr, self.eps, self.weight_decay, self.seed = lr, eps, weight_decay, seed
        self.direction = direction or Gaussian()
        self.chunk_size = chunk_size
        self.step_count = 0

    def _z(self, key: int, name: str, p: torch.Tensor) -> torch.Tensor:
        return materialize(self.direction, key, rng.name_id(name), p.numel(), self.chunk_size,
                           dtype=p.dtype, device=p.device).view(p.shape)

    def _perturb(self, key: int, scaling: float) -> None:
        for name, p in self.params:
            z = self._z(key, name, p)
            p.data = p.data + scaling * z * self.eps

    @torch.no_grad()
    def step(self, closure) -> float:
        key = rng.probe_seed(self.seed, self.step_count, 0)
        self.step_count += 1
        self._perturb(key, 1.0)
        loss_plus = float(closure())
        self._perturb(key, -2.0)
        loss_minus = float(closure())
        self._perturb(key, 1.0)
        if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
            return float("nan")
        pg = (loss_plus - loss_minus) / (2 * self.eps)
        for name, p in self.params:
            z = self._z(key, name, p)
            if decays(name, p, named=True):
                p.data = p.data - self.lr * (pg * z + self.weight_decay * p.data)
            else:
                p.data = p.data - self.lr * (pg * z)
        return (loss_plus + loss_minus) / 2
