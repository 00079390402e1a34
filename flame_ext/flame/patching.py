"""``flame-ext patch apply|check|revert FLAME_DIR``: flame-ext's patches to a fla-org/flame checkout.

The patches in ``patches/`` are git diffs against one flame commit (``FLAME_BASE_COMMIT``), written with
``--full-index``: each names the git blob id of the file before and after. A file's state is therefore
known exactly, without git and without fuzz: its blob id is the base one (the patch applies), the patched
one (already applied), the patched one of an earlier flame-ext (``patches/superseded/``: ``apply`` updates it,
``revert`` undoes it), or none of these (local edits or another flame version: refused, nothing is changed).
All or nothing: every file is checked, then every new file is staged beside the one it replaces, and only
then are they renamed into place; a refused run, a folder that cannot be written (read-only ``flame/utils``)
or a run interrupted before the renames leaves the checkout as it was (one interrupted between two renames
puts the renamed files back). A target that is a symlink is patched through its
link: the link stays, the file it points to changes (as an editor saving through the link would).
``git apply PATCH`` gives the same result as ``apply``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flame_ext.command_options import PatchOptions
from flame_ext.errors import DestinationError, InputError
from flame_ext.flame import FLAME_BASE_COMMIT

__all__ = [
    "PATCH_DIR",
    "FilePatch",
    "load_patches",
    "parse_patch",
    "git_blob_id",
    "file_state",
    "patched_content",
    "apply_patches",
    "run",
]

PATCH_DIR = Path(__file__).resolve().parents[2] / "patches"
_FLAME_MARKERS = ("flame/train.py", "flame/config_manager.py")
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_INDEX = re.compile(r"^index ([0-9a-f]{40})\.\.([0-9a-f]{40})")

CLEAN, APPLIED, OUTDATED, MODIFIED, MISSING = "clean", "applied", "outdated", "modified", "missing"


@dataclass
class Hunk:
    old_start: int
    new_start: int
    old: list[bytes] = field(default_factory=list)  # the lines the hunk expects ('-' and ' ')
    new: list[bytes] = field(default_factory=list)  # the lines it leaves ('+' and ' ')


@dataclass
class FilePatch:
    """One file's part of a patch file: where it applies, the blob ids before and after, its hunks."""

    patch_name: str
    path: str
    old_blob: str
    new_blob: str
    hunks: list[Hunk]
    earlier: list[FilePatch] = field(default_factory=list)  # superseded versions from the same base


def git_blob_id(data: bytes) -> str:
    """git's object id of a file's content (what ``git hash-object`` prints): identifies it exactly."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def parse_patch(text: bytes, name: str) -> list[FilePatch]:
    """The file diffs of a git patch; the text before the first ``diff --git`` is its header."""
    files: list[FilePatch] = []
    current: FilePatch | None = None
    hunk: Hunk | None = None
    last_side: list[list[bytes]] = []
    for raw in text.splitlines(keepends=True):
        line = raw.decode("utf-8")
        if line.startswith("diff --git "):
            current, hunk = None, None
            files.append(FilePatch(name, line.split()[2][2:], "", "", []))
            current = files[-1]
        elif current is None:
            continue
        elif hunk is None and (m := _INDEX.match(line)):
            current.old_blob, current.new_blob = m.group(1), m.group(2)
        elif m := _HUNK.match(line):
            hunk = Hunk(int(m.group(1)), int(m.group(3)))
            current.hunks.append(hunk)
        elif hunk is not None and raw[:1] in (b" ", b"-", b"+"):
            body = raw[1:]
            last_side = {b" ": [hunk.old, hunk.new], b"-": [hunk.old], b"+": [hunk.new]}[raw[:1]]
            for side in last_side:
                side.append(body)
        elif hunk is not None and raw.startswith(b"\\"):  # "\ No newline at end of file"
            for side in last_side:
                side[-1] = side[-1].rstrip(b"\r\n")
    for fp in files:
        if not (fp.old_blob and fp.new_blob and fp.hunks):
            raise InputError(
                f"{name}: {fp.path} has no full 'index' line or no hunks (make patches with git diff --full-index)"
            )
    return files


def load_patches(folder: Path = PATCH_DIR) -> list[FilePatch]:
    """Every file diff of every ``*.patch`` in ``folder``, in file-name order, each with the superseded versions
    of itself found in ``folder/superseded`` (so a checkout patched by an earlier flame-ext is recognised)."""
    names = sorted(folder.glob("*.patch")) if folder.is_dir() else []
    if not names:
        raise InputError(f"{folder}: no patches found; install flame-ext from its source checkout (pip install -e .)")
    patches = [fp for p in names for fp in parse_patch(p.read_bytes(), p.name)]
    old = [fp for p in sorted((folder / "superseded").glob("*.patch")) for fp in parse_patch(p.read_bytes(), p.name)]
    for fp in patches:
        fp.earlier = [e for e in old if e.path == fp.path and e.old_blob == fp.old_blob and e.new_blob != fp.new_blob]
    return patches


def _apply_hunks(data: bytes, hunks: list[Hunk], *, reverse: bool) -> bytes:
    """Apply hunks exactly at their line numbers (no fuzz: the blob check already proved the base)."""
    lines = data.splitlines(keepends=True)
    out: list[bytes] = []
    pos = 0
    for h in hunks:
        want, put = (h.new, h.old) if reverse else (h.old, h.new)
        start = (h.new_start if reverse else h.old_start) - 1 + (0 if want else 1)
        if lines[start : start + len(want)] != want:
            raise InputError(f"hunk at line {start + 1} does not match; the file is not the one the patch was made for")
        out.extend(lines[pos:start])
        out.extend(put)
        pos = start + len(want)
    out.extend(lines[pos:])
    return b"".join(out)


def file_state(flame_dir: Path, fp: FilePatch) -> str:
    """clean (base file: the patch applies), applied, outdated (an earlier version applied), modified (none of
    these), or missing."""
    target = flame_dir / fp.path
    if not target.is_file():
        return MISSING
    blob = git_blob_id(target.read_bytes())
    states = {fp.old_blob: CLEAN, fp.new_blob: APPLIED, **{e.new_blob: OUTDATED for e in fp.earlier}}
    return states.get(blob, MODIFIED)


def _patched(data: bytes, fp: FilePatch, *, reverse: bool) -> bytes:
    """``data`` with ``fp`` applied (or undone), confirmed to be the blob the patch promises."""
    result = _apply_hunks(data, fp.hunks, reverse=reverse)
    expected = fp.old_blob if reverse else fp.new_blob
    if git_blob_id(result) != expected:  # cannot happen for a well-formed patch; never write a wrong file
        raise InputError(
            f"{fp.patch_name}: applying it to {fp.path} does not give blob {expected[:12]}; the patch file is damaged"
        )
    return result


def patched_content(flame_dir: Path, fp: FilePatch, *, reverse: bool = False) -> bytes:
    """The file's content with the patch applied or undone; a file patched by an earlier version is first taken
    back to the base, in memory, so the file is written once."""
    data = (flame_dir / fp.path).read_bytes()
    earlier = {e.new_blob: e for e in fp.earlier}.get(git_blob_id(data))
    if earlier is not None:
        data = _patched(data, earlier, reverse=True)
    if not (reverse and earlier is not None):
        data = _patched(data, fp, reverse=reverse)
    return data


@dataclass
class _Staged:
    """One file's new content, written beside the file it replaces, waiting for the rename."""

    fp: FilePatch
    real: Path  # the file itself: a symlinked target is patched through its link
    tmp: Path
    original: bytes


def _stage(real: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``real`` (same folder: the rename is atomic), mode kept."""
    fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(real, tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def apply_patches(flame_dir: Path, patches: list[FilePatch], *, reverse: bool = False) -> list[Path]:
    """Apply (or undo) every patch, all or nothing; returns the files written (a symlink's target, not the link).

    Every new file is staged beside its target first; only when all are staged are they renamed into place.
    A folder that cannot be written (read-only, a full disk) therefore stops the run before any file changes.
    A rename failing after others succeeded (the folder changed meanwhile) puts the renamed ones back.
    """
    action = "revert" if reverse else "apply"
    staged: list[_Staged] = []
    try:
        for fp in patches:
            real = Path(os.path.realpath(flame_dir / fp.path))
            original, data = real.read_bytes(), patched_content(flame_dir, fp, reverse=reverse)
            try:
                staged.append(_Staged(fp, real, _stage(real, data), original))
            except OSError as exc:
                raise DestinationError(
                    f"{flame_dir}: cannot {action} the patches: {real.parent} is not writable ({exc.strerror}); "
                    "nothing was changed: make the checkout writable and run the command again"
                ) from exc
    except BaseException:
        _discard_staged(staged)
        raise
    done: list[_Staged] = []
    for item in staged:
        try:
            os.replace(item.tmp, item.real)
        except BaseException as exc:  # an OSError, or Ctrl-C between two renames: put the renamed ones back
            _discard_staged([s for s in staged if s not in done])
            state = _undo(done)
            if not isinstance(exc, OSError):
                raise
            raise DestinationError(
                f"{flame_dir}: cannot {action} the patches: renaming into {item.real} failed ({exc.strerror}); {state}"
            ) from exc
        done.append(item)
    return [s.real for s in staged]


def _discard_staged(staged: list[_Staged]) -> None:
    for item in staged:
        item.tmp.unlink(missing_ok=True)


def _undo(done: list[_Staged]) -> str:
    """Put back the files already renamed; says what the checkout holds now."""
    left = []
    for item in reversed(done):
        try:
            os.replace(_stage(item.real, item.original), item.real)
        except OSError:
            left.append(item.fp.path)
    return "nothing was changed" if not left else f"{', '.join(left)} could not be put back and stay changed"


def _why_modified(flame_dir: Path, path: str) -> str:
    """Tell local edits from another flame version when the checkout is a git work tree."""
    if not (flame_dir / ".git").exists():
        return "local edits or another flame version"
    try:
        status = subprocess.run(
            ["git", "-C", str(flame_dir), "status", "--porcelain", "--", path],
            capture_output=True,
            text=True,
            timeout=30,
        )
        head = subprocess.run(
            ["git", "-C", str(flame_dir), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "local edits or another flame version"
    if status.stdout.strip():
        return "it has uncommitted local edits (dirty)"
    return f"the checkout is at another flame version (HEAD {head or '?'})"


def _check_target(flame_dir: Path) -> None:
    if not flame_dir.is_dir():
        raise InputError(f"{flame_dir}: no such directory; pass the root of a fla-org/flame checkout")
    absent = [m for m in _FLAME_MARKERS if not (flame_dir / m).is_file()]
    if absent:
        raise InputError(
            f"{flame_dir}: not a fla-org/flame checkout (no {absent[0]}); pass the folder that holds flame/ and "
            "train.sh"
        )


def _states(flame_dir: Path, patches: list[FilePatch]) -> list[tuple[FilePatch, str]]:
    return [(fp, file_state(flame_dir, fp)) for fp in patches]


def _refusal(flame_dir: Path, bad: list[tuple[FilePatch, str]], action: str) -> InputError:
    fp, state = bad[0]
    why = "it is missing" if state == MISSING else _why_modified(flame_dir, fp.path)
    more = f" (and {len(bad) - 1} more file{'s' * (len(bad) > 2)})" if len(bad) > 1 else ""
    return InputError(
        f"{flame_dir}: refusing to {action}: {fp.path} is neither flame {FLAME_BASE_COMMIT[:7]}'s file nor its "
        "patched form: "
        f"{why}{more}; nothing was changed. Stash or commit your edits, or check out {FLAME_BASE_COMMIT[:7]}, "
        "or train without patching: python -m flame_ext.flame.train ..."
    )


def _check(flame_dir: Path, states: list[tuple[FilePatch, str]]) -> int:
    words = {
        CLEAN: "applies cleanly",
        APPLIED: "already applied",
        OUTDATED: "patched by an earlier flame-ext: `flame-ext patch apply` updates it",
        MISSING: "does not apply: the file is missing",
    }
    for fp, state in states:
        word = words.get(state) or f"does not apply: {_why_modified(flame_dir, fp.path)}"
        print(f"{fp.path}: {word} ({fp.patch_name})")
    bad = sum(s in (MODIFIED, MISSING) for _, s in states)
    applied = sum(s == APPLIED for _, s in states)
    outdated = sum(s == OUTDATED for _, s in states)
    to_apply = len(states) - bad - applied - outdated
    summary = f"{to_apply} to apply, {outdated} to update, {applied} already applied, {bad} do not apply"
    print(f"{flame_dir}: base fla-org/flame {FLAME_BASE_COMMIT[:7]}; {summary}")
    return 1 if bad else 0


def run(opts: PatchOptions) -> int:
    """``flame-ext patch ACTION FLAME_DIR``: 0 done (or nothing to do); check: 1 when a patch does not apply;
    2 (one line, via run_guarded) for a target that is not flame, or one apply/revert refuses."""
    flame_dir = Path(opts.flame_dir)
    _check_target(flame_dir)
    states = _states(flame_dir, load_patches(Path(opts.patch_dir or PATCH_DIR)))
    if opts.action == "check":
        return _check(flame_dir, states)
    reverse = opts.action == "revert"
    bad = [(fp, s) for fp, s in states if s in (MODIFIED, MISSING)]
    if bad:
        raise _refusal(flame_dir, bad, opts.action)
    todo = [(fp, s) for fp, s in states if s in ((APPLIED, OUTDATED) if reverse else (CLEAN, OUTDATED))]
    written = apply_patches(flame_dir, [fp for fp, _ in todo], reverse=reverse)
    for (fp, state), real in zip(todo, written):
        word = "reverted" if reverse else ("updated to" if state == OUTDATED else "applied")
        link = (flame_dir / fp.path).is_symlink()
        print(f"{fp.path}: {word} {fp.patch_name}" + (f" (in {real}, through the symlink)" if link else ""))
    done_word = "reverted" if reverse else "applied"
    if not todo:
        print(f"{flame_dir}: nothing to do, the patches are already {'absent' if reverse else 'applied'}")
    else:
        print(
            f"{flame_dir}: {done_word} {len(todo)} of {len(states)} patches (base fla-org/flame "
            f"{FLAME_BASE_COMMIT[:7]})"
        )
    return 0
