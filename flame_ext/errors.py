"""Error types.

Every error a user can cause is a ``FlameExtError``: the command line prints its message as one line and
exits with code 2, so each message names the input, what is wrong with it, and what to do next.
Bugs stay ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations

__all__ = ["FlameExtError", "InputError", "CheckpointFormatError", "DestinationError"]


class FlameExtError(Exception):
    """A problem with what the user asked for; the message is shown as is."""


class InputError(FlameExtError):
    """An input path, id or option is missing, unreadable or of the wrong kind."""


class CheckpointFormatError(FlameExtError):
    """A checkpoint exists but its files are not what their format promises (corrupt, truncated, foreign)."""


class DestinationError(FlameExtError):
    """The output location cannot be used (exists without --force, busy, not writable)."""
