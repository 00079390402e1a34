"""Atomic output: an existing destination is refused without --force and replaced with it; a failure or
Ctrl-C in the middle of a write leaves nothing at the destination (and no temporary sibling behind)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from support.cli import run_cli
from torch.distributed.checkpoint.api import CheckpointException

from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.errors import CheckpointFormatError, DestinationError
from flame_ext.io.cleanup import undo_unfinished
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.dcp_save import WriteEntry, save_streaming
from flame_ext.io.destination import (
    FILES_RECORD,
    atomic_folder,
    check_destination,
    lock_path,
    temp_prefix,
    write_files_record,
    written_by_flame_ext,
)
from flame_ext.io.hf import open_hf
from flame_ext.io.specs import TensorSpec
from flame_ext.process import Terminated, termination_raises
from tests.reliability._rel import diff_snapshots, snapshot


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(dest: Path) -> list[str]:
    """Everything next to ``dest`` except ``dest`` itself: temporaries and locks a run left behind."""
    return sorted(p.name for p in dest.parent.iterdir() if p != dest)


def _assert_complete(dest: Path, model: Path) -> None:
    assert sorted(read_dcp_metadata(dest)) == sorted(open_hf(model).tensors)


@pytest.fixture(scope="module")
def multishard_model(tmp_path_factory) -> Path:
    """A 33 MB OLMo2-shaped checkpoint in 4 shards (random data, written shard by shard): big enough that a
    1 MiB buffer makes a conversion write dozens of files, so an interrupt lands in the middle of it."""
    from safetensors.torch import save_file
    from support.models import tiny_config
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("multishard") / "olmo2"
    out.mkdir()
    cfg = tiny_config(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        max_position_embeddings=128,
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=None,
    )
    cfg.save_pretrained(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    keys, n, gen, weight_map = list(shapes), 4, torch.Generator().manual_seed(0), {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: torch.randn(shapes[k], generator=gen) for k in keys[i::n]}, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys[i::n]})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


# ---------------------------------------------------------------- the --force rule


def _convert_cli(model: Path, dest: Path, *extra: str):
    return run_cli("convert", "--model", str(model), "--checkpoint", str(dest), "--no-reference", *extra)


def _one_line(r) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return lines[0]


def _fake_dcp(folder: Path) -> Path:
    """A small real DCP checkpoint (``.metadata`` naming its data file) with a ``flame_ext.json`` beside it."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... save in a single process": yes
        dcp.save({"w": torch.ones(4, 4)}, checkpoint_id=str(folder), no_dist=True)
    (folder / "flame_ext.json").write_text("{}")
    return folder


def _fake_hf(folder: Path, *names: str) -> Path:
    """A folder of HF-looking files (names only, no record of a to-hf run)."""
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", *names):
        (folder / name).write_text("{}")
    return folder


def _to_hf_cli(dcp: Path, config: Path, out: Path, *extra: str):
    return run_cli("to-hf", "--checkpoint", str(dcp), "--config", str(config), "--out", str(out), *extra)


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_folder_with_other_files_is_refused_even_with_force(sharded_model, tmp_path, force):
    """The issue's commands: ``mkdir precious; echo notes > precious/notes.txt; flame-ext convert --model M
    --checkpoint precious --force`` removed notes.txt. It must refuse and keep it."""
    dest = tmp_path / "precious"
    dest.mkdir()
    (dest / "notes.txt").write_text("notes\n")
    before = snapshot(tmp_path)
    line = _one_line(_convert_cli(sharded_model, dest, *["--force"] * force))
    assert str(dest) in line and "notes.txt" in line and "not a DCP checkpoint" in line, line
    assert (dest / "notes.txt").read_text() == "notes\n"
    assert diff_snapshots(before, snapshot(tmp_path)) == []


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_regular_file_is_refused_and_nothing_left(sharded_model, tmp_path, force):
    """``--force`` onto a regular file used to leave ``.afile.flame-ext-tmp-NNNN`` (the old file) beside it."""
    dest = tmp_path / "afile"
    dest.write_text("mine")
    line = _one_line(_convert_cli(sharded_model, dest, *["--force"] * force))
    assert str(dest) in line and "regular file" in line, line
    assert dest.read_text() == "mine" and _siblings(dest) == []


@pytest.mark.parametrize("target", ["folder", "dcp", "dangling"])
def test_symlink_destination_is_refused_up_front(sharded_model, tmp_path, target):
    """A link (to a checkpoint or not, or dangling) is refused before anything runs: a missing model is not
    even looked at, the destination's message comes first."""
    link = tmp_path / "link"
    real = _fake_dcp(tmp_path / "real") if target == "dcp" else tmp_path / "real"
    if target == "folder":
        real.mkdir()
    link.symlink_to(real)
    before = snapshot(tmp_path)
    line = _one_line(_convert_cli(tmp_path / "no-such-model", link, "--force"))
    assert str(link) in line and "symlink" in line, line
    assert ("does not exist" in line) == (target == "dangling"), line
    assert diff_snapshots(before, snapshot(tmp_path)) == []


def test_empty_folder_is_used_without_force(sharded_model, tmp_path):
    dest = tmp_path / "step-0"
    dest.mkdir()
    r = _convert_cli(sharded_model, dest)
    assert r.returncode == 0, r.stderr
    _assert_complete(dest, sharded_model)
    assert _siblings(dest) == []


@pytest.mark.slow  # several commands in fresh processes; make test-fast leaves it out
def test_previous_conversion_is_refused_without_force_and_replaced_with_it(sharded_model, tmp_path):
    dest = tmp_path / "step-0"
    assert _convert_cli(sharded_model, dest).returncode == 0
    before = _tree(dest)
    line = _one_line(_convert_cli(sharded_model, dest))
    assert str(dest) in line and "already exists (a DCP checkpoint)" in line and "--force" in line, line
    assert _tree(dest) == before
    r = _convert_cli(sharded_model, dest, "--force")
    assert r.returncode == 0, r.stderr
    _assert_complete(dest, sharded_model)
    assert _siblings(dest) == []


def test_each_writer_replaces_only_its_own_kind(tmp_path):
    dcp = _fake_dcp(tmp_path / "dcp")
    hf = _fake_hf(tmp_path / "hf", "tokenizer.json", "chat_template.jinja")
    write_files_record(hf)
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"format_version": 1, "kind": "reference", "reference": None}))
    other_json = tmp_path / "other.json"
    other_json.write_text(json.dumps({"format_version": 1, "kind": "checkpoint"}))
    assert (
        written_by_flame_ext(dcp, "dcp") and written_by_flame_ext(hf, "hf") and written_by_flame_ext(ref, "reference")
    )
    for path, kind in [(dcp, "dcp"), (hf, "hf"), (ref, "reference")]:
        check_destination(path, kind=kind, force=True)
        with pytest.raises(DestinationError, match="already exists"):
            check_destination(path, kind=kind, force=False)
    for path, kind in [(dcp, "hf"), (hf, "dcp"), (ref, "dcp"), (other_json, "reference"), (dcp, "reference")]:
        with pytest.raises(DestinationError, match="--force replaces only"):
            check_destination(path, kind=kind, force=True)
    (dcp / "notes.txt").write_text("mine")  # one foreign file makes it not ours
    with pytest.raises(DestinationError, match="notes.txt"):
        check_destination(dcp, kind="dcp", force=True)
    (hf / "subfolder").mkdir()
    with pytest.raises(DestinationError, match="subfolder"):
        check_destination(hf, kind="hf", force=True)


# ---------------------------------------------------------------- --force knows its own output by exact names

USER_FILES = {"my_tokenizer_notes.txt": "mine\n", "vocab_backup.json": "{}\n", "chat_template_draft.jinja": "{{ x }}\n"}


@pytest.mark.slow  # several commands in fresh processes; make test-fast leaves it out
@pytest.mark.parametrize("where", ["beside-hf-files", "added-to-a-to-hf-output"])
def test_to_hf_force_never_removes_user_files_whose_names_contain_tokenizer_vocab_or_chat_template(
    tiny_model, tiny_dcp, tmp_path, where
):
    """The issue's attack: names that merely contain ``tokenizer``, ``vocab`` or ``chat_template`` made the folder
    pass as to-hf's output, and --force deleted them. Whether beside HF-looking files with no record, or added
    to a real to-hf output, the folder is refused: exit 2, one line, every file as it was."""
    out = tmp_path / "hf"
    if where == "beside-hf-files":
        _fake_hf(out)
    else:
        assert _to_hf_cli(tiny_dcp, tiny_model, out).returncode == 0
        assert written_by_flame_ext(out, "hf")  # the control: before the user's files, it is to-hf's own
    for name, text in USER_FILES.items():
        (out / name).write_text(text)
    before = snapshot(tmp_path)
    line = _one_line(_to_hf_cli(tiny_dcp, tiny_model, out, "--force"))
    assert str(out) in line and "not an HF model folder written by flame-ext to-hf" in line, line
    assert any(name in line for name in USER_FILES), line  # a file that makes it foreign is named first
    assert diff_snapshots(before, snapshot(tmp_path)) == []
    assert all((out / name).read_text() == text for name, text in USER_FILES.items())


@pytest.mark.slow  # commands in fresh processes (5-15 CPU-s); make test-fast leaves it out
def test_to_hf_force_replaces_its_own_output_with_copied_readme_code_and_tokenizer(tiny_model, tiny_dcp, tmp_path):
    """Whatever side files to-hf copied (README, custom code, tokenizer files of any name) are in its record, so
    its own earlier output is replaced; the second run's output is what is there afterwards."""
    source = tmp_path / "source"
    shutil.copytree(tiny_model, source)
    (source / "README.md").write_text("# my model\n")
    (source / "modeling_custom.py").write_text("# custom code\n")
    (source / "my_tokenizer_extra.model").write_bytes(b"\x00\x01")
    out = tmp_path / "out" / "hf"
    assert _to_hf_cli(tiny_dcp, source, out).returncode == 0
    record = json.loads((out / FILES_RECORD).read_text())
    assert {"README.md", "modeling_custom.py", "my_tokenizer_extra.model", "tokenizer.json"} <= set(record["files"])
    assert set(record["files"]) | {FILES_RECORD} == set(os.listdir(out))  # every file the run wrote, no other
    line = _one_line(_to_hf_cli(tiny_dcp, source, out))  # without --force: refused, says --force would do
    assert "already exists (an HF model folder)" in line, line
    r = _to_hf_cli(tiny_dcp, source, out, "--force", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # the new output is in place
    assert (out / "README.md").read_text() == "# my model\n" and _siblings(out) == []


def test_dcp_force_recognises_the_files_its_metadata_names_not_a_pattern(tmp_path):
    """A user's ``notes.distcp`` or ``__0_9.distcp`` in a checkpoint folder: the old pattern ``*.distcp`` took
    them for checkpoint data; ``.metadata`` does not name them, so the folder is not convert's to replace."""
    dcp = _fake_dcp(tmp_path / "step-0")
    check_destination(dcp, kind="dcp", force=True)  # the control: the checkpoint alone is replaceable
    for name in ("notes.distcp", "__0_9.distcp"):
        (dcp / name).write_text("mine")
        with pytest.raises(DestinationError, match=name.replace(".", r"\.")):
            check_destination(dcp, kind="dcp", force=True)
        (dcp / name).unlink()
    (dcp / ".metadata").write_bytes(b"not a pickle")  # no readable record: nothing in it is known to be ours
    with pytest.raises(DestinationError, match="no readable .metadata"):
        check_destination(dcp, kind="dcp", force=True)


# ---------------------------------------------------------------- names against NAME_MAX


def _name(n: int) -> str:
    return "d" * n


@pytest.mark.slow  # commands in fresh processes (5-15 CPU-s); make test-fast leaves it out
@pytest.mark.parametrize("command", ["convert", "to-hf"])
def test_a_legal_250_byte_destination_name_is_accepted(command, tiny_model, tiny_dcp, tmp_path):
    """Its temporary sibling ``.<name>.flame-ext-tmp-<pid>`` would be over 255 bytes: it takes a short hashed
    name in the same folder instead, and the result appears under the name asked for."""
    dest = tmp_path / _name(250)
    assert len(temp_prefix(dest)) + len("4194304-old") <= 255 and len(lock_path(dest).name) <= 255
    if command == "convert":
        r = _convert_cli(tiny_model, dest)
    else:
        r = _to_hf_cli(tiny_dcp, tiny_model, dest)
    assert r.returncode == 0, r.stderr
    assert written_by_flame_ext(dest, "dcp" if command == "convert" else "hf")
    assert _siblings(dest) == []
    r = (
        _convert_cli(tiny_model, dest, "--force")
        if command == "convert"
        else _to_hf_cli(tiny_dcp, tiny_model, dest, "--force")
    )
    assert r.returncode == 0, r.stderr  # and replaced with --force, through the same short temporary name
    assert _siblings(dest) == []


@pytest.mark.parametrize("command", ["convert", "to-hf"])
@pytest.mark.parametrize("where", ["name", "parent"])
def test_a_name_over_255_bytes_is_refused_with_the_true_reason(command, where, tiny_model, tiny_dcp, tmp_path):
    dest = tmp_path / _name(256) if where == "name" else tmp_path / _name(300) / "out"
    before = snapshot(tmp_path)
    line = _one_line(_convert_cli(tiny_model, dest) if command == "convert" else _to_hf_cli(tiny_dcp, tiny_model, dest))
    size = 256 if where == "name" else 300
    assert f"is {size} bytes; this filesystem allows at most 255 bytes" in line, line
    assert diff_snapshots(before, snapshot(tmp_path)) == []


def test_a_run_that_holds_the_lock_keeps_others_out(tmp_path):
    """The lock is what identifies a live writer: its temporary folder stays while it holds the lock."""
    dest = tmp_path / "out"
    live = tmp_path / f"{temp_prefix(dest)}{os.getpid()}"
    live.mkdir()
    with open(lock_path(dest), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(DestinationError, match="another flame-ext run"):
            with atomic_folder(dest):
                pass
    assert not dest.exists() and live.is_dir()


@pytest.mark.parametrize("pid", ["own", "1"])
def test_stale_temp_of_a_reused_pid_is_removed(sharded_model, tmp_path, pid):
    """A temporary left by a killed run whose process id is alive again as another process (this test's
    own, or 1 as every container's first process) is still stale: no run holds the lock."""
    dest = tmp_path / "checkpoint" / "step-0"
    dest.parent.mkdir()
    number = os.getpid() if pid == "own" else 1
    for name in (f"{temp_prefix(dest)}{number}", f"{temp_prefix(dest)}{number}-old"):
        _fake_dcp(dest.parent / name)
    (dest.parent / lock_path(dest).name).write_text("")  # the killed run's lock file, no longer held
    convert_hf_to_dcp(ConvertOptions(model=str(sharded_model), checkpoint=str(dest), reference=False, progress=False))
    _assert_complete(dest, sharded_model)
    assert _siblings(dest) == []


def test_parents_created_for_a_failed_run_are_removed(tmp_path):
    dest = tmp_path / "new" / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(dest, kind="hf") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("the write failed")
    assert sorted(os.listdir(tmp_path)) == []
    (tmp_path / "kept").mkdir()  # a parent that existed before stays
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "kept" / "x" / "out"):
            raise RuntimeError("again")
    assert sorted(os.listdir(tmp_path)) == ["kept"] and os.listdir(tmp_path / "kept") == []


# ---------------------------------------------------------------- failures mid-write


def _entries(tmp_holder: list[Path], fail_with: BaseException, seen: list[list[str]]) -> list[WriteEntry]:
    """Two tensors: the first writes fine, the second's reader fails after the first is on disk."""

    def good(start: int, end: int) -> torch.Tensor:
        return torch.arange(start * 4, end * 4, dtype=torch.float32).view(end - start, 4)

    def bad(start: int, end: int) -> torch.Tensor:
        seen.append(sorted(p.name for p in tmp_holder[0].iterdir()))
        raise fail_with

    spec = TensorSpec((256, 4), "float32")
    return [WriteEntry("a.weight", spec, good), WriteEntry("b.weight", spec, bad)]


@pytest.mark.parametrize(
    "failure, surfaces_as",
    [
        (OSError(errno.EIO, "Input/output error", "model-00002-of-00005.safetensors"), OSError),
        (CheckpointFormatError("model-00002-of-00005.safetensors: truncated"), CheckpointFormatError),
        (RuntimeError("a bug in a reader"), CheckpointException),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
    ids=["oserror", "format-error", "other-exception", "ctrl-c"],
)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "force-over-existing"])
def test_exception_from_a_read_leaves_nothing(failure, surfaces_as, existing, tmp_path):
    dest = tmp_path / "out"
    if existing:
        _fake_dcp(dest)
    before = _tree(dest) if existing else None
    holder: list[Path] = []
    seen: list[list[str]] = []
    with pytest.raises(surfaces_as):
        with atomic_folder(dest, force=existing) as tmp:
            holder.append(tmp)
            save_streaming(tmp, _entries(holder, failure, seen), buffer_bytes=1024)
    assert seen and any(name.endswith(".distcp") for name in seen[0]), "the failure must come after data was written"
    assert not holder[0].exists()
    assert (_tree(dest) == before) if existing else not dest.exists()
    assert _siblings(dest) == []


# ---------------------------------------------------------------- signals to a real CLI run


def _start_convert(model: Path, dest: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "flame_ext.cli",
        "convert",
        "--model",
        str(model),
        "--checkpoint",
        str(dest),
        "--no-reference",
        "--buffer-mb",
        "1",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_data_in_temp(proc: subprocess.Popen, dest: Path, timeout: float = 60) -> bool:
    """Until the run's temporary sibling holds data files (mid-write); False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for tmp in dest.parent.glob(temp_prefix(dest) + "*"):
            if any(tmp.glob("*.distcp")):
                return True
        time.sleep(0.005)
    return False


@pytest.mark.slow  # a 33 MB conversion stopped mid-write by each signal; make test-fast leaves it out
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_mid_write_leaves_nothing(multishard_model, tmp_path, sig):
    """Ctrl-C, SIGTERM (a job scheduler's stop) and SIGHUP (a closed terminal) clean up alike: one line, exit
    128 + the signal number, no destination, no temporary, and the parent folder the run created is gone."""
    dest = tmp_path / "checkpoint" / "step-0"
    proc = _start_convert(multishard_model, dest)
    mid_write = _wait_for_data_in_temp(proc, dest)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 128 + sig:
        assert mid_write
        assert not dest.exists() and not dest.parent.exists(), "the run must remove what it created"
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines == [
            f"flame-ext: interrupted by {sig.name}; no output was left half-written "
            "(a destination is absent or complete)"
        ], err
    else:  # the signal came too late to interrupt: then the result must be complete
        assert proc.returncode == 0, err
        _assert_complete(dest, multishard_model)
    # A second run converts normally and leaves nothing beside the destination.
    convert_hf_to_dcp(
        ConvertOptions(model=str(multishard_model), checkpoint=str(dest), force=True, reference=False, progress=False)
    )
    _assert_complete(dest, multishard_model)
    assert _siblings(dest) == []


def test_killed_run_leaves_nothing_at_destination_and_next_run_cleans_up(multishard_model, tmp_path):
    dest = tmp_path / "checkpoint" / "step-0"
    proc = _start_convert(multishard_model, dest)
    mid_write = _wait_for_data_in_temp(proc, dest)
    proc.kill()  # no handler runs: the temporary folder stays behind, the destination never appears
    proc.communicate(timeout=60)
    if mid_write:
        assert not dest.exists()
        assert any(name.startswith(temp_prefix(dest)) for name in _siblings(dest))
    convert_hf_to_dcp(
        ConvertOptions(model=str(multishard_model), checkpoint=str(dest), force=True, reference=False, progress=False)
    )
    _assert_complete(dest, multishard_model)
    assert _siblings(dest) == [], "the next run must remove the dead run's temporary folder"


def _signal_at_event(n: int, sig: signal.Signals) -> None:
    """Profile the main thread; at its ``n``-th call or return (Python or C), send ``sig`` to this process."""
    seen = 0

    def hook(frame, event, arg):
        nonlocal seen
        seen += 1
        if seen == n:
            sys.setprofile(None)
            signal.raise_signal(sig)

    sys.setprofile(hook)


def _write_one_file(dest: Path, force: bool) -> None:
    with atomic_folder(dest, kind="hf", force=force) as tmp:
        (tmp / "config.json").write_text("{}")
        write_files_record(tmp)


@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
def test_a_signal_at_any_moment_leaves_the_destination_whole_and_nothing_beside_it(tmp_path, force):
    """A SIGTERM (raised as Ctrl-C is, as the commands do) delivered at each of the thousands of calls and
    returns of a small ``atomic_folder`` run: creating the parents, taking the lock, making the temporary, the
    final rename and removing the lock. Each time the destination is absent or whole (with ``--force``: the
    old or the new one, never neither), nothing is left beside it, and the parents the run made are gone.
    Under load, a signal landing just after the lock file's creation and before its assignment had left the
    lock file behind."""
    dest = tmp_path / "exp" / "checkpoint" / "step-0"

    def fresh() -> None:
        shutil.rmtree(tmp_path / "exp", ignore_errors=True)
        if force:
            dest.mkdir(parents=True)
            (dest / "config.json").write_text('{"old": 1}')
            write_files_record(dest)  # to-hf's own output, which --force may replace

    fresh()
    seen = 0

    def count(frame, event, arg):
        nonlocal seen
        seen += 1

    sys.setprofile(count)
    try:
        _write_one_file(dest, force)
    finally:
        sys.setprofile(None)
    assert seen > 100, seen
    outcomes = Counter()
    with termination_raises():
        for n in range(1, seen + 1):
            fresh()
            try:
                _signal_at_event(n, signal.SIGTERM)
                try:
                    _write_one_file(dest, force)
                finally:
                    sys.setprofile(None)
                time.sleep(0)  # a signal sent at the last event acts here at the latest
            except Terminated:
                undo_unfinished()  # as the command runner does when a signal ends a run
                outcomes["stopped"] += 1
            left = sorted(set(os.listdir(dest.parent)) - {dest.name}) if dest.parent.exists() else []
            assert left == [], f"event {n}: {left} left beside the destination"

            if dest.exists():
                assert json.loads((dest / "config.json").read_text()) in ({}, {"old": 1}), n
                outcomes["whole"] += 1
            else:
                assert not force, f"event {n}: the checkpoint being replaced was lost"
                assert not (tmp_path / "exp").exists(), f"event {n}: the parents the run created were left"
    assert outcomes["stopped"] > seen // 2, outcomes
