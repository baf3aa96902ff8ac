"""``zotune eval`` for image runs: the test accuracy of a run's latest checkpoint (or of the
seeded initialisation, zero-shot).

An image run (``train_images.py``) has no dev split and selects nothing, so it keeps no ``best``
checkpoint: ``--which best`` means the latest one there, and ``--split dev`` is refused. The
method's trainer is rebuilt and restored from the checkpoint exactly as a resume does, because
some trainers (ElasticZO-INT8) keep their weights in the trainer state rather than in the model.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import checkpoint
from .errors import ZotuneError
from .tasks.images import IMAGE_TASKS


def evaluate_image_run(cfg, run: Path | None, *, which: str, split: str, num_test: int | None,
                       eval_batch_size: int) -> dict:
    """Test accuracy (%) of the image run in ``run`` (its latest checkpoint), or of the model
    initialised from the config's seed when ``run`` is None. Returns the JSON line's fields."""
    from .train_images import accuracy, seeded_model, trainer_for, with_defaults

    if split != "test":
        raise ZotuneError(f"image task {cfg.data.task!r} has no {split!r} split; use --split test")
    cfg = with_defaults(cfg).resolved()
    d = cfg.data
    data = IMAGE_TASKS[d.task](d.data_dir)
    model = seeded_model(cfg, data)  # the run's initialisation: the zero-shot point
    trainer = trainer_for(cfg, model)
    source = "initialisation"
    if run is not None:
        if which == "best":
            print(f"note: image runs keep no best checkpoint (no dev split); evaluating {run}'s "
                  "latest", file=sys.stderr)
        path = checkpoint.latest(run)
        if path is None:
            raise ZotuneError(f"{run} has no checkpoint")
        _, trainer_state = checkpoint.load(path, dict(model.state_dict()))
        trainer.load_state_dict(trainer_state)
        source = str(path)
    n = len(data.test_images) if num_test is None else min(num_test, len(data.test_images))
    value = accuracy(trainer, data.test_images[:n], data.test_labels[:n], d.task, eval_batch_size,
                     "test")
    return {"task": d.task, "split": "test", "metric": "accuracy", "value": value, "examples": n,
            "parameters": source}


def print_image_eval(cfg, run, args) -> int:
    """The CLI's side: evaluate and print one JSON line."""
    print(json.dumps(evaluate_image_run(cfg, run, which=args.which, split=args.split,
                                        num_test=args.num_test,
                                        eval_batch_size=args.eval_batch_size)))
    return 0
