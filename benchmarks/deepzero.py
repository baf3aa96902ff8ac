"""DeepZero's CGE per step without and with feature reuse, side by side (issue 15, speed part 1).

The 12,610-parameter CNN of DeepZero's family (``cnn-12610``: five conv/BN/ReLU/pool stages of
width 18 and a linear head, RGB 32x32 inputs as CIFAR-10), train mode, one thread. Each step is a
whole (sparse) CGE step through ``ZOOptimizer`` (method ``cge``, or ``deepzero`` with
``--sparsity``): the base query and one query per active coordinate, then the SGD update. Plain:
a full forward per query. Reuse: :class:`zotune.models.reuse.ChainLoss`, which restarts each
forward at the block of the moved coordinate. The two run interleaved (plain, reuse, plain, ...)
on two copies of one initialisation and the same batches; medians reported, and the two runs'
parameters are checked bitwise equal at the end (reuse is exact).

    python benchmarks/deepzero.py --batch-size 32 --sparsity 0.9 --steps 3

A dense step (``--sparsity 0``) is 12,611 forwards; the default sparse step keeps the relative
share of every block (uniform masks; BN parameters and the head's bias in full), so its ratio is
the dense one's up to the always-estimated tensors.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from zotune import ZOOptimizer
from zotune.models.reuse import ChainLoss
from zotune.models.vision import OnePassStatistics, deepzero_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=12610)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=g),
                torch.randint(0, 10, (args.batch_size,), generator=g)) for _ in range(args.steps)]
    runs = {}
    for name in ("plain", "reuse"):
        torch.manual_seed(0)
        model = deepzero_cnn(args.params).train()
        method = "cge" if args.sparsity == 0 else "deepzero"
        kw = {} if args.sparsity == 0 else {"sparsity": args.sparsity}
        runs[name] = (model, OnePassStatistics(model), ZOOptimizer(model, lr=0.05, eps=5e-3, method=method, **kw), [])
    for x, y in batches:
        for name, (model, stats, opt, times) in runs.items():
            objective = ChainLoss(model, x, y) if name == "reuse" else (lambda m=model: F.cross_entropy(m(x), y))
            t0 = time.perf_counter()
            opt.step(stats.wrap(objective))
            times.append(time.perf_counter() - t0)
    (ma, _, oa, ta), (mb, _, _, tb) = runs["plain"], runs["reuse"]
    exact = all(torch.equal(a, b) for a, b in zip(ma.state_dict().values(), mb.state_dict().values()))
    plain, reuse = statistics.median(ta), statistics.median(tb)
    queries = oa.forward_passes // args.steps
    print(f"cnn-{args.params}, batch {args.batch_size}, sparsity {args.sparsity}: {queries} queries/step; "
          f"plain {plain:.2f} s/step, reuse {reuse:.2f} s/step, speed-up {plain / reuse:.2f}x; "
          f"bitwise equal: {exact}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
