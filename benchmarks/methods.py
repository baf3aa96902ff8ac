"""MeZO, KerZOO, KerZOO-code, DiZO, PeZO and a composition, at one budget of forward passes.

For each (task, trainable scheme, seed, method): SmolLM2-135M with MeZO's prompt and data protocol,
the same batches (zotune.train.BatchSampler, same seed), the same lr and eps for every method, and
training until ``--budget`` forward passes have been spent (every forward counts: KerZOO-code's 6
per step, DiZO's search forwards). Test accuracy and test loss (MeZO's classification
cross-entropy of the gold candidate, from the same forward pass) on a fixed test subset every
``--eval-every`` forward passes. At small budgets accuracy on a few hundred examples moves by less
than its sampling error; the loss is the low-noise measure of progress. Each method's numbers of random numbers generated per step are read from the
engine's counter.

One JSON line per eval point is appended to ``--log`` (so runs can be split across invocations
and the table rebuilt with ``--from-log``); the summary table goes to docs/benchmarks.md and the
curves (accuracy against forward passes and against wall-clock, mean over seeds) to
docs/methods_<task>_<trainable>.png.

    python benchmarks/methods.py --data-dir ../shared/data --tasks sst2 --trainable full --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import write_section  # noqa: E402

from zotune import ZOOptimizer, rng  # noqa: E402
from zotune.models import load_model, select_trainable, trainable_parameters  # noqa: E402
from zotune.objectives import CandidateScorer  # noqa: E402
from zotune.tasks import get_task  # noqa: E402
from zotune.config import DEFAULT_EPS  # noqa: E402
from zotune.train import BatchSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "mezo": {"method": "mezo"},
    "kerzoo": {"method": "kerzoo"},
    "kerzoo-code": {"method": "kerzoo-code"},
    "dizo": {"method": "dizo"},
    "pezo": {"method": "pezo"},
    # The composition: KerZOO's estimator on PeZO's pool, with DiZO's projection.
    "kerzoo+pezo+dizo": {"method": "dizo", "kernel": {}, "direction": "pezo-pool"},
}
LR = {"full": 1e-5, "lora": 1e-4}


@torch.no_grad()
def test_metrics(scorer, examples, batch_size=32):
    """(accuracy in percent, mean cross-entropy of the gold candidate) in one pass over ``examples``."""
    correct, loss = 0, 0.0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        scores = scorer.scores(batch)
        labels = torch.tensor([ex.label for ex in batch], device=scores.device)
        correct += int((scores.argmax(-1) == labels).sum())
        loss += float(torch.nn.functional.cross_entropy(scores, labels, reduction="sum"))
    return 100 * correct / len(examples), loss / len(examples)


def run(args, task, data, test, trainable, seed, name, log):
    model, tok = load_model(args.model)
    model = select_trainable(model, trainable, seed=seed)
    model.eval()
    scorer = CandidateScorer(model, tok)
    params = trainable_parameters(model)
    lr = args.lr if args.lr is not None else LR[trainable]
    eps = args.eps if args.eps is not None else DEFAULT_EPS[trainable]
    opt = ZOOptimizer(params, lr=lr, eps=eps, seed=seed, defer_update=True, **METHODS[name])
    sampler = BatchSampler(len(data.train), args.batch_size, seed)
    if opt.projection is not None:
        search = BatchSampler(len(data.train), args.batch_size, rng.mix(seed, 0x53454152))
        its = opt.projection.iterations
        opt.search_closures = lambda step, j: (
            lambda b=[data.train[i] for i in search.indices(step * its + j)]: scorer.classification_loss(b))
    base = {"task": task.name, "trainable": trainable, "seed": seed, "method": name, "lr": lr, "eps": eps}
    train_s, step, next_eval = 0.0, 0, 0
    while True:
        if opt.forward_passes >= next_eval:
            opt.flush()
            acc, loss = test_metrics(scorer, test)
            rec = {**base, "forward_passes": opt.forward_passes, "steps": step, "train_s": train_s,
                   "test_acc": acc, "test_loss": loss,
                   "numbers_per_step": opt.engine.numbers_drawn / max(step, 1)}
            print(json.dumps(rec), flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
            next_eval += args.eval_every
        if opt.forward_passes >= args.budget:
            break
        batch = [data.train[i] for i in sampler.indices(step)]
        start = time.perf_counter()
        opt.step(lambda: scorer.classification_loss(batch))
        train_s += time.perf_counter() - start
        step += 1
    opt.engine.close()


def timing(args, data, trainable):
    """Step time of every method, side by side in one process on one batch (median of
    ``--timing-steps`` steps after one warm-up step), as a ratio to MeZO's and per forward pass."""
    model, tok = load_model(args.model)
    model = select_trainable(model, trainable, seed=0)
    model.eval()
    scorer = CandidateScorer(model, tok)
    params = trainable_parameters(model)
    batch = data.train[: args.batch_size]
    rows = []
    for name in args.methods:
        opt = ZOOptimizer(params, lr=0.0, eps=1e-3, seed=0, defer_update=True, **METHODS[name])
        times = []
        for i in range(args.timing_steps + 1):
            start = time.perf_counter()
            fp0 = opt.forward_passes
            opt.step(lambda: scorer.classification_loss(batch))
            if i:
                times.append((time.perf_counter() - start, opt.forward_passes - fp0))
        opt.flush()
        opt.engine.close()
        step_s = statistics.median(t for t, _ in times)
        rows.append({"timing": name, "trainable": trainable, "step_s": step_s,
                     "forwards_per_step": statistics.mean(f for _, f in times),
                     "numbers_per_step": opt.engine.numbers_drawn / (args.timing_steps + 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _mean_loss(recs):
    losses = [r["test_loss"] for r in recs if r.get("test_loss") is not None]
    return statistics.mean(losses) if len(losses) == len(recs) else None


def summarise(records, args):
    """Table rows and curves per (task, trainable): mean over seeds at each eval point.

    "To MeZO's final" is the first eval point whose seed-mean reaches MeZO's final seed-mean
    (accuracy at least as high, loss at least as low), as forward passes / training seconds.
    """
    groups: dict = {}
    for r in records:
        groups.setdefault((r["task"], r["trainable"]), {}).setdefault(r["method"], []).append(r)
    sections = []
    for (task, trainable), methods in groups.items():
        curves = {}
        for name, recs in methods.items():
            by_fp: dict = {}
            for r in recs:
                by_fp.setdefault(r["forward_passes"] // args.eval_every * args.eval_every, []).append(r)
            curves[name] = [{"fp": fp, "acc": statistics.mean(r["test_acc"] for r in rs),
                             "loss": _mean_loss(rs), "s": statistics.mean(r["train_s"] for r in rs),
                             "recs": rs} for fp, rs in sorted(by_fp.items())]
        mezo = curves.get("mezo")
        target_acc = mezo[-1]["acc"] if mezo and mezo[-1]["acc"] > mezo[0]["acc"] else None
        target_loss = mezo[-1]["loss"] if mezo and mezo[-1]["loss"] is not None else None

        def reach(pts, key, target, better):
            if target is None:
                return "n/a"
            hit = next((p for p in pts if p[key] is not None and better(p[key], target)), None)
            return f"{hit['fp']} / {hit['s']:.0f}" if hit else "not reached"

        rows = ["| method | seeds | final test acc (mean; per seed) | final test loss (mean; per seed) | "
                "to MeZO's final acc (forward passes / s) | to MeZO's final loss (forward passes / s) | "
                "train s per forward pass | random numbers per step |",
                "|---|---|---|---|---|---|---|---|"]
        for name, pts in curves.items():
            final = pts[-1]
            recs = sorted(final["recs"], key=lambda r: r["seed"])
            accs = ", ".join(f"{r['test_acc']:.1f}" for r in recs)
            loss = (f"{final['loss']:.4f} (" + ", ".join(f"{r['test_loss']:.4f}" for r in recs) + ")"
                    if final["loss"] is not None else "n/a")
            numbers = statistics.mean(r["numbers_per_step"] for r in recs)
            rows.append(f"| {name} | {len(recs)} | {final['acc']:.1f} ({accs}) | {loss} | "
                        f"{reach(pts, 'acc', target_acc, lambda v, t: v >= t)} | "
                        f"{reach(pts, 'loss', target_loss, lambda v, t: v <= t)} | "
                        f"{final['s'] / (final['fp'] or 1):.2f} | {numbers:.3g} |")
        png = f"methods_{task}_{trainable}.png"
        plot(curves, ROOT / "docs" / png, f"{task}, {trainable}, SmolLM2-135M")
        sections.append(f"### {task}, {trainable}\n\n" + "\n".join(rows) + f"\n\n![{task} {trainable}]({png})\n")
    return sections


def timing_table(rows):
    if not rows:
        return ""
    mezo = next((r["step_s"] for r in rows if r["timing"] == "mezo"), None)
    out = ["\n### Step time, side by side (`--timing-steps`)\n",
           "| method | s per step | ratio to MeZO's step | forward passes per step | s per forward pass "
           "| random numbers per step |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['step_s'] / mezo:.2f}" if mezo else ""
        out.append(f"| {r['timing']} ({r['trainable']}) | {r['step_s']:.2f} | {ratio} | "
                   f"{r['forwards_per_step']:.0f} | {r['step_s'] / r['forwards_per_step']:.2f} | "
                   f"{r['numbers_per_step']:.3g} |")
    return "\n".join(out) + "\n\nDiZO's search (20 forward passes every 50 steps) is not in the step time.\n"


def plot(curves, path, title):
    """Test accuracy (top) and test loss (bottom) against forward passes and wall-clock."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col", sharey="row")
    for name, pts in curves.items():
        for col, x in enumerate(("fp", "s")):
            axes[0, col].plot([p[x] for p in pts], [p["acc"] for p in pts], marker="o", markersize=3,
                              label=name)
            with_loss = [p for p in pts if p["loss"] is not None]
            axes[1, col].plot([p[x] for p in with_loss], [p["loss"] for p in with_loss], marker="o",
                              markersize=3, label=name)
    axes[0, 0].set(ylabel="test accuracy (%, mean over seeds)", title=title)
    axes[1, 0].set(xlabel="forward passes", ylabel="test loss (CE, mean over seeds)")
    axes[1, 1].set(xlabel="training wall-clock (s)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=os.environ.get("ZOTUNE_DATA"))
    p.add_argument("--tasks", nargs="*", default=["sst2", "rte"])
    p.add_argument("--trainable", nargs="*", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--budget", type=int, default=1000, help="forward passes per run")
    p.add_argument("--eval-every", type=int, default=100, help="forward passes between evaluations")
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float)
    p.add_argument("--eps", type=float)
    p.add_argument("--log", default="methods.jsonl")
    p.add_argument("--from-log", action="store_true", help="only rebuild the table and plots from --log")
    p.add_argument("--timing-steps", type=int, default=0,
                   help="also time each method's step side by side (DiZO's search excluded)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args()
    if not args.from_log:
        for task_name in args.tasks:
            task = get_task(task_name)
            data = task.load(args.data_dir, seed=0)
            test = data.test[: args.test_size]
            for trainable in args.trainable:
                for seed in args.seeds:
                    for name in args.methods:
                        run(args, task, data, test, trainable, seed, name, args.log)
    if args.timing_steps:
        data = get_task(args.tasks[0]).load(args.data_dir, seed=0)
        with open(args.log, "a") as f:
            for row in timing(args, data, args.trainable[0]):
                f.write(json.dumps(row) + "\n")
    records = [json.loads(line) for line in Path(args.log).read_text().splitlines() if line.strip()]
    timings = [r for r in records if "timing" in r]
    records = [r for r in records if "timing" not in r]
    cmd = "python benchmarks/methods.py " + " ".join(a for a in sys.argv[1:] if a != "--from-log")
    text = (f"## Methods at one forward-pass budget (`benchmarks/methods.py`)\n\nCommand: `{cmd.strip()}`\n\n"
            f"SmolLM2-135M, MeZO prompts and data protocol, batch {args.batch_size}, the same lr and eps "
            f"for every method, test accuracy and test loss on the first {args.test_size} test examples, "
            f"evaluated every {args.eval_every} forward passes. Wall-clock is training time only.\n\n"
            + "\n".join(summarise(records, args)) + timing_table(timings))
    write_section(Path(args.out), text, "methods")


if __name__ == "__main__":
    main()
