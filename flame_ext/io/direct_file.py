"""Output files written around the page cache (``O_DIRECT``): the bytes go from aligned buffers of the process to
the disk, not first into new pages of the kernel's cache.

Why: a conversion or an export writes gigabytes that nothing reads back soon. Through the cache each byte is
copied into a new cache page, written out later, and flushed by the fsync that publishes the folder. On a
virtual machine whose hypervisor takes back the memory a guest frees, each new page can also cost a fault in
the host (measured on this project's machine: 2 GB reached the disk in 6.4-7.3 s, 5.6-6.0 CPU-s, with the cache
and fsync, and in 1.4-1.7 s, 0.1-0.2 CPU-s, with ``O_DIRECT``). The buffered writes of one file also queue on the
file's lock in the kernel, so a one-file export could not spread that cost over cores.

``O_DIRECT`` asks for aligned memory, offsets and lengths: bytes are gathered in a page-aligned buffer and written
a whole buffer at a time; the last, partial one is padded to ``_TAIL_ALIGN`` and the file cut back to its size.
Two buffers take turns: a thread of the file's own writes one to the disk while the caller fills the other, so
the disk works while the caller reads and sums, as the kernel's write-back did. Where the file system refuses
``O_DIRECT`` (at the open or at a write) the file goes on through the cache from the same offset: the bytes are
the same either way.
"""

from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

__all__ = ["DirectFile"]

_BUFFER = 16 << 20  # per write: large enough that the disk, not the request count, sets the pace
_TAIL_ALIGN = 64 << 10  # covers every logical block size in use (512 B to 64 KB)


class DirectFile:
    """A new file opened for sequential writing, ``O_DIRECT`` where the file system allows it.

    ``write`` copies into the buffer being filled (one ``memcpy``); a full buffer goes to the disk from the
    file's writer thread, which releases the GIL while the disk works. ``close`` writes the rest and sets the
    size; it does not fsync (the caller publishes and syncs). An error of a disk write is raised by the next
    ``write`` or by ``close``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._direct = hasattr(os, "O_DIRECT")
        try:
            self._fd = os.open(self.path, flags | (os.O_DIRECT if self._direct else 0), 0o644)
        except OSError as exc:
            if not (self._direct and exc.errno == errno.EINVAL):
                raise
            self._direct = False
            self._fd = os.open(self.path, flags, 0o644)
        self._buffers = [mmap.mmap(-1, _BUFFER) for _ in range(2)]  # anonymous mappings are page-aligned
        self._views = [memoryview(b) for b in self._buffers]
        self._current = 0  # the buffer being filled
        self._filled = 0
        self._written = 0  # bytes on the file so far (a whole number of buffers until close)
        self._queued = 0  # bytes handed to the writer thread
        self._pending: Future[None] | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="flame-ext-direct-write")

    @property
    def direct(self) -> bool:
        """Whether the bytes bypass the page cache (False where the file system refused ``O_DIRECT``)."""
        return self._direct

    def write(self, data: bytes | bytearray | memoryview) -> int:
        source = memoryview(data).cast("B")
        done = 0
        while done < len(source):
            n = min(len(source) - done, _BUFFER - self._filled)
            view = self._views[self._current]
            view[self._filled : self._filled + n] = source[done : done + n]
            self._filled += n
            done += n
            if self._filled == _BUFFER:
                self._hand_over(view)
        return done

    def tell(self) -> int:
        return self._queued + self._filled

    def fileno(self) -> int:
        return self._fd

    def flush(self) -> None:
        """Nothing to do: bytes still in a buffer are written by ``close`` (a partial buffer cannot be written
        with ``O_DIRECT`` before the file's end is known)."""

    def close(self, *, discard: bool = False) -> None:
        """Write what the buffers hold and set the file's size; ``discard``: only release the file (a failed write
        is being raised: its file is not used, and a second error must not replace the first)."""
        if self._fd < 0:
            return
        try:
            if discard:
                self._settle(raising=False)
                return
            self._settle()
            size = self.tell()
            if self._filled:
                view = self._views[self._current]
                padded = -(-self._filled // _TAIL_ALIGN) * _TAIL_ALIGN if self._direct else self._filled
                view[self._filled : padded] = bytes(padded - self._filled)
                self._write_out(view[:padded])
                if self._written != size:
                    os.ftruncate(self._fd, size)
        finally:
            self._writer.shutdown(wait=True)
            os.close(self._fd)
            self._fd = -1
            for view, buffer in zip(self._views, self._buffers):
                try:
                    view.release()
                    buffer.close()
                except BufferError:  # a slice is still held by the traceback of an error being raised
                    pass  # the mapping goes with it

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(discard=kind is not None)

    def _hand_over(self, view: memoryview) -> None:
        """The full buffer to the writer thread (after the one before it is on the disk); fill the other."""
        self._settle()
        self._pending = self._writer.submit(self._write_out, view)
        self._queued += len(view)
        self._current = 1 - self._current
        self._filled = 0

    def _settle(self, raising: bool = True) -> None:
        """Wait for the buffer at the disk; its error is raised here (unless the file is being discarded)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except BaseException:
            if raising:
                raise

    def _write_out(self, view: memoryview) -> None:
        """All of ``view`` at the current end of the file; through the cache from here on if ``O_DIRECT`` is
        refused (EINVAL: the file system, or an offset a short write left unaligned)."""
        while len(view):
            try:
                n = os.write(self._fd, view)
            except OSError as exc:
                if not (self._direct and exc.errno == errno.EINVAL):
                    raise
                self._through_the_cache()
                continue
            view = view[n:]
            self._written += n

    def _through_the_cache(self) -> None:
        buffered = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        os.lseek(buffered, self._written, os.SEEK_SET)
        os.close(self._fd)
        self._fd = buffered
        self._direct = False
