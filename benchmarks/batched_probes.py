"""Batched probe evaluation (engine="batched") against sequential points (engine="in-memory").

SmolLM2-135M, one SST-2 training batch in MeZO's prompt format, MeZO's classification loss, fp32,
one thread. For each trainable scheme (full, LoRA) and method (FZOO-code: 9 points; MeZO: 2), the
step time of each engine setting, measured interleaved (A, B, C, A, B, C, ...; medians), the
losses of the settings compared (lr 0, so every step is at the same point), and the memory:
the bytes of the per-point weight stacks and the peak resident memory above the process's before
the setting's steps (sampled every 5 ms).

    python benchmarks/batched_probes.py --data-dir ../shared/data --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import write_section  # noqa: E402

from zotune import ZOOptimizer  # noqa: E402
from zotune.models import load_model, select_trainable  # noqa: E402
from zotune.objectives import CandidateScorer  # noqa: E402
from zotune.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """The peak resident memory while the ``with`` block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(args, data, trainable, method, settings):
    model, tok = load_model(args.model)
    model = select_trainable(model, trainable, seed=0)
    model.eval()
    scorer = CandidateScorer(model, tok)
    batch = data.train[: args.batch]
    probes = {"num_probes": args.num_probes} if args.num_probes and method.startswith("fzoo") else {}
    opts = {name: ZOOptimizer(model, lr=0.0, eps=1e-3, method=method, seed=0, defer_update=True, **probes,
                              **options) for name, options in settings.items()}
    times = {name: [] for name in settings}
    losses = {name: [] for name in settings}
    peaks = {name: 0 for name in settings}
    for rep in range(args.repeats + 1):  # the first round warms up
        for name, opt in opts.items():
            before = rss()
            with PeakRSS() as peak:
                start = time.perf_counter()
                opt.step(lambda: scorer.classification_loss(batch))
                elapsed = time.perf_counter() - start
            opt.flush()
            if rep:
                times[name].append(elapsed)
                losses[name].append(list(opt.last_losses))
            peaks[name] = max(peaks[name], peak.peak - before)
    ref = next(iter(settings))
    rows = []
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    for name, opt in opts.items():
        diff = max(abs(a - b) / abs(b) for la, lb in zip(losses[name], losses[ref]) for a, b in zip(la, lb))
        rows.append({"trainable": trainable, "method": method, "setting": name,
                     "points": len(opt.last_losses),
                     "step_s": statistics.median(times[name]), "times": times[name],
                     "ratio": statistics.median(times[name]) / statistics.median(times[ref]),
                     "max_rel_loss_diff": diff, "stack_bytes": getattr(opt.engine, "stack_bytes", 0),
                     "trainable_bytes": trainable_bytes, "peak_rss_over_before": peaks[name],
                     "loadavg": Path("/proc/loadavg").read_text().split()[:3]})
        print(json.dumps(rows[-1]), flush=True)
    for opt in opts.values():
        opt.engine.close()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=os.environ.get("ZOTUNE_DATA"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trainable", nargs="*", default=["lora", "full"])
    p.add_argument("--methods", nargs="*", default=["fzoo-code", "mezo"])
    p.add_argument("--num-probes", type=int, help="FZOO's N (default 8)")
    p.add_argument("--groups", action="store_true", help="also batched with 3 points per forward")
    p.add_argument("--log", default=str(ROOT / "benchmarks" / "logs" / "batched_probes.jsonl"))
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args()
    torch.set_num_threads(1)
    data = get_task("sst2").load(args.data_dir, seed=0)
    rows = []
    for trainable in args.trainable:
        for method in args.methods:
            settings = {"sequential (in-memory)": {}, "batched, all points": {"engine": "batched"}}
            if method.startswith("fzoo") and args.groups:
                settings["batched, 3 points per forward"] = {"engine": "batched", "points_per_forward": 3}
            rows += measure(args, data, trainable, method, settings)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    cmd = "python benchmarks/batched_probes.py " + " ".join(sys.argv[1:])
    table = ["| trainable | method | points | setting | s per step (median) | ratio to sequential | "
             "max rel. loss difference | weight stacks (MB) | peak RSS over before (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['trainable']} | {r['method']} | {r['points']} | {r['setting']} | {r['step_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['max_rel_loss_diff']:.1e} | {r['stack_bytes'] / 1e6:.1f} | "
                     f"{r['peak_rss_over_before'] / 1e6:.0f} |")
    text = (f"## Batched probe evaluation (`benchmarks/batched_probes.py`)\n\nCommand: `{cmd.strip()}`\n\n"
            f"SmolLM2-135M, {args.batch} SST-2 training examples in MeZO's prompt format, classification "
            f"loss, fp32, one thread, lr 0 (every step at the same point), {args.repeats} interleaved "
            f"repeats after a warm-up round; load average at the end: {rows[-1]['loadavg']}.\n\n"
            + "\n".join(table) + "\n")
    write_section(Path(args.out), text, "batched_probes")


if __name__ == "__main__":
    main()
