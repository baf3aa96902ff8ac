r"""The step-time model: which distributed mode is fastest for a model, a batch and a cluster.

DistZO2's back-of-envelope (research/zo2_distzo2.md, section 9.3), made explicit. A step of
``n`` points (2 for MeZO) with global batch ``B`` on a ``dp x pertp`` mesh costs each rank

.. math::
    t_\text{compute} = \lceil n / P \rceil \; t_\text{fwd}(B / D), \qquad
    t_\text{sweep} = s \cdot N / r_\text{rng}

(forwards on its share of the points and of the batch; ``s`` parameter sweeps regenerating the
directions, every rank the whole model: the price of sending no parameters). With the parameters
streamed from host memory (ZO2's offload: the model does not fit on the GPU), each block crosses
PCIe once per step each way, overlapped with compute:

.. math::
    t_\text{PCIe} = \frac{N b}{\min(W_\text{PCIe},\; W_\text{host} / G_\text{node})}, \qquad
    t_\text{sliced} = \max\Big(\frac{t_\text{PCIe}}{R},\; \frac{R-1}{R}\frac{N b}{W_\text{NVLink}}\Big)

where sliced offload (DistZO2's communication strategy: each of the ``R`` GPUs of a node loads
``1/R`` of a block and an all-gather over NVLink assembles it; ``--offload-sliced``,
``engines/sliced.py``) needs NVLink; the two stages are pipelined over blocks, so the slower one
bounds (an assumption for a GPU pipeline: the engine's passes run in order, on CPU, in this
version). Then

.. math::
    t_\text{step} = c \cdot \max(t_\text{compute} + t_\text{sweep},\; t_\text{transfer}) + t_\text{coll}

(the sweeps run on the same device as the forwards, fused into the block pass while a block is
resident; the copies run beside them), with ``c = max(1, ranks per node / cores)`` on CPUs (processes share cores) and ``t_coll`` the
latency of the step's two small gathers. Throughput is ``B / t_step`` examples per second.

``t_fwd`` comes from measurement (:func:`calibrate_forward`: a line through timed forwards, what
``benchmarks/distributed.py`` does on this CPU) or from FLOP/s (:func:`gpu_forward`:
``2 N B S / F`` plus a per-block overhead). ``zotune plan`` prints the table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ZotuneError

MODELS = {  # (parameters, blocks, hidden size): OPT (Zhang et al., 2022, table 1), SmolLM2
    "opt-1.3b": (1.3e9, 24, 2048), "opt-6.7b": (6.7e9, 32, 4096), "opt-13b": (13e9, 40, 5120),
    "opt-30b": (30e9, 48, 7168), "opt-66b": (66e9, 64, 9216), "opt-175b": (175e9, 96, 12288),
    "smollm2-135m": (134.5e6, 30, 576), "llama-7b": (6.7e9, 32, 4096), "llama-70b": (69e9, 80, 8192),
}


@dataclass
class Cluster:
    """The machines. Bandwidths in GB/s per direction; ``cores`` only for CPU ranks.

    Defaults: A100-80GB nodes (PCIe 4.0 x16 at ~25 GB/s effective, NVLink 3 at ~200 GB/s
    effective for an all-gather, ~150 TFLOP/s effective fp16)."""

    gpus: int = 1
    gpus_per_node: int = 8
    nvlink: bool = False
    pcie_gbps: float = 25.0
    nvlink_gbps: float = 200.0
    host_gbps: float = 100.0
    gpu_mem_gb: float = 80.0
    tflops: float = 150.0
    cores: int | None = None  # CPU ranks: processes beyond this many share cores
    latency_s: float = 50e-6


@dataclass
class Workload:
    """One training step: ``params`` trainable parameters in ``blocks`` blocks, ``bytes_per_param``
    on the wire, global batch ``batch`` of ``seq_len`` tokens, ``points`` evaluated per step,
    ``sweeps`` parameter sweeps per step (2 with deferred updates)."""

    params: float
    blocks: int = 1
    batch: int = 16
    seq_len: int = 256
    bytes_per_param: int = 2
    points: int = 2
    sweeps: int = 2
    offload: bool | None = None  # None: when the model does not fit in GPU memory


@dataclass
class Forward:
    """Time of one forward pass on ``e`` examples: ``fixed + per_example * e`` seconds."""

    fixed: float
    per_example: float

    def __call__(self, examples: float) -> float:
        return self.fixed + self.per_example * examples


@dataclass
class Prediction:
    mode: str
    dp: int
    pertp: int
    sliced: bool
    step_s: float
    examples_per_s: float
    bound: str
    parts: dict = field(default_factory=dict)


def gpu_forward(work: Workload, cluster: Cluster, block_overhead_s: float = 30e-6) -> Forward:
    """``t_fwd`` from FLOP/s: ``2 N S`` FLOPs per example and a launch overhead per block."""
    return Forward(work.blocks * block_overhead_s, 2 * work.params * work.seq_len / (cluster.tflops * 1e12))


def calibrate_forward(samples: dict[int, float]) -> Forward:
    """The least-squares line through measured ``{examples: seconds}`` forward times."""
    xs, ys = list(samples), list(samples.values())
    if len(xs) == 1:
        return Forward(0.0, ys[0] / xs[0])
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return Forward(max(0.0, my - slope * mx), slope)


def predict(work: Workload, cluster: Cluster, forward: Forward, dp: int, pertp: int, *,
            sliced: bool = False, sweep_s: float | None = None, rng_per_s: float = 2e11) -> Prediction:
    """The model's step time of ``work`` on a ``dp x pertp`` mesh (module docstring).

    ``sweep_s``: measured time of one sweep (else ``params / rng_per_s``: a GPU regenerating
    and adding directions at about 2e11 elements/s, memory-bound)."""
    ranks = dp * pertp
    if ranks > cluster.gpus:
        raise ZotuneError(f"a {dp} x {pertp} mesh needs {ranks} ranks, the cluster has {cluster.gpus}")
    offload = work.offload
    if offload is None:
        offload = work.params * work.bytes_per_param / 1e9 > 0.8 * cluster.gpu_mem_gb
    compute = math.ceil(work.points / pertp) * forward(work.batch / dp)
    sweep = work.sweeps * (sweep_s if sweep_s is not None else work.params / rng_per_s)
    per_node = min(ranks, cluster.gpus_per_node)
    transfer = 0.0
    if offload:
        nbytes = work.params * work.bytes_per_param
        link = min(cluster.pcie_gbps, cluster.host_gbps / per_node) * 1e9
        transfer = nbytes / link
        if sliced:
            r = per_node
            transfer = max(transfer / r, (r - 1) / r * nbytes / (cluster.nvlink_gbps * 1e9))
    contention = max(1.0, per_node / cluster.cores) if cluster.cores else 1.0
    collectives = (2 if ranks > 1 else 0) * cluster.latency_s * max(1, math.ceil(math.log2(max(ranks, 1))))
    step = contention * max(compute + sweep, transfer) + collectives
    bound = "transfer" if transfer > compute + sweep else "sweeps" if sweep > compute else "compute"
    mode = "single" if ranks == 1 else "ddp" if pertp == 1 else "pertp" if dp == 1 else f"2d {dp}x{pertp}"
    return Prediction(mode + (" sliced" if sliced else ""), dp, pertp, sliced, step, work.batch / step, bound,
                      {"compute_s": compute, "transfer_s": transfer, "sweep_s": sweep,
                       "contention": contention, "offload": offload})


def meshes(work: Workload, cluster: Cluster, ranks: int | None = None) -> list[tuple[int, int, bool]]:
    """Every ``(dp, pertp, sliced)`` worth comparing on ``ranks`` ranks: pertp divides the
    ranks and is at most the points of a step; slicing only with offload and NVLink."""
    ranks = cluster.gpus if ranks is None else ranks
    out = []
    for pertp in range(1, ranks + 1):
        if ranks % pertp or pertp > max(1, work.points):
            continue
        out.append((ranks // pertp, pertp, False))
        if cluster.nvlink and ranks > 1:
            out.append((ranks // pertp, pertp, True))
    return out


def plan(work: Workload, cluster: Cluster, forward: Forward | None = None, **kw) -> list[Prediction]:
    """Predictions for every mesh on the cluster's GPUs, fastest first."""
    forward = forward or gpu_forward(work, cluster)
    found = [predict(work, cluster, forward, dp, pp, sliced=s, **kw) for dp, pp, s in meshes(work, cluster)]
    found = [p for p in found if not (p.sliced and not p.parts["offload"])]  # slicing needs streaming
    return sorted(found, key=lambda p: p.step_s)


def workload_for(model: str, **kw) -> Workload:
    """A :class:`Workload` for a named model (``opt-175b``) or a parameter count (``13e9``, ``7b``)."""
    key = model.lower()
    if key in MODELS:
        params, blocks, _ = MODELS[key]
    else:
        try:
            scale = {"b": 1e9, "m": 1e6}.get(key[-1], 1.0)
            params = float(key[:-1] if key[-1] in "bm" else key) * scale
        except ValueError:
            raise ZotuneError(f"unknown model {model!r}; give a parameter count (13e9, 7b) or one "
                              f"of: {', '.join(MODELS)}") from None
        blocks = max(1, round(params / 12 / 4096 ** 2))
    return Workload(params=params, blocks=blocks, **kw)


def table(predictions: list[Prediction], baseline: Prediction | None = None) -> str:
    """The predictions as a text table (fastest first), with the speed-up over ``baseline``."""
    head = f"{'mode':<16}{'dp':>4}{'pertp':>6}{'step s':>10}{'ex/s':>9}{'speed-up':>10}  bound"
    lines = [head, "-" * len(head)]
    for p in predictions:
        up = f"{p.examples_per_s / baseline.examples_per_s:.2f}x" if baseline else ""
        lines.append(f"{p.mode:<16}{p.dp:>4}{p.pertp:>6}{p.step_s:>10.3f}{p.examples_per_s:>9.2f}{up:>10}  {p.bound}")
    return "\n".join(lines)
