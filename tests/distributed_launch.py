"""Start N local ranks the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
LOCAL_RANK) on a free port of 127.0.0.1, bounded in time; every process started is ended by pid."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str], *, timeout: float = 120.0, env: dict | None = None,
           rank_args=None, kill_rank: int | None = None, kill_when=None, kill_signal=signal.SIGKILL):
    """Run ``python *args`` as ``world`` ranks; return ``[(returncode, stdout, stderr)]`` per rank.

    ``rank_args(rank)``: extra arguments of one rank. ``kill_rank``/``kill_when``: SIGKILL that
    rank with ``kill_signal`` once ``kill_when()`` is true (polled)."""
    port = free_port()
    procs, logs = [], []
    folder = Path(tempfile.mkdtemp(prefix="zotune-ranks-"))
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), **(env or {})}
    try:
        for rank in range(world):
            e = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            extra = list(rank_args(rank)) if rank_args else []
            out, err = open(folder / f"{rank}.out", "w"), open(folder / f"{rank}.err", "w")
            logs.append((out, err))  # files, not pipes: a full pipe would block a rank
            procs.append(subprocess.Popen([sys.executable, *map(str, args), *map(str, extra)], env=e,
                                          cwd=REPO, stdout=out, stderr=err, text=True))
        deadline = time.monotonic() + timeout
        killed = False
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {timeout} s")
            if kill_rank is not None and not killed and kill_when():
                os.kill(procs[kill_rank].pid, kill_signal)
                killed = True
            time.sleep(0.05)
        return [(p.returncode, (folder / f"{r}.out").read_text(), (folder / f"{r}.err").read_text())
                for r, p in enumerate(procs)]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        for out, err in logs:
            out.close()
            err.close()
        shutil.rmtree(folder, ignore_errors=True)
