r"""ZO-RankSGD's step programs: plain steps, the ranking line search, and the authors' human loop.

Every round asks a ranking oracle about points and is told the best of them (research
ranksgd_deepzero.md, A.4-A.5). A *gradient round* shows the m points ``x + mu xi_i`` and wants
the top k; the estimator turns the answer into :math:`\tilde g = \frac{1}{|E|}\sum_i c_i \xi_i`.
Then, by ``mode``:

``plain``
    :math:`x \leftarrow x - \eta_t v_t`: one round per step.
``line-search`` (A.5)
    a *search round* shows :math:`x - \eta_t \gamma^j v_t` for ``j = 0..l-1`` and x itself and
    wants the best one (k = 1); the parameters move there (or stay). Two rounds, m + l + 1
    points per step.
``human`` (the authors' SD demo, ``optimizer.py``)
    the direction is the running mean D of the gradient rounds since the last accepted move; the
    search round shows :math:`x - \eta_t \gamma^j D` for ``j = 0..l-1`` (``l = m - 2`` by
    default), the best perturbed point of the gradient round just done, and x. Accepting any but
    x moves there and resets D; choosing x keeps averaging.

:math:`v_t = \tilde g_t` or, with ``momentum`` :math:`\beta > 0`, heavy ball over keys,
:math:`v_t = \beta v_{t-1} + \tilde g_t`, kept as (key, coefficient) terms and truncated once
:math:`\beta^{age} <` ``momentum_tol`` (so a step regenerates about
:math:`m \log(\mathrm{tol}) / \log \beta` directions; for large models prefer the shared
``update="momentum"`` rule in plain mode, which keeps a parameter-sized buffer instead).
:math:`\eta_t = \eta \lambda(t)\, \mathrm{decay}^t` (the schedule's lambda, times a per-step
decay: 0.95 in a third-party port). Search rounds apply exactly the point that was evaluated, so
they need the state-free ``sgd`` rule and one learning rate.

State (saved, also between ask and tell): the phase, the direction terms, D and its count, the
best sample's key, the momentum terms, and counters of rounds and accepted moves.
"""
from __future__ import annotations

import math

from ..directions import probe_key
from ..engines.base import Update
from ..feedback import Edges, Losses, Query, Ranking, as_kind
from ..plan import ProbePlan, ZOGrad, coef_from_state, map_coef

MODES = ("plain", "line-search", "human")


def _terms_state(terms) -> list:
    return [[k, c] for k, c in terms]


def _terms_load(state) -> tuple:
    return tuple((int(k), coef_from_state(c)) for k, c in state)


class RankStep:
    """One ZO-RankSGD step as rounds of ranking queries (see the module docstring).

    Args:
        mode: ``plain``, ``line-search`` or ``human``.
        line_search: l, the step sizes a search round tries (default 5; ``human``: m - 2).
        gamma: the factor between successive step sizes (0 < gamma < 1; 0.5 as the authors).
        momentum: heavy-ball beta over keys (0 = none; not with ``human``, which averages).
        momentum_tol: momentum terms whose weight beta^age falls below this are dropped.
        decay: per-step factor on the step size (1 = none).
        adaptive: re-centre the search grid on the chosen step size after each search round
            (a departure from the paper, whose grid is fixed: see ``adapt``).
    """

    name = "rank"

    def __init__(self, mode: str = "plain", line_search: int | None = None, gamma: float = 0.5,
                 momentum: float = 0.0, momentum_tol: float = 1e-6, decay: float = 1.0,
                 adaptive: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown RankSGD mode {mode!r}; valid modes: {', '.join(MODES)}")
        if line_search is not None and (isinstance(line_search, bool) or int(line_search) != line_search
                                        or line_search < 1):
            raise ValueError(f"line_search (step sizes per search round) must be an integer >= 1, "
                             f"got {line_search!r}")
        if not 0 < gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {gamma!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if momentum and mode == "human":
            raise ValueError("mode 'human' averages the directions of its gradient rounds itself; "
                             "momentum applies to modes 'plain' and 'line-search'")
        if not 0 < momentum_tol < 1:
            raise ValueError(f"momentum_tol must be in (0, 1), got {momentum_tol!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        self.mode, self.gamma, self.momentum = mode, float(gamma), float(momentum)
        self.momentum_tol, self.decay = float(momentum_tol), float(decay)
        if adaptive and mode == "plain":
            raise ValueError("adaptive re-centres a search grid: it needs mode 'line-search' or 'human'")
        self.adaptive, self.scale, self.factor = bool(adaptive), 1.0, 1.0
        self.line_search = None if line_search is None else int(line_search)
        self.step, self.phase, self.skipped, self.result = 0, "idle", False, math.nan
        self.rounds = self.moves = 0
        self.terms: tuple = ()       # the direction a search round is trying, eta applied later
        self.eta = 0.0               # eta_t of this step's search
        self.mean: tuple = ()        # human: running mean D of directions since the last move
        self.count = 0               # human: gradient rounds in D
        self.best_key: int | None = None  # human: key of the gradient round's best point
        self.velocity: list = []     # momentum: [key, coefficient, age]
        self.chosen: int | None = None

    # ---------------------------------------------------------- settings
    def settings(self) -> dict:
        return {"mode": self.mode, "line_search": self.line_search, "gamma": self.gamma,
                "momentum": self.momentum, "momentum_tol": self.momentum_tol, "decay": self.decay,
                "adaptive": self.adaptive}

    def search_size(self, core) -> int:
        if self.line_search is not None:
            return self.line_search
        return max(core.estimator.m - 2, 1) if self.mode == "human" else 5

    def check(self, core) -> None:
        """Search rounds apply the evaluated point: they need plain SGD (builder calls this)."""
        if not all(hasattr(core.estimator, a) for a in ("m", "k", "mu")):
            raise ValueError(f"the rank step program needs a ranking estimator (m, k, mu), got "
                             f"{type(core.estimator).__name__}")
        if self.mode != "plain" and getattr(core.rule, "name", None) != "sgd":
            raise ValueError(f"RankSGD mode {self.mode!r} moves to the point the oracle chose, which "
                             f"needs the 'sgd' update rule; got {getattr(core.rule, 'name', core.rule)!r} "
                             "(use mode='plain' for other rules)")

    # ----------------------------------------------------------- rounds
    def wanted(self, core) -> int:
        """How many of the pending query's points the answer must name, best first."""
        return core.estimator.k if self.phase == "gradient" else 1

    def gradient_plan(self, core) -> ProbePlan:
        m = core.estimator.m
        return core.estimator.plan(lambda j: probe_key(core.direction, core.seed, self.step, j, m), self.step)

    def search_plan(self, core) -> ProbePlan:
        """x - eta gamma^j v for j < l, (human) the best sample, and x itself, last."""
        keys = [k for k, _ in self.terms]
        points = []
        for j in range(self.search_size(core)):
            a = -self.eta * self.gamma ** j
            points.append(tuple((i, map_coef(c, lambda v, a=a: a * v)) for i, (_, c) in enumerate(self.terms)))
        if self.mode == "human":
            if self.best_key not in keys:
                keys.append(self.best_key)
            points.append(((keys.index(self.best_key), core.estimator.mu),))
        points.append(())
        return ProbePlan(tuple(keys), tuple(points))

    def plan(self, core) -> ProbePlan:
        return self.gradient_plan(core) if self.phase == "gradient" else self.search_plan(core)

    def begin(self, core, step: int) -> None:
        self.step, self.phase, self.skipped, self.result, self.chosen = step, "gradient", False, math.nan, None

    def ask(self, core) -> Query | None:
        if self.phase not in ("gradient", "search"):
            return None
        return Query(self.plan(core), kind="ranking")

    def tell(self, core, feedback) -> None:
        plan = self.plan(core)
        if self.phase == "gradient":
            self._tell_gradient(core, plan, feedback)
        else:
            self._tell_search(core, plan, feedback)
        self.rounds += 1

    # ------------------------------------------------------------ maths
    def _eta(self, core) -> float:
        lrs = set(core.make_update(ZOGrad(()), self.step).lr)
        if len(lrs) != 1:
            raise ValueError(f"RankSGD mode {self.mode!r} needs one learning rate for all parameter groups")
        self.factor = self.decay ** self.step * self.scale
        return lrs.pop() * self.factor

    def adapt(self, chosen: int, l: int) -> None:
        """Re-centre the grid: a fixed grid eta gamma^j stalls once every step it tries is too
        long (on a quadratic, near the optimum) or too short. The chosen index moves to the
        middle, (l - 1) // 2; choosing x counts as index l (every trial was too long)."""
        if self.adaptive:
            self.scale *= self.gamma ** (min(chosen, l) - (l - 1) // 2)
    def _with_momentum(self, grad: ZOGrad) -> ZOGrad:
        if not self.momentum:
            return grad
        horizon = math.log(self.momentum_tol) / math.log(self.momentum)
        old = [[k, c * self.momentum, age + 1] for k, c, age in self.velocity if age + 1 <= horizon]
        self.velocity = old + [[k, c, 0] for k, c in grad.terms]
        return ZOGrad(tuple((k, c) for k, c, _ in self.velocity))

    def _comparisons(self, core, plan: ProbePlan, feedback):
        given = feedback
        if isinstance(feedback, Losses) or isinstance(feedback, (Ranking, Edges)):
            size = len(feedback.values) if isinstance(feedback, Losses) else feedback.num_points
            if size != plan.num_points:
                raise ValueError(f"feedback covers {size} points, the query has {plan.num_points}")
        else:
            as_kind(feedback, "edges", plan.num_points)  # raises naming the valid kinds
        if isinstance(given, Ranking) and len(given.order) < self.wanted(core):
            raise ValueError(f"this round needs the best {self.wanted(core)} of {plan.num_points} points, "
                             f"got a ranking of {len(given.order)}")
        return given

    def _tell_gradient(self, core, plan: ProbePlan, feedback) -> None:
        given = self._comparisons(core, plan, feedback)
        core.last_losses = list(given.values) if isinstance(given, Losses) else []
        if isinstance(given, Losses) and not any(math.isfinite(v) for v in given.values):
            return self._skip(core)  # non-finite losses rank last; with no finite one, skip
        grad = core.estimator.combine(plan, given, core.direction.second_moment, self.step)
        if grad is None:
            return self._skip(core)
        grad = core.transforms(grad, core.engine)
        core.last_grad = grad
        if isinstance(given, Losses):
            finite = [v for v in given.values if math.isfinite(v)]
            self.result = sum(finite) / len(finite) if finite else math.nan
        if self.mode == "plain":
            update = core.make_update(self._with_momentum(grad).scaled(self.decay ** self.step), self.step)
            core.updates += 1
            core.engine.apply(update, defer=core.defer_update)
            self.moves += 1
            self.phase = "done"
            return
        if self.mode == "line-search":
            self.terms = self._with_momentum(grad).terms
        else:  # human: D <- (D n + g) / (n + 1), as keys
            n = self.count
            self.terms = self.mean = (tuple((k, map_coef(c, lambda v: v * n / (n + 1))) for k, c in self.mean)
                                      + tuple((k, map_coef(c, lambda v: v / (n + 1))) for k, c in grad.terms))
            self.count = n + 1
            self.best_key = plan.keys[_best(given)]
        self.eta, self.phase = self._eta(core), "search"

    def _tell_search(self, core, plan: ProbePlan, feedback) -> None:
        given = self._comparisons(core, plan, feedback)
        if isinstance(given, Edges):
            raise ValueError("a line-search round needs the best point (a ranking or losses), not "
                             "an edge list")
        best = _best(given)
        if isinstance(given, Losses):
            self.result = given.values[best]
        self.chosen, self.phase, l = best, "done", self.search_size(core)
        self.adapt(best if best < l or best == plan.num_points - 1 else (l - 1) // 2, l)  # for the next
        if best == plan.num_points - 1:  # x itself: stay (human mode keeps averaging)
            core.engine.flush()
            return
        if best < l:
            # the point was x - eta_t gamma^j v with eta_t = lr lambda(t) factor (decay^t times
            # the adaptive scale when the search began); the update's lr is lr lambda(t)
            grad = ZOGrad(self.terms).scaled(self.factor * self.gamma ** best)
            update = core.make_update(grad, self.step)
        else:  # human: the best perturbed point x + mu xi_best, applied as x - 1 * (-mu xi_best)
            groups = len(core.group_lrs())
            update = Update(ZOGrad(((self.best_key, -core.estimator.mu),)), core.rule, [1.0] * groups,
                            [0.0] * groups, step=core.updates + 1, state=core.rule_state)
        core.updates += 1
        core.engine.apply(update)
        self.moves += 1
        if self.mode == "human":
            self.mean, self.count = (), 0

    def _skip(self, core) -> None:
        core.engine.flush()
        core.skipped_steps += 1
        core.last_grad = None
        self.skipped, self.result, self.phase = True, math.nan, "done"

    # ------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"settings": self.settings(), "step": self.step, "phase": self.phase,
                "skipped": self.skipped, "result": self.result, "rounds": self.rounds,
                "moves": self.moves, "terms": _terms_state(self.terms), "eta": self.eta,
                "scale": self.scale, "factor": self.factor,
                "mean": _terms_state(self.mean), "count": self.count, "best_key": self.best_key,
                "velocity": [list(v) for v in self.velocity], "chosen": self.chosen}

    def load_state_dict(self, state: dict) -> None:
        saved = state["settings"]
        if saved != self.settings():
            diff = [f"{k}={saved.get(k)!r} (here {v!r})" for k, v in self.settings().items() if saved.get(k) != v]
            raise ValueError("state dict was made with other RankSGD settings: " + ", ".join(diff))
        self.step, self.phase, self.skipped = state["step"], state["phase"], state["skipped"]
        self.result, self.rounds, self.moves = state["result"], state["rounds"], state["moves"]
        self.terms, self.eta = _terms_load(state["terms"]), state["eta"]
        self.scale, self.factor = state["scale"], state["factor"]
        self.mean, self.count = _terms_load(state["mean"]), state["count"]
        self.best_key = None if state["best_key"] is None else int(state["best_key"])
        self.velocity = [[int(k), float(c), int(a)] for k, c, a in state["velocity"]]
        self.chosen = state["chosen"]


def _best(given) -> int:
    """The best point of losses or a ranking; of an edge list, the one with most wins minus
    losses (ties to the lower index)."""
    if isinstance(given, Losses):
        return given.ranking(1).order[0]
    if isinstance(given, Ranking):
        return given.order[0]
    score = [0] * given.num_points
    for a, b in given.pairs:
        score[a] += 1
        score[b] -= 1
    return max(range(given.num_points), key=lambda i: (score[i], -i))
