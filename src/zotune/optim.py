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
from .plan import Terms, ZOGrad, coef_at
from .updates import UPDATES, Shift, lr_factor
from .updates.schedules import check_schedule

KERZOO_CODE = {"order": 3, "num_probes": 3, "schedule": "linear", "s0": 1.0, "shrink_steps": 4000,
               "r_sharing": "tensor", "normalization": "code"}
"""The kernel options of KerZOO's released code (research/kerzoo_dizo.md, section 2.4)."""

METHODS: dict[str, dict] = {
    "mezo": {"update": "sgd"},
    "zo-sgd": {"update": "sgd"},
    "zo-momentum": {"update": "momentum"},
    "zo-adam": {"update": "adam"},
    "zo-sign": {"update": "sign"},
    "zo-cons": {"update": "sgd", "conservative": True},
    "kerzoo": {"update": "sgd", "kernel": {}},
    "kerzoo-code": {"update": "agd", "kernel": KERZOO_CODE, "clip_norm": 4e5},
    "dizo": {"update": "sgd", "projection": {"search": "zo"}},
    "dizo-fo": {"update": "sgd", "projection": {"search": "fo"}},
    "pezo": {"update": "sgd", "direction": "pezo-pool"},
}
"""Named methods (presets of estimator, direction, update rule and projection; every part can be
overridden, so presets compose). MeZO and ZO-Bench's ZO-SGD are the same algorithm (Zhang et al.,
2024). ``kerzoo``: KerZOO's estimator as the paper states it (order-3 kernel, one r per probe).
``kerzoo-code``: as the authors' code runs it (3 probes, r per tensor on a linearly shrinking
interval, the code's kernel scale, per-tensor clipping at 4e5, look-ahead acceleration).
``dizo``/``dizo-fo``: MeZO with DiZO's layer-wise projection, searched by ZO or by backprop.
``pezo``: MeZO with PeZO's pre-generated uniform pool, carried-over offset, adaptive scaling."""

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
                 seed: int = 0, direction: str | Direction | None = None, num_probes: int | None = None,
                 one_sided: bool = False, weight_decay: float = 0.0, momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 schedule: str = "constant", warmup_steps: int = 0, total_steps: int | None = None,
                 defer_update: bool = False, estimator=None, update=None, kernel: dict | None = None,
                 projection=None, clip_norm: float | None = None,
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
        self.direction = make_direction(direction or spec.get("direction", "gaussian"))
        self.estimator = estimator if estimator is not None else _make_estimator(
            spec, eps, num_probes, one_sided, kernel)
        if update is None or isinstance(update, str):
            update = _make_rule(update or spec["update"], momentum, betas, adam_eps)
        self.rule = update
        clip_norm = spec.get("clip_norm") if clip_norm is None else clip_norm
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 (or None for no clipping), got {clip_norm!r}")
        self.clip_norm = clip_norm
        self.conservative = bool(spec.get("conservative", False))
        self.lookahead = bool(getattr(self.rule, "lookahead", False))
        # Conservative and look-ahead steps need the update applied before the next evaluation.
        self.defer_update = bool(defer_update) and not (self.conservative or self.lookahead)
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
        if hasattr(self.estimator, "bind"):
            self.estimator.bind([t.tensor_id for t in self.engine.tensors])
        self.projection = _make_projection(spec, projection)
        if self.projection is not None:
            self.projection.bind(self.engine)
        self.search_closures: Callable[[int, int], Closure | Sequence[Closure]] | None = None
        """Optional ``(step, iteration) -> closure(s)`` giving the projection search fresh batches;
        by default it reuses the step's closures."""
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
        if self.lookahead:  # to the look-ahead point y_k, fused into the first move
            pending = self._shift(1.0)
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
            self.engine.move((), self._shift(-1.0) if self.lookahead else pending)
            self.skipped_steps += 1
            self.last_grad = None
            return float("nan")
        grad = self.rule.transform(self.estimator.combine(plan, losses, self.direction.second_moment, step))
        if self.clip_norm is not None:
            grad = self._clip(grad)
        self.last_grad = grad
        update = self._make_update(grad)
        if self.conservative:
            update = self._conservative_choice(update, base_loss, closures)
        self._updates += 1
        if self.defer_update:
            self._pending = update
        else:
            self.engine.move((), update)
        if self.projection is not None and self.projection.due(step):
            self.flush()
            self._project(step, closures)
        if base_loss is not None:
            return base_loss
        if getattr(self.estimator, "one_sided", False):
            return losses[0]
        return sum(losses) / len(losses)

    def _shift(self, sign: float) -> Update:
        """The move to (sign 1) or back from (sign -1) a look-ahead rule's evaluation point."""
        self._ensure_rule_state()
        groups = len(self.param_groups)
        return Update(ZOGrad(()), Shift(self.rule, sign), [1.0] * groups, [0.0] * groups,
                      step=self._updates + 1, state=self._rule_state)

    def _clip(self, grad: ZOGrad) -> ZOGrad:
        r"""Per-tensor norm clipping: :math:`\hat g_b \leftarrow \hat g_b \min(1, C / \|\hat g_b\|)`.

        The norms come exactly from the Gram matrix of the step's directions (one read-only sweep
        drawing each direction once), so no gradient-sized buffer is needed."""
        keys = [k for k, _ in grad.terms]
        grams = self.engine.gram(keys)
        per_term: list[dict[int, float]] = [{} for _ in keys]
        for t, gram in zip(self.engine.tensors, grams):
            c = torch.tensor([coef_at(cf, t.tensor_id) for _, cf in grad.terms], dtype=torch.float64)
            norm = float(c @ gram @ c) ** 0.5
            factor = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
            for i in range(len(keys)):
                per_term[i][t.tensor_id] = float(c[i]) * factor
        return ZOGrad(tuple((k, d) for k, d in zip(keys, per_term)))

    def _project(self, step: int, closures) -> None:
        """A projection search after the update of ``step`` (DiZO), on search batches."""
        def batch(j):
            if self.search_closures is None:
                return closures
            found = self.search_closures(step, j)
            return list(found) if isinstance(found, (list, tuple)) else [found]

        key = rng.mix(self.seed, step, 0x44495A4F)
        if self.projection.search == "fo":
            def loss_with_grad(j):
                fns = batch(j)
                self.forward_passes += len(fns)
                return sum(fn() for fn in fns) / len(fns)
            with torch.enable_grad():
                self.projection.project_fo(self.engine, loss_with_grad, key)
        else:
            self.projection.project(self.engine, lambda j: self._evaluate(batch(j)), key)

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
              "estimator": self.estimator.state_dict(),
              "projection": self.projection.state_dict() if self.projection is not None else None}
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
        if self.projection is not None:
            if zo.get("projection") is None:
                raise ValueError("state dict has no projection state, but this optimizer projects")
            self.projection.load_state_dict(zo["projection"])
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


def _make_estimator(spec: dict, eps: float, num_probes: int | None, one_sided: bool,
                    kernel: dict | None):
    """The method's estimator; kernel options (``kernel=``) turn any method into a kernel one."""
    if kernel is None and "kernel" not in spec:
        return SPSA(eps, num_probes or 1, one_sided)
    if one_sided:
        raise ValueError("kernel-weighted estimators are two-sided; one_sided=True does not apply")
    options = {**spec.get("kernel", {}), **(kernel or {})}
    if num_probes is not None:
        options["num_probes"] = num_probes
    try:
        return KernelSPSA(eps, **options)
    except TypeError as err:
        raise ValueError(f"bad kernel options {sorted(options)}: {err}") from None


def _make_projection(spec: dict, projection):
    """The method's projection (DiZO), from an object, a dict of options or the preset."""
    if projection is False or (projection is None and "projection" not in spec):
        return None
    if projection is not None and not isinstance(projection, dict):
        return projection
    from .updates.projection import DiZO

    options = {**spec.get("projection", {}), **(projection or {})}
    try:
        return DiZO(**options)
    except TypeError as err:
        raise ValueError(f"bad projection options {sorted(options)}: {err}") from None


def _make_rule(name: str, momentum: float, betas, adam_eps: float):
    if name not in UPDATES:
        raise ValueError(f"unknown update rule {name!r}; valid: {', '.join(UPDATES)}")
    cls = UPDATES[name]
    if name == "momentum":
        return cls(momentum)
    if name == "adam":
        return cls(betas, adam_eps)
    return cls()
