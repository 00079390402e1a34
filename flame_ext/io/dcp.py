"""The DCP side: a streaming writer, a metadata reader, and the key layouts trainers ask for.

The writer plans a checkpoint from shapes and dtypes alone and reads each tensor only when torch's
``FileSystemWriter`` asks for it. Tensors larger than a block are planned as row blocks (the way an
FSDP-sharded save stores a tensor in chunks), so tensor data in memory stays within the buffer, whatever
the model size. ``single_file_per_rank=False`` matters: with one file per rank torch keeps every tensor of
the file alive until it is closed, i.e. the whole checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import queue
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _write_files_from_queue
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.futures import Future

from flame_ext.errors import (
    TERMINATING_SIGNALS,
    CheckpointFormatError,
    FlameExtError,
    InputError,
    first_line,
    refused_global,
)
from flame_ext.io.dcp_metadata import validate_metadata
from flame_ext.io.specs import TensorSpec, dtype_name

__all__ = [
    "LAYOUTS",
    "DEFAULT_BUFFER_BYTES",
    "WriteEntry",
    "save_streaming",
    "read_dcp_metadata",
    "load_tensor",
    "load_state",
    "DCPRowReader",
    "row_blocks",
    "model_prefix",
    "NON_MODEL_PREFIXES",
]

# flat: what torchtitan asks for on a model-only load; nested: flame's stock `{"model": sd}` keys,
# which torchtitan 0.1's full-checkpoint (non model-only) load expects.
LAYOUTS = {"flat": "", "nested": "model."}
# Entries of a full training checkpoint that are not model weights.
NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.")
DEFAULT_BUFFER_BYTES = 256 * 1024 * 1024
DEFAULT_THREADS = 2


@dataclass(frozen=True)
class WriteEntry:
    """One tensor to write: its key, spec as written, and a reader for rows [start, end) of it."""

    key: str
    spec: TensorSpec
    read_rows: Callable[[int, int], torch.Tensor]


def row_blocks(spec: TensorSpec, buffer_bytes: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) of at most ``buffer_bytes`` each (at least one row); ``[(0, 1)]`` for a 0-d tensor."""
    if not spec.shape or spec.nbytes <= buffer_bytes:
        return [(0, spec.shape[0] if spec.shape else 1)]
    row_bytes = max(1, spec.nbytes // spec.shape[0])
    step = max(1, buffer_bytes // row_bytes)
    return [(s, min(s + step, spec.shape[0])) for s in range(0, spec.shape[0], step)]


class _StreamingPlanner(DefaultSavePlanner):
    """A save planner whose plan comes from specs and whose data is read at ``resolve_data`` time.

    ``cancel()`` makes every later ``resolve_data`` raise, which is how writer threads are stopped
    between blocks when another one failed or the user pressed Ctrl-C.
    """

    def __init__(
        self,
        entries: list[WriteEntry],
        buffer_bytes: int,
        on_written: Callable[[int], None],
        on_block: Callable[[str, int, torch.Tensor], None] | None = None,
    ):
        super().__init__()
        self._on_block = on_block
        self._entries = {e.key: e for e in entries}
        self._buffer_bytes = buffer_bytes
        self._on_written = on_written
        self._cancelled = threading.Event()
        self._lock = threading.Lock()  # on_written (a progress bar) is called from several threads

    def cancel(self) -> None:
        self._cancelled.set()

    def create_local_plan(self) -> SavePlan:
        items = []
        for e in self._entries.values():
            props = TensorProperties(dtype=getattr(torch, e.spec.dtype))
            size = torch.Size(e.spec.shape)
            for start, end in row_blocks(e.spec, self._buffer_bytes):
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
        self.plan = SavePlan(items, planner_data=self.mappings)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        if self._cancelled.is_set():
            raise _Cancelled()
        e = self._entries[write_item.index.fqn]
        start = write_item.index.offset[0] if e.spec.shape else 0
        if not e.spec.shape:
            data = e.read_rows(0, 1)
        else:
            data = e.read_rows(start, start + write_item.tensor_data.chunk.sizes[0])
        expected = tuple(write_item.tensor_data.chunk.sizes)
        if tuple(data.shape) != expected or dtype_name(data.dtype) != e.spec.dtype:
            raise CheckpointFormatError(
                f"{e.key}: source gave {tuple(data.shape)} {dtype_name(data.dtype)}, planned {expected} {e.spec.dtype}"
            )
        if self._on_block is not None:
            self._on_block(e.key, start, data)  # the block in hand: a fingerprint costs no second read
        with self._lock:
            self._on_written(data.numel() * data.element_size())
        return data.contiguous()


class _Cancelled(Exception):
    """A writer thread stopped because another one failed (or Ctrl-C): never the error to report."""


class _Writer(dcp.FileSystemWriter):
    """torch's ``FileSystemWriter`` with its worker threads under our control.

    torch 2.13's own ``_write_data`` runs ``thread_count - 1`` extra threads beside the caller: an error
    in one of them is printed and the file it was writing silently left out of the results, and Ctrl-C
    in the caller leaves them writing into a folder being deleted. Here every file is written by a worker;
    the calling thread only waits (so Ctrl-C reaches it at once); the first failure stops the others
    between blocks, all have stopped before anything is raised. Files are written by torch's own per-file
    routine, so their format is torch's.
    """

    def _write_data(self, planner: _StreamingPlanner, file_queue: queue.Queue) -> Future:  # type: ignore[override]
        results: queue.Queue = queue.Queue()
        failures: list[BaseException] = []

        finished = [threading.Event() for _ in range(self.thread_count)]

        def work(done: threading.Event) -> None:
            try:
                _write_files_from_queue(
                    create_stream=self.fs.create_stream,
                    file_queue=file_queue,
                    result_queue=results,
                    planner=planner,
                    transforms=self.transforms,
                    inflight_threshhold=self.per_thread_copy_ahead,
                    use_fsync=self.sync_files,
                    thread_count=self.thread_count,
                    serialization_format=self.serialization_format,
                )
            except BaseException as exc:  # handed to the caller below
                failures.append(exc)
                planner.cancel()
            finally:
                done.set()

        # Completion is tracked with our own events, not Thread.join: on Python 3.11 a Ctrl-C that lands
        # inside a timed join marks the still-running thread as stopped (the bpo-45274 clean-up), so a
        # later join returns at once and the interpreter exits under a writer that is still in C++ code
        # (the process then aborts with "terminate called without an active exception").
        started: list[threading.Event] = []
        try:
            with _ctrl_c_held():
                for done in finished:
                    threading.Thread(
                        target=work, args=(done,), name=f"flame-ext-write-{len(started)}", daemon=True
                    ).start()
                    started.append(done)
            for done in finished:
                while not done.wait(0.1):  # a timed wait keeps Ctrl-C deliverable
                    pass
        except BaseException:
            planner.cancel()  # each worker finishes the block in hand, then stops
            _wait_all(started)
            raise
        if failures:
            real = [f for f in failures if not isinstance(f, _Cancelled)]
            raise (real or failures)[0]
        out: list = []
        while not results.empty():
            out += results.get_nowait()
        fut: Future = Future()
        fut.set_result(out)
        return fut


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold Ctrl-C (and SIGTERM/SIGHUP where flame-ext raises for them) back until the block ends, then deliver it.

    A Ctrl-C raised inside ``Thread.start`` would leave a thread running that nobody waits for: the
    worker was launched but never recorded. Blocking SIGINT in this thread is not enough: the kernel
    hands the signal to any thread that does not block it (torch's and BLAS's pools), and Python then
    raises it here all the same. So the Python-level handler is swapped for one that only takes note.
    Only the main thread receives ``KeyboardInterrupt``; elsewhere there is nothing to hold. A handler
    installed outside Python (``getsignal`` gives None) could not be put back, so it is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = [s for s in (signal.SIGINT, *TERMINATING_SIGNALS) if _holdable(s)]
    noted: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in held}
    try:
        yield
    finally:
        for s in held:
            signal.signal(s, previous[s])
        for signum in noted[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)  # the default SIGINT handler raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _holdable(signum: int) -> bool:
    handler = signal.getsignal(signum)
    if signum == signal.SIGINT:
        return handler is not None
    return callable(handler)  # SIGTERM/SIGHUP: only a Python handler (``termination_raises``) can be held


def _wait_all(events: list[threading.Event]) -> None:
    """Wait until every worker has stopped, even through further Ctrl-Cs: a worker stops within one block,
    and exiting under a running one would abort the process instead of cleaning up."""
    for done in events:
        while True:
            try:
                if done.wait(0.1):
                    break
            except KeyboardInterrupt:
                continue


def save_streaming(
    folder: Path,
    entries: Iterable[WriteEntry],
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    on_written: Callable[[int], None] = lambda n: None,
    threads: int = DEFAULT_THREADS,
    on_block: Callable[[str, int, torch.Tensor], None] | None = None,
    distributed: bool = False,
) -> None:
    """Write ``entries`` as a DCP checkpoint into ``folder``; tensor data in memory stays within ``buffer_bytes``.

    ``on_block(key, start_row, block)`` sees every block exactly as it is written (from the writer threads,
    so it must be thread-safe); the converter records fingerprints with it.

    Values are written as they are, NaN and Inf included (the copy is faithful); the converter finds such
    tensors from the fingerprints ``on_block`` records.

    ``threads`` files are written at once (two keep both cores of a small machine busy: a single
    writer thread copied about half as fast into the page cache). Each writer holds up to two blocks
    at once (torch's write loop still references the block it just wrote while it asks for the next),
    so blocks are planned at ``buffer_bytes / (2 * threads)``.

    ``distributed``: every rank of the default process group calls this with its own share of the entries
    (disjoint keys) and the same ``folder``; DCP's coordinator merges the ranks' plans and writes the one
    ``.metadata``, and a write failure on any rank is raised on every rank.

    Files are not fsynced one by one (each fsync stalls the stream on the disk); the caller makes the
    folder durable once, before publishing it (``destination.atomic_folder`` does), as ``cp`` + ``sync``.
    """
    entries = list(entries)
    # Converted blocks are fresh allocations of tens of MB: with 4 KiB pages each costs one page fault
    # per page, which in a VM made allocating cost as much as copying (1.3 s per GB measured, 0.2 s with
    # huge pages). torch backs large CPU allocations with transparent huge pages when this is set before
    # its first large allocation; it changes nothing else.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    threads = max(1, threads)
    planner = _StreamingPlanner(entries, max(1, buffer_bytes // (2 * threads)), on_written, on_block)
    meta_sd = {e.key: torch.empty(e.spec.shape, dtype=getattr(torch, e.spec.dtype), device="meta") for e in entries}
    writer = _Writer(str(folder), single_file_per_rank=False, thread_count=threads, sync_files=False)
    with warnings.catch_warnings():
        # "assuming the intent is to save in a single process": yes, that is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.save(meta_sd, storage_writer=writer, planner=planner, no_dist=not distributed)
        except CheckpointException as exc:
            cause = _root_cause(exc)
            if cause is exc:
                raise
            raise cause from exc


def _root_cause(exc: CheckpointException) -> BaseException:
    """DCP wraps a failure of any rank in ``CheckpointException`` (a ``BaseException``); surface the cause.

    An ``OSError`` (disk full, file size limit), one of our own errors, or a Ctrl-C (``KeyboardInterrupt``,
    which DCP catches as a ``BaseException`` and wraps like any failure) is re-raised as itself, so callers
    handle it like any other; anything else stays a ``CheckpointException``. DCP stores each failure as an
    ``(exception, traceback summary)`` pair, not as the exception itself.
    """
    surfaced = (OSError, FlameExtError, KeyboardInterrupt)
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
_METADATA_GLOBALS = (
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }
    | {
        (module, name)
        for module in ("pathlib", "pathlib._local")
        for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles ``.metadata`` allowing only the classes DCP metadata is made of.

    torch's own ``FileSystemReader.read_metadata`` uses plain ``pickle.load``, which runs whatever code a
    crafted file names. Every flame-ext path reads a checkpoint's metadata through ``read_dcp_metadata``
    first, so a hostile ``.metadata`` is refused here before torch (or torchtitan's load) unpickles it.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise _RefusedGlobal(f"{module}.{name}")


def _step_hint(folder: Path) -> str:
    """``; did you mean .../step-0?`` for a trainer's checkpoint folder that holds saved steps."""
    steps = sorted(
        (int(p.name[5:]), p) for p in folder.glob("step-*") if p.name[5:].isdigit() and (p / ".metadata").is_file()
    )
    if not steps:
        return ""
    more = f" (it holds {len(steps)} saved steps, {steps[0][1].name} to {steps[-1][1].name})" if len(steps) > 1 else ""
    return f"; did you mean {steps[0][1]}?{more}"


def _unpickle_metadata(folder: Path) -> Metadata:
    """``.metadata`` unpickled with the allow-list and validated as data (``validate_metadata``); every reader of
    a checkpoint comes through here, and every problem is one ``CheckpointFormatError``."""
    if not folder.exists():
        raise InputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: is a file; expected a DCP checkpoint folder")
    if not (folder / ".metadata").exists():
        raise CheckpointFormatError(f"{folder}: not a DCP checkpoint (no .metadata file){_step_hint(folder)}")
    if not (folder / ".metadata").is_file():  # a FIFO or device would block or never end
        raise CheckpointFormatError(f"{folder}/.metadata: not a regular file; the checkpoint is corrupt")
    try:
        with open(folder / ".metadata", "rb") as f:
            md = _MetadataUnpickler(f).load()
    except _RefusedGlobal as exc:
        raise CheckpointFormatError(
            f"{folder}/.metadata: refused: it names {exc}, which DCP metadata never holds, and unpickling it could run "
            "code; do not load this checkpoint with any tool unless you trust where it came from"
        ) from exc
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointFormatError(
            f"{folder}/.metadata: unreadable ({type(exc).__name__}); the checkpoint is corrupt"
        ) from exc
    if not isinstance(md, Metadata):
        raise CheckpointFormatError(
            f"{folder}/.metadata: unreadable (holds a {type(md).__name__}); the checkpoint is corrupt"
        )
    validate_metadata(folder, md)
    return md


def read_dcp_metadata(folder: str | Path) -> dict[str, TensorSpec | None]:
    """Every key of a DCP checkpoint with its global shape and dtype (``None`` for non-tensor entries).

    Reads only ``.metadata``: no tensor data, so it costs the same for a tiny model and a 70B one. The file
    is a pickle: it is unpickled with an allow-list (see ``_MetadataUnpickler``), never as is.
    """
    out: dict[str, TensorSpec | None] = {}
    for key, item in _unpickle_metadata(Path(folder)).state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            out[key] = TensorSpec(tuple(item.size), dtype_name(item.properties.dtype))
        else:
            out[key] = None
    return out


class _VettedReader(dcp.FileSystemReader):
    """torch's ``FileSystemReader``, but ``.metadata`` is unpickled with the allow-list, and once.

    torch's own reader unpickles it as is; one reader serves the many row loads of a pass.
    """

    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder))
        self._metadata: Metadata | None = None
        self.folder = folder

    def read_metadata(self, *args, **kwargs) -> Metadata:  # type: ignore[override]
        if self._metadata is None:
            self._metadata = _unpickle_metadata(self.folder)
            if getattr(self._metadata, "storage_meta", None) is None:  # as torch's reader does
                self._metadata.storage_meta = StorageMeta()
            self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _RowsPlanner(DefaultLoadPlanner):
    """Loads rows [start, start + len(buffer)) of one checkpoint tensor into ``buffer``.

    The plan asks for exactly that region, as an FSDP rank asks for its shard, so DCP reads only the
    stored chunks that overlap it.
    """

    def __init__(self, key: str, start: int) -> None:
        super().__init__(allow_partial_load=True)
        self._key, self._start = key, start

    def create_local_plan(self) -> LoadPlan:
        buffer = self.state_dict[self._key]
        md = self.metadata.state_dict_metadata[self._key]  # type: ignore[union-attr]
        offsets = torch.Size([self._start] + [0] * (buffer.dim() - 1)) if buffer.dim() else torch.Size([])
        chunk = ChunkStorageMetadata(offsets=offsets, sizes=buffer.size())
        self.plan = LoadPlan(create_read_items_for_chunk_list(self._key, md, [chunk]))
        return self.plan

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


class DCPRowReader:
    """Reads blocks of rows of DCP tensors without a process group; ``.metadata`` is read once, vetted."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._reader = _VettedReader(self.folder)

    def rows(self, key: str, spec: TensorSpec, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of tensor ``key`` (for a 0-d tensor, the tensor)."""
        if not isinstance(self._reader.read_metadata().state_dict_metadata.get(key), TensorStorageMetadata):
            raise CheckpointFormatError(f"{self.folder}: cannot read {key} (no such tensor in the checkpoint)")
        shape = (end - start, *spec.shape[1:]) if spec.shape else ()
        buffer = torch.empty(shape, dtype=getattr(torch, spec.dtype))
        _load(self._reader, {key: buffer}, _RowsPlanner(key, start), key)
        return buffer

    def blocks(self, key: str, spec: TensorSpec, buffer_bytes: int) -> Iterator[torch.Tensor]:
        """The whole tensor as consecutive blocks of rows, each at most ``buffer_bytes``."""
        for start, end in row_blocks(spec, buffer_bytes):
            yield self.rows(key, spec, start, end)


def _load(reader: _VettedReader, state: dict[str, torch.Tensor], planner: DefaultLoadPlanner, what: str) -> None:
    """One ``dcp.load`` without a process group; a failure becomes one error naming ``what`` was read."""
    reader.read_metadata()  # vetted and validated here, so its errors are not wrapped by DCP's
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=True)
        except CheckpointException as exc:
            raise _read_error(reader.folder, what, exc) from exc


def load_state(folder: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Fill every tensor of ``state`` (flat checkpoint keys) from the checkpoint, strictly: each must be there."""
    _load(_VettedReader(Path(folder)), state, DefaultLoadPlanner(allow_partial_load=False), f"{len(state)} tensors")


def _read_error(folder: Path, key: str, exc: CheckpointException) -> BaseException:
    cause = _root_cause(exc)
    if cause is not exc:
        return cause
    failures = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
    # torch reads records weights_only: a record naming a Python global is refused (it could run code);
    # any other failure is bytes that are not a record at all.
    if any(isinstance(f, pickle.UnpicklingError) and refused_global(f) for f in failures):
        return CheckpointFormatError(
            f"{folder}: refused to read {key}: its record in the data files pickles Python objects other than "
            "tensors, and loading them could run code; the checkpoint is corrupt or was tampered with"
        )
    first = next((f"{type(f).__name__}: {first_line(f)}" for f in failures if str(f).strip()), "unknown error")
    return CheckpointFormatError(f"{folder}: cannot read {key} ({first}); the checkpoint's data files are damaged")


def load_tensor(folder: str | Path, key: str, spec: TensorSpec) -> torch.Tensor:
    """Read one whole tensor of a DCP checkpoint (all its chunks), without a process group."""
    return DCPRowReader(folder).rows(key, spec, 0, spec.shape[0] if spec.shape else 1)


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
