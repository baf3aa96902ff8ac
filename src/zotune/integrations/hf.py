"""Run zotune from a Hugging Face ``transformers.Trainer``, through its documented hooks only.

    from zotune.integrations.hf import ZOTrainer

    trainer = ZOTrainer(model=model, args=TrainingArguments(..., learning_rate=1e-6),
                        train_dataset=dataset, zo_kwargs={"method": "mezo", "eps": 1e-3, "seed": 0})
    trainer.train()

Overridden (the Trainer docs' "subclass and override" points), nothing else:

* ``create_optimizer`` builds a :class:`ZOOptimizer` over the trainable parameters, with
  ``learning_rate`` and ``weight_decay`` from the TrainingArguments, so the Trainer's own LR
  scheduler drives it.
* ``training_step`` runs the ZO step: the model is put in eval mode (MeZO: no dropout in ZO
  forwards) and ``compute_loss`` is the closure. Gradient accumulation: the Trainer calls
  ``training_step`` once per micro-batch and marks the last one with
  ``accelerator.sync_gradients``; the micro-batches are buffered and one ZO step is taken at the
  boundary with their losses averaged at each probe point (same directions for all of them).

The Trainer then calls ``optimizer.step()`` without a closure and clips gradients that do not
exist; the ZO step has already happened, so the adapter's closure-less ``step`` does nothing.
Deferred updates are turned off here: the Trainer may save or evaluate between steps through
private paths, and parameters must then be unperturbed.
"""
from __future__ import annotations

import torch
from transformers import Trainer

from ..optim import ZOOptimizer


class TrainerZOOptimizer(ZOOptimizer):
    """ZOOptimizer whose ``step()`` without a closure is a no-op (the Trainer's own call)."""

    def step(self, closure=None):
        if closure is None:
            return None
        return super().step(closure)


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with zeroth-order steps (see the module docstring).

    Args:
        zo_kwargs: keyword arguments of :class:`ZOOptimizer` (``method``, ``eps``, ``seed``,
            ``direction``, ``num_probes``, ...); ``lr`` and ``weight_decay`` come from ``args``.
        *args, **kwargs: as for ``Trainer``.
    """

    def __init__(self, *args, zo_kwargs: dict | None = None, **kwargs):
        self.zo_kwargs = dict(zo_kwargs or {})
        for key in ("lr", "weight_decay", "defer_update"):
            if key in self.zo_kwargs:
                raise ValueError(f"zo_kwargs[{key!r}] is not accepted: "
                                 + ("deferred updates are off under Trainer" if key == "defer_update"
                                    else "set it in TrainingArguments"))
        self._micro_batches: list = []
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self.optimizer = TrainerZOOptimizer(named, lr=self.args.learning_rate,
                                                weight_decay=self.args.weight_decay,
                                                defer_update=False, model=model, **self.zo_kwargs)
        return self.optimizer

    @property
    def zo_optimizer(self) -> TrainerZOOptimizer:
        """The ZO optimizer itself (``self.optimizer`` may be accelerate's wrapper)."""
        opt = self.optimizer
        return getattr(opt, "optimizer", opt)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.eval()
        self._micro_batches.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = self._micro_batches, []

        def closure_for(batch):
            def closure():
                with self.compute_loss_context_manager():
                    return self.compute_loss(model, batch)
            return closure

        loss = self.zo_optimizer.step([closure_for(b) for b in batches])
        return torch.tensor(loss, device=self.args.device)
