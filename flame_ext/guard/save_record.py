"""The save-time record: fingerprints of every tensor a training checkpoint saves, digests of the rest.

With the guard on, the validating checkpoint manager hands the exact state it gives DCP to ``record_save``
(every rank, main thread, while the saved values are the live ones). It digests the non-tensor leaves
(``io.training_state.state_digest``) and shares the key lists and digests (one gather) at once; each rank's
share of the fingerprints (``fingerprints.algorithm.local_fingerprint`` of its own shards, values as stored, no cast)
is summed in a background thread while DCP saves (torch releases the GIL) and, for an async save, while
training goes on. An async save starts the sums once ``save()`` has staged its copy (``record_save(start=False)``
then ``StepRecord.start``): started earlier, they take CPU from the staging that the training loop waits for.
``StepRecord.finish`` joins it and adds the shares over the ranks (one all-reduce, on the main thread) before
anything may change the saved tensors: the host's wait before the optimizer step, any optimizer's step (a
pre-hook), the next save, a load, ``close``. Rank 0 writes ``<step folder>/flame_ext.json``
(kind ``training_step``, atomically) only once the fingerprints are summed AND the DCP save has completed: at
once for a synchronous save, else when the save's future completes (a callback that only writes the file) or
at the host's wait point, whichever comes first.

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

    The fingerprints are summed in a background thread (``_LocalSums``) while the host saves and trains on.
    ``finish()`` joins it and all-reduces (ALL ranks, the same join point: it holds collectives); until then
    the saved tensors must not change, so the first optimizer step after the save finishes it (a step
    pre-hook), as do the host's wait points. ``write_when_saved(result)`` with what the host's DCP call
    returned (None or the ``Metadata`` of a synchronous save: finished and written at once; a ``Future`` or an
    ``AsyncSaveResponse`` for an async one); ``flush()`` at the host's wait points finishes and writes if the
    save has completed.
    """

    def __init__(self, folder: str, pending: _Pending | None = None) -> None:
        self.folder = folder
        self.manifest: dict[str, Any] | None = None  # rank 0's, once finished (None: other ranks, or it failed)
        self._pending = pending
        self._future: Any = None
        self._lock = threading.Lock()
        self._written = False
        if pending is not None:
            _until_next_step(self)

    def start(self) -> None:
        """Start the background sums, if ``record_save`` was asked not to (idempotent)."""
        pending = self._pending
        if pending is not None:
            pending.sums.start()

    def finish(self) -> None:
        """Join the sums and share them (a collective: every rank calls it at the same point); idempotent."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        _unfinished.pop(id(self), None)
        manifest = pending.finish()
        with self._lock:
            self.manifest = manifest
        if self._completed():  # the save's callback ran before the sums ended, and so wrote nothing
            self.write()

    def write_when_saved(self, result: Any) -> None:
        future = getattr(result, "upload_completion", result)  # AsyncSaveResponse: the upload's future
        if not callable(getattr(future, "add_done_callback", None)):  # a synchronous save has completed
            self.finish()
            self.write()
            return
        self._future = future
        future.add_done_callback(self._on_done)  # runs in the saving thread: writes a file, nothing else

    @property
    def waits(self) -> bool:
        """Whether the record waits for its sums or for an async save to complete."""
        return self._pending is not None or (self._future is not None and not self._written)

    def flush(self) -> None:
        """At a wait point: finish, then write if the save has completed; a failed save gets no record."""
        self.finish()
        if self._future is None or self._completed():
            self.write()

    def _completed(self) -> bool:
        """Whether the async save handed to ``write_when_saved`` has completed, and without an error."""
        future = self._future
        return future is not None and future.done() and not future.cancelled() and future.exception() is None

    def _on_done(self, future: Any) -> None:
        if future.cancelled() or future.exception() is not None:
            logger.warning("flame-ext: the save of %s did not complete; no save-time record written", self.folder)
            return
        self.write()  # nothing yet if the sums are not finished: finish() writes then

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


_unfinished: dict[int, StepRecord] = {}  # in the order they were started
_hooked = False


def _until_next_step(record: StepRecord) -> None:
    """Finish ``record`` before any optimizer's next step, whichever loop runs it (a host's own wait point
    usually comes first). One global step pre-hook, registered once: a hook cannot remove itself while torch
    iterates over the hooks."""
    global _hooked
    _unfinished[id(record)] = record
    if not _hooked:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(_finish_unfinished)
        _hooked = True


def _finish_unfinished(*_: Any) -> None:
    for record in list(_unfinished.values()):
        record.finish()


def step_of(checkpoint_id: str) -> int | None:
    """N of a ``.../step-N`` folder, else None."""
    match = re.fullmatch(r"step-(\d+)", str(checkpoint_id).rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def record_save(states: Mapping[str, Any], *, step: int, checkpoint: str, start: bool = True) -> StepRecord:
    """Starts the record of ``states`` (what the host hands DCP: state dicts, not Statefuls): the digests and
    the key lists now, the fingerprints' sums in a background thread (see ``StepRecord``), started now or, with
    ``start=False``, at ``StepRecord.start()`` (else ``finish`` sums them all on the caller's thread).

    ALL ranks must call it, in the same order: it holds collectives.
    """
    from flame_ext.io.training_state import flatten_state, group_of

    began = time.perf_counter()
    entries = [k for k, v in states.items() if not isinstance(v, torch.Tensor)]
    try:
        flat = agreed(lambda: flatten_state(states), "recording the saved state")
        tensors, dtypes, digests = agreed(lambda: _split(flat), "digesting the saved state")
    except Exception as exc:  # noqa: BLE001 -- a record must never stop a save (RankFailure included)
        logger.warning("flame-ext: no save-time record for %s: %s", checkpoint, exc)
        return StepRecord(checkpoint)
    everyone = gather({"keys": sorted(tensors), "dtypes": dtypes, "digests": digests})
    keys = sorted({k for r in everyone for k in r["keys"]})
    describe = None
    if rank() == 0:
        types = {k: v for r in everyone for k, v in r["dtypes"].items()}
        agreed_digests = _agreed_digests(everyone)

        def describe(values: dict[str, torch.Tensor]) -> dict[str, Any]:
            return _manifest(step, values, types, agreed_digests, lambda k: group_of(k, entries))

    pending = _Pending(checkpoint, keys, _LocalSums(tensors), describe, began)
    if start:
        pending.sums.start()
    logger.info(
        "flame-ext: recording the fingerprints of %d saved tensors (summed in the background) and the digests of "
        "%d other states of step %d on %d rank(s); %s/flame_ext.json is written once the save has completed",
        len(keys),
        len({k for r in everyone for k in r["digests"]}),
        step,
        world(),
        checkpoint,
    )
    return StepRecord(checkpoint, pending)


class _Pending:
    """A record between ``record_save`` and ``StepRecord.finish``: the local sums running, the shared part known.

    The thread computes only this rank's shares; the all-reduce that adds them runs in ``finish``, on the
    caller's (main) thread. Collectives from a second thread would interleave with the trainer's own on the
    same process group (gloo matches collectives by order, per group, and the trainer's FSDP and loss
    all-reduces run meanwhile), and a new group per save would cost a rendezvous; at the join point every rank
    is at the same place in its program, so one all-reduce there is ordered like any other.
    """

    def __init__(self, folder: str, keys: list[str], sums: _LocalSums, describe: Any, start: float) -> None:
        self.folder, self.keys, self.sums, self.describe, self.start = folder, keys, sums, describe, start

    def finish(self) -> dict[str, Any] | None:
        waited = time.perf_counter()
        try:
            shares = agreed(self.sums.result, "fingerprinting the saved state")
        except Exception as exc:  # noqa: BLE001 -- a record must never stop training (RankFailure included)
            logger.warning("flame-ext: no save-time record for %s: %s", self.folder, exc)
            return None
        from flame_ext.fingerprints.algorithm import TERMS

        none = torch.zeros(len(TERMS), dtype=torch.float64)
        stacked = torch.stack([shares.get(k, none) for k in self.keys]) if self.keys else None
        total = sum_over_ranks(stacked) if stacked is not None else None
        logger.info(
            "flame-ext: the fingerprints of %s are summed (%.0f ms since the save began, %.0f ms waited for them)",
            self.folder,
            (time.perf_counter() - self.start) * 1e3,
            (time.perf_counter() - waited) * 1e3,
        )
        if self.describe is None:
            return None
        return self.describe(dict(zip(self.keys, total)) if total is not None else {})


class _LocalSums:
    """This rank's share of each tensor's fingerprint (values as stored, no cast), computed by a background
    thread while the caller goes on; ``result()`` (the caller's thread) takes the keys not started yet itself,
    then joins.

    Each key is summed whole by one thread with one torch thread (``workers=1``), so a share does not depend on
    which thread took it: the record of an async save is the record of a synchronous one, bit for bit. One
    torch thread also keeps the background sums from splitting every small operation over an OpenMP team that
    the host's own work keeps busy (see ``fingerprints.algorithm.Recorder``). A DTensor whose shards interleave
    (``_StridedShard``) is gathered by a collective: summed at once, on the caller's thread.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        from flame_ext.fingerprints.algorithm import local_fingerprint

        self._sum = lambda t: local_fingerprint(t, workers=1)
        self.shares: dict[str, torch.Tensor] = {}
        strided = [k for k, t in tensors.items() if _interleaved(t)]
        for key in strided:
            self.shares[key] = self._sum(tensors[key])
        self._tensors = {k: t.detach() for k, t in tensors.items() if k not in self.shares}
        self._todo = iter(sorted(self._tensors, key=lambda k: -self._tensors[k].numel()))  # the biggest first
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._started = False
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._background, name="flame-ext-save-record", daemon=True)

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self._thread.start()

    def result(self) -> dict[str, torch.Tensor]:
        torch.set_num_threads(1)  # this thread's own OpenMP team (and threads started meanwhile)
        try:
            self._work()
        finally:
            torch.set_num_threads(self._threads)
        with self._lock:
            started, self._started = self._started, True  # a start() from now on has nothing left to do
        if started:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self.shares

    def _background(self) -> None:
        torch.get_num_threads()  # a new thread takes the process default at its first call: before ours, not after
        torch.set_num_threads(1)
        try:
            self._work()
        except BaseException as exc:  # noqa: BLE001 -- handed to result(), on the caller's thread
            self._error = exc
        finally:
            torch.set_num_threads(self._threads)  # the default for threads started later

    def _work(self) -> None:
        while True:
            with self._lock:
                key = next(self._todo, None)
            if key is None or self._error is not None:
                return
            share = self._sum(self._tensors[key])
            with self._lock:
                self.shares[key] = share


def _interleaved(t: torch.Tensor) -> bool:
    return any(type(p).__name__ == "_StridedShard" for p in getattr(t, "placements", ()))


def _split(flat: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """This rank's tensors, their dtypes, and the digests of its other leaves."""
    from flame_ext.io.specs import dtype_name
    from flame_ext.io.training_state import state_digest

    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    digests = {k: state_digest(v) for k, v in sorted(flat.items()) if not isinstance(v, torch.Tensor)}
    return tensors, {k: dtype_name(t.dtype) for k, t in tensors.items()}, digests


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
