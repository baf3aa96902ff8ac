r"""Step programs that estimate a gradient and apply it: the plain step and ZO-SGD-Cons.

``EstimateStep`` (MeZO and everything built like it: ZO-Bench's variants, KerZOO, PeZO):

    ask  -> the estimator's probe plan            (e.g. SPSA: theta + eps z, theta - eps z)
    tell <- one loss per point (or a ranking, for rank-based estimators)
            g = transforms(estimator.combine(plan, feedback)); engine.apply(update(g))

A look-ahead rule (KerZOO's code's linear coupling) moves to its evaluation point before the
probes; the move is held by the engine and fused into the first probe's sweep. A non-finite loss,
or an estimator that declines (``combine`` returns None), skips the step: the parameters go back to
where they were and ``skipped_steps`` grows.

``ConservativeStep`` (ZO-Bench's ZO-SGD-Cons): evaluate theta, estimate g, then evaluate the two
candidates theta -+ lr g and keep the best of the three. The candidates are points along the
step's own directions (keys and coefficients), so the step that is evaluated is exactly the step
that is applied; this needs a state-free rule (SGD or sign), which the builder checks.
"""
from __future__ import annotations

import math

from ..directions import probe_key
from ..engines.base import Update
from ..feedback import CURRENT, Losses, Query, as_kind
from ..plan import ProbePlan, ZOGrad, coef_from_state, map_coef


class EstimateStep:
    """The plain ZO step (see the module docstring). State: the step and its phase."""

    name = "estimate"

    def __init__(self) -> None:
        self.step, self.phase, self.skipped, self.result = 0, "idle", False, math.nan

    def plan(self, core) -> ProbePlan:
        n = core.estimator.num_probes
        return core.estimator.plan(lambda j: probe_key(core.direction, core.seed, self.step, j, n), self.step)

    def begin(self, core, step: int) -> None:
        self.step, self.phase, self.skipped, self.result = step, "probe", False, math.nan
        if getattr(core.rule, "lookahead", False):  # to y_k, fused into the first probe's move
            core.engine.apply(core.shift(1.0), defer=True)

    def ask(self, core) -> Query | None:
        if self.phase != "probe":
            return None
        return Query(self.plan(core), kind=getattr(core.estimator, "feedback", "losses"))

    def tell(self, core, feedback) -> None:
        plan = self.plan(core)
        given = feedback
        feedback = as_kind(feedback, getattr(core.estimator, "feedback", "losses"), plan.num_points)
        self.phase = "done"
        core.last_losses = list(given.values) if isinstance(given, Losses) else []
        if isinstance(given, Losses) and not given.finite:
            self.skip(core)
            return
        values = list(feedback.values) if isinstance(feedback, Losses) else feedback
        grad = core.estimator.combine(plan, values, core.direction.second_moment, self.step)
        if grad is None:  # the estimator declined (FZOO: the losses have no spread)
            self.skip(core)
            return
        grad = core.transforms(grad, core.engine)
        core.last_grad = grad
        update = core.make_update(grad, self.step)
        core.updates += 1
        core.engine.apply(update, defer=core.defer_update)
        if isinstance(given, Losses):  # a ranking has no loss to report
            losses = core.last_losses
            self.result = losses[0] if getattr(core.estimator, "one_sided", False) else sum(losses) / len(losses)

    def skip(self, core) -> None:
        """Back to the iterate without an update (a non-finite loss)."""
        if getattr(core.rule, "lookahead", False):
            core.engine.apply(core.shift(-1.0))
        else:
            core.engine.flush()
        core.skipped_steps += 1
        core.last_grad = None
        self.skipped, self.result, self.phase = True, math.nan, "done"

    def state_dict(self) -> dict:
        return {"step": self.step, "phase": self.phase, "skipped": self.skipped, "result": self.result}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.phase = state["step"], state["phase"]
        self.skipped, self.result = state["skipped"], state["result"]


class ConservativeStep(EstimateStep):
    """ZO-SGD-Cons: keep the best of theta, theta - lr g, theta + lr g (ZO-Bench; Zhang et al.,
    2024). Cost: the estimator's forwards plus 3. The base loss is the step's result."""

    name = "conservative"

    def __init__(self) -> None:
        super().__init__()
        self.base_loss = math.nan
        self.terms: tuple = ()
        self.lr = 0.0

    def begin(self, core, step: int) -> None:
        super().begin(core, step)
        self.phase, self.base_loss, self.terms = "base", math.nan, ()

    def candidates(self) -> ProbePlan:
        keys = tuple(k for k, _ in self.terms)
        down = tuple((j, map_coef(c, lambda v: -self.lr * v)) for j, (_, c) in enumerate(self.terms))
        up = tuple((j, map_coef(c, lambda v: self.lr * v)) for j, (_, c) in enumerate(self.terms))
        return ProbePlan(keys, (down, up))

    def ask(self, core) -> Query | None:
        if self.phase == "base":
            return Query(CURRENT)
        if self.phase == "candidates":
            return Query(self.candidates())
        return super().ask(core)

    def tell(self, core, feedback) -> None:
        if self.phase == "base":
            self.base_loss = as_kind(feedback, "losses", 1).values[0]
            self.phase = "probe"
            return
        if self.phase == "probe":
            plan = self.plan(core)
            losses = as_kind(feedback, "losses", plan.num_points)
            core.last_losses = list(losses.values)
            if not (losses.finite and math.isfinite(self.base_loss)):
                self.skip(core)
                return
            grad = core.estimator.combine(plan, list(losses.values), core.direction.second_moment, self.step)
            if grad is None:
                self.skip(core)
                return
            grad = core.transforms(grad, core.engine)
            core.last_grad = grad
            lrs = set(core.make_update(grad, self.step).lr)
            if len(lrs) != 1:
                raise ValueError("zo-cons needs one learning rate for all parameter groups")
            self.lr, self.terms, self.phase = lrs.pop(), grad.terms, "candidates"
            return
        down, up = as_kind(feedback, "losses", 2).values
        grad = ZOGrad(self.terms)
        finite = lambda v: v if math.isfinite(v) else math.inf  # noqa: E731
        best = min((finite(self.base_loss), 0), (finite(down), 1), (finite(up), 2))[1]
        update = core.make_update(grad, self.step)
        if best == 0:  # keep theta: nothing moves (no decay either)
            update = Update(ZOGrad(()), update.rule, update.lr, [0.0] * len(update.lr), update.step,
                            update.state)
        elif best == 2:
            update.grad = grad.scaled(-1.0)
        core.updates += 1
        core.engine.apply(update)
        self.phase, self.result = "done", self.base_loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "base_loss": self.base_loss, "lr": self.lr,
                "terms": [[k, c] for k, c in self.terms]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.base_loss, self.lr = state["base_loss"], state["lr"]
        self.terms = tuple((int(k), coef_from_state(c)) for k, c in state["terms"])
