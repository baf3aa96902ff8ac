"""The offload engine's step time against the in-memory engine, measured side by side.

Two parts (docs/benchmarks.md, "Offload engine"; docs/offload.md):

``smollm``: SmolLM2-135M (the embedded model, fp32), one process, one thread, a fixed batch of
SST-2 training examples under MeZO's classification loss; the in-memory engine, offload to CPU
memory and offload to disk, one step each in turn (A, B, C, A, B, C, ...), medians. The losses of
the three must be equal (bitwise), or the script fails.

``big``: a random Llama with SmolLM2-1.7B's shape (24 blocks of d=2048, 1.71e9 parameters,
6.85 GB in fp32), built from its config, in two processes that take turns (one step each, so
they never compete for the cores): in-memory, and offload to disk with the page cache bypassed
(``page_cache=False``: every block is read from the disk, as on a machine whose memory cannot
hold the model) and fsync on. Reports the step times, each process's peak resident memory during
training (high-water mark reset after setup, through /proc/self/clear_refs), the disk bytes read
per step against the lower bound (every block once), and this disk's read and write speeds.

``precision``: SmolLM2-135M through the offload engine with the blocks in fp32, computed in bf16
from an fp32 master (``transfer_dtype``), and stored in bf16 (``storage_dtype``, on the disk tier:
half the bytes read and written), one step each in turn, medians; the step time, the tier's bytes
per step and how far each run's losses are from the fp32 run's.

    python benchmarks/offload.py smollm --data-dir ../shared/data
    python benchmarks/offload.py big --data-dir ../shared/data --dir /tmp/zotune-offload
    python benchmarks/offload.py precision --data-dir ../shared/data --batch 8 --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sst2(data_dir, n):
    from zotune.tasks import get_task

    return get_task("sst2").load(data_dir, seed=0).train[:n]


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def rss_gib(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


# ----------------------------------------------------------------------------- smollm
def smollm(args) -> dict:
    from zotune.engines.offload import throughput
    from zotune.models import load_model
    from zotune.objectives import CandidateScorer
    from zotune.optim import ZOOptimizer

    torch.set_num_threads(1)
    batch = sst2(args.data_dir, args.batch)
    tier = Path(args.dir or tempfile.mkdtemp(prefix="zotune-offload-"))
    setups = {"in-memory": {}, "offload-cpu": {"engine": "offload", "offload_to": "cpu"},
              "offload-disk": {"engine": "offload", "offload_to": "disk", "offload_dir": tier / "smollm"}}
    runs = {}
    for name, options in setups.items():
        model, tok = load_model("smollm2-135m")
        scorer = CandidateScorer(model, tok, max_length=256)
        opt = ZOOptimizer(model, lr=1e-6, eps=1e-3, seed=0, defer_update=True, **options)
        runs[name] = (opt, scorer)
    times = {name: [] for name in runs}
    losses = {name: [] for name in runs}
    for step in range(args.steps + 1):  # step 0 warms up
        for name, (opt, scorer) in runs.items():
            start = time.perf_counter()
            loss = opt.step(lambda s=scorer: s.classification_loss(batch))
            if step:
                times[name].append(time.perf_counter() - start)
            losses[name].append(loss)
    base = statistics.median(times["in-memory"])
    out = {"model": "smollm2-135m", "batch": args.batch, "steps": args.steps, "loadavg": loadavg(),
           "median_s": {n: statistics.median(t) for n, t in times.items()},
           "ratio": {n: statistics.median(t) / base for n, t in times.items()},
           "losses_equal": all(losses[n] == losses["in-memory"] for n in losses),
           "disk_throughput": throughput(runs["offload-disk"][0].engine.timing)}
    if not out["losses_equal"]:
        raise SystemExit(f"engines disagree: {losses}")
    return out


# ----------------------------------------------------------------------------- precision
def precision(args) -> dict:
    from zotune.models import load_model
    from zotune.objectives import CandidateScorer
    from zotune.optim import ZOOptimizer

    torch.set_num_threads(1)
    batch = sst2(args.data_dir, args.batch)
    tier = Path(args.dir or tempfile.mkdtemp(prefix="zotune-offload-"))
    cpu, disk = {"offload_to": "cpu"}, {"offload_to": "disk", "page_cache": False}
    setups = {"cpu-fp32": cpu, "cpu-transfer-bf16": {**cpu, "transfer_dtype": "bf16"},
              "disk-fp32": {**disk, "offload_dir": tier / "fp32"},
              "disk-storage-bf16": {**disk, "offload_dir": tier / "bf16", "storage_dtype": "bf16"},
              "disk-storage-bf16-transfer-bf16": {**disk, "offload_dir": tier / "bf16t",
                                                  "storage_dtype": "bf16", "transfer_dtype": "bf16"}}
    runs = {}
    for name, options in setups.items():
        model, tok = load_model("smollm2-135m")
        scorer = CandidateScorer(model, tok, max_length=256)
        opt = ZOOptimizer(model, lr=1e-6, eps=1e-3, seed=0, defer_update=True, engine="offload",
                          low_precision_probes="keep", **options)
        runs[name] = (opt, scorer)
    times = {name: [] for name in runs}
    losses = {name: [] for name in runs}
    read0 = {}
    for step in range(args.steps + 1):  # step 0 warms up
        for name, (opt, scorer) in runs.items():
            if step == 1:
                read0[name] = (opt.engine.tier.bytes_read, opt.engine.tier.bytes_written)
            start = time.perf_counter()
            losses[name].append(opt.step(lambda s=scorer: s.classification_loss(batch)))
            if step:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["cpu-fp32"])
    ref = losses["cpu-fp32"]
    return {"model": "smollm2-135m", "batch": args.batch, "steps": args.steps, "loadavg": loadavg(),
            "median_s": {n: statistics.median(t) for n, t in times.items()},
            "ratio_to_cpu_fp32": {n: statistics.median(t) / base for n, t in times.items()},
            "tier_bytes_read_per_step": {n: (runs[n][0].engine.tier.bytes_read - read0[n][0]) / args.steps
                                         for n in runs},
            "tier_bytes_written_per_step": {n: (runs[n][0].engine.tier.bytes_written - read0[n][1]) / args.steps
                                            for n in runs},
            "max_loss_difference_to_fp32": {n: max(abs(a - b) for a, b in zip(l, ref)) for n, l in losses.items()},
            "losses": losses}


# ----------------------------------------------------------------------------- big
BIG = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
           rms_norm_eps=1e-5, rope_theta=130000.0, tie_word_embeddings=True)
"""SmolLM2-1.7B's shape (its config.json), randomly initialised."""


def big_child(args) -> None:
    """One engine of the ``big`` part; steps on each "step" line of stdin."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from zotune.engines.offload import throughput
    from zotune.models.loading import _embedded_cache
    from zotune.objectives import CandidateScorer
    from zotune.optim import ZOOptimizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(_embedded_cache("smollm2-135m"))  # SmolLM2's tokenizer
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(0)
    start = time.perf_counter()
    model = LlamaForCausalLM(LlamaConfig(**{**BIG, "num_hidden_layers": args.layers})).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    options = {}
    if args.child == "offload-disk":
        options = dict(engine="offload", offload_to="disk", offload_dir=Path(args.dir) / "big",
                       page_cache=False)
    opt = ZOOptimizer(model, lr=1e-6, eps=1e-3, seed=0, defer_update=True, **options)
    setup = time.perf_counter() - start
    scorer = CandidateScorer(model, tok, max_length=256)
    batch = sst2(args.data_dir, args.batch)
    reset_peak()
    print(json.dumps({"ready": args.child, "setup_s": setup, "weights_bytes": weights,
                      "rss_after_setup_gib": rss_gib("VmRSS")}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start = time.perf_counter()
        loss = opt.step(lambda: scorer.classification_loss(batch))
        print(json.dumps({"step_s": time.perf_counter() - start, "loss": loss}), flush=True)
    report = {"peak_rss_gib": rss_gib("VmHWM"), "weights_bytes": weights}
    if options:
        engine = opt.engine
        report["throughput"] = throughput(engine.timing)
        report["block_bytes"] = sum(b.nbytes for b in engine._blocks)
    print(json.dumps(report), flush=True)


def disk_speed(directory: Path, size: int = 1 << 30) -> dict:
    """Write (with fsync) and cold-read (page cache dropped for the file) ``size`` bytes."""
    path = directory / "speed-test.bin"
    chunk = os.urandom(1 << 24)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    write = size / (time.perf_counter() - start)
    buf = memoryview(bytearray(1 << 24))
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    read = size / (time.perf_counter() - start)
    path.unlink()
    return {"write_fsync_bytes_per_s": write, "cold_read_bytes_per_s": read}


def big(args) -> dict:
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    speed = disk_speed(directory)
    cmd = [sys.executable, __file__, "big", "--data-dir", str(args.data_dir), "--dir", str(directory),
           "--batch", str(args.batch), "--layers", str(args.layers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children, ready = {}, {}
    # The disk process first: once its blocks are on disk it holds little, then in-memory starts.
    for name in ("offload-disk", "in-memory"):
        children[name] = subprocess.Popen([*cmd, "--child", name], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, env=env)
        ready[name] = json.loads(children[name].stdout.readline())
        print(json.dumps(ready[name]), flush=True)
    times = {name: [] for name in children}
    losses = {name: [] for name in children}
    try:
        for step in range(args.steps + 1):  # step 0 warms up
            for name, child in children.items():
                child.stdin.write("step\n")
                child.stdin.flush()
                got = json.loads(child.stdout.readline())
                print(json.dumps({"engine": name, "step": step, **got}), flush=True)
                losses[name].append(got["loss"])
                if step:
                    times[name].append(got["step_s"])
        reports = {}
        for name, child in children.items():
            child.stdin.write("report\n")
            child.stdin.flush()
            reports[name] = json.loads(child.stdout.readline())
    finally:
        for child in children.values():
            child.stdin.close()
            child.wait(timeout=600)
    weights = reports["in-memory"]["weights_bytes"]
    disk = reports["offload-disk"]
    base = statistics.median(times["in-memory"])
    return {"model": "llama, SmolLM2-1.7B shape, random", "weights_bytes": weights, "batch": args.batch,
            "steps": args.steps, "loadavg": loadavg(), "disk": speed,
            "median_s": {n: statistics.median(t) for n, t in times.items()},
            "ratio_disk_over_in_memory": statistics.median(times["offload-disk"]) / base,
            "peak_rss_gib": {n: r["peak_rss_gib"] for n, r in reports.items()},
            "disk_peak_rss_over_weights": disk["peak_rss_gib"] * 2**30 / weights,
            "bytes_read_per_step": disk["throughput"]["bytes_read_per_step"],
            "lower_bound_bytes_per_step": disk["block_bytes"],
            "throughput": disk["throughput"], "losses_equal": losses["in-memory"] == losses["offload-disk"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("smollm", "big", "precision"))
    parser.add_argument("--data-dir", default=os.environ.get("ZOTUNE_DATA", ROOT.parent / "shared" / "data"))
    parser.add_argument("--dir", default=None, help="directory for the disk tier")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per engine (after one warm-up)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=24, help="blocks of the big model (a dry run: 2)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        big_child(args)
        return
    if args.part == "big" and not args.dir:
        parser.error("big needs --dir (room for 7 GB)")
    result = {"smollm": smollm, "big": big, "precision": precision}[args.part](args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
