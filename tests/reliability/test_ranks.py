"""Many ranks: the training guard ends every rank together, and a lost rank cannot hang the others.

Two ranks on gloo (CPU), the installed torchtitan's real checkpoint manager with the guard switched on, a
checkpoint converted by flame-ext. Faults are put on rank 1 only (see ``rank_worker.py``): another checkpoint,
another loss, death or a freeze inside the guard's forward pass. A verdict taken on one rank alone would leave
the other waiting in its next collective until the process group's timeout, or forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from support.cli import valid_report

from tests.reliability._rel import HERE, Result, dcp_keys, dcp_load

pytestmark = pytest.mark.slow

WORKER = HERE / "rank_worker.py"
DEADLINE = 60.0  # seconds for a failing load to end every rank (the bound)
PG_TIMEOUT = 10.0  # the process group's timeout in the lost-rank tests
SLACK = 5.0  # process exit, interpreter teardown, a loaded CI machine


def _titan() -> str | None:
    try:
        from flame_ext.titan import generation

        return generation()
    except ImportError:
        return None


if _titan() is None:
    pytestmark = [pytestmark, pytest.mark.skip(reason="needs torchtitan 0.1.x or 0.3.x (the guard's hosts)")]


@pytest.fixture(scope="module")
def guarded(forkserver, small_model, tmp_path_factory) -> Path:
    """The small model converted with its reference loss recorded (what the guard checks against)."""
    out = tmp_path_factory.mktemp("ranks") / "step-0"
    r = forkserver.run("convert", "--model", small_model, "--checkpoint", out, "--reference-seq-len", "64")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def foreign(guarded, tmp_path_factory) -> Path:
    """A copy of ``guarded`` that lost a key: what a rank reading a stale or half-copied checkpoint sees."""
    import torch.distributed.checkpoint as dcp

    keys = dcp_keys(guarded)
    sd = dcp_load(guarded, {k: v for k, v in keys.items() if k != "model.norm.weight"})
    out = tmp_path_factory.mktemp("ranks") / "foreign"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... save in a single process": yes
        dcp.save(sd, checkpoint_id=str(out), no_dist=True)
    shutil.copy2(guarded / "flame_ext.json", out / "flame_ext.json")
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def _results(out: Path, scenario: str) -> list[dict | None]:
    return [json.loads(f.read_text()) if (f := out / f"rank-{r}-{scenario}.json").is_file() else None for r in range(2)]


def _assert_same_verdict(results: list[dict | None], kind: str) -> None:
    """Each rank reached the verdict itself, within the deadline, and it is the same one."""
    assert all(r is not None for r in results), results
    for r in results:
        assert r["event"] == "raised" and r["error"] == "InitialLoadValidationError", r.get("traceback")
        assert r["t"] - r["t_load"] < DEADLINE, f"rank {r['rank']} took {r['t'] - r['t_load']:.1f}s"
    # The pooled problems, the counts printed beside them, and the verdict.
    same = [{k: valid_report(r["report"])[k] for k in ("ok", "problems", "counts", "loss")} for r in results]
    assert same[0] == same[1], "the ranks disagree on what is wrong"
    assert kind in {p["kind"] for p in results[0]["report"]["problems"] if p["severity"] == "error"}, results[0][
        "report"
    ]


@pytest.fixture(scope="module")
def torchrun_faults(small_model, guarded, foreign, tmp_path_factory) -> tuple[subprocess.CompletedProcess, float, Path]:
    """One torchrun job, two ranks, two guarded loads: rank 1 with another checkpoint, then with another loss."""
    out = tmp_path_factory.mktemp("torchrun")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        "--out",
        str(out),
        "--hf",
        str(small_model),
        "--checkpoint",
        str(guarded),
        "--other-checkpoint",
        str(foreign),
        "--scenario",
        "checkpoint",
        "--scenario",
        "loss",
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=2 * DEADLINE + 60)
    return proc, time.monotonic() - start, out


def test_a_rank_with_another_checkpoint_ends_both(torchrun_faults, figures):
    proc, elapsed, out = torchrun_faults
    results = _results(out, "checkpoint")
    _assert_same_verdict(results, "missing_key")
    missing = [p for p in results[0]["report"]["problems"] if p["kind"] == "missing_key"]
    assert any("rank 1" in p["detail"] for p in missing), missing  # rank 0 learns where the fault is
    figures.setdefault("ranks", {})["another checkpoint on rank 1"] = (
        f"both raised InitialLoadValidationError {max(r['t'] - r['t_load'] for r in results):.2f}s into the load"
    )


def test_a_rank_with_another_loss_ends_both(torchrun_faults, figures):
    proc, elapsed, out = torchrun_faults
    results = _results(out, "loss")
    _assert_same_verdict(results, "loss_gap")
    assert proc.returncode != 0, "the job went on after a failed initial load"
    figures.setdefault("ranks", {})["another loss on rank 1"] = (
        f"both raised InitialLoadValidationError {max(r['t'] - r['t_load'] for r in results):.2f}s into the load"
    )


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports, chosen while all are held: ports asked for one at a time, each socket closed
    before the next, can come back equal, and two jobs on one port joined each other's process group
    (EADDRINUSE in one job, the other's rank 1 never reaching its forward pass)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def lost_rank_jobs(forkserver, small_model, guarded, tmp_path_factory) -> dict[str, tuple[Path, Result, float]]:
    """Two two-rank jobs at once: rank 1 killed in the guard's forward pass in one, frozen in the other.

    The ranks are plain processes (forked with torch already imported, then each its own gloo rank), not
    torchrun's workers: torchrun's agent would end the survivor itself when a rank dies, hiding whether the
    guard lets it go. Run together, because the frozen job spends most of its time waiting out the timeout.
    """
    jobs = {}
    for fault, port in zip(("kill", "freeze"), _free_ports(2)):
        out = tmp_path_factory.mktemp(fault)
        args = [
            "--out",
            out,
            "--hf",
            small_model,
            "--checkpoint",
            guarded,
            "--scenario",
            fault,
            "--pg-timeout",
            PG_TIMEOUT,
        ]
        jobs[fault] = (
            out,
            [forkserver.spawn(*args, script=str(WORKER), env=_rank_env(rank, port)) for rank in range(2)],
        )
    ended = {}
    try:
        for fault, (out, ranks) in jobs.items():
            ended[fault] = (out, forkserver.wait(ranks[0], timeout=150), time.time())
    finally:
        for _, ranks in jobs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(ranks[1].pid, signal.SIGKILL)  # a frozen rank 1 ends here (SIGKILL works on stopped processes)
            forkserver.wait(ranks[1], timeout=30)
    return ended


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_rank_lost_in_the_forward_pass_does_not_hang_the_other(fault, lost_rank_jobs, figures):
    """Rank 1 dies (or freezes) inside the guard's reference forward pass; rank 0 must end with an error within
    the process group's timeout of that moment, not wait for a rank that will never answer."""
    out, r0_run, ended0 = lost_rank_jobs[fault]
    lost, r0 = _results(out, fault)[1], _results(out, fault)[0]
    assert lost is not None and lost["event"] == f"{fault} in forward", f"rank 1 never reached the forward pass: {lost}"
    assert r0 is not None and r0["event"] == "raised", (
        f"rank 0 did not raise (exit {r0_run.returncode}):\n{r0_run.stderr[-3000:]}"
    )
    assert r0_run.returncode not in (0, -signal.SIGKILL), (
        f"rank 0: exit {r0_run.returncode} (-9: still waiting after 150 s)"
    )
    waited = r0["t"] - lost["t"]  # from rank 1's loss to rank 0's error
    assert waited < PG_TIMEOUT + SLACK, f"rank 0 raised {waited:.1f}s after rank 1 was lost (timeout {PG_TIMEOUT}s)"
    figures.setdefault("ranks", {})[f"rank 1 {fault} in forward"] = (
        f"rank 0 raised {r0['error']} {waited:.1f}s later and exited {ended0 - lost['t']:.1f}s later "
        f"(process group timeout {PG_TIMEOUT:.0f}s)"
    )
