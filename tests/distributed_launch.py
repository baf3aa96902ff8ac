"""Start N local ranks the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
LOCAL_RANK) on a free port of 127.0.0.1, bounded in time; every process started is ended by pid."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str], *, timeout: float = 120.0, env: dict | None = None,
           kill_rank: int | None = None, kill_when=None):
    """Run ``python *args`` as ``world`` ranks; return ``[(returncode, stdout, stderr)]`` per rank.

    ``kill_rank``/``kill_when``: SIGKILL that rank once ``kill_when()`` is true (polled)."""
    port = free_port()
    procs = []
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"),
            "TORCHELASTIC_ERROR_FILE": "", **(env or {})}
    try:
        for rank in range(world):
            e = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, *map(str, args)], env=e, cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + timeout
        killed = False
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {timeout} s")
            if kill_rank is not None and not killed and kill_when():
                os.kill(procs[kill_rank].pid, signal.SIGKILL)
                killed = True
            time.sleep(0.05)
        return [(p.returncode, *p.communicate()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
