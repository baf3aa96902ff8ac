r"""The coordinate step: DeepZero's CGE as a step program (``estimators/cge.py`` has the maths).

A coordinate perturbation :math:`\theta + \mu e_i` is not a point along a random direction, so
it is not a probe plan: the program moves one coordinate at a time through the engine's
unperturbed storage (``base``/``sync``, the way DiZO's projection writes) and asks for the loss
of the parameters as they are (``feedback.CURRENT``)::

    ask  -> CURRENT                      l_0 = loss(theta)           (the base query)
    for each active coordinate (t, i):
        ask  -> CURRENT after theta_t[i] <- fl(theta_t[i] + mu)
        tell <- l_k;  theta_t[i] <- its saved value (bit-exact restore, no drift)
    g = CGE.combine(l_0, l_1, ...);  engine.apply(update(g))

so ``step(closure)`` calls the closure |S| + 1 times (d + 1 for dense CGE) and any engine with
``base``/``sync`` runs it unchanged. Perturbing writes the new value from the saved one, so a
query asked again after a stop (a resume between ask and tell) perturbs the same coordinate to the
same value. A non-finite loss skips the step (the coordinate is restored first).
"""
from __future__ import annotations

import math

import torch

from ..feedback import CURRENT, Query, as_kind


class CoordinateStep:
    """See the module docstring. State: the step, its position and the losses so far."""

    name = "coordinate"

    def __init__(self) -> None:
        self.step, self.pos, self.skipped, self.result = 0, -1, False, math.nan
        self.losses: list[float] = []
        self.steps: list[float] = []
        self.saved = None  # (layout index, flat position, old value) while a coordinate is moved
        self._coords: list[tuple[int, int]] | None = None

    def coordinates(self, core) -> list[tuple[int, int]]:
        if self._coords is None:
            self._coords = core.estimator.coordinates(core.engine.layout)
        return self._coords

    def begin(self, core, step: int) -> None:
        core.engine.flush()  # base() needs the unperturbed parameters
        self.step, self.pos, self.skipped, self.result = step, 0, False, math.nan
        self.losses, self.steps, self.saved, self._coords = [], [], None, None

    def ask(self, core) -> Query | None:
        if self.pos < 0:
            return None
        if self.pos > 0:
            t, i = self.coordinates(core)[self.pos - 1]
            flat = core.engine.base(t)
            if self.saved is None:
                self.saved = (t, i, flat[i].item())
            old = self.saved[2]
            flat[i] = old + core.estimator.eps  # from the saved value: idempotent on a re-ask
            core.engine.sync(t)
        return Query(CURRENT)

    def tell(self, core, feedback) -> None:
        (loss,) = as_kind(feedback, "losses", 1).values
        if self.saved is not None:
            t, i, old = self.saved
            flat = core.engine.base(t)
            self.steps.append(float(flat[i].item()) - old)  # the step really taken (fp64 maths)
            flat[i] = old
            core.engine.sync(t)
            self.saved = None
        self.losses.append(loss)
        self.pos += 1
        if not math.isfinite(loss):
            core.last_losses, self.pos, self.skipped = list(self.losses), -1, True
            core.skipped_steps += 1
            return
        if self.pos <= len(self.coordinates(core)):
            return
        self.pos = -1
        layout = core.engine.layout
        core.last_losses = list(self.losses)
        # values in the parameter's dtype, fp32 for half-precision ones (their rule state is fp32)
        dtypes = {s.index: s.dtype if s.dtype in (torch.float32, torch.float64) else torch.float32
                  for s in layout}
        grad = core.estimator.combine(layout, self.losses[0], self.losses[1:], self.steps, dtypes)
        grad = core.transforms(grad, core.engine)
        core.last_grad = grad
        core.updates += 1
        core.engine.apply(core.make_update(grad, self.step), defer=core.defer_update)
        self.result = self.losses[0]

    def state_dict(self) -> dict:
        return {"step": self.step, "pos": self.pos, "losses": list(self.losses),
                "steps": list(self.steps), "saved": None if self.saved is None else list(self.saved)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.pos = state["step"], state["pos"]
        self.losses, self.steps = list(state["losses"]), list(state["steps"])
        saved = state.get("saved")
        self.saved = None if saved is None else (int(saved[0]), int(saved[1]), float(saved[2]))
        self._coords = None
