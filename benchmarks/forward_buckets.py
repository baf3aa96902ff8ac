"""Forward time of a training batch, padded once against split into length buckets.

For each task, the same training batches (``zotune.train.BatchSampler``, seed 0) are scored with
``CandidateScorer(bucket_overhead=c)`` for every c in ``--overheads`` ("none" = one padded call),
the settings interleaved batch by batch so that drift of the machine hits them alike. Prints one
JSON line per (task, setting): median seconds per batch, the ratio to one padded call, padded
tokens per batch and calls per batch; writes the table to docs/benchmarks.md.

    python benchmarks/forward_buckets.py --data-dir ../shared/data
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

from zotune.models import load_model  # noqa: E402
from zotune.objectives import CPU_CALL_OVERHEAD_TOKENS, CandidateScorer  # noqa: E402
from zotune.tasks import get_task  # noqa: E402
from zotune.train import BatchSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def count_calls(scorer, batch):
    """(model calls, padded tokens) of one scoring of ``batch``."""
    shapes = []
    hook = scorer.model.register_forward_hook(
        lambda m, a, kw, out: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        with torch.no_grad():
            scorer.classification_loss(batch)
    finally:
        hook.remove()
    return len(shapes), sum(r * c for r, c in shapes)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=os.environ.get("ZOTUNE_DATA"))
    p.add_argument("--tasks", nargs="*", default=["sst2", "rte"])
    p.add_argument("--batches", type=int, nargs="*", default=[8, 4], help="batches per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--overheads", nargs="*", default=["none", "0", "16", "32", "64", "128"])
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args()
    model, tok = load_model(args.model)
    model.eval()
    settings = [None if o == "none" else float(o) for o in args.overheads]
    rows = []
    for task_name, n_batches in zip(args.tasks, args.batches + args.batches[-1:] * len(args.tasks)):
        data = get_task(task_name).load(args.data_dir, seed=0)
        sampler = BatchSampler(len(data.train), args.batch_size, 0)
        batches = [[data.train[i] for i in sampler.indices(t)] for t in range(n_batches)]
        scorers = [CandidateScorer(model, tok, bucket_overhead=c) for c in settings]
        with torch.no_grad():
            scorers[0].classification_loss(batches[0])  # warm-up
            times = [[] for _ in settings]
            for batch in batches:
                for k, scorer in enumerate(scorers):
                    start = time.perf_counter()
                    scorer.classification_loss(batch)
                    times[k].append(time.perf_counter() - start)
        base = statistics.median(times[0]) if settings[0] is None else None
        for c, scorer, ts in zip(settings, scorers, times):
            calls, tokens = zip(*(count_calls(scorer, b) for b in batches))
            row = {"task": task_name, "bucket_overhead": "none" if c is None else c,
                   "s_per_batch": statistics.median(ts), "ratio_to_one_call":
                   statistics.median(ts) / base if base else None,
                   "calls_per_batch": statistics.mean(calls), "padded_tokens_per_batch": statistics.mean(tokens)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    lines = ["## Length-bucketed forward (`benchmarks/forward_buckets.py`)", "",
             f"Command: `python benchmarks/forward_buckets.py {' '.join(sys.argv[1:])}`".replace("  ", " "), "",
             f"{args.model}, batches of {args.batch_size} training examples in MeZO's prompt format, "
             "scored by the fast path (one row per example for single-token verbalizers), fp32, "
             f"{torch.get_num_threads()} CPU threads, the settings interleaved batch by batch; median "
             f"seconds per batch. The default on CPU is an overhead of {CPU_CALL_OVERHEAD_TOKENS} "
             "tokens per call.", "",
             "| task | bucket overhead (tokens) | s per batch | ratio to one padded call | calls per batch "
             "| padded tokens per batch |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio_to_one_call']:.2f}" if r["ratio_to_one_call"] else ""
        lines.append(f"| {r['task']} | {r['bucket_overhead']} | {r['s_per_batch']:.3f} | {ratio} | "
                     f"{r['calls_per_batch']:.1f} | {r['padded_tokens_per_batch']:.0f} |")
    write_section(Path(args.out), "\n".join(lines) + "\n", "forward_buckets")


if __name__ == "__main__":
    main()
