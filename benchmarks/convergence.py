"""SST-2 convergence: the faithful MeZO reference against `zotune train --method mezo`, side by side.

SmolLM2-135M, SST-2 with MeZO's prompt and data protocol (1000 training examples, data seed 0),
full parameters (embeddings frozen), batch 16, the same seed, lr and eps for both arms:

  reference: one sequence per candidate with full-vocabulary logits (MeZO's loss), and MeZO's step
             with four allocating Gaussian draws (zotune._reference.MeZOReference);
  zotune:    the fast candidate scorer (one sequence per example for single-token verbalizers,
             logits only at scored positions) and ZOOptimizer(method="mezo", defer_update=True):
             what `zotune train --method mezo` runs.

Both arms see the same batches (zotune.train.BatchSampler) and the same directions (same keys),
and are evaluated by the same scorer on the same fixed test subset at each eval point. The zotune
arm then continues for ``--zotune-steps`` to show the longer curve. Prints JSON lines; writes the
table to docs/benchmarks.md and the plot to docs/sst2_convergence.png.

    python benchmarks/convergence.py --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import write_section  # noqa: E402

from zotune import ZOOptimizer  # noqa: E402
from zotune._reference import MeZOReference  # noqa: E402
from zotune.models import load_model, select_trainable, trainable_parameters  # noqa: E402
from zotune.objectives import CandidateScorer  # noqa: E402
from zotune.tasks import get_task  # noqa: E402
from zotune.train import BatchSampler, evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fresh(args):
    model, tokenizer = load_model(args.model)
    model = select_trainable(model, "full")
    return model, tokenizer, trainable_parameters(model)


def run_arm(name, args, data, test, steps, make_step, scorer_eval, records):
    sampler = BatchSampler(len(data.train), args.batch_size, args.seed)
    step_times, losses = [], []
    task = get_task("sst2")
    for step in range(steps + 1):
        if step % args.eval_every == 0:
            acc = evaluate(scorer_eval(), task, test, 32)
            rec = {"arm": name, "step": step, "test_acc": acc,
                   "median_step_s": statistics.median(step_times) if step_times else None,
                   "mean_loss": statistics.mean(losses[-args.eval_every:]) if losses else None}
            print(json.dumps(rec), flush=True)
            records.append(rec)
        if step == steps:
            break
        batch = [data.train[i] for i in sampler.indices(step)]
        start = time.perf_counter()
        losses.append(make_step(batch))
        step_times.append(time.perf_counter() - start)
    return step_times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=os.environ.get("ZOTUNE_DATA"))
    p.add_argument("--reference-steps", type=int, default=200)
    p.add_argument("--zotune-steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args()

    data = get_task("sst2").load(args.data_dir, seed=0)
    test = data.test[: args.test_size]
    records: list[dict] = []

    model, tok, params = fresh(args)
    naive = CandidateScorer(model, tok, fast=False)
    fast_eval = CandidateScorer(model, tok)
    ref = MeZOReference(params, lr=args.lr, eps=args.eps, seed=args.seed)
    ref_times = run_arm("reference", args, data, test, args.reference_steps,
                        lambda b: ref.step(lambda: naive.classification_loss(b)), lambda: fast_eval, records)

    model, tok, params = fresh(args)
    fast = CandidateScorer(model, tok)
    opt = ZOOptimizer(params, lr=args.lr, eps=args.eps, method="mezo", seed=args.seed, defer_update=True)

    def zo_eval():
        opt.flush()
        return fast

    zo_times = run_arm("zotune", args, data, test, args.zotune_steps,
                       lambda b: opt.step(lambda: fast.classification_loss(b)), zo_eval, records)
    ref_s = statistics.median(ref_times)
    zo_s = statistics.median(zo_times[: args.reference_steps])
    summary = {"what": "speed", "reference_step_s": ref_s, "zotune_step_s": zo_s, "speedup": ref_s / zo_s}
    print(json.dumps(summary), flush=True)
    records.append(summary)
    plot(records, ROOT / "docs" / "sst2_convergence.png")
    write_section(Path(args.out), table(records, args), "convergence")


def table(records, args):
    ref = {r["step"]: r for r in records if r.get("arm") == "reference"}
    zo = {r["step"]: r for r in records if r.get("arm") == "zotune"}
    speed = next(r for r in records if r.get("what") == "speed")
    rows = ["| step | reference test acc | zotune test acc | difference |", "|---|---|---|---|"]
    for step in sorted(zo):
        r = ref.get(step)
        rows.append(f"| {step} | {r['test_acc']:.1f} | {zo[step]['test_acc']:.1f} | "
                    f"{zo[step]['test_acc'] - r['test_acc']:+.1f} |" if r else
                    f"| {step} | | {zo[step]['test_acc']:.1f} | |")
    cmd = "python benchmarks/convergence.py " + " ".join(sys.argv[1:])
    return (f"## SST-2 convergence (`benchmarks/convergence.py`)\n\nCommand: `{cmd.strip()}`\n\n"
            f"SmolLM2-135M, SST-2 (MeZO prompt and protocol), full parameters (embeddings frozen), "
            f"batch {args.batch_size}, lr {args.lr}, eps {args.eps}, seed {args.seed}; test accuracy on "
            f"the first {args.test_size} examples of the MeZO test sample (SST-2 validation).\n\n"
            + "\n".join(rows) + "\n\n"
            f"Median step time (training only): reference {speed['reference_step_s']:.2f} s, zotune "
            f"{speed['zotune_step_s']:.2f} s: **{speed['speedup']:.2f}x** faster.\n\n"
            "![SST-2 convergence](sst2_convergence.png)\n")


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"reference": dict(marker="o", markersize=11, markerfacecolor="none", linestyle="--",
                                linewidth=2.5, color="tab:blue"),
              "zotune": dict(marker="s", markersize=5, linestyle="-", color="tab:orange")}
    for arm, style in styles.items():
        pts = [(r["step"], r["test_acc"]) for r in records if r.get("arm") == arm]
        ax.plot(*zip(*pts), label=arm, **style)
    ax.set(xlabel="step", ylabel="test accuracy (%)", title="SST-2, SmolLM2-135M, MeZO")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
