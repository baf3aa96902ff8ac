"""Do the CLI's defaults learn? One short run per task of ``zotune list`` with nothing but the task set.

For each task: the configuration ``zotune train --task T`` resolves to (method, lr, eps, probes,
direction, batch size, trainable scheme and model: all defaults; only ``--steps`` is short), the
recipe's own data, model, objective and optimizer (``zotune.train.load_data``, ``build``,
``objective_fn``, ``make_optimizer``) and its batches (``BatchSampler``, seed 0). On a fixed test sample, before and
after: the task's metric (accuracy, or F1 for SQuAD) and the training objective per example
(classification cross-entropy of the gold candidate; SQuAD: the gold answer's token
cross-entropy). The loss is the measure: the metric on a hundred examples moves by less than its
sampling error in a short run. A task *learns* when the mean per-example loss falls by more than
two standard errors of the paired differences (z = mean(after - before) / SE < -2) and by at least
1% of its value before (a consistent but negligible shift is not learning).

One JSON line per task is appended to ``--log`` (runs can be split; ``--from-log`` rebuilds the
table in docs/benchmarks.md).

A run longer than one sitting is split with ``--segment-s`` (or ``--segment-steps``): the segment
stops at a step boundary and saves the run's progress to ``--progress-dir`` as the losses of every
step, a few bytes per step, instead of the 0.5 GB of parameters. The same command continues it:
the saved steps are replayed (the same perturbations and updates, the logged losses in place of
the forward passes, so bitwise the uninterrupted run, checked by a parameter checksum) and the
run goes on. The progress file is small enough to commit between sittings.

    python benchmarks/defaults.py --data-dir ../shared/data --steps 40 --log benchmarks/logs/defaults.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import write_section  # noqa: E402

from zotune.config import DEFAULT_LR, TrainConfig  # noqa: E402
from zotune.feedback import Losses  # noqa: E402
from zotune.train import (BatchSampler, build, evaluate, load_data, load_task, make_optimizer,  # noqa: E402
                          objective_fn, objective_kind)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "squad"]
IMAGE_TASKS = ["fashion-mnist", "cifar10"]
SAVE_EVERY_S = 600  # a split run also saves its progress this often, so a killed segment loses little


@torch.no_grad()
def per_example_losses(loss_of, examples) -> list[float]:
    """The training objective of each example on its own (a batch of one)."""
    return [float(loss_of([ex])) for ex in examples]


@torch.no_grad()
def train_step(opt, objective, values=None) -> tuple[float, list[list[float]], int]:
    """One step through ask/tell: every query's points evaluated by the engine (the perturbation,
    the restore and a held update are the engine's, as in ``opt.step``). With ``values`` (a step
    recorded earlier, one list per query) the objective returns them instead of running forward
    passes: a replay, bitwise the recorded step. Returns the step's loss, its recorded losses and
    the forward passes it stands for."""
    recorded, passes = [], 0
    while (query := opt.ask()) is not None:
        if query.kind != "losses":
            raise SystemExit(f"defaults.py: the method asks for {query.kind!r}; only 'losses' steps "
                             "can be recorded and replayed")
        if values is None:
            losses = opt.evaluate(query, objective)
        else:
            given = iter(values[len(recorded)])
            losses = opt.evaluate(query, lambda g=given: torch.tensor(next(g)))
        recorded.append([float(v) for v in losses])
        passes += query.num_points
        opt.tell(Losses(recorded[-1]))
    return opt.core.last_result, recorded, passes


def checksum(params: dict) -> list[float]:
    """Sum and sum of squares of every trained tensor (float64): a replay that is not bitwise the
    recorded run shows here."""
    flat = [p.detach().double() for p in params.values()]
    return [float(sum(t.sum() for t in flat)), float(sum((t * t).sum() for t in flat))]


def progress_path(args, name: str) -> Path:
    """Where a split run of ``name`` with these arguments keeps its progress."""
    lr = "" if args.lr is None else f"-lr{args.lr:g}"
    return Path(args.progress_dir) / (f"{name}-{args.steps}steps-seed{args.seed}-{args.held_out}"
                                      f"-n{args.num_test}{lr}.json")


def run_task(args, name: str) -> dict | None:
    """One task's check; None when a segment stopped before the last step (progress saved)."""
    extra = {"lr": args.lr} if args.lr is not None else {}
    if args.model:
        extra["model"] = args.model
    cfg = TrainConfig.from_flat(task=name, data_dir=args.data_dir, steps=args.steps, seed=args.seed,
                                num_test=args.num_test, output_dir=os.devnull, **extra).resolved()
    d, m = cfg.data, cfg.method
    task = load_task(cfg)
    data = load_data(cfg, task)
    model, _, scorer, params = build(cfg, task)
    loss_of = objective_fn(cfg, task, scorer)
    if args.backprop is not None:
        return backprop_row(args, name, cfg, task, data, scorer, loss_of, params)
    opt = make_optimizer(cfg, model, params)
    test = held_out(args, data)
    saved_at = progress_path(args, name)
    settings = {"model": cfg.model.name, "method": m.name, "lr": m.lr, "eps": m.eps,
                "num_probes": m.num_probes or 1, "batch_size": d.batch_size}
    if saved_at.exists():
        saved = json.loads(saved_at.read_text())
        if saved["settings"] != settings:
            raise SystemExit(f"defaults.py: {saved_at} was recorded with {saved['settings']}, this run "
                             f"has {settings}; delete it to start over")
        for values in saved["losses"]:
            train_step(opt, None, values)
        opt.flush()
        if checksum(params) != saved["checksum"]:
            raise SystemExit(f"defaults.py: replaying {saved_at} did not reproduce its parameters "
                             f"({checksum(params)} != {saved['checksum']}); delete it to start over")
        print(f"{name}: replayed {len(saved['losses'])} steps from {saved_at}", flush=True)
    else:
        before, metric = held_out_check(cfg, task, scorer, loss_of, test)
        saved = {"settings": settings, "losses": [], "train_losses": [], "forward_passes": 0,
                 "train_s": 0.0, "loss_before": before, "metric_before": metric}
    sampler = BatchSampler(len(data.train), d.batch_size, cfg.run.seed)
    start, done_before, train_s_before = time.perf_counter(), len(saved["losses"]), saved["train_s"]
    last_save = start

    def save():
        # flush is exact (it applies the held update the next move would have fused), so saving
        # mid-run leaves the trajectory bitwise unchanged
        opt.flush()
        saved.update(checksum=checksum(params), train_s=train_s_before + time.perf_counter() - start)
        saved_at.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved_at.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved))
        tmp.replace(saved_at)  # a run killed while saving keeps the previous progress

    for step in range(done_before, args.steps):
        now = time.perf_counter()
        if step > done_before and ((args.segment_s and now - start >= args.segment_s)
                                   or (args.segment_steps and step - done_before >= args.segment_steps)):
            save()
            print(f"{name}: stopped after {step} of {args.steps} steps; progress in {saved_at}", flush=True)
            return None
        if step > done_before and args.segment_s and now - last_save >= SAVE_EVERY_S:
            save()
            last_save = now
        batch = [data.train[i] for i in sampler.indices(step)]
        loss, recorded, passes = train_step(opt, lambda b=batch: loss_of(b))
        saved["losses"].append(recorded)
        saved["train_losses"].append(float(loss))
        saved["forward_passes"] += passes
    opt.flush()
    row = {"method": m.name, "direction": m.direction_name(), "lr": m.lr, "eps": m.eps,
           "num_probes": m.num_probes or 1, "forward_passes": saved["forward_passes"],
           "skipped_steps": opt.skipped_steps}
    return finish_row(args, name, cfg, task, data, scorer, loss_of, saved,
                      train_s_before + time.perf_counter() - start, row)


def held_out(args, data) -> list:
    # Dev is held out from these runs as test is (nothing selects on it), so a task whose test
    # split is small (CB 56, WSC 104) can be checked on both.
    return data.test + (data.dev if args.held_out == "test+dev" else [])


@torch.no_grad()
def held_out_check(cfg, task, scorer, loss_of, test) -> tuple[list[float], float]:
    """Each held-out example's training loss, and the task's metric on them."""
    return per_example_losses(loss_of, test), evaluate(scorer, task, test, cfg.data.eval_batch_size)


def backprop_row(args, name, cfg, task, data, scorer, loss_of, params) -> dict:
    """The reference a ZO default is judged against: Adam at lr ``args.backprop`` on the gradient
    of the same objective, same batches and steps, same parameters trained (``args.micro_batch``:
    each batch's gradient accumulated over that many examples at a time). A task this does not
    move in N steps cannot be expected to learn from N ZO steps either (a ZO step estimates the
    gradient's projection on one direction, d times noisier). Not split into segments."""
    if args.segment_s or args.segment_steps:
        raise SystemExit("defaults.py: a --backprop run is not split into segments; drop --segment-s/--segment-steps")
    kind = objective_kind(cfg, task)
    if args.micro_batch and kind != "classification":
        # answer_lm averages over the batch's gold tokens, not its examples: equal weights per
        # micro-batch would change the gradient
        raise SystemExit(f"defaults.py: --micro-batch needs an objective that is a mean over examples "
                         f"(classification); {name}'s is {kind!r}")
    test = held_out(args, data)
    before, metric = held_out_check(cfg, task, scorer, loss_of, test)
    saved = {"train_losses": [], "loss_before": before, "metric_before": metric}
    for p in params.values():
        p.requires_grad_(True)
    adam = torch.optim.Adam(params.values(), lr=args.backprop)
    sampler = BatchSampler(len(data.train), cfg.data.batch_size, cfg.run.seed)
    micro = args.micro_batch or cfg.data.batch_size
    start = time.perf_counter()
    for step in range(args.steps):
        batch = [data.train[i] for i in sampler.indices(step)]
        adam.zero_grad(set_to_none=True)
        loss = 0.0
        for at in range(0, len(batch), micro):
            # the batch mean as a weighted sum of micro-batch means: the same gradient, in the
            # activation memory of `micro` examples
            part = batch[at:at + micro]
            share = loss_of(part) * (len(part) / len(batch))
            share.backward()
            loss += float(share.detach())
        adam.step()
        saved["train_losses"].append(loss)
    train_s = time.perf_counter() - start
    for p in params.values():
        p.requires_grad_(False)
    row = {"method": "backprop-adam", "direction": None, "lr": args.backprop, "eps": None,
           "num_probes": None, "forward_passes": args.steps, "skipped_steps": 0, "micro_batch": micro}
    return finish_row(args, name, cfg, task, data, scorer, loss_of, saved, train_s, row)


def finish_row(args, name, cfg, task, data, scorer, loss_of, saved, train_s, row) -> dict:
    """The held-out check after training and the log row (``row``: what the training was)."""
    test = held_out(args, data)
    before_loss, before_metric, train_losses = saved["loss_before"], saved["metric_before"], saved["train_losses"]
    after_loss, after_metric = held_out_check(cfg, task, scorer, loss_of, test)
    diffs = [a - b for a, b in zip(after_loss, before_loss)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"task": name, "metric": task.metric, **row, "trainable": cfg.model.trainable,
            "batch_size": cfg.data.batch_size, "seed": cfg.run.seed, "steps": args.steps,
            "train_examples": len(data.train), "test_examples": len(test), "held_out": args.held_out,
            "loss_before": statistics.fmean(before_loss),
            "loss_after": statistics.fmean(after_loss), "loss_change": statistics.fmean(diffs),
            "loss_change_se": se, "z": statistics.fmean(diffs) / se if se > 0 else float("nan"),
            "metric_before": before_metric, "metric_after": after_metric,
            "train_loss_first": statistics.fmean(train_losses[:5]),
            "train_loss_last": statistics.fmean(train_losses[-5:]), "train_s": train_s,
            "loadavg": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_image_task(args, name: str) -> dict:
    """An image task through ``zotune train`` itself (its recipe has no per-example loss): test
    accuracy on the whole test set at the initialisation and after, z from the two proportions."""
    import tempfile

    from zotune.train import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_flat(task=name, data_dir=args.data_dir, steps=args.image_steps,
                                    seed=args.seed, output_dir=f"{tmp}/run")
        start = time.perf_counter()
        s = train(cfg, progress=False)
        train_s = time.perf_counter() - start
        saved = json.loads((Path(tmp) / "run" / "config.json").read_text())
    before, after = s["zero_shot"]["test"] / 100, s["test"] / 100
    n = 10_000  # the test sets of Fashion-MNIST and CIFAR-10
    se = math.sqrt(before * (1 - before) / n + after * (1 - after) / n)
    return {"task": name, "metric": "accuracy", "method": saved.get("method", "mezo"),
            "model": saved.get("model"), "lr": saved.get("lr"), "eps": saved.get("eps"),
            "batch_size": saved.get("batch_size", 16), "seed": args.seed, "steps": args.image_steps,
            "test_examples": n, "metric_before": 100 * before, "metric_after": 100 * after,
            "z": (after - before) / se, "train_s": train_s, "loadavg": os.getloadavg()[0],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def learns(r: dict) -> bool:
    return r["z"] < -2 and r["loss_change"] <= -0.01 * r["loss_before"]


def write_table(rows: list[dict], args) -> None:
    images = [r for r in rows if r["task"] in IMAGE_TASKS]
    rows = [r for r in rows if r["task"] not in IMAGE_TASKS]
    if not rows:
        return
    r0 = next((r for r in rows if r["method"] != "backprop-adam"), rows[0])
    lines = [
        "## Do the CLI's defaults learn? (`benchmarks/defaults.py`, issue 16)",
        "",
        "Command: `python benchmarks/defaults.py --data-dir ../shared/data --steps N --tasks T "
        "--log benchmarks/logs/defaults.jsonl` (N: the steps column; `benchmarks/logs/run_defaults.sh` "
        "runs one task per invocation and commits the log; the table from `--from-log`; a run longer "
        "than one sitting takes `--segment-s S` and the same command continues it from "
        "`benchmarks/logs/defaults_progress/`)",
        "",
        "`zotune train --task T --steps N` with every other setting at its default: "
        f"SmolLM2-135M, method {r0['method']} ({r0['direction']} directions, {r0['num_probes']} probe), "
        f"{r0['trainable']} parameters, lr {DEFAULT_LR[r0['trainable']]:g} (a row at another lr is a "
        f"diagnostic, marked), eps {r0['eps']:g}, batch {r0['batch_size']}, "
        "seed 0 (a row at another seed is marked; a row marked backprop is the reference, Adam on the "
        "gradient of the same objective, batches and parameters: `--backprop LR`); MeZO's data protocol. Loss: the training objective per held-out example "
        "(the test sample; marked test+dev: it and the dev split, which these runs do not use either), "
        "before and after; z: the mean change over its standard error (paired over the examples); "
        "a task learns when z < -2 and the loss falls by at least 1%. The metric (accuracy; SQuAD: F1) is shown beside it; on this "
        "many examples it moves by less than its sampling error.",
        "",
        "| task | steps | train examples | held-out examples | loss before | loss after | change (SE) | z | learns | metric before | metric after | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {t: i for i, t in enumerate(TASKS)}
    for r in sorted(rows, key=lambda r: (order.get(r["task"], 99), r["steps"], r["seed"])):
        if r["method"] == "backprop-adam":
            lr = f" (backprop, Adam lr {r['lr']:g})"
        else:
            lr = "" if r["lr"] == DEFAULT_LR[r["trainable"]] else f" (lr {r['lr']:g})"
        lr += "" if r["seed"] == 0 else f" (seed {r['seed']})"
        dev = " (test+dev)" if r.get("held_out") == "test+dev" else ""
        lines.append(f"| {r['task']}{lr} | {r['steps']} | {r['train_examples']} | {r['test_examples']}{dev} | {r['loss_before']:.4f} | {r['loss_after']:.4f} "
                     f"| {r['loss_change']:+.4f} ({r['loss_change_se']:.4f}) | {r['z']:+.1f} "
                     f"| {'yes' if learns(r) else 'no'} | {r['metric_before']:.1f} | {r['metric_after']:.1f} "
                     f"| {r['train_s']:.0f} |")
    if images:
        lines += ["", "Image tasks (`zotune train --task T --steps N`, every other setting at its default, "
                  "through the recipe itself): test accuracy on the 10,000 test images at the "
                  "initialisation and after; z: the change over the standard error of the two "
                  "proportions; learns when z > 2.", "",
                  "| task | model | method | lr | eps | steps | accuracy before | accuracy after | z | learns | train s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in images:
            lines.append(f"| {r['task']} | {r['model']} | {r['method']} | {r['lr']:g} | {r['eps']:g} | {r['steps']} "
                         f"| {r['metric_before']:.2f} | {r['metric_after']:.2f} | {r['z']:+.1f} "
                         f"| {'yes' if r['z'] > 2 else 'no'} | {r['train_s']:.0f} |")
    missing = [t for t in TASKS if t not in {r["task"] for r in rows}]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    lines += ["", "cifar10: no copy of CIFAR-10 here (`../shared/data` has none), so not measured."]
    write_section(Path(args.out), "\n".join(lines) + "\n", "defaults")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("ZOTUNE_DATA"))
    p.add_argument("--tasks", nargs="*", default=TASKS + IMAGE_TASKS[:1], choices=TASKS + IMAGE_TASKS)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--image-steps", type=int, default=1000, help="steps of an image task (the CLI's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="a diagnostic run away from the default lr (its rows are marked)")
    p.add_argument("--backprop", type=float, metavar="LR",
                   help="a reference row: Adam at LR on the objective's gradient instead of the ZO default")
    p.add_argument("--micro-batch", type=int, metavar="K",
                   help="--backprop only: accumulate each batch's gradient over K examples at a time "
                        "(the same gradient in less activation memory)")
    p.add_argument("--num-test", type=int, default=100)
    p.add_argument("--held-out", choices=["test", "test+dev"], default="test",
                   help="the examples the loss is checked on: the test sample, or it and the dev split")
    p.add_argument("--model", help="a local model directory instead of the CLI's default (tests: a tiny one)")
    p.add_argument("--segment-s", type=float, help="stop after this many seconds of training, saving progress")
    p.add_argument("--segment-steps", type=int, help="stop after this many steps, saving progress")
    p.add_argument("--progress-dir", default=str(ROOT / "benchmarks" / "logs" / "defaults_progress"))
    p.add_argument("--log", default=str(ROOT / "benchmarks" / "logs" / "defaults.jsonl"))
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--from-log", action="store_true", help="only rebuild the table from --log")
    args = p.parse_args()
    if args.micro_batch is not None and (args.backprop is None or args.micro_batch < 1):
        p.error(f"--micro-batch {args.micro_batch}: a positive number of examples, for --backprop runs only")
    if not args.from_log:
        for name in args.tasks:
            row = run_image_task(args, name) if name in IMAGE_TASKS else run_task(args, name)
            if row is None:  # a segment stopped; the same command continues it
                continue
            print(json.dumps(row), flush=True)
            with open(args.log, "a") as f:
                f.write(json.dumps(row) + "\n")
            if name not in IMAGE_TASKS:  # the row holds all of it now
                progress_path(args, name).unlink(missing_ok=True)
    log = Path(args.log)
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    write_table(rows, args)


if __name__ == "__main__":
    main()
