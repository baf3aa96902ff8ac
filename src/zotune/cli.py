"""The ``zotune`` command: ``train``, ``eval`` and ``list``.

    zotune train --task sst2 --method mezo --steps 1000 --output-dir runs/sst2
    zotune train --config run.yaml --lr 1e-5          # flags override the YAML file
    zotune train --output-dir runs/sst2 --resume      # continue exactly where it stopped
    zotune eval  --task sst2 --checkpoint runs/sst2
    zotune list

Every user mistake ends with one line ``zotune: error: ...`` and exit code 2 (set ZOTUNE_DEBUG=1
for the traceback); Ctrl-C saves a checkpoint and exits with 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .errors import ZotuneError

HELP = {
    "task": "task name (see `zotune list`)", "task_file": "custom task spec (YAML/JSON) instead of --task",
    "model": "embedded model name, local directory or Hugging Face id",
    "method": "ZO method", "direction": "random direction distribution (default: the method's own)",
    "trainable": "which parameters to train", "pattern": "regex of parameter names (--trainable pattern)",
    "steps": "training steps", "batch_size": "examples per step", "lr": "learning rate (default by scheme)",
    "eps": "perturbation scale (default by scheme)", "num_probes": "directions per step (n-SPSA)",
    "defer_update": "fuse each update into the next perturbation (2 parameter sweeps per step)",
    "objective": "training loss; auto = the task's own", "eval_every": "dev evaluation interval (steps)",
    "eval_dev": "evaluate on only the first N dev examples during training",
    "data_dir": "GLUE/SuperGLUE files in their official layout (default: $ZOTUNE_DATA)",
    "data_seed": "seed of MeZO's data sampling", "seed": "run seed (directions and batch order)",
    "output_dir": "run directory", "max_time": "stop (with a checkpoint) after this many seconds",
    "dtype": "parameter dtype (bf16/fp16 keep an fp32 master copy)",
    "device": "auto (GPU if available), cpu, cuda or cuda:N",
    "estimator": "override the method's estimator: spsa or kernel (KerZOO)",
    "update": "override the method's update rule: sgd, momentum, adam, sign or agd",
    "projection": "override the method's projection: none, dizo or dizo-fo",
    "clip_norm": "per-tensor norm clip of the ZO gradient",
    "pool_size": "numbers in the pool of pooled/pezo-pool directions",
    "pezo_bits": "PeZO: bits of the uniform numbers, 1-16 (0: float)",
    "pezo_scaling": "PeZO: norm_per_tensor, norm_global, static or none (the bank: static or none)",
    "pezo_pow2": "PeZO: round the scale to a power of two",
    "pezo_decorrelate_copies": "PeZO pool: shift each copy of the pool per probe (not in the paper)",
    "pezo_lanes": "PeZO bank: generators", "pezo_reuse": "PeZO bank: numbers reused per cycle",
    "kernel_order": "KerZOO kernel order: 1, 3 or 5", "kernel_schedule": "constant, linear or harmonic",
    "kernel_r_sharing": "probe (paper) or tensor (code)", "kernel_normalization": "paper or code",
    "kernel_s0": "initial half-width of r's interval", "kernel_shrink_steps": "steps of the linear shrink",
    "dizo_interval": "DiZO: steps between projections", "dizo_iterations": "DiZO: search iterations",
    "dizo_eps": "DiZO: perturbation of the per-layer norms", "dizo_step_size": "DiZO: search step size",
    "dizo_clip": "DiZO: ratio range 1 +- clip", "dizo_pattern": "DiZO: regex of projected tensors",
}


def _field_type(field: dataclasses.Field):
    ann = str(field.type)
    if ann in ("bool", "bool | None"):
        return bool
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if ann.startswith(name):
            return typ
    raise TypeError(f"unsupported config field type {ann}")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = _field_type(f)
        help_text = HELP.get(f.name, "") + f" (default: {f.default})"
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help_text,
                                metavar=f.name.upper())


def load_config(path: str | None, overrides: dict):
    """TrainConfig from an optional YAML file, overridden by explicit flags."""
    import yaml

    from .train import TrainConfig

    values: dict = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ZotuneError(f"cannot read config {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ZotuneError(f"config {path} must be a mapping of settings")
        values = {k.replace("-", "_"): v for k, v in loaded.items()}
        valid = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ZotuneError(f"unknown setting(s) in {path}: {', '.join(unknown)}; valid settings: "
                              + ", ".join(sorted(valid)))
    values.update(overrides)
    return TrainConfig(**values)


def cmd_train(args) -> int:
    from .train import train

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "quiet", "func")}
    cfg = load_config(args.config, overrides)
    if args.resume and args.config is None and "output_dir" in overrides:
        saved = Path(cfg.output_dir) / "config.json"
        if saved.exists():  # resume with the run's own settings, flags still override
            base = json.loads(saved.read_text())
            base.update(overrides)
            cfg = load_config(None, base)
    summary = train(cfg, resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: summary[k] for k in ("task", "status", "zero_shot", "best_dev", "best_step",
                                              "test", "steps", "wall_time_s")}))
    return 0


def cmd_eval(args) -> int:
    from . import checkpoint
    from .train import TrainConfig, build, evaluate, load_task

    cfg = TrainConfig()
    run = Path(args.checkpoint) if args.checkpoint else None
    if run is not None:
        saved = run / "config.json"
        if not saved.exists():
            raise ZotuneError(f"{run} is not a zotune run directory (no config.json)")
        cfg = load_config(None, json.loads(saved.read_text()))
    for key in ("task", "task_file", "model", "data_dir"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    task = load_task(cfg)
    data = task.load(cfg.data_dir, num_train=cfg.num_train, num_dev=cfg.num_dev,
                     num_test=args.num_test or cfg.num_test, seed=cfg.data_seed)
    model, _, scorer, params = build(cfg.resolved(), task)
    source = "zero-shot"
    if run is not None:
        path = run / "best" if args.which == "best" else checkpoint.latest(run)
        if path is None or not path.exists():
            raise ZotuneError(f"{run} has no {args.which} checkpoint")
        checkpoint.load(path, params)
        source = str(path)
    examples = data.test if args.split == "test" else data.dev
    value = evaluate(scorer, task, examples, args.eval_batch_size)
    print(json.dumps({"task": task.name, "split": args.split, "metric": task.metric, "value": value,
                      "examples": len(examples), "parameters": source}))
    return 0


def cmd_list(args) -> int:
    from .directions import DIRECTIONS
    from .models import EMBEDDED
    from .optim import METHODS
    from .tasks import list_tasks
    from .train import OBJECTIVES, TRAINABLE

    print("models:     " + ", ".join(EMBEDDED) + " (embedded); any Hugging Face causal LM by id or local path")
    print("tasks:      " + ", ".join(list_tasks()) + " (or --task-file for your own JSONL task)")
    print("methods:    " + ", ".join(METHODS))
    print("directions: " + ", ".join(sorted(DIRECTIONS)))
    print("trainable:  " + ", ".join(TRAINABLE))
    print("objectives: " + ", ".join(OBJECTIVES))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="zotune", description="Zeroth-order fine-tuning from forward passes.")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune a model on a task")
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a run's best (or latest) parameters, or zero-shot")
    p.add_argument("--task")
    p.add_argument("--task-file")
    p.add_argument("--checkpoint", help="run directory written by `zotune train`")
    p.add_argument("--which", choices=("best", "latest"), default="best")
    p.add_argument("--model")
    p.add_argument("--data-dir")
    p.add_argument("--split", choices=("test", "dev"), default="test")
    p.add_argument("--num-test", type=int)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("list", help="models, tasks, methods, directions")
    p.set_defaults(func=cmd_list)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("zotune: interrupted; the last checkpoint is saved, continue with --resume", file=sys.stderr)
        return 130
    except (ZotuneError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("ZOTUNE_DEBUG"):
            raise
        print(f"zotune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
