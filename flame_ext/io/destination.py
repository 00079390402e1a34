"""Destinations: what may be replaced, and atomic output (a result appears whole or not at all).

What ``--force`` may replace is decided here, once, for every writer: only what flame-ext itself writes
there (``written_by_flame_ext``: a DCP folder for ``convert``, an HF folder for ``to-hf``, a reference
file for ``reference``), recognised by exact names only: the files a DCP checkpoint's own ``.metadata``
names, the files ``to-hf`` listed in its record ``flame_ext_files.json``, never a pattern that a user's file
could match by its name. An empty folder is used without ``--force``. Anything else (a folder holding
other files, a regular file, a symlink, a dangling symlink) is refused before any work, and again under
the lock just before the rename, so nothing a user keeps there is ever removed.

Work happens in a hidden temporary sibling (same filesystem, so the final step is a ``rename``, made only
after everything in it is flushed to disk), guarded by an exclusive ``flock`` so two runs aimed at one
destination cannot interleave. A writer is identified by the lock it holds, not by its process id: a
process id can be reused (and is 1 for every run in a container), a held ``flock`` dies with its holder.
So whoever holds the lock removes every temporary sibling it finds: none of them can belong to a live run.
Parent folders created for the output are removed again when the run fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Literal

from flame_ext.errors import DestinationError, FlameExtError
from flame_ext.io.cleanup import Undo, signals_held

__all__ = [
    "Kind",
    "atomic_folder",
    "atomic_file",
    "check_destination",
    "flush_files",
    "temp_prefix",
    "lock_path",
    "is_dcp_folder",
    "is_hf_folder",
    "is_reference_file",
    "is_png_file",
    "written_by_flame_ext",
    "FILES_RECORD",
    "write_files_record",
]

Kind = Literal["dcp", "hf", "reference", "plot"]

_WHAT = {"dcp": "a DCP checkpoint", "hf": "an HF model folder", "reference": "a reference file", "plot": "a PNG image"}
_WRITER = {
    "dcp": "flame-ext convert",
    "hf": "flame-ext to-hf",
    "reference": "flame-ext reference",
    "plot": "a loss plot",
}
_FILE_KINDS = ("reference", "plot")

# The record ``to-hf`` writes in its output folder: the name of every file that run wrote (weights, index,
# config and every side file it copied: tokenizer, chat template, README, custom code, whatever their names).
FILES_RECORD = "flame_ext_files.json"
_FILES_RECORD_KIND = "to-hf files"
_MAX_RECORD_BYTES = 1 << 20
# What a DCP folder holds besides the data files its ``.metadata`` names.
_DCP_RECORDS = (".metadata", "flame_ext.json")
# A temporary sibling's name is ``.<stem>.flame-ext-tmp-<pid>`` and its spare ``...-old``: room for both.
_TMP_MARK = ".flame-ext-tmp-"
_LOCK_MARK = ".flame-ext-lock"
_PID_AND_SPARE = len("4194304-old")  # pid_max is at most 2**22 on Linux
_DEFAULT_NAME_MAX = 255


# ---------------------------------------------------------------- what flame-ext writes


def _plain_files(folder: Path) -> list[str] | None:
    """Names of the entries of ``folder`` when every one is a regular file (no link, no folder), else None."""
    names = []
    for entry in os.scandir(folder):
        if not entry.is_file(follow_symlinks=False):
            return None
        names.append(entry.name)
    return names


def _dcp_names(folder: Path) -> set[str]:
    """The exact names a DCP folder's own record accounts for: ``.metadata``, ``flame_ext.json`` and the data
    files ``.metadata`` names (read with the vetted reader); empty when ``.metadata`` is absent or unreadable."""
    from flame_ext.io.dcp import data_file_names

    try:
        return set(_DCP_RECORDS) | data_file_names(folder)
    except FlameExtError:
        return set()


def _hf_names(folder: Path) -> set[str]:
    """The exact names the folder's ``flame_ext_files.json`` lists, and the record itself; empty without a valid
    record (a regular file of at most 1 MiB holding the JSON ``to-hf`` writes)."""
    path = folder / FILES_RECORD
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_RECORD_BYTES:
            return set()
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return set()
    files = data.get("files") if isinstance(data, dict) and data.get("kind") == _FILES_RECORD_KIND else None
    if not isinstance(files, list) or not all(isinstance(n, str) and _plain_name(n) for n in files):
        return set()
    return {FILES_RECORD, *files}


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _own_names(folder: Path, kind: Kind) -> set[str]:
    return _dcp_names(folder) if kind == "dcp" else _hf_names(folder) if kind == "hf" else set()


def write_files_record(folder: Path) -> None:
    """Record, in ``folder``, the name of every file in it: what ``to-hf --force`` may replace there later.

    Written last, from the folder's own listing, so it names exactly what this run wrote (the folder is the
    run's fresh temporary folder). Sorted and without times, so one process and N ranks write the same bytes.
    """
    names = sorted(e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False) and e.name != FILES_RECORD)
    record = {"format_version": 1, "kind": _FILES_RECORD_KIND, "files": names}
    (folder / FILES_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def is_dcp_folder(path: Path) -> bool:
    """A DCP checkpoint: ``.metadata``, the data files it names, and at most ``flame_ext.json`` besides; each an
    exact name from the checkpoint's own record, never a pattern (a ``notes.distcp`` of the user's is foreign)."""
    names = _plain_files(path) if path.is_dir() and not path.is_symlink() else None
    return names is not None and ".metadata" in names and set(names) <= _dcp_names(path)


def is_hf_folder(path: Path) -> bool:
    """An HF folder as ``to-hf`` writes it: its record ``flame_ext_files.json`` and only files that record names
    (a file a user added later, whatever its name, makes the folder not ``to-hf``'s)."""
    names = _plain_files(path) if path.is_dir() and not path.is_symlink() else None
    return names is not None and FILES_RECORD in names and set(names) <= _hf_names(path)


def is_reference_file(path: Path) -> bool:
    """A reference file as ``reference`` writes it: a JSON object of kind "reference" (read as data, bounded)."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 64 << 20:
        return False
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("kind") == "reference" and "format_version" in data


def is_png_file(path: Path) -> bool:
    """A PNG image (a loss plot): a regular file starting with the PNG signature."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


_RECOGNISERS = {"dcp": is_dcp_folder, "hf": is_hf_folder, "reference": is_reference_file, "plot": is_png_file}


def written_by_flame_ext(path: Path, kind: Kind) -> bool:
    """True when ``path`` holds exactly what flame-ext's ``kind`` writer writes: the only thing --force replaces."""
    return _RECOGNISERS[kind](path)


# ---------------------------------------------------------------- the rule


def _describe_folder(path: Path, kind: Kind) -> str:
    """What the folder holds, the entries that make it not ``kind``'s output named first."""
    entries = sorted(os.scandir(path), key=lambda e: e.name)
    if not entries:
        return "an empty folder"
    own = _own_names(path, kind)
    foreign = [e.name for e in entries if not (e.is_file(follow_symlinks=False) and e.name in own)]
    names = foreign + [e.name for e in entries if e.name not in foreign]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    unrecorded = {"dcp": " (no readable .metadata)", "hf": f" (no {FILES_RECORD}, the record to-hf writes)"}
    return f"a folder holding {shown}" + (unrecorded.get(kind, "") if not own else "")


def check_destination(dest: str | os.PathLike, *, kind: Kind, force: bool) -> None:
    """Refuse a destination flame-ext may not write, before any work is done; one line naming what is there."""
    dest = Path(dest)
    what, writer = _WHAT[kind], _WRITER[kind]
    _check_name_lengths(dest)
    if dest.is_symlink():
        target = os.readlink(dest)
        state = "" if dest.exists() else ", which does not exist"
        raise DestinationError(
            f"{dest}: is a symlink (to {target}{state}); flame-ext does not write through links: "
            "choose another path or remove the link"
        )
    if not dest.exists():
        return
    if dest.is_dir() and kind not in _FILE_KINDS and not os.listdir(dest):
        return  # an empty folder is free to use
    if written_by_flame_ext(dest, kind):
        if force:
            return
        raise DestinationError(f"{dest}: already exists ({what}); choose another path or pass --force to replace it")
    if dest.is_dir():
        found = _describe_folder(dest, kind)
    elif dest.is_file():
        found = "a regular file"
    else:
        found = f"a special file ({stat.filemode(dest.stat().st_mode)})"
    raise DestinationError(
        f"{dest}: already exists and is {found}, not {what} written by {writer}; "
        "--force replaces only that: choose another path or move it away"
    )


def _name_max(path: Path) -> int:
    """The longest name, in bytes, the filesystem holding ``path`` (or its nearest existing parent) allows."""
    for p in (path, *path.parents):
        with contextlib.suppress(OSError, ValueError):
            return os.pathconf(p, "PC_NAME_MAX")
    return _DEFAULT_NAME_MAX


def _check_name_lengths(dest: Path) -> None:
    """Refuse a destination whose name (or a parent's) is longer than its filesystem allows, before any work:
    the system would refuse it later with ``File name too long``, after the conversion ran."""
    limit = _name_max(dest.absolute().parent)
    for part in dest.absolute().parts:
        size = len(os.fsencode(part))
        if size > limit:
            shown = part if len(part) <= 40 else part[:20] + "..." + part[-10:]
            raise DestinationError(
                f"{dest}: the name {shown!r} is {size} bytes; this filesystem allows at most {limit} bytes in a "
                "file or folder name: choose a shorter name"
            )


# ---------------------------------------------------------------- temporaries and the lock


def _stem(dest: Path) -> str:
    """The part of ``dest``'s sibling names that stands for ``dest``: its name with ``-`` as ``_`` when the
    longest sibling name (``.<stem>.flame-ext-tmp-<pid>-old``) fits the filesystem's name limit, else a
    short hash of that (a legal 250-byte destination name must not be refused for its temporary's name)."""
    stem = dest.name.replace("-", "_")
    if len(os.fsencode(f".{stem}{_TMP_MARK}")) + _PID_AND_SPARE <= _name_max(dest.parent):
        return stem
    return "h" + hashlib.sha256(os.fsencode(stem)).hexdigest()[:24]


def temp_prefix(dest: Path) -> str:
    """Name prefix of ``dest``'s temporary siblings: ``.step_0.flame-ext-tmp-`` for ``step-0``.

    No ``step-<digits>`` in it: torchtitan takes any entry of its checkpoint folder that matches
    ``step-(\\d+)`` and holds a ``.metadata`` for a saved step, and a run killed after writing its data but
    before the rename (e.g. during the reference loss) leaves exactly such a folder.
    """
    return f".{_stem(dest)}{_TMP_MARK}"


def lock_path(dest: Path) -> Path:
    """The lock file beside ``dest``; named like the temporaries' prefix, so two destination names that share
    a prefix (``step-0``, ``step_0``) share a lock, and the lock holder may clear every temporary it sees."""
    return dest.parent / f".{_stem(dest)}{_LOCK_MARK}"


def _remove_stale_temps(dest: Path) -> list[Path]:
    """Every temporary sibling of ``dest``: called with the lock held, so none belongs to a live run."""
    removed = []
    for p in dest.parent.glob(temp_prefix(dest) + "*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def _take_lock(path: Path, dest: Path) -> IO[str]:
    """Open and ``flock`` the lock file at ``path``.

    The file is removed when its holder ends. A run that opened it just before that removal would then lock
    a file no longer in the folder, while a third run creates and locks a new one; so after taking the lock,
    the file must still be the one at the path (same inode), or the lock is taken again.
    """
    for _ in range(100):
        try:
            lock = open(path, "a+")  # noqa: SIM115 (returned held; ``_release`` closes it)
        except OSError as exc:
            raise DestinationError(f"{dest.parent}: not writable ({exc.strerror})") from exc
        try:
            if _lock_taken(lock, path, dest):
                return lock
        except BaseException:
            _remove_if_ours(lock, path)  # the file this run may have created goes, unless another run holds it
            raise
        lock.close()
    raise DestinationError(f"{path}: the lock file keeps changing; is another program removing it?")


def _release(lock: IO[str], path: Path) -> None:
    """Remove the lock file if it is still the one this run holds, then close it."""
    if _still_at(lock, path):  # held open: its inode is not reused meanwhile
        with contextlib.suppress(OSError):
            path.unlink()
    lock.close()


def _still_at(lock: IO[str], path: Path) -> bool:
    """Whether the open ``lock`` is the file at ``path`` now (same inode)."""
    with contextlib.suppress(OSError):
        return os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino
    return False


def _lock_taken(lock: IO[str], path: Path, dest: Path) -> bool:
    """Take ``flock`` on the open ``lock``; True when it is still the file at ``path`` (else try again)."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise DestinationError(
                f"{dest}: another flame-ext run is writing there now; wait for it to finish"
            ) from exc
        raise
    return _still_at(lock, path)


def _remove_if_ours(lock: IO[str], path: Path) -> None:
    """Remove the lock file when this process holds it or nobody does (a held ``flock`` is another run's)."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # already ours, or free: ours now
    except (OSError, ValueError):  # another run's, or the file is already closed
        lock.close()
        return
    _release(lock, path)


def _create_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, deepest first (to remove on failure)."""
    created: list[Path] = []
    p = folder
    while not p.exists() and not p.is_symlink() and p != p.parent:
        created.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise DestinationError(f"{p}: is a file; the destination's parent must be a folder")
    made: list[Path] = []
    for q in reversed(created):
        try:
            q.mkdir()
        except FileExistsError:
            if q.is_dir():  # another run made it meanwhile: theirs, not ours to remove
                continue
            _remove_created(made[::-1])
            raise DestinationError(f"{q}: is a file; the destination's parent must be a folder") from None
        except OSError as exc:
            _remove_created(made[::-1])
            raise DestinationError(f"{q}: cannot create ({exc.strerror})") from exc
        made.append(q)
    return made[::-1]


def _remove_created(created: list[Path]) -> None:
    for q in created:  # deepest first; a folder something else wrote into meanwhile stays
        with contextlib.suppress(OSError):
            q.rmdir()


# ---------------------------------------------------------------- durability and the final rename


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_files(paths: Iterable[Path]) -> None:
    """Flush these files to disk (a rank of a distributed writer flushes its own before rank 0 publishes)."""
    for path in paths:
        _fsync_path(path)


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


def _put_in_place(result: Path, dest: Path, spare: Path, *, kind: Kind, force: bool) -> None:
    """Move ``result`` to ``dest``, replacing what is there only if the rule still allows it (checked again,
    under the lock: something may have appeared meanwhile). ``spare`` is a free temporary name."""
    with signals_held():  # a kill between two renames would leave the destination absent
        check_destination(dest, kind=kind, force=force)
        if not dest.exists():
            os.rename(result, dest)
        elif dest.is_dir() and not os.listdir(dest):
            try:
                os.rename(result, dest)  # replaces an empty folder in one step
            except OSError as exc:
                raise DestinationError(f"{dest}: something was written there meanwhile ({exc.strerror})") from exc
        elif _exchange(result, dest):
            _discard(result)  # now the replaced output
        else:  # two renames: a SIGKILL between them leaves the destination absent (never partial)
            os.rename(dest, spare)
            os.rename(result, dest)
            _discard(spare)
        _fsync_path(dest.parent)  # the rename itself


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _staging(dest: str | os.PathLike, kind: Kind, force: bool) -> Iterator[tuple[Path, Path]]:
    """Checks, parents, lock, a fresh temporary folder; yields (absolute dest, temporary folder). When the block
    ends, or a signal stops the run anywhere in between (see ``io.cleanup``), the temporary folder goes, the lock
    is released and removed, and the parent folders created for the output go unless something is in them."""
    dest = Path(dest).absolute()
    check_destination(dest, kind=kind, force=force)
    undo = Undo()
    try:
        with signals_held():
            created = _create_parents(dest.parent)  # flame's step-0 path usually does not exist yet
            undo.add(lambda: _remove_created(created))
        with signals_held():
            path = lock_path(dest)
            lock = _take_lock(path, dest)
            undo.add(lambda: _release(lock, path))
        _remove_stale_temps(dest)
        tmp = dest.parent / f"{temp_prefix(dest)}{os.getpid()}"
        with signals_held():
            tmp.mkdir()
            undo.add(lambda: _discard(tmp))  # after success it no longer exists (or holds the replaced output)
        yield dest, tmp
    finally:
        undo.run()


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike, *, kind: Kind = "dcp", force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on normal exit it replaces ``dest``, on any exception it is removed."""
    with _staging(dest, kind, force) as (final, tmp):
        yield tmp
        _make_durable(tmp)
        _put_in_place(tmp, final, tmp.with_name(tmp.name + "-old"), kind=kind, force=force)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, *, kind: Kind = "reference", force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path to write; on normal exit it replaces ``dest``, on any exception it is removed."""
    with _staging(dest, kind, force) as (final, tmp):
        file = tmp / final.name
        yield file
        _fsync_path(file)
        spare = tmp / ("old" if final.name != "old" else "old-2")  # ``final.name + "-old"`` may be too long
        _put_in_place(file, final, spare, kind=kind, force=force)
