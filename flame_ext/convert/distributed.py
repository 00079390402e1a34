"""Conversion under torchrun: N ranks write one output, the one a single process writes.

Every rank plans the whole conversion from metadata (cheap, and the same everywhere), checks that every
other rank was started the same way (and, after writing, that it converted rank 0's bytes: ``same_source``),
then writes only its share, balanced by bytes, into one temporary
folder that rank 0 owns: rank 0 takes the destination's lock, makes the temporary sibling and tells the
others its path; after every rank has written and flushed its own files, rank 0 writes what is written once
and renames. Only files go through the filesystem (shared by all ranks); only small Python objects (paths,
digests, fingerprints, error lines) go through the process group.

- ``convert`` (HF -> DCP): a rank's share is a set of tensors; DCP's coordinator merges the ranks' plans and
  writes the single ``.metadata``; rank 0 records the reference loss and writes the manifest.
- ``to-hf`` (DCP -> HF): a rank's share is a set of whole safetensors shards, the shards (names, contents
  and order) one process writes, so the folder is the same byte for byte; rank 0 writes the index, the
  config and the tokenizer files.

A failure on any rank ends every rank with one line each, and nothing appears at the destination: steps
that can fail on one rank share their outcome (``collectives.agreed``), and a rank that dies is noticed by
the others through the process group (at once when its connection closes, at the latest after
``--timeout-s``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from flame_ext.collectives import RankFailure, agreed, gather
from flame_ext.convert.dcp_to_hf import (
    ToHFOptions,
    ToHFPlan,
    finish_folder,
    nonfinite_note,
    prepare_to_hf,
    write_shards,
)
from flame_ext.convert.hf_to_dcp import ConversionPlan, ConvertOptions, complete_manifest, prepare_conversion
from flame_ext.convert.same_source import (
    Block,
    BlockDigests,
    differing_keys,
    file_identities,
    mixed_sources_message,
    same_files,
)
from flame_ext.convert.summary import Progress, Summary, peak_rss_mb
from flame_ext.declaration import command_options
from flame_ext.errors import (
    DistributedRunError,
    FlameExtError,
    InputError,
    exit_code_of,
    failure_reason,
    first_line,
)
from flame_ext.fingerprints.algorithm import Recorder, nonfinite_keys
from flame_ext.io.dcp_save import WriteEntry, save_streaming
from flame_ext.io.destination import Kind, atomic_folder, check_destination, flush_files
from flame_ext.io.digests import FILES_SECTION, digest_files, files_section, written_files
from flame_ext.io.manifest import MANIFEST_NAME, config_hash, write_manifest
from flame_ext.process import after_report, resume_collector

__all__ = ["split_by_bytes", "convert_distributed", "to_hf_distributed", "DEFAULT_TIMEOUT_S"]

T = TypeVar("T")
P = TypeVar("P")
DEFAULT_TIMEOUT_S = 300.0
# Rank 0 computes the reference loss while the others wait; on CPU at 70B that takes far longer than a
# collective should ever wait otherwise, so that one wait has a group of its own with this floor.
REFERENCE_WAIT_S = 4 * 3600.0
# Options that do not change what is written (the progress bar follows each rank's own terminal; how long a rank
# waits for the others).
_LOCAL_OPTIONS = ("progress", "timeout_s")
# Each option field's command-line flag (``buffer_bytes``: --buffer-mb), as declared.
_FLAGS = {o.name: o.flag for options in (ConvertOptions, ToHFOptions) for o in command_options(options)}


def split_by_bytes(items: Sequence[T], ranks: int, nbytes: Callable[[T], int]) -> list[list[T]]:
    """Each rank's share: largest item first, to the rank with the fewest bytes so far (ties: the earlier item,
    the lowest rank).

    Deterministic, so every rank computes the same split without exchanging it. An item (a tensor for
    ``convert``, a safetensors shard for ``to-hf``) is never split between ranks: a tensor's fingerprint is then
    computed from the same blocks, in the same order, as in one process.
    """
    shares: list[list[T]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    for i in sorted(range(len(items)), key=lambda i: (-nbytes(items[i]), i)):
        r = min(range(ranks), key=lambda j: (loads[j], j))
        shares[r].append(items[i])
        loads[r] += nbytes(items[i])
    return shares


def _group_bytes(group: list[WriteEntry]) -> int:
    return sum(e.spec.nbytes for e in group)


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
    except Exception:
        after_report(_leave_together)  # each rank says its line first, then they leave (process.after_report)
        raise
    except BaseException:  # Ctrl-C, SIGTERM: leave at once
        _leave()
        raise
    else:
        _leave()


def _leave_together() -> None:
    """Wait (briefly: a peer may be dead) for every rank to have reported, then tear the groups down."""
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        dist.monitored_barrier(timeout=timedelta(seconds=LEAVE_WAIT_S))
    _leave()


def _leave() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):  # after a peer died it may fail too; the first error is the one
        dist.destroy_process_group()


LEAVE_WAIT_S = 10.0  # how long a failed rank waits for the others to say their line before it exits


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def _option_identity(opts: ConvertOptions | ToHFOptions) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in asdict(opts).items() if k not in _LOCAL_OPTIONS}


def _identity(opts: ConvertOptions, plan: ConversionPlan) -> dict[str, str]:
    """What must be the same on every rank: each option, the source's config and tensors, the plan."""
    source = [
        config_hash(plan.hf.config),
        sorted((k, list(t.spec.shape), t.spec.dtype) for k, t in plan.hf.tensors.items()),
    ]
    written = [(e.key, list(e.spec.shape), e.spec.dtype) for e in plan.entries]
    return {**_option_identity(opts), "source": _digest(source), "plan": _digest(written)}


def _to_hf_identity(opts: ToHFOptions, plan: ToHFPlan) -> dict[str, str]:
    """As ``_identity`` for ``to-hf``: the options, the checkpoint's tensors and the config, the shards."""
    stored = sorted((k, list(s.shape), s.dtype) for k, s in plan.found.items() if s is not None)
    source = [stored, (plan.config_dir / "config.json").read_text()]
    written = [plan.names, [[(k, list(plan.specs[k].shape), plan.specs[k].dtype) for k in s] for s in plan.shards]]
    return {**_option_identity(opts), "source": _digest(source), "plan": _digest(written)}


def _refuse_different_ranks(identity: dict[str, str]) -> None:
    """Every rank must convert the same source with the same options; refused on every rank otherwise."""
    identities = gather(identity)
    for r, other in enumerate(identities[1:], start=1):
        differ = [k for k in identities[0] if other.get(k) != identities[0][k]]
        if not differ:
            continue
        named = [_FLAGS.get(k, f"--{k.replace('_', '-')}") for k in differ if k not in ("source", "plan")]
        if "source" in differ:
            named.append("the source's files")
        raise InputError(
            f"rank {r} was started differently from rank 0 ({', '.join(named or ['the plan'])} differ): every rank "
            "must run the same command on the same input; nothing was written"
        )


def _own_files(folder: Path, rank: int) -> list[Path]:
    """The data files this rank wrote (torch's FileSystemWriter names them ``__<rank>_<n>.distcp``)."""
    return sorted(folder.glob(f"__{rank}_*.distcp"))


def _as_rank(run: Callable[[int, int, Any], Summary], dest: str, timeout_s: float) -> tuple[Summary, int, int]:
    """Run ``run(rank, world, slow_group)`` as one rank of a torchrun launch inside the process group. A failure
    becomes one line saying nothing was published at ``dest``: this rank's failed write names the rank and the
    file; another rank's failure quotes that rank's reason; a broken collective (a rank died or timed out)
    says so. The exit code is the cause's (``errors.exit_code_of``), the same on every rank."""
    if timeout_s <= 0:
        raise InputError(f"--timeout-s {timeout_s}: must be positive")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    try:
        with _process_group(timeout_s) as slow_group:
            return run(rank, world, slow_group), rank, world
    except RankFailure as exc:  # another rank failed: its reason, quoted, and its exit code
        raise DistributedRunError(
            f"rank {rank} of {world} stopped: {exc}; nothing was published at {dest}", exc.exit_code
        ) from exc
    except OSError as exc:  # this rank's write failed (disk full, file size limit): named as the others name it
        raise DistributedRunError(
            f"rank {rank} of {world}: {failure_reason(exc)}; nothing was published at {dest}", exit_code_of(exc)
        ) from exc
    except (FlameExtError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # a collective broke (a rank died or timed out) or DCP wrapped a failure
        raise DistributedRunError(
            f"rank {rank} of {world} stopped: another rank failed or stopped ({type(exc).__name__}: "
            f"{first_line(exc)}); nothing was published at {dest}"
        ) from exc


def _plan_and_stage(
    rank: int,
    prepare: Callable[[], P],
    what: str,
    identity: Callable[[P], dict[str, str]],
    dest: str,
    kind: Kind,
    force: bool,
) -> tuple[P, Path, contextlib.ExitStack]:
    """The steps before any write, on every rank: plan (a failure on any rank stops all), refuse ranks started
    differently, and stage: rank 0 checks the destination and enters its atomic folder on the returned stack
    (closing it publishes; an exception in it removes the folder); every rank gets the folder's path."""
    plan = agreed(prepare, what)
    resume_collector()  # start-up is over: the tensor data follows
    _refuse_different_ranks(identity(plan))
    stack = contextlib.ExitStack()

    def stage() -> Path | None:
        if rank != 0:
            return None
        check_destination(dest, kind=kind, force=force)
        return stack.enter_context(atomic_folder(dest, kind=kind, force=force))

    staged = agreed(stage, "preparing the destination")
    return plan, Path(gather(None if staged is None else str(staged))[0]), stack


def convert_distributed(opts: ConvertOptions, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Summary, int, int]:
    """Convert as one rank of a torchrun launch; returns this rank's summary, its rank and the world size.

    Rank 0's summary describes the whole checkpoint; another rank's describes its own share.
    """
    return _as_rank(lambda rank, world, slow: _convert(opts, rank, world, slow), opts.checkpoint, timeout_s)


def _convert(opts: ConvertOptions, rank: int, world: int, slow_group: Any) -> Summary:
    t0 = time.perf_counter()
    plan, tmp, stack = _plan_and_stage(
        rank, lambda: prepare_conversion(opts), "planning the conversion", lambda p: _identity(opts, p),
        opts.checkpoint, "dcp", opts.force,
    )  # fmt: skip
    with stack:  # on rank 0: any exception removes the temporary folder, success renames it
        # A group (a native layer, one from_hf call) is never split between ranks: each rank converts its own.
        groups = plan.groups or [[e] for e in plan.entries]
        share = [e for g in split_by_bytes(groups, world, _group_bytes)[rank] for e in g]
        # A rank that reads other copies of the source files than rank 0 digests every block it writes.
        identities = gather(file_identities(plan.entries))
        digesting = [r != 0 and not same_files(identities[r], identities[0]) for r in range(world)]
        blocks = BlockDigests() if digesting[rank] else None
        recorder = Recorder({e.key: e.spec.shape for e in share}, rounded=True)
        with Progress(sum(e.spec.nbytes for e in share), opts.progress and rank == 0, "convert") as bar:
            save_streaming(
                tmp,
                share,
                buffer_bytes=opts.buffer_bytes,
                on_written=bar.update,
                on_block=recorder.add_rows if blocks is None else _both(recorder.add_rows, blocks.add),
                distributed=True,
                direct=not opts.record_sha256,  # hashed just below: kept in the page cache for that
            )
        own = _own_files(tmp, rank)
        flush_files(own)  # each rank flushes what it wrote: on a shared filesystem only it can
        files: dict[str, str] = {}
        if opts.record_sha256:  # the same on every rank (an option): so is this collective
            files = agreed(lambda: digest_files(tmp, [p.name for p in own]), "hashing its files (--record-sha256)")
        # After this gather, every rank's files are written and flushed.
        results = gather(
            _RankResult(recorder.values, recorder.rounded, files, blocks.blocks if blocks else [], _sources(share))
        )
        summary = Summary(Path(opts.checkpoint).absolute(), notes=list(plan.notes), parameters=plan.parameters)
        if any(digesting):
            _refuse_other_bytes(plan.entries, results, rank, opts.checkpoint, slow_group)
            others = [r for r, d in enumerate(digesting) if d]
            summary.notes.append(
                f"rank(s) {', '.join(map(str, others))} read other copies of the source files than rank 0: their "
                f"{sum(len(results[r].blocks) for r in others)} blocks, converted again on rank 0 from its own files, "
                "matched byte for byte (sha256)"
            )

        def publish() -> None:
            if rank != 0:
                return
            fingerprints, rounded = _merged([r.fingerprints for r in results]), _merged([r.rounded for r in results])
            manifest = complete_manifest(
                summary, plan, opts, nonfinite_keys(fingerprints), fingerprints, rounded=rounded
            )
            if opts.record_sha256:
                files = {name: digest for r in results for name, digest in r.files.items()}
                rest = [n for n in written_files(tmp, MANIFEST_NAME) if n not in files]  # .metadata (rank 0 wrote it)
                manifest[FILES_SECTION] = files_section({**files, **digest_files(tmp, rest)})
            write_manifest(tmp, manifest)
            stack.close()  # made durable and renamed: the destination appears whole

        agreed(publish, "recording the reference loss, writing the manifest or publishing the checkpoint", slow_group)
    mine = plan.entries if rank == 0 else share
    if rank != 0:
        summary.parameters = sum(e.spec.numel for e in share)
    summary.tensors = len(mine)
    summary.bytes = sum(e.spec.nbytes for e in mine)
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_mb = peak_rss_mb()
    return summary


def to_hf_distributed(opts: ToHFOptions, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Summary, int, int]:
    """``to-hf`` as one rank of a torchrun launch; returns this rank's summary, its rank and the world size.

    Rank 0's summary describes the whole HF folder; another rank's describes its own shards.
    """
    return _as_rank(lambda rank, world, _: _to_hf(opts, rank, world), opts.out, timeout_s)


def _to_hf(opts: ToHFOptions, rank: int, world: int) -> Summary:
    t0 = time.perf_counter()
    plan, tmp, stack = _plan_and_stage(
        rank, lambda: prepare_to_hf(opts), "reading the checkpoint and the config", lambda p: _to_hf_identity(opts, p),
        opts.out, "hf", opts.force,
    )  # fmt: skip
    with stack:  # on rank 0: any exception removes the temporary folder, success renames it
        mine = split_by_bytes(list(range(len(plan.shards))), world, plan.shard_bytes)[rank]

        def write() -> Recorder:
            with Progress(sum(plan.shard_bytes(i) for i in mine), opts.progress and rank == 0, "to-hf") as bar:
                recorder = write_shards(plan, tmp, sorted(mine), opts.buffer_bytes, bar.update)
            flush_files(tmp / plan.names[i] for i in mine)  # on a shared filesystem only the writer can
            return recorder

        recorder = agreed(write, "writing its safetensors shards")  # after this every shard is written and flushed
        results = gather(recorder.values)
        summary = Summary(Path(opts.out).absolute(), notes=list(plan.notes))

        def publish() -> None:
            if rank != 0:
                return
            summary.notes += finish_folder(plan, tmp)
            summary.warnings += nonfinite_note(plan, _merged(results))
            stack.close()  # made durable and renamed: the destination appears whole

        agreed(publish, "writing the index, config and tokenizer files or publishing the folder")
    keys = list(plan.specs) if rank == 0 else [k for i in mine for k in plan.shards[i]]
    summary.tensors = len(keys)
    summary.parameters = sum(plan.specs[k].numel for k in keys)
    summary.bytes = sum(plan.specs[k].nbytes for k in keys)
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_mb = peak_rss_mb()
    return summary


@dataclass
class _RankResult:
    """What a rank sends rank 0 once its files are written: fingerprints, file digests (``--record-sha256``),
    block digests (when it read other copies of the source files) and each of its tensors' source file."""

    fingerprints: dict[str, Any]
    rounded: dict[str, Any]
    files: dict[str, str]
    blocks: list[Block]
    sources: dict[str, str]


def _sources(entries: list[WriteEntry]) -> dict[str, str]:
    return {e.key: str(e.source) for e in entries if e.source is not None}


def _both(a: Callable[[str, int, torch.Tensor], None], b: Callable[[str, int, torch.Tensor], None]) -> Any:
    def call(key: str, start: int, block: torch.Tensor) -> None:
        a(key, start, block)
        b(key, start, block)

    return call


def _refuse_other_bytes(
    entries: list[WriteEntry], results: list[_RankResult], rank: int, dest: str, slow_group: Any
) -> None:
    """Rank 0 converts every digested block again from its own files (it may read most of the model: the long
    wait); every rank then refuses, with the same line, when any block differs."""

    def check() -> str | None:
        if rank != 0:
            return None
        found = {r: differing_keys(entries, res.blocks) for r, res in enumerate(results) if res.blocks}
        files = {r: res.sources for r, res in enumerate(results)} | {0: _sources(entries)}
        differ = {r: keys for r, keys in found.items() if keys}
        return mixed_sources_message(differ, files, dest) if differ else None

    refusal = gather(agreed(check, "checking that every rank read rank 0's bytes", slow_group), slow_group)[0]
    if refusal:
        raise InputError(refusal)


def _merged(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' fingerprint maps (disjoint keys) as one."""
    return {k: v for values in per_rank for k, v in values.items()}
