"""DCP -> HF under real torchrun (gloo, CPU): the folder N ranks write is the one a single process writes,
byte for byte, and a failing, killed or mismatched rank leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.torchrun import (
    TIMEOUT_S,
    WORKER,
    assert_every_rank_names_the_cause,
    assert_killed_rank_stopped_everything,
    torchrun,
    two_nodes,
)
from test_convert import _poison, assert_bit_exact, hf_tensors

from flame_ext.convert.dcp_to_hf import ToHFOptions, convert_dcp_to_hf, prepare_to_hf
from flame_ext.convert.distributed import split_by_bytes
from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.io.dcp import read_dcp_metadata

# once: the distributed writer's rank coordination over gloo is torch.distributed and flame-ext's own code, alike in
# both environments; the single-process conversions these compare with run in both.
pytestmark = [pytest.mark.slow, pytest.mark.once("0.1")]

SHARD_MB = 0.05  # ~50 KB shards: the sharded test model (~460 KB) makes about ten, so every rank gets some


def one_process(checkpoint: Path, config: Path, out: Path, max_shard_mb: float) -> Path:
    options = ToHFOptions(str(checkpoint), str(config), str(out), max_shard_bytes=int(max_shard_mb * 2**20))
    options.progress = False
    convert_dcp_to_hf(options)
    return out


def assert_same_folder(ours: Path, single: Path) -> None:
    """Same file names and the same bytes in every file (shards, index, config, tokenizer)."""
    names = sorted(p.name for p in ours.iterdir())
    assert names == sorted(p.name for p in single.iterdir())
    for name in names:
        assert (ours / name).read_bytes() == (single / name).read_bytes(), name


def shard_lines(stdout: str) -> dict[int, int]:
    """Tensors each rank reports writing ("rank r of N, its shards: wrote ...: T tensors" / rank 0: all)."""
    counts = {}
    for line in stdout.splitlines():
        if "tensors" in line and "wrote" in line:
            rank = int(line.split()[1]) if line.startswith("rank ") else 0
            counts[rank] = int(line.split(": ", 2)[-1].split()[0].replace(",", ""))
    return counts


@pytest.fixture(scope="module")
def nested_dcp_with_head(sharded_model, tmp_path_factory) -> Path:
    """The sharded model converted nested with a future-predictor head, where flame keeps checkpoints."""
    out = tmp_path_factory.mktemp("exp") / "checkpoint" / "step-0"
    options = ConvertOptions(
        str(sharded_model),
        str(out),
        layout="nested",
        include_future_predictor=True,
        future_predictor_head_type="mlp",
        reference=False,
    )
    options.progress = False
    convert_hf_to_dcp(options)
    return out


def test_two_ranks_write_the_folder_one_process_writes(tiny_model, tiny_dcp, tmp_path):
    """``flame-ext to-hf`` under torchrun: bit-exact against one process and against the HF source."""
    single = one_process(tiny_dcp, tiny_model, tmp_path / "single", 0.3)
    out = tmp_path / "dist"
    args = ["--checkpoint", str(tiny_dcp), "--config", str(tiny_model), "--out", str(out), "--max-shard-mb", "0.3"]
    proc, _ = torchrun(2, "-m", "flame_ext.cli", "to-hf", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = shard_lines(proc.stdout)
    assert counts[1] > 0 and counts[0] == len(hf_tensors(single)) > counts[1]  # both ranks wrote shards
    assert len(list(out.glob("model-*.safetensors"))) > 2
    assert_same_folder(out, single)
    assert_bit_exact(out, tiny_model)  # every tensor of the source, bit for bit, same keys and dtypes
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_model / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "single"]  # no temporary folder or lock left


def test_three_ranks_nested_with_a_future_head(sharded_model, nested_dcp_with_head, tmp_path):
    """flame's drop-in under torchrun: the head (not part of the HF model) is left out with one note."""
    single = one_process(nested_dcp_with_head, sharded_model, tmp_path / "single", SHARD_MB)
    out = tmp_path / "dist"
    exp = nested_dcp_with_head.parent.parent
    args = ["--path", str(exp), "--step", "0", "--config", str(sharded_model), "--out", str(out)]
    proc, _ = torchrun(3, "-m", "flame_ext.convert_dcp_to_hf", *args, "--max_shard_mb", str(SHARD_MB))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(shard_lines(proc.stdout).get(r) for r in range(3)), proc.stdout
    head_notes = [x for x in proc.stdout.splitlines() if x.startswith("note: model.future_predictor")]
    assert head_notes and all("not part of the HF model" in x for x in head_notes)
    assert len(head_notes) == len({x.split(":")[1] for x in head_notes})  # said once, by rank 0
    assert_same_folder(out, single)
    assert_bit_exact(out, sharded_model)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(hf_tensors(sharded_model))


def test_non_finite_tensors_on_any_rank_are_named_once(sharded_model, tmp_path):
    """Each rank finds NaN/Inf in what it writes (from its fingerprints); rank 0 names them all, once."""
    import shutil

    model = Path(shutil.copytree(sharded_model, tmp_path / "model"))
    bad = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    for key, value in zip(bad, (float("nan"), float("inf"), float("-inf"))):
        _poison(model, key, value)
    checkpoint = tmp_path / "dcp"
    options = ConvertOptions(str(model), str(checkpoint), reference=False)
    options.progress = False
    convert_hf_to_dcp(options)
    out = tmp_path / "hf"
    plan = prepare_to_hf(ToHFOptions(str(checkpoint), str(model), str(out), max_shard_bytes=int(SHARD_MB * 2**20)))
    shares = split_by_bytes(range(len(plan.shards)), 2, plan.shard_bytes)
    on_rank = [{k for i in share for k in plan.shards[i]} for share in shares]
    assert all(set(bad) & keys for keys in on_rank), "the poisoned tensors should be written by both ranks"
    args = ["--checkpoint", str(checkpoint), "--config", str(model), "--out", str(out), "--max-shard-mb", str(SHARD_MB)]
    proc, _ = torchrun(2, "-m", "flame_ext.cli", "to-hf", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (warning,) = [x for x in proc.stderr.splitlines() if "hold NaN or Inf" in x]
    assert warning.startswith("warning: 3 tensors") and all(k in warning for k in bad), warning
    assert_bit_exact(out, model)  # copied as they are


def test_a_rank_killed_mid_write_leaves_nothing_and_stops_the_other(sharded_model, nested_dcp_with_head, tmp_path):
    out = tmp_path / "hf"
    args = ["--path", str(nested_dcp_with_head.parent.parent), "--step", "0", "--config", str(sharded_model)]
    args += ["--out", str(out), "--max_shard_mb", str(SHARD_MB), "--timeout_s", str(TIMEOUT_S)]
    nodes, elapsed = two_nodes(str(WORKER), "--to-hf", "--kill-rank", "1", "--", *args)
    assert_killed_rank_stopped_everything(nodes, elapsed, "convert_dcp_to_hf", out)


def test_a_rank_whose_write_fails_stops_every_rank(sharded_model, nested_dcp_with_head, tmp_path):
    out = tmp_path / "hf"
    args = ["--path", str(nested_dcp_with_head.parent.parent), "--step", "0", "--config", str(sharded_model)]
    args += ["--out", str(out), "--max_shard_mb", str(SHARD_MB)]
    proc, _ = torchrun(2, str(WORKER), "--to-hf", "--fail-rank", "1", "--", *args)
    assert proc.returncode != 0
    said = "writing its safetensors shards failed on rank 1: /injected/disk: No space left on device"
    assert said in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("No space left on device") == 2  # rank 1's own line, and rank 0 quoting it
    assert list(tmp_path.iterdir()) == []


def test_a_file_size_limit_on_one_rank_is_named_on_every_rank(sharded_model, nested_dcp_with_head, tmp_path):
    """``ulimit -f`` on rank 1 only: its shard's write fails with EFBIG; each rank's line names rank 1's shard and
    "File too large", both exit 1, nothing is left."""
    out = tmp_path / "hf"
    args = ["--path", str(nested_dcp_with_head.parent.parent), "--step", "0", "--config", str(sharded_model)]
    args += ["--out", str(out), "--max_shard_mb", str(SHARD_MB), "--timeout_s", str(TIMEOUT_S)]
    nodes, _ = two_nodes(str(WORKER), "--to-hf", "--fsize-on-rank", "1", str(16 * 1024), "--", *args)
    assert_every_rank_names_the_cause(nodes, "convert_dcp_to_hf", out)


@pytest.mark.parametrize(
    "flag, differ",
    [("--out", "--out"), ("--path", "--checkpoint, the source's files")],
    ids=["out", "checkpoint"],
)
def test_a_rank_given_other_paths_is_refused_before_anything_is_written(
    sharded_model, nested_dcp_with_head, tmp_path, flag, differ
):
    other = tmp_path / "other-exp"
    if flag == "--path":  # another checkpoint of the same model, stored as bfloat16
        options = ConvertOptions(str(sharded_model), str(other / "checkpoint" / "step-0"), dtype="bfloat16")
        options.reference, options.progress = False, False
        convert_hf_to_dcp(options)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    exp, out = nested_dcp_with_head.parent.parent, tmp_path / "hf"
    args = ["--path", str(exp), "--step", "0", "--config", str(sharded_model), "--out", str(out)]
    value = str(other) if flag == "--path" else str(tmp_path / "elsewhere")
    proc, _ = torchrun(2, str(WORKER), "--to-hf", "--arg-on-rank", "1", flag[2:], value, "--", *args)
    assert proc.returncode != 0
    said = f"rank 1 was started differently from rank 0 ({differ} differ)"
    assert proc.stderr.count(said) == 2, proc.stderr[-3000:]  # on both ranks
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert sorted(read_dcp_metadata(nested_dcp_with_head))  # the source is untouched and readable
    assert "flame_ext/" not in proc.stderr  # one line per rank: no traceback through our code
