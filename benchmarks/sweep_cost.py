"""The engine's own cost per step, without the forward: sweeps and draws only.

The closure returns scripted losses (no model call), so a step costs only what the engine does:
regenerating directions and moving the parameters. Timed for the faithful MeZO reference and for
zotune with each direction, side by side in one run, on the embedded SmolLM2-135M (fp32, full
parameters); prints one JSON line per measurement with the ratio to the reference.

It uses only the public optimizer API, so the same file measures older commits too, e.g.::

    python benchmarks/sweep_cost.py
    git worktree add ../v1 3f5758c && (cd ../v1 && PYTHONPATH=src python ../main/benchmarks/sweep_cost.py)
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import zotune
from zotune._reference import MeZOReference
from zotune.models import load_model


def median_step(step, repeats: int) -> float:
    step()  # warm-up: thread pool, buffers, pools
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--directions", nargs="+", default=["gaussian", "pooled"])
    args = parser.parse_args()
    model, _ = load_model(args.model)
    model.requires_grad_(True)
    losses = itertools.cycle([1.0, 1.5, 0.7, 1.2])  # nonzero differences: every draw happens
    loss = lambda: next(losses)  # noqa: E731
    reference = MeZOReference(model.named_parameters(), lr=1e-9, eps=1e-3, seed=0)
    ref = median_step(lambda: reference.step(loss), args.repeats)
    print(json.dumps({"what": "reference", "seconds": ref, "code": zotune.__file__}), flush=True)
    for direction, defer in itertools.product(args.directions, (False, True)):
        opt = zotune.ZOOptimizer(model.named_parameters(), lr=1e-9, eps=1e-3, seed=0,
                                 direction=direction, defer_update=defer)
        seconds = median_step(lambda: opt.step(loss), args.repeats)
        opt.flush()
        print(json.dumps({"what": "zotune", "direction": direction, "defer_update": defer,
                          "seconds": seconds, "vs_reference": seconds / ref}), flush=True)


if __name__ == "__main__":
    main()
