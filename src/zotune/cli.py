"""The ``zotune`` command: ``train``, ``eval`` and ``list``.

    zotune train --task sst2 --method mezo --steps 1000 --output-dir runs/sst2
    zotune train --config run.yaml --lr 1e-5          # flags override the YAML file
                                                      # (nested `method: {lr: ...}` or flat `lr: ...`)
    zotune train --output-dir runs/sst2 --resume      # continue exactly where it stopped
    zotune eval  --task sst2 --checkpoint runs/sst2
    zotune list
    zotune plan  --model opt-175b --gpus 8 --nvlink    # the distributed cost model's table

Every user mistake ends with one line ``zotune: error: ...`` and exit code 2 (set ZOTUNE_DEBUG=1
for the traceback); Ctrl-C (exit 130) and SIGTERM (exit 143) save a checkpoint after the current
step (a second one stops at once) and say what there is to resume.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .errors import ZotuneError


class _Parser(argparse.ArgumentParser):
    """argparse, with zotune's one-line errors, and negative numbers as values: argparse reads
    ``--lr -1e-5`` as two options (``-1e-5`` looks like one to it; only ``-1`` and ``-0.5`` do
    not), so a negative number after a flag that takes a value is joined to it (``--lr=-1e-5``)
    and reaches the setting's own check ("lr must be >= 0")."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else [str(a) for a in args]
        return super().parse_known_args(_join_negative_values(self, args), namespace)

    def error(self, message):
        self.exit(2, f"zotune: error: {message} (see `{self.prog} --help`)\n")


_NEGATIVE_NUMBER = re.compile(r"-(\d|\.\d|inf$|infinity$|nan$)", re.IGNORECASE)


def _value_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings of ``parser`` and its subcommands that take one value."""
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _value_flags(sub)
        elif action.option_strings and action.nargs is None:
            flags.update(action.option_strings)
    return flags


def _join_negative_values(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    flags, out, i = _value_flags(parser), [], 0
    while i < len(args):
        if args[i] == "--":
            out += args[i:]
            break
        if args[i] in flags and i + 1 < len(args) and _NEGATIVE_NUMBER.match(args[i + 1]):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def flag_help(leaf) -> str:
    """A setting's help: what it is, its valid values (from their registry), where it sits in a
    YAML file, and its default, once."""
    text = leaf.help
    if leaf.choices is not None:
        text += "; one of: " + ", ".join(map(str, leaf.choices))
    if leaf.default_text is not None:
        default = leaf.default_text
    elif leaf.kind is bool:
        default = "on" if leaf.default else "off"
    else:
        default = "unset" if leaf.default is None else leaf.default
    return f"{text} [{leaf.dotted}] (default: {default})".replace("%", "%%")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of TrainConfig (``--`` + its flat name), grouped by section. Values
    stay strings here: the config converts them as it converts YAML values (``--steps 1e3``)."""
    from .config import LEAVES, SECTIONS

    groups = {}
    for leaf in LEAVES:
        section = leaf.path[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(
                f"{section} settings (YAML: {section}: {{...}} or flat keys)",
                " ".join(SECTIONS[(section,)].__doc__.split("\n\n")[0].replace("``", "").split()))
        if leaf.kind is bool:
            groups[section].add_argument(leaf.flag, dest=leaf.flat, action=argparse.BooleanOptionalAction,
                                         default=argparse.SUPPRESS, help=flag_help(leaf))
        else:
            groups[section].add_argument(leaf.flag, dest=leaf.flat, default=argparse.SUPPRESS,
                                         help=flag_help(leaf), metavar=leaf.flat.upper())


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ZotuneError(f"cannot read config {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(loaded, dict):
        raise ZotuneError(f"config {path} must be a mapping of settings")
    return loaded


def load_config(path: str | None, overrides: dict):
    """TrainConfig from an optional YAML file (nested sections or flat keys), overridden by
    explicit flags (flat names)."""
    from .config import COMMAND_LINE, TrainConfig

    cfg = TrainConfig.from_dict(_read_yaml(path), source=path) if path else TrainConfig()
    return cfg.updated(overrides, source=COMMAND_LINE)


def _check_task_flags(task, cfg) -> None:
    """``--task`` names a built-in task; with a task file (``--task-file`` or a ``task_file``
    setting) it would be ignored, so it is an error."""
    if task is not None and cfg.data.task_file:
        raise ZotuneError(f"--task {task} and --task-file {cfg.data.task_file} both given; a task "
                          "file defines its own task: pass one of them")


def train_config(args):
    """The TrainConfig of ``zotune train``: --config's YAML, or with --resume and no --config the
    run's own config.json, overridden by the flags given."""
    from .config import COMMAND_LINE

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "quiet", "func")}
    cfg = load_config(args.config, overrides)
    if args.resume and args.config is None and "output_dir" in overrides:
        saved = Path(cfg.run.output_dir) / "config.json"
        if saved.exists():  # resume with the run's own settings (nested or flat), flags override
            cfg = _saved_config(saved).updated(overrides, source=COMMAND_LINE)
    _check_task_flags(overrides.get("task"), cfg)
    return cfg


def cmd_train(args) -> int:
    from .train import train

    summary = train(train_config(args), resume=args.resume, progress=not args.quiet)
    if summary is None:  # a rank other than 0 of a distributed run: rank 0 reports
        return 0
    print(json.dumps({k: summary[k] for k in ("task", "status", "zero_shot", "best_dev", "best_step",
                                              "test", "steps", "wall_time_s")}))
    return 0


def _saved_config(path: Path):
    """The config of a run directory: config.json, nested, or flat as older runs wrote it."""
    from .config import TrainConfig

    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ZotuneError(f"cannot read {path}: {exc}") from None
    return TrainConfig.from_dict(saved, source=str(path))


def cmd_eval(args) -> int:
    from . import checkpoint
    from .config import COMMAND_LINE
    from .train import TrainConfig, build, evaluate, load_task

    cfg = TrainConfig()
    run = Path(args.checkpoint) if args.checkpoint else None
    if run is not None:
        saved = run / "config.json"
        if not saved.exists():
            raise ZotuneError(f"{run} is not a zotune run directory (no config.json)")
        cfg = _saved_config(saved)
    given = {key: getattr(args, key) for key in ("task", "task_file", "model", "data_dir")
             if getattr(args, key) is not None}
    if args.skip_bad_rows:
        given["skip_bad_rows"] = True
    if args.task is not None and args.task_file is None:
        given["task_file"] = None  # --task names a built-in task instead of the run's task file
    cfg = cfg.updated(given, source=COMMAND_LINE)
    if args.task_file is not None:
        _check_task_flags(args.task, cfg)
    from .train_images import is_image_task
    if is_image_task(cfg):  # small networks: their own trainers and test set
        from .eval_images import print_image_eval
        return print_image_eval(cfg, run, args)
    task = load_task(cfg)
    d = cfg.data
    data = task.load(d.data_dir, num_train=d.num_train, num_dev=d.num_dev,
                     num_test=args.num_test or d.num_test, seed=d.data_seed,
                     skip_bad_rows=d.skip_bad_rows)
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
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
    from .config import OBJECTIVES, TRAINABLE
    from .directions import DIRECTIONS
    from .models import EMBEDDED
    from .optim import METHODS
    from .tasks import list_tasks

    print("models:     " + ", ".join(EMBEDDED) + " (embedded); any Hugging Face causal LM by id or local path")
    print("tasks:      " + ", ".join(list_tasks()) + " (or --task-file for your own JSONL task)")
    print("methods:    " + ", ".join(METHODS))
    from .image_trainers import TRAINERS
    from .models.vision import MODELS
    from .tasks.images import IMAGE_TASKS
    print("image tasks: " + ", ".join(IMAGE_TASKS) + "; models: " + ", ".join(MODELS) + "; methods: "
          + ", ".join(TRAINERS))
    print("directions: " + ", ".join(sorted(DIRECTIONS)))
    print("trainable:  " + ", ".join(TRAINABLE))
    print("objectives: " + ", ".join(OBJECTIVES))
    return 0


def parser() -> argparse.ArgumentParser:
    from . import __version__

    top = _Parser(prog="zotune", description="Zeroth-order fine-tuning from forward passes.")
    top.add_argument("--version", action="version", version=f"zotune {__version__}",
                     help="print the version and exit")
    sub = top.add_subparsers(dest="command", required=True, metavar="{train,eval,list,plan,rank}")
    p = sub.add_parser("train", help="fine-tune a model on a task",
                       description="Fine-tune a model on a task with a zeroth-order method; writes "
                       "config.json, metrics.jsonl, summary.json, curves.png, best/ and checkpoints/ "
                       "to --output-dir. --steps is the total number of steps, also with --resume.")
    p.add_argument("--config", help="YAML file of settings, nested by section or flat (flags "
                   "override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its "
                   "latest checkpoint, with its config.json (flags override it); --steps is the total")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a run's best (or latest) parameters, or zero-shot",
                       description="Evaluate a run's best (or latest) parameters, or the model "
                       "zero-shot when no --checkpoint is given; prints one JSON line.")
    p.add_argument("--checkpoint", metavar="RUN_DIR", help="run directory written by `zotune "
                   "train` (its config.json gives the task, model and data)")
    p.add_argument("--which", choices=("best", "latest"), default="best",
                   help="the best-dev parameters or the latest checkpoint (default: best)")
    p.add_argument("--task", help="built-in task, instead of the run's (see `zotune list`)")
    p.add_argument("--task-file", help="custom task spec (YAML/JSON; docs/tasks.md), instead of "
                   "the run's task")
    p.add_argument("--model", help="embedded model name, local model directory or Hugging Face "
                   "id (default: the run's; zero-shot: smollm2-135m)")
    p.add_argument("--data-dir", help="GLUE/SuperGLUE files in their official layout (default: "
                   "the run's, else $ZOTUNE_DATA)")
    p.add_argument("--split", choices=("test", "dev"), default="test",
                   help="the split to evaluate (default: test)")
    p.add_argument("--num-test", type=int, help="test examples (default: the run's num_test)")
    p.add_argument("--eval-batch-size", type=int, default=32,
                   help="examples per evaluation forward pass (default: 32)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip rows of the data files that cannot be used instead of stopping "
                   "(default: the run's setting)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("list", help="models, tasks, methods, directions",
                       description="List the embedded models, tasks, methods, directions, "
                       "trainable schemes and objectives.")
    p.set_defaults(func=cmd_list)
    from .distributed.plan_cli import add_parser as add_plan_parser  # the cost model of --parallel

    add_plan_parser(sub)

    from .ranking.cli import add_parser as add_rank_parser

    add_rank_parser(sub)
    return top


def _stopped_message(stop: KeyboardInterrupt) -> str:
    """What is true after Ctrl-C or SIGTERM: which checkpoint there is to resume from, if any
    (``zotune train`` sets ``checkpoint`` and ``saved`` on the exception)."""
    what = {"terminated": "terminated (SIGTERM)"}.get(getattr(stop, "status", None), "interrupted")
    if not hasattr(stop, "checkpoint"):
        return what
    path = stop.checkpoint
    if path is None:
        return (f"{what} before the first checkpoint: nothing was saved, so there is nothing to "
                "resume; run the command again (without --resume) to start over")
    run_dir = Path(path).parent.parent
    step = path.name.split("-")[-1].lstrip("0") or "0"
    if stop.saved:
        return (f"{what}; the checkpoint at step {step} is saved, continue with --resume "
                f"--output-dir {run_dir}")
    return (f"{what} at once, without saving; the last complete checkpoint (step {step}) is kept, "
            f"continue from it with --resume --output-dir {run_dir}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as stop:
        print(f"zotune: {_stopped_message(stop)}", file=sys.stderr)
        return getattr(stop, "exit_code", 130)
    except (ZotuneError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("ZOTUNE_DEBUG"):
            raise
        print(f"zotune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
