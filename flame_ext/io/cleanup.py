"""Undoing what a run stopped by a signal had done: a lock file, a temporary folder, the parents it created.

Python raises Ctrl-C (and, under ``process.termination_raises``, SIGTERM and SIGHUP) at the first check after
the signal arrives, between any two of its steps. A ``try`` cannot cover every such moment: one falls right
after ``open`` returns and before its result is stored, another right after a generator-based context manager
has entered and before ``with`` has taken it (that generator's ``finally`` then runs only when it is collected,
and in a run that ends on the signal, possibly never). Under load the file system takes milliseconds to create
a file, so these moments are not rare: a run stopped by SIGTERM left its lock file behind.

So each step that leaves something to undo happens with signals held (``signals_held``) together with recording
its undo (``Undo.add``), and every ``Undo`` not yet run is reachable from ``undo_unfinished``, which the command
runner calls when a signal ends a run.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

__all__ = ["Undo", "signals_held", "undo_unfinished"]

# What ends a run by raising where it stands.
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP for the block; the first that arrives acts as the block ends.

    Only the handlers Python runs are held; the kernel's default actions cannot be, and they end the process
    without any cleanup anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs handlers in the main thread only: this one is never interrupted by them
        return
    arrived: list[int] = []
    held = {s: h for s in _HELD_SIGNALS if callable(h := signal.getsignal(s))}
    for s in held:
        signal.signal(s, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        for signum in arrived[:1]:
            signal.raise_signal(signum)  # its own handler runs now, where the block ends


_UNFINISHED: list[Undo] = []


class Undo:
    """The steps that undo what a piece of work has done so far, run newest first, once."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []
        _UNFINISHED.append(self)

    def add(self, step: Callable[[], None]) -> None:
        """Record how to undo what was just done; call it with signals held, in the same block as the doing."""
        self._steps.append(step)

    def run(self) -> None:
        """Undo everything recorded (signals held: one cut short would leave the rest); a second call does nothing."""
        with signals_held():
            while self._steps:
                self._steps.pop()()
            with contextlib.suppress(ValueError):
                _UNFINISHED.remove(self)


def undo_unfinished() -> None:
    """Run every ``Undo`` whose own ``finally`` has not run yet (a run ends on a signal)."""
    while _UNFINISHED:
        _UNFINISHED[-1].run()
