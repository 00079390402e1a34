"""Error types.

Every error a user can cause is a ``FlameExtError``: the command line prints its message as one line and
exits with code 2, so each message names the input, what is wrong with it, and what to do next.
Bugs stay ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flame_ext.report import Report

__all__ = [
    "FlameExtError",
    "InputError",
    "UsageError",
    "CheckpointFormatError",
    "DestinationError",
    "DistributedRunError",
    "GuardConfigError",
    "InitialLoadValidationError",
    "ResumeValidationError",
    "Terminated",
    "TERMINATING_SIGNALS",
    "termination_raises",
    "ForwardUnavailableError",
    "first_line",
    "os_error_in",
    "naming_file",
    "failure_reason",
    "exit_code_of",
    "short_value",
    "report_without_traceback",
    "refused_global",
    "run_guarded",
    "after_report",
]


class FlameExtError(Exception):
    """A problem with what the user asked for; the message is shown as is, and the command exits ``exit_code``."""

    exit_code = 2


class InputError(FlameExtError):
    """An input path, id or option is missing, unreadable or of the wrong kind."""


class UsageError(InputError):
    """A command line argparse cannot take (unknown option, bad value); ``prog`` is the (sub)command's name."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class CheckpointFormatError(FlameExtError):
    """A checkpoint exists but its files are not what their format promises (corrupt, truncated, foreign)."""


class DestinationError(FlameExtError):
    """The output location cannot be used (exists without --force, busy, not writable)."""


class DistributedRunError(FlameExtError):
    """A run under torchrun stopped because a rank failed, stopped, or was started differently.

    ``exit_code`` is the one the cause gives in one process, so every rank of a launch exits alike: 1 when a
    write failed (disk full, a file size limit: the environment) or a rank hit a bug, 2 for bad input.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class GuardConfigError(FlameExtError, ValueError):
    """A guard setting is invalid, or the guard was switched on where it cannot work (pipeline parallel).

    Also a ``ValueError``, the type torchtitan's config validation raises, so config parsers report it
    the same way as their own.
    """

    __module__ = "flame_ext.guard"


class InitialLoadValidationError(FlameExtError):
    """The initial checkpoint load failed validation; ``report`` holds every finding (JSON contract)."""

    __module__ = "flame_ext.guard"  # shown in tracebacks under its public import path
    exit_code = 1  # the run started and the checkpoint was found wrong, as ``diagnose`` finding problems

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


class ResumeValidationError(InitialLoadValidationError):
    """A resume loaded state that differs from what was saved at that step (or wrong buffers); ``report``
    holds every finding. A subclass of ``InitialLoadValidationError``, so code catching that catches this too."""

    __module__ = "flame_ext.guard"


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


class ForwardUnavailableError(FlameExtError):
    """The model's forward pass cannot run on this machine (e.g. fla's Triton kernels without a GPU).

    Not a fault of any input: what needs the forward (a reference loss, the step-0 loss) is done elsewhere.
    """


def first_line(exc: BaseException) -> str:
    """The line of a library's exception worth quoting in a one-line message (at most 200 characters).

    torch colours parts of its messages, and its weights-only refusal puts the cause after a paragraph
    about defaults, so that cause line is taken when there is one.
    """
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    cause = next(
        (line for line in lines if "WeightsUnpickler error" in line or line.startswith("Unsupported")), lines[0]
    )
    return cause.strip()[:200]


def os_error_in(exc: BaseException) -> OSError | None:
    """The ``OSError`` that ``exc`` is or stands for: itself, one it was raised from or during (torch's zip writer
    turns a failed write into ``RuntimeError: ... unexpected pos``), or one of DCP's per-rank failures."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]
    return None


@contextlib.contextmanager
def naming_file(path: str | os.PathLike) -> Iterator[None]:
    """An ``OSError`` raised while writing ``path`` (also one behind a library's error) comes out of the block as an
    ``OSError`` that names ``path``: Python's ``write`` does not name its file, and a rank's one-line reason
    must (``File too large`` alone does not say which)."""
    try:
        yield
    except Exception as exc:
        found = os_error_in(exc)
        if found is None or (found is exc and exc.filename):
            raise
        raise OSError(found.errno, found.strerror or str(found), found.filename or os.fspath(path)) from exc


def failure_reason(exc: BaseException) -> str:
    """The one line a failure is reported by, on its own rank and quoted by the others: a write failure as
    ``<file>: <reason>``, one of ours as its message, anything else as ``<type>: <first line>``."""
    if isinstance(exc, FlameExtError):
        return first_line(exc)
    found = os_error_in(exc)
    if found is not None:
        where = f"{found.filename}: " if found.filename else ""
        return f"{where}{found.strerror or first_line(found)}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def exit_code_of(exc: BaseException) -> int:
    """The exit code a failure gives in one process: ours say theirs (2 for bad input); a write failure and a bug 1."""
    return exc.exit_code if isinstance(exc, FlameExtError) else 1


def short_value(value: Any, limit: int = 60) -> str:
    """A value as a one-line message may quote it (as JSON where it is JSON): a number of 400 digits, a long
    string, a list of a million items are described or cut, never printed whole."""
    if isinstance(value, dict):
        return f"an object of {len(value):,} field{'s' * (len(value) != 1)}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value):,} item{'s' * (len(value) != 1)}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 60:
        try:
            return f"an integer of {len(str(abs(value)))} digits"
        except ValueError:  # beyond Python's limit for converting an int to text (4300 digits)
            return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    try:
        text = json.dumps(value) if not isinstance(value, float) else repr(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def refused_global(exc: BaseException) -> str | None:
    """torch's weights-only sentence naming a refused global ("Unsupported global: GLOBAL os.system"), if any."""
    match = re.search(r"Unsupported global: GLOBAL [\w.]+", str(exc))
    return match.group(0) if match else None


def _say_error(prog: str, message: str, json_errors: bool) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    if json_errors:  # --json: a program reading stdout gets the failure as JSON too
        import json

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
