"""The save-time record: what a step folder's flame_ext.json holds, and that it is written only after the save."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future

import pytest
import torch

from flame_ext.errors import CheckpointFormatError
from flame_ext.fingerprints.algorithm import fingerprint, matches
from flame_ext.guard.save_record import record_save, step_of
from flame_ext.io.manifest import read_manifest


def states() -> dict:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=gen)
    return {
        "model": {"layer.weight": weight, "layer.bias": torch.zeros(4, dtype=torch.bfloat16)},
        "optimizer": {"state": {"layer.weight": {"exp_avg": weight * 0.1, "step": torch.tensor(2.0)}}},
        "lr_scheduler": {"last_epoch": 2, "base_lrs": [0.001]},
        "dataloader": {"dp_rank_0": b"pickled", "world_size": 1},
    }


def test_the_record_holds_every_key_its_kind_and_exact_fingerprints(tmp_path):
    saved = states()
    record = record_save(saved, step=2, checkpoint=str(tmp_path / "step-2"))
    (tmp_path / "step-2").mkdir()
    record.write_when_saved(None)  # a synchronous save: written at once
    data = read_manifest(tmp_path / "step-2")  # the manifest reader takes the training-step kind
    assert (data["format_version"], data["kind"], data["step"], data["world_size"]) == (1, "training_step", 2, 1)
    tensors = data["fingerprints"]["tensors"]
    assert {k: v["group"] for k, v in tensors.items()} == {
        "model.layer.weight": "model",
        "model.layer.bias": "model",
        "optimizer.state.layer.weight.exp_avg": "optimizer",
        "optimizer.state.layer.weight.step": "optimizer",
    }
    assert tensors["model.layer.bias"]["dtype"] == "bfloat16"  # as stored, no cast
    assert matches(tensors["model.layer.weight"]["fingerprint"], fingerprint(saved["model"]["layer.weight"]))
    digests = data["digests"]
    assert set(digests) == {
        "lr_scheduler.last_epoch",
        "lr_scheduler.base_lrs",
        "dataloader.dp_rank_0",
        "dataloader.world_size",
    }
    assert all(d["group"] == "state" and len(d["sha256"]) == 64 for d in digests.values())


def test_an_async_save_is_recorded_when_its_future_completes_not_before(tmp_path):
    folder = tmp_path / "step-3"
    folder.mkdir()
    record = record_save(states(), step=3, checkpoint=str(folder))
    future: Future = Future()
    record.write_when_saved(future)
    assert record.waits and not (folder / "flame_ext.json").exists()
    record.flush()  # a wait point before completion writes nothing
    assert not (folder / "flame_ext.json").exists()
    done = threading.Thread(target=future.set_result, args=(None,))
    done.start()
    done.join()
    assert json.loads((folder / "flame_ext.json").read_text())["step"] == 3
    assert not list(folder.glob("*.tmp"))  # written through a temporary file, renamed


def test_an_optimizer_step_waits_for_the_background_sums_of_the_state_it_changes(tmp_path):
    """The sums run in a thread while training goes on; the next optimizer step (any loop) joins them first,
    so the record is of the saved values, bit for bit the record of a synchronous save."""
    layer = torch.nn.Linear(2048, 2048)  # large enough that the sums are still running at the step
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    before = layer.weight.detach().clone()
    folders = {m: tmp_path / m / "step-1" for m in ("sync", "async")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    record_save({"model": layer.state_dict()}, step=1, checkpoint=str(folders["sync"])).write_when_saved(None)
    future: Future = Future()
    record = record_save({"model": layer.state_dict()}, step=1, checkpoint=str(folders["async"]))
    record.write_when_saved(future)
    optimizer.step()
    assert not torch.equal(layer.weight, before)
    future.set_result(None)
    sync, late = (read_manifest(folders[m]) for m in ("sync", "async"))
    assert late["fingerprints"] == sync["fingerprints"]
    assert matches(late["fingerprints"]["tensors"]["model.weight"]["fingerprint"], fingerprint(before))


def test_an_async_save_that_completes_before_its_sums_end_is_recorded_at_the_next_optimizer_step(tmp_path):
    """The save's callback finds no record to write yet; the join at the next optimizer step writes it, not the
    next save or the end of the run (a crash in between would leave the step unverifiable)."""
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    folder = tmp_path / "step-6"
    folder.mkdir()
    record = record_save({"model": layer.state_dict()}, step=6, checkpoint=str(folder), start=False)
    future: Future = Future()
    record.write_when_saved(future)
    future.set_result(None)  # completed while the sums have not even started
    assert not (folder / "flame_ext.json").exists()
    optimizer.step()
    assert read_manifest(folder)["step"] == 6
    assert not record.waits


def test_sums_started_after_the_save_or_never_give_the_record_of_a_save_whose_sums_began_at_once(tmp_path):
    """An async save starts the sums only once the host has staged its copy (``start=False``, then ``start()``);
    a save that failed before that never starts them, and the join sums them itself. Same record either way."""
    saved = states()
    records = {}
    for mode in ("at_once", "after", "never"):
        folder = tmp_path / mode / "step-5"
        folder.mkdir(parents=True)
        record = record_save(saved, step=5, checkpoint=str(folder), start=mode == "at_once")
        if mode == "after":
            record.start()
            record.start()  # idempotent, as the host's hooks may call it again
        record.finish()
        record.start()  # after the join: nothing left to sum, no thread started
        record.write_when_saved(None)
        records[mode] = read_manifest(folder)["fingerprints"]
    assert records["after"] == records["at_once"] == records["never"]
    assert matches(
        records["never"]["tensors"]["model.layer.weight"]["fingerprint"], fingerprint(saved["model"]["layer.weight"])
    )


def test_a_failed_async_save_leaves_no_record(tmp_path, caplog):
    folder = tmp_path / "step-4"
    folder.mkdir()
    record = record_save(states(), step=4, checkpoint=str(folder))
    future: Future = Future()
    record.write_when_saved(future)
    with caplog.at_level(logging.WARNING):
        future.set_exception(OSError("disk full"))
    record.flush()
    assert not (folder / "flame_ext.json").exists()
    assert any("did not complete; no save-time record" in r.getMessage() for r in caplog.records)


def test_a_training_step_record_without_its_step_is_refused(tmp_path):
    (tmp_path / "flame_ext.json").write_text(
        json.dumps({"format_version": 1, "kind": "training_step", "fingerprints": {}})
    )
    with pytest.raises(CheckpointFormatError, match='lacks the field "step"'):
        read_manifest(tmp_path)


def test_step_of_reads_only_step_folders():
    assert [step_of(p) for p in ("/r/checkpoint/step-12", "/r/step-0/", "/r/checkpoint", "/r/step-x")] == [
        12,
        0,
        None,
        None,
    ]
