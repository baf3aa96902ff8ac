"""DeepZero's accuracy benchmarks in small (issue 15, benchmark items 1 and 3), on Fashion-MNIST.

``fig2a``: the paper's Fig. 2a in small. DeepZero's small CNN family (``cnn-730``, ``cnn-3700``,
``cnn-12610``: 1, 2 and 5 conv/BN/ReLU/pool stages of width 18 and a linear head; on the
one-channel 28x28 Fashion-MNIST images the first conv has 3x fewer weights, so the counts are
406, 3,376 and 12,286), trained from scratch by first-order backprop, CGE (d + 1 queries a step,
with feature reuse: ``models/reuse.py``, bitwise equal to plain CGE) and RGE with q = d Gaussian
directions (d + 1 queries), all three with plain SGD at one learning rate, on the same
class-balanced training subset, the same batches (a function of the seed) and the same epochs;
test accuracy on the full 10,000-image test set ``--evals-per-epoch`` times an epoch. The runs
advance model by model, in rounds (every seed and method of the model trains a segment before any
trains the next), so a run cut by ``--budget-min`` still leaves all methods at equal epochs.

``resnet``: ResNet-20 (269,434 parameters on one channel) trained by DeepZero's sparse CGE at 90%
gradient sparsity (``deepzero`` preset: per-tensor random masks at uniform ratios, BatchNorm
parameters and the head's bias always estimated, SGD momentum 0.9 with coupled weight decay 5e-4,
feature reuse), against first-order training with the same gradient masks (autograd gradient
zeroed off the active set, the same SGD) and dense first-order training; interleaved in segments
of ``--eval-every`` steps, test accuracy on a fixed class-balanced test subset after each.

``cost``: seconds per step of every (model, method) of ``fig2a`` (median of ``--repeats``,
interleaved), and what a setting would cost; used to choose the setting.

``--from-log``: the tables (markdown, printed) and the curves (PNG) from the JSON-lines log.

    python benchmarks/deepzero_accuracy.py cost --batch-size 32
    python benchmarks/deepzero_accuracy.py fig2a --train-size 1000 --epochs 4 --batch-size 32
    python benchmarks/deepzero_accuracy.py resnet --train-size 2000 --steps 40 --batch-size 16
    python benchmarks/deepzero_accuracy.py --from-log benchmarks/logs/deepzero_accuracy.jsonl

Every record (one per evaluation) is appended to ``--log`` as soon as it is measured. One thread
(``torch.set_num_threads(1)``); run it under ``nice -n 10`` with ``OMP_NUM_THREADS=1``.
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
import torch.nn.functional as F

from zotune import rng
from zotune.image_methods import BackpropTrainer, ZOTrainer
from zotune.layout import canonical_name
from zotune.models.vision import build_model
from zotune.optim import ZOOptimizer
from zotune.tasks.images import Batches, load_fashion_mnist, normalise

TASK = "fashion-mnist"
LOG = Path(__file__).parent / "logs" / "deepzero_accuracy.jsonl"
FIG2A_MODELS = ("cnn-730", "cnn-3700", "cnn-12610")
FIG2A_METHODS = ("backprop", "cge", "rge")
SUBSET_SEED = 0x5355425345  # the training/test subsets: one fixed draw for every run


# ------------------------------------------------------------------------------------ data

def balanced_subset(labels: torch.Tensor, size: int, num_classes: int = 10) -> torch.Tensor:
    """Sorted indices of ``size`` examples, ``size // num_classes`` of each class (the first of
    each class in one fixed random order, so a larger subset contains a smaller one)."""
    if size <= 0 or size >= len(labels):
        return torch.arange(len(labels))
    order = torch.randperm(len(labels), generator=rng.generator(SUBSET_SEED))
    per = size // num_classes
    picked = [order[labels[order] == c][:per] for c in range(num_classes)]
    return torch.cat(picked).sort().values


def shrink(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images area-downsampled to ``size`` x ``size`` (28: unchanged)."""
    if size == images.shape[-1]:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="area").round().clamp(0, 255).to(torch.uint8)


def load(train_size: int, test_size: int, data_dir=None, image_size: int = 28):
    """The class-balanced training and test subsets (uint8 images, labels)."""
    data = load_fashion_mnist(data_dir)
    tr = balanced_subset(data.train_labels, train_size)
    te = balanced_subset(data.test_labels, test_size)
    return (shrink(data.train_images[tr], image_size), data.train_labels[tr],
            shrink(data.test_images[te], image_size), data.test_labels[te])


@torch.no_grad()
def accuracy(trainer, images, labels, batch_size: int = 1000) -> float:
    correct = 0
    for s in range(0, len(images), batch_size):
        x = normalise(images[s:s + batch_size], TASK)
        correct += int((trainer.logits(x).argmax(-1) == labels[s:s + batch_size]).sum())
    return 100.0 * correct / len(images)


# ------------------------------------------------------------------------------------ trainers

def new_model(name: str, seed: int) -> torch.nn.Sequential:
    """The model's initialisation from the seed (the same for every method of a seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(rng.mix(seed, 0x4D4F44454C))
        return build_model(name, 10, 1)


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


class MaskedBackprop:
    """First-order training with DeepZero's gradient masks: the autograd gradient is zeroed off
    the active set that the ``deepzero`` preset's sparse CGE estimates (the same masks, read from
    a ``ZOOptimizer`` built for that purpose), then ``torch.optim.SGD`` with momentum and coupled
    weight decay on the tensors the ZO rule decays (the layout's ``decays``), as the preset. With
    ``sparsity=0`` it is dense first-order training with that optimizer."""

    def __init__(self, model, lr: float, momentum: float, weight_decay: float, sparsity: float) -> None:
        self.model = model
        probe = ZOOptimizer(model, lr=0.0, eps=5e-3, method="deepzero", sparsity=sparsity)
        self.estimator, self.layout = probe.core.estimator, probe.core.engine.layout
        self.params = {canonical_name(n): p for n, p in model.named_parameters()}
        decay = [self.params[s.name] for s in self.layout if s.decays]
        other = [self.params[s.name] for s in self.layout if not s.decays]
        self.opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                                    {"params": other, "weight_decay": 0.0}], lr=lr, momentum=momentum)
        self.masks = self._masks()

    def _masks(self) -> dict[str, torch.Tensor]:
        masks = {}
        for spec in self.layout:
            m = torch.zeros(spec.numel)
            m[self.estimator.active(self.layout)[spec.index]] = 1.0
            masks[spec.name] = m.view(spec.shape)
        return masks

    def redraw(self, seed: int) -> None:
        self.estimator.redraw(self.layout, seed)
        self.masks = self._masks()

    def active_count(self) -> int:
        return int(sum(m.sum() for m in self.masks.values()))

    def step(self, images, labels) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(images), labels)
        loss.backward()
        for name, p in self.params.items():
            p.grad.mul_(self.masks[name])
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def logits(self, images):
        self.model.eval()
        return self.model(images).float()


def fig2a_trainer(method: str, model, lr: float, eps: float, seed: int, query_batch=1):
    """Plain SGD at ``lr`` for all three (no momentum, no weight decay): the comparison is of the
    gradient estimates alone. CGE's queries run ``query_batch`` per call (``QueryBatchLoss``,
    bitwise equal to one at a time, so the curve does not depend on it)."""
    if method == "backprop":
        return BackpropTrainer(model, {"lr": lr, "momentum": 0.0, "weight_decay": 0.0})
    options = {"lr": lr, "eps": eps, "seed": seed, "weight_decay": 0.0, "query_batch": query_batch}
    if method == "rge":
        options["num_probes"] = numel(model)  # q = d
    return ZOTrainer(model, options, method)


# ------------------------------------------------------------------------------------ logging

RUN_ID = f"{time.time():.3f}-{os.getpid()}"  # this invocation's records (several may share a log)


def append(log: Path, record: dict) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:  # one short line per write: appends of concurrent runs do not mix
        f.write(json.dumps({**record, "run": RUN_ID}) + "\n")


def header(args, part: str) -> dict:
    return {"part": part, "kind": "config", "command": "python " + " ".join(sys.argv),
            "args": {k: v for k, v in vars(args).items() if k != "log"},
            "loadavg": Path("/proc/loadavg").read_text().split()[:3], "time": time.time(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------ parts

def run_cost(args) -> None:
    """Seconds per step of each (model, method), interleaved, and the cost of a setting."""
    if args.resnet_batch_sizes:
        resnet_cost(args.resnet_batch_sizes, args.sparsity, args.image_size)
        if not args.methods:
            return
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 1, args.image_size, args.image_size)
    xs = [torch.randn(shape, generator=g) for _ in range(args.repeats)]
    ys = [torch.randint(0, 10, (args.batch_size,), generator=g) for _ in range(args.repeats)]
    trainers = {(m, k): fig2a_trainer(k, new_model(m, 0), args.lr, args.eps, 0, args.query_batch)
                for m in args.models for k in args.methods}
    times = {key: [] for key in trainers}
    for x, y in zip(xs, ys):
        for key, tr in trainers.items():
            t0 = time.perf_counter()
            tr.step(x, y)
            times[key].append(time.perf_counter() - t0)
            print(f"{key}: {times[key][-1]:.2f} s", flush=True)
    steps = args.train_size // args.batch_size * args.epochs * len(args.seeds)
    total = 0.0
    print(f"\nbatch {args.batch_size}, load {os.getloadavg()[0]:.2f}; cost of --train-size {args.train_size} "
          f"--epochs {args.epochs} x {len(args.seeds)} seeds ({steps} steps per model and method):")
    for key, ts in times.items():
        med = statistics.median(ts)
        total += med * steps
        print(f"  {key[0]:10s} {key[1]:9s} {med:8.3f} s/step  -> {med * steps / 60:7.1f} min")
        append(args.log, {"part": "cost", "model": key[0], "method": key[1], "batch_size": args.batch_size,
                          "params": numel(trainers[key].model), "seconds_per_step": med, "times": ts,
                          "loadavg": os.getloadavg()[0]})
    print(f"  total {total / 60:.1f} min")


@torch.no_grad()
def resnet_cost(batch_sizes, sparsity: float, image_size: int, repeats: int = 3) -> None:
    """Predicted seconds per sparse-CGE step of ResNet-20 with feature reuse: one full forward plus,
    for every active coordinate of block j, the measured forward from block j to the loss
    (B.9's cost model; the per-query bookkeeping is left out, so it is a lower bound)."""
    model = new_model("resnet20", 0).train()
    opt = ZOOptimizer(model, lr=0.0, eps=5e-3, method="deepzero", sparsity=sparsity)
    est, layout = opt.core.estimator, opt.core.engine.layout
    blocks = list(model.children())
    per_block = [0] * len(blocks)
    for spec in layout:
        per_block[int(spec.name.split(".")[0])] += len(est.active(layout)[spec.index])
    for b in batch_sizes:
        x, y = torch.randn(b, 1, image_size, image_size), torch.randint(0, 10, (b,))
        inputs, z = [], x
        for blk in blocks:
            inputs.append(z)
            z = blk(z)
        tail = []
        for j in range(len(blocks)):
            ts = []
            for _ in range(repeats):
                t0, z = time.perf_counter(), inputs[j]
                for blk in blocks[j:]:
                    z = blk(z)
                F.cross_entropy(z, y)
                ts.append(time.perf_counter() - t0)
            tail.append(statistics.median(ts))
        step = tail[0] + sum(n * t for n, t in zip(per_block, tail))
        print(f"resnet20 {image_size}x{image_size} batch {b}: {sum(per_block):,} active coordinates, "
              f"full forward {tail[0] * 1e3:.1f} ms, "
              f"predicted >= {step:.0f} s per step (no reuse: {tail[0] * (1 + sum(per_block)):.0f} s); "
              f"load {os.getloadavg()[0]:.2f}", flush=True)


def run_fig2a(args) -> None:
    train_x, train_y, test_x, test_y = load(args.train_size, args.test_size, args.data_dir, args.image_size)
    append(args.log, {**header(args, "fig2a"), "train_examples": len(train_x), "test_examples": len(test_x)})
    runs = []
    for model_name in args.models:
        for seed in args.seeds:
            for method in args.methods:
                model = new_model(model_name, seed)
                runs.append({"model": model_name, "seed": seed, "method": method, "params": numel(model),
                             "trainer": fig2a_trainer(method, model, args.lr, args.eps, seed, args.query_batch),
                             "batches": Batches(train_x, train_y, TASK, args.batch_size, seed),
                             "step": 0, "seconds": 0.0})
    start = time.perf_counter()
    for r in runs:  # epoch 0: the initialisation (the same for every method of a seed)
        r["acc0"] = accuracy(r["trainer"], test_x, test_y)
        append(args.log, record(r, 0, r["acc0"], None))
    per_epoch = runs[0]["batches"].steps_per_epoch
    total, segment = args.epochs * per_epoch, max(1, per_epoch // args.evals_per_epoch)
    for model_name in args.models:  # model by model: a cut leaves the smaller models complete
        group = [r for r in runs if r["model"] == model_name]
        while group[0]["step"] < total:
            if not train_segment(group, args, start, total, segment, per_epoch, test_x, test_y):
                return


def train_segment(group, args, start, total, segment, per_epoch, test_x, test_y) -> bool:
    """One segment of every run of ``group`` (interleaved: the seeds and methods of one model),
    each followed by a test evaluation; False once the budget is spent."""
    for r in group:
        if args.budget_min and time.perf_counter() - start > 60 * args.budget_min:
            print(f"budget of {args.budget_min} min reached before {r['model']}/{r['method']}/seed "
                  f"{r['seed']} step {r['step']}", flush=True)
            return False
        losses, t0 = [], time.perf_counter()
        for _ in range(min(segment, total - r["step"])):
            losses.append(r["trainer"].step(*r["batches"].batch(r["step"])))
            r["step"] += 1
        r["seconds"] += time.perf_counter() - t0
        acc, loss = accuracy(r["trainer"], test_x, test_y), sum(losses) / len(losses)
        append(args.log, record(r, round(r["step"] / per_epoch, 4), acc, loss))
        print(f"epoch {r['step'] / per_epoch:.2f} {r['model']:9s} seed {r['seed']} {r['method']:8s} "
              f"test {acc:6.2f}  loss {loss:.4f}  {r['seconds'] / 60:6.1f} min", flush=True)
    return True


def record(r: dict, epoch: float, acc: float, loss, **extra) -> dict:
    return {"part": r.get("part", "fig2a"), "model": r["model"], "params": r["params"], "method": r["method"],
            "seed": r["seed"], "epoch": epoch, "step": r["step"], "test": acc, "train_loss": loss,
            "seconds": r["seconds"], "cpu_seconds": time.process_time(), "loadavg": os.getloadavg()[0],
            **extra}


def run_resnet(args) -> None:
    train_x, train_y, test_x, test_y = load(args.train_size, args.test_size, args.data_dir, args.image_size)
    append(args.log, {**header(args, "resnet"), "train_examples": len(train_x), "test_examples": len(test_x)})
    seed = args.seeds[0]
    runs = []
    for method in args.methods:
        model = new_model("resnet20", seed)
        if method == "deepzero":
            trainer = ZOTrainer(model, {"lr": args.lr, "eps": args.eps, "seed": seed, "sparsity": args.sparsity,
                                        "weight_decay": args.weight_decay, "query_batch": args.query_batch},
                                "deepzero")
            est, layout = trainer.opt.core.estimator, trainer.opt.core.engine.layout
            active = sum(len(v) for v in est.active(layout).values())
        else:
            trainer = MaskedBackprop(model, args.lr, 0.9, args.weight_decay,
                                     args.sparsity if method == "backprop-masked" else 0.0)
            active = trainer.active_count()
        runs.append({"part": "resnet", "model": "resnet20", "seed": seed, "method": method,
                     "params": numel(model), "trainer": trainer, "active": active,
                     "batches": Batches(train_x, train_y, TASK, args.batch_size, seed), "step": 0,
                     "seconds": 0.0})
    per_epoch = runs[0]["batches"].steps_per_epoch
    start = time.perf_counter()
    for r in runs:
        append(args.log, record(r, 0.0, accuracy(r["trainer"], test_x, test_y), None, active=r["active"]))
    while runs[0]["step"] < args.steps:
        # only the first (the ZO) run waits on the budget: the others then catch up to its step
        if args.budget_min and time.perf_counter() - start > 60 * args.budget_min:
            print(f"budget of {args.budget_min} min reached at step {runs[0]['step']}", flush=True)
            return
        for r in runs:
            losses, t0 = [], time.perf_counter()
            for _ in range(min(args.eval_every, args.steps - r["step"])):
                if args.redraw_epochs and r["step"] and r["step"] % (args.redraw_epochs * per_epoch) == 0:
                    redraw(r, r["step"] // (args.redraw_epochs * per_epoch))
                losses.append(r["trainer"].step(*r["batches"].batch(r["step"])))
                r["step"] += 1
            r["seconds"] += time.perf_counter() - t0
            acc = accuracy(r["trainer"], test_x, test_y)
            append(args.log, record(r, r["step"] / per_epoch, acc, sum(losses) / len(losses), active=r["active"]))
            print(f"step {r['step']:4d} {r['method']:16s} test {acc:6.2f}  loss {sum(losses) / len(losses):.4f}  "
                  f"{r['seconds'] / 60:6.1f} min", flush=True)


def redraw(r: dict, k: int) -> None:
    """DeepZero's mask re-draw (every ``--redraw-epochs`` epochs): the same new masks for the ZO
    and the masked first-order run (seeded by the re-draw's number)."""
    tr = r["trainer"]
    if isinstance(tr, MaskedBackprop):
        if r["method"] == "backprop-masked":
            tr.redraw(k)
    else:
        tr.opt.core.estimator.redraw(tr.opt.core.engine.layout, k)


# ------------------------------------------------------------------------------------ from the log

def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def latest_invocation(records: list[dict], part: str) -> tuple[list[dict], dict | None]:
    """The records of ``part``, per (model, seed) from the last invocation that ran it (a seed may
    run in a process of its own), and the config of the last invocation."""
    configs = [r for r in records if r.get("part") == part and r.get("kind") == "config"]
    if not configs:
        return [], None
    chosen = {}  # (model, seed) -> the last invocation that trained it
    for c in configs:
        for model in c["args"].get("models") if part == "fig2a" else ["resnet20"]:
            for seed in c["args"]["seeds"] if part == "fig2a" else c["args"]["seeds"][:1]:
                chosen[model, seed] = c["run"]
    mine = [r for r in records if r.get("part") == part and r.get("kind") != "config"
            and chosen.get((r["model"], r["seed"])) == r.get("run")]
    return mine, configs[-1]


def by_size(recs: list[dict]) -> list[str]:
    """The models of ``recs``, smallest first."""
    return sorted({r["model"] for r in recs}, key=lambda m: next(r["params"] for r in recs if r["model"] == m))


def fig2a_tables(recs: list[dict]) -> tuple[str, dict]:
    """Per model: the last epoch every method reached in at least one seed; test accuracy there
    (mean over the seeds where every method reached it, and each seed), CGE - first-order and
    RGE - CGE."""
    lines = ["| model (params here) | epochs | first-order | CGE | RGE (q = d) | CGE - FO | RGE - CGE |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for model in by_size(recs):
        mine = [r for r in recs if r["model"] == model]
        methods = sorted({r["method"] for r in mine})
        reached = {s: min(max(r["epoch"] for r in mine if r["seed"] == s and r["method"] == m) for m in methods)
                   for s in sorted({r["seed"] for r in mine})}  # per seed: the epoch all methods reached
        epoch = max(reached.values())
        seeds = [s for s, e in reached.items() if e >= epoch]  # the seeds where every method reached it
        acc = {}
        for method in ("backprop", "cge", "rge"):
            vals = [r["test"] for r in mine if r["method"] == method and r["epoch"] == epoch and r["seed"] in seeds]
            acc[method] = (statistics.mean(vals), vals) if vals else (float("nan"), [])
        cell = lambda m: f"{acc[m][0]:.2f} ({', '.join(f'{v:.2f}' for v in acc[m][1])})"
        lines.append(f"| {model} ({mine[0]['params']:,}) | {epoch} (seeds {seeds}) | {cell('backprop')} | {cell('cge')} | "
                     f"{cell('rge')} | {acc['cge'][0] - acc['backprop'][0]:+.2f} | "
                     f"{acc['rge'][0] - acc['cge'][0]:+.2f} |")
        summary[model] = {"epoch": epoch, **{m: acc[m][0] for m in acc}}
    lines += ["", "| model | first-order s/step | CGE s/step (reuse; batched queries in the 2026-12-02 runs) | RGE (q = d) s/step | queries/step (ZO) |",
              "|---|---|---|---|---|"]
    for model in summary:
        cost = {}
        for method in ("backprop", "cge", "rge"):
            last = {}
            for r in recs:
                if r["model"] == model and r["method"] == method and r["step"]:
                    last[r["seed"]] = r
            cost[method] = (sum(r["seconds"] for r in last.values()) / sum(r["step"] for r in last.values())
                            if last else float("nan"))
        params = next(r["params"] for r in recs if r["model"] == model)
        lines.append(f"| {model} | {cost['backprop']:.4f} | {cost['cge']:.3f} | {cost['rge']:.3f} | {params + 1:,} |")
    return "\n".join(lines), summary


def plot_fig2a(recs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = by_size(recs)
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    colours = {"backprop": "tab:blue", "cge": "tab:green", "rge": "tab:red"}
    labels = {"backprop": "first-order", "cge": "ZO-CGE", "rge": "ZO-RGE (q = d)"}
    for ax, model in zip(axes[0], models):
        mine = [r for r in recs if r["model"] == model]
        for method in ("backprop", "cge", "rge"):
            seeds = sorted({r["seed"] for r in mine if r["method"] == method})
            for s_i, seed in enumerate(seeds):
                pts = sorted((r["epoch"], r["test"]) for r in mine if r["method"] == method and r["seed"] == seed)
                wide = method == "backprop"  # drawn wide and pale: CGE lies on top of it
                ax.plot(*zip(*pts), color=colours[method], marker="o", markersize=3,
                        linewidth=4 if wide else 1.5, alpha=0.4 if wide else 1.0,
                        linestyle="-" if s_i == 0 else "--", label=f"{labels[method]} seed {seed}")
        ax.set(title=f"{model} ({mine[0]['params']:,} params)", xlabel="epoch", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def resnet_table(recs: list[dict]) -> str:
    lines = ["| method | active coordinates | steps | epochs | test accuracy | minutes (training) |",
             "|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(r["method"] for r in recs))
    common = min(max(r["step"] for r in recs if r["method"] == m) for m in methods)
    for m in methods:
        r = max((r for r in recs if r["method"] == m and r["step"] <= common), key=lambda r: r["step"])
        lines.append(f"| {m} | {r['active']:,} | {r['step']} | {r['epoch']:.3f} | {r['test']:.2f} | "
                     f"{r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def plot_resnet(recs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"deepzero": "tab:green", "backprop-masked": "tab:blue", "backprop": "tab:gray"}
    labels = {"deepzero": "DeepZero (sparse CGE, 90%)", "backprop-masked": "first-order, same masks",
              "backprop": "first-order, dense"}
    for m in dict.fromkeys(r["method"] for r in recs):
        pts = sorted((r["step"], r["test"]) for r in recs if r["method"] == m)
        ax.plot(*zip(*pts), marker="o", markersize=3, color=colours.get(m), label=labels.get(m, m))
    ax.set(xlabel="step", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def from_log(args) -> None:
    records = read_log(args.from_log)
    out = Path(args.figures)
    fig2a, cfg = latest_invocation(records, "fig2a")
    if fig2a:
        table, _ = fig2a_tables(fig2a)
        seeds = sorted({r["seed"] for r in fig2a})
        print(f"Fig. 2a in small ({cfg['train_examples']} training images, {cfg['test_examples']} test images, "
              f"batch {cfg['args']['batch_size']}, lr {cfg['args']['lr']}, seeds {seeds}); "
              "test accuracy (%), mean over seeds (each seed):\n")
        print(table + "\n")
        plot_fig2a(fig2a, out / "deepzero_fig2a_fmnist.png",
                   f"DeepZero Fig. 2a in small: Fashion-MNIST, {cfg['train_examples']} training images")
    resnet, cfg = latest_invocation(records, "resnet")
    if resnet:
        print(f"ResNet-20, {cfg['args']['sparsity']:.1%} gradient sparsity ({cfg['train_examples']} training "
              f"images, {cfg['test_examples']} test images, batch {cfg['args']['batch_size']}):\n")
        print(resnet_table(resnet) + "\n")
        plot_resnet(resnet, out / "deepzero_resnet20_fmnist.png",
                    f"ResNet-20 on Fashion-MNIST, batch {cfg['args']['batch_size']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", choices=("cost", "fig2a", "resnet"))
    parser.add_argument("--from-log", type=Path, help="build the tables and figures from this log")
    parser.add_argument("--figures", default=str(Path(__file__).parent.parent / "docs"))
    parser.add_argument("--log", type=Path, default=LOG)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--models", nargs="+", default=list(FIG2A_MODELS))
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=0, help="0: the whole test set")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="resnet: training steps")
    parser.add_argument("--eval-every", type=int, default=4, help="resnet: steps between evaluations")
    parser.add_argument("--evals-per-epoch", type=int, default=4, help="fig2a: test evaluations per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=28, help="area-downsample the images to this")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--eps", type=float, default=5e-3)
    parser.add_argument("--query-batch", type=int, default=16,
                        help="CGE queries per call (bitwise equal for every value; 1 = plain feature reuse)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="resnet")
    parser.add_argument("--sparsity", type=float, default=0.9, help="resnet")
    parser.add_argument("--redraw-epochs", type=int, default=5, help="resnet: mask re-draw interval")
    parser.add_argument("--repeats", type=int, default=2, help="cost: steps timed per (model, method)")
    parser.add_argument("--resnet-batch-sizes", type=int, nargs="*", default=[],
                        help="cost: predict the ResNet-20 sparse-CGE step at these batch sizes")
    parser.add_argument("--budget-min", type=float, default=0.0, help="stop starting work after this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.from_log:
        return from_log(args)
    if args.part is None:
        parser.error("give a part (cost, fig2a, resnet) or --from-log")
    if args.methods is None:
        args.methods = (["deepzero", "backprop-masked", "backprop"] if args.part == "resnet"
                        else [] if args.part == "cost" and args.resnet_batch_sizes else list(FIG2A_METHODS))
    {"cost": run_cost, "fig2a": run_fig2a, "resnet": run_resnet}[args.part](args)


if __name__ == "__main__":
    main()
