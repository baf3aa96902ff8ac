"""The training state of one method for an image classifier, behind one small protocol.

``zotune train --task fashion-mnist`` (``zotune.train_images``) drives any object of the
:class:`ImageTrainer` protocol; :data:`TRAINERS` maps a ``--method`` name to its builder::

    builder(model: nn.Module, options: dict) -> ImageTrainer

``options`` holds at least ``lr``, ``lr_bp``, ``eps``, ``seed``, ``bp_layers``, ``tail_grad``,
``momentum`` and ``weight_decay`` (unused ones are ignored by a builder). A method that is not
float (ElasticZO-INT8, ``zotune.quant``) implements the same four methods on its own state.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Protocol, runtime_checkable

import torch
from torch import nn

OPTION_KEYS = ("lr", "lr_bp", "eps", "seed", "bp_layers", "tail_grad", "momentum", "weight_decay")
"""The keys every builder's ``options`` dict holds."""


@runtime_checkable
class ImageTrainer(Protocol):
    """One method's training state for an image classifier."""

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One training step on a batch; returns the batch training loss."""

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float ``[B, classes]`` logits of the current iterate, for evaluation."""

    def state_dict(self) -> dict:
        """Everything a bitwise resume needs (plain containers and tensors)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` exactly (bitwise)."""


Builder = Callable[[nn.Module, dict], ImageTrainer]

TRAINERS: dict[str, Builder] = {}
"""``--method`` name -> builder. Float methods register in ``zotune.image_methods``."""


def register(name: str, builder: Builder) -> None:
    """Add a builder under ``name`` (one line per method)."""
    TRAINERS[name] = builder


def build_trainer(method: str, model: nn.Module, options: dict) -> ImageTrainer:
    """The trainer of ``method`` for ``model``; a ``ZotuneError`` naming the valid methods."""
    from .errors import ZotuneError

    builder = TRAINERS.get(method)
    if builder is None:
        raise ZotuneError(f"unknown method {method!r} for image tasks; valid: {', '.join(sorted(TRAINERS))}")
    return builder(model, dict(options))


import_module(".image_methods", __package__)  # registers backprop, mezo, elasticzo (needs TRAINERS)
