"""HF -> DCP under real torchrun (gloo, CPU): the checkpoint N ranks write is the one a single process writes,
and a failing or mismatched rank leaves nothing behind."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from support.records import assert_same_fingerprints
from support.torchrun import (
    TIMEOUT_S,
    WORKER,
    assert_every_rank_names_the_cause,
    assert_killed_rank_stopped_everything,
    torchrun,
    two_nodes,
)

from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.io.dcp import load_tensor, read_dcp_metadata
from flame_ext.io.manifest import read_manifest

# once: the distributed writer's rank coordination over gloo is torch.distributed and flame-ext's own code, alike in
# both environments; the single-process conversions these compare with run in both.
pytestmark = [pytest.mark.slow, pytest.mark.once("0.1")]
TOOL_FIELDS = ("tool_version",)


def comparable(folder: Path) -> dict:
    manifest = read_manifest(folder)
    return {k: v for k, v in manifest.items() if k not in TOOL_FIELDS}


def assert_same_checkpoint_values(ours: Path, single: Path) -> None:
    specs = read_dcp_metadata(ours)
    assert specs == read_dcp_metadata(single)  # same keys, shapes and dtypes
    for key, spec in specs.items():
        a, b = load_tensor(ours, key, spec), load_tensor(single, key, spec)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key  # bit for bit
    # The ranks' shares are added in whatever order they finish: the record's tolerance covers that order.
    assert_same_fingerprints(comparable(ours)["fingerprints"], comparable(single)["fingerprints"])


def assert_same_checkpoint(ours: Path, single: Path) -> None:
    assert_same_checkpoint_values(ours, single)
    rest = {k: v for k, v in comparable(ours).items() if k != "fingerprints"}
    assert rest == {k: v for k, v in comparable(single).items() if k != "fingerprints"}


def one_process(model: Path, out: Path, **options) -> Path:
    convert_hf_to_dcp(ConvertOptions(model=str(model), checkpoint=str(out), progress=False, **options))
    return out


def test_two_ranks_write_the_checkpoint_one_process_writes(tiny_model, tiny_dcp, tmp_path):
    """``flame-ext convert`` under torchrun, flat layout, with the reference loss (computed once, on rank 0)."""
    out = tmp_path / "step-0"
    proc, _ = torchrun(2, "-m", "flame_ext.cli", "convert", "--model", str(tiny_model), "--checkpoint", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("HF reference loss") == 1 and "rank 1 of 2, its share" in proc.stdout
    assert len(list(out.glob("__0_*.distcp"))) and len(list(out.glob("__1_*.distcp")))  # both ranks wrote
    assert comparable(out)["reference"] is not None
    assert_same_checkpoint(out, tiny_dcp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0"]  # no temporary folder or lock left


def test_three_ranks_nested_with_a_future_head(sharded_model, tmp_path):
    options = dict(layout="nested", include_future_predictor=True, future_predictor_head_type="mlp", reference=False)
    single = one_process(sharded_model, tmp_path / "single", **options)
    out = tmp_path / "dist"
    flags = ["--layout", "nested", "--include_future_predictor", "--future_predictor_head_type", "mlp"]
    proc, _ = torchrun(
        3, "-m", "flame_ext.convert_hf_to_dcp", "--model", str(sharded_model), "--checkpoint", str(out),
        *flags, "--no_reference",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(list(out.glob(f"__{r}_*.distcp")) for r in range(3))
    assert_same_checkpoint(out, single)


def test_a_rank_killed_mid_write_leaves_nothing_and_stops_the_other(sharded_model, tmp_path):
    out = tmp_path / "step-0"
    args = ["--model", str(sharded_model), "--checkpoint", str(out), "--no_reference", "--buffer_mb", "1"]
    nodes, elapsed = two_nodes(str(WORKER), "--kill-rank", "1", "--", *args, "--timeout_s", str(TIMEOUT_S))
    assert_killed_rank_stopped_everything(nodes, elapsed, "convert_hf_to_dcp", out)


def test_a_file_size_limit_on_one_rank_is_named_on_every_rank(sharded_model, tmp_path):
    """``ulimit -f`` on rank 1 only (two agents, as on two nodes): its DCP write fails with EFBIG. Both ranks used
    to say only "another rank failed or stopped (CheckpointException ...)"; each now names rank 1, its file and
    "File too large", both exit 1 (a write failure, as in one process), and nothing is left."""
    out = tmp_path / "step-0"
    args = ["--model", str(sharded_model), "--checkpoint", str(out), "--no_reference", "--timeout_s", str(TIMEOUT_S)]
    nodes, _ = two_nodes(str(WORKER), "--fsize-on-rank", "1", str(16 * 1024), "--", *args)
    assert_every_rank_names_the_cause(nodes, "convert_hf_to_dcp", out)


def test_a_rank_given_another_model_is_refused_before_anything_is_written(tiny_model, sharded_model, tmp_path):
    out = tmp_path / "step-0"
    args = ["--model", str(sharded_model), "--checkpoint", str(out), "--no_reference"]
    proc, _ = torchrun(2, str(WORKER), "--arg-on-rank", "1", "model", str(tiny_model), "--", *args)
    assert proc.returncode != 0
    # Said on both ranks; counted in the whole stream, since two processes' lines can run together on one line.
    said = "rank 1 was started differently from rank 0 (--model, the source's files differ)"
    assert proc.stderr.count(said) == 2, proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []
    assert "flame_ext/" not in proc.stderr  # one line per rank: no traceback through our code


def test_shares_are_disjoint_cover_everything_and_balance_by_bytes():
    from flame_ext.convert.distributed import split_by_bytes
    from flame_ext.io.dcp_save import WriteEntry
    from flame_ext.io.specs import TensorSpec

    sizes = [7, 1, 5, 3, 3, 2, 9, 4, 4, 1]
    entries = [WriteEntry(f"t{i}", TensorSpec((n, 256), "float32"), lambda a, b: None) for i, n in enumerate(sizes)]
    shares = split_by_bytes(entries, 3, lambda e: e.spec.nbytes)
    keys = [e.key for share in shares for e in share]
    assert sorted(keys) == sorted(e.key for e in entries)  # each tensor on exactly one rank
    loads = [sum(e.spec.nbytes for e in share) for share in shares]
    assert max(loads) - min(loads) <= max(e.spec.nbytes for e in entries)
    assert loads == [13 * 1024, 13 * 1024, 13 * 1024]  # 39 rows of 1 KiB: greedy largest-first splits them evenly
    assert split_by_bytes(entries, 3, lambda e: e.spec.nbytes) == shares  # every rank computes the same split


def _node_folders(model: Path, root: Path, reweight: bool) -> tuple[Path, Path]:
    """Two "nodes" (folders a rank starts in), each with its own ``models/olmo2``: a copy of ``model``, and on
    the second node the same files or (``reweight``) every tensor's values changed with the config, index,
    names, shapes and dtypes kept: another revision of the same model, as two nodes' downloads can differ."""
    from safetensors.torch import load_file, save_file

    nodes = root / "node0", root / "node1"
    for node in nodes:
        shutil.copytree(model, node / "models" / "olmo2")
    if reweight:
        for shard in sorted((nodes[1] / "models" / "olmo2").glob("*.safetensors")):
            tensors = load_file(shard)
            save_file({k: v + 0.01 for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    return nodes


def _same_command_on_two_nodes(nodes: tuple[Path, Path], out: Path) -> subprocess.CompletedProcess:
    """Both ranks run the same command with ``--model models/olmo2``, each in its own node's folder."""
    args = ["--model", "models/olmo2", "--checkpoint", str(out), "--no_reference", "--record_sha256"]
    cwd = ["--cwd-on-rank", "0", str(nodes[0]), "--cwd-on-rank", "1", str(nodes[1])]
    proc, _ = torchrun(2, str(WORKER), *cwd, "--", *args)
    return proc


def test_ranks_given_different_weights_are_refused_naming_the_files_and_nothing_is_written(sharded_model, tmp_path):
    nodes = _node_folders(sharded_model, tmp_path, reweight=True)
    out = tmp_path / "out" / "step-0"
    out.parent.mkdir()
    proc = _same_command_on_two_nodes(nodes, out)
    lines = [x for x in proc.stderr.splitlines() if "the ranks read different weights" in x]
    assert len(lines) == 2, proc.stderr[-3000:]  # one line on each rank, the same line
    assert lines[0] == lines[1] and lines[0].startswith("convert_hf_to_dcp: error: "), lines
    ours, theirs = (n.resolve() / "models" / "olmo2" for n in nodes)
    assert re.search(rf"rank 1's model-000\d\d-of-00010.safetensors, .*\(in {theirs}\) differ", lines[0]), lines[0]
    assert f"differ from rank 0's (in {ours})" in lines[0]
    assert "exitcode  : 2" in proc.stderr and proc.returncode != 0  # torchrun's summary: a rank exited with 2
    assert "exitcode  : 1" not in proc.stderr
    assert list(out.parent.iterdir()) == []  # no destination, no temporary folder, no lock
    assert "flame_ext/" not in proc.stderr  # no traceback through our code


def test_ranks_reading_identical_copies_prove_it_by_content_and_write_the_one_process_checkpoint(
    sharded_model, tmp_path
):
    """Rank 1 reads its own copy of the files (another inode, as on another node): its blocks are digested and
    converted again by rank 0, found equal, and the checkpoint is the one-process one; every file's SHA-256 is
    recorded, rank 1's files included."""
    nodes = _node_folders(sharded_model, tmp_path, reweight=False)
    single = one_process(sharded_model, tmp_path / "single", reference=False)
    out = tmp_path / "dist"
    proc = _same_command_on_two_nodes(nodes, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"rank\(s\) 1 read other copies .*: their \d+ blocks, .* matched byte for byte", proc.stdout)
    assert_same_checkpoint_values(out, single)
    recorded = read_manifest(out)["files"]
    assert recorded["algorithm"] == "sha256"
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "flame_ext.json")
    assert sorted(recorded["files"]) == on_disk and any(n.startswith("__1_") for n in on_disk)
    assert all(hashlib.sha256((out / n).read_bytes()).hexdigest() == d for n, d in recorded["files"].items())
