"""One command in a fresh process: its wall time, CPU seconds and its own peak RSS.

Linux carries a process's peak RSS across ``exec`` (``signal->maxrss`` takes the old address space's peak),
and Python starts children with ``vfork``: a command started straight from a bench that has generated
checkpoints or imported torch would report the bench's peak, not its own. So a small launcher, whose own
peak is a few MB, forks the command and reports the command's rusage alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

LAUNCHER = (
    "import json, os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    json.dump([usage.ru_maxrss, usage.ru_utime + usage.ru_stime], f)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


@dataclass
class Run:
    wall: float
    cpu: float  # user + system seconds: steadier than wall on a busy machine
    rss_mb: float
    rc: int
    output: str  # what the command printed (stdout and stderr together)


def run_fresh(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` through the launcher; every figure is the command's own."""
    with tempfile.NamedTemporaryFile(suffix=".json") as usage_file:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", LAUNCHER, usage_file.name, *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        wall = time.perf_counter() - t0
        text = open(usage_file.name).read()
    maxrss_kb, cpu = json.loads(text) if text else (0, 0.0)
    return Run(wall, cpu, maxrss_kb / 1024, proc.returncode, proc.stdout.decode(errors="replace"))
