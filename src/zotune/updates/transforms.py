r"""Gradient transforms, chained before the update rule (optax style).

A transform maps a gradient to a gradient: ``transform(grad, engine) -> grad``. It works on every
gradient source: for a ``ZOGrad`` it changes the coefficients only (the directions stay keys, so
no gradient-sized buffer appears); for ``SparseGrad`` and ``DenseGrad`` it changes the values.
``chain(t1, t2, ...)`` applies them in order. The engine is passed for transforms that need norms
of a ZOGrad, which come from the Gram matrix of its directions (one read-only sweep).

* :class:`ScalarSign` — ZO-SGD-Sign as ZO-Bench defines it: the sign of each projected-gradient
  coefficient, :math:`c_k \to \mathrm{sign}(c_k)` (for dense gradients, elementwise signSGD).
* :class:`ClipTensorNorm` — per-tensor norm clipping :math:`g_b \to g_b \min(1, C/\|g_b\|)`
  (KerZOO's code clips each tensor at 4e5).
* :class:`Normalize` — :math:`g \to g / \|g\|` over all tensors (normalised ZO-SGD).
"""
from __future__ import annotations

import math

import torch

from ..plan import DenseGrad, Gradient, SparseGrad, ZOGrad, coef_at


def _dense_values(grad: DenseGrad | SparseGrad, engine) -> dict[int, torch.Tensor]:
    if isinstance(grad, SparseGrad):
        return {t: v for t, (_, v) in grad.entries.items()}
    if grad.tensors is not None:
        return dict(grad.tensors)
    params = {t.index: engine.parameter(t.index) for t in engine.layout}
    return {i: p.grad for i, p in params.items() if p.grad is not None}


def _rebuild(grad, values: dict[int, torch.Tensor]):
    if isinstance(grad, SparseGrad):
        return SparseGrad({t: (i, values[t]) for t, (i, _) in grad.entries.items()})
    return DenseGrad(values)


def tensor_norms(grad: Gradient, engine) -> dict[int, float]:
    """``{tensor index: ||g_b||}`` of every tensor the gradient touches (exact; Gram for ZOGrad)."""
    if isinstance(grad, ZOGrad):
        grams = engine.gram([k for k, _ in grad.terms])
        out = {}
        for spec, gram in zip(engine.layout, grams):
            if spec.role != "zo":
                continue
            c = torch.tensor([coef_at(cf, spec.tensor_id) for _, cf in grad.terms], dtype=torch.float64)
            out[spec.index] = max(0.0, float(c @ gram @ c)) ** 0.5
        return out
    return {t: float(v.double().norm()) for t, v in _dense_values(grad, engine).items()}


class ScalarSign:
    """Keep only the sign of each coefficient (ZO-Bench's ZO-SGD-Sign); elementwise for dense."""

    name = "sign"

    def __call__(self, grad: Gradient, engine=None) -> Gradient:
        if isinstance(grad, ZOGrad):
            return grad.map(lambda c: math.copysign(1.0, c) if c != 0 else 0.0)
        return _rebuild(grad, {t: v.sign() for t, v in _dense_values(grad, engine).items()})


class ClipTensorNorm:
    r"""Per-tensor clipping, :math:`g_b \leftarrow g_b \min(1, C / \|g_b\|)`.

    For a ZOGrad the norms come exactly from the Gram matrix of the step's directions (one
    read-only sweep drawing each direction once) and the clip factor becomes a per-tensor
    coefficient, so no gradient-sized buffer is needed."""

    name = "clip"

    def __init__(self, max_norm: float) -> None:
        if not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"clip_norm must be > 0 (or None for no clipping), got {max_norm!r}")
        self.max_norm = float(max_norm)

    def factors(self, grad: Gradient, engine) -> dict[int, float]:
        return {t: (min(1.0, self.max_norm / n) if n > 0 else 1.0)
                for t, n in tensor_norms(grad, engine).items()}

    def __call__(self, grad: Gradient, engine) -> Gradient:
        factors = self.factors(grad, engine)
        if isinstance(grad, ZOGrad):
            ids = {spec.index: spec.tensor_id for spec in engine.layout}
            terms = tuple((k, {ids[t]: coef_at(c, ids[t]) * f for t, f in factors.items()})
                          for k, c in grad.terms)
            return ZOGrad(terms)
        return _rebuild(grad, {t: v * factors[t] for t, v in _dense_values(grad, engine).items()})


class Normalize:
    r"""Divide by the global norm: :math:`g \leftarrow g / \|g\|` (no-op for a zero gradient)."""

    name = "normalize"

    def __call__(self, grad: Gradient, engine) -> Gradient:
        total = sum(n * n for n in tensor_norms(grad, engine).values()) ** 0.5
        if total == 0:
            return grad
        if isinstance(grad, ZOGrad):
            return grad.scaled(1.0 / total)
        return _rebuild(grad, {t: v / total for t, v in _dense_values(grad, engine).items()})


class chain:  # noqa: N801 - optax's name for the same idea
    """Apply transforms in order: ``chain(ClipTensorNorm(1.0), ScalarSign())(grad, engine)``."""

    def __init__(self, *transforms) -> None:
        self.transforms = tuple(transforms)

    def __call__(self, grad: Gradient, engine=None) -> Gradient:
        for t in self.transforms:
            grad = t(grad, engine)
        return grad

    def __len__(self) -> int:
        return len(self.transforms)
