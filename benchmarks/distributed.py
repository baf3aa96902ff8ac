"""Distributed ZO on this CPU: step time and examples/s of each mode, against one process with the
same total threads, with the cost model's prediction beside each measurement.

SmolLM2-135M (embedded), full-parameter MeZO with deferred updates, a global batch of ``--batch``
random token sequences of ``--seq-len`` tokens under the causal LM loss. Configurations (gloo
processes, one thread each, started here on 127.0.0.1 as torchrun would):

    single-1t  single-2t  single-4t        one process, 1/2/4 threads
    ddp-2  pertp-2  ddp-4  2d-2x2          2 or 4 ranks

Each configuration is one launch (the model loaded once per rank, ``--warmup`` steps, then
``--steps`` timed steps: the median step of rank 0); the launches are interleaved over
``--rounds`` rounds (A, B, C, ..., A, B, C, ...) and the medians over rounds reported, so a
changing machine load hits every configuration alike. ``single-1t`` also calibrates the cost
model: forward times at the shard sizes and the sweep time (step minus two forwards, halved).

Two clocks: wall time (what a user waits, stretched by whatever else runs on the machine) and
each rank's CPU time (``time.process_time``: its own compute; a gather's wait is not counted),
the busiest rank's reported. For one-thread ranks the CPU time is the wall time the step would
take on an idle machine with a core per rank, up to the gathers' latency (microseconds here),
so the second half of the table survives a loaded machine; the cost model predicts the wall
times with this machine's cores and the CPU times with a core per rank.

    python benchmarks/distributed.py                    # writes the tables to stdout as JSON + text
    python benchmarks/distributed.py --rounds 3 --steps 5 --markdown   # the docs/benchmarks.md table

and ``--gpu-table`` prints the cost model's table for OPT-13B/30B/175B on 1-8 GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name: (processes, mode or None, threads per process, pertp)
    "single-1t": (1, None, 1, 1), "single-2t": (1, None, 2, 1), "single-4t": (1, None, 4, 1),
    "ddp-2": (2, "ddp", 1, 1), "pertp-2": (2, "pertp", 1, 2), "ddp-4": (4, "ddp", 1, 1),
    "2d-2x2": (4, "2d", 1, 2),
}


# ----------------------------------------------------------------------------- one rank
def worker(args) -> None:
    import torch

    from zotune import ZOOptimizer
    from zotune.distributed import init, shutdown
    from zotune.models import load_model

    torch.set_num_threads(args.threads)
    topo = init(args.mode, args.pertp) if args.mode else None
    model, _ = load_model("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=g)
    mine = torch.stack(topo.shard(list(ids))) if topo else ids
    opt = ZOOptimizer(model.named_parameters(), lr=1e-7, eps=1e-3, seed=0, threads=args.threads,
                      defer_update=True, **({"parallel": topo} if topo else {}))
    loss = lambda: model(input_ids=mine, labels=mine).loss  # noqa: E731
    times, cpu = [], []
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            if topo:
                topo.comm.barrier("benchmark step")  # the ranks start each step together
            t, c = time.perf_counter(), time.process_time()
            opt.step(loss)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)  # this rank's own compute (waiting is not counted)
        result = {"step_s": statistics.median(times[args.warmup:]), "steps": times[args.warmup:],
                  "cpu_step_s": statistics.median(cpu[args.warmup:])}
        if args.calibrate:  # forward times at each shard size, for the cost model
            fwd, fwd_cpu = {}, {}
            for e in sorted({args.batch, args.batch // 2, args.batch // 4}):
                x = ids[:e]
                samples, cpu_samples = [], []
                for _ in range(max(2, args.steps)):
                    t, c = time.perf_counter(), time.process_time()
                    model(input_ids=x, labels=x)
                    samples.append(time.perf_counter() - t)
                    cpu_samples.append(time.process_time() - c)
                fwd[e], fwd_cpu[e] = statistics.median(samples), statistics.median(cpu_samples)
            result["forward_s"], result["forward_cpu_s"] = fwd, fwd_cpu
            result["sweep_s"] = max(0.0, (result["step_s"] - 2 * fwd[args.batch]) / 2)
            result["sweep_cpu_s"] = max(0.0, (result["cpu_step_s"] - 2 * fwd_cpu[args.batch]) / 2)
    Path(f"{args.result}.{topo.rank if topo else 0}").write_text(json.dumps(result))
    if topo:
        shutdown()


# ----------------------------------------------------------------------------- the launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, args, calibrate: bool) -> dict:
    procs, mode, threads, pertp = CONFIGS[name]
    result = Path(tempfile.mkdtemp(prefix="zotune-bench-")) / "result.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(procs), "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--pertp", str(pertp),
           "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--result", str(result)] + (["--mode", mode] if mode else []) + (
           ["--calibrate"] if calibrate else [])
    running = []
    try:
        for rank in range(procs):
            e = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)} if mode else {
                k: v for k, v in env.items() if k not in ("MASTER_PORT", "WORLD_SIZE")}
            running.append(subprocess.Popen(cmd, env=e, cwd=ROOT))
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in running):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: still running after {args.timeout} s")
            time.sleep(0.2)
        if any(p.returncode for p in running):
            raise RuntimeError(f"{name}: a rank failed ({[p.returncode for p in running]})")
        found = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(procs)]
        # CPU time of the busiest rank: the wall time of a step on an idle machine with a core per
        # rank, up to the gathers' latency (a loaded machine stretches wall time, not CPU time)
        return {**found[0], "cpu_step_s": max(f["cpu_step_s"] for f in found)}
    finally:
        for p in running:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


def predictions(calib: dict, args, cores: int | None = -1) -> dict:
    """The cost model's step time of every distributed configuration from single-1t's numbers:
    its wall times on this machine's cores (default), or its CPU times with a core per rank
    (``cores=None``)."""
    from zotune.distributed.cost import Cluster, Workload, calibrate_forward, predict

    suffix = "_s" if cores == -1 else "_cpu_s"
    forward = calibrate_forward({int(k): v for k, v in calib["forward" + suffix].items()})
    work = Workload(params=134.5e6, blocks=30, batch=args.batch, seq_len=args.seq_len, offload=False)
    cluster = Cluster(gpus=4, gpus_per_node=4, cores=os.cpu_count() if cores == -1 else cores,
                      latency_s=1e-4)
    out = {}
    for name, (procs, mode, threads, pertp) in CONFIGS.items():
        if mode is None and threads > 1:
            continue  # thread scaling is not what the model describes
        dp = procs // pertp
        out[name] = predict(work, cluster, forward, dp, pertp, sweep_s=calib["sweep" + suffix]).step_s
    return out


def gpu_table() -> str:
    from zotune.distributed.cost import Cluster, gpu_forward, plan, predict, workload_for

    lines = ["| model | GPUs | NVLink | best mode | step s | speed-up over 1 GPU (ZO2) | bound |",
             "|---|---|---|---|---|---|---|"]
    for model in ("opt-13b", "opt-30b", "opt-175b"):
        work = workload_for(model, batch=16, seq_len=256)
        one = Cluster(gpus=1)
        base = predict(work, one, gpu_forward(work, one), 1, 1)
        for gpus in (1, 2, 4, 8):
            for nvlink in ((False,) if gpus == 1 else (False, True)):
                found = plan(work, Cluster(gpus=gpus, nvlink=nvlink))
                best = min(found + [base], key=lambda p: p.step_s)
                lines.append(f"| {model} | {gpus} | {'yes' if nvlink else 'no'} | {best.mode} | "
                             f"{best.step_s:.2f} | {base.step_s / best.step_s:.2f}x | {best.bound} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode"), p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pertp", type=int, default=1), p.add_argument("--result")
    p.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32, help="global batch (default: 32)")
    p.add_argument("--seq-len", type=int, default=48, help="tokens per sequence (default: 48)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per launch (default: 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per launch (default: 1)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: 2)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    p.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    p.add_argument("--markdown", action="store_true", help="print the docs/benchmarks.md table")
    p.add_argument("--gpu-table", action="store_true", help="print only the OPT cost-model table")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.gpu_table:
        print(gpu_table())
        return
    names = args.configs.split(",")
    if "single-1t" not in names:
        names.insert(0, "single-1t")
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    runs: dict[str, list] = {n: [] for n in names}
    cpu_runs: dict[str, list] = {n: [] for n in names}
    calib = None
    for r in range(args.rounds):
        for name in names:
            got = launch(name, args, calibrate=name == "single-1t")
            if "forward_s" in got:
                calib = got if calib is None else calib
            runs[name].append(got["step_s"])
            cpu_runs[name].append(got["cpu_step_s"])
            print(json.dumps({"round": r, "config": name, **got}), flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    predicted = predictions(calib, args)
    idle = predictions(calib, args, cores=None)  # a core per rank: what the CPU-time column measures
    base = statistics.median(runs["single-1t"])
    cpu_base = statistics.median(cpu_runs["single-1t"])
    rows = []
    for name in names:
        step, cpu_step = statistics.median(runs[name]), statistics.median(cpu_runs[name])
        pred, pred_idle = predicted.get(name), idle.get(name)
        one_thread = CONFIGS[name][2] == 1
        rows.append({"config": name, "step_s": step, "examples_per_s": args.batch / step,
                     "vs_single_1t": base / step, "predicted_step_s": pred,
                     "prediction_error": None if pred is None else pred / step - 1,
                     "cpu_step_s": cpu_step if one_thread else None,
                     "cpu_examples_per_s": args.batch / cpu_step if one_thread else None,
                     "cpu_vs_single_1t": cpu_base / cpu_step if one_thread else None,
                     "predicted_idle_step_s": pred_idle,
                     "idle_prediction_error": None if pred_idle is None or not one_thread else pred_idle / cpu_step - 1})
    print(json.dumps({"rows": rows, "calibration": calib, "loadavg_before": load_before,
                      "loadavg_after": load_after, "cpus": os.cpu_count()}))
    if args.markdown:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        print("| config | wall step s | examples/s | vs single-1t | predicted (this machine) | error "
              "| CPU step s (busiest rank) | examples/s | vs single-1t | predicted (a core per rank) | error |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['config']} | {row['step_s']:.2f} | {row['examples_per_s']:.2f} | "
                  f"{row['vs_single_1t']:.2f}x | {f(row['predicted_step_s'], '.2f')} | "
                  f"{f(row['prediction_error'], '+.0%')} | {f(row['cpu_step_s'], '.2f')} | "
                  f"{f(row['cpu_examples_per_s'], '.2f')} | "
                  f"{'-' if row['cpu_vs_single_1t'] is None else format(row['cpu_vs_single_1t'], '.2f') + 'x'} | "
                  f"{f(row['predicted_idle_step_s'], '.2f')} | {f(row['idle_prediction_error'], '+.0%')} |")
        print(f"\nload average before {' '.join(load_before)}, after {' '.join(load_after)}; "
              f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
