"""The small-network recipe: train an image classifier from scratch (Fashion-MNIST, CIFAR-10).

    load the images -> build the model (seeded) -> measure the training memory on two batches
    -> for each step: trainer.step(batch); log; every ``run.eval_every`` steps: test accuracy,
       checkpoint -> final test accuracy -> summary.json, metrics.jsonl, curves.png

The method is any :class:`~zotune.image_trainers.ImageTrainer` registered in
``image_trainers.TRAINERS`` (``backprop``, ``mezo``, ``elasticzo``, ...): the loop only calls
``step``, ``logits``, ``state_dict`` and ``load_state_dict``. The run directory is the LLM
recipe's (``train.py``): the same lock, signal handling, checkpoints, progress lines and report.
The task has no dev split: the periodic evaluation is on the test set (as the ElasticZO paper
reports it) and nothing is selected by it; the summary's ``test`` is the final parameters'.

Exact resume: batch ``t`` is a pure function of ``(seed, t)`` (``tasks.images.Batches``), the
model was initialised from the seed, and the trainer's state dict restores it bitwise.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint, rng, stopping
from . import progress as prog
from .errors import ZotuneError
from .image_trainers import build_trainer
from .models.vision import build_model
from .tasks.images import IMAGE_TASKS, Batches, normalise

DEFAULTS = {"backprop": {"lr": 0.05}, "mezo": {"lr": 1e-3, "eps": 1e-3},
            "elasticzo": {"lr": 1e-3, "eps": 1e-3, "lr_bp": 0.05},
            "elasticzo-int8": {"lr": 1e-3, "eps": 1e-3, "lr_bp": 0.05},
            "cge": {"lr": 0.05, "eps": 5e-3}, "deepzero": {"lr": 0.1, "eps": 5e-3},
            "rge": {"lr": 1e-3, "eps": 5e-3}}
"""Image-task defaults by method where ``--lr``/``--eps``/``--lr-bp`` are not given."""


def query_batch(value) -> int | str:
    """``--query-batch``: ``auto`` or an integer >= 1 (a one-line error otherwise)."""
    text = str(value).strip()
    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ZotuneError(f"query_batch must be an integer >= 1 or 'auto', got {value!r}")


def is_image_task(cfg) -> bool:
    return cfg.data.task_file is None and cfg.data.task in IMAGE_TASKS


IMAGE_MODEL = "lenet5"
"""The model of an image task whose ``--model`` is left at the language default."""


def with_defaults(cfg):
    """``cfg`` with the image defaults of its method for the unset lr, eps and lr_bp, and
    :data:`IMAGE_MODEL` for a model left at the language default (``zotune train --task
    fashion-mnist`` alone runs)."""
    from .config import ModelConfig

    m = cfg.method
    defaults = DEFAULTS.get(m.name, {"lr": 1e-3, "eps": 1e-3, "lr_bp": 0.05})
    given = {k: v for k, v in defaults.items() if getattr(m, k) is None}
    if cfg.model.name == ModelConfig().name:
        given["model"] = IMAGE_MODEL
    return cfg.updated(given, source="the image-task defaults") if given else cfg


@dataclass
class ImageRunState:
    """What the loop carries between steps and across a resume."""

    step: int = 0
    wall_time: float = 0.0
    step_time: float = 0.0  # seconds spent inside trainer.step, over every session
    last_test: float | None = None
    initial_test: float | None = None
    memory: dict = field(default_factory=dict)


def seeded_model(cfg, data):
    """The run's model, initialised from the run seed (the global RNG is left untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(rng.mix(cfg.run.seed, 0x4D4F44454C))
        return build_model(cfg.model.name, data.num_classes, data.in_channels,
                           width=cfg.model.cnn_width, depth=cfg.model.cnn_depth)


def trainer_options(cfg) -> dict:
    """The options an :class:`~zotune.image_trainers.ImageTrainer` builder receives (those that
    depend on the run, DeepZero's ratios and schedule, come from ``sparsity.protocol.run_options``)."""
    m = cfg.method
    return {"lr": m.lr, "lr_bp": m.lr_bp, "eps": m.eps, "seed": cfg.run.seed, "bp_layers": m.bp_layers,
            "tail_grad": m.tail_grad, "momentum": m.momentum, "weight_decay": m.weight_decay,
            "direction": m.direction, "sparsity": m.sparsity, "num_probes": m.num_probes,
            "rge_mode": m.rge_mode, "query_batch": query_batch(cfg.engine.query_batch),
            "query_exact": cfg.engine.query_exact}


def trainer_for(cfg, model, extra: dict | None = None, parallel=None):
    """The method's trainer on ``model`` (``extra`` options on top; on the mesh ``parallel``, a
    Topology, with ``--parallel``); a bad option is a one-line error."""
    try:
        return build_trainer(cfg.method.name, model,
                             {**trainer_options(cfg), **(extra or {}), "parallel": parallel})
    except ValueError as err:
        raise ZotuneError(f"method {cfg.method.name!r}: {err}") from None


def accuracy(trainer, images: torch.Tensor, labels: torch.Tensor, task: str, batch_size: int,
             desc: str) -> float:
    """Test accuracy (%) of the trainer's current parameters."""
    report, correct = prog.current(), 0
    with prog.timed(report.eval_time, len(images)), report.eval_bar(len(images), desc) as bar:
        for s in range(0, len(images), batch_size):
            x = normalise(images[s:s + batch_size], task)
            correct += int((trainer.logits(x).argmax(-1) == labels[s:s + batch_size]).sum())
            bar.update(len(x))
    return 100.0 * correct / max(1, len(images))


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run(cfg, *, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) an image-classification run; return its summary (see the module docstring).
    Called by ``train.train`` inside its run lock and signal handling."""
    from .memory import training_memory
    from .report import plot_curves
    from .train import _peak_rss_gib, _truncate_metrics, _write_json, open_run_directory

    from .distributed import run as ranks
    from .sparsity import protocol

    cfg = with_defaults(protocol.with_deepzero_defaults(cfg)).resolved()
    protocol.check(cfg)
    d, m, r = cfg.data, cfg.method, cfg.run
    rank = ranks.current()  # --parallel pertp: every rank steps, rank 0 alone writes and evaluates
    out = Path(r.output_dir)
    open_run_directory(out, cfg, resume)

    prog.phase(f"loading data: {d.task}")
    data = IMAGE_TASKS[d.task](d.data_dir)
    model = seeded_model(cfg, data)
    prog.phase(f"model: {cfg.model.name} ({sum(p.numel() for p in model.parameters()):,} parameters), "
               f"method {m.name}")
    batches = Batches(data.train_images, data.train_labels, d.task, d.batch_size, r.seed, d.augment)
    steps = d.epochs * batches.steps_per_epoch if d.epochs else r.steps
    if m.layer_ratios not in (None, "uniform") and not resume:
        prog.phase(f"layer-wise ratios: {m.layer_ratios} at sparsity {m.sparsity:g}")
    extra, ratios = protocol.run_options(cfg, model, data, out, resume, steps, batches.steps_per_epoch)
    options = {**trainer_options(cfg), **extra}
    trainer = trainer_for(cfg, model, extra, rank.topology)
    tensors = dict(model.state_dict())  # parameters and BN buffers, shared with the model
    metrics = out / "metrics.jsonl"
    state = ImageRunState()
    if resume:
        saved, trainer_state = checkpoint.load_latest(out, tensors)
        trainer.load_state_dict(trainer_state)
        state = ImageRunState(**saved)
        _write_json(out / "config.json", cfg.saved())
        _truncate_metrics(metrics, state.step)
    elif rank.is_writer:
        metrics.write_text("")
        prog.phase("measuring the training memory on two batches")
        state.memory = training_memory(lambda copy: build_trainer(m.name, copy, options), model,
                                       [batches.batch(0), batches.batch(1)])
        state.initial_test = accuracy(trainer, data.test_images, data.test_labels, d.task,
                                      d.eval_batch_size, "initial test")
        _log(metrics, {"step": 0, "test": state.initial_test})

    report, signals = prog.current(), stopping.current()
    start = time.perf_counter() - state.wall_time
    saved_at = state.step if resume else None
    status, window = "completed", []

    def save() -> None:
        nonlocal saved_at
        state.wall_time = time.perf_counter() - start
        with prog.timed(report.checkpoint_time):
            if rank.is_writer:
                checkpoint.save(out, state.step, tensors, dataclasses.asdict(state), trainer.state_dict(),
                            keep=r.keep_checkpoints)
        saved_at = state.step

    def finish(final: str, evaluate: bool) -> dict:
        if not rank.is_writer:
            return {}
        if evaluate and state.last_test is None:
            state.last_test = accuracy(trainer, data.test_images, data.test_labels, d.task,
                                       d.eval_batch_size, "test")
        state.wall_time = time.perf_counter() - start
        summary = {"task": d.task, "model": cfg.model.name, "method": m.name, "status": final,
                   "metric": "accuracy", "test": state.last_test, "initial_test": state.initial_test,
                   "zero_shot": {"test": state.initial_test}, "best_dev": None, "best_step": None,
                   "steps": state.step, "epochs": state.step / batches.steps_per_epoch,
                   "batch_size": d.batch_size, "bp_layers": m.bp_layers,
                   "wall_time_s": state.wall_time,
                   "time_per_step_s": state.step_time / state.step if state.step else None,
                   "peak_memory_bytes": state.memory.get("peak_bytes"), "memory": state.memory,
                   "peak_rss_gib": _peak_rss_gib(),
                   "train_examples": len(data.train_images), "test_examples": len(data.test_images),
                   "layer_ratios": ratios}
        _write_json(out / "summary.json", summary)
        plot_curves(metrics, out / "curves.png", title=f"{d.task} / {cfg.model.name} / {m.name}")
        return summary

    if state.step < steps:
        prog.phase(f"training: steps {state.step + 1}-{steps} ({steps / batches.steps_per_epoch:g} epochs of "
                   f"{batches.steps_per_epoch} steps), test evaluation every {r.eval_every} steps")
    bar = report.train_bar(steps, state.step, f"{d.task} {m.name}")
    try:
        while state.step < steps:
            if r.max_time and rank.decide(time.perf_counter() - start > r.max_time):
                status = "max_time"
                with signals.deferred():
                    if saved_at != state.step:
                        save()
                signals.check()
                break
            images, labels = batches.batch(state.step)
            with signals.deferred():
                t0 = time.perf_counter()
                with prog.timed(report.step_time):
                    loss = trainer.step(images, labels)
                state.step_time += time.perf_counter() - t0
                state.step += 1
                window.append(loss)
                if rank.is_writer and (state.step % r.log_every == 0 or state.step == steps):
                    finite = [v for v in window if math.isfinite(v)]
                    _log(metrics, {"step": state.step, "loss": sum(finite) / max(1, len(finite)),
                                   "epoch": state.step / batches.steps_per_epoch,
                                   "elapsed": time.perf_counter() - start})
                    window = []
                state.last_test = None
            bar.set_postfix_str(f"loss={loss:.4f}", refresh=False)
            bar.update(1)
            if rank.is_writer and (state.step % r.eval_every == 0 or state.step == steps):
                state.last_test = accuracy(trainer, data.test_images, data.test_labels, d.task,
                                           d.eval_batch_size, f"test at step {state.step}")
                with signals.deferred():
                    _log(metrics, {"step": state.step, "test": state.last_test})
                    save()
            rank.agree_on_stop(signals)  # a signal to any rank stops all after this step
            signals.check()
    except KeyboardInterrupt as stop:
        bar.close()
        if not getattr(stop, "immediate", False):
            if saved_at != state.step:
                save()
            stop.saved = True
            finish(getattr(stop, "status", "interrupted"), evaluate=False)
        raise
    bar.close()
    return finish(status, evaluate=True)
