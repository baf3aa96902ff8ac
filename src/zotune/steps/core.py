r"""The step core: runs step programs through ask/tell, with explicit, checkpointed state.

A step is a small program (``steps/estimate.py``, ``steps/search.py``) that asks for evaluations
and is told the answers; it never calls the objective itself. The core strings one step's
programs together (the main program, then any post-update program that is due, such as DiZO's
projection search), owns the counters, the rule's state buffers and the learning-rate schedule,
and saves everything a resume needs, including a step stopped between ``ask`` and ``tell``::

    q = core.ask()            # Query: points to evaluate (or candidates to rank), or None = done
    core.tell(feedback)       # Losses | Ranking | Edges | DenseGrad
    ...
    core.run(answer)          # the loop of the two, for a callable objective

Programs act through the core's engine (``evaluate`` is the caller's job, ``apply``/``flush``/
``read``/``write`` theirs), so an engine that streams blocks, splits points over ranks or reuses
cached block inputs needs no change to any program.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..engines.base import Update
from ..plan import ZOGrad, coef_from_state
from ..updates import Shift, lr_factor
from ..updates.transforms import chain


class StepCore:
    """Everything a ZO step needs apart from the objective; see the module docstring.

    Args:
        engine: where the parameters live (``engines/``).
        direction, estimator, rule: the maths parts.
        transforms: gradient transforms chained before the rule (the rule's own come first).
        program: the main step program; posts: post-update programs (``due(step)`` decides).
        seed: run seed. group_lrs, group_weight_decays: callables reading the param groups (so
            torch LR schedulers that edit ``lr`` work). schedule: ``(kind, warmup, total)``.
        defer_update: hold each update to fuse it into the next step's first move.
        coupled_decay: L2 weight decay (torch.optim.SGD) instead of decoupled (AdamW, MeZO).
    """

    def __init__(self, engine, direction, estimator, rule, *, transforms: Sequence = (), program,
                 posts: Sequence = (), seed: int = 0, group_lrs: Callable[[], list[float]],
                 group_weight_decays: Callable[[], list[float]], schedule=("constant", 0, None),
                 defer_update: bool = False, coupled_decay: bool = False) -> None:
        self.engine, self.direction, self.estimator, self.rule = engine, direction, estimator, rule
        self.transforms = chain(*getattr(rule, "transforms", ()), *transforms)
        self.program, self.posts = program, list(posts)
        self.seed, self.schedule = int(seed), tuple(schedule)
        self.group_lrs, self.group_weight_decays = group_lrs, group_weight_decays
        self.defer_update, self.coupled_decay = bool(defer_update), bool(coupled_decay)
        self.rule_buffers: list[dict[str, torch.Tensor]] = [{} for _ in engine.layout]
        self.step = self.updates = self.skipped_steps = self.forward_passes = 0
        self.last_losses: list[float] = []
        self.last_grad = None
        self.last_result = float("nan")
        self._programs: list = []   # this step's programs; empty when idle
        self._index = 0
        self._asked = False

    # ------------------------------------------------------------ ask/tell
    @property
    def idle(self) -> bool:
        return not self._programs

    def ask(self):
        """The next Query of the current step (starting one if idle), or None once it is done."""
        if not self._programs:
            self._programs, self._index = [self.program], 0
            self.program.begin(self, self.step)
        while True:
            query = self._programs[self._index].ask(self)
            if query is not None:
                self._asked = True
                return query
            if self._index == 0 and not getattr(self.program, "skipped", False):
                self._programs += [p for p in self.posts if p.due(self.step)]
            self._index += 1
            if self._index == len(self._programs):
                self._finish()
                return None
            self._programs[self._index].begin(self, self.step)

    def tell(self, feedback) -> None:
        """Answer the last Query."""
        if not self._asked:
            raise RuntimeError("tell() needs a pending query: call ask() first")
        self._programs[self._index].tell(self, feedback)  # bad feedback raises: still pending
        self._asked = False

    def run(self, answer: Callable) -> float:
        """One whole step: ``answer(query) -> feedback`` for every query; returns its result."""
        while (query := self.ask()) is not None:
            self.tell(answer(query))
        return self.last_result

    def _finish(self) -> None:
        self.last_result = self.program.result
        self._programs, self._index = [], 0
        self.step += 1

    # ------------------------------------------------------------- helpers
    def lr_factor(self, step: int) -> float:
        kind, warmup, total = self.schedule
        return lr_factor(kind, step, warmup_steps=warmup, total_steps=total)

    def ensure_rule_state(self) -> None:
        for spec, buffers in zip(self.engine.layout, self.rule_buffers):
            for name in self.rule.state_names:
                if name not in buffers:
                    dtype = torch.float32 if spec.dtype in (torch.float16, torch.bfloat16) else spec.dtype
                    buffers[name] = torch.zeros(spec.shape, dtype=dtype, device=self.engine.device)

    def rule_state(self, index: int) -> dict[str, torch.Tensor]:
        return {name: self.rule_buffers[index][name] for name in self.rule.state_names}

    def make_update(self, grad, step: int) -> Update:
        """The update of ``grad`` at 0-based ``step``: each group's lr times the schedule's
        lambda(step), its weight decay, the rule and its state."""
        self.ensure_rule_state()
        factor = self.lr_factor(step)
        return Update(grad, self.rule, [lr * factor for lr in self.group_lrs()],
                      list(self.group_weight_decays()), step=self.updates + 1, state=self.rule_state,
                      coupled_decay=self.coupled_decay)

    def shift(self, sign: float) -> Update:
        """The move to (sign 1) or back from (sign -1) a look-ahead rule's evaluation point."""
        self.ensure_rule_state()
        groups = len(self.group_lrs())
        return Update(ZOGrad(()), Shift(self.rule, sign), [1.0] * groups, [0.0] * groups,
                      step=self.updates + 1, state=self.rule_state)

    # ---------------------------------------------------------- checkpoint
    def pack_update(self, update: Update | None):
        """An update as plain containers (only held ZO updates and shifts are ever saved)."""
        if update is None:
            return None
        if not isinstance(update.grad, ZOGrad):
            raise ValueError("only ZO updates can be held across a checkpoint")
        shift = update.rule.sign if isinstance(update.rule, Shift) else None
        return {"terms": [[k, c] for k, c in update.grad.terms], "lr": list(update.lr),
                "weight_decay": list(update.weight_decay), "step": update.step, "shift": shift,
                "coupled_decay": update.coupled_decay}

    def unpack_update(self, packed) -> Update | None:
        if packed is None:
            return None
        self.ensure_rule_state()
        rule = self.rule if packed["shift"] is None else Shift(self.rule, packed["shift"])
        grad = ZOGrad(tuple((int(k), coef_from_state(c)) for k, c in packed["terms"]))
        return Update(grad, rule, packed["lr"], packed["weight_decay"], packed["step"], self.rule_state,
                      packed.get("coupled_decay", False))

    def state_dict(self) -> dict:
        names = [p.name for p in self._programs]
        return {"step": self.step, "updates": self.updates, "skipped_steps": self.skipped_steps,
                "forward_passes": self.forward_passes, "schedule": list(self.schedule),
                "programs": names, "index": self._index, "asked": self._asked,
                "program": self.program.state_dict(),
                "posts": [p.state_dict() for p in self.posts],
                "rule_buffers": [{k: v.clone() for k, v in b.items()} for b in self.rule_buffers],
                "estimator": self.estimator.state_dict(),
                "engine": self.engine.state_dict(),
                "pending": self.pack_update(self.engine.pending)}

    def load_state_dict(self, state: dict) -> None:
        # The horizon matters only to decaying schedules (a constant one may run longer).
        horizon = lambda s: (s[0], s[1], None if s[0] == "constant" else s[2])  # noqa: E731
        if horizon(state["schedule"]) != horizon(self.schedule):
            raise ValueError(f"state dict has schedule {tuple(state['schedule'])} (kind, warmup, "
                             f"total steps), this optimizer {self.schedule}: the lr of every "
                             "remaining step would differ")
        self.estimator.load_state_dict(state["estimator"])
        self.engine.load_state_dict(state["engine"])
        self.step, self.updates = state["step"], state["updates"]
        self.skipped_steps, self.forward_passes = state["skipped_steps"], state["forward_passes"]
        for mine, saved in zip(self.rule_buffers, state["rule_buffers"]):
            for k, v in saved.items():
                if k in mine and mine[k].shape == v.shape:
                    mine[k].copy_(v)
                else:
                    mine[k] = v.clone().to(self.engine.device)
        self.program.load_state_dict(state["program"])
        if len(state["posts"]) != len(self.posts):
            raise ValueError(f"state dict has {len(state['posts'])} post-update programs "
                             f"(e.g. a projection), this optimizer {len(self.posts)}")
        for p, s in zip(self.posts, state["posts"]):
            p.load_state_dict(s)
        by_name = {p.name: p for p in [self.program, *self.posts]}
        self._programs = [by_name[n] for n in state["programs"]]
        self._index, self._asked = state["index"], state["asked"]
        self.engine.pending = self.unpack_update(state["pending"])

