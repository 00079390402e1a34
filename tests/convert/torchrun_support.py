"""Launching real torchrun runs for the distributed conversion tests (imported as ``from torchrun_support import``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).parent / "dist_convert_worker.py"
TIMEOUT_S = 20  # --timeout-s given to the ranks
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(ranks: int, *command: str) -> tuple[subprocess.CompletedProcess, float]:
    """``torchrun --standalone --nproc_per_node=ranks <command>``; its result and wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *command]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S + 60)
    return proc, time.monotonic() - start


def two_nodes(*command: str) -> tuple[list[subprocess.CompletedProcess], float]:
    """Two torchrun agents of one rank each, as on two nodes: a rank's death is not seen by the other's agent,
    only by its rank through the process group."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, "--rdzv_id=convert", *command]
    start = time.monotonic()
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in "ab"]
    results = []
    for node in nodes:
        out, err = node.communicate(timeout=TIMEOUT_S + 60)
        results.append(subprocess.CompletedProcess(cmd, node.returncode, out, err))
    return results, time.monotonic() - start


def assert_killed_rank_stopped_everything(
    nodes: list[subprocess.CompletedProcess], elapsed: float, tool: str, out: Path
) -> None:
    """What a user sees when one rank is killed mid-write: every rank fails within the timeout, the survivor
    says another rank stopped and that nothing was published, and nothing is left beside ``out``."""
    assert elapsed < TIMEOUT_S + 30, elapsed
    assert all(n.returncode != 0 for n in nodes)
    survivor = next(n for n in nodes if "stopped: another rank failed or stopped" in n.stderr)
    (line,) = [x for x in survivor.stderr.splitlines() if x.startswith(f"{tool}: error: rank 0 of 2")]
    assert f"nothing was published at {out}" in line
    assert list(out.parent.iterdir()) == []  # no destination, no temporary folder, no lock
