"""The guard's collectives: problems pooled over ranks, and loss sums and maxima reduced over them.

The agreement primitives (``gather``, ``broadcast``, ``agreed``, ``rank_0s``, ``RankFailure``) live in
``flame_ext.collectives``, shared with distributed conversion, and are re-exported here.

All of these run on the default process group and must be called by ALL ranks in the same order;
without a process group (one process) they are plain local operations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from flame_ext.collectives import RankFailure, agreed, broadcast, gather, rank, rank_0s, world
from flame_ext.report import Problem

__all__ = [
    "world",
    "rank",
    "gather",
    "broadcast",
    "pool",
    "pool_counts",
    "agreed",
    "rank_0s",
    "sum_over_ranks",
    "max_over_ranks",
    "RankFailure",
    "stopping_as",
]


def stopping_as(
    stop: Callable[[RankFailure], Exception],
    collective: Callable[[Callable[[], Any], str], Any],
    step: Callable[[], Any],
    what: str,
) -> Any:
    """``collective(step, what)`` (``agreed`` or ``rank_0s``); a failure on another rank ends this one with
    ``stop(failure)``, the check's own validation error, so that every rank reports where the check stopped."""
    try:
        return collective(step, what)
    except RankFailure as exc:
        raise stop(exc) from exc


def pool(problems: list[Problem]) -> list[Problem]:
    """The union of all ranks' problems, one per (kind, key), naming the ranks when not all have it."""
    gathered = gather([asdict(p) for p in problems])
    seen: dict[tuple, tuple[dict, list[int]]] = {}
    for r, items in enumerate(gathered):
        for item in items:
            slot = seen.setdefault((item["kind"], item["severity"], item["key"]), (item, []))
            slot[1].append(r)
    pooled = []
    for item, on in seen.values():
        detail = item["detail"]
        if len(gathered) > 1 and len(on) < len(gathered):
            detail += f" (on rank {', '.join(map(str, on))} of {len(gathered)})"
        pooled.append(Problem(item["kind"], item["severity"], item["key"], detail, item["hint"]))
    return pooled


def pool_counts(counts: dict[str, int]) -> dict[str, int]:
    """Each count at its largest over the ranks, so the figures a report prints match the pooled problems
    (a key missing on one rank is counted, whichever rank prints)."""
    merged: dict[str, int] = {}
    for each in gather(dict(counts)):
        for key, n in each.items():
            merged[key] = max(merged.get(key, n), n)
    return merged


def max_over_ranks(value: float) -> float:
    """The largest of one number per rank (every rank gets the same answer)."""
    if world() == 1:
        return value
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    shared = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(shared, op=dist.ReduceOp.MAX)
    return shared.item()


def sum_over_ranks(sums: torch.Tensor) -> torch.Tensor:
    """Loss sums and token counts added over all ranks: the same batch on every data-parallel rank counts
    once per rank in both, so the mean is unchanged, and a rank whose loss differs moves everyone's."""
    if world() == 1:
        return sums
    import torch.distributed as dist

    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    shared = sums.to(device)
    dist.all_reduce(shared, op=dist.ReduceOp.SUM)
    return shared.cpu()
