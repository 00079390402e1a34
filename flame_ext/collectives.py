"""Rank agreement: collectives that give every rank the same answer, so no rank waits for one that gave up.

Each function runs on the given process group (the default one unless named) and must be called by ALL
ranks in the same order; without a process group (one process) they are plain local operations. Only
small Python objects go through them (paths, messages, digests, fingerprints), never checkpoint tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from flame_ext.errors import DistributedRunError, exit_code_of, failure_reason

__all__ = [
    "launched_by_torchrun",
    "world",
    "rank",
    "gather",
    "broadcast",
    "agreed",
    "rank_0s",
    "failure_elsewhere",
    "RankFailure",
]


class RankFailure(DistributedRunError):
    """Raised on the other ranks when a step failed on one rank (that rank raises its own error)."""


def launched_by_torchrun() -> bool:
    """True when this process is one of several ranks (torchrun sets ``WORLD_SIZE``); no process group needed."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _initialized() else 0


def gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` on every rank (one small collective); ``[obj]`` without a process group."""
    if not _initialized():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank of the default group (one collective); ``obj`` without a process group."""
    if not _initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed(step: Callable[[], Any], what: str, group: Any = None) -> Any:
    """Run ``step`` on every rank and share whether it failed, so a failure on one rank ends all of them.

    The failing rank re-raises its own exception (with its traceback); the others raise ``RankFailure``
    naming it and quoting its one-line reason (``errors.failure_reason``: for a failed write, the file and
    the system's reason), with the exit code the failing rank has, instead of waiting for it in the next
    collective.
    """
    try:
        result, failure = step(), None
    except Exception as exc:  # noqa: BLE001 -- shared with the other ranks before re-raising
        result, failure = None, exc
    shared = gather(None if failure is None else (failure_reason(failure), exit_code_of(failure)), group)
    if failure is not None:
        raise failure
    bad = [(r, m) for r, m in enumerate(shared) if m is not None]
    if bad:
        r, (reason, code) = bad[0]
        raise RankFailure(f"{what} failed on rank {r}: {reason}", exit_code=code)
    return result


def rank_0s(step: Callable[[], Any], what: str) -> Any:
    """Run ``step`` on rank 0 alone and give its result to every rank (one broadcast), for reads of files that
    ranks could each see differently (a shared file system that shows a file to some nodes later, a file being
    replaced): ranks that decide from what they read must decide from the same thing.

    A failure on rank 0 re-raises there; the others raise ``RankFailure`` quoting its one-line reason, as
    ``agreed`` does. The result must pickle (it goes through ``broadcast_object_list``).
    """
    result, failure, message = None, None, None
    if rank() == 0:
        try:
            result = step()
        except Exception as exc:  # noqa: BLE001 -- shared with the other ranks before re-raising
            failure, message = exc, (failure_reason(exc), exit_code_of(exc))
    result, message = broadcast((result, message))
    if failure is not None:
        raise failure
    if message is not None:
        reason, code = message
        raise RankFailure(f"{what} failed on rank 0: {reason}", exit_code=code)
    return result


def failure_elsewhere(failures: Mapping[int, BaseException], what: str) -> RankFailure | None:
    """For a collective that raised on every rank what failed on some (DCP's save): None when this rank is one
    of them (it raises its own failure), else ``RankFailure`` naming the first failing rank and its reason."""
    if not failures or rank() in failures:
        return None
    first = min(failures)
    reason, code = failure_reason(failures[first]), exit_code_of(failures[first])
    return RankFailure(f"{what} failed on rank {first}: {reason}", exit_code=code)
