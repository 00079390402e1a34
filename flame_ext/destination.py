"""Atomic output folders: a result appears whole at its destination or not at all.

Work happens in a hidden temporary sibling (same filesystem, so the final step is a ``rename``), guarded
by an exclusive lock so two runs aimed at one destination cannot interleave. Temporaries left by a killed
run carry the dead process id in their name and are removed by the next run that takes the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import DestinationError

__all__ = ["atomic_folder", "check_destination", "temp_prefix"]


def temp_prefix(dest: Path) -> str:
    return f".{dest.name}.flame-ext-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(dest: Path) -> list[Path]:
    removed = []
    for p in dest.parent.glob(temp_prefix(dest) + "*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_destination(dest: str | os.PathLike, *, force: bool) -> None:
    """Refuse an existing destination before any work is done (``atomic_folder`` checks again at the end)."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise DestinationError(f"{dest}: already exists; choose another path or pass --force to replace it")


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on normal exit it replaces ``dest``, on any exception it is removed.

    ``dest`` must not exist unless ``force``. The check is made before any work and again under the lock
    just before the rename, so a destination created meanwhile is never overwritten silently.
    """
    dest = Path(dest).absolute()
    check_destination(dest, force=force)
    if dest.parent.exists() and not dest.parent.is_dir():
        raise DestinationError(f"{dest.parent}: is a file; the destination's parent must be a folder")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)  # flame's step-0 path usually does not exist yet
    except OSError as exc:
        raise DestinationError(f"{dest.parent}: cannot create ({exc.strerror})") from exc
    lock_path = dest.parent / f".{dest.name}.flame-ext-lock"
    try:
        lock = open(lock_path, "a+")
    except OSError as exc:
        raise DestinationError(f"{dest.parent}: not writable ({exc.strerror})") from exc
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise DestinationError(f"{dest}: another flame-ext run is writing there now; wait for it to finish") from exc
            raise
        _remove_stale_temps(dest)
        tmp = dest.parent / f"{temp_prefix(dest)}{os.getpid()}"
        tmp.mkdir()
        try:
            yield tmp
            if dest.exists():
                if not force:
                    raise DestinationError(f"{dest}: appeared while converting; pass --force to replace it")
                old = dest.parent / f"{temp_prefix(dest)}old-{os.getpid()}"
                os.rename(dest, old)
                os.rename(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()
