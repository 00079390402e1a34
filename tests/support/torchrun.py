"""Launching real torchrun runs for the distributed conversion tests (imported as ``from support.torchrun import``)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).parents[1] / "convert" / "dist_convert_worker.py"
TIMEOUT_S = 20  # --timeout-s given to the ranks
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(ranks: int, *command: str) -> tuple[subprocess.CompletedProcess, float]:
    """``torchrun --standalone --nproc_per_node=ranks <command>``; its result and wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *command]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S + 60)
    return proc, time.monotonic() - start


def failure(proc: subprocess.CompletedProcess) -> str:
    """A failed run's stderr for an assertion message: first every rank's fatal lines, then the tail. A rank that
    aborts prints its cause early; the tail then holds only the other ranks' teardown."""
    fatal = [line for line in proc.stderr.splitlines() if re.search(r"Fatal|terminate|[Aa]bort|Error|error:", line)]
    return "\n".join(fatal[:40]) + "\n...\n" + proc.stderr[-3000:]


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


def rank_exit_codes(nodes: list[subprocess.CompletedProcess]) -> list[int]:
    """Each rank's own exit code, from its agent's failure summary (``exitcode : N``); 0 for an agent whose rank
    succeeded (torchrun itself exits 1 for any failure, so its own code does not tell)."""
    codes = []
    for node in nodes:
        found = re.search(r"exitcode\s*:\s*(-?\d+)", node.stderr)
        codes.append(int(found.group(1)) if found else node.returncode)
    return codes


def assert_every_rank_names_the_cause(nodes: list[subprocess.CompletedProcess], tool: str, out: Path) -> None:
    """A file size limit on rank 1: both ranks exit 1 (a write failure, as in one process), each with one line
    naming rank 1's file and "File too large", and nothing is left beside ``out``."""
    assert rank_exit_codes(nodes) == [1, 1], [n.stderr[-2000:] for n in nodes]
    for r, node in enumerate(nodes):
        (line,) = [x for x in node.stderr.splitlines() if x.startswith(f"{tool}: error: rank ")]
        own = f"rank {r} of 2: " if r == 1 else "rank 0 of 2 stopped: "
        assert line.startswith(f"{tool}: error: {own}"), line
        assert "failed on rank 1: " in line or r == 1, line
        assert re.search(r"/__1_\d+\.distcp: File too large|/model-\d+-of-\d+\.safetensors: File too large", line), line
        assert line.endswith(f"nothing was published at {out}"), line
        assert "flame_ext/" not in node.stderr, node.stderr[-3000:]  # one line: no traceback through our code
    assert list(out.parent.iterdir()) == []  # no destination, no temporary folder, no lock
