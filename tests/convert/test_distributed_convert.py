"""HF -> DCP under real torchrun (gloo, CPU): the checkpoint N ranks write is the one a single process writes,
and a failing or mismatched rank leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrun_support import (
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

pytestmark = pytest.mark.slow
TOOL_FIELDS = ("tool_version",)


def comparable(folder: Path) -> dict:
    manifest = read_manifest(folder)
    return {k: v for k, v in manifest.items() if k not in TOOL_FIELDS}


def assert_same_checkpoint(ours: Path, single: Path) -> None:
    specs = read_dcp_metadata(ours)
    assert specs == read_dcp_metadata(single)  # same keys, shapes and dtypes
    for key, spec in specs.items():
        a, b = load_tensor(ours, key, spec), load_tensor(single, key, spec)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key  # bit for bit
    assert comparable(ours) == comparable(single)


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
    options = dict(layout="nested", future_predictor="mlp", reference=False)
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
