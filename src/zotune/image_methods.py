"""The float image-classifier trainers: first-order backprop, MeZO, ElasticZO, DeepZero's CGE/RGE
(``image_trainers``).

Each wraps a model and its optimizer(s) as an :class:`~zotune.image_trainers.ImageTrainer`;
the ZO ones are :class:`~zotune.optim.ZOOptimizer` s, so the recipe and a user's own loop run
the same steps.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .image_trainers import register
from .models.query_batch import QueryBatch, QueryBatchLoss
from .models.reuse import ChainLoss
from .models.vision import OnePassStatistics
from .optim import ZOOptimizer
from .updates.schedules import lr_factor


class BackpropTrainer:
    """The first-order baseline: ``torch.optim.SGD`` (momentum, coupled weight decay) on every
    parameter. Cost: 1 forward + 1 backward per step; memory: gradients, momentum, activations."""

    def __init__(self, model: nn.Module, options: dict) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=options["lr"],
                                   momentum=options.get("momentum") or 0.0,
                                   weight_decay=options.get("weight_decay") or 0.0)
        # the ZO methods' schedule (updates/schedules.py), so first-order baselines match them
        kind, warmup = options.get("schedule") or "constant", options.get("warmup_steps") or 0
        total = options.get("total_steps")
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda t: lr_factor(kind, t, warmup_steps=warmup, total_steps=total))

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(images), labels)
        loss.backward()
        self.opt.step()
        self.schedule.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(images).float()

    def state_dict(self) -> dict:
        # copies: torch.optim's load_state_dict keeps the very tensors it is given (momentum
        # buffers), so a state handed out by reference would go on changing with this trainer
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                              "schedule": self.schedule.state_dict()})

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])


class ZOTrainer:
    """A :class:`~zotune.optim.ZOOptimizer` on every parameter (``mezo``) or, with a backprop tail,
    ElasticZO (``elasticzo``: ZO for the head, SGD with ``lr_bp``/``momentum`` for the last
    ``bp_layers`` parametrised layers, ``tail_grad`` avg/plus/clean). BatchNorm uses batch
    statistics in every pass of a step; only the first pass updates the running statistics."""

    def __init__(self, model: nn.Module, options: dict, method: str = "mezo") -> None:
        self.model = model
        self.stats = OnePassStatistics(model)
        kw = {"seed": int(options.get("seed") or 0), "weight_decay": options.get("weight_decay") or 0.0}
        if options.get("direction"):
            kw["direction"] = options["direction"]
        if options.get("sparsity") is not None:  # sparse CGE (cge, deepzero)
            kw["sparsity"] = options["sparsity"]
        if options.get("num_probes"):  # rge's q
            kw["num_probes"] = options["num_probes"]
        for key in ("rge_mode", "mask_redraw_steps"):  # rge's directions; DeepZero's mask schedule
            if options.get(key) is not None:
                kw[key] = options[key]
        if options.get("schedule") not in (None, "constant") or options.get("warmup_steps"):
            kw.update(schedule=options.get("schedule") or "constant",
                      warmup_steps=options.get("warmup_steps") or 0, total_steps=options.get("total_steps"))
        if method == "elasticzo":
            momentum = options.get("momentum") or 0.0
            kw.update(bp_layers=int(options.get("bp_layers") if options.get("bp_layers") is not None else 1),
                      tail_grad=options.get("tail_grad") or "avg", lr_bp=options["lr_bp"],
                      tail_update="momentum" if momentum else "sgd", tail_momentum=momentum or 0.9,
                      tail_weight_decay=options.get("weight_decay") or 0.0)
        if options.get("parallel") is not None:  # a Topology: coordinate shards (--parallel pertp)
            kw["parallel"] = options["parallel"]
        self.opt = ZOOptimizer(model, lr=options["lr"], eps=options["eps"], method=method, **kw)
        self.reuse = method in ("cge", "deepzero") and isinstance(model, nn.Sequential)
        size = options.get("query_batch")
        # P coordinates of one block per call (models/query_batch.py); one object, so auto measures once
        exact = options.get("query_exact", True)
        self.query_batch = QueryBatch(size, exact=exact) if self.reuse and size not in (None, 1) else None

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.model.train()
        if self.query_batch is not None:
            objective = QueryBatchLoss(self.model, images, labels, query_batch=self.query_batch)
            return float(self.opt.step(self.stats.wrap(objective)))
        if self.reuse:  # coordinate methods: restart each forward at the perturbed block (exact)
            return float(self.opt.step(self.stats.wrap(ChainLoss(self.model, images, labels))))
        return float(self.opt.step(self.stats.wrap(lambda: F.cross_entropy(self.model(images), labels))))

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.opt.flush()
        self.model.eval()
        return self.model(images).float()

    def state_dict(self) -> dict:
        self.opt.flush()
        return {"model": {k: v.clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])


register("backprop", BackpropTrainer)
register("mezo", lambda model, options: ZOTrainer(model, options, "mezo"))
register("elasticzo", lambda model, options: ZOTrainer(model, options, "elasticzo"))
for _name in ("cge", "deepzero", "rge"):  # DeepZero's estimators (estimators/cge.py, methods.py)
    register(_name, lambda model, options, _name=_name: ZOTrainer(model, options, _name))


def _elasticzo_int8(model: nn.Module, options: dict):
    from .quant import build_elasticzo_int8  # integer-only ElasticZO (zotune.quant)
    return build_elasticzo_int8(model, options)


register("elasticzo-int8", _elasticzo_int8)
