"""The ZO fine-tuning recipe: one readable loop from a config to a fine-tuned model and a report.

    load task (MeZO protocol) -> load model, choose trainable parameters -> zero-shot eval
    -> for each step: ZO step on a batch; log; every ``run.eval_every`` steps: dev eval, checkpoint
    -> test eval of the best-dev parameters -> summary.json, metrics.jsonl, curves.png

The settings are a ``TrainConfig`` (``zotune.config``): ``cfg.model``, ``cfg.data``, ``cfg.method``,
``cfg.engine``, ``cfg.run``.

Exact resume: batches are a function of (seed, step) and the optimizer's random numbers of
(seed, step, probe, tensor, chunk), so a run resumed from a checkpoint follows the uninterrupted
run bitwise. Ctrl-C, SIGTERM and ``max_time`` save a checkpoint before stopping (a signal lets the
current step finish first; see ``stopping``); one run at a time holds a run directory
(``run_lock``); the last ``run.keep_checkpoints`` checkpoints are kept (``checkpoint``); phase lines,
bars and the ETA go to stderr (``progress``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, rng, run_lock, stopping
from .distributed import run as ranks
from . import progress as prog  # (`progress` is train()'s flag)
from .config import DEFAULT_EPS, DEFAULT_LR, OBJECTIVES, TRAINABLE, TrainConfig, resume_conflicts
from .errors import ZotuneError
from .optim import ZOOptimizer

__all__ = ["DEFAULT_EPS", "DEFAULT_LR", "DTYPES", "OBJECTIVES", "TRAINABLE", "BatchSampler",
           "TrainConfig", "build", "evaluate", "load_task", "objective_fn", "train"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_task(cfg: TrainConfig):
    from .tasks import get_task, load_custom_task
    d = cfg.data
    where = "" if d.task_file else f" from {d.data_dir or os.environ.get('ZOTUNE_DATA', '$ZOTUNE_DATA')}"
    prog.phase(f"loading data: {d.task_file or d.task}{where}")
    return load_custom_task(d.task_file) if d.task_file else get_task(d.task)


def load_data(cfg: TrainConfig, task):
    """The run's train/dev/test examples of ``task`` (MeZO's protocol, the config's sizes and seed)."""
    d = cfg.data
    return task.load(d.data_dir, num_train=d.num_train, num_dev=d.num_dev, num_test=d.num_test,
                     seed=d.data_seed, skip_bad_rows=d.skip_bad_rows)


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


def build(cfg: TrainConfig, task, *, engine_places: bool = False):
    """Model, tokenizer, scorer and trainable parameters for a run (``engine_places``: the
    offload engine moves what stays resident to a CUDA device itself; the blocks stay on the host)."""
    from .models import load_model, select_trainable, trainable_parameters
    from .objectives import CandidateScorer

    m = cfg.model
    prog.phase(f"loading the model: {m.name} ({m.dtype}, {m.trainable} parameters train)")
    model, tokenizer = load_model(m.name, dtype=DTYPES[m.dtype])
    device = resolve_device(m.device)
    if not (engine_places and device.type == "cuda"):
        model.to(device)
    model = select_trainable(model, m.trainable, pattern=m.pattern, lora_r=m.lora_r,
                             lora_alpha=m.lora_alpha, prefix_tokens=m.prefix_tokens, seed=cfg.run.seed)
    model.eval()
    scorer = CandidateScorer(model, tokenizer, max_length=m.max_length)
    return model, tokenizer, scorer, dict(trainable_parameters(model))


def objective_kind(cfg: TrainConfig, task) -> str:
    """The objective a run trains: the task's own unless ``--objective`` names another."""
    return task.train_objective if cfg.data.objective == "auto" else cfg.data.objective


def objective_fn(cfg: TrainConfig, task, scorer):
    """The training loss of a batch of Examples."""
    kind = objective_kind(cfg, task)
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


def make_optimizer(cfg: TrainConfig, model, params: dict) -> ZOOptimizer:
    """The run's ZOOptimizer over ``params`` (from :func:`build`), as ``cfg`` (resolved) says:
    method, lr, eps, probes, schedule, engine, and this rank's share of a distributed run."""
    method, r = cfg.method, cfg.run
    try:
        return ZOOptimizer(list(params.items()), lr=method.lr, eps=method.eps, method=method.name,
                           seed=r.seed, num_probes=method.num_probes,
                           one_sided=method.one_sided, weight_decay=method.weight_decay,
                           schedule=method.schedule, warmup_steps=method.warmup_steps,
                           total_steps=r.steps, defer_update=cfg.engine.defer_update, model=model,
                           **method.optimizer_options(), **cfg.engine.engine_options(),
                           **({"device": resolve_device(cfg.model.device)} if cfg.engine.name == "offload" else {}),
                           **ranks.current().optimizer_options())
    except ValueError as err:
        raise ZotuneError(f"method {method.name!r}: {err}") from None


GENERATION_BATCH = 8
"""Prompts per batch of greedy generation (F1 tasks) in :func:`evaluate`."""


def evaluate(scorer, task, examples, batch_size: int = 32, desc: str | None = None) -> float:
    """Accuracy (or SQuAD F1) in percent on ``examples``, with a progress bar (``desc``) when a
    run's progress is on. Batches are the same as in one call over all examples, so the number
    does not depend on the bar."""
    from .tasks.metrics import accuracy, max_f1

    if not examples:
        return float("nan")
    report = prog.current()
    chunk = GENERATION_BATCH if task.metric == "f1" else batch_size
    preds = []
    with prog.timed(report.eval_time, len(examples)), report.eval_bar(len(examples), desc) as bar:
        for start in range(0, len(examples), chunk):
            part = examples[start:start + chunk]
            if task.metric == "f1":
                preds += scorer.generate(part, batch_size=chunk)
            else:
                preds += scorer.predict(part, batch_size=batch_size)
            bar.update(len(part))
    if task.metric == "f1":
        return 100 * sum(max_f1(p, ex.answers) for p, ex in zip(preds, examples)) / len(examples)
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
    if not ranks.current().is_writer:  # one copy of every file: rank 0's
        return
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
    random_numbers: float = 0.0  # drawn so far, over every session of the run
    eval_due: bool = False  # the dev evaluation of ``step`` has not run yet (stopped during it)


def _one_run_per_directory(run):
    """``train``'s frame. The settings are validated first (a bad one creates no directory); then,
    for the life of the run: the exclusive lock of the run directory (``run_lock``; a second run
    there is refused), SIGINT/SIGTERM handling (``stopping``), the phase lines and bars
    (``progress``), and before anything else the cleanup of what a stopped save left
    (``checkpoint.clean``). A stopped run's exception says which checkpoint is there."""

    @functools.wraps(run)
    def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
        out = Path(cfg.resolved().run.output_dir)
        with ranks.context(cfg.resolved()) as rank:  # torch.distributed, with --parallel
            report = prog.Progress(enabled=progress and rank.is_writer)
            with stopping.handling(), prog.active(report):
                try:
                    rank.start(cfg.resolved())
                    out.mkdir(parents=True, exist_ok=True)
                    with run_lock.hold(out, warn=report.warn) if rank.is_writer else contextlib.nullcontext():
                        if rank.is_writer:
                            checkpoint.clean(out)
                        rank.barrier("start")  # the others read the run directory once it is clean
                        summary = run(cfg, resume=resume, progress=progress)
                        return summary if rank.is_writer else None
                except KeyboardInterrupt as stop:
                    try:
                        stop.checkpoint = checkpoint.latest(out)
                    except checkpoint.CheckpointError:
                        stop.checkpoint = None
                    stop.saved = getattr(stop, "saved", False)
                    raise
    return train


@_one_run_per_directory
def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a training run described by ``cfg``; return its summary."""
    from .train_images import is_image_task, run as train_images

    if is_image_task(cfg):  # small networks from scratch: their own recipe, the same run directory
        return train_images(cfg, resume=resume, progress=progress)
    cfg = cfg.resolved()
    d, method, r = cfg.data, cfg.method, cfg.run
    if not progress:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    out = Path(r.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    open_run_directory(out, cfg, resume)

    task = load_task(cfg)
    data = load_data(cfg, task)
    dev = data.dev[: d.eval_dev] if d.eval_dev else data.dev
    model, _, scorer, params = build(cfg, task, engine_places=cfg.engine.name == "offload")
    loss_of = objective_fn(cfg, task, scorer)
    opt = make_optimizer(cfg, model, params)
    rank = ranks.current()
    rank.check_optimizer(opt)
    # an offloaded model's checkpoints stream block by block from its tier (checkpoint_stream.py)
    groups = lambda: getattr(opt.engine, "checkpoint_groups", lambda _: ())(params)  # noqa: E731
    scorer.runner.device = opt.engine.device  # the one place the model is called runs where the engine says
    for name in opt.excluded:
        print(f"note: {name} is not trained: {opt.engine.layout.spec(name).reason}", file=sys.stderr)
    if opt.projection is not None:  # the projection search draws its own batches
        search = BatchSampler(len(data.train), d.batch_size, rng.mix(r.seed, 0x53454152))
        iterations = opt.projection.iterations
        opt.search_closures = lambda step, j: (
            lambda b=[data.train[i] for i in search.indices(step * iterations + j)]: loss_of(b))
    state = RunState()
    metrics_path = out / "metrics.jsonl"
    if resume:
        saved_state, opt_state = checkpoint.load_latest(out, params, groups())  # the one before if unreadable
        opt.load_state_dict(opt_state)
        state = RunState(**saved_state)
        _write_json(out / "config.json", cfg.saved())  # only now: a refused resume leaves it as it was
        _truncate_metrics(metrics_path, state.step)
    elif rank.is_writer:  # rank 0 evaluates; the others wait at their first step
        metrics_path.write_text("")
        for note in data.notes:
            print(f"note: {note}", file=sys.stderr)  # stdout is kept for the final JSON
        prog.phase(f"zero-shot evaluation on {len(dev)} dev + {len(data.test)} test examples")
        state.zero_shot = {"dev": evaluate(scorer, task, dev, d.eval_batch_size, desc="zero-shot dev"),
                           "test": evaluate(scorer, task, data.test, d.eval_batch_size,
                                            desc="zero-shot test")}
        _log(metrics_path, {"step": 0, "dev": state.zero_shot["dev"], "test": state.zero_shot["test"],
                            "zero_shot": True})

    sampler = BatchSampler(len(data.train), d.batch_size, r.seed)
    opt.engine.numbers_drawn += state.random_numbers  # counted over every session of the run
    start_time = time.perf_counter() - state.wall_time
    window: list[float] = []
    status = "completed"
    report, signals = prog.current(), stopping.current()
    if rank.topology is not None and rank.topology.world > 1:
        signals.agreed_only = True  # a rank stops only where all do (RunContext.agree_on_stop)
    saved_at = state.step if resume else None  # the step of the newest checkpoint on disk
    if state.step < r.steps:
        prog.phase(f"training: steps {state.step + 1}-{r.steps}" + (f" (resumed at step {state.step})"
                   if resume else "") + f", dev evaluation every {r.eval_every} steps on {len(dev)} "
                   "examples")
    bar = report.train_bar(r.steps, state.step, f"{task.name} {method.name}")
    shown: dict = {}

    def show() -> None:
        parts = [report.eta_text(step=state.step, steps=r.steps, eval_every=r.eval_every,
                                 dev_examples=len(dev), test_examples=len(data.test),
                                 eval_due=state.eval_due)]
        if "loss" in shown:
            parts.append(f"loss={shown['loss']:.4f}")
        if state.last_dev is not None:
            parts.append(f"dev={state.last_dev:.1f}")
        bar.set_postfix_str(", ".join(parts), refresh=False)

    def save_checkpoint(share: Path | None = None, flush: bool = True) -> None:
        """``flush=False`` for a stop between evaluations: the parameters are saved as they are
        (a held update, or a step stopped half-way at a perturbed point, goes into the optimizer
        state), so the resumed run rounds exactly as the uninterrupted one would have."""
        nonlocal saved_at
        if flush:
            opt.flush()
        state.wall_time = time.perf_counter() - start_time
        state.forward_passes = opt.forward_passes
        state.random_numbers = opt.engine.numbers_drawn
        with prog.timed(report.checkpoint_time):
            if rank.is_writer:  # written once, by rank 0 (every rank holds the same state)
                checkpoint.save(out, state.step, params, dataclasses.asdict(state), opt.state_dict(),
                                keep=r.keep_checkpoints, share=share, groups=groups())
        saved_at = state.step

    def dev_evaluation() -> None:
        opt.flush()
        if not rank.is_writer:
            state.eval_due = False
            return
        prog.phase(f"evaluation at step {state.step} on {len(dev)} dev examples")
        value = evaluate(scorer, task, dev, d.eval_batch_size, desc=f"dev at step {state.step}")
        with signals.deferred():  # best/, the state, the log line and the checkpoint agree
            best = None
            if state.best_dev is None or value > state.best_dev:
                best = checkpoint.save_best(out, params, {"step": state.step, "dev": value}, groups())
                state.best_dev, state.best_step = value, state.step
            state.last_dev, state.eval_due = value, False
            _log(metrics_path, {"step": state.step, "dev": value})
            save_checkpoint(share=best / checkpoint.PARAMS if best is not None else None)
        signals.check()

    try:
        while True:
            if state.eval_due:
                dev_evaluation()
                show()
                bar.refresh()
            if state.step >= r.steps:
                break
            if r.max_time and rank.decide(time.perf_counter() - start_time > r.max_time):
                status = "max_time"
                with signals.deferred():
                    if saved_at != state.step:
                        save_checkpoint(flush=False)
                signals.check()
                break
            batch = rank.shard([data.train[i] for i in sampler.indices(state.step)])
            # A first signal lets the step finish: it moves parameters on a thread pool and
            # leaves them perturbed in between (see stopping.py).
            with signals.deferred():
                with prog.timed(report.step_time):
                    loss = opt.step(lambda: loss_of(batch))
                state.step += 1
                state.eval_due = state.step % r.eval_every == 0 or state.step == r.steps
                window.append(loss)
                shown["loss"] = loss
                if state.step % r.log_every == 0 or state.step == r.steps:
                    finite = [v for v in window if math.isfinite(v)]
                    _log(metrics_path, {"step": state.step, "loss": sum(finite) / max(1, len(finite)),
                                        "lr": opt.current_lr(), "elapsed": time.perf_counter() - start_time,
                                        "forward_passes": opt.forward_passes,
                                        "skipped_steps": opt.skipped_steps})
                    window = []
            show()
            bar.update(1)
            rank.agree_on_stop(signals)  # a signal to any rank stops all after this step
            signals.check()
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM (stopping.RunStopped) or raised by a caller
        bar.close()
        if not getattr(stop, "immediate", False):  # a second signal: the last checkpoint stays
            if saved_at != state.step:
                save_checkpoint(flush=False)
            stop.saved = True
            _finish(out, cfg, state, opt, task, scorer, data, params, start_time,
                    getattr(stop, "status", "interrupted"), final_eval=False)
        raise
    bar.close()
    opt.flush()
    try:
        return _finish(out, cfg, state, opt, task, scorer, data, params, start_time, status,
                       final_eval=True)
    except KeyboardInterrupt as stop:  # during the test evaluation: --resume runs it again
        if not getattr(stop, "immediate", False):
            stop.saved = True
            _finish(out, cfg, state, opt, task, scorer, data, params, start_time,
                    getattr(stop, "status", "interrupted"), final_eval=False)
        raise


def open_run_directory(out: Path, cfg: TrainConfig, resume: bool) -> None:
    """Refuse a resume without a checkpoint (or with changed settings) and a new run on a
    directory that holds one; a new run writes its config.json now, a resumed run once its
    checkpoint has loaded."""
    previous = checkpoint.latest(out)
    if resume:
        if previous is None:
            raise ZotuneError(f"--resume: no checkpoint in {out}/checkpoints; nothing to resume")
        _check_resume(out, previous, cfg)
    elif previous is not None:
        raise ZotuneError(f"{out} already holds a run ({previous.name}); pass --resume to continue "
                          "it or choose another --output-dir")
    else:
        _write_json(out / "config.json", cfg.saved())


def _check_resume(out: Path, previous: Path, cfg: TrainConfig) -> None:
    """Refuse to resume the run in ``out`` from checkpoint ``previous`` with settings that change
    it, or with a --steps below the step it has reached (--steps is the total)."""
    saved = out / "config.json"  # flat, or nested if a user wrote one
    saved_cfg = TrainConfig.from_dict(json.loads(saved.read_text()), source=str(saved))
    changed = resume_conflicts(saved_cfg.with_absolute_paths(), cfg)  # a 0.1 run's may be relative
    if changed:
        raise checkpoint.CheckpointError(
            f"cannot resume {out}: it was started with different settings: " + "; ".join(changed))
    try:
        at = int(json.loads((previous / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise checkpoint.CheckpointError(f"cannot read checkpoint {previous}: {exc}") from None
    if cfg.run.steps < at:
        raise ZotuneError(f"cannot resume {out} with --steps {cfg.run.steps}: the run is at step {at}; "
                          f"--steps is the total number of steps, not the number to add: pass "
                          f"--steps {at + 1} or more to continue it")


def _finish(out, cfg, state, opt, task, scorer, data, params, start_time, status, final_eval) -> dict:
    from .report import plot_curves

    state.wall_time = time.perf_counter() - start_time
    test = None
    if final_eval and (out / "best").exists() and ranks.current().is_writer:
        checkpoint.load(out / "best", params, getattr(opt.engine, "checkpoint_groups", lambda _: ())(params))
        prog.phase(f"test evaluation of the best-dev parameters (step {state.best_step}) on "
                   f"{len(data.test)} examples")
        test = evaluate(scorer, task, data.test, cfg.data.eval_batch_size, desc="test")
        _log(out / "metrics.jsonl", {"step": state.best_step, "test": test, "best_dev_checkpoint": True})
    summary = {"task": task.name, "model": cfg.model.name, "method": cfg.method.name,
               "direction": opt.direction.name, "trainable": cfg.model.trainable,
               "metric": task.metric, "status": status,
               "zero_shot": state.zero_shot, "best_dev": state.best_dev, "best_step": state.best_step,
               "final_dev": state.last_dev, "test": test, "steps": state.step,
               "wall_time_s": state.wall_time, "forward_passes": opt.forward_passes,
               "random_numbers": opt.engine.numbers_drawn, "skipped_steps": opt.skipped_steps, "peak_rss_gib": _peak_rss_gib(),
               "train_examples": len(data.train), "dev_examples": len(_dev_set(cfg, data)),
               "test_examples": len(data.test), "skipped_rows": data.skipped_rows, "notes": data.notes}
    if hasattr(opt.engine, "timing"):  # offload: per-step transfer and compute, what bounds it
        from .engines.offload import throughput

        summary["offload"] = throughput(opt.engine.timing)
    _write_json(out / "summary.json", summary)
    if ranks.current().is_writer:
        plot_curves(out / "metrics.jsonl", out / "curves.png",
                    title=f"{task.name} / {cfg.model.name} / {cfg.method.name}")
    return summary


def _dev_set(cfg: TrainConfig, data):
    """The dev examples a run evaluates (``--eval-dev N``: the first N)."""
    return data.dev[: cfg.data.eval_dev] if cfg.data.eval_dev else data.dev


def _log(path: Path, record: dict) -> None:
    if not ranks.current().is_writer:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed, and the test line of an
    earlier completion (they will be written again)."""
    if not path.exists() or not ranks.current().is_writer:
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
            and not json.loads(line).get("best_dev_checkpoint")]
    path.write_text("".join(line + "\n" for line in keep))
