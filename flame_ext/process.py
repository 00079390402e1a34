"""How a command's process runs and ends: user errors as one line and an exit code, Ctrl-C, SIGTERM and SIGHUP
as a clean stop, the guard's report without a traceback, steps that run once the outcome is printed, and the
start-up with the cyclic garbage collector paused.

The error types themselves, and the one-line wording of a failure, are ``flame_ext.errors``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flame_ext.errors import FlameExtError, InitialLoadValidationError
from flame_ext.io.cleanup import undo_unfinished

__all__ = [
    "Terminated",
    "TERMINATING_SIGNALS",
    "termination_raises",
    "report_without_traceback",
    "run_guarded",
    "after_report",
    "collector_paused",
    "resume_collector",
    "command_is_the_process",
]


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C would be, so every cleanup that runs for Ctrl-C runs for it too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Signals that end a run the way Ctrl-C does (SIGINT already raises KeyboardInterrupt).
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def termination_raises() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Terminated`` for the block (in the main thread), then the old handlers return.

    Only default handlers are replaced: a host (a trainer, a job runner) that installed its own keeps it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in TERMINATING_SIGNALS}
    mine = [s for s, h in previous.items() if h == signal.SIG_DFL]
    for s in mine:
        signal.signal(s, _raise_terminated)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, previous[s])


def report_without_traceback() -> None:
    """Make an uncaught ``InitialLoadValidationError`` print its report without a traceback (exit code 1, as
    any uncaught exception; ``python -m flame_ext.flame.train`` exits 1 too).

    For trainers that run the guard and do not catch its error (flame's patched ``train.py``): the report
    is what the user needs; a traceback through torchtitan's load says nothing more. Also when the error is
    wrapped (torchtitan 0.3 raises ``CheckpointException`` from it). Other exceptions, and any exception with
    ``FLAME_EXT_DEBUG`` set, go to the hook that was installed before.
    """
    previous = sys.excepthook
    if getattr(previous, "_flame_ext", False):
        return

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        found = _guard_error_in(exc)
        if found is None or os.environ.get("FLAME_EXT_DEBUG"):
            previous(exc_type, exc, tb)
            return
        # Handed to the previous hook without its traceback and chain, so a hook that decorates the output
        # (torch.distributed prefixes each line with "[rankN]: ") still does.
        found.__cause__ = found.__context__ = None
        found.__suppress_context__ = True
        previous(type(found), found.with_traceback(None), None)

    hook._flame_ext = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _guard_error_in(exc: BaseException | None) -> InitialLoadValidationError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InitialLoadValidationError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _say_error(prog: str, message: str, json_errors: bool) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    if json_errors:  # --json: a program reading stdout gets the failure as JSON too
        from flame_ext.report import error_record

        print(json.dumps(error_record(message)))


_AFTER_REPORT: list[Callable[[], None]] = []


def after_report(step: Callable[[], None]) -> None:
    """Run ``step`` once the command's outcome has been printed (``run_guarded``). Under torchrun, ranks that
    failed together leave together this way: the launcher ends every rank as soon as one exits with an error,
    so a rank that left first would cut the others off before they said their line."""
    _AFTER_REPORT.append(step)


def _run_after_report() -> None:
    while _AFTER_REPORT:
        with contextlib.suppress(Exception):
            _AFTER_REPORT.pop()()


def run_guarded(
    fn: Callable[[Any], int], args: Any, *, debug: bool, prog: str = "flame-ext", json_errors: bool = False
) -> int:
    """Run a command; user errors become one line and exit 2; Ctrl-C, SIGTERM and SIGHUP exit 128 + the
    signal number (130, 143, 129) with one line, after the same cleanup, nothing half-written."""
    try:
        return _run_reported(fn, args, debug=debug, prog=prog, json_errors=json_errors)
    finally:
        _run_after_report()


def _run_reported(fn: Callable[[Any], int], args: Any, *, debug: bool, prog: str, json_errors: bool) -> int:
    try:
        with termination_raises():
            return fn(args)
    except InitialLoadValidationError as exc:  # the run started and the guard found problems: exit 1, as diagnose
        if debug:
            raise
        print(f"{prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except FlameExtError as exc:
        if debug:
            raise
        _say_error(getattr(exc, "prog", None) or prog, str(exc), json_errors)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        undo_unfinished()  # what a signal stopped between two steps, before a ``finally`` could take it
        if debug:
            raise
        signum = exc.signum if isinstance(exc, Terminated) else int(signal.SIGINT)
        print(
            f"{prog}: interrupted by {signal.Signals(signum).name}; no output was left half-written "
            "(a destination is absent or complete)",
            file=sys.stderr,
        )
        return 128 + signum
    except OSError as exc:  # disk full, file size limit, permissions: the environment, not the input
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _say_error(prog, f"{where}{exc.strerror or exc}; nothing was written", json_errors)
        return 1


# The cyclic garbage collector during a command's start-up (``collector_paused``): while paused, whether resuming
# freezes what start-up made (the command is its own process); not paused, empty.
_PAUSED: list[bool] = []
_WHOLE_PROCESS: list[bool] = []


def command_is_the_process() -> None:
    """Say that the command running is its whole process (``cli.exit_without_teardown``), so ``resume_collector``
    may freeze what its start-up made: no caller's own objects are among them."""
    _WHOLE_PROCESS[:] = [True]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a command's start-up: until ``resume_collector`` (called where
    the command's plan is made and its work on tensor data begins) or the end of the block.

    A start-up imports torch, torch.distributed.checkpoint and transformers' modeling code and builds the model
    on ``meta``: about 600,000 objects, nearly all alive until the process ends. With the collector on, each
    time the heap has grown by a quarter a full collection walks all of them again: on the embedded tiny
    model 6 full collections, 0.6-0.8 CPU-s, about half of what convert, to-hf and diagnose spent above
    ``import torch`` (``tests/test_cli_startup.py`` counts them). They find little: the start-up makes about
    11,000 objects of cyclic garbage. The work that follows runs with the collector on, so a cycle holding a
    block of tensor data is freed as usual. A no-op when the collector is already off (the caller's choice).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    _PAUSED[:] = [bool(_WHOLE_PROCESS)]
    try:
        yield
    finally:
        resume_collector()


def resume_collector() -> None:
    """End ``collector_paused``: the collector on again (nothing to do when it is not paused).

    In a command that is its own process, everything alive is first moved out of the collector's view
    (``gc.freeze``): the first full collection would otherwise walk the start-up's objects once more (0.3
    CPU-s), and they stay alive anyway; what little garbage the start-up left is then never freed. A caller
    that runs the command in its process (a test, ``cli.main``) keeps all its objects collectable.
    """
    if not _PAUSED:
        return
    if _PAUSED.pop():
        gc.freeze()
    gc.enable()
