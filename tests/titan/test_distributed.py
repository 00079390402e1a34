"""Two ranks under torchrun (gloo, FSDP2 via ``fully_shard``): one verdict for all, and no hang on failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from subprocess import PIPE

import pytest
from support.cli import valid_report
from support.titan_hosts import titan_generation
from support.torchrun import failure

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(titan_generation() not in ("0.1", "0.3"), reason="needs torchtitan 0.1.x or 0.3.x installed"),
]

WORKER = Path(__file__).parent / "dist_worker.py"
DEADLINE = 60.0  # seconds for a failing run to end every rank


def torchrun(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, float, list[dict]]:
    """``torchrun --standalone --nproc_per_node=2`` (a free port of its own); each rank's JSON result."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        "--out",
        str(out),
        *args,
    ]
    start = time.monotonic()
    # Ranks that hang (waiting in different collectives) are ended through torchrun, which passes SIGTERM on to
    # them (each rank has a session of its own: killing torchrun alone would leave them waiting), and what they
    # printed is kept for the failure message.
    with subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True, env=env) as run:
        try:
            stdout, stderr = run.communicate(timeout=DEADLINE + 30)
        except subprocess.TimeoutExpired:
            run.send_signal(signal.SIGTERM)
            stdout, stderr = run.communicate(timeout=60)
    proc = subprocess.CompletedProcess(cmd, run.returncode, stdout, stderr)
    elapsed = time.monotonic() - start
    results = [
        json.loads((out / f"rank-{r}.json").read_text()) if (out / f"rank-{r}.json").is_file() else None
        for r in range(2)
    ]
    return proc, elapsed, results


def test_two_ranks_pass_together_on_a_healthy_checkpoint(healthy, tiny_model, tmp_path):
    proc, _, results = torchrun(tmp_path, "--hf", str(tiny_model), "--checkpoint", str(healthy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(r is not None and r["ok"] for r in results), proc.stderr[-3000:]
    losses = [valid_report(r["report"])["loss"] for r in results]
    assert losses[0] == losses[1]  # the same figures on both ranks
    assert abs(losses[0]["delta"]) < 0.01
    # each token's loss, added up over both ranks, matches its reference (pooled, not doubled)
    assert losses[0]["token_delta"] < 1e-4 and losses[0]["token_threshold"] == 0.1
    # every tensor's fingerprint, summed from both ranks' FSDP shards, is the one recorded at conversion
    verified = [line for line in proc.stderr.splitlines() if "verified the values of" in line]
    assert len(verified) == 2 and all("on 2 rank(s): 0 differ" in line for line in verified), verified


def test_two_ranks_stop_a_damage_the_loss_gate_passes(healthy, tiny_model, tmp_path):
    """o_proj scaled by 0.9 moves the step-0 loss by far less than 0.1: only the fingerprints see it."""
    import torch
    from _models import rewrite_dcp

    key = "model.layers.0.self_attn.o_proj.weight"
    damaged = rewrite_dcp(healthy, tmp_path / "scaled", lambda sd: {**sd, key: sd[key] * torch.tensor(0.9)})
    proc, elapsed, results = torchrun(tmp_path / "run", "--hf", str(tiny_model), "--checkpoint", str(damaged))
    assert proc.returncode != 0 and elapsed < DEADLINE, proc.stderr[-3000:]
    assert [r["kinds"] for r in results] == [["value_mismatch"]] * 2, proc.stderr[-3000:]
    for r in results:
        (problem,) = r["report"]["problems"]
        assert problem["key"] == key and "scaled by 0.9" in problem["detail"]
        assert abs(r["report"]["loss"]["delta"]) < 0.1  # the loss gate alone would have let it through


def test_a_broken_checkpoint_ends_both_ranks_within_60s(swapped, tiny_model, tmp_path):
    proc, elapsed, results = torchrun(tmp_path, "--hf", str(tiny_model), "--checkpoint", str(swapped))
    assert proc.returncode != 0 and elapsed < DEADLINE, proc.stderr[-3000:]
    # each rank reached the verdict itself (result written just before it raised) and raised it
    assert [r["kinds"] for r in results] == [["loss_gap", "value_mismatch"]] * 2
    for rank in (0, 1):
        assert f"[rank{rank}]: flame_ext.guard.InitialLoadValidationError" in proc.stderr


def test_a_wrong_buffer_on_one_rank_fails_every_rank(healthy, tiny_model, tmp_path):
    """Only rank 1 has uninitialised RoPE: rank 0 must not carry on alone (it would wait in step 1)."""
    proc, elapsed, results = torchrun(
        tmp_path, "--hf", str(tiny_model), "--checkpoint", str(healthy), "--poison-rank", "1", "--no-repair"
    )
    assert proc.returncode != 0 and elapsed < DEADLINE, proc.stderr[-3000:]
    assert all(r is not None and not r["ok"] for r in results), proc.stderr[-3000:]
    for r in results:
        assert "buffer_mismatch" in r["kinds"]
        details = [p["detail"] for p in r["report"]["problems"] if p["kind"] == "buffer_mismatch"]
        assert all("on rank 1 of 2" in d for d in details)
    assert results[0]["report"] == results[1]["report"]


@pytest.mark.parametrize("blind", [1, 0])
def test_every_rank_checks_against_rank_0s_manifest_whichever_rank_cannot_see_it(blind, healthy, tiny_model, tmp_path):
    """A shared file system that shows the manifest to some nodes later. Rank 1 not seeing it: both verify against
    rank 0's (ranks that each read their own stopped both, over a manifest error "on rank 1 of 2"). Rank 0 not seeing
    it: both stop before loading with the same report, the missing reference as both decided from it."""
    args = ["--hf", str(tiny_model), "--checkpoint", str(healthy), "--view-rank", str(blind), "--view", "no-manifest"]
    proc, elapsed, results = torchrun(tmp_path, *args)
    assert elapsed < DEADLINE and all(r is not None for r in results), failure(proc)
    if blind == 1:
        assert proc.returncode == 0, failure(proc)
        for r in results:
            assert r["ok"] and any("values: 25 of 25 tensors verified" in n for n in r["report"]["notes"]), r
    else:
        assert proc.returncode != 0 and [r["kinds"] for r in results] == [["manifest"]] * 2, failure(proc)
        (problem,) = results[0]["report"]["problems"]
        assert f"view-0/{healthy.name}/flame_ext.json does not exist" in problem["detail"], problem
        assert "on rank" not in problem["detail"]  # not one rank's finding: the one both decided from
    assert results[0]["report"] == results[1]["report"]


@pytest.mark.parametrize("stale", [1, 0])
def test_a_rank_that_sees_a_manifest_without_fingerprints_checks_against_rank_0s(stale, healthy, tiny_model, tmp_path):
    """The manifest being replaced: one rank still sees the older one, without fingerprints. Ranks that each read
    their own waited in different collectives (only one entered the value check's) until killed."""
    args = [
        "--hf",
        str(tiny_model),
        "--checkpoint",
        str(healthy),
        "--view-rank",
        str(stale),
        "--view",
        "stale-manifest",
    ]
    proc, elapsed, results = torchrun(tmp_path, *args)
    assert proc.returncode == 0 and elapsed < DEADLINE, failure(proc)
    verified = "values: 25 of 25 tensors verified" if stale == 1 else "the manifest has no fingerprints"
    for r in results:
        assert r["ok"] and any(verified in n for n in r["report"]["notes"]), r
    assert results[0]["report"] == results[1]["report"]


def test_checkpoint_metadata_rank_0_cannot_read_stops_both_ranks_naming_it(healthy, tiny_model, tmp_path):
    """Each rank reads the metadata of the checkpoint it loads (a rank given another checkpoint is found by the
    pooled key check, tests/reliability/test_ranks.py); one rank that cannot read it stops every rank, named."""
    args = ["--hf", str(tiny_model), "--checkpoint", str(healthy), "--view-rank", "0", "--view", "torn-metadata"]
    proc, elapsed, results = torchrun(tmp_path, *args)
    assert proc.returncode != 0 and elapsed < DEADLINE, failure(proc)
    torn = f"view-0/{healthy.name}/.metadata"
    (own,) = [line for line in proc.stderr.splitlines() if line.startswith("[rank0]: flame_ext.errors.")]
    assert torn in own, own
    (quoted,) = [line for line in proc.stderr.splitlines() if line.startswith("[rank1]: flame_ext.guard.Initial")]
    assert "reading the checkpoint metadata failed on rank 0: " in quoted and torn in quoted, quoted
