"""``flame-ext patch apply|check|revert``: the patch files themselves, the engine on a made-up tree, and
(with FLAME_SRC) the real patches on a copy of a real flame checkout, against ``git apply``."""

from __future__ import annotations

import difflib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flame_src_env import flame_checkout  # noqa: F401 -- a fixture

from flame_ext.cli import main as cli_main
from flame_ext.command_options import PatchOptions
from flame_ext.flame import FLAME_BASE_COMMIT
from flame_ext.flame.patching import PATCH_DIR, git_blob_id, load_patches, run

EXPECTED_FILES = {"flame/train.py", "flame/utils/convert_hf_to_dcp.py", "flame/utils/convert_dcp_to_hf.py"}


# ------------------------------------------------------------------- the patch files


def test_patch_files_name_their_base_and_touch_only_what_they_should():
    patches = load_patches()
    assert {fp.path for fp in patches} == EXPECTED_FILES
    for path in sorted(PATCH_DIR.glob("*.patch")):
        head = path.read_text().split("diff --git", 1)[0]
        assert f"Base: fla-org/flame commit {FLAME_BASE_COMMIT}" in head, path.name
    train = next(fp for fp in patches if fp.path == "flame/train.py")
    added = b"".join(line for h in train.hunks for line in h.new if line not in h.old)
    assert b"from flame_ext.titan import ValidatingCheckpointManager as CheckpointManager" in added
    assert b"from flame_ext.flame.config import JobConfig" in added
    for fp in patches:
        if fp.path != "flame/train.py":
            assert b"from flame_ext.%s import main" % Path(fp.path).stem.encode() in b"".join(fp.hunks[0].new)


def test_patch_context_is_minimal():
    """At most one unchanged line before and after each change (the brief: minimal context)."""
    for path in sorted(PATCH_DIR.glob("*.patch")):
        for hunk in re.split(r"^@@.*@@.*$", path.read_text(), flags=re.M)[1:]:
            lines = [ln for ln in hunk.split("\n") if ln and not ln.startswith("diff --git")]
            lines = lines[
                : next((i for i, ln in enumerate(lines) if ln.startswith(("diff ", "index ", "--- "))), len(lines))
            ]
            lead = next(i for i, ln in enumerate(lines) if ln[0] in "+-")
            trail = next(i for i, ln in enumerate(reversed(lines)) if ln[0] in "+-")
            assert lead <= 1 and trail <= 1, (path.name, lines)


# ------------------------------------------------------------------- the engine, on a made-up tree


def _make_patch(tmp: Path, name: str, files: dict[str, tuple[str, str]]) -> Path:
    """A git-style patch (``--full-index``) turning each file's first text into its second."""
    parts = ["Subject: test patch\n---\n"]
    for path, (old, new) in files.items():
        parts.append(f"diff --git a/{path} b/{path}\n")
        parts.append(f"index {git_blob_id(old.encode())}..{git_blob_id(new.encode())} 100644\n")
        parts.extend(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{path}", f"b/{path}", n=1))
    out = tmp / "patches" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(parts))
    return out.parent


OLD_TRAIN = "".join(f"line {i}\n" for i in range(30))
NEW_TRAIN = OLD_TRAIN.replace("line 3\n", "line three\n").replace("line 20\n", "line 20\nadded\n")
OLD_UTIL = "a\nb\nc\n"
NEW_UTIL = "a\nB\nc\n"


@pytest.fixture
def tree(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "flame"
    (root / "flame" / "utils").mkdir(parents=True)
    (root / "flame" / "train.py").write_text(OLD_TRAIN)
    (root / "flame" / "config_manager.py").write_text("")
    (root / "flame" / "utils" / "u.py").write_text(OLD_UTIL)
    patches = _make_patch(
        tmp_path, "0001.patch", {"flame/train.py": (OLD_TRAIN, NEW_TRAIN), "flame/utils/u.py": (OLD_UTIL, NEW_UTIL)}
    )
    return root, patches


def _run(action: str, root: Path, patches: Path) -> int:
    return run(PatchOptions(action, str(root), patch_dir=str(patches)))


def test_apply_is_idempotent_and_revert_restores(tree, capsys):
    root, patches = tree
    assert _run("check", root, patches) == 0 and "applies cleanly" in capsys.readouterr().out
    assert _run("apply", root, patches) == 0
    assert (root / "flame/train.py").read_text() == NEW_TRAIN and (root / "flame/utils/u.py").read_text() == NEW_UTIL
    capsys.readouterr()
    assert _run("apply", root, patches) == 0 and "nothing to do" in capsys.readouterr().out
    assert (root / "flame/train.py").read_text() == NEW_TRAIN
    assert _run("check", root, patches) == 0 and "already applied" in capsys.readouterr().out
    assert _run("revert", root, patches) == 0
    assert (root / "flame/train.py").read_text() == OLD_TRAIN and (root / "flame/utils/u.py").read_text() == OLD_UTIL


def test_a_dirty_file_stops_everything(tree, capsys):
    from flame_ext.errors import FlameExtError

    root, patches = tree
    (root / "flame/utils/u.py").write_text("a\nlocal edit\nc\n")
    assert _run("check", root, patches) == 1
    out = capsys.readouterr().out
    assert "flame/utils/u.py: does not apply" in out and "flame/train.py: applies cleanly" in out
    with pytest.raises(FlameExtError, match="refusing to apply: flame/utils/u.py .*nothing was changed"):
        _run("apply", root, patches)
    assert (root / "flame/train.py").read_text() == OLD_TRAIN  # all or nothing


def test_a_checkout_patched_by_an_earlier_version_is_updated_or_reverted(tree, capsys):
    """A patch file that changed between releases: the file patched by the old one is recognised, not refused."""
    root, patches = tree
    old_new_train = OLD_TRAIN.replace("line 3\n", "line 3 (earlier patch)\n")
    (patches.parent / "old").mkdir()
    earlier = _make_patch(patches.parent / "old", "0001.patch", {"flame/train.py": (OLD_TRAIN, old_new_train)})
    shutil.move(str(earlier), str(patches / "superseded"))
    (root / "flame/train.py").write_text(old_new_train)  # applied by the earlier flame-ext
    assert _run("check", root, patches) == 0
    out = capsys.readouterr().out
    assert "flame/train.py: patched by an earlier flame-ext: `flame-ext patch apply` updates it" in out
    assert "1 to apply, 1 to update, 0 already applied, 0 do not apply" in out
    assert _run("apply", root, patches) == 0
    assert "flame/train.py: updated to 0001.patch" in capsys.readouterr().out
    assert (root / "flame/train.py").read_text() == NEW_TRAIN and (root / "flame/utils/u.py").read_text() == NEW_UTIL
    (root / "flame/train.py").write_text(old_new_train)
    assert _run("revert", root, patches) == 0
    assert (root / "flame/train.py").read_text() == OLD_TRAIN and (root / "flame/utils/u.py").read_text() == OLD_UTIL


def _read_only_run(folder: Path, argv: list[str], patches: Path) -> subprocess.CompletedProcess:
    """``flame-ext ARGV`` (with the patches in ``patches``) in a fresh interpreter, with ``folder`` read-only: by
    permissions for a normal user; for root (whom permissions do not stop) inside a private mount namespace
    where ``folder`` is a read-only bind mount of itself."""
    code = (
        "import sys; from pathlib import Path; import flame_ext.flame.patching as p; from flame_ext.cli import main; "
        f"p.PATCH_DIR = Path({str(patches)!r}); sys.exit(main({argv!r}))"
    )
    cli = [sys.executable, "-c", code]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return subprocess.run(cli, capture_output=True, text=True, timeout=120)
        finally:
            folder.chmod(0o755)
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a folder read-only")
    script = f"mount --bind -o ro {shlex.quote(str(folder))} {shlex.quote(str(folder))} && exec {shlex.join(cli)}"
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    if r.returncode != 2 and "mount" in r.stderr:
        pytest.skip(f"cannot make a read-only mount here: {r.stderr.strip()[:200]}")
    return r


@pytest.mark.parametrize("action", ["apply", "revert"])
def test_a_read_only_utils_folder_changes_nothing(tree, action):
    """The issue: with ``flame/utils`` read-only, ``apply`` patched train.py, then failed saying "nothing was
    written". Every file is staged before any is renamed, so nothing changes, and the line says so truthfully."""
    root, patches = tree
    if action == "revert":
        assert _run("apply", root, patches) == 0
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    r = _read_only_run(root / "flame" / "utils", ["patch", action, str(root)], patches)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot {action} the patches: {root / 'flame' / 'utils'} is not writable" in lines[0], lines[0]
    assert "nothing was changed" in lines[0]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # train.py untouched, no temporary


@pytest.mark.parametrize("action", ["apply", "revert"])
def test_a_symlinked_train_py_is_patched_through_its_link(tree, tmp_path, capsys, action):
    """flame/train.py a symlink to a file elsewhere: the link stays a link, the file it points to changes."""
    root, patches = tree
    real = tmp_path / "elsewhere" / "train.py"
    real.parent.mkdir()
    real.write_text(OLD_TRAIN if action == "apply" else NEW_TRAIN)
    (root / "flame/train.py").unlink()
    (root / "flame/train.py").symlink_to(real)
    if action == "revert":
        (root / "flame/utils/u.py").write_text(NEW_UTIL)
    assert _run(action, root, patches) == 0
    assert (root / "flame/train.py").is_symlink() and os.readlink(root / "flame/train.py") == str(real)
    assert real.read_text() == (NEW_TRAIN if action == "apply" else OLD_TRAIN)
    word = "applied" if action == "apply" else "reverted"
    assert f"flame/train.py: {word} 0001.patch (in {real}, through the symlink)" in capsys.readouterr().out
    assert sorted(os.listdir(real.parent)) == ["train.py"]  # no temporary left beside the real file


def test_cli_refuses_unknown_and_foreign_targets(tmp_path, capsys):
    assert cli_main(["patch", "apply", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a fla-org/flame checkout" in err and "\n" not in err
    (tmp_path / "flame").mkdir()
    (tmp_path / "flame/train.py").write_text("# another flame\n")
    (tmp_path / "flame/config_manager.py").write_text("")
    assert cli_main(["patch", "apply", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "refusing to apply: flame/train.py is neither" in err and "\n" not in err
    assert (tmp_path / "flame/train.py").read_text() == "# another flame\n"
    assert cli_main(["patch", "check", str(tmp_path)]) == 1


# ------------------------------------------------------------------- the real patches on real flame


@pytest.fixture
def flame_copy(flame_checkout, tmp_path) -> Path:
    dst = tmp_path / "flame"
    shutil.copytree(flame_checkout, dst, symlinks=True, ignore=shutil.ignore_patterns(".git", "exp", "__pycache__"))
    return dst


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p: (root / p).read_bytes() for p in EXPECTED_FILES}


def test_real_flame_apply_check_revert(flame_copy, capsys):
    original = _snapshot(flame_copy)
    assert cli_main(["patch", "check", str(flame_copy)]) == 0
    assert capsys.readouterr().out.count(": applies cleanly") == 3
    assert cli_main(["patch", "apply", str(flame_copy)]) == 0
    patched = _snapshot(flame_copy)
    assert all(patched[p] != original[p] for p in EXPECTED_FILES)
    assert cli_main(["patch", "apply", str(flame_copy)]) == 0
    assert _snapshot(flame_copy) == patched
    capsys.readouterr()
    assert cli_main(["patch", "check", str(flame_copy)]) == 0
    assert capsys.readouterr().out.count(": already applied") == 3
    assert cli_main(["patch", "revert", str(flame_copy)]) == 0
    assert _snapshot(flame_copy) == original


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to compare with git apply")
def test_real_flame_same_as_git_apply(flame_copy, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(flame_copy, other, symlinks=True)
    assert cli_main(["patch", "apply", str(flame_copy)]) == 0
    for patch in sorted(PATCH_DIR.glob("*.patch")):
        subprocess.run(["git", "apply", str(patch)], cwd=other, check=True, timeout=60)
    assert _snapshot(flame_copy) == _snapshot(other)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to apply the superseded patch")
def test_real_flame_patched_by_the_previous_release_is_updated(flame_copy, capsys):
    superseded = sorted((PATCH_DIR / "superseded").glob("*.patch"))
    assert superseded, "no superseded patch to test"
    for patch in superseded:
        subprocess.run(["git", "apply", str(patch)], cwd=flame_copy, check=True, timeout=60)
    assert cli_main(["patch", "check", str(flame_copy)]) == 0
    assert "patched by an earlier flame-ext" in capsys.readouterr().out
    assert cli_main(["patch", "apply", str(flame_copy)]) == 0
    capsys.readouterr()
    assert cli_main(["patch", "check", str(flame_copy)]) == 0
    assert capsys.readouterr().out.count(": already applied") == 3


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git for a dirty work tree")
def test_real_flame_dirty_work_tree_is_named(flame_copy, capsys):
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=flame_copy, check=True)
    subprocess.run(git + ["add", "-A"], cwd=flame_copy, check=True)
    subprocess.run(git + ["commit", "-qm", "base"], cwd=flame_copy, check=True)
    with open(flame_copy / "flame/train.py", "a") as f:
        f.write("# local edit\n")
    assert cli_main(["patch", "apply", str(flame_copy)]) == 2
    assert "uncommitted local edits" in capsys.readouterr().err
