"""ElasticZO-INT8 against FP32 ElasticZO on Fashion-MNIST / LeNet-5, measured side by side.

For each split (1, 2, 3 backprop layers) and seed, with the same batches (``tasks.images.Batches``,
a pure function of (seed, step)), the same initial model and the same number of steps:

  int8   ElasticZO-INT8 (``zotune.quant``): integer forward, integer CE, Rademacher +-1 LSB,
         quantised ZO gradient, stochastic-rounding updates, integer backprop tail;
  fp32   zotune's FP32 ElasticZO (``--method elasticzo``: ZOOptimizer, Gaussian z, SGD tail);
  lean   (time and memory only) the simplest FP32 ElasticZO, written out below: MeZO-style
         in-place +-eps z on the head with a shared Gaussian z, autograd SGD on the tail. It has
         none of the library's engine overhead, so it is the fair arithmetic baseline.

Measured: test accuracy (all 10,000 test images) after the steps; peak memory of a training step
(``zotune.memory.peak_bytes``: every allocation and free of the CPU allocator in time order,
plus the training state held between steps: int8 parameters for int8, float parameters for the
FP32 ones; the input batch is excluded for all); time per step, one thread, the methods
interleaved step by step (medians of thread CPU time, and of wall time); and the raw GEMM speed of ``torch._int_mm`` against fp32
``torch.mm`` on LeNet-5's own product shapes, interleaved too.

    python benchmarks/elasticzo_int8.py --data-dir /work/shared/data --steps 3000 --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from zotune import rng
from zotune.image_trainers import build_trainer
from zotune.memory import model_bytes, peak_bytes
from zotune.models.vision import lenet5
from zotune.tasks.images import Batches, load_fashion_mnist, normalise


class LeanElasticZO:
    """The simplest FP32 ElasticZO: ZO (SPSA, one shared Gaussian z, regenerated from a per-step
    seed MeZO-style: +eps, -2 eps, +eps in place) on the head, plain SGD by autograd on the last
    ``bp_layers`` parametrised layers, tail gradient averaged over the two passes."""

    def __init__(self, model: nn.Sequential, options: dict):
        self.model, self.lr, self.lr_bp, self.eps = model, options["lr"], options["lr_bp"], options["eps"]
        self.seed = options["seed"]
        children = list(model)
        param_idx = [i for i, m in enumerate(children) if any(True for _ in m.parameters())]
        self.cut = param_idx[len(param_idx) - options["bp_layers"]] if options["bp_layers"] else len(children)
        self.head = nn.Sequential(*children[:self.cut])
        self.tail = nn.Sequential(*children[self.cut:])
        self.head_params = list(self.head.parameters())
        for p in self.head_params:
            p.requires_grad_(False)
        self.step_count = 0

    def _perturb(self, scale: float) -> None:
        for i, p in enumerate(self.head_params):
            z = torch.randn(p.shape, generator=rng.generator(rng.mix(self.seed, self.step_count, i)))
            p.add_(z, alpha=scale)

    def _pass(self, images, labels):
        with torch.no_grad():
            h = self.head(images)
        loss = F.cross_entropy(self.tail(h), labels)
        if any(True for _ in self.tail.parameters()):
            loss.backward()  # grads accumulate over both passes
        return float(loss.detach())

    def step(self, images, labels) -> float:
        self._perturb(self.eps)
        plus = self._pass(images, labels)
        self._perturb(-2 * self.eps)
        minus = self._pass(images, labels)
        self._perturb(self.eps)
        g = (plus - minus) / (2 * self.eps)
        self._perturb(-self.lr * g)  # theta -= lr * g * z, the same z
        with torch.no_grad():
            for p in self.tail.parameters():
                p.add_(p.grad, alpha=-self.lr_bp / 2)
                p.grad = None
        self.step_count += 1
        return (plus + minus) / 2


def build(method: str, model: nn.Module, options: dict):
    if method == "lean":
        return LeanElasticZO(model, options)
    return build_trainer({"int8": "elasticzo-int8", "fp32": "elasticzo"}[method], model, options)


def fresh_model(seed: int) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(rng.mix(seed, 0x4D4F44454C))
        return lenet5()


def state_bytes(trainer, model) -> int:
    return trainer.state_bytes() if hasattr(trainer, "state_bytes") else model_bytes(model)


def accuracy(trainer, data, batch_size=1000) -> float:
    correct = 0
    for s in range(0, len(data.test_images), batch_size):
        x = normalise(data.test_images[s:s + batch_size], "fashion-mnist")
        correct += int((trainer.logits(x).argmax(-1) == data.test_labels[s:s + batch_size]).sum())
    return 100.0 * correct / len(data.test_images)


def measure_memory(method, options, batches) -> dict:
    model = fresh_model(0)
    warm = build(method, fresh_model(0), options)
    warm.step(*batches.batch(0))
    trainer = build(method, model, options)
    step_peak = peak_bytes(lambda: [trainer.step(*batches.batch(s)) for s in range(2)])
    state = state_bytes(trainer, model)
    return {"state_bytes": state, "step_peak_bytes": step_peak, "peak_bytes": state + step_peak}


def measure_time(methods, options, batches, rounds: int) -> dict:
    """Per-step CPU time of this thread (``time.thread_time``: immune to preemption by other
    processes on a loaded machine; one torch thread, so all the work is on it) and wall time,
    methods interleaved step by step on the same batches; medians over ``rounds`` steps."""
    trainers = {m: build(m, fresh_model(0), options) for m in methods}
    for m in methods:  # warm-up
        trainers[m].step(*batches.batch(0))
    cpu, wall = {m: [] for m in methods}, {m: [] for m in methods}
    for r in range(rounds):
        x, y = batches.batch(1 + r)
        for m in methods:
            c0, t0 = time.thread_time(), time.perf_counter()
            trainers[m].step(x, y)
            cpu[m].append(time.thread_time() - c0)
            wall[m].append(time.perf_counter() - t0)
    return {"cpu": {m: statistics.median(v) for m, v in cpu.items()},
            "wall": {m: statistics.median(v) for m, v in wall.items()},
            "wall_min": {m: min(v) for m, v in wall.items()}}


def gemm_speed(batch: int, rounds: int = 15) -> list[dict]:
    """``torch._int_mm`` vs fp32 ``torch.mm`` on LeNet-5's products at ``batch`` (interleaved,
    thread CPU time)."""
    shapes = {"conv1 (im2col)": (6, 25, batch * 28 * 32), "conv2 (im2col)": (16, 150, batch * 10 * 14),
              "fc1": (batch, 400, 120), "fc2": (batch, 120, 84), "fc3": (batch, 84, 10)}
    out = []
    g = torch.Generator().manual_seed(0)
    for name, (m, k, n) in shapes.items():
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
        af, bf = a.float(), b.float()
        t_int, t_f = [], []
        for _ in range(rounds):
            for fn, acc in ((lambda: torch._int_mm(a, b), t_int), (lambda: torch.mm(af, bf), t_f)):
                t0 = time.thread_time()
                for _ in range(10):
                    fn()
                acc.append((time.thread_time() - t0) / 10)
        ti, tf = statistics.median(t_int), statistics.median(t_f)
        out.append({"gemm": name, "shape": [m, k, n], "int_mm_us": ti * 1e6, "fp32_mm_us": tf * 1e6,
                    "speedup": tf / ti})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-bp", type=float, default=0.05)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--time-rounds", type=int, default=60)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-timing", action="store_true", help="accuracy runs only (no time/memory/GEMM rows)")
    ap.add_argument("--methods", nargs="+", default=["int8", "fp32"], help="methods of the accuracy runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_fashion_mnist(args.data_dir)
    with open("/proc/loadavg") as f:
        print(json.dumps({"loadavg_start": f.read().split()[:3]}), flush=True)
    for row in [] if args.skip_timing else gemm_speed(args.batch_size):
        print(json.dumps(row), flush=True)
    for k in args.splits:
        options = {"lr": args.lr, "lr_bp": args.lr_bp, "eps": args.eps, "seed": 0, "bp_layers": k,
                   "tail_grad": "avg", "momentum": 0.0, "weight_decay": 0.0}
        batches = Batches(data.train_images, data.train_labels, "fashion-mnist", args.batch_size, 0)
        if not args.skip_timing:
            timing_row(args, options, batches, k)
        if args.skip_accuracy:
            continue
        for seed in args.seeds:
            options = {**options, "seed": seed}
            batches = Batches(data.train_images, data.train_labels, "fashion-mnist", args.batch_size, seed)
            for method in args.methods:
                trainer = build(method, fresh_model(seed), options)
                t0 = time.perf_counter()
                losses = [trainer.step(*batches.batch(s)) for s in range(args.steps)]
                finite = [v for v in losses if math.isfinite(v)]
                print(json.dumps({"bp_layers": k, "seed": seed, "method": method, "steps": args.steps,
                                  "lr": args.lr, "lr_bp": args.lr_bp,
                                  "test_accuracy": accuracy(trainer, data),
                                  "diverged_at": next((i + 1 for i, v in enumerate(losses) if not math.isfinite(v)), None),
                                  "train_loss_last100": sum(losses[-100:]) / 100,
                                  "train_loss_curve": [round(sum(finite[i:i + 250]) / max(1, len(finite[i:i + 250])), 4)
                                                       for i in range(0, len(finite), 250)],
                                  "wall_s": time.perf_counter() - t0}), flush=True)
    with open("/proc/loadavg") as f:
        print(json.dumps({"loadavg_end": f.read().split()[:3]}), flush=True)


def timing_row(args, options, batches, k) -> None:
    """Time (first: a profiler session, the memory measurement, can leave a process slower) and
    memory of int8, fp32 and lean at split ``k``; prints one JSON row."""
    tps = measure_time(("int8", "fp32", "lean"), options, batches, args.time_rounds)
    mem = {m: measure_memory(m, options, batches) for m in ("int8", "fp32", "lean")}
    row = {"bp_layers": k, "memory": mem, "time_per_step_s": tps,
           "memory_ratio_fp32_over_int8": mem["fp32"]["peak_bytes"] / mem["int8"]["peak_bytes"],
           "memory_ratio_lean_over_int8": mem["lean"]["peak_bytes"] / mem["int8"]["peak_bytes"],
           "cpu_time_ratio_fp32_over_int8": tps["cpu"]["fp32"] / tps["cpu"]["int8"],
           "cpu_time_ratio_lean_over_int8": tps["cpu"]["lean"] / tps["cpu"]["int8"],
           "wall_time_ratio_fp32_over_int8": tps["wall"]["fp32"] / tps["wall"]["int8"],
           "wall_time_ratio_lean_over_int8": tps["wall"]["lean"] / tps["wall"]["int8"]}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
