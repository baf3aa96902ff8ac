"""Step time and memory of zotune against the faithful MeZO reference, measured side by side.

On the embedded default model (SmolLM2-135M), full-parameter, a batch of 16 SST-2 training
sentences in MeZO's prompt format (natural lengths, gold label word appended) under the causal LM
loss, all on the same batch in one run:

  (a) one inference forward,
  (b) the reference MeZO step (four allocating draws of z per step, zotune._reference),
  (c) zotune's step for each direction (and with the update deferred into the next perturbation),

and peak resident memory of training against inference, each measured in its own process after
the model is loaded (the high-water mark is reset through /proc/self/clear_refs).

A step's overhead is its time minus two forwards (c - 2a, b - 2a); the script prints one JSON line
per measurement and writes the table to docs/benchmarks.md.

    python benchmarks/step_speed.py --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import zotune
from zotune._reference import MeZOReference
from zotune.models import load_model
from zotune.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
DIRECTIONS = ["gaussian", "rademacher", "uniform", "pooled"]


def sst2_batch(tokenizer, data_dir, size):
    """``size`` SST-2 training examples as MeZO prompt + gold label word, left-padded."""
    train = get_task("sst2").load(data_dir, seed=0).train[:size]
    texts = [e.prompt + e.candidates[e.label] for e in train]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return enc.input_ids, enc.attention_mask, labels


def lm_loss(model, batch):
    ids, mask, labels = batch
    return lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss


def timed(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(record, sink):
    line = json.dumps(record)
    print(line, flush=True)
    sink.append(record)


def measure_speed(args, records):
    model, tokenizer = load_model(args.model)
    model.requires_grad_(True)
    batch = sst2_batch(tokenizer, args.data_dir, args.batch)
    loss = lm_loss(model, batch)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emit({"what": "setup", "model": args.model, "trainable_params": numel, "batch": args.batch,
          "tokens": int(batch[1].sum()), "padded_shape": list(batch[0].shape),
          "threads": torch.get_num_threads()}, records)

    with torch.no_grad():
        forward = timed(loss, args.repeats)
    emit({"what": "forward", "seconds": forward}, records)

    reference = MeZOReference(model.named_parameters(), lr=1e-7, eps=1e-3, seed=0)
    ref_step = timed(lambda: reference.step(loss), args.repeats)
    ref_overhead = ref_step - 2 * forward
    emit({"what": "reference", "seconds": ref_step, "over_2fwd": ref_step / (2 * forward),
          "overhead": ref_overhead, "draws_per_step": 4, "numbers_per_step": 4 * numel}, records)

    for direction in DIRECTIONS:
        for defer in (False, True):
            opt = zotune.ZOOptimizer(model.named_parameters(), lr=1e-7, eps=1e-3, seed=0,
                                     direction=direction, defer_update=defer)
            seconds = timed(lambda: opt.step(loss), args.repeats)
            steps, sweeps = opt.steps_taken, opt.engine.sweeps
            opt.flush()  # a deferred run's last update is drawn here: count it, not its sweep
            numbers = opt.engine.numbers_drawn
            per_element = opt.direction.numbers_per_element
            emit({"what": "zotune", "direction": direction, "defer_update": defer,
                  "seconds": seconds, "over_2fwd": seconds / (2 * forward),
                  "overhead": seconds - 2 * forward,
                  "overhead_vs_reference": (seconds - 2 * forward) / ref_overhead,
                  "sweeps_per_step": sweeps / steps,
                  "draws_per_step": numbers / steps / (numel * per_element) if per_element else 0,
                  "numbers_per_step": numbers / steps}, records)
            opt.engine.close()


def peak_rss_child(args):
    """Child process: load, reset the high-water mark, run the phase, report VmHWM in bytes."""
    model, tokenizer = load_model(args.model)
    model.requires_grad_(True)
    batch = sst2_batch(tokenizer, args.data_dir, args.batch)
    loss = lm_loss(model, batch)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if args.phase == "inference":
        with torch.no_grad():
            for _ in range(3):
                loss()
    else:
        opt = zotune.ZOOptimizer(model.named_parameters(), lr=1e-7, eps=1e-3,
                                 direction=args.phase.split(":")[1])
        for _ in range(3):
            opt.step(loss)
        opt.flush()
    status = Path("/proc/self/status").read_text()
    hwm_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"peak_rss_bytes": hwm_kb * 1024}))


def measure_memory(args, records):
    peaks = {}
    for phase in ["inference"] + [f"train:{d}" for d in ("gaussian", "pooled")]:
        cmd = [sys.executable, __file__, "--phase", phase, "--model", args.model,
               "--batch", str(args.batch)] + (["--data-dir", str(args.data_dir)] if args.data_dir else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[phase] = json.loads(out.strip().splitlines()[-1])["peak_rss_bytes"]
    for phase, peak in peaks.items():
        emit({"what": "memory", "phase": phase, "peak_rss_gib": peak / 2**30,
              "over_inference": peak / peaks["inference"]}, records)


def table(records, command):
    by = {r["what"]: r for r in records if r["what"] in ("setup", "forward", "reference")}
    fwd, ref = by["forward"]["seconds"], by["reference"]
    rows = ["| step | seconds | step / (2 x forward) | overhead (step - 2 fwd) | overhead / reference overhead | parameter sweeps per step | draws of z per step | random numbers per step |",
            "|---|---|---|---|---|---|---|---|",
            f"| one forward (a) | {fwd:.3f} | | | | | | |",
            f"| MeZO reference (b) | {ref['seconds']:.3f} | {ref['over_2fwd']:.2f} | {ref['overhead']:.3f} | 1.00 | 4 (each allocating) | 4 | {ref['numbers_per_step']:.3g} |"]
    for r in records:
        if r["what"] == "zotune":
            name = r["direction"] + (", deferred update" if r["defer_update"] else "")
            rows.append(f"| zotune {name} (c) | {r['seconds']:.3f} | {r['over_2fwd']:.2f} | {r['overhead']:.3f} | "
                        f"{r['overhead_vs_reference']:.2f} | {r['sweeps_per_step']:.0f} | {r['draws_per_step']:.0f} | {r['numbers_per_step']:.3g} |")
    mem = [r for r in records if r["what"] == "memory"]
    if mem:
        rows += ["", "| phase | peak RSS (GiB) | over inference |", "|---|---|---|"]
        rows += [f"| {r['phase']} | {r['peak_rss_gib']:.2f} | {r['over_inference']:.3f} |" for r in mem]
    s = by["setup"]
    head = (f"## Step speed (`benchmarks/step_speed.py`)\n\nCommand: `{command}`\n\n"
            f"{s['model']}, {s['trainable_params']:,} trainable parameters (full), batch {s['batch']} "
            f"SST-2 training sentences in MeZO's prompt format ({s['tokens']} tokens, padded to "
            f"{s['padded_shape']}), causal LM loss, fp32, {s['threads']} CPU threads. Each time is a "
            "median over repeats after a warm-up step, all measured in one run on the same batch.\n\n")
    return head + "\n".join(rows) + "\n"


def write_section(path: Path, section: str, title: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = f"<!-- {title}:start -->"
    end = f"<!-- {title}:end -->"
    block = f"{start}\n{section}{end}\n"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("ZOTUNE_DATA"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return peak_rss_child(args)
    records: list[dict] = []
    measure_speed(args, records)
    if not args.no_memory:
        measure_memory(args, records)
    command = "python benchmarks/step_speed.py " + " ".join(sys.argv[1:])
    write_section(Path(args.out), table(records, command.strip()), "step_speed")


if __name__ == "__main__":
    main()
