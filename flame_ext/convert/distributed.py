"""HF -> DCP under torchrun: N ranks write one checkpoint, the one a single process writes.

Every rank plans the whole conversion from metadata (cheap, and the same everywhere), then writes only its
share of the tensors, balanced by bytes, into one folder; DCP's coordinator merges the ranks' plans and
writes the single ``.metadata``. Rank 0 owns the destination: it takes the lock, makes the temporary
sibling, tells the others its path, and after every rank has written and flushed its files it records the
reference loss, writes the manifest and renames. Only files go through the filesystem (shared by all
ranks); only small Python objects (paths, digests, fingerprints, error lines) go through the process group.

A failure on any rank ends every rank with one line each, and nothing appears at the destination: steps
that can fail on one rank share their outcome (``_agree``), DCP's collective save raises a write failure on
every rank, and a rank that dies is noticed by the others through the process group (at once when its
connection closes, at the latest after ``--timeout-s``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from flame_ext.convert.hf_to_dcp import ConversionPlan, ConvertOptions, complete_manifest, prepare_conversion
from flame_ext.convert.summary import Progress, Summary, peak_rss_mb
from flame_ext.errors import DistributedRunError, FlameExtError, InputError, first_line
from flame_ext.io.dcp import WriteEntry, save_streaming
from flame_ext.io.destination import atomic_folder, check_destination, flush_files
from flame_ext.io.fingerprint import Recorder, nonfinite_keys
from flame_ext.io.manifest import config_hash, write_manifest

__all__ = ["launched_by_torchrun", "split_by_bytes", "convert_distributed", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0
# Rank 0 computes the reference loss while the others wait; on CPU at 70B that takes far longer than a
# collective should ever wait otherwise, so that one wait has a group of its own with this floor.
REFERENCE_WAIT_S = 4 * 3600.0
# Options that do not change what is written (the progress bar follows each rank's own terminal).
_LOCAL_OPTIONS = ("progress",)
# ConvertOptions fields whose command-line flag is not simply --<field>.
_FLAGS = {"reference": "--no-reference", "buffer_bytes": "--buffer-mb", "future_predictor": "--future-predictor-*"}


def launched_by_torchrun() -> bool:
    """True when this process is one of several ranks (torchrun sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def split_by_bytes(entries: list[WriteEntry], ranks: int) -> list[list[WriteEntry]]:
    """Each rank's share: largest tensor first, to the rank with the fewest bytes so far (ties: lowest rank).

    Deterministic, so every rank computes the same split without exchanging it. A tensor is never split
    between ranks: its fingerprint is then computed from the same blocks, in the same order, as in one process.
    """
    shares: list[list[WriteEntry]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    for e in sorted(entries, key=lambda e: (-e.spec.nbytes, e.key)):
        r = min(range(ranks), key=lambda i: (loads[i], i))
        shares[r].append(e)
        loads[r] += e.spec.nbytes
    return shares


@contextlib.contextmanager
def _process_group(timeout_s: float) -> Iterator[Any]:
    """The default group (gloo; gloo + nccl when the launch has GPUs) and a long-timeout gloo group for the
    wait on the reference loss; both torn down on exit."""
    import torch.distributed as dist

    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield dist.new_group(backend="gloo", timeout=timedelta(seconds=max(timeout_s, REFERENCE_WAIT_S)))
    finally:
        with contextlib.suppress(Exception):  # after a peer died it may fail too; the first error is the one
            dist.destroy_process_group()


def _all(obj: Any, group: Any = None) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def _agree(step: Callable[[], Any], what: str, group: Any = None) -> Any:
    """Run ``step`` on every rank and share whether it failed: the failing rank raises its own error, the
    others a ``DistributedRunError`` naming it, instead of waiting for it in the next collective."""
    try:
        result, failure = step(), None
    except Exception as exc:  # noqa: BLE001 -- shared with the other ranks before re-raising
        result, failure = None, exc
    outcomes = _all(None if failure is None else first_line(failure), group)
    if failure is not None:
        raise failure
    bad = [(r, m) for r, m in enumerate(outcomes) if m is not None]
    if bad:
        raise DistributedRunError(f"stopped: rank {bad[0][0]} failed {what}: {bad[0][1]}")
    return result


def _identity(opts: ConvertOptions, plan: ConversionPlan) -> dict[str, str]:
    """What must be the same on every rank: each option, the source's config and tensors, the plan."""
    options = {k: json.dumps(v) for k, v in asdict(opts).items() if k not in _LOCAL_OPTIONS}
    source = [
        config_hash(plan.hf.config),
        sorted((k, list(t.spec.shape), t.spec.dtype) for k, t in plan.hf.tensors.items()),
    ]
    written = [(e.key, list(e.spec.shape), e.spec.dtype) for e in plan.entries]
    options["source"] = hashlib.sha256(json.dumps(source).encode()).hexdigest()
    options["plan"] = hashlib.sha256(json.dumps(written).encode()).hexdigest()
    return options


def _refuse_different_ranks(opts: ConvertOptions, plan: ConversionPlan) -> None:
    """Every rank must convert the same source with the same options; refused on every rank otherwise."""
    identities = _all(_identity(opts, plan))
    for r, other in enumerate(identities[1:], start=1):
        differ = [k for k in identities[0] if other.get(k) != identities[0][k]]
        if not differ:
            continue
        named = [_FLAGS.get(k, f"--{k.replace('_', '-')}") for k in differ if k not in ("source", "plan")]
        if "source" in differ:
            named.append("the source's files")
        raise InputError(
            f"rank {r} was started differently from rank 0 ({', '.join(named or ['the plan'])} differ): every rank "
            "must run the same command on the same model; nothing was written"
        )


def _own_files(folder: Path, rank: int) -> list[Path]:
    """The data files this rank wrote (torch's FileSystemWriter names them ``__<rank>_<n>.distcp``)."""
    return sorted(folder.glob(f"__{rank}_*.distcp"))


def convert_distributed(opts: ConvertOptions, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Summary, int, int]:
    """Convert as one rank of a torchrun launch; returns this rank's summary, its rank and the world size.

    Rank 0's summary describes the whole checkpoint; another rank's describes its own share.
    """
    if timeout_s <= 0:
        raise InputError(f"--timeout-s {timeout_s}: must be positive")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    try:
        with _process_group(timeout_s) as slow_group:
            return _convert(opts, rank, world, slow_group), rank, world
    except (FlameExtError, OSError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # a collective broke (a rank died or timed out) or DCP wrapped a failure
        raise DistributedRunError(
            f"rank {rank} of {world} stopped: another rank failed or stopped ({type(exc).__name__}: "
            f"{first_line(exc)}); nothing was published at {opts.checkpoint}"
        ) from exc


def _convert(opts: ConvertOptions, rank: int, world: int, slow_group: Any) -> Summary:
    t0 = time.perf_counter()
    plan = _agree(lambda: prepare_conversion(opts), "to plan the conversion")
    _refuse_different_ranks(opts, plan)
    stack = contextlib.ExitStack()

    def stage() -> Path | None:
        if rank != 0:
            return None
        check_destination(opts.checkpoint, kind="dcp", force=opts.force)
        return stack.enter_context(atomic_folder(opts.checkpoint, kind="dcp", force=opts.force))

    staged = _agree(stage, "to prepare the destination")
    tmp = Path(_all(None if staged is None else str(staged))[0])
    with stack:  # on rank 0: any exception removes the temporary folder, success renames it
        share = split_by_bytes(plan.entries, world)[rank]
        recorder = Recorder({e.key: e.spec.shape for e in share})
        bar = Progress(sum(e.spec.nbytes for e in share), opts.progress and rank == 0, "convert")
        try:
            save_streaming(
                tmp,
                share,
                buffer_bytes=opts.buffer_bytes,
                on_written=bar.update,
                on_block=recorder.add_rows,
                distributed=True,
            )
        finally:
            bar.close()
        flush_files(_own_files(tmp, rank))  # each rank flushes what it wrote: on a shared filesystem only it can
        results = _all(recorder.values)  # after this, every rank's files are written and flushed
        summary = Summary(Path(opts.checkpoint).absolute(), notes=list(plan.notes), parameters=plan.parameters)

        def publish() -> None:
            if rank != 0:
                return
            fingerprints = {k: v for values in results for k, v in values.items()}
            complete_manifest(summary, plan, opts, nonfinite_keys(fingerprints), fingerprints)
            write_manifest(tmp, summary.manifest)
            stack.close()  # made durable and renamed: the destination appears whole

        _agree(publish, "to record the reference loss, write the manifest or publish the checkpoint", slow_group)
    mine = plan.entries if rank == 0 else share
    if rank != 0:
        summary.parameters = sum(e.spec.numel for e in share)
    summary.tensors = len(mine)
    summary.bytes = sum(e.spec.nbytes for e in mine)
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_mb = peak_rss_mb()
    return summary
