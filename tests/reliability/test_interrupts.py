"""Interrupted work: a conversion killed at any moment leaves the destination absent or complete, never partial.

Each trial starts ``convert`` (HF -> DCP, half of them with the reference loss) or ``to-hf`` (DCP -> HF) on an
8-shard model with small write blocks (~75 files), kills it with SIGKILL, SIGINT, SIGTERM or SIGHUP after a
delay drawn by a seeded random generator (2-110 % of the last uncut run's duration, so the kill points cover
planning, writing, the reference loss and the rename on any machine), and then checks what a user would check:
the destination is absent, or it loads strictly and is bit-identical to the source; a run stopped by SIGINT,
SIGTERM or SIGHUP exits 128 + the signal number and leaves nothing beside the destination; what a SIGKILL
leaves is named after the dead run and is not taken by torchtitan for a saved step; and the same command run
again succeeds and leaves nothing beside the destination. Some trials replace an existing checkpoint
(``--force``): then the old checkpoint must survive until the new one is complete. Also here: a write failure
(file size limit) and two runs started at once into one destination.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from flame_ext.io.destination import lock_path, temp_prefix
from flame_ext.process import TERMINATING_SIGNALS
from tests.reliability._rel import TEMP_MARK, Result, assert_dcp_is, assert_hf_is, hf_tensors, siblings

SEED = 6  # the issue number: any fixed seed makes the kill points reproducible
CONVERT_TRIALS = 12
TO_HF_TRIALS = 12


@pytest.fixture(scope="module")
def source_tensors(big_model):
    """The HF model's tensors: what a DCP made from it must hold, and what an HF folder made back must hold."""
    return hf_tensors(big_model)


def _convert_argv(model: Path, dest: Path, force: bool, reference: bool = True) -> list[str]:
    """A conversion in 1 MiB blocks; with ``reference`` the default one, which loads and runs the HF model for
    the reference loss after the tensors are written (the longest last step on a big model)."""
    ref = ["--reference-seq-len", "32"] if reference else ["--no-reference"]
    return ["convert", "--model", str(model), "--checkpoint", str(dest), *ref, "--buffer-mb", "1"] + ["--force"] * force


def _to_hf_argv(ckpt: Path, config: Path, dest: Path, force: bool) -> list[str]:
    return ["to-hf", "--checkpoint", str(ckpt), "--config", str(config), "--out", str(dest), "--max-shard-mb", "1"] + [
        "--force"
    ] * force


def _check_leftovers(dest: Path, dead_pid: int) -> list[str]:
    """What a killed run may leave beside ``dest``: its own temporary folder and the lock file, named as such."""
    left = siblings(dest)
    tmp = temp_prefix(dest)
    allowed = {f"{tmp}{dead_pid}", f"{tmp}{dead_pid}-old", lock_path(dest).name}
    assert set(left) <= allowed, f"unexpected files beside {dest.name}: {sorted(set(left) - allowed)}"
    return left


def _step_torchtitan_finds(folder: Path) -> int | None:
    """The step the installed torchtitan would resume from in ``folder`` (its own scan), None without torchtitan.

    A leftover named like ``step-0`` and holding a ``.metadata`` would be taken for a saved step.
    """
    try:
        from torchtitan.components.checkpoint import CheckpointManager
    except ImportError:
        return None
    return CheckpointManager._find_load_step(None, str(folder))  # a scan of ``folder``; ``self`` is not used


def _inspect(
    r: Result, sig: signal.Signals, force: bool, dest: Path, check: Callable[[Path], None], stats: Counter
) -> None:
    """What a killed run left: its exit, the destination (absent or complete), and what is beside it."""
    stats[f"{sig.name}:{'finished' if r.returncode == 0 else 'killed'}"] += 1
    handled = sig in (signal.SIGINT, *TERMINATING_SIGNALS)
    if handled and r.returncode != 0 and "run_guarded" not in r.stderr and r.returncode != 128 + sig:
        # The signal came while the interpreter was still importing the command's module, before flame-ext's
        # code ran (Python's own KeyboardInterrupt traceback, or the default SIGTERM/SIGHUP action):
        # nothing can have been written yet.
        assert "KeyboardInterrupt" in r.stderr or r.returncode == -sig, (
            f"{sig.name}: exit {r.returncode}\n{r.stderr[-3000:]}"
        )
        stats[f"{sig.name}:during interpreter start-up"] += 1
        assert not dest.exists() or force, "a run interrupted before it started left a destination"
    elif handled and r.returncode != 0:
        assert r.returncode == 128 + sig, f"{sig.name}: exit {r.returncode}\n{r.stderr[-3000:]}"
        # The last line says so (transformers may have drawn a progress bar before it); no traceback.
        assert "Traceback" not in r.stderr and f"interrupted by {sig.name}" in r.err_lines[-1], r.stderr[-3000:]
        assert siblings(dest) == [], f"{sig.name} left {siblings(dest)}: it must clean up as Ctrl-C does"
        stats[f"{sig.name}: cleaned up (nothing beside the destination)"] += 1
    elif sig == signal.SIGKILL and r.returncode != 0:
        assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    else:
        assert r.returncode == 0, r.stderr[-3000:]
    if force:
        assert dest.exists(), "a killed --force run lost the checkpoint it was replacing"
    if dest.exists():
        check(dest)  # complete and bit-exact, whether old or new
        stats["destination complete"] += 1
    else:
        stats["destination absent"] += 1
    left = _check_leftovers(dest, r.pid)
    if dest.name == "step-0" and not dest.exists():
        assert _step_torchtitan_finds(dest.parent) in (-1, None), f"torchtitan takes {left} for a saved step"
    stats["runs that left a named temporary"] += any(TEMP_MARK in name for name in left)
    stats["of them with all data written (killed in the last step)"] += any(
        (dest.parent / name / ".metadata").is_file() or (dest.parent / name / "config.json").is_file() for name in left
    )


def _kill_trials(
    forkserver,
    argv: Callable[[Path, bool, bool], list[str]],
    dest: Path,
    check: Callable[[Path], None],
    trials: int,
    rng: random.Random,
) -> dict:
    """Run ``trials`` kill / inspect / re-run rounds; returns what happened (the figures in docs/reliability.md)."""
    full = {}  # duration of the last uncut run, with and without the last step
    for last_step in (False, True):
        t0 = time.monotonic()
        r = forkserver.run(*argv(dest, last_step, last_step))
        full[last_step] = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        check(dest)
    stats: Counter = Counter()
    fractions = []
    for _ in range(trials):
        sig = rng.choice([signal.SIGKILL, signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
        force = rng.random() < 0.35  # replace the existing (complete) checkpoint instead of writing a fresh one
        last_step = rng.random() < 0.5  # convert: also record the reference loss (a long last step on big models)
        if not force:
            shutil.rmtree(dest)
        fraction = rng.uniform(0.02, 1.1)  # of the last uncut run's duration: kill points track the machine's speed
        fractions.append(round(fraction, 3))
        child = forkserver.spawn(*argv(dest, force, last_step))
        time.sleep(fraction * full[last_step])
        os.kill(child.pid, sig)  # a finished child is a zombie until waited for: the signal is then a no-op
        _inspect(forkserver.wait(child), sig, force, dest, check, stats)
        # The same command again (with --force when the killed run had finished) succeeds and cleans up.
        t0 = time.monotonic()
        again = forkserver.run(*argv(dest, dest.exists(), last_step))
        full[last_step] = time.monotonic() - t0
        assert again.returncode == 0, again.stderr[-3000:]
        check(dest)
        assert siblings(dest) == [], f"the next run left {siblings(dest)} beside {dest}"
    # Every trial asserted "absent or complete and bit-exact" (and the old checkpoint kept under --force), so
    # reaching this line means no trial lost or corrupted a file.
    return {
        "trials": trials,
        "seconds_per_uncut_run": [round(t, 2) for t in full.values()],
        "kill_points_as_fraction_of_a_run": fractions,
        **stats,
        "files lost": 0,
    }


@pytest.mark.slow
def test_convert_survives_kills(forkserver, big_model, source_tensors, tmp_path, figures):
    dest = tmp_path / "exp" / "checkpoint" / "step-0"
    stats = _kill_trials(
        forkserver,
        lambda d, f, ref: _convert_argv(big_model, d, f, ref),
        dest,
        lambda d: assert_dcp_is(d, source_tensors),
        CONVERT_TRIALS,
        random.Random(SEED),
    )
    figures["kills_convert"] = stats


@pytest.mark.slow
def test_to_hf_survives_kills(forkserver, big_model, big_dcp, source_tensors, tmp_path, figures):
    dest = tmp_path / "hf-out"
    stats = _kill_trials(
        forkserver,
        lambda d, f, ref: _to_hf_argv(big_dcp, big_model, d, f),
        dest,
        lambda d: assert_hf_is(d, source_tensors),
        TO_HF_TRIALS,
        random.Random(SEED + 1),
    )
    figures["kills_to_hf"] = stats


@pytest.mark.parametrize("command", ["convert", "to-hf"])
def test_write_failure_is_one_clear_line_and_no_output(command, forkserver, big_model, big_dcp, tmp_path, figures):
    """A file size limit (RLIMIT_FSIZE, as a full disk or quota would) stops the run: one line, nothing left."""
    dest = tmp_path / "out" / "result"
    dest.parent.mkdir()
    argv = (
        _convert_argv(big_model, dest, False) if command == "convert" else _to_hf_argv(big_dcp, big_model, dest, False)
    )
    r = forkserver.run(*argv, fsize=256 * 1024)  # every data file of these runs is larger
    figures.setdefault("write_failures", []).append(command)
    assert r.returncode == 1, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and len(r.err_lines) == 1, r.stderr[-3000:]
    assert os.strerror(errno.EFBIG) in r.err_lines[0], r.err_lines[0]
    assert not dest.exists(), "a failed write must not leave a destination"
    assert siblings(dest) == [], f"a failed write left {siblings(dest)}"
    assert sorted(p.name for p in dest.parent.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", ["convert", "to-hf"])
def test_two_runs_into_one_destination(command, forkserver, big_model, big_dcp, source_tensors, tmp_path, figures):
    """Started together (or one just after the other): one wins, the other fails clearly, the result is whole."""
    rng = random.Random(SEED + 2)
    check = (
        (lambda d: assert_dcp_is(d, source_tensors))
        if command == "convert"
        else (lambda d: assert_hf_is(d, source_tensors))
    )
    outcomes = []
    for round_no, stagger in enumerate([0.0, 0.0, rng.uniform(0.02, 0.3)]):
        dest = tmp_path / f"round{round_no}" / "dest"
        argv = (
            _convert_argv(big_model, dest, False)
            if command == "convert"
            else _to_hf_argv(big_dcp, big_model, dest, False)
        )
        first = forkserver.spawn(*argv)
        time.sleep(stagger)
        second = forkserver.spawn(*argv)
        results = [forkserver.wait(first), forkserver.wait(second)]
        codes = sorted(r.returncode for r in results)
        assert codes == [0, 2], [(r.returncode, r.stderr[-2000:]) for r in results]
        loser = next(r for r in results if r.returncode == 2)
        assert len(loser.err_lines) == 1 and "Traceback" not in loser.stderr, loser.stderr
        line = loser.err_lines[0]
        reasons = [w for w in ("another flame-ext run", "already exists", "appeared while") if w in line]
        assert str(dest) in line and reasons, line
        outcomes.append(reasons[0])
        check(dest)
        assert siblings(dest) == [], f"left beside the destination: {siblings(dest)}"
    figures.setdefault("concurrent_runs", {})[command] = outcomes
