"""The DCP side: key layouts (flat / nested) and how torchtitan 0.1.0's real CheckpointManager loads them,
the metadata reader, and single-tensor reads.

What torchtitan 0.1.0 (flame's pin) does, read from its ``components/checkpoint.py`` and checked below:
``load()`` asks for *flat* model keys whenever the load is model-only, which is the case for a
``checkpoint/step-0`` folder (``model_only = step == 0``) and for ``initial_load_path`` with the default
``initial_load_model_weights_only=True``. ``model.``-nested keys (flame's stock ``{"model": sd}``) are
asked for only by the full-checkpoint path: ``initial_load_path`` with
``initial_load_model_weights_only=False`` (or a ``step-N`` folder with N > 0); that path also asks for the
optimizer, lr scheduler, dataloader and train state, so a converted (model-only) checkpoint loads there
only with ``exclude_from_loading`` naming all of them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from support.cli import titan_version
from torch.distributed.checkpoint.stateful import Stateful

from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.errors import CheckpointFormatError, InputError
from flame_ext.io.dcp import DCPRowReader, load_tensor, model_prefix, read_dcp_metadata
from flame_ext.io.specs import TensorSpec

NON_MODEL_STATES = ["optimizer", "lr_scheduler", "dataloader", "train_state"]


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def layouts(sharded_model, tmp_path_factory) -> dict[str, Path]:
    """The sharded model converted in both layouts, each as a flame dump's ``checkpoint/step-0``."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout in ("flat", "nested"):
        out[layout] = root / layout / "checkpoint" / "step-0"
        convert_hf_to_dcp(
            ConvertOptions(
                model=str(sharded_model),
                checkpoint=str(out[layout]),
                layout=layout,
                reference=False,
                progress=False,
                buffer_bytes=64 * 1024,
            )
        )
    return out


def test_nested_layout_is_flat_layout_under_model_prefix(layouts):
    flat, nested = read_dcp_metadata(layouts["flat"]), read_dcp_metadata(layouts["nested"])
    assert sorted(nested) == sorted("model." + k for k in flat)
    assert all(nested["model." + k] == spec for k, spec in flat.items())
    assert model_prefix(nested, flat) == "model."
    assert model_prefix(flat, flat) == ""


def test_load_tensor_reads_every_block(layouts, sharded_model):
    hf = _hf_tensors(sharded_model)
    found = read_dcp_metadata(layouts["nested"])
    for key, value in hf.items():
        assert torch.equal(load_tensor(layouts["nested"], "model." + key, found["model." + key]), value), key


def test_stream_gives_every_tensor_whole_in_row_blocks_in_the_order_asked(layouts, sharded_model):
    hf = _hf_tensors(sharded_model)
    found = read_dcp_metadata(layouts["flat"])
    specs = {k: found[k] for k in sorted(hf, reverse=True)}  # not the files' order
    buffer = 4 * 1024  # several blocks per tensor: the read-ahead crosses from one tensor into the next
    blocks = list(DCPRowReader(layouts["flat"]).stream(specs, buffer))
    assert list(dict.fromkeys(k for k, _, _ in blocks)) == list(specs)
    assert len(blocks) > len(specs)
    for key in specs:
        mine = [(start, b) for k, start, b in blocks if k == key]
        assert [start for start, _ in mine] == [sum(len(b) for _, b in mine[:i]) for i in range(len(mine))], key
        assert all(b.nbytes <= buffer or len(b) == 1 for _, b in mine), key
        assert torch.equal(torch.cat([b for _, b in mine]).reshape(hf[key].shape), hf[key]), key


def test_stream_stops_at_an_unreadable_tensor_with_the_reading_error(layouts):
    found = read_dcp_metadata(layouts["flat"])
    first = sorted(k for k, s in found.items() if s is not None)[0]
    specs = {first: found[first], "no.such.key": TensorSpec((2,), "float32")}
    stream = DCPRowReader(layouts["flat"]).stream(specs, 1 << 20)
    with pytest.raises(CheckpointFormatError, match="cannot read no.such.key"):
        for key, _, _ in stream:
            assert key == first  # every block of the readable tensor comes first


def test_metadata_reader_errors_name_the_folder(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        read_dcp_metadata(tmp_path / "absent")
    (tmp_path / "not-dcp").mkdir()
    with pytest.raises(CheckpointFormatError, match="no .metadata"):
        read_dcp_metadata(tmp_path / "not-dcp")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        read_dcp_metadata(tmp_path / "corrupt")


def test_load_tensor_of_absent_key_is_one_clear_error(layouts):
    with pytest.raises(CheckpointFormatError, match="cannot read no.such.key"):
        load_tensor(layouts["flat"], "no.such.key", TensorSpec((2,), "float32"))


class _TrainState(Stateful):
    """What flame's ``TrainState`` contributes to a full checkpoint (``train_state.*`` keys)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": torch.tensor(self.step, dtype=torch.int32)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = int(state_dict["step"])


def _titan01_manager(config_dir: Path, dump: Path, **checkpoint_fields):
    """torchtitan 0.1.0's CheckpointManager around an HF model built on meta + to_empty, as flame builds it."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.ft import FTManager
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config_manager import JobConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.to_empty(device="cpu")
    job = JobConfig()
    job.job.dump_folder = str(dump)
    job.checkpoint.enable_checkpoint = True
    job.checkpoint.keep_latest_k = 0  # no purge thread
    for name, value in checkpoint_fields.items():
        setattr(job.checkpoint, name, value)
    ft = FTManager(None)
    optimizers = build_optimizers([model], job, ft)
    manager = CheckpointManager(
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=build_lr_schedulers(optimizers, job),
        states={"train_state": _TrainState()},
        job_config=job,
        ft_manager=ft,
    )
    return model, manager


def _missing_key(exc: BaseException) -> str:
    text = str(exc)
    assert "Missing key in checkpoint state_dict" in text, text[-500:]
    return text.split("Missing key in checkpoint state_dict:")[1].split()[0].rstrip(".")


@pytest.mark.skipif(
    titan_version() != "0.1", reason="torchtitan 0.1.x's loader (flame's pin) is in the other environment"
)
def test_torchtitan01_loads_flat_at_step0_and_nested_only_on_the_full_checkpoint_path(layouts, sharded_model, tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    hf = _hf_tensors(sharded_model)

    def assert_weights_loaded(model):
        sd = model.state_dict()
        assert sorted(sd) == sorted(hf)
        assert all(torch.equal(sd[k], hf[k]) for k in hf)

    # flame's workflow: the converted checkpoint is the dump's checkpoint/step-0 -> a model-only load.
    model, manager = _titan01_manager(sharded_model, layouts["flat"].parents[1])
    assert manager.load() is True
    assert_weights_loaded(model)

    _, manager = _titan01_manager(sharded_model, layouts["nested"].parents[1])
    with pytest.raises(CheckpointException) as err:
        manager.load()
    assert not _missing_key(err.value).startswith("model."), "step-0 asks for flat keys"

    # Nested keys are what the full-checkpoint path asks for: initial_load_path, not weights-only, and
    # the states a model-only checkpoint does not hold excluded.
    full = dict(initial_load_path=str(layouts["nested"]), initial_load_model_weights_only=False)
    _, manager = _titan01_manager(sharded_model, tmp_path / "fresh-dump", **full)
    with pytest.raises(CheckpointException):
        manager.load()  # without exclusions it asks for dataloader/optimizer/... too
    model, manager = _titan01_manager(
        sharded_model, tmp_path / "fresh-dump", **full, exclude_from_loading=NON_MODEL_STATES
    )
    assert manager.load() is True
    assert_weights_loaded(model)

    # The same nested folder as a later step (resume path, not model-only) loads too.
    resume = tmp_path / "resume"
    shutil.copytree(layouts["nested"], resume / "checkpoint" / "step-5")
    model, manager = _titan01_manager(sharded_model, resume, exclude_from_loading=NON_MODEL_STATES)
    assert manager.load() is True
    assert_weights_loaded(model)

    # And the weights-only initial load asks for flat keys, like step-0.
    _, manager = _titan01_manager(sharded_model, tmp_path / "fresh-dump", initial_load_path=str(layouts["nested"]))
    with pytest.raises(CheckpointException) as err:
        manager.load()
    assert not _missing_key(err.value).startswith("model.")


def test_dcp_save_of_nested_dict_gives_the_nested_layout(layouts, sharded_model, tmp_path):
    """Our ``nested`` is byte-for-byte the key set flame's stock converter writes (``dcp.save({"model": sd})``)."""
    from transformers import AutoModelForCausalLM

    stock = tmp_path / "stock"
    dcp.save(
        {"model": AutoModelForCausalLM.from_pretrained(sharded_model).state_dict()},
        checkpoint_id=str(stock),
        no_dist=True,
    )
    assert read_dcp_metadata(stock) == read_dcp_metadata(layouts["nested"])
