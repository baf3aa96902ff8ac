"""The float image-classifier trainers: first-order backprop, MeZO, ElasticZO (``image_trainers``).

Each wraps a model and its optimizer(s) as an :class:`~zotune.image_trainers.ImageTrainer`;
the ZO ones are :class:`~zotune.optim.ZOOptimizer` s, so the recipe and a user's own loop run
the same steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .image_trainers import register


class BackpropTrainer:
    """The first-order baseline: ``torch.optim.SGD`` (momentum, coupled weight decay) on every
    parameter. Cost: 1 forward + 1 backward per step; memory: gradients, momentum, activations."""

    def __init__(self, model: nn.Module, options: dict) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=options["lr"],
                                   momentum=options.get("momentum") or 0.0,
                                   weight_decay=options.get("weight_decay") or 0.0)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(images), labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(images).float()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])


register("backprop", BackpropTrainer)
