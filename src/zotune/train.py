"""The ZO fine-tuning recipe: one readable loop from a config to a fine-tuned model and a report.

    load task (MeZO protocol) -> load model, choose trainable parameters -> zero-shot eval
    -> for each step: ZO step on a batch; log; every ``eval_every`` steps: dev eval, checkpoint
    -> test eval of the best-dev parameters -> summary.json, metrics.jsonl, curves.png

Exact resume: batches are a function of (seed, step) and the optimizer's random numbers of
(seed, step, probe, tensor, chunk), so a run resumed from a checkpoint follows the uninterrupted
run bitwise. Ctrl-C and ``max_time`` save a checkpoint before stopping.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, rng
from .errors import ZotuneError
from .optim import METHODS, ZOOptimizer
from .directions import DIRECTIONS
from .updates import SCHEDULES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OBJECTIVES = ("auto", "classification", "answer_lm", "accuracy", "f1")
TRAINABLE = ("full", "lora", "prefix", "pattern")
# MeZO's per-scheme defaults (research/mezo_zobench.md, section 3.1): lr and eps.
DEFAULT_LR = {"full": 1e-6, "lora": 1e-4, "prefix": 1e-2, "pattern": 1e-6}
DEFAULT_EPS = {"full": 1e-3, "lora": 1e-2, "prefix": 1e-1, "pattern": 1e-3}
# Settings that must not change when a run is resumed.
RESUME_KEYS = ("task", "task_file", "model", "method", "direction", "trainable", "pattern", "lora_r",
               "lora_alpha", "prefix_tokens", "batch_size", "lr", "eps", "weight_decay", "num_probes",
               "one_sided", "schedule", "warmup_steps", "objective", "num_train", "num_dev",
               "data_seed", "seed", "dtype", "max_length", "estimator", "update", "projection",
               "clip_norm", "pool_size", "pezo_bits", "pezo_scaling", "pezo_pow2",
               "pezo_decorrelate_copies", "pezo_lanes", "pezo_reuse", "kernel_order",
               "kernel_schedule", "kernel_r_sharing", "kernel_normalization", "kernel_s0", "kernel_shrink_steps", "dizo_interval",
               "dizo_iterations", "dizo_eps", "dizo_step_size", "dizo_clip", "dizo_pattern")
ESTIMATORS = ("spsa", "kernel")
PROJECTIONS = ("none", "dizo", "dizo-fo")


def _direction_flag(option: str) -> str:
    return "--pool-size" if option == "pool_size" else "--pezo-" + option.replace("_", "-")


@dataclass
class TrainConfig:
    """Every setting of a run (CLI flags and YAML keys have the same names, with - for _)."""

    task: str = "sst2"
    task_file: str | None = None
    model: str = "smollm2-135m"
    method: str = "mezo"
    direction: str | None = None
    trainable: str = "full"
    pattern: str | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    prefix_tokens: int = 5
    steps: int = 1000
    batch_size: int = 16
    lr: float | None = None
    eps: float | None = None
    weight_decay: float = 0.0
    num_probes: int | None = None
    one_sided: bool = False
    schedule: str = "constant"
    warmup_steps: int = 0
    defer_update: bool = True
    objective: str = "auto"
    eval_every: int = 100
    eval_dev: int | None = None
    eval_batch_size: int = 32
    num_train: int = 1000
    num_dev: int | None = None
    num_test: int = 1000
    data_dir: str | None = None
    data_seed: int = 0
    seed: int = 0
    output_dir: str = "runs/zotune"
    log_every: int = 10
    max_time: float | None = None
    max_length: int = 2048
    dtype: str = "float32"
    device: str = "auto"
    # Composition: each overrides one part of the method's preset (None keeps the preset's).
    estimator: str | None = None
    update: str | None = None
    projection: str | None = None
    clip_norm: float | None = None
    pool_size: int | None = None
    pezo_bits: int | None = None
    pezo_scaling: str | None = None
    pezo_pow2: bool | None = None
    pezo_decorrelate_copies: bool | None = None
    pezo_lanes: int | None = None
    pezo_reuse: int | None = None
    kernel_order: int | None = None
    kernel_schedule: str | None = None
    kernel_r_sharing: str | None = None
    kernel_normalization: str | None = None
    kernel_s0: float | None = None
    kernel_shrink_steps: int | None = None
    dizo_interval: int | None = None
    dizo_iterations: int | None = None
    dizo_eps: float | None = None
    dizo_step_size: float | None = None
    dizo_clip: float | None = None
    dizo_pattern: str | None = None

    def optimizer_options(self) -> dict:
        """The ZOOptimizer arguments that compose the method from its parts."""
        kernel, dizo = self._options("kernel_"), self._options("dizo_")
        options: dict = {"update": self.update, "clip_norm": self.clip_norm,
                         "direction": self.make_direction()}
        if self.estimator == "kernel" or kernel:
            if self.estimator == "spsa":
                raise ZotuneError("--estimator spsa conflicts with --kernel-* options")
            options["kernel"] = kernel
        elif self.estimator == "spsa":
            from .estimators import SPSA
            options["estimator"] = SPSA(self.eps, self.num_probes or 1, self.one_sided)
        if self.projection == "none":
            options["projection"] = False
        elif self.projection is not None or dizo:
            if self.projection is not None:
                dizo["search"] = "fo" if self.projection == "dizo-fo" else "zo"
            options["projection"] = dizo
        return options

    def _options(self, prefix: str) -> dict:
        """The settings ``prefix*`` that are set, by their names without the prefix."""
        return {k[len(prefix):]: v for k, v in dataclasses.asdict(self).items()
                if k.startswith(prefix) and v is not None}

    def direction_name(self) -> str:
        """The direction in use: ``direction`` if set, else the method's own (MeZO's Gaussian
        for most methods, PeZO's pool for ``pezo``)."""
        from .optim import METHODS

        return self.direction or METHODS.get(self.method, {}).get("direction", "gaussian")

    def make_direction(self):
        """The direction with its options (``pool_size``, ``pezo_*``; 0 bits = float uniform)."""
        from .directions import DIRECTIONS

        name = self.direction_name()
        options = self._options("pezo_")
        if options.get("bits") == 0:
            options["bits"] = None
        if self.pool_size is not None:
            options["pool_size"] = self.pool_size
        cls = DIRECTIONS[name]
        accepted = set(inspect.signature(cls).parameters)
        wrong = sorted(set(options) - accepted)
        if wrong:
            ours = {f.name[len("pezo_"):] for f in dataclasses.fields(self) if f.name.startswith("pezo_")}
            valid = sorted(accepted & (ours | {"pool_size"}))
            raise ZotuneError(f"{', '.join(map(_direction_flag, wrong))} not for the {name!r} direction; "
                              f"it takes: {', '.join(map(_direction_flag, valid)) or 'no options'}")
        try:
            return cls(**options)
        except ValueError as err:
            raise ZotuneError(f"direction {name!r}: {err}") from None

    def resolved(self) -> "TrainConfig":
        """A copy with lr and eps filled in from the trainable scheme, validated."""
        cfg = dataclasses.replace(self)
        if cfg.lr is None:
            cfg.lr = DEFAULT_LR.get(cfg.trainable, 1e-6)
        if cfg.eps is None:
            cfg.eps = DEFAULT_EPS.get(cfg.trainable, 1e-3)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def choice(name, valid):
            if getattr(self, name) not in valid:
                raise ZotuneError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        choice("method", list(METHODS))
        if self.direction is not None:
            choice("direction", sorted(DIRECTIONS))
        choice("trainable", TRAINABLE)
        choice("objective", OBJECTIVES)
        choice("schedule", SCHEDULES)
        choice("dtype", list(DTYPES))
        if self.estimator is not None:
            choice("estimator", ESTIMATORS)
        if self.projection is not None:
            choice("projection", PROJECTIONS)
        if self.update is not None:
            from .updates import UPDATES
            choice("update", list(UPDATES))
        if self.num_probes is not None and not (isinstance(self.num_probes, int) and self.num_probes >= 1):
            raise ZotuneError(f"num_probes must be an integer >= 1, got {self.num_probes!r}")
        for name in ("steps", "batch_size", "eval_every", "log_every", "eval_batch_size",
                     "num_train", "num_test", "max_length"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ZotuneError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.lr is not None and not self.lr >= 0:
            raise ZotuneError(f"lr must be >= 0, got {self.lr}")
        if self.eps is not None and not self.eps > 0:
            raise ZotuneError(f"eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ZotuneError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_time is not None and self.max_time <= 0:
            raise ZotuneError(f"max_time must be > 0 seconds, got {self.max_time}")
        if self.schedule != "constant" and self.warmup_steps >= self.steps:
            raise ZotuneError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")


def load_task(cfg: TrainConfig):
    from .tasks import get_task, load_custom_task
    return load_custom_task(cfg.task_file) if cfg.task_file else get_task(cfg.task)


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ZotuneError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ZotuneError(f"device {name!r} asked for, but no CUDA GPU is available")
    return device


def build(cfg: TrainConfig, task):
    """Model, tokenizer, scorer and trainable parameters for a run."""
    from .models import load_model, select_trainable, trainable_parameters
    from .objectives import CandidateScorer

    model, tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.dtype])
    model.to(resolve_device(cfg.device))
    model = select_trainable(model, cfg.trainable, pattern=cfg.pattern, lora_r=cfg.lora_r,
                             lora_alpha=cfg.lora_alpha, prefix_tokens=cfg.prefix_tokens, seed=cfg.seed)
    model.eval()
    scorer = CandidateScorer(model, tokenizer, max_length=cfg.max_length)
    return model, tokenizer, scorer, dict(trainable_parameters(model))


def objective_fn(cfg: TrainConfig, task, scorer):
    """The training loss of a batch of Examples."""
    kind = task.train_objective if cfg.objective == "auto" else cfg.objective
    if kind == "classification":
        return scorer.classification_loss
    if kind == "answer_lm":
        return scorer.answer_loss
    if kind == "accuracy":
        if task.kind == "generation":
            raise ZotuneError(f"objective 'accuracy' needs candidates; task {task.name} is generative "
                              "(use --objective f1)")
        return scorer.accuracy_loss
    if task.kind != "generation":
        raise ZotuneError(f"objective 'f1' is for generation tasks; {task.name} is {task.kind}")
    from .tasks.metrics import max_f1

    def f1_loss(examples):
        preds = scorer.generate(examples)
        return -sum(max_f1(p, ex.answers) for p, ex in zip(preds, examples)) / len(examples)
    return f1_loss


def evaluate(scorer, task, examples, batch_size: int = 32) -> float:
    """Accuracy (or SQuAD F1) in percent on ``examples``."""
    from .tasks.metrics import accuracy, max_f1

    if not examples:
        return float("nan")
    if task.metric == "f1":
        preds = scorer.generate(examples)
        return 100 * sum(max_f1(p, ex.answers) for p, ex in zip(preds, examples)) / len(examples)
    preds = scorer.predict(examples, batch_size=batch_size)
    return 100 * accuracy(preds, [ex.label for ex in examples])


class BatchSampler:
    """Batch ``t`` of a run: a pure function of (seed, t), epoch-wise permutations of the data."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size == 0:
            raise ZotuneError("the training set is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.RandomState(rng.mix(self.seed, epoch) & 0xFFFFFFFF).permutation(self.size)
        return self._perm

    def indices(self, step: int) -> list[int]:
        out = []
        for i in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._permutation(i // self.size)[i % self.size]))
        return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass
class RunState:
    """What the loop carries between steps and across a resume."""

    step: int = 0
    best_dev: float | None = None
    best_step: int | None = None
    zero_shot: dict = field(default_factory=dict)
    wall_time: float = 0.0
    forward_passes: int = 0
    last_dev: float | None = None


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a training run described by ``cfg``; return its summary."""
    from tqdm.auto import tqdm

    cfg = cfg.resolved()
    if not progress:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = checkpoint.latest(out)
    if resume:
        if previous is None:
            raise ZotuneError(f"--resume: no checkpoint in {out}/checkpoints; nothing to resume")
        saved = json.loads((out / "config.json").read_text())
        changed = [k for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
        if changed:
            raise checkpoint.CheckpointError(
                f"cannot resume {out}: it was started with different settings: " + ", ".join(
                    f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in changed))
    elif previous is not None:
        raise ZotuneError(f"{out} already holds a run ({previous.name}); pass --resume to continue "
                          "it or choose another --output-dir")
    _write_json(out / "config.json", dataclasses.asdict(cfg))

    task = load_task(cfg)
    data = task.load(cfg.data_dir, num_train=cfg.num_train, num_dev=cfg.num_dev,
                     num_test=cfg.num_test, seed=cfg.data_seed)
    dev = data.dev[: cfg.eval_dev] if cfg.eval_dev else data.dev
    model, _, scorer, params = build(cfg, task)
    loss_of = objective_fn(cfg, task, scorer)
    try:
        opt = ZOOptimizer(list(params.items()), lr=cfg.lr, eps=cfg.eps, method=cfg.method,
                          seed=cfg.seed, num_probes=cfg.num_probes,
                          one_sided=cfg.one_sided, weight_decay=cfg.weight_decay,
                          schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
                          total_steps=cfg.steps, defer_update=cfg.defer_update,
                          **cfg.optimizer_options())
    except ValueError as err:
        raise ZotuneError(f"method {cfg.method!r}: {err}") from None
    if opt.projection is not None:  # the projection search draws its own batches
        search = BatchSampler(len(data.train), cfg.batch_size, rng.mix(cfg.seed, 0x53454152))
        iterations = opt.projection.iterations
        opt.search_closures = lambda step, j: (
            lambda b=[data.train[i] for i in search.indices(step * iterations + j)]: loss_of(b))
    state = RunState()
    metrics_path = out / "metrics.jsonl"
    if resume:
        saved_state, opt_state = checkpoint.load(previous, params)
        opt.load_state_dict(opt_state)
        state = RunState(**saved_state)
        _truncate_metrics(metrics_path, state.step)
    else:
        metrics_path.write_text("")
        for note in data.notes:
            print(f"note: {note}")
        state.zero_shot = {"dev": evaluate(scorer, task, dev, cfg.eval_batch_size),
                           "test": evaluate(scorer, task, data.test, cfg.eval_batch_size)}
        _log(metrics_path, {"step": 0, "dev": state.zero_shot["dev"], "test": state.zero_shot["test"],
                            "zero_shot": True})

    sampler = BatchSampler(len(data.train), cfg.batch_size, cfg.seed)
    start_time = time.perf_counter() - state.wall_time
    window: list[float] = []
    status = "completed"
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress, desc=f"{task.name} {cfg.method}",
               dynamic_ncols=True)

    def save_checkpoint():
        opt.flush()
        state.wall_time = time.perf_counter() - start_time
        state.forward_passes = opt.forward_passes
        checkpoint.save(out, state.step, params, dataclasses.asdict(state), opt.state_dict())

    try:
        while state.step < cfg.steps:
            batch = [data.train[i] for i in sampler.indices(state.step)]
            loss = opt.step(lambda: loss_of(batch))
            state.step += 1
            window.append(loss)
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                finite = [v for v in window if math.isfinite(v)]
                _log(metrics_path, {"step": state.step, "loss": sum(finite) / max(1, len(finite)),
                                    "lr": opt.current_lr(), "elapsed": time.perf_counter() - start_time,
                                    "forward_passes": opt.forward_passes,
                                    "skipped_steps": opt.skipped_steps})
                bar.set_postfix(loss=f"{window[-1]:.4f}", dev=state.last_dev)
                window = []
            if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
                opt.flush()
                state.last_dev = evaluate(scorer, task, dev, cfg.eval_batch_size)
                _log(metrics_path, {"step": state.step, "dev": state.last_dev})
                if state.best_dev is None or state.last_dev > state.best_dev:
                    state.best_dev, state.best_step = state.last_dev, state.step
                    checkpoint.save_best(out, params, {"step": state.step, "dev": state.last_dev})
                save_checkpoint()
            if cfg.max_time and time.perf_counter() - start_time > cfg.max_time:
                status = "max_time"
                save_checkpoint()
                break
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint()
        _finish(out, cfg, state, opt, task, scorer, data, params, start_time, "interrupted",
                final_eval=False)
        raise
    bar.close()
    opt.flush()
    return _finish(out, cfg, state, opt, task, scorer, data, params, start_time, status, final_eval=True)


def _finish(out, cfg, state, opt, task, scorer, data, params, start_time, status, final_eval) -> dict:
    from .report import plot_curves

    state.wall_time = time.perf_counter() - start_time
    test = None
    if final_eval and (out / "best").exists():
        checkpoint.load(out / "best", params)
        test = evaluate(scorer, task, data.test, cfg.eval_batch_size)
        _log(out / "metrics.jsonl", {"step": state.best_step, "test": test, "best_dev_checkpoint": True})
    summary = {"task": task.name, "model": cfg.model, "method": cfg.method, "direction": opt.direction.name,
               "trainable": cfg.trainable, "metric": task.metric, "status": status,
               "zero_shot": state.zero_shot, "best_dev": state.best_dev, "best_step": state.best_step,
               "final_dev": state.last_dev, "test": test, "steps": state.step,
               "wall_time_s": state.wall_time, "forward_passes": opt.forward_passes,
               "random_numbers": opt.engine.numbers_drawn, "skipped_steps": opt.skipped_steps, "peak_rss_gib": _peak_rss_gib(),
               "train_examples": len(data.train), "dev_examples": len(data.dev),
               "test_examples": len(data.test), "notes": data.notes}
    _write_json(out / "summary.json", summary)
    plot_curves(out / "metrics.jsonl", out / "curves.png", title=f"{task.name} / {cfg.model} / {cfg.method}")
    return summary


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (they will be written again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
