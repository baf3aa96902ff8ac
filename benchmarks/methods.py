"""MeZO, FZOO, FZOO-code, KerZOO, KerZOO-code, DiZO, PeZO and a composition, at one budget of
forward passes.

For each (task, trainable scheme, seed, method): SmolLM2-135M with MeZO's prompt and data protocol,
the same batches (zotune.train.BatchSampler, same seed), the same eps for every method, MeZO's lr
for the methods that share MeZO's step and FZOO's own (its step is normalised, so its lr is a step
length: ``--lr-for``), and training until ``--budget`` forward passes have been spent (every
forward counts: FZOO's N + 1 per step, KerZOO-code's 6, DiZO's search forwards). Test accuracy and test loss (MeZO's classification
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
import math
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
from zotune.config import default_lr as config_default_lr  # noqa: E402
from zotune.train import BatchSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "mezo": {"method": "mezo"},
    "kerzoo": {"method": "kerzoo"},
    "kerzoo-code": {"method": "kerzoo-code"},
    "dizo": {"method": "dizo"},
    "pezo": {"method": "pezo"},
    "fzoo": {"method": "fzoo"},
    "fzoo-code": {"method": "fzoo-code"},
    # The composition: KerZOO's estimator on PeZO's pool, with DiZO's projection.
    "kerzoo+pezo+dizo": {"method": "dizo", "kernel": {}, "direction": "pezo-pool"},
}


def default_lr(name: str, trainable: str, eps: float) -> float:
    """The CLI's default lr of a benchmark method (its preset's: ``zotune.config.default_lr``)."""
    spec = METHODS[name]
    return config_default_lr(spec["method"], trainable, eps, kernel=spec.get("kernel"))


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
    eps = args.eps if args.eps is not None else DEFAULT_EPS[trainable]
    lr = args.lr_for.get(name, args.lr if args.lr is not None else default_lr(name, trainable, eps))
    options = dict(METHODS[name])
    if args.num_probes is not None and name.startswith("fzoo"):
        options["num_probes"] = args.num_probes
    opt = ZOOptimizer(params, lr=lr, eps=eps, seed=seed, defer_update=True, **options)
    sampler = BatchSampler(len(data.train), args.batch_size, seed)
    if opt.projection is not None:
        search = BatchSampler(len(data.train), args.batch_size, rng.mix(seed, 0x53454152))
        its = opt.projection.iterations
        opt.search_closures = lambda step, j: (
            lambda b=[data.train[i] for i in search.indices(step * its + j)]: scorer.classification_loss(b))
    base = {"task": task.name, "trainable": trainable, "seed": seed, "method": name, "lr": lr, "eps": eps,
            "num_probes": getattr(opt.estimator, "num_probes", None), "eval_split": args.eval_split,
            "eval_size": len(test), "batch_size": args.batch_size}
    train_s, step, next_eval, step_losses = 0.0, 0, 0, []
    while True:
        if opt.forward_passes >= next_eval:
            opt.flush()
            acc, loss = test_metrics(scorer, test)
            rec = {**base, "forward_passes": opt.forward_passes, "steps": step, "train_s": train_s,
                   "test_acc": acc, "test_loss": loss, "skipped_steps": opt.skipped_steps,
                   "numbers_per_step": opt.engine.numbers_drawn / max(step, 1),
                   "loadavg": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "step_losses": step_losses}
            step_losses = []
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
        step_losses.append([round(float(v), 6) for v in opt.last_losses])  # this step's losses, plan order
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
        rows.append({"timing": name, "task": args.tasks[0], "trainable": trainable, "step_s": step_s,
                     "forwards_per_step": statistics.mean(f for _, f in times),
                     "numbers_per_step": opt.engine.numbers_drawn / (args.timing_steps + 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _first_reach(points, target):
    """(forward passes, train seconds) of the first eval point from which the loss stays at or
    below ``target`` to the run's end, else None: a run that dips below MeZO's final loss and then
    diverges has not reached it."""
    hit = None
    for p in points:
        if p["test_loss"] > target:
            hit = None
        elif hit is None:
            hit = (p["forward_passes"], p["train_s"])
    return hit


def _mezo_equivalent(mezo, loss, key):
    """``key`` (forward passes or train seconds) MeZO's curve needs to first reach ``loss``,
    linearly interpolated between its eval points; None where MeZO never gets there."""
    for a, b in zip(mezo, mezo[1:]):
        if b["test_loss"] <= loss:
            if a["test_loss"] <= loss:
                return a[key]
            t = (a["test_loss"] - loss) / (a["test_loss"] - b["test_loss"])
            return a[key] + t * (b[key] - a[key])
    return mezo[0][key] if mezo and mezo[0]["test_loss"] <= loss else None


def speedup(points, mezo, key):
    """How many of MeZO's forward passes (``key="forward_passes"``) or seconds (``"train_s"``) one
    of the method's is worth, on test loss, for one seed.

    If the method reaches MeZO's final loss and stays there (:func:`_first_reach`): MeZO's total
    over the method's at that point (> 1: faster). If not: what MeZO needed to reach the method's
    final loss over the method's total (< 1). None where it cannot be read off (MeZO never reaches the method's final loss)."""
    target = mezo[-1]["test_loss"]
    hit = _first_reach(points, target)
    if hit is not None:
        at = hit[0] if key == "forward_passes" else hit[1]
        return mezo[-1][key] / at if at else None
    equiv = _mezo_equivalent(mezo, points[-1]["test_loss"], key)
    return None if equiv is None or not points[-1][key] else equiv / points[-1][key]


def _spread(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    text = ", ".join(f"{v:.2f}" for v in values if v is not None)
    return f"{statistics.mean(vals):.2f} ({text})" if len(vals) > 1 else f"{vals[0]:.2f}"


def label(r) -> str:
    """A run's name in the tables: the method, and ``@lr`` where the lr is not its default."""
    default = default_lr(r["method"], r["trainable"], r["eps"])
    return r["method"] if math.isclose(r["lr"], default, rel_tol=1e-9) else f"{r['method']}@{r['lr']:g}"


def seconds_per_forward(timings, task, trainable) -> dict:
    """``{method preset: s per forward pass}`` from the side-by-side ``--timing-steps`` rows of one
    task and trainable scheme (the last invocation's where several measured it: rows of one
    invocation share the machine's conditions)."""
    rows = [r for r in timings if (r.get("task"), r["trainable"]) == (task, trainable)]
    return {r["timing"]: r["step_s"] / r["forwards_per_step"] for r in rows}


def summarise(records, args, timings=()):
    """Table rows and curves per (task, trainable), each method against MeZO seed by seed.

    Per seed (same batches for every method): the forward passes from which the method stays at or
    below MeZO's final test loss of that seed, and the speed-up on test loss per forward pass and per
    second (:func:`speedup`); the curves are means over seeds at each eval point. Seconds: where
    side-by-side step times exist for both presets (``timings``), a run's seconds are its forward
    passes times its preset's s per forward pass from them, so runs made at different machine
    loads compare fairly; else the runs' own training seconds."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["task"], r["trainable"]), {}).setdefault(label(r), {}).setdefault(
            r["seed"], []).append(r)
    sections = []
    for (task, trainable), methods in groups.items():
        for seeds in methods.values():
            for pts in seeds.values():
                pts.sort(key=lambda r: r["forward_passes"])
        per_fwd = seconds_per_forward(timings, task, trainable)
        preset = {label(r): r["method"] for r in records if (r["task"], r["trainable"]) == (task, trainable)}
        base_preset = preset.get(args.baseline)
        if base_preset in per_fwd and all(preset[n] in per_fwd for n in methods):
            for name, seeds in methods.items():
                for pts in seeds.values():
                    for r in pts:
                        r["train_s"] = r["forward_passes"] * per_fwd[preset[name]]
        mezo = methods.get(args.baseline, {})
        rows = ["| method | lr | seeds | forward passes run (per seed) | final test loss (mean; per seed) | "
                "final test acc (mean; per seed) | at or below MeZO's final loss from forward pass (per seed) | "
                "speed-up per forward pass (mean; per seed) | speed-up per second (mean; per seed) | "
                "train s per forward pass | skipped steps |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        curves = {}
        for name, seeds in methods.items():
            order = sorted(seeds)
            finals = [seeds[s][-1] for s in order]
            losses = [f["test_loss"] for f in finals]
            reach, fp_up, s_up = [], [], []
            for s in order:
                if s not in mezo:
                    reach.append("no baseline run")
                    fp_up.append(None)
                    s_up.append(None)
                    continue
                hit = _first_reach(seeds[s], mezo[s][-1]["test_loss"])
                reach.append(str(hit[0]) if hit else "not reached")
                fp_up.append(speedup(seeds[s], mezo[s], "forward_passes"))
                s_up.append(speedup(seeds[s], mezo[s], "train_s"))
            lrs = sorted({f["lr"] for f in finals})
            rows.append(
                f"| {name} | {', '.join(f'{v:g}' for v in lrs)} | {', '.join(map(str, order))} | "
                f"{', '.join(str(f['forward_passes']) for f in finals)} | "
                f"{statistics.mean(losses):.4f} ({', '.join(f'{v:.4f}' for v in losses)}) | "
                f"{statistics.mean(f['test_acc'] for f in finals):.1f} "
                f"({', '.join(format(f['test_acc'], '.1f') for f in finals)}) | {', '.join(reach)} | "
                f"{_spread(fp_up) if name != args.baseline else '1'} | {_spread(s_up) if name != args.baseline else '1'} | "
                f"{statistics.mean(f['train_s'] / max(f['forward_passes'], 1) for f in finals):.2f} | "
                f"{', '.join(str(f.get('skipped_steps', 0)) for f in finals)} |")
            by_fp: dict = {}
            for s in order:
                for r in seeds[s]:
                    by_fp.setdefault(r["forward_passes"], []).append(r)
            # mean over seeds only where every seed has the point (a cut-off run does not skew it)
            curves[name] = [{"fp": fp, "acc": statistics.mean(r["test_acc"] for r in rs),
                             "loss": statistics.mean(r["test_loss"] for r in rs),
                             "s": statistics.mean(r["train_s"] for r in rs)}
                            for fp, rs in sorted(by_fp.items()) if len(rs) == len(order)]
        png = f"methods_{task}_{trainable}.png"
        plot(curves, ROOT / "docs" / png, f"{task}, {trainable}, SmolLM2-135M")
        sections.append(f"### {task}, {trainable}\n\n" + "\n".join(rows) + f"\n\n![{task} {trainable}]({png})\n")
    return sections


def timing_table(rows):
    """The side-by-side step times, each against MeZO's step on the same task and parameters."""
    if not rows:
        return ""
    where = lambda r: (r.get("task", "sst2"), r["trainable"])  # noqa: E731 (old rows: SST-2)
    mezo = {where(r): r["step_s"] for r in rows if r["timing"] == "mezo"}
    out = ["\n### Step time, side by side (`--timing-steps`)\n",
           "| method (task, parameters) | s per step | ratio to MeZO's step there | forward passes per step "
           "| s per forward pass | random numbers per step |", "|---|---|---|---|---|---|"]
    for r in rows:
        base = mezo.get(where(r))
        ratio = f"{r['step_s'] / base:.2f}" if base else ""
        out.append(f"| {r['timing']} ({', '.join(where(r))}) | {r['step_s']:.2f} | {ratio} | "
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
            axes[1, col].plot([p[x] for p in pts], [p["loss"] for p in pts], marker="o",
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
    p.add_argument("--lr", type=float, help="lr of every method (default: MeZO's, and FZOO's own)")
    p.add_argument("--lr-for", nargs="*", default=[], metavar="METHOD=LR",
                   help="the lr of one method (overrides --lr), e.g. fzoo=1e-6")
    p.add_argument("--num-probes", type=int, help="FZOO's N (default 8)")
    p.add_argument("--eval-split", default="test", choices=["test", "dev"],
                   help="evaluate on the test subset or on the dev split (for lr sweeps)")
    p.add_argument("--eps", type=float)
    p.add_argument("--log", default="methods.jsonl")
    p.add_argument("--from-log", action="store_true", help="only rebuild the table and plots from --log")
    p.add_argument("--timing-steps", type=int, default=0,
                   help="also time each method's step side by side (DiZO's search excluded)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-summary", action="store_true", help="only run and log (no table, no plots)")
    p.add_argument("--baseline", default="mezo", help="the run label speed-ups are measured against "
                   "(a method, or METHOD@LR for a non-default lr)")
    p.add_argument("--upto", type=int, help="tables from the eval points up to this many forward passes "
                   "(a shorter budget read off longer runs: a constant-lr run's first F forward passes "
                   "do not depend on how long it goes on)")
    args = p.parse_args()
    try:
        args.lr_for = {k: float(v) for k, v in (item.split("=", 1) for item in args.lr_for)}
    except ValueError:
        p.error(f"--lr-for takes METHOD=LR pairs, got {args.lr_for}")
    if not args.from_log:
        for task_name in args.tasks:
            task = get_task(task_name)
            data = task.load(args.data_dir, seed=0)
            test = data.test[: args.test_size]
            if args.eval_split == "dev":
                test = data.dev[: args.test_size]
            for trainable in args.trainable:
                for seed in args.seeds:
                    for name in args.methods:
                        run(args, task, data, test, trainable, seed, name, args.log)
    if args.timing_steps:
        data = get_task(args.tasks[0]).load(args.data_dir, seed=0)
        with open(args.log, "a") as f:
            for row in timing(args, data, args.trainable[0]):
                f.write(json.dumps(row) + "\n")
    if args.no_summary:
        return
    records = [json.loads(line) for line in Path(args.log).read_text().splitlines() if line.strip()]
    timings = [r for r in records if "timing" in r]
    records = [r for r in records if "timing" not in r and (args.upto is None or r["forward_passes"] <= args.upto)]
    cmd = "python benchmarks/methods.py " + " ".join(a for a in sys.argv[1:] if a != "--from-log")
    text = (f"## Methods at one forward-pass budget (`benchmarks/methods.py`)\n\nTables and plots rebuilt "
            f"from `{args.log}` by `{cmd.strip()} --from-log`.\n\n"
            f"SmolLM2-135M, MeZO prompts and data protocol, batch {args.batch_size}, eps as MeZO's for every "
            f"method; lr: MeZO's for the methods with MeZO's step, FZOO's own, MeZO's times E[g]/E[g^2] for "
            f"a kernel estimator (column lr); test loss "
            f"(cross-entropy of the gold candidate) and accuracy on the first {args.test_size} test examples, "
            f"evaluated every {args.eval_every} forward passes. Wall-clock is training time only. Speed-up per "
            "forward pass, per seed: where the method reaches MeZO's final test loss and stays at or "
            "below it to the end (same seed, same batches), MeZO's forward passes over the method's at "
            "that point; where it does not, the forward passes MeZO needed to reach the method's final loss (interpolated) over the method's. Per second: "
            "the same with seconds, each run's forward passes times its method's s per forward pass measured "
            "side by side (`--timing-steps`, table below) where those exist, else its own training seconds. "
            f"Baseline: `{args.baseline}`" + (f"; eval points up to {args.upto} forward passes" if args.upto else "")
            + ". A label METHOD@LR is a run at a non-default lr.\n\n"
            + "\n".join(summarise(records, args, timings)) + timing_table(timings))
    write_section(Path(args.out), text, "methods")


if __name__ == "__main__":
    main()
