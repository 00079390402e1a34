"""The DCP side, writing: a streaming writer that plans a checkpoint from shapes and dtypes alone.

Each tensor is read only when torch's ``FileSystemWriter`` asks for it. Tensors larger than a block are planned
as row blocks (the way an FSDP-sharded save stores a tensor in chunks), so tensor data in memory stays within
the buffer, whatever the model size. ``single_file_per_rank=False`` matters: with one file per rank torch keeps
every tensor of the file alive until it is closed, i.e. the whole checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _write_files_from_queue
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.futures import Future

from flame_ext.collectives import failure_elsewhere, rank
from flame_ext.errors import CheckpointFormatError, naming_file
from flame_ext.io.dcp import DEFAULT_BUFFER_BYTES, rank_failures, root_cause, row_blocks
from flame_ext.io.direct_file import DirectFile
from flame_ext.io.specs import TensorSpec, dtype_name
from flame_ext.process import TERMINATING_SIGNALS

__all__ = ["WriteEntry", "save_streaming", "ctrl_c_held", "wait_all", "DEFAULT_THREADS"]

DEFAULT_THREADS = 2


@dataclass(frozen=True)
class WriteEntry:
    """One tensor to write: its key, spec as written, a reader for rows [start, end) of it, and the file it is
    read from (None for a tensor made here), named when ranks disagree about its bytes."""

    key: str
    spec: TensorSpec
    read_rows: Callable[[int, int], torch.Tensor]
    source: Path | None = None


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
        chunk = write_item.tensor_data.chunk if write_item.tensor_data is not None else None
        assert chunk is not None and write_item.index.offset is not None  # a tensor's item: planned with both
        start = write_item.index.offset[0] if e.spec.shape else 0
        if not e.spec.shape:
            data = e.read_rows(0, 1)
        else:
            data = e.read_rows(start, start + chunk.sizes[0])
        expected = tuple(chunk.sizes)
        if tuple(data.shape) != expected or dtype_name(data.dtype) != e.spec.dtype:
            raise CheckpointFormatError(
                f"{e.key}: source gave {tuple(data.shape)} {dtype_name(data.dtype)}, planned {expected} {e.spec.dtype}"
            )
        if self._on_block is not None:
            self._on_block(e.key, start, data)  # the block in hand: a fingerprint costs no second read
        with self._lock:
            self._on_written(data.numel() * data.element_size())
        return data.contiguous()


def _naming_its_file(create_stream: Callable[..., Any]) -> Callable[..., Any]:
    """torch's ``create_stream`` whose write failures name the file (``errors.naming_file``): a rank's one-line
    reason then says which file hit the disk's or the file size limit."""

    @contextlib.contextmanager
    def create(path: str | os.PathLike, mode: str) -> Iterator[Any]:
        with naming_file(path), create_stream(path, mode) as stream:
            yield stream

    return create


class _Cancelled(Exception):
    """A writer thread stopped because another one failed (or Ctrl-C): never the error to report."""


class _Writer(dcp.FileSystemWriter):
    """torch's ``FileSystemWriter`` with its worker threads under our control.

    torch 2.13's own ``_write_data`` runs ``thread_count - 1`` extra threads beside the caller: an error
    in one of them is printed and the file it was writing silently left out of the results, and Ctrl-C
    in the caller leaves them writing into a folder being deleted. Here every file is written by a worker;
    the calling thread only waits (so Ctrl-C reaches it at once); the first failure stops the others
    between blocks, all have stopped before anything is raised. Files are written by torch's own per-file
    routine, so their format is torch's. With ``direct``, the data files are written around the page cache
    (``io.direct_file``); ``.metadata`` is written by torch as always.
    """

    def __init__(self, *args: Any, direct: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direct = direct

    def _data_file(self, path: str | os.PathLike, mode: str) -> Any:
        """The stream torch writes a data file into (a context manager, as ``fs.create_stream`` returns)."""
        return DirectFile(path) if self.direct and mode == "wb" else self.fs.create_stream(path, mode)

    def _write_data(self, planner: _StreamingPlanner, file_queue: queue.Queue) -> Future:  # type: ignore[override]
        results: queue.Queue = queue.Queue()
        failures: list[BaseException] = []

        finished = [threading.Event() for _ in range(self.thread_count)]

        def work(done: threading.Event) -> None:
            try:
                with _unchecked_records():  # per thread: torch's serialization options are thread-local
                    _write_files_from_queue(
                        create_stream=_naming_its_file(self._data_file),
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
            with ctrl_c_held():
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
            wait_all(started)
            raise
        if failures:
            real = [f for f in failures if not isinstance(f, _Cancelled)]
            raise (real or failures)[0]
        out: list = []
        while not results.empty():
            out += results.get_nowait()
        # In plan order, not the order the writers finished in: the metadata (which pickles them) is then the
        # same bytes whatever the number of threads and however they were scheduled.
        out.sort(key=lambda r: (r.index.fqn, tuple(r.index.offset or ())))
        fut: Future = Future()
        fut.set_result(out)
        return fut


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
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
    noted: list[signal.Signals] = []
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signal.Signals(signum))) for s in held}
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


def wait_all(events: list[threading.Event]) -> None:
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
    direct: bool = True,
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

    ``direct`` (default): the data files bypass the page cache (``io.direct_file``). Pass False when the files
    are read back at once (``--record-sha256`` hashes them): through the cache they are still in memory then.
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
    writer = _Writer(str(folder), single_file_per_rank=False, thread_count=threads, sync_files=False, direct=direct)
    with warnings.catch_warnings():
        # "assuming the intent is to save in a single process": yes, that is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.save(meta_sd, storage_writer=writer, planner=planner, no_dist=not distributed)
        except CheckpointException as exc:
            # Under torchrun every rank gets every rank's failure: each reports its own, or names the one that failed.
            failures = rank_failures(exc) if distributed else {}
            elsewhere = failure_elsewhere(failures, "writing its share of the checkpoint")
            if elsewhere is not None:
                raise elsewhere from exc
            cause = root_cause(exc, rank() if distributed else None)
            if cause is exc:
                raise
            raise cause from exc


@contextlib.contextmanager
def _unchecked_records() -> Iterator[None]:
    """torch.save without the CRC-32 of each record, in this thread (the option is thread-local).

    Each block is one ``torch.save`` into the data file: a zip record whose CRC-32 nothing that reads a DCP
    checks (torch's reader loads by byte range through ``torch.load``, which does not verify it). Computing it
    was the largest single cost of a conversion: 15% of its CPU time (``perf``, 4 GB bf16). The values are
    checked by the fingerprints, the files by ``--record-sha256``. A zip tool that lists a data file warns.
    """
    import torch.serialization as serialization

    computed = serialization.get_crc32_options()
    serialization.set_crc32_options(False)
    try:
        yield
    finally:
        serialization.set_crc32_options(computed)
