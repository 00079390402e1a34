"""A resume, verified: the state a run resumes from is the state it saved at that step, and its buffers are right.

Host-independent: the torchtitan adapters decide when a load is a resume and hand over what it loaded, as DCP
keys (``io.training_state``): the live model and optimizer state (what the manager would save now) and the
other states as the load read them (``LoadCapture``). Each rank fingerprints its shards, one all-reduce gives
the whole, and the comparison with the save-time record (``guard.save_record``) is the one ``diagnose`` uses
(``checks.saved_state``, built on the first load's ``fingerprints.compare``); non-tensor states are compared by
digest, rank by rank. The
world size may differ from the save's: fingerprints do not depend on the sharding.

Other states are taken as read rather than re-serialised after the load: a dataloader's ``state_dict()``
starts its iterator (and workers) and need not give back the same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flame_ext.errors import CheckpointFormatError, InputError, ResumeValidationError
from flame_ext.guard.metrics import record_figures
from flame_ext.guard.options import GuardConfig
from flame_ext.guard.ranks import (
    RankFailure,
    agreed,
    gather,
    pool,
    rank,
    rank_0s,
    stopping_as,
    sum_over_ranks,
    world,
)
from flame_ext.guard.save_record import step_of
from flame_ext.process import report_without_traceback
from flame_ext.report import Problem, Report

__all__ = ["LoadCapture", "read_record_ahead", "verify_resume", "check_loaded_buffers"]

logger = logging.getLogger("flame_ext.guard")  # the name users filter the guard's log lines by


class LoadCapture:
    """What a load read into the states that are not re-read live, keyed as DCP keys them.

    ``wrap`` returns the state dict to hand to ``dcp.load`` with those Stateful entries wrapped: each wrapper
    passes ``state_dict``/``load_state_dict`` through and keeps what it was given to load. Plain entries are
    filled in place by DCP and read back from the same dict by ``read``.
    """

    def __init__(self) -> None:
        self._given: dict[str, Any] = {}
        self._states: dict[str, Any] = {}

    def wrap(self, states: dict[str, Any], live: Iterable[str]) -> dict[str, Any]:
        from torch.distributed.checkpoint.stateful import Stateful

        skip = set(live)
        self._states = states
        for name, value in list(states.items()):
            if name not in skip and isinstance(value, Stateful) and not isinstance(value, torch.Tensor):
                states[name] = _Capturing(value, name, self._given)
        return states

    def read(self, names: Iterable[str]) -> dict[str, Any]:
        """DCP keys -> loaded values of the entries ``names`` (wrapped ones as given, plain ones as filled)."""
        from flame_ext.io.training_state import flatten_state

        picked = {}
        for name in names:
            if name in self._given:
                picked[name] = self._given[name]
            elif name in self._states and not isinstance(self._states[name], _Capturing):
                picked[name] = self._states[name]
        return flatten_state(picked)


class _Capturing:
    """A Stateful passed through, keeping the state dict it is asked to load."""

    def __init__(self, inner: Any, name: str, given: dict[str, Any]) -> None:
        self.inner, self.name, self.given = inner, name, given

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.given[self.name] = state_dict
        self.inner.load_state_dict(state_dict)


def check_loaded_buffers(parts: list[nn.Module], *, repair: bool, checkpoint: str, notes: list[str]) -> list[Problem]:
    """``checks.nonpersistent_buffers.check_buffers`` on every part after a load (each repair logged, naming the
    checkpoint)."""
    from flame_ext.checks.nonpersistent_buffers import check_buffers

    problems: list[Problem] = []
    for part in parts:
        found, repaired = check_buffers(part, repair=repair, after=checkpoint)
        problems += found
        notes += [f"repaired non-persistent buffer {key} (wrong after loading)" for key in repaired]
    return problems


def read_record_ahead(config: GuardConfig, checkpoint: str) -> Future | None:
    """The save-time record of ``checkpoint``, read and schema-checked in a thread while the host loads (for
    ``verify_resume(record=...)``); None when resumes are not verified, and on every rank but 0, whose record
    ``verify_resume`` gives the others."""
    if not config.verify_resumes or rank() != 0:
        return None
    future: Future = Future()

    def read() -> None:
        try:
            future.set_result(read_step_record(checkpoint))
        except BaseException as exc:  # noqa: BLE001 -- handed to verify_resume, on the caller's thread
            future.set_exception(exc)

    threading.Thread(target=read, name="flame-ext-read-record", daemon=True).start()
    return future


def verify_resume(
    config: GuardConfig,
    checkpoint: str,
    parts: list[nn.Module],
    loaded: Callable[[], Mapping[str, Any]],
    *,
    groups: Callable[[str], str],
    metric_logger: Any = None,
    pipelined: bool = False,
    record: Future | None = None,
) -> tuple[Report, dict[str, float]]:
    """Buffers, then every loaded tensor and state against the save-time record; raises
    ``ResumeValidationError`` on every rank alike when anything differs. Returns the report and the figures.

    ``loaded`` gives this rank's loaded state as DCP keys (called only when values are verified); ``groups``
    tells a key's kind (model, optimizer, state). ``pipelined``: under pipeline parallel each rank holds other
    keys, so there is no common sum: the buffers only, with a warning. ``record``: the save-time record read
    ahead (``read_record_ahead``), else it is read here. ALL ranks must call it: it holds collectives.
    """
    if pipelined and config.verify_resumes:
        config = dataclasses.replace(config, verify_resumes=False)
        logger.warning("flame-ext: resume from %s: values not verified under pipeline parallel", checkpoint)
    check = _ResumeCheck(config, checkpoint, parts)
    start = time.perf_counter()
    if config.check_buffers_on_every_load:
        repair = config.initial_load_repair_buffers
        problems = check.agreed(
            lambda: check_loaded_buffers(parts, repair=repair, checkpoint=checkpoint, notes=check.report.notes),
            "the buffer check",
        )
        check.report.extend(pool(problems))
        check.report.checked.append("buffers")
    if config.verify_resumes:
        check.values(loaded, groups, record)
    check.figures["resume/seconds"] = time.perf_counter() - start
    record_figures(metric_logger, check.figures, check.step or 0)
    check.verdict()
    return check.report, check.figures


class _ResumeCheck:
    def __init__(self, config: GuardConfig, checkpoint: str, parts: list[nn.Module]) -> None:
        self.config, self.checkpoint, self.parts = config, checkpoint, parts
        self.report = Report()
        self.figures: dict[str, float] = {}
        self.step = step_of(checkpoint)

    def agreed(self, step: Callable[[], Any], what: str) -> Any:
        return stopping_as(self._stopped, agreed, step, what)

    def rank_0s(self, step: Callable[[], Any], what: str) -> Any:
        return stopping_as(self._stopped, rank_0s, step, what)

    def _stopped(self, failure: RankFailure) -> ResumeValidationError:
        return ResumeValidationError(f"resume validation of {self.checkpoint} stopped: {failure}", self.report)

    def values(
        self, loaded: Callable[[], Mapping[str, Any]], groups: Callable[[str], str], ahead: Future | None
    ) -> None:
        read = ahead.result if ahead is not None else lambda: read_step_record(self.checkpoint)
        # Every rank verifies against rank 0's record. Ranks reading the file each may not see the same thing (a
        # shared file system that shows the file to some nodes later; a save in this process whose record rank 0
        # is still writing), and ranks that then decided differently would wait in different collectives.
        record, why = self.rank_0s(read, "reading the save-time record")
        if record is None:
            if why is not None:
                line = f"{self.checkpoint} could not be verified (no save-time record: {why})"
                logger.warning("flame-ext: resume from %s; training goes on", line)
                self.report.notes.append(line)
            return
        if isinstance(record, Problem):
            self.report.extend([record])
            return
        state = self.agreed(lambda: dict(loaded()), "reading the loaded state")
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        recorded = record["fingerprints"]["tensors"]
        union = sorted({k for each in gather(sorted(tensors)) for k in each if k in recorded})  # one order everywhere
        totals = self._observed(union, tensors)
        keys = [k for k in union if k in tensors]
        observed = {k: totals[k] for k in keys}
        checked = [k for k in others if k in record.get("digests", {})]

        def compare() -> list[Problem]:
            from flame_ext.checks.saved_state import saved_state_problems
            from flame_ext.io.specs import dtype_name
            from flame_ext.io.training_state import state_digest

            return saved_state_problems(
                record,
                observed,
                {k: tuple(tensors[k].shape) for k in keys},
                stored_dtypes={k: dtype_name(tensors[k].dtype) for k in keys},
                digests={k: state_digest(others[k]) for k in checked},
                group=groups,
            )

        self.report.extend(pool(self.agreed(compare, "the value check")))
        self.report.checked.append("values")
        mismatched = sum(1 for p in self.report.errors if p.kind == "value_mismatch")
        self.figures.update({"resume/tensors_verified": len(keys), "resume/value_mismatches": mismatched})
        line = (
            f"values: {len(keys)} of {len(tensors)} tensors verified against the save-time record of step "
            f"{self.step}, {len(checked)} of {len(others)} other states by digest; {mismatched} differ"
        )
        self.report.notes.append(line)
        partial = len(keys) < len(tensors) or len(checked) < len(others)
        (logger.warning if partial else logger.info)(
            "flame-ext: resume from %s: %s%s",
            self.checkpoint,
            line,
            " (the rest have no record: saved by another tool or version)" if partial else "",
        )

    def _observed(self, keys: list[str], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each tensor's whole fingerprint: every rank's share of its shards (as loaded, no cast), one all-reduce.
        ``keys`` are the same on every rank; a rank without one of them adds nothing to it."""
        from flame_ext.fingerprints.algorithm import TERMS, local_fingerprint

        def shares() -> torch.Tensor:
            none = torch.zeros(len(TERMS), dtype=torch.float64)
            parts = [local_fingerprint(tensors[k]) if k in tensors else none for k in keys]
            return torch.stack(parts) if parts else torch.zeros(0, len(TERMS), dtype=torch.float64)

        return dict(zip(keys, sum_over_ranks(self.agreed(shares, "the value check"))))

    def verdict(self) -> None:
        if self.report.ok:
            logger.info(
                "flame-ext: resume from %s validated (%s)", self.checkpoint, ", ".join(self.report.checked) or "nothing"
            )
            return
        logger.error("flame-ext resume report: %s", self.report.to_json(indent=None))
        report_without_traceback()
        summary = self.report.render_text(
            group_hints=True, more="all of them in the JSON record logged as 'flame-ext resume report'"
        )
        errors = self.report.errors
        raise ResumeValidationError(
            f"resume from {self.checkpoint} failed validation on rank {rank()} of {world()} "
            f"({len(errors)} error{'s' if len(errors) != 1 else ''}; stopped before the next step):\n{summary}",
            self.report,
        )


def read_step_record(folder: str) -> tuple[dict[str, Any] | Problem | None, str | None]:
    """``checks.saved_state.step_record``, with a record that is there but unreadable as a ``manifest`` problem."""
    from flame_ext.checks.saved_state import step_record
    from flame_ext.io.manifest import MANIFEST_NAME

    try:
        return step_record(folder)
    except (CheckpointFormatError, InputError) as exc:
        return (
            Problem(
                "manifest",
                "error",
                str(Path(folder) / MANIFEST_NAME),
                f"the save-time record cannot be read: {exc}",
                "it was damaged or edited after the save: restore it from a copy, or delete it to resume unverified",
            ),
            None,
        )
