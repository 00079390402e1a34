"""The save-time record: fingerprints of every tensor a training checkpoint saves, digests of the rest.

With the guard on, the validating checkpoint manager hands the exact state it gives DCP to ``record_save``
(every rank, main thread, while the saved values are the live ones). Each rank fingerprints its own shards
where they live (``fingerprints.algorithm.local_fingerprint``, values as stored, no cast) and digests its non-tensor
leaves (``io.training_state.state_digest``); one gather shares the key lists and digests, one all-reduce sums
the fingerprints. Rank 0 writes ``<step folder>/flame_ext.json`` (kind ``training_step``, atomically) only once
the DCP save has completed: at once for a synchronous save, else when the save's future completes (a
callback that only writes the file) or at the host's wait point, whichever comes first.

A key that the ranks hold with different non-tensor values (DCP keeps one of them) gets no digest: the
resume could not tell which was kept. Recording never stops a save: a failure is logged and the step
then resumes with the "no save-time record" warning.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flame_ext.collectives import agreed, gather
from flame_ext.guard.ranks import rank, sum_over_ranks, world

__all__ = ["StepRecord", "record_save", "step_of"]

logger = logging.getLogger("flame_ext.guard")  # the name users filter the guard's log lines by


class StepRecord:
    """One step's record, computed on every rank; rank 0 holds the manifest and writes it once.

    ``write_when_saved(result)`` with what the host's DCP call returned (None or the ``Metadata`` of a
    synchronous save, a ``Future`` or an ``AsyncSaveResponse`` for an async one); ``flush()`` at the host's
    wait points.
    """

    def __init__(self, folder: str, manifest: dict[str, Any] | None) -> None:
        self.folder = folder
        self.manifest = manifest  # None on ranks other than 0, or when recording failed
        self._future: Any = None
        self._lock = threading.Lock()
        self._written = False

    def write_when_saved(self, result: Any) -> None:
        future = getattr(result, "upload_completion", result)  # AsyncSaveResponse: the upload's future
        if not callable(getattr(future, "add_done_callback", None)):  # a synchronous save has completed
            self.write()
            return
        self._future = future
        if self.manifest is not None:
            future.add_done_callback(self._on_done)  # runs in the saving thread: writes a file, nothing else

    @property
    def waits(self) -> bool:
        """Whether the record waits for an async save to complete."""
        return self._future is not None and not self._written

    def flush(self) -> None:
        """Write now if the save has completed (a wait point); a failed save gets no record."""
        future = self._future
        if future is None or (future.done() and not future.cancelled() and future.exception() is None):
            self.write()

    def _on_done(self, future: Any) -> None:
        if future.cancelled() or future.exception() is not None:
            logger.warning("flame-ext: the save of %s did not complete; no save-time record written", self.folder)
            return
        self.write()

    def write(self) -> None:
        from flame_ext.io.manifest import write_manifest

        with self._lock:
            if self._written or self.manifest is None:
                return
            self._written = True
            try:
                path = write_manifest(Path(self.folder), self.manifest)
            except OSError as exc:  # the folder was purged or the disk is full: the resume will say "no record"
                logger.warning("flame-ext: could not write the save-time record in %s: %s", self.folder, exc)
                return
        logger.info("flame-ext: wrote the save-time record %s", path)


def step_of(checkpoint_id: str) -> int | None:
    """N of a ``.../step-N`` folder, else None."""
    match = re.fullmatch(r"step-(\d+)", str(checkpoint_id).rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def record_save(states: Mapping[str, Any], *, step: int, checkpoint: str) -> StepRecord:
    """Fingerprints and digests of ``states`` (what the host hands DCP: state dicts, not Statefuls).

    ALL ranks must call it, in the same order: it holds collectives.
    """
    from flame_ext.io.training_state import flatten_state, group_of

    start = time.perf_counter()
    entries = [k for k, v in states.items() if not isinstance(v, torch.Tensor)]
    try:
        flat = agreed(lambda: flatten_state(states), "recording the saved state")
        local = agreed(lambda: _local_record(flat), "fingerprinting the saved state")
    except Exception as exc:  # noqa: BLE001 -- a record must never stop a save (RankFailure included)
        logger.warning("flame-ext: no save-time record for %s: %s", checkpoint, exc)
        return StepRecord(checkpoint, None)
    shares, dtypes, digests = local
    everyone = gather({"keys": sorted(shares), "dtypes": dtypes, "digests": digests})
    keys = sorted({k for r in everyone for k in r["keys"]})
    width = next(iter(shares.values())).numel() if shares else 10
    stacked = torch.stack([shares.get(k, torch.zeros(width, dtype=torch.float64)) for k in keys]) if keys else None
    total = sum_over_ranks(stacked) if stacked is not None else None
    record = StepRecord(checkpoint, None)
    if rank() == 0:
        types = {k: v for r in everyone for k, v in r["dtypes"].items()}
        values = dict(zip(keys, total)) if total is not None else {}
        record.manifest = _manifest(step, values, types, _agreed_digests(everyone), lambda k: group_of(k, entries))
    logger.info(
        "flame-ext: recorded the fingerprints of %d saved tensors and the digests of %d other states of step %d "
        "on %d rank(s) (%.0f ms); %s/flame_ext.json is written once the save has completed",
        len(keys),
        len({k for r in everyone for k in r["digests"]}),
        step,
        world(),
        (time.perf_counter() - start) * 1e3,
        checkpoint,
    )
    return record


def _local_record(flat: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """This rank's share of each tensor's fingerprint (values as stored), their dtypes, and its digests."""
    from flame_ext.fingerprints.algorithm import local_fingerprint
    from flame_ext.io.specs import dtype_name
    from flame_ext.io.training_state import state_digest

    shares: dict[str, torch.Tensor] = {}
    dtypes: dict[str, str] = {}
    digests: dict[str, str] = {}
    for key in sorted(flat):
        value = flat[key]
        if isinstance(value, torch.Tensor):
            shares[key] = local_fingerprint(value)
            dtypes[key] = dtype_name(value.dtype)
        else:
            digests[key] = state_digest(value)
    return shares, dtypes, digests


def _agreed_digests(everyone: list[dict[str, Any]]) -> dict[str, str]:
    """Each non-tensor key's digest, when every rank holding it holds the same value."""
    seen: dict[str, set[str]] = {}
    for r in everyone:
        for key, digest in r["digests"].items():
            seen.setdefault(key, set()).add(digest)
    differ = sorted(k for k, d in seen.items() if len(d) > 1)
    if differ:
        logger.warning(
            "flame-ext: the ranks save different values for %s (DCP keeps one of them): not recorded, so a resume "
            "cannot verify them",
            ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else ""),
        )
    return {k: d.pop() for k, d in seen.items() if len(d) == 1}


def _manifest(
    step: int, values: dict[str, torch.Tensor], dtypes: dict[str, str], digests: dict[str, str], group: Any
) -> dict[str, Any]:
    from flame_ext.fingerprints.record import fingerprints_section
    from flame_ext.io.manifest import TRAINING_STEP, build_manifest

    section = fingerprints_section(values, {k: dtypes[k] for k in values})
    for key, item in section["tensors"].items():
        item["group"] = group(key)
    return build_manifest(
        TRAINING_STEP,
        step=step,
        world_size=world(),
        fingerprints=section,
        digests={k: {"group": group(k), "sha256": d} for k, d in sorted(digests.items())},
    )
