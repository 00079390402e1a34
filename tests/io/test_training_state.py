"""A host's training state as DCP keys it, and the digests of non-tensor states."""

from __future__ import annotations

import datetime
import io
import math

import torch
import torch.distributed.checkpoint as dcp

from flame_ext.io.training_state import as_state_dicts, flatten_state, group_of, state_digest


class Scheduler:
    """A Stateful as torchtitan's containers are: a nested state dict with tensors, lists and numbers."""

    def __init__(self) -> None:
        self.state = {"last_epoch": 3, "base_lrs": [0.001, 0.002], "_last_lr": (0.5,), "clock": torch.tensor(7)}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, sd: dict) -> None:
        self.state = sd


def test_the_flattened_keys_are_the_ones_dcp_writes(tmp_path):
    states = {
        "model": {"layers": {"0": {"weight": torch.ones(2, 3)}}},
        "lr_scheduler": Scheduler(),
        "dataloader": {"dp_rank_0": b"\x80\x04state", "world_size": 1},
        "train_state": None,
    }
    flat = flatten_state(states)
    dcp.save(as_state_dicts(states), checkpoint_id=str(tmp_path), no_dist=True)
    written = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
    assert set(flat) == set(written)
    assert {"model.layers.0.weight", "lr_scheduler.base_lrs", "lr_scheduler.clock", "dataloader.dp_rank_0"} <= set(flat)
    assert isinstance(flat["lr_scheduler.clock"], torch.Tensor) and flat["lr_scheduler.base_lrs"] == [0.001, 0.002]


def test_groups_follow_the_top_level_entry():
    nested = ["model", "optimizer", "lr_scheduler"]  # torchtitan 0.1: the model nested under "model."
    assert group_of("model.model.layers.0.weight", nested) == "model"
    assert group_of("optimizer.state.model.layers.0.weight.exp_avg", nested) == "optimizer"
    assert group_of("lr_scheduler.last_epoch", nested) == "state"
    flat = ["optimizer", "train_state"]  # torchtitan 0.3: model keys at the top level
    assert group_of("model.layers.0.weight", flat) == "model"
    assert group_of("lm_head.weight", flat) == "model"
    assert group_of("train_state.step", flat) == "state"


def test_a_digest_is_the_same_for_the_same_value_and_survives_dcps_pickling():
    values = [3, 0.1, "x", None, [0.001, 0.002], {"b": 1, "a": [True]}, b"\x00\x01", datetime.timedelta(seconds=5)]
    for value in values:
        buf = io.BytesIO()
        torch.save(value, buf)  # how DCP stores a non-tensor state
        buf.seek(0)
        assert state_digest(torch.load(buf, weights_only=False)) == state_digest(value), value
    assert state_digest({"a": 1, "b": 2}) == state_digest({"b": 2, "a": 1})
    assert state_digest(0.1) != state_digest(math.nextafter(0.1, 1.0))  # one ulp apart
    assert state_digest(1) != state_digest(1.0) != state_digest(True)
    assert state_digest(b"abc") != state_digest("abc")
    assert len(state_digest(datetime.timedelta(seconds=5))) == 64


def test_a_bytesio_state_is_digested_by_its_content_whatever_its_position(tmp_path):
    """flame's TrainState saves its loss history as BytesIO objects (written to, so positioned at the end) and
    seeks them to 0 when it loads: the same content must give the same digest, through a real DCP round trip."""
    import torch.distributed.checkpoint as dcp

    saved = io.BytesIO()
    torch.save([1.8775, 1.8771], saved)  # position: the end, as flame hands it to the save
    dcp.save({"losses": saved}, checkpoint_id=str(tmp_path / "step"), no_dist=True)
    loaded = {"losses": io.BytesIO()}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "step"), no_dist=True)
    loaded["losses"].seek(0)
    torch.load(loaded["losses"], weights_only=False)  # flame's load_state_dict reads it: the position moves
    assert state_digest(loaded["losses"]) == state_digest(saved)
    other = io.BytesIO()
    torch.save([1.8775, 1.8772], other)
    assert state_digest(other) != state_digest(saved)
