r"""Learning-rate schedules: a multiplier :math:`\lambda(t)` of the base learning rate.

Update t (counting from 0) applies :math:`\eta\,\lambda(t)`, exactly as a ``torch.optim``
optimizer driven by ``transformers``' ``get_linear_schedule_with_warmup`` /
``get_cosine_schedule_with_warmup`` (a ``LambdaLR``, stepped after each update) does. With w
warm-up steps and horizon T:

.. math::
    \lambda(t) = t / w \ (t < w), \qquad
    \text{linear: } \max(0, (T - t) / (T - w)), \qquad
    \text{cosine: } \max(0, \tfrac12 (1 + \cos(\pi (t - w) / (T - w)))).

So warm-up starts at 0 and the last update of a decaying schedule (t = T - 1) still moves.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def check_schedule(kind: str, warmup_steps: int, total_steps: int | None) -> None:
    """Raise ValueError for an unknown schedule or inconsistent lengths."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid schedules: {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if kind != "constant" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"schedule {kind!r} needs total_steps > warmup_steps, got {total_steps}")


def lr_factor(kind: str, step: int, *, warmup_steps: int = 0, total_steps: int | None = None) -> float:
    """:math:`\\lambda(t)` for the update of 0-based ``step`` (see the module docstring)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
