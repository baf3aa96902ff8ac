"""One rank of the sliced-offload tests (started by tests/distributed_launch.py).

    python tests/sliced_worker.py OUT MODE[=CONFIG,...] ...

For each mode (``ddp``, ``pertp``, ``2d``) it trains the tiny Llama for 4 MeZO steps with each
engine of ``CONFIGS`` (or those named) on ``zotune.distributed.init(mode)`` and writes this rank's
losses, final parameters, bytes sent per step, the slice cuts and what its storage holds to
``OUT/MODE-CONFIG-rankR.pt``. Batch of step t: 4 examples, sharded by data-parallel rank."""
import sys
from pathlib import Path

import torch

from zotune import ZOOptimizer
from zotune.distributed import init, shutdown
from zotune.models import tiny_model
from zotune.objectives import CandidateScorer
from zotune.tasks.base import Example

STEPS = 4
EXAMPLES = [Example(prompt="It was the movie" + " the" * (i % 4), candidates=(" great", " terrible"),
                    label=i % 2) for i in range(8)]
CONFIGS = {  # name: ZOOptimizer options (every one compared with "in-memory" of the same chunk size)
    "in-memory": {},
    "offload": {"engine": "offload", "offload_to": "cpu"},
    "sliced-cpu": {"engine": "offload", "offload_to": "cpu", "sliced": True},
    "sliced-disk": {"engine": "offload", "offload_to": "disk", "sliced": True},
    "in-memory-c48": {"chunk_size": 48},  # chunks of 48: slices cut inside tensors
    "sliced-cpu-c48": {"engine": "offload", "offload_to": "cpu", "sliced": True, "chunk_size": 48},
}


def run(out: Path, mode: str, name: str) -> None:
    topo = init(mode)
    model, tok = tiny_model("llama", seed=3)
    scorer = CandidateScorer(model, tok, max_length=64)
    options = dict(CONFIGS[name])
    if options.get("offload_to") == "disk":
        options["offload_dir"] = out / f"{mode}-{name}-tier"
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, seed=5, threads=1, defer_update=True, parallel=topo,
                      **options)
    losses, sent = [], []
    for t in range(STEPS):
        shard = topo.shard(EXAMPLES[t % 4:t % 4 + 4])
        topo.comm.reset()
        losses.append(opt.step(lambda b=shard: scorer.classification_loss(b)))
        sent.append(dict(topo.comm.sent))
    opt.flush()
    record = {"losses": losses, "sent": sent,
              "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    engine = opt.engine.inner
    if options.get("sliced"):
        tier = engine.tier
        record.update(cuts=engine.cuts, gather_bytes=engine.gather_bytes(), bytes_read=tier.bytes_read,
                      block_numel={j: b.numel for j, b in enumerate(engine._blocks)},
                      own={j: tier.own(j).clone() for j in engine.cuts},
                      blocks={j: torch.cat([p.detach().reshape(-1) for p in engine._blocks[j].params])
                              for j in engine.cuts},
                      bounds={j: [*engine._blocks[j].offsets, engine._blocks[j].numel] for j in engine.cuts})
        if tier.kind == "cpu":
            record["shm_dir_left"] = tier.dir.exists()
    torch.save(record, out / f"{mode}-{name}-rank{topo.rank}.pt")


def main(out: Path, modes: list[str]) -> None:
    torch.set_num_threads(1)
    for spec in modes:  # MODE or MODE=CONFIG,CONFIG,...
        mode, _, names = spec.partition("=")
        for name in names.split(",") if names else CONFIGS:
            run(out, mode, name)
    shutdown()  # every rank leaves together (an early exit can abort a peer on gloo)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
