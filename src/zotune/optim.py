r"""``ZOOptimizer``: zeroth-order training behind the ``torch.optim.Optimizer`` interface.

``step(closure)`` runs one step program (``steps/``) to completion: it asks what to evaluate, has
the engine evaluate it with the closure (under ``torch.no_grad``: no backward pass, no gradient
buffers) and tells the program the losses; ``ask()``/``tell()`` expose that loop for feedback that
is not a callable (a ranking by a person). Pass ``named_parameters()`` when you can: names key the
random numbers and select the tensors exempt from weight decay (biases and norm weights).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .engines.base import MicroBatches
from .feedback import Losses, Query, gradient_of, losses_and_grads
from .methods import METHODS, build, check_options, decays

__all__ = ["ZOOptimizer", "METHODS", "decays"]

Closure = Callable[[], "torch.Tensor | float"]
_FROM_CORE = ("engine", "direction", "estimator", "rule", "method", "seed", "clip_norm", "projection",
              "defer_update", "skipped_steps", "forward_passes", "last_losses", "last_grad", "excluded")


class ZOOptimizer(torch.optim.Optimizer):
    r"""Zeroth-order optimizer: SPSA-type estimates from forward passes, applied in place.

    One step of ``method="mezo"`` (Malladi et al., 2023), z regenerated from its key:

    .. math::
        g = \frac{L(\theta + \epsilon z) - L(\theta - \epsilon z)}{2\epsilon},\qquad
        \theta \leftarrow (1 - \eta\lambda)\theta - \eta\, g\, z,\qquad z \sim \mathcal N(0, I)

    Cost: 2 forward passes and 3 sweeps over the parameters (2 with ``defer_update``), each drawing
    z once; memory: the parameters plus two chunk-sized buffers per thread (plus rule state for
    momentum/Adam, plus an fp32 master copy for bf16/fp16 parameters when ``master_weights`` is on).

    ElasticZO (``method="elasticzo"``, or ``bp_layers``/``tail`` with any two-point method): the
    last ``bp_layers`` parametrised layers (or the modules named in ``tail``) are trained by
    backprop from the same forwards (``tail_grad``, ``lr_bp``, ``tail_update``, ...); the closure
    must then return the loss tensor (not a float). See ``steps/elastic.py``.

    Args:
        params: a model (its trainable ``named_parameters()``, and ``model=`` it), parameters or
            ``named_parameters()`` (or param groups with ``lr``/``weight_decay``).
            Tensors with ``requires_grad=False`` are left untouched.
        lr: learning rate (>= 0). eps: perturbation scale (> 0). method: a name in ``METHODS``.
        weight_decay: decoupled weight decay (coupled with ``coupled_decay=True``), not on biases
            and norm weights.
        **options: ``seed``, ``direction``, ``num_probes``, ``one_sided``, ``momentum``, ``betas``,
            ``adam_eps``, ``schedule`` (``constant``/``linear``/``cosine``, update t gets
            ``lr * lambda(t)`` as transformers' schedulers), ``warmup_steps``, ``total_steps``,
            ``defer_update``, ``estimator``, ``update``, ``kernel``, ``projection``,
            ``clip_norm``, ``transforms``, ``chunk_size``, ``master_weights``, ``threads``,
            ``engine`` (``in-memory``, ``reference`` or ``offload``, which takes ``offload_to``,
            ``offload_dir``, ``resident_blocks``, ``overlap``, ``fsync``), ``rng_device``,
            ``low_precision_probes`` (``exclude`` tensors whose bf16/fp16 probes round away, or
            ``keep``), ``bp_layers``, ``tail``, ``tail_grad``, ``lr_bp``, ``tail_update``,
            ``tail_momentum``, ``tail_weight_decay`` (ElasticZO), ``parallel`` (``ddp``, ``pertp``,
            ``2d`` or a ``zotune.distributed.Topology``: the engine on the ranks of ``torchrun``;
            each rank passes the closure of its own data shard; docs/distributed.md); see
            :func:`zotune.methods.build` and docs/design.md.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, method: str = "mezo", *,
                 weight_decay: float = 0.0, **options) -> None:
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        check_options(options)
        if isinstance(params, torch.nn.Module):  # ZOOptimizer(model, ...): its named parameters
            options.setdefault("model", params)
            params = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        entries, self._params = [], []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if self._trainable(p):
                    name = names[i] if names else f"group{gi}.param{i}"
                    entries.append((name, p, gi, decays(name, p, names is not None)))
                    self._params.append(p)
        if not entries:
            raise ValueError("ZOOptimizer got no parameter with requires_grad=True")
        self.core = build(entries, eps=eps, method=method, **options,
                          group_lrs=lambda: [g["lr"] for g in self.param_groups],
                          group_weight_decays=lambda: [g["weight_decay"] for g in self.param_groups])
        for p, buffers in zip(self._params, self.core.rule_buffers):
            self.state[p] = buffers  # torch.optim's view of the rule state
        # Optional (step, iteration) -> closure(s) for search batches; default: the step's own.
        self.search_closures: Callable[[int, int], Closure | Sequence[Closure]] | None = None

    @staticmethod
    def _trainable(p: torch.Tensor) -> bool:
        """Which tensors of the param groups are trained (subclasses may widen it)."""
        return p.requires_grad

    def __getattr__(self, name: str):
        if name in _FROM_CORE:
            return getattr(self.__dict__["core"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    steps_taken = property(lambda self: self.core.step)
    _pending = property(lambda self: self.core.engine.pending)

    def current_lr(self, group: int = 0) -> float:
        """The scheduled learning rate of ``group`` for the next step."""
        return self.param_groups[group]["lr"] * self.core.lr_factor(self.core.step)

    # ----------------------------------------------------------- stepping
    def ask(self) -> Query | None:
        """What the current step needs evaluated (starting one if idle); None once it is done."""
        return self.core.ask()

    def tell(self, feedback) -> None:
        """Answer the last :meth:`ask`: ``Losses``, ``Ranking``, ``Edges`` or ``DenseGrad``."""
        self.core.tell(feedback)

    def evaluate(self, query: Query, objective: Callable[[], object]) -> list:
        """The objective's value at every point of ``query``, through the engine."""
        if getattr(query.plan, "coordinate_wise", False):  # CGE (engines/coordinates.py)
            from .engines.coordinates import evaluate_plan
            return evaluate_plan(self.core.engine, query.plan, objective)
        return self.core.engine.evaluate(query.plan, objective)

    @torch.no_grad()
    def step(self, closure: Closure | Sequence[Closure] | None = None) -> float:
        """One ZO step; returns the loss estimate at the unperturbed point (nan if skipped).

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
        return self.core.run(lambda query: self._answer(query, closures))

    def _answer(self, query: Query, closures: list):
        fns = closures
        if query.batch is not None and self.search_closures is not None:
            found = self.search_closures(self.core.step, query.batch[1])
            fns = list(found) if isinstance(found, (list, tuple)) else [found]
        if query.kind == "grad":
            answer = gradient_of(lambda: sum(fn() for fn in fns) / len(fns), self.core.engine, query.wrt)
        elif query.kind == "losses+grad":  # ElasticZO: ZO losses and the tail's gradients
            answer = losses_and_grads(lambda objective: self.evaluate(query, objective), fns,
                                      self.core.engine, query.plan, query.wrt, query.grad_at)
        else:  # a lone objective reaches the engine as it is (an engine may drive a structured one)
            answer = Losses(self.evaluate(query, fns[0] if len(fns) == 1 else MicroBatches(fns)))
        # counted once answered: a query stopped half-way (Ctrl-C) is asked again on resume
        self.core.forward_passes += len(fns) * query.num_points
        return answer

    def flush(self) -> None:
        """Apply a deferred update and remove any perturbation: parameters are then exactly the
        current iterate. Call before evaluation, checkpointing and the end of training."""
        self.core.engine.flush()

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """The whole ZO state (plain containers and tensors): layout, counters, rule buffers,
        master copies, a held update, the current perturbation, and the state of a step stopped
        between ask and tell. Loading it continues bitwise."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"param_groups": groups, "zo": {"method": self.core.method, "seed": self.core.seed,
                                               "layout": self.core.engine.layout.state_dict(),
                                               "core": self.core.state_dict()}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`, after checking it was made for the same layout and method."""
        zo = state_dict.get("zo") if isinstance(state_dict, dict) else None
        if zo is None or "core" not in zo:
            raise ValueError("not a ZOOptimizer state dict (no 'zo' entry)")
        if zo["method"] != self.core.method:
            raise ValueError(f"state dict is for method {zo['method']!r}, optimizer is {self.core.method!r}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} parameter groups, optimizer has "
                             f"{len(self.param_groups)}")
        self.core.engine.layout.check(zo["layout"])
        for mine, saved in zip(self.param_groups, groups):
            mine.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        self.core.seed = zo["seed"]
        self.core.load_state_dict(zo["core"])
