"""Error types.

Every error a user can cause is a ``FlameExtError``: the command line prints its message as one line and
exits with code 2, so each message names the input, what is wrong with it, and what to do next.
Bugs stay ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flame_ext.report import Report

__all__ = [
    "FlameExtError",
    "InputError",
    "CheckpointFormatError",
    "DestinationError",
    "GuardConfigError",
    "InitialLoadValidationError",
    "ForwardUnavailableError",
    "first_line",
    "refused_global",
    "run_guarded",
]


class FlameExtError(Exception):
    """A problem with what the user asked for; the message is shown as is."""


class InputError(FlameExtError):
    """An input path, id or option is missing, unreadable or of the wrong kind."""


class CheckpointFormatError(FlameExtError):
    """A checkpoint exists but its files are not what their format promises (corrupt, truncated, foreign)."""


class DestinationError(FlameExtError):
    """The output location cannot be used (exists without --force, busy, not writable)."""


class GuardConfigError(FlameExtError, ValueError):
    """A guard setting is invalid, or the guard was switched on where it cannot work (pipeline parallel).

    Also a ``ValueError``, the type torchtitan's config validation raises, so config parsers report it
    the same way as their own.
    """

    __module__ = "flame_ext.guard"


class InitialLoadValidationError(FlameExtError):
    """The initial checkpoint load failed validation; ``report`` holds every finding (JSON contract)."""

    __module__ = "flame_ext.guard"  # shown in tracebacks under its public import path

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


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


def refused_global(exc: BaseException) -> str | None:
    """torch's weights-only sentence naming a refused global ("Unsupported global: GLOBAL os.system"), if any."""
    match = re.search(r"Unsupported global: GLOBAL [\w.]+", str(exc))
    return match.group(0) if match else None


def run_guarded(fn: Callable[[Any], int], args: Any, *, debug: bool, prog: str = "flame-ext") -> int:
    """Run a command; user errors become one line and exit 2, interrupts exit 130 with nothing written."""
    try:
        return fn(args)
    except FlameExtError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(
            f"{prog}: interrupted; no output was left half-written (a destination is absent or complete)",
            file=sys.stderr,
        )
        return 130
    except OSError as exc:  # disk full, file size limit, permissions: the environment, not the input
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc}; nothing was written", file=sys.stderr)
        return 1
