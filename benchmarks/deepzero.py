"""DeepZero's CGE per step: no reuse, feature reuse, batched queries, two processes, side by side (issue 15).

The 12,610-parameter CNN of DeepZero's family (``cnn-12610``: five conv/BN/ReLU/pool stages of
width 18 and a linear head, RGB 32x32 inputs as CIFAR-10), train mode, one thread. Each step is a
whole (sparse) CGE step through ``ZOOptimizer`` (method ``cge``, or ``deepzero`` with
``--sparsity``): the base query and one query per active coordinate, then the SGD update. Modes
(``--modes``, default ``plain,reuse``, the original comparison):

* ``plain``: a full forward per query;
* ``reuse``: :class:`zotune.models.reuse.ChainLoss`, which restarts each forward at the block of
  the moved coordinate;
* ``batched``: :class:`zotune.models.query_batch.QueryBatchLoss`, feature reuse with P queries of
  one block per vmap call (``--query-batch``: an integer, or ``auto``: measured per block on the
  first step, which is then left out of the median);
* ``delta``: ``batched`` with ``QueryBatch(exact=False)``: a first-stage query's next convolution
  is updated incrementally (base pre-activation plus one input channel per query,
  ``models/channel_moves.py``), equal to ``batched`` within fp32 round-off, not bitwise;
* ``pertp2``: ``batched`` on two processes (``--parallel pertp``, gloo on 127.0.0.1): coordinate
  shards balanced by measured cost, losses all-gathered. The two ranks are started once and wait
  for a line on stdin per step, so their steps interleave with the others' (while one mode runs,
  the others are idle). Reported: the wall time of a step as the driver sees it, and each rank's
  CPU time for it.

All modes run interleaved step by step (plain, reuse, batched, pertp2, plain, ...) on copies of
one initialisation and the same batches; medians reported. At the end the parameters are compared:
reuse against plain (bitwise), batched against reuse and pertp2 against batched (bitwise, or the
largest difference).

    python benchmarks/deepzero.py --batch-size 32 --sparsity 0.9 --steps 3
    python benchmarks/deepzero.py --modes plain,reuse,batched,pertp2 --query-batch auto --steps 4
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zotune import ZOOptimizer
from zotune.models.query_batch import QueryBatch, QueryBatchLoss
from zotune.models.reuse import ChainLoss
from zotune.models.vision import OnePassStatistics, deepzero_cnn

MODES = ("plain", "reuse", "batched", "delta", "pertp2")
BATCHED = ("batched", "delta", "pertp2")  # the modes whose first step measures P under auto


def batches(args):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(args.batch_size, 3, 32, 32, generator=g),
             torch.randint(0, 10, (args.batch_size,), generator=g)) for _ in range(args.steps)]


def build(args, parallel=None):
    torch.manual_seed(0)
    model = deepzero_cnn(args.params).train()
    method = "cge" if args.sparsity == 0 else "deepzero"
    kw = {} if args.sparsity == 0 else {"sparsity": args.sparsity}
    if parallel is not None:
        kw["parallel"] = parallel
    opt = ZOOptimizer(model, lr=0.05, eps=5e-3, method=method, **kw)
    return model, OnePassStatistics(model), opt


def query_batch(text: str):
    return text if text == "auto" else int(text)


def objective(mode, model, x, y, size):
    """``size``: the QueryBatch of the mode (batched, delta)."""
    if mode == "plain":
        return lambda: F.cross_entropy(model(x), y)
    if mode == "reuse":
        return ChainLoss(model, x, y)
    return QueryBatchLoss(model, x, y, query_batch=size)


# ---------------------------------------------------------------- the two ranks of pertp2
def worker(args) -> None:
    """One rank: a step per line read on stdin, ``wall cpu`` written back; final state saved."""
    from zotune.distributed import init, shutdown

    torch.set_num_threads(1)
    topo = init("pertp")
    model, stats, opt = build(args, topo)
    size = QueryBatch(query_batch(args.query_batch))
    data = batches(args)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        x, y = data[opt.steps_taken]
        w0, c0 = time.perf_counter(), time.process_time()
        opt.step(stats.wrap(objective("batched", model, x, y, size)))
        print(f"{time.perf_counter() - w0} {time.process_time() - c0}", flush=True)
    opt.flush()
    if topo.rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.worker)
    shutdown()


class Ranks:
    """The two pertp2 ranks, started once, ended by pid."""

    def __init__(self, args, state_file: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, __file__, "--worker", str(state_file), "--params", str(args.params),
                "--batch-size", str(args.batch_size), "--sparsity", str(args.sparsity),
                "--steps", str(args.steps), "--query-batch", args.query_batch]
        self.procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for r in range(2)]

    def step(self) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        for p in self.procs:
            p.stdin.write("step\n")
            p.stdin.flush()
        cpu = [float(p.stdout.readline().split()[1]) for p in self.procs]
        return time.perf_counter() - t0, cpu

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write("quit\n")
                p.stdin.close()
                p.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


def largest_difference(a: dict, b: dict) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a.values(), b.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=12610)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default="plain,reuse", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--query-batch", default="auto", help="P of batched and pertp2: an integer or auto")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"unknown mode {bad[0]!r}; valid: {', '.join(MODES)}")
    torch.set_num_threads(1)
    data = batches(args)
    sizes = {"batched": QueryBatch(query_batch(args.query_batch)),
             "delta": QueryBatch(query_batch(args.query_batch), exact=False)}
    size = sizes["batched"]
    runs = {m: (*build(args), []) for m in modes if m != "pertp2"}
    state_file = Path(f"/tmp/deepzero-bench-{os.getpid()}.pt")
    ranks = Ranks(args, state_file) if "pertp2" in modes else None
    cpu_times: list[list[float]] = []
    cpu_of: dict[str, list[float]] = {}  # CPU seconds per step of the in-process modes
    try:
        for x, y in data:
            for mode in modes:
                if mode == "pertp2":
                    wall, cpu = ranks.step()
                    cpu_times.append(cpu)
                    runs.setdefault("pertp2", (None, None, None, []))[3].append(wall)
                    continue
                model, stats, opt, times = runs[mode]
                t0, c0 = time.perf_counter(), time.process_time()
                opt.step(stats.wrap(objective(mode, model, x, y, sizes.get(mode))))
                times.append(time.perf_counter() - t0)
                cpu_of.setdefault(mode, []).append(time.process_time() - c0)
    finally:
        if ranks is not None:
            ranks.close()
    # The batched modes' first step also runs the once-per-shape exactness checks (and, under auto,
    # the timing trials): it is left out of their medians when there are steps enough (shown in the list).
    skip = 1 if args.steps > 2 or (args.query_batch == "auto" and args.steps > 1) else 0
    med = {m: statistics.median(r[3][skip if m in BATCHED else 0:]) for m, r in runs.items()}
    opt0 = next(r[2] for r in runs.values() if r[2] is not None) if any(r[2] for r in runs.values()) else None
    queries = opt0.forward_passes // args.steps if opt0 is not None else None
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else [f"{os.getloadavg()[0]:.2f}"]
    print(f"cnn-{args.params}, batch {args.batch_size}, sparsity {args.sparsity}: {queries} queries/step; "
          f"load average {' '.join(load)}")
    if "plain" in runs and "reuse" in runs:
        (ma, _, _, ta), (mb, _, _, tb) = runs["plain"], runs["reuse"]
        exact = all(torch.equal(a, b) for a, b in zip(ma.state_dict().values(), mb.state_dict().values()))
        print(f"plain {med['plain']:.2f} s/step, reuse {med['reuse']:.2f} s/step, speed-up "
              f"{med['plain'] / med['reuse']:.2f}x; bitwise equal: {exact}")
    base = med.get("plain")
    for mode in modes:
        extra = ""
        if mode == "batched" and "reuse" in runs:
            extra = (f"; {med['reuse'] / med['batched']:.2f}x reuse; chosen P per block "
                     f"{dict(sorted(size.chosen.items())) or size.size}; largest parameter difference "
                     f"from reuse {largest_difference(runs['reuse'][0].state_dict(), runs['batched'][0].state_dict()):.3g}")
        if mode == "delta" and "reuse" in runs:
            gaps = sizes["delta"].stacking.deviations
            extra = (f"; {med['reuse'] / med['delta']:.2f}x reuse; chosen P per block "
                     f"{dict(sorted(sizes['delta'].chosen.items())) or sizes['delta'].size}; largest "
                     f"parameter difference from reuse {largest_difference(runs['reuse'][0].state_dict(), runs['delta'][0].state_dict()):.3g}; "
                     f"incremental forms kept {sum(v for k, v in sizes['delta'].stacking.checks.items() if k[0] == 'delta')}"
                     f"/{sum(1 for k in sizes['delta'].stacking.checks if k[0] == 'delta')}, largest checked gap "
                     f"{max(gaps.values(), default=0):.2g}")
        if mode == "pertp2":
            cpu = [statistics.median(c[r] for c in cpu_times[skip:]) for r in range(2)]
            extra = f"; CPU s/step per rank {cpu[0]:.2f}, {cpu[1]:.2f}"
            if "batched" in runs:
                extra += f"; {med['batched'] / med['pertp2']:.2f}x batched"
                if state_file.exists():
                    theirs = torch.load(state_file, weights_only=True)
                    extra += (f"; largest parameter difference from batched "
                              f"{largest_difference(runs['batched'][0].state_dict(), theirs):.3g}")
        if mode in cpu_of:
            cpu = statistics.median(cpu_of[mode][skip if mode in BATCHED else 0:])
            extra += f"; CPU {cpu:.2f} s/step"
            if mode in BATCHED and "reuse" in cpu_of:
                extra += f" ({statistics.median(cpu_of['reuse']) / cpu:.2f}x reuse's CPU)"
        steps = ", ".join(f"{t:.2f}" for t in runs[mode][3])
        ratio = f", {base / med[mode]:.2f}x plain" if base else ""
        print(f"  {mode:8s} {med[mode]:7.2f} s/step (steps: {steps}){ratio}{extra}")
    state_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
