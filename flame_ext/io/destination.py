"""Atomic output folders: a result appears whole at its destination or not at all.

Work happens in a hidden temporary sibling (same filesystem, so the final step is a ``rename``, made only
after everything in the sibling is flushed to disk), guarded
by an exclusive lock so two runs aimed at one destination cannot interleave. Temporaries left by a killed
run carry the dead process id in their name and are removed by the next run that takes the lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from flame_ext.errors import DestinationError

__all__ = ["atomic_folder", "check_destination", "temp_prefix"]


def temp_prefix(dest: Path) -> str:
    """Name prefix of ``dest``'s temporary siblings: ``.step_0.flame-ext-tmp-`` for ``step-0``.

    No ``step-<digits>`` in it: torchtitan takes any entry of its checkpoint folder that matches
    ``step-(\\d+)`` and holds a ``.metadata`` for a saved step, and a run killed after writing its data but
    before the rename (e.g. during the reference loss) leaves exactly such a folder.
    """
    return f".{dest.name.replace('-', '_')}.flame-ext-tmp-"


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


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so a crash after the rename cannot leave a
    destination that looks complete but lost data. Writers write without per-file fsync (the kernel
    writes back behind them); this single pass waits only for what is still in flight."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so that ``--force`` never leaves the
    destination missing, not even between two renames; False where the call is unavailable."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


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
                raise DestinationError(
                    f"{dest}: another flame-ext run is writing there now; wait for it to finish"
                ) from exc
            raise
        _remove_stale_temps(dest)
        tmp = dest.parent / f"{temp_prefix(dest)}{os.getpid()}"
        tmp.mkdir()
        try:
            yield tmp
            _make_durable(tmp)
            if dest.exists():
                if not force:
                    raise DestinationError(f"{dest}: appeared while converting; pass --force to replace it")
                if _exchange(tmp, dest):
                    shutil.rmtree(tmp, ignore_errors=True)  # now the old checkpoint
                else:  # two renames: a kill between them leaves the destination absent (never partial)
                    old = dest.parent / f"{temp_prefix(dest)}old-{os.getpid()}"
                    os.rename(dest, old)
                    os.rename(tmp, dest)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, dest)
            _fsync_path(dest.parent)  # the rename itself
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()
