"""ZO-GraSP's layer-wise ratios against first-order GraSP's, on Fashion-MNIST (issue 15, item 2).

For each model (at its seeded initialisation, as ``zotune train`` builds it) and a class-balanced
batch of 25 training images per class, the layer-wise pruning ratios at one overall sparsity from:

* ``zo-grasp`` (seeds 0 and 1): DeepZero's ZO-GraSP, q = 192, mu = 5e-3 (``zotune.sparsity``);
* ``grasp``: first-order GraSP by autograd, temperature 1 (the same loss) and 200 (DeepZero's
  first-order baseline);
* ``noise``: the score ``|theta_i| |xi_i| / sqrt(d_l)`` with Gaussian xi and nothing from the
  data: what ZO-GraSP's score reduces to when its Hessian-gradient estimate is pure noise
  (docs/methods.md), to test that reading;
* uniform (every layer at the target).

Printed: the ratios per layer and, for every pair, the size-weighted mean absolute difference of
the ratios (0 = identical; uniform vs X measures how far X is from uniform).

    python benchmarks/grasp_ratios.py --models cnn:19 resnet20 --sparsity 0.9
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from zotune import rng
from zotune.models.vision import build_model
from zotune.sparsity import grasp_scores, layer_ratios, prunable, zo_grasp_scores
from zotune.sparsity.grasp import class_balanced
from zotune.tasks.images import IMAGE_TASKS, normalise


def build(spec: str, data, seed: int):
    name, _, width = spec.partition(":")
    with torch.random.fork_rng():  # as train_images builds it
        torch.manual_seed(rng.mix(seed, 0x4D4F44454C))
        options = {"width": int(width)} if width else {}
        return build_model(name, data.num_classes, data.in_channels, **options)


def noise_ratios(model, sparsity: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    scores = {n: w.detach().double().abs() * torch.randn(w.shape, generator=g, dtype=torch.float64).abs()
              / w.numel() ** 0.5 for n, w in prunable(model).items()}
    return layer_ratios(scores, sparsity)


def gap(a: dict, b: dict, sizes: dict) -> float:
    return sum(abs(a[n] - b[n]) * sizes[n] for n in sizes) / sum(sizes.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn:19", "resnet20"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-probes", type=int, default=192)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = IMAGE_TASKS["fashion-mnist"](os.environ.get("ZOTUNE_DATA"))
    x, y = class_balanced(data.train_images, data.train_labels, 25, args.seed, data.num_classes)
    x = normalise(x, "fashion-mnist")
    for spec in args.models:
        model = build(spec, data, args.seed)
        sizes = {n: w.numel() for n, w in prunable(model).items()}
        t0 = time.perf_counter()
        runs = {f"zo-grasp s{s}": layer_ratios(zo_grasp_scores(model, x, y, num_probes=args.num_probes, seed=s),
                                               args.sparsity) for s in (0, 1)}
        zo_time = (time.perf_counter() - t0) / 2
        runs["grasp T=1"] = layer_ratios(grasp_scores(model, x, y), args.sparsity)
        runs["grasp T=200"] = layer_ratios(grasp_scores(model, x, y, temperature=200.0), args.sparsity)
        runs["noise"] = noise_ratios(model, args.sparsity, args.seed)
        runs["uniform"] = {n: args.sparsity for n in sizes}
        print(f"\n{spec}: {sum(sizes.values()):,} prunable weights, sparsity {args.sparsity}, "
              f"{len(y)} images, ZO-GraSP {zo_time:.1f} s a run; load average {os.getloadavg()[0]:.2f}")
        names = list(runs)
        print("| layer | size | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for n in sizes:
            print(f"| {n} | {sizes[n]:,} | " + " | ".join(f"{runs[k][n]:.3f}" for k in names) + " |")
        print("\nsize-weighted mean |ratio difference|:")
        print("| | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for a in names:
            print(f"| {a} | " + " | ".join(f"{gap(runs[a], runs[b], sizes):.3f}" for b in names) + " |")


if __name__ == "__main__":
    main()
