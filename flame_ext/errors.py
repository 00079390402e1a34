"""Error types.

Every error a user can cause is a ``FlameExtError``: the command line prints its message as one line and
exits with code 2, so each message names the input, what is wrong with it, and what to do next.
Bugs stay ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations

import re

__all__ = ["FlameExtError", "InputError", "CheckpointFormatError", "DestinationError", "first_line", "refused_global"]


class FlameExtError(Exception):
    """A problem with what the user asked for; the message is shown as is."""


class InputError(FlameExtError):
    """An input path, id or option is missing, unreadable or of the wrong kind."""


class CheckpointFormatError(FlameExtError):
    """A checkpoint exists but its files are not what their format promises (corrupt, truncated, foreign)."""


class DestinationError(FlameExtError):
    """The output location cannot be used (exists without --force, busy, not writable)."""


def first_line(exc: BaseException) -> str:
    """The line of a library's exception worth quoting in a one-line message (at most 200 characters).

    torch colours parts of its messages, and its weights-only refusal puts the cause after a paragraph
    about defaults, so that cause line is taken when there is one.
    """
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    cause = next((line for line in lines if "WeightsUnpickler error" in line or line.startswith("Unsupported")), lines[0])
    return cause.strip()[:200]


def refused_global(exc: BaseException) -> str | None:
    """torch's weights-only sentence naming a refused global ("Unsupported global: GLOBAL os.system"), if any."""
    match = re.search(r"Unsupported global: GLOBAL [\w.]+", str(exc))
    return match.group(0) if match else None
