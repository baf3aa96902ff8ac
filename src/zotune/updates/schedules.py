"""Learning-rate schedules: a multiplier of the base learning rate at each step."""
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
    """Multiplier of the base lr at 0-based ``step``: linear warm-up, then constant, linear or cosine
    decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
