"""The reference forward beside the writer: one thread, stopped between blocks when either side fails.

The forward reads the source files itself (never the blocks being written: a reference computed from
the writer's bytes would agree with a writer bug). It runs in its own thread while the writer threads
write; torch's kernels and file I/O release the GIL, so on two cores the wall time is about the longer
of the two instead of their sum. The main thread keeps only waiting, with timed waits, so Ctrl-C and
SIGTERM reach it at once; whatever ends the writing (a failure, a signal) stops the forward before its
next block, and a failing forward stops the writer before its next block. Both have stopped before
anything is raised, so the destination's clean-up never runs under a live thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flame_ext.convert.summary import Progress
from flame_ext.errors import ForwardUnavailableError
from flame_ext.io.dcp_save import ctrl_c_held, wait_all
from flame_ext.model.reference_loss import ReferenceForward, ReferenceStopped

__all__ = ["ForwardBeside", "forward_beside"]


class _ForwardFailed(Exception):
    """Raised in a writer thread to stop the writing because the forward failed; never the error reported."""


class ForwardBeside:
    """``fwd.run`` in a thread. ``unavailable`` holds the reason this machine cannot run the model (not a
    failure: the conversion goes on without a reference loss); ``error`` any other failure."""

    def __init__(self, fwd: ReferenceForward) -> None:
        self.fwd = fwd
        self.unavailable: str | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self.blocks = fwd.streamed.block_count() if fwd.streamed is not None else 0
        self.blocks_run = 0

    def _check(self) -> None:
        if self._stop.is_set():
            raise ReferenceStopped()
        self.blocks_run += 1

    def _work(self) -> None:
        try:
            self.fwd.run(before_block=self._check)
        except ForwardUnavailableError as exc:
            self.unavailable = str(exc)
        except BaseException as exc:  # handed to the main thread
            self.error = exc
        finally:
            self._done.set()

    def start(self) -> None:
        with ctrl_c_held():  # a Ctrl-C inside Thread.start would leave a thread nobody waits for
            threading.Thread(target=self._work, name="flame-ext-reference", daemon=True).start()

    def failed(self) -> bool:
        return self.error is not None and not isinstance(self.error, ReferenceStopped)

    def guard(self, on_block: Callable[..., Any]) -> Callable[..., Any]:
        """``on_block`` for the writer: stops the writing once the forward has failed."""

        def checked(*args: Any) -> Any:
            if self.failed():
                raise _ForwardFailed()
            return on_block(*args)

        return checked

    def wait(self, progress: bool = False) -> None:
        """Until the forward has finished (Ctrl-C stays deliverable), with a bar over its blocks when ``progress``
        and it is still running; its failure is raised here."""
        shown = 0
        show = progress and not self._done.is_set() and self.blocks > 0
        with Progress(self.blocks, show, "reference forward") as bar:
            while not self._done.wait(0.1):
                bar.update(self.blocks_run - shown)
                shown = self.blocks_run
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Stop the forward before its next block and wait for it, through further Ctrl-Cs."""
        self._stop.set()
        wait_all([self._done])


@contextlib.contextmanager
def forward_beside(fwd: ReferenceForward | None) -> Iterator[ForwardBeside | None]:
    """Run ``fwd`` beside the body (the writing). The body ends with ``wait()``; on any exception the forward
    is stopped and waited for, and its own failure, when it caused the stop, is what is raised."""
    if fwd is None:
        yield None
        return
    beside = ForwardBeside(fwd)
    beside.start()
    try:
        yield beside
    except BaseException as exc:
        beside.stop()
        if beside.failed() and beside.error is not exc:
            raise beside.error from exc  # type: ignore[misc]
        raise
