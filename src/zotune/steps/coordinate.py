r"""The coordinate step: DeepZero's CGE as a step program (``estimators/cge.py`` has the maths).

A coordinate perturbation :math:`\theta + \mu e_i` is not a point along a random direction, so
it is not a probe plan: the program asks one :class:`~zotune.engines.coordinates.CoordinatePlan`
per step, the base point and every active coordinate::

    ask  -> CoordinatePlan(S, mu)            l_0 = loss(theta), l_k = loss(theta + mu e_k), k in S
    tell <- Losses(l_0, l_1, ..., l_|S|)
    g = CGE.combine(l_0, l_1, ...);  engine.apply(update(g))

The engine evaluates the plan (``engines/coordinates.py``): with a plain closure it moves one
coordinate at a time through its unperturbed storage (``base``/``sync``) and restores the saved
value, so ``step(closure)`` calls the closure |S| + 1 times (d + 1 for dense CGE) and any engine
with ``base``/``sync`` runs it unchanged; an objective that evaluates several coordinates at once
(``models.query_batch``) gets them as moves; the distributed engine gives each rank a share
(``distributed/coordinates.py``). Each loss difference is divided by the step really taken,
:math:`\mathrm{fl}(\theta_i + \mu) - \theta_i`, computed from the unperturbed values after the
evaluation. A stop between ask and tell asks the same plan again (the evaluation changes nothing
it does not restore). A non-finite loss skips the step.
"""
from __future__ import annotations

import math

import torch

from ..engines.coordinates import CoordinatePlan, steps_taken
from ..feedback import Query, as_kind


class CoordinateStep:
    """See the module docstring. State: the step, whether its query is answered, and its losses."""

    name = "coordinate"

    def __init__(self) -> None:
        self.step, self.pos, self.skipped, self.result = 0, -1, False, math.nan
        self.losses: list[float] = []
        self._plan: CoordinatePlan | None = None

    def plan(self, core) -> CoordinatePlan:
        if self._plan is None:
            coords = tuple(core.estimator.coordinates(core.engine.layout))
            self._plan = CoordinatePlan(coords, core.estimator.eps)
        return self._plan

    def begin(self, core, step: int) -> None:
        core.engine.flush()  # base() needs the unperturbed parameters
        self.step, self.pos, self.skipped, self.result = step, 0, False, math.nan
        self.losses, self._plan = [], None

    def ask(self, core) -> Query | None:
        return None if self.pos < 0 else Query(self.plan(core))

    def tell(self, core, feedback) -> None:
        plan = self.plan(core)
        self.losses = list(as_kind(feedback, "losses", plan.num_points).values)
        self.pos = -1
        core.last_losses = list(self.losses)
        if not all(math.isfinite(v) for v in self.losses):
            self.skipped = True
            core.skipped_steps += 1
            return
        layout = core.engine.layout
        # values in the parameter's dtype, fp32 for half-precision ones (their rule state is fp32)
        dtypes = {s.index: s.dtype if s.dtype in (torch.float32, torch.float64) else torch.float32
                  for s in layout}
        grad = core.estimator.combine(layout, self.losses[0], self.losses[1:], steps_taken(core.engine, plan),
                                      dtypes)
        grad = core.transforms(grad, core.engine)
        core.last_grad = grad
        core.updates += 1
        core.engine.apply(core.make_update(grad, self.step), defer=core.defer_update)
        self.result = self.losses[0]

    def state_dict(self) -> dict:
        return {"step": self.step, "pos": self.pos, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.pos = state["step"], state["pos"]
        self.losses, self._plan = list(state["losses"]), None
