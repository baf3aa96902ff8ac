"""One rank of the coordinate-shard tests (started by tests/distributed_launch.py).

    python tests/cge_parallel_worker.py OUT KIND ...      KIND: closure | reuse | batched

For each kind it runs 3 sparse-CGE (deepzero) steps of a small BN CNN on
``zotune.distributed.init("pertp")`` and writes this rank's losses, final state (parameters and
BN statistics), the bytes it sent per step and its coordinate shards to ``OUT/KIND-rankR.pt``."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cge_parallel import STEPS, run  # noqa: E402

from zotune.distributed import init, shutdown  # noqa: E402


def main(out: Path, kinds: list[str]) -> None:
    torch.set_num_threads(1)
    topo = init("pertp")
    for kind in kinds:
        result = run(kind, topo, STEPS)
        torch.save(result, out / f"{kind}-rank{topo.rank}.pt")
    shutdown()  # every rank leaves together (an early exit can abort a peer on gloo)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
