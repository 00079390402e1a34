"""Error types.

Every error a user can cause is a ``FlameExtError``: the command line prints its message as one line and
exits with code 2, so each message names the input, what is wrong with it, and what to do next.
Bugs stay ordinary exceptions and keep their tracebacks. How a command's process turns these into exit codes
(and handles Ctrl-C, SIGTERM, SIGHUP) is ``flame_ext.process``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
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
    "ForwardUnavailableError",
    "first_line",
    "os_error_in",
    "naming_file",
    "failure_reason",
    "exit_code_of",
    "short_value",
    "refused_global",
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
