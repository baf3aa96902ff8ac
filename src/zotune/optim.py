r"""``ZOOptimizer``: zeroth-order training behind the ``torch.optim.Optimizer`` interface.

``step(closure)`` calls the closure once per point of the estimator's probe plan (twice for MeZO),
under ``torch.no_grad``; no backward pass, no gradient buffers. Like ``torch.optim.LBFGS``, the
closure is required, because the optimizer must evaluate the loss at shifted parameters.

Example::

    opt = zotune.ZOOptimizer(model.named_parameters(), lr=1e-6, eps=1e-3, method="mezo", seed=0)
    for batch in loader:
        loss = opt.step(lambda: loss_fn(model, batch))
    opt.flush()   # apply a deferred update before evaluation or saving

Pass ``named_parameters()`` when you can: names key the random numbers (so a run does not depend
on parameter order) and select the tensors exempt from weight decay (biases and norm weights, as
MeZO). With plain ``parameters()``, tensors are named by position and 1-D tensors are exempt.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from . import rng
from .directions import Direction, make_direction, probe_key
from .engines.in_memory import InMemoryEngine, Update
from .estimators import SPSA, KernelSPSA
from .plan import Terms, ZOGrad, map_coef
from .updates import UPDATES, lr_factor
from .updates.schedules import check_schedule

METHODS: dict[str, dict] = {
    "mezo": {"update": "sgd"},
    "zo-sgd": {"update": "sgd"},
    "zo-momentum": {"update": "momentum"},
    "zo-adam": {"update": "adam"},
    "zo-sign": {"update": "sign"},
    "zo-cons": {"update": "sgd", "conservative": True},
    "kerzoo": {"update": "sgd", "estimator": "kernel"},
}
"""Named methods. MeZO and ZO-Bench's ZO-SGD are the same algorithm (Zhang et al., 2024);
``kerzoo`` is KerZOO's kernel-weighted estimator (order-3 kernel, paper normalisation) with ZO-SGD."""

Closure = Callable[[], "torch.Tensor | float"]


def decays(name: str, param: torch.Tensor, named: bool) -> bool:
    """Whether weight decay applies: not to biases and norm weights (MeZO's rule, extended to
    Llama's ``norm`` and GPT-2's ``ln_*``); for unnamed tensors, not to 1-D tensors."""
    if not named:
        return param.ndim > 1
    lowered = name.lower()
    return not ("bias" in lowered or "norm" in lowered or ".ln_" in lowered or lowered.startswith("ln_"))


class ZOOptimizer(torch.optim.Optimizer):
    r"""Zeroth-order optimizer: SPSA estimates from forward passes, applied in place.

    One step of ``method="mezo"`` (Malladi et al., 2023):

    .. math::
        g = \frac{L(\theta + \epsilon z) - L(\theta - \epsilon z)}{2\epsilon},\qquad
        \theta \leftarrow (1 - \eta\lambda)\theta - \eta\, g\, z,\qquad z \sim \mathcal N(0, I)

    with z regenerated from its key instead of stored. Cost: 2 forward passes and 3 sweeps over
    the parameters (2 with ``defer_update``), each drawing z once; memory: the parameters plus two
    chunk-sized buffers per thread (plus rule state for momentum/Adam, plus an fp32 master copy for
    bf16/fp16 parameters when ``master_weights`` is on).

    Args:
        params: parameters or ``named_parameters()`` (or param groups with ``lr``/``weight_decay``).
            Tensors with ``requires_grad=False`` are left untouched.
        lr: learning rate :math:`\eta` (>= 0).
        eps: perturbation scale :math:`\epsilon` (> 0).
        method: ``mezo``, ``zo-sgd``, ``zo-momentum``, ``zo-adam``, ``zo-sign``, ``zo-cons`` or
            ``kerzoo``.
        seed: run seed; every direction is keyed by (seed, step, probe, tensor, chunk).
        direction: ``gaussian`` (default), ``rademacher``, ``uniform``, ``pooled`` or a Direction.
        num_probes: directions per step (n-SPSA).
        one_sided: forward differences against the unperturbed loss (n + 1 forwards).
        weight_decay: decoupled weight decay :math:`\lambda`, not on biases and norm weights.
        momentum: for ``zo-momentum``. betas, adam_eps: for ``zo-adam``.
        schedule: ``constant``, ``linear`` or ``cosine``, after ``warmup_steps`` of linear warm-up;
            ``total_steps`` is the decay horizon. Multiplies each group's ``lr`` (so torch LR
            schedulers that edit ``lr`` also work).
        defer_update: fuse each update into the next step's first perturbation (2 sweeps per step);
            parameters are then perturbed between steps until :meth:`flush`.
        estimator, update: override the method's estimator and update rule (composition).
        chunk_size: elements per regenerable chunk. master_weights: ``auto``, True or False.
        threads: sweep threads on CPU (default: torch's intra-op thread count).
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, method: str = "mezo", *,
                 seed: int = 0, direction: str | Direction = "gaussian", num_probes: int = 1,
                 one_sided: bool = False, weight_decay: float = 0.0, momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 schedule: str = "constant", warmup_steps: int = 0, total_steps: int | None = None,
                 defer_update: bool = False, estimator=None, update=None,
                 chunk_size: int = rng.DEFAULT_CHUNK_SIZE, master_weights: bool | str = "auto",
                 threads: int | None = None) -> None:
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
        check_schedule(schedule, warmup_steps, total_steps)
        spec = METHODS[method]
        self.method = method
        self.seed = int(seed)
        self.direction = make_direction(direction)
        if estimator is None and spec.get("estimator") == "kernel":
            if one_sided:
                raise ValueError(f"method {method!r} is two-sided; one_sided=True does not apply")
            estimator = KernelSPSA(eps, order=3, num_probes=num_probes)
        self.estimator = estimator if estimator is not None else SPSA(eps, num_probes, one_sided)
        self.rule = update if update is not None else _make_rule(spec["update"], momentum, betas, adam_eps)
        self.conservative = bool(spec.get("conservative", False))
        self.defer_update = bool(defer_update) and not self.conservative
        self.schedule, self.warmup_steps, self.total_steps = schedule, warmup_steps, total_steps
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

        tensors = []
        self._params: list[torch.Tensor] = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if not p.requires_grad:
                    continue
                name = names[i] if names else f"group{gi}.param{i}"
                tensors.append((name, p, gi, decays(name, p, names is not None)))
                self._params.append(p)
        if not tensors:
            raise ValueError("ZOOptimizer got no parameter with requires_grad=True")
        self.engine = InMemoryEngine(tensors, self.direction, chunk_size=chunk_size,
                                     master_weights=master_weights, threads=threads,
                                     master_store=self._master_store)
        self._step = 0
        self._updates = 0
        self._pending: Update | None = None
        self.skipped_steps = 0
        self.forward_passes = 0
        self.last_losses: list[float] = []
        self.last_grad: ZOGrad | None = None

    # ---------------------------------------------------------------- state
    def _master_store(self, index: int, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.data.float().reshape(-1).clone()
        return state["master"]

    def _rule_state(self, index: int) -> dict[str, torch.Tensor]:
        state = self.state[self._params[index]]
        return {name: state[name] for name in self.rule.state_names}

    def _ensure_rule_state(self) -> None:
        for p in self._params:
            state = self.state[p]
            for name in self.rule.state_names:
                if name not in state:
                    state[name] = torch.zeros(p.shape, dtype=torch.float32 if p.dtype in
                                              (torch.float16, torch.bfloat16) else p.dtype,
                                              device=p.device)

    # ----------------------------------------------------------------- step
    @property
    def steps_taken(self) -> int:
        return self._step

    def current_lr(self, group: int = 0) -> float:
        """The scheduled learning rate of ``group`` for the next step."""
        return self.param_groups[group]["lr"] * lr_factor(
            self.schedule, self._step, warmup_steps=self.warmup_steps, total_steps=self.total_steps)

    def _evaluate(self, closures: Sequence[Closure]) -> float:
        total = 0.0
        for fn in closures:
            total += float(fn())
        self.forward_passes += len(closures)
        return total / len(closures)

    def _make_update(self, grad: ZOGrad) -> Update:
        self._ensure_rule_state()
        lrs = [self.current_lr(i) for i in range(len(self.param_groups))]
        return Update(grad, self.rule, lrs, [g["weight_decay"] for g in self.param_groups],
                      step=self._updates + 1, state=self._rule_state)

    @torch.no_grad()
    def step(self, closure: Closure | Sequence[Closure] | None = None) -> float:
        """One ZO step; returns the loss estimate at the unperturbed point.

        Args:
            closure: a function returning the loss of the model as it is now, or a sequence of
                them (micro-batches): each point's loss is their mean, so the gradient is averaged
                over micro-batches with the same directions.

        A non-finite loss skips the step: parameters stay as they were, ``skipped_steps`` grows.
        """
        if closure is None:
            raise ValueError("ZOOptimizer.step needs a closure returning the loss; it is called "
                             "once per probe point")
        closures = list(closure) if isinstance(closure, (list, tuple)) else [closure]
        step = self._step
        n = self.estimator.num_probes
        plan = self.estimator.plan(lambda j: probe_key(self.direction, self.seed, step, j, n), step)
        pending, self._pending = self._pending, None
        losses: list[float] = []
        base_loss = None
        if self.conservative:
            self.engine.move((), pending)
            pending = None
            base_loss = self._evaluate(closures)
        for i in range(plan.num_points):
            self.engine.move(plan.point_terms(i), pending)
            pending = None
            losses.append(self._evaluate(closures))
        self._step += 1
        self.last_losses = losses
        if not all(math.isfinite(v) for v in losses + ([base_loss] if base_loss is not None else [])):
            self.engine.move((), pending)
            self.skipped_steps += 1
            self.last_grad = None
            return float("nan")
        grad = self.rule.transform(self.estimator.combine(plan, losses, self.direction.second_moment, step))
        self.last_grad = grad
        update = self._make_update(grad)
        if self.conservative:
            update = self._conservative_choice(update, base_loss, closures)
        self._updates += 1
        if self.defer_update:
            self._pending = update
        else:
            self.engine.move((), update)
        if base_loss is not None:
            return base_loss
        if getattr(self.estimator, "one_sided", False):
            return losses[0]
        return sum(losses) / len(losses)

    def _conservative_choice(self, update: Update, base_loss: float, closures) -> Update | None:
        """ZO-SGD-Cons (ZO-Bench): keep the best of theta, theta - lr g, theta + lr g."""
        lrs = set(update.lr)
        if len(lrs) != 1:
            raise ValueError("zo-cons needs one learning rate for all parameter groups")
        lr = lrs.pop()
        down: Terms = update.grad.scaled(-lr).terms
        up: Terms = update.grad.scaled(lr).terms
        self.engine.move(down)
        loss_down = self._evaluate(closures)
        self.engine.move(up)
        loss_up = self._evaluate(closures)
        best = min((base_loss, 0), (loss_down, 1), (loss_up, 2), key=lambda t: (
            t[0] if math.isfinite(t[0]) else math.inf, t[1]))[1]
        if best == 0:
            return Update(ZOGrad(()), update.rule, update.lr, [0.0] * len(update.lr), update.step,
                          update.state)
        return update if best == 1 else Update(update.grad.scaled(-1.0), update.rule, update.lr,
                                               update.weight_decay, update.step, update.state)

    def flush(self) -> None:
        """Apply a deferred update and remove any perturbation: parameters are then exactly the
        current iterate. Call before evaluation, checkpointing and the end of training."""
        pending, self._pending = self._pending, None
        self.engine.move((), pending)

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Parameter-indexed state (rule buffers, master copies), groups, and the ZO state: step
        counters, seed, pending update and current perturbation (so a run resumes bitwise)."""
        index = {id(p): i for i, p in enumerate(self._params)}
        state = {index[id(p)]: {k: v.clone() for k, v in s.items()}
                 for p, s in self.state.items() if id(p) in index}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        pending = None
        if self._pending is not None:
            pending = {"terms": list(self._pending.grad.terms), "lr": list(self._pending.lr),
                       "weight_decay": list(self._pending.weight_decay), "step": self._pending.step}
        zo = {"method": self.method, "seed": self.seed, "step": self._step, "updates": self._updates,
              "skipped_steps": self.skipped_steps, "forward_passes": self.forward_passes,
              "pending": pending, "current": list(self.engine.current),
              "estimator": self.estimator.state_dict()}
        return {"state": state, "param_groups": groups, "zo": zo}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` saved; buffers are copied in place, keeping dtypes."""
        zo = state_dict.get("zo")
        if zo is None:
            raise ValueError("not a ZOOptimizer state dict (no 'zo' entry)")
        if zo["method"] != self.method:
            raise ValueError(f"state dict is for method {zo['method']!r}, optimizer is {self.method!r}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} parameter groups, optimizer has "
                             f"{len(self.param_groups)}")
        for mine, saved in zip(self.param_groups, groups):
            mine.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        for i, saved in state_dict["state"].items():
            p = self._params[int(i)]
            mine = self.state[p]
            for k, v in saved.items():
                if k in mine and torch.is_tensor(mine[k]) and mine[k].shape == v.shape:
                    mine[k].copy_(v)
                else:
                    mine[k] = v.clone().to(p.device)
        self.seed, self._step, self._updates = zo["seed"], zo["step"], zo["updates"]
        self.skipped_steps, self.forward_passes = zo["skipped_steps"], zo["forward_passes"]
        self.estimator.load_state_dict(zo["estimator"])
        self.engine.current = tuple((int(k), _coef(a)) for k, a in zo["current"])
        self._pending = None
        if zo["pending"] is not None:
            pd = zo["pending"]
            self._ensure_rule_state()
            self._pending = Update(ZOGrad(tuple((int(k), _coef(c)) for k, c in pd["terms"])),
                                   self.rule, pd["lr"], pd["weight_decay"], pd["step"],
                                   self._rule_state)


def _coef(c):
    """A coefficient read back from a state dict (float, or per-tensor dict)."""
    return {int(t): float(v) for t, v in c.items()} if isinstance(c, dict) else float(c)


def _make_rule(name: str, momentum: float, betas, adam_eps: float):
    cls = UPDATES[name]
    if name == "momentum":
        return cls(momentum)
    if name == "adam":
        return cls(betas, adam_eps)
    return cls()
