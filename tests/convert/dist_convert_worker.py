"""One rank of ``flame_ext.convert_hf_to_dcp`` under torchrun, with one fault injected on one rank.

    torchrun ... dist_convert_worker.py [--kill-rank R | --fail-rank R] [--model-on-rank R PATH] -- ARGS

``--kill-rank R``: rank R is killed (SIGKILL, no clean-up possible) just after it read its first block, so
the others are mid-write. ``--fail-rank R``: rank R's write fails there instead (disk full).
``--model-on-rank R PATH``: rank R is given ``--model PATH``, as a mistyped launch script would.
ARGS are the drop-in's own; everything else is the real drop-in.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys

from flame_ext.convert_hf_to_dcp import main
from flame_ext.io import dcp


def kill_after_first_block() -> None:
    read_block = dcp._StreamingPlanner.resolve_data

    def resolve_then_die(self, item):  # noqa: ANN001, ANN202 -- torch's planner signature
        read_block(self, item)
        os.kill(os.getpid(), signal.SIGKILL)

    dcp._StreamingPlanner.resolve_data = resolve_then_die


def fail_after_first_block() -> None:
    read_block = dcp._StreamingPlanner.resolve_data

    def resolve_then_fail(self, item):  # noqa: ANN001, ANN202 -- torch's planner signature
        read_block(self, item)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/injected/disk")

    dcp._StreamingPlanner.resolve_data = resolve_then_fail


if __name__ == "__main__":
    split = sys.argv.index("--")
    own, argv = sys.argv[1:split], sys.argv[split + 1 :]
    p = argparse.ArgumentParser()
    p.add_argument("--kill-rank", type=int)
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--model-on-rank", nargs=2)
    args = p.parse_args(own)
    rank = int(os.environ["RANK"])
    if args.kill_rank == rank:
        kill_after_first_block()
    if args.fail_rank == rank:
        fail_after_first_block()
    if args.model_on_rank and int(args.model_on_rank[0]) == rank:
        argv[argv.index("--model") + 1] = args.model_on_rank[1]
    sys.exit(main(argv))
