"""One rank of the engine-level distributed tests (started by tests/distributed_launch.py).

    python tests/distributed_worker.py OUT MODE[:PERTP[:PROBES]] ... [badlayout]

For each mode it runs 5 MeZO steps of the tiny Llama on ``zotune.distributed.init(mode)`` and
writes this rank's losses, final parameters and the bytes it sent per step to
``OUT/MODE-PERTP-PROBES-rankR.pt``. Batch of step t: ``lm_batch(100 + t, n=4)``, sharded by
data-parallel rank."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import lm_batch, tiny_llama  # noqa: E402

from zotune import ZOOptimizer  # noqa: E402
from zotune.distributed import RankFailure, init, shutdown  # noqa: E402

STEPS, BATCH = 5, 4


def main(out: Path, specs: list[str]) -> None:
    torch.set_num_threads(1)
    for spec in specs:
        if spec == "badlayout":  # rank 1 freezes a tensor: a clear error on every rank
            topo = init("ddp")
            model = tiny_llama(seed=0)
            if topo.rank == 1:
                model.lm_head.weight.requires_grad_(False)
            try:
                ZOOptimizer(model.named_parameters(), lr=1e-3, seed=7, parallel=topo)
                message = None
            except RankFailure as err:
                message = str(err)
            torch.save({"message": message}, out / f"badlayout-rank{topo.rank}.pt")
            continue
        mode, pertp, probes = (spec.split(":") + ["2", "1"])[:3]
        topo = init(mode, int(pertp))
        model = tiny_llama(seed=0)
        opt = ZOOptimizer(model.named_parameters(), lr=1e-3, eps=1e-3, seed=7, threads=1,
                          num_probes=int(probes), defer_update=True, parallel=topo)
        losses, sent = [], []
        for t in range(STEPS):
            ids = topo.shard(list(lm_batch(100 + t, n=BATCH)))
            ids = torch.stack(ids)
            topo.comm.reset()
            losses.append(opt.step(lambda: model(input_ids=ids, labels=ids).loss))
            sent.append(dict(topo.comm.sent))
        opt.flush()
        torch.save({"losses": losses, "sent": sent, "numel": sum(p.numel() for p in model.parameters()),
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()}},
                   out / f"{mode}-{pertp}-{probes}-rank{topo.rank}.pt")
    shutdown()  # every rank leaves together (an early exit can abort a peer on gloo)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
