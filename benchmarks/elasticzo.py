"""ElasticZO against vanilla ZO and backprop: LeNet-5 on Fashion-MNIST from scratch, side by side.

Every method trains the same LeNet-5 initialisation (per seed) on the same batches (``Batches``:
a function of seed and step) for the same number of steps; the runs are interleaved step by step
(method A's step t, B's step t, ...), so the time per step of each is measured under the same
load, and reported as medians. Peak memory is measured (``zotune.memory.training_memory``:
model tensors plus the highest tensor-memory level of the first two steps under the profiler:
activations, gradients, optimizer state, scratch). Test accuracy on the 10,000 test images every
``--eval-every`` steps.

Methods: ``backprop`` (SGD), ``mezo`` (ZO-SGD on every layer), ``elasticzo`` with 1, 2, 3 backprop
layers. ElasticZO-INT8 joins with the same splits as soon as ``elasticzo-int8`` is registered in
``zotune.image_trainers.TRAINERS`` (see :data:`INT8`).

    python benchmarks/elasticzo.py --data-dir ../shared/data --steps 2000 --seeds 0 1 --eval-every 400 \
        --finetune --finetune-steps 400          # the run in docs/benchmarks.md (28 min, loaded)

Writes ``docs/elasticzo_fmnist.png`` and ``docs/elasticzo_results.json`` and prints a markdown
table. Optionally ``--finetune``: pretrain with backprop on classes 0-4, then adapt every method
on all ten classes (same budget rules).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from zotune.image_trainers import TRAINERS, build_trainer
from zotune.memory import training_memory
from zotune.models.vision import lenet5
from zotune.tasks.images import Batches, load_fashion_mnist, normalise

ROOT = Path(__file__).resolve().parents[1]
HEAD = {"lr": 1e-3, "eps": 1e-3}
"""The ZO learning rate and eps of ElasticZO's head, and MeZO's at the same settings. Chosen on
600-step runs (seed 0) and a first 2000-step run of this script: ZO-SGD at 1e-2 diverges within
600 steps for MeZO and ElasticZO; ElasticZO's head at 3e-3 blew the network up after ~260 steps
once the tail had made the loss sharp (5e-3: within 600 steps); MeZO at 5e-3 and 3e-3 learned
faster early (22.9% and 18.1% at step 400) but diverged by steps 800 and 1200. At 1e-3 both are
stable. MeZO also runs at 2e-3 and 3e-3, its faster settings. Tail learning rates: 0.1 for 2 and 3
backprop layers; 0.05 for 1 (0.1 diverged)."""
METHODS = [
    ("backprop", "backprop", {"lr": 0.05}),
    ("mezo", "mezo", dict(HEAD)),
    ("mezo-lr2e-3", "mezo", {**HEAD, "lr": 2e-3}),
    ("mezo-lr3e-3", "mezo", {**HEAD, "lr": 3e-3}),
    ("elasticzo-1", "elasticzo", {**HEAD, "bp_layers": 1, "lr_bp": 0.05}),
    ("elasticzo-2", "elasticzo", {**HEAD, "bp_layers": 2, "lr_bp": 0.1}),
    ("elasticzo-3", "elasticzo", {**HEAD, "bp_layers": 3, "lr_bp": 0.1}),
]
INT8 = "elasticzo-int8"
"""The hook for ElasticZO-INT8: when this name is in ``TRAINERS`` its rows join with the same
splits; its options (``lr_shift`` etc.) go in :data:`INT8_OPTIONS`."""
INT8_OPTIONS: dict = {}
if INT8 in TRAINERS:
    METHODS += [(f"{INT8}-{k}", INT8, {**HEAD, "bp_layers": k, "lr_bp": 0.1, **INT8_OPTIONS}) for k in (1, 2, 3)]

DEFAULTS = {"seed": 0, "bp_layers": 0, "tail_grad": "avg", "momentum": 0.0, "weight_decay": 0.0,
            "lr_bp": 0.1, "eps": 1e-3}


def initial_model(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(1000 + seed)
        return lenet5()


@torch.no_grad()
def accuracy(trainer, images, labels, batch: int = 1000) -> float:
    correct = 0
    for s in range(0, len(images), batch):
        correct += int((trainer.logits(normalise(images[s:s + batch], "fashion-mnist")).argmax(-1)
                        == labels[s:s + batch]).sum())
    return 100.0 * correct / len(images)


def run(data, steps: int, seeds, eval_every: int, batch_size: int, start_models=None, train_subset=None):
    """Train every (method, seed) interleaved; return per-run curves, times and memory."""
    images, labels = data.train_images, data.train_labels
    if train_subset is not None:
        images, labels = images[train_subset], labels[train_subset]
    runs = []
    for seed in seeds:
        batches = Batches(images, labels, "fashion-mnist", batch_size, seed)
        for label, method, options in METHODS:
            model = copy.deepcopy(start_models[seed]) if start_models else initial_model(seed)
            opts = {**DEFAULTS, **options, "seed": seed}
            memory = training_memory(lambda m, method=method, opts=opts: build_trainer(method, m, opts), model,
                                     [batches.batch(0), batches.batch(1)])
            runs.append({"label": label, "method": method, "seed": seed, "batches": batches, "memory": memory,
                         "trainer": build_trainer(method, model, opts), "times": [], "curve": [],
                         "losses": []})
    for r in runs:
        r["curve"].append((0, accuracy(r["trainer"], data.test_images, data.test_labels)))
    started = time.perf_counter()
    for step in range(steps):
        for r in runs:  # interleaved: every method's step t under the same load
            x, y = r["batches"].batch(step)
            t0 = time.perf_counter()
            loss = r["trainer"].step(x, y)
            r["times"].append(time.perf_counter() - t0)
            r["losses"].append(loss)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            for r in runs:
                r["curve"].append((step + 1, accuracy(r["trainer"], data.test_images, data.test_labels)))
            best = {r["label"]: r["curve"][-1][1] for r in runs if r["seed"] == seeds[0]}
            print(f"step {step + 1}/{steps} ({time.perf_counter() - started:.0f}s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in best.items()), flush=True)
    return [{k: v for k, v in r.items() if k not in ("trainer", "batches")} for r in runs]


def summarise(runs) -> list[dict]:
    rows = []
    mezo_peak = statistics.mean(r["memory"]["peak_bytes"] for r in runs if r["label"] == "mezo")
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        final = [r["curve"][-1][1] for r in mine]
        peak = statistics.mean(r["memory"]["peak_bytes"] for r in mine)
        rows.append({"method": label, "test_acc": statistics.mean(final), "test_acc_runs": final,
                     "peak_bytes": peak, "overhead_vs_mezo": peak / mezo_peak - 1,
                     "ms_per_step": 1000 * statistics.median(t for r in mine for t in r["times"][5:])})
    return rows


def table(rows, steps, batch_size) -> str:
    mezo = next(r for r in rows if r["method"] == "mezo")["test_acc"]
    lines = [f"| method | test accuracy after {steps} steps (mean of seeds) | per seed | vs MeZO (points) | "
             "peak memory (KiB) | memory vs MeZO | ms per step (median) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['test_acc']:.2f} | {', '.join(f'{a:.2f}' for a in r['test_acc_runs'])} | "
                     f"{r['test_acc'] - mezo:+.2f} | {r['peak_bytes'] / 1024:.0f} | {100 * r['overhead_vs_mezo']:+.2f}% | "
                     f"{r['ms_per_step']:.1f} |")
    return "\n".join(lines)


def plot(runs, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(dict.fromkeys(r["label"] for r in runs), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for label, colour in colours.items():
        mine = [r for r in runs if r["label"] == label]
        steps = [s for s, _ in mine[0]["curve"]]
        mean = [statistics.mean(r["curve"][i][1] for r in mine) for i in range(len(steps))]
        ax.plot(steps, mean, marker="o", markersize=3, color=colour, label=label)
        for r in mine:
            ax.plot(steps, [a for _, a in r["curve"]], color=colour, alpha=0.25, linewidth=0.8)
    ax.set(xlabel="training step", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("ZOTUNE_DATA"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--finetune", action="store_true", help="also the pretrain-on-half, adapt-on-all setting")
    p.add_argument("--finetune-steps", type=int, default=500)
    p.add_argument("--out", default=str(ROOT / "docs"))
    args = p.parse_args()
    torch.set_num_threads(1)
    data = load_fashion_mnist(args.data_dir)
    load = open("/proc/loadavg").read().split()[:3]
    started = time.perf_counter()
    runs = run(data, args.steps, args.seeds, args.eval_every, args.batch_size)
    rows = summarise(runs)
    out = Path(args.out)
    plot(runs, out / "elasticzo_fmnist.png", f"LeNet-5 on Fashion-MNIST from scratch, batch {args.batch_size}")
    result = {"steps": args.steps, "seeds": args.seeds, "batch_size": args.batch_size, "methods": METHODS,
              "rows": rows, "curves": {f"{r['label']}/{r['seed']}": r["curve"] for r in runs},
              "memory": {f"{r['label']}/{r['seed']}": r["memory"] for r in runs},
              "loadavg_start": load, "wall_s": time.perf_counter() - started}
    print(table(rows, args.steps, args.batch_size))
    if args.finetune:
        half = (data.train_labels < 5).nonzero().squeeze(1)
        pre = {}
        for seed in args.seeds:  # pretrain with backprop on classes 0-4
            model = initial_model(seed)
            trainer = build_trainer("backprop", model, {**DEFAULTS, "lr": 0.05, "seed": seed})
            b = Batches(data.train_images[half], data.train_labels[half], "fashion-mnist", args.batch_size, seed + 100)
            for step in range(args.finetune_steps):
                trainer.step(*b.batch(step))
            pre[seed] = model
            print(f"pretrained seed {seed} on classes 0-4: test accuracy (10 classes) "
                  f"{accuracy(trainer, data.test_images, data.test_labels):.1f}", flush=True)
        ft = run(data, args.finetune_steps, args.seeds, args.eval_every, args.batch_size, start_models=pre)
        ft_rows = summarise(ft)
        plot(ft, out / "elasticzo_fmnist_finetune.png", "LeNet-5 pretrained on classes 0-4, adapted on all ten")
        result["finetune"] = {"steps": args.finetune_steps, "rows": ft_rows,
                              "curves": {f"{r['label']}/{r['seed']}": r["curve"] for r in ft}}
        print(table(ft_rows, args.finetune_steps, args.batch_size))
    result["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    result["wall_s"] = time.perf_counter() - started
    (out / "elasticzo_results.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({"loadavg_start": load, "loadavg_end": result["loadavg_end"], "wall_s": result["wall_s"]}))


if __name__ == "__main__":
    main()
