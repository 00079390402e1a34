"""The streaming DCP writer: every block lands whatever the number of writer threads, a failing writer
stops the others, and Ctrl-C returns only after every started writer has stopped."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from flame_ext.io.dcp import load_tensor
from flame_ext.io.dcp_save import WriteEntry, save_streaming
from flame_ext.io.specs import TensorSpec


def _entries(values: dict[str, torch.Tensor], fail: str | None = None) -> list[WriteEntry]:
    def reader(key: str, value: torch.Tensor):
        def read(start: int, end: int) -> torch.Tensor:
            if key == fail and start > 0:
                raise OSError(5, "Input/output error", f"{key}.safetensors")
            return value[start:end].clone()

        return read

    return [WriteEntry(k, TensorSpec(tuple(v.shape), "float32"), reader(k, v)) for k, v in values.items()]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_block_lands_whatever_the_number_of_writer_threads(threads, tmp_path):
    g = torch.Generator().manual_seed(threads)
    values = {f"t{i}": torch.randn(40, 6, generator=g) for i in range(5)}
    save_streaming(
        tmp_path, _entries(values), buffer_bytes=1200, threads=threads
    )  # blocks of 1200 / (2 * threads) bytes
    md = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
    rows_per_block = (1200 // (2 * threads)) // (6 * 4)
    assert all(len(md[k].chunks) == -(-40 // rows_per_block) for k in values)
    for key, value in values.items():
        assert torch.equal(load_tensor(tmp_path, key, TensorSpec((40, 6), "float32")), value), key


def _writers_left(bound: float = 10.0) -> list[threading.Thread]:
    """Writer threads still alive after up to ``bound`` seconds: a stopped writer leaves microseconds after
    signalling that it is done, and the bound only absorbs scheduling delay on a loaded machine. Whether a
    caller waited for its writers is checked with ``_HeldReads``, not with this."""
    deadline = time.monotonic() + bound
    while True:
        left = [t for t in threading.enumerate() if t.name.startswith("flame-ext-write")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.005)


class _HeldReads:
    """Block reads that are held until the main thread has taken the Ctrl-C, and count what they finish.

    The hold ends on an event, not on a clock: the test's own SIGINT handler marks the moment the main thread
    takes the interrupt. The read then stays in its block ``LINGER`` seconds more, so that a caller that
    does not wait for its writers is caught with a block unfinished; one that waits only takes that long.
    """

    LINGER = 0.2

    def __init__(self, held_reads: int) -> None:
        self.held_reads = held_reads  # the first reads are held, later ones return at once
        self.begun = threading.Semaphore(0)  # one release per held read that has begun
        self.interrupted = threading.Event()
        self.lock = threading.Lock()
        self.started = self.finished = 0  # held reads begun, held reads finished

    def reader(self, value: torch.Tensor, *, interrupt_main: bool = False):
        def read(start: int, end: int) -> torch.Tensor:
            with self.lock:
                held = self.started < self.held_reads
                self.started += held
            if held:
                self.begun.release()
                if interrupt_main:  # Ctrl-C while this writer is in its block, as from a terminal
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                assert self.interrupted.wait(60), "the main thread never took the Ctrl-C"
                time.sleep(self.LINGER)
                with self.lock:
                    self.finished += 1
            return value[start:end].clone()

        return read

    def _take_ctrl_c(self, signum: int, frame: object) -> None:
        self.interrupted.set()
        raise KeyboardInterrupt

    def ctrl_c_noted(self) -> signal.Handlers:
        """Install the handler that marks the interrupt (and raises as Python's own does); returns the old one."""
        return signal.signal(signal.SIGINT, self._take_ctrl_c)


def test_a_failing_writer_thread_stops_the_others_and_its_error_is_raised(tmp_path):
    g = torch.Generator().manual_seed(0)
    values = {f"t{i}": torch.randn(40, 6, generator=g) for i in range(6)}
    with pytest.raises(OSError, match="Input/output error"):
        save_streaming(tmp_path, _entries(values, fail="t2"), buffer_bytes=1200, threads=2)
    assert not (tmp_path / ".metadata").exists()
    assert not _writers_left(), "writer threads left running"


def test_ctrl_c_returns_only_after_every_writer_thread_has_stopped(tmp_path):
    """Ctrl-C while a writer is busy must wait for that writer, or the interpreter exits under it and the
    process aborts ("terminate called without an active exception"). Python 3.11's ``Thread.join`` cannot be
    trusted for this: interrupted, it marks the running thread as stopped. The first block read sends the
    Ctrl-C and holds its writer until the main thread has taken it."""
    g = torch.Generator().manual_seed(0)
    values = {f"t{i}": torch.randn(40, 6, generator=g) for i in range(6)}
    held = _HeldReads(held_reads=1)
    entries = [
        WriteEntry(k, TensorSpec((40, 6), "float32"), held.reader(v, interrupt_main=True)) for k, v in values.items()
    ]
    previous = held.ctrl_c_noted()
    try:
        with pytest.raises(KeyboardInterrupt):
            save_streaming(tmp_path, entries, buffer_bytes=1200, threads=2)
        finished_when_raised = held.finished
    finally:
        signal.signal(signal.SIGINT, previous)
    assert held.interrupted.is_set() and held.started == 1
    assert finished_when_raised == held.started, "save_streaming raised while a writer was still in its block"
    assert not _writers_left(), "writer threads left running"


def test_ctrl_c_while_writers_start_still_waits_for_every_started_writer(tmp_path, monkeypatch):
    """A Ctrl-C that lands inside ``Thread.start`` (the new writer already running, not yet recorded) must
    not leave that writer behind. On a loaded machine the first writer holds the GIL while the second is
    started, so the signal that follows the first data file often lands there. Here SIGINT is sent to the
    process right after each start, while the started writer is held in its first read."""
    g = torch.Generator().manual_seed(0)
    values = {f"t{i}": torch.randn(40, 6, generator=g) for i in range(6)}
    held = _HeldReads(held_reads=2)  # each writer's first read

    class InterruptedAfterStart(threading.Thread):
        def start(self) -> None:
            super().start()
            assert held.begun.acquire(timeout=60), "the writer never read"
            os.kill(os.getpid(), signal.SIGINT)  # as from a terminal: any thread may take it, Python raises it here
            time.sleep(0.01)  # where an unheld Ctrl-C is raised: inside start, before it returns

    entries = [WriteEntry(k, TensorSpec((40, 6), "float32"), held.reader(v)) for k, v in values.items()]
    previous = held.ctrl_c_noted()
    monkeypatch.setattr(threading, "Thread", InterruptedAfterStart)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_streaming(tmp_path, entries, buffer_bytes=1200, threads=2)
        finished_when_raised = held.finished
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGINT, previous)
    assert finished_when_raised == held.started, "save_streaming raised while a started writer was in its block"
    assert held.started == 2, "the Ctrl-C was held until both writers had started"
    assert not _writers_left(), "writer threads left running"


def test_the_same_bytes_whatever_the_number_of_writer_threads(tmp_path):
    """Blocks of the same size (the buffer scaled with the threads) give the same data files, byte for byte, and
    the same metadata, in the same order; only torch's save id and the folder's path differ between saves."""
    import pickle

    g = torch.Generator().manual_seed(0)
    values = {f"t{i}": torch.randn(400, 60, generator=g) for i in range(7)}
    saved = {}
    for threads in (1, 2, 3):
        folder = tmp_path / str(threads)
        save_streaming(folder, _entries(values), buffer_bytes=20000 * threads, threads=threads)
        saved[threads] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    names = sorted(saved[1])
    assert len(names) > 30 and all(sorted(s) == names for s in saved.values())
    for name in names:
        if name != ".metadata":
            assert saved[2][name] == saved[1][name] == saved[3][name], name
    meta = [pickle.loads(s[".metadata"]) for s in saved.values()]
    for m in meta[1:]:
        assert m.state_dict_metadata == meta[0].state_dict_metadata
        assert list(m.storage_data.items()) == list(meta[0].storage_data.items())
