"""``zotune plan``: the cost model's table for a model, a batch and a cluster.

    zotune plan --model opt-175b --gpus 8 --nvlink
    zotune plan --model 13e9 --gpus 4 --batch 32 --seq-len 512 --pcie-gbps 25
"""
from __future__ import annotations

from dataclasses import fields

from .cost import MODELS, Cluster, gpu_forward, plan, predict, table, workload_for


LINKS = {"pcie_gbps": "host-to-GPU bandwidth per GPU and direction, GB/s",
         "nvlink_gbps": "GPU-to-GPU all-gather bandwidth per GPU, GB/s",
         "host_gbps": "host memory bandwidth a node's GPUs share, GB/s",
         "gpu_mem_gb": "memory per GPU, GB (a model above 80%% of it is streamed)",
         "tflops": "effective TFLOP/s per GPU", "latency_s": "latency of one small collective, s"}


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict the step time of each distributed mode",
                       description="Predict the step time and throughput of single-GPU, ddp, pertp, "
                       "2d and sliced-offload runs from the cost model (docs/distributed.md) and "
                       "name the fastest.")
    p.add_argument("--model", required=True, help=f"one of {', '.join(MODELS)}, or a parameter count "
                   "(13e9, 7b)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs in all (default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")
    p.add_argument("--nvlink", action="store_true", help="GPUs of a node are linked by NVLink "
                   "(enables sliced offload)")
    p.add_argument("--batch", type=int, default=16, help="global batch, examples (default: 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example (default: 256)")
    p.add_argument("--points", type=int, default=2, help="points per step: 2 for MeZO, 2q for "
                   "q-probe SPSA (default: 2)")
    p.add_argument("--bytes-per-param", type=int, default=2, help="2 for fp16/bf16 (default: 2)")
    defaults = Cluster()
    for f in fields(Cluster):
        if f.name in LINKS:
            p.add_argument("--" + f.name.replace("_", "-"), type=float, default=getattr(defaults, f.name),
                           help=f"{LINKS[f.name]} (default: {getattr(defaults, f.name):g})")
    p.set_defaults(func=run)


def run(args) -> int:
    cluster = Cluster(gpus=args.gpus, gpus_per_node=args.gpus_per_node, nvlink=args.nvlink,
                      pcie_gbps=args.pcie_gbps, nvlink_gbps=args.nvlink_gbps, host_gbps=args.host_gbps,
                      gpu_mem_gb=args.gpu_mem_gb, tflops=args.tflops, latency_s=args.latency_s)
    work = workload_for(args.model, batch=args.batch, seq_len=args.seq_len, points=args.points,
                        bytes_per_param=args.bytes_per_param)
    one = Cluster(**{**cluster.__dict__, "gpus": 1})
    baseline = predict(work, one, gpu_forward(work, one), 1, 1)
    found = plan(work, cluster)
    if cluster.gpus > 1:  # one GPU is a candidate too: more ranks can be slower (a shared host link)
        found = sorted(found + [baseline], key=lambda p: p.step_s)
    offload = found[0].parts["offload"]
    print(f"{args.model}: {work.params / 1e9:.3g}B parameters, {work.params * work.bytes_per_param / 1e9:.0f} GB "
          f"({'streamed from host memory (offload)' if offload else 'resident on each GPU'}); "
          f"batch {work.batch} x {work.seq_len} tokens, {work.points} points a step; "
          f"{cluster.gpus} GPU(s), {cluster.gpus_per_node} per node, "
          f"{'NVLink' if cluster.nvlink else 'PCIe only'}")
    print(table(found, baseline))
    best = found[0]
    print(f"best: {best.mode} (dp {best.dp} x pertp {best.pertp}), {best.step_s:.3f} s a step, "
          f"{best.examples_per_s / baseline.examples_per_s:.2f}x one GPU; bound by {best.bound}")
    return 0
