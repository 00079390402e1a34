"""One rank of a conversion drop-in under torchrun, with one fault injected on one rank.

    torchrun ... dist_convert_worker.py [--to-hf] [--kill-rank R | --fail-rank R | --fsize-on-rank R BYTES]
        [--arg-on-rank R NAME VALUE] [--cwd-on-rank R DIR] -- ARGS

Runs ``flame_ext.convert_hf_to_dcp`` (``--to-hf``: ``flame_ext.convert_dcp_to_hf``).
``--kill-rank R``: rank R is killed (SIGKILL, no clean-up possible) just after it read its first block, so
the others are mid-write. ``--fail-rank R``: rank R's write fails there instead (disk full).
``--fsize-on-rank R BYTES``: rank R runs under a file size limit (``RLIMIT_FSIZE``, as ``ulimit -f`` sets; Python
ignores SIGXFSZ, so a write past it fails with ``EFBIG``), a real failure of the system's, not an injected one.
``--arg-on-rank R NAME VALUE``: rank R is given ``--NAME VALUE`` instead, as a mistyped launch script would.
``--cwd-on-rank R DIR``: rank R starts in DIR, so a relative ``--model`` names another folder there, as the same
command on two nodes names each node's own copy.
ARGS are the drop-in's own; everything else is the real drop-in.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import signal
import sys

from flame_ext.io import dcp, dcp_save


def after_first_block_read(then) -> None:  # noqa: ANN001 -- what to do next: die or fail
    """to-hf: ``then()`` when the converter asks for its second block (the first is written)."""
    blocks = dcp.DCPRowReader.blocks

    def first_then(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202 -- the reader's own signature
        for n, block in enumerate(blocks(self, *args, **kwargs)):
            if n:
                then()
            yield block
        then()

    dcp.DCPRowReader.blocks = first_then


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/injected/disk")


def kill_after_first_block() -> None:
    read_block = dcp_save._StreamingPlanner.resolve_data

    def resolve_then_die(self, item):  # noqa: ANN001, ANN202 -- torch's planner signature
        read_block(self, item)
        os.kill(os.getpid(), signal.SIGKILL)

    dcp_save._StreamingPlanner.resolve_data = resolve_then_die


def fail_after_first_block() -> None:
    read_block = dcp_save._StreamingPlanner.resolve_data

    def resolve_then_fail(self, item):  # noqa: ANN001, ANN202 -- torch's planner signature
        read_block(self, item)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/injected/disk")

    dcp_save._StreamingPlanner.resolve_data = resolve_then_fail


if __name__ == "__main__":
    split = sys.argv.index("--")
    own, argv = sys.argv[1:split], sys.argv[split + 1 :]
    p = argparse.ArgumentParser()
    p.add_argument("--to-hf", action="store_true")
    p.add_argument("--kill-rank", type=int)
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--arg-on-rank", nargs=3)
    p.add_argument("--fsize-on-rank", nargs=2, type=int)
    p.add_argument("--cwd-on-rank", nargs=2, action="append", default=[])
    args = p.parse_args(own)
    rank = int(os.environ["RANK"])
    if args.to_hf:
        from flame_ext.convert_dcp_to_hf import main
    else:
        from flame_ext.convert_hf_to_dcp import main
    if args.kill_rank == rank:
        after_first_block_read(die) if args.to_hf else kill_after_first_block()
    if args.fail_rank == rank:
        after_first_block_read(disk_full) if args.to_hf else fail_after_first_block()
    if args.fsize_on_rank and args.fsize_on_rank[0] == rank:
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_on_rank[1], args.fsize_on_rank[1]))
    for on, folder in args.cwd_on_rank:
        if int(on) == rank:
            os.chdir(folder)
    if args.arg_on_rank and int(args.arg_on_rank[0]) == rank:
        argv[argv.index("--" + args.arg_on_rank[1]) + 1] = args.arg_on_rank[2]
    sys.exit(main(argv))
