"""Atomic output: an existing destination is refused without --force and replaced with it; a failure or
Ctrl-C in the middle of a write leaves nothing at the destination (and no temporary sibling behind)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_support import run_cli
from torch.distributed.checkpoint.api import CheckpointException

from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.errors import CheckpointFormatError, DestinationError
from flame_ext.io.dcp import WriteEntry, read_dcp_metadata, save_streaming
from flame_ext.io.destination import atomic_folder, temp_prefix
from flame_ext.io.hf import open_hf
from flame_ext.io.specs import TensorSpec


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
    from transformers import Olmo2Config, Olmo2ForCausalLM

    out = tmp_path_factory.mktemp("multishard") / "olmo2"
    out.mkdir()
    cfg = Olmo2Config(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=128,
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=None,
    )
    cfg.save_pretrained(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Olmo2ForCausalLM(cfg).state_dict().items()}
    keys, n, gen, weight_map = list(shapes), 4, torch.Generator().manual_seed(0), {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: torch.randn(shapes[k], generator=gen) for k in keys[i::n]}, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys[i::n]})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


# ---------------------------------------------------------------- refusal and --force


def test_existing_destination_is_refused_without_force(sharded_model, tmp_path):
    dest = tmp_path / "step-0"
    dest.mkdir()
    (dest / "precious.txt").write_text("do not touch")
    before = _tree(dest)
    r = run_cli("convert", "--model", str(sharded_model), "--checkpoint", str(dest), "--no-reference")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(dest) in lines[0] and "--force" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert _tree(dest) == before
    assert _siblings(dest) == []


def test_force_replaces_the_destination(sharded_model, tmp_path):
    dest = tmp_path / "step-0"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    convert_hf_to_dcp(
        ConvertOptions(model=str(sharded_model), checkpoint=str(dest), force=True, reference=False, progress=False)
    )
    assert not (dest / "old.txt").exists()
    _assert_complete(dest, sharded_model)
    assert _siblings(dest) == []


def test_a_run_that_holds_the_lock_keeps_others_out(tmp_path):
    dest = tmp_path / "out"
    with open(tmp_path / f".{dest.name}.flame-ext-lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(DestinationError, match="another flame-ext run"):
            with atomic_folder(dest):
                pass
    assert not dest.exists()


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
        dest.mkdir()
        (dest / "old.txt").write_text("old")
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


def test_ctrl_c_mid_write_leaves_nothing(multishard_model, tmp_path):
    dest = tmp_path / "checkpoint" / "step-0"
    proc = _start_convert(multishard_model, dest)
    mid_write = _wait_for_data_in_temp(proc, dest)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 130:
        assert mid_write
        assert not dest.exists()
        assert "interrupted; no output was left half-written" in err and "Traceback" not in err
        assert _siblings(dest) == [], "the interrupted run must remove its temporary folder"
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
