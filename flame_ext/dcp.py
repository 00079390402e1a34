"""The DCP side: a streaming writer, a metadata reader, and the key layouts trainers ask for.

The writer plans a checkpoint from shapes and dtypes alone and reads each tensor only when torch's
``FileSystemWriter`` asks for it. Tensors larger than a block are planned as row blocks (the way an
FSDP-sharded save stores a tensor in chunks), so tensor data in memory stays within the buffer, whatever
the model size. ``single_file_per_rank=False`` matters: with one file per rank torch keeps every tensor of
the file alive until it is closed, i.e. the whole checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from .errors import CheckpointFormatError, FlameExtError, InputError
from .hf import TensorSpec, dtype_name

__all__ = [
    "LAYOUTS",
    "DEFAULT_BUFFER_BYTES",
    "WriteEntry",
    "StreamCancelled",
    "save_streaming",
    "read_dcp_metadata",
    "load_tensor",
    "model_prefix",
    "NON_MODEL_PREFIXES",
]

# flat: what torchtitan asks for on a model-only load; nested: flame's stock `{"model": sd}` keys,
# which torchtitan 0.1's full-checkpoint (non model-only) load expects.
LAYOUTS = {"flat": "", "nested": "model."}
# Entries of a full training checkpoint that are not model weights.
NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.")
DEFAULT_BUFFER_BYTES = 256 * 1024 * 1024
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class WriteEntry:
    """One tensor to write: its key, spec as written, and a reader for rows [start, end) of it.

    ``source`` names what feeds it (e.g. the HF key), so two plans can be compared without reading data.
    """

    key: str
    spec: TensorSpec
    read_rows: Callable[[int, int], torch.Tensor]
    source: str = ""


class StreamCancelled(Exception):
    """``save_streaming`` stopped because its ``should_stop`` said so; the folder holds a partial write."""


def _row_blocks(spec: TensorSpec, buffer_bytes: int) -> list[tuple[int, int]]:
    if not spec.shape or spec.nbytes <= buffer_bytes:
        return [(0, spec.shape[0] if spec.shape else 1)]
    row_bytes = max(1, spec.nbytes // spec.shape[0])
    step = max(1, buffer_bytes // row_bytes)
    return [(s, min(s + step, spec.shape[0])) for s in range(0, spec.shape[0], step)]


class _StreamingPlanner(DefaultSavePlanner):
    """A save planner whose plan comes from specs and whose data is read at ``resolve_data`` time.

    With ``prefetch`` it reads the block after the one asked for in a helper thread while torch writes
    the current one (reads and writes both release the GIL), so the disk never waits for the reader.
    A block asked for out of order is simply read on the spot: the prefetch is a guess, never a promise.
    """

    def __init__(
        self,
        entries: list[WriteEntry],
        buffer_bytes: int,
        on_written: Callable[[int], None],
        should_stop: Callable[[], bool] | None = None,
        prefetch: bool = False,
    ):
        super().__init__()
        self._entries = {e.key: e for e in entries}
        self._buffer_bytes = buffer_bytes
        self._on_written = on_written
        self._should_stop = should_stop
        self._following: dict[tuple[str, int], tuple[str, int, int]] = {}
        self._pending: tuple[tuple[str, int], Future] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flame-ext-read") if prefetch else None

    def close(self) -> None:
        """Wait for an in-flight read (at most one block) and stop the helper thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending = None

    def create_local_plan(self) -> SavePlan:
        items = []
        order: list[tuple[str, int, int]] = []
        for e in self._entries.values():
            props = TensorProperties(dtype=getattr(torch, e.spec.dtype))
            size = torch.Size(e.spec.shape)
            for start, end in _row_blocks(e.spec, self._buffer_bytes):
                order.append((e.key, start, end))
                offsets = torch.Size([start] + [0] * (len(size) - 1)) if size else torch.Size([])
                sizes = torch.Size([end - start, *size[1:]]) if size else torch.Size([])
                items.append(
                    WriteItem(
                        index=MetadataIndex(e.key, offsets),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes), properties=props, size=size
                        ),
                    )
                )
        self._following = {(k, s): nxt for (k, s, _), nxt in zip(order, order[1:])}
        self.plan = SavePlan(items, planner_data=self.mappings)
        return self.plan

    def _read(self, key: str, start: int, end: int) -> torch.Tensor:
        e = self._entries[key]
        return e.read_rows(0, 1) if not e.spec.shape else e.read_rows(start, end)

    def _take(self, key: str, start: int, end: int) -> torch.Tensor:
        """The block, from the prefetch if it guessed right, else read now; then prefetch its successor."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == (key, start):
            data = pending[1].result()
        else:
            if pending is not None:  # a wrong guess: let it finish (memory bound), drop it, errors included
                pending[1].exception()
            data = self._read(key, start, end)
        nxt = self._following.get((key, start))
        if self._pool is not None and nxt is not None:
            self._pending = ((nxt[0], nxt[1]), self._pool.submit(self._read, *nxt))
        return data

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        if self._should_stop is not None and self._should_stop():
            raise StreamCancelled("stopped on request")
        e = self._entries[write_item.index.fqn]
        start = write_item.index.offset[0] if e.spec.shape else 0
        data = self._take(e.key, start, start + write_item.tensor_data.chunk.sizes[0] if e.spec.shape else 1)
        expected = tuple(write_item.tensor_data.chunk.sizes)
        if tuple(data.shape) != expected or dtype_name(data.dtype) != e.spec.dtype:
            raise CheckpointFormatError(
                f"{e.key}: source gave {tuple(data.shape)} {dtype_name(data.dtype)}, planned {expected} {e.spec.dtype}"
            )
        self._on_written(data.numel() * data.element_size())
        return data.contiguous()


def save_streaming(
    folder: Path,
    entries: Iterable[WriteEntry],
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    on_written: Callable[[int], None] = lambda n: None,
    threads: int = DEFAULT_THREADS,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Write ``entries`` as a DCP checkpoint into ``folder``; tensor data in memory stays within ``buffer_bytes``.

    With one writer thread (the default and the recommendation), three blocks are alive at the peak: the
    one torch just wrote (its write loop still references it while asking for the next), the one being
    written and the one being prefetched; blocks are planned at ``buffer_bytes / 3``. With more threads,
    torch runs the extra ones itself (no prefetch; two blocks each, ``buffer_bytes / (2 * threads)``), a
    failure in one of them is printed rather than raised, and Ctrl-C does not stop them.

    Files are not fsynced one by one (each fsync stalls the stream on the disk); the caller makes the
    folder durable once, before publishing it (``destination.atomic_folder`` does), as ``cp`` + ``sync``.

    ``should_stop`` is asked before each block; when it returns True the write ends with ``StreamCancelled``.
    """
    entries = list(entries)
    # Blocks are fresh allocations of tens of MB: with 4 KiB pages each costs one page fault per page,
    # which in a VM made allocation cost as much as the copy itself (1.3 s per GB measured, against
    # 0.2 s with huge pages). torch backs large CPU allocations with transparent huge pages when this is
    # set before its first large allocation; it changes nothing else.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    threads = max(1, threads)
    block_bytes = max(1, buffer_bytes // 3 if threads == 1 else buffer_bytes // (2 * threads))
    planner = _StreamingPlanner(entries, block_bytes, on_written, should_stop, prefetch=threads == 1)
    meta_sd = {e.key: torch.empty(e.spec.shape, dtype=getattr(torch, e.spec.dtype), device="meta") for e in entries}
    writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=False, thread_count=threads, sync_files=False)
    with warnings.catch_warnings():
        # "assuming the intent is to save in a single process": yes, that is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.save(meta_sd, storage_writer=writer, planner=planner, no_dist=True)
        except CheckpointException as exc:
            cause = _root_cause(exc)
            if cause is exc:
                raise
            raise cause from exc
        finally:
            planner.close()


def _root_cause(exc: CheckpointException) -> BaseException:
    """DCP wraps a failure of any rank in ``CheckpointException`` (a ``BaseException``); surface the cause.

    An ``OSError`` (disk full, file size limit), one of our own errors, or a Ctrl-C (``KeyboardInterrupt``,
    which DCP catches as a ``BaseException`` and wraps like any failure) is re-raised as itself, so callers
    handle it like any other; anything else stays a ``CheckpointException``. DCP stores each failure as an
    ``(exception, traceback summary)`` pair, not as the exception itself.
    """
    surfaced = (OSError, FlameExtError, KeyboardInterrupt, StreamCancelled)
    for failure in getattr(exc, "failures", {}).values():
        failure = failure[0] if isinstance(failure, tuple) and failure else failure
        if isinstance(failure, surfaced):
            return failure
        cause = getattr(failure, "__cause__", None) or getattr(failure, "__context__", None)
        if isinstance(cause, surfaced):
            return cause
    return exc


class _RefusedGlobal(pickle.UnpicklingError):
    """``.metadata`` names a Python object outside what DCP metadata is made of."""


# Everything a DCP ``.metadata`` pickle refers to (torch 2.x, any writer: flame-ext, torchtitan, FSDP saves),
# by exact name: allowing whole modules would allow their imports too (``...checkpoint.metadata.os``).
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                 "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
} | {(module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles ``.metadata`` allowing only the classes DCP metadata is made of.

    torch's own ``FileSystemReader.read_metadata`` uses plain ``pickle.load``, which runs whatever code a
    crafted file names. Every flame-ext path reads a checkpoint's metadata through ``read_dcp_metadata``
    first, so a hostile ``.metadata`` is refused here before torch (or torchtitan's load) unpickles it.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _RefusedGlobal(f"{module}.{name}")


def read_dcp_metadata(folder: str | Path) -> dict[str, TensorSpec | None]:
    """Every key of a DCP checkpoint with its global shape and dtype (``None`` for non-tensor entries).

    Reads only ``.metadata``: no tensor data, so it costs the same for a tiny model and a 70B one. The file
    is a pickle: it is unpickled with an allow-list (see ``_MetadataUnpickler``), never as is.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: is a file; expected a DCP checkpoint folder")
    if not (folder / ".metadata").is_file():
        raise CheckpointFormatError(f"{folder}: not a DCP checkpoint (no .metadata file)")
    try:
        with open(folder / ".metadata", "rb") as f:
            md = _MetadataUnpickler(f).load()
    except _RefusedGlobal as exc:
        raise CheckpointFormatError(
            f"{folder}/.metadata: refused: it names {exc}, which DCP metadata never holds, and unpickling it could run "
            "code; do not load this checkpoint with any tool unless you trust where it came from"
        ) from exc
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointFormatError(f"{folder}/.metadata: unreadable ({type(exc).__name__}); the checkpoint is corrupt") from exc
    if not isinstance(md, Metadata):
        raise CheckpointFormatError(f"{folder}/.metadata: unreadable (holds a {type(md).__name__}); the checkpoint is corrupt")
    out: dict[str, TensorSpec | None] = {}
    for key, item in md.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            out[key] = TensorSpec(tuple(item.size), dtype_name(item.properties.dtype))
        else:
            out[key] = None
    return out


def load_tensor(folder: str | Path, key: str, spec: TensorSpec) -> torch.Tensor:
    """Read one tensor of a DCP checkpoint (all its chunks), without a process group."""
    t = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load({key: t}, checkpoint_id=str(folder), planner=DefaultLoadPlanner(allow_partial_load=False), no_dist=True)
        except CheckpointException as exc:
            cause = _root_cause(exc)
            if cause is not exc:
                raise cause from exc
            failures = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
            if any(isinstance(f, pickle.UnpicklingError) for f in failures):  # torch reads records weights_only
                raise CheckpointFormatError(
                    f"{folder}: refused to read {key}: its record in the data files pickles Python objects other than "
                    "tensors, and loading them could run code; the checkpoint is corrupt or was tampered with"
                ) from exc
            first = next((f"{type(f).__name__}: {str(f).strip().splitlines()[0][:200]}" for f in failures if str(f).strip()), "unknown error")
            raise CheckpointFormatError(f"{folder}: cannot read {key} ({first})") from exc
    return t


def model_prefix(keys: Iterable[str], expected: Iterable[str]) -> str:
    """The prefix ("" or "model.") under which the expected model keys sit in a DCP checkpoint."""
    keys = set(keys)
    expected = list(expected)
    best, best_hits = "", -1
    for prefix in LAYOUTS.values():
        hits = sum(1 for k in expected if prefix + k in keys)
        if hits > best_hits:
            best, best_hits = prefix, hits
    return best


def replace_dtype(spec: TensorSpec, dtype: str | None) -> TensorSpec:
    """The spec at a requested dtype; only floating tensors change (integer tensors keep theirs)."""
    if dtype is None or not getattr(torch, spec.dtype).is_floating_point:
        return spec
    return dataclasses.replace(spec, dtype=dtype)
