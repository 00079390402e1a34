"""``.metadata`` validated as data before any read (flame_ext/io/dcp_metadata.py).

Each case takes a real checkpoint written by the converter (tensors in several row-block chunks, several data
files), changes one field the way a damaged or hostile file would, pickles it back with the same torch classes,
and requires every reader (the metadata reader, the tensor reader, the whole-state reader) to refuse it with a
``CheckpointFormatError`` naming the key or file. The controls: the untouched copy and harmless reorderings
read back bit-exact.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata

from flame_ext.errors import CheckpointFormatError
from flame_ext.io.dcp import load_state, load_tensor, read_dcp_metadata
from flame_ext.io.dcp_save import WriteEntry, save_streaming
from flame_ext.io.specs import TensorSpec, dtype_name

KEY = "blocks"  # 12 x 5 float32, written in 4 row blocks of 3 rows


def _rows(v: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    return lambda start, end: v[start:end] if v.dim() else v


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    values = {KEY: torch.randn(12, 5, generator=g), "bias": torch.randn(5, generator=g), "step": torch.tensor(3)}
    folder = tmp_path_factory.mktemp("md") / "ckpt"
    entries = [WriteEntry(k, TensorSpec(tuple(v.shape), dtype_name(v.dtype)), _rows(v)) for k, v in values.items()]
    save_streaming(folder, entries, buffer_bytes=2 * 3 * 5 * 4, threads=1)  # 3 rows of 5 float32 per block
    md = dcp.FileSystemReader(str(folder)).read_metadata()
    assert len(md.state_dict_metadata[KEY].chunks) == 4
    return folder, values


def _copy(source, tmp_path: Path) -> tuple[Path, Metadata]:
    folder = Path(shutil.copytree(source[0], tmp_path / "ckpt"))
    return folder, dcp.FileSystemReader(str(folder)).read_metadata()  # our own file: safe to unpickle here


def _save(folder: Path, md: Metadata) -> None:
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)


def _chunks(md: Metadata) -> list[ChunkStorageMetadata]:
    return md.state_dict_metadata[KEY].chunks


def _record(md: Metadata, key: str = KEY, i: int = 1):
    index = sorted((ix for ix in md.storage_data if ix.fqn == key), key=lambda ix: tuple(ix.offset or ()))[i]
    return index, md.storage_data[index]


def _set_record(md: Metadata, key: str = KEY, i: int = 1, **changes) -> None:
    index, info = _record(md, key, i)
    md.storage_data[index] = dataclasses.replace(info, **changes)


def _readers(folder: Path, values: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    spec = TensorSpec((12, 5), "float32")
    return {
        "read_dcp_metadata": lambda: read_dcp_metadata(folder),
        "load_tensor": lambda: load_tensor(folder, KEY, spec),
        "load_state": lambda: load_state(folder, {k: torch.empty_like(v) for k, v in values.items()}),
    }


def _refused(folder: Path, values, *words: str) -> str:
    messages = []
    for name, read in _readers(folder, values).items():
        with pytest.raises(CheckpointFormatError) as info:
            read()
        message = str(info.value)
        assert "\n" not in message, message
        assert any(w in message for w in words), f"{name}: {message}"
        messages.append(message)
    assert len(set(messages)) == 1, messages  # one check, whichever reader asks
    return messages[0]


# ---------------------------------------------------------------- chunks tile the tensor


def test_a_missing_middle_chunk_is_a_gap(source, tmp_path):
    folder, md = _copy(source, tmp_path)
    del _chunks(md)[2]
    _save(folder, md)
    line = _refused(folder, source[1], KEY)
    assert "cover 45 of its 60 elements" in line, line


def test_a_shifted_chunk_overlaps_its_neighbour_though_the_volume_adds_up(source, tmp_path):
    folder, md = _copy(source, tmp_path)
    c = _chunks(md)[3]
    _chunks(md)[3] = ChunkStorageMetadata(torch.Size([c.offsets[0] - 1, 0]), c.sizes)  # rows 8-10 instead of 9-11
    _save(folder, md)
    assert "overlap" in _refused(folder, source[1], KEY)


def test_a_duplicated_chunk_overlaps(source, tmp_path):
    folder, md = _copy(source, tmp_path)
    _chunks(md).append(_chunks(md)[0])
    _save(folder, md)
    assert "overlap" in _refused(folder, source[1], KEY)


def test_a_chunk_outside_the_shape_is_refused(source, tmp_path):
    folder, md = _copy(source, tmp_path)
    c = _chunks(md)[0]
    _chunks(md)[0] = ChunkStorageMetadata(torch.Size([0, 2]), c.sizes)  # columns 2-6 of 5
    _save(folder, md)
    assert "outside its shape" in _refused(folder, source[1], KEY)


def test_chunk_and_shape_fields_of_the_wrong_kind(source, tmp_path):
    cases = {
        "negative size": lambda md: setattr(md.state_dict_metadata[KEY], "size", torch.Size([-12, 5])),
        "chunk offsets a list": lambda md: setattr(_chunks(md)[1], "offsets", [3, 0]),
        "chunk of other rank": lambda md: setattr(_chunks(md)[1], "sizes", torch.Size([3])),
        "chunks a tuple": lambda md: setattr(md.state_dict_metadata[KEY], "chunks", tuple(_chunks(md))),
        "quantized dtype": lambda md: setattr(md.state_dict_metadata[KEY].properties, "dtype", torch.qint8),
        "dtype a string": lambda md: setattr(md.state_dict_metadata[KEY].properties, "dtype", "float32"),
    }
    for name, mutate in cases.items():
        folder, md = _copy(source, tmp_path / name.replace(" ", "-"))
        mutate(md)
        _save(folder, md)
        _refused(folder, source[1], KEY)


def test_maps_of_the_wrong_kind(source, tmp_path):
    folder, md = _copy(source, tmp_path / "a")
    md.state_dict_metadata = tuple(md.state_dict_metadata.items())
    _save(folder, md)
    assert "state_dict_metadata is a tuple" in _refused(folder, source[1], "state_dict_metadata")
    folder, md = _copy(source, tmp_path / "b")
    md.storage_data = None
    _save(folder, md)
    assert "storage_data is a NoneType" in _refused(folder, source[1], "storage_data")


# ---------------------------------------------------------------- storage records


def test_a_chunk_without_a_storage_record(source, tmp_path):
    folder, md = _copy(source, tmp_path)
    del md.storage_data[_record(md, i=3)[0]]
    _save(folder, md)
    assert "has no storage record" in _refused(folder, source[1], KEY)


def test_records_leading_out_of_the_folder_are_refused(source, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder, md = _copy(source, tmp_path / "dotdot")
    name = _record(md)[1].relative_path
    shutil.copy(folder / name, tmp_path / "dotdot" / name)  # a real copy one level up: only the path is wrong
    _set_record(md, relative_path=f"../{name}")
    _save(folder, md)
    assert "outside the checkpoint folder" in _refused(folder, source[1], f"../{name}")

    folder, md = _copy(source, tmp_path / "link")
    shutil.move(folder / name, outside / name)
    os.symlink(outside / name, folder / name)  # the same name, now a symlink to a file elsewhere
    _save(folder, md)
    assert "symlink" in _refused(folder, source[1], name)

    folder, md = _copy(source, tmp_path / "linkdir")
    shutil.copy(folder / name, outside / name)
    os.symlink(outside, folder / "sub")  # a plain file behind a symlinked folder
    _set_record(md, relative_path=f"sub/{name}")
    _save(folder, md)
    assert "outside the checkpoint" in _refused(folder, source[1], "sub")


@pytest.mark.parametrize("kind", ["fifo", "folder", "absent"])
def test_records_naming_what_is_not_a_regular_file(kind, source, tmp_path):
    folder, md = _copy(source, tmp_path)
    target = folder / "__9_9.distcp"
    {"fifo": lambda: os.mkfifo(target), "folder": target.mkdir, "absent": lambda: None}[kind]()
    _set_record(md, relative_path=target.name)
    _save(folder, md)
    line = _refused(folder, source[1], target.name)
    assert ("missing" if kind == "absent" else "not a regular file") in line, line


def test_record_bounds_and_types(source, tmp_path):
    folder0, md0 = _copy(source, tmp_path / "probe")
    _, info = _record(md0)
    size = (folder0 / info.relative_path).stat().st_size
    cases = {
        "past the end": dict(offset=size - info.length + 1),
        "length past the end": dict(length=size + 1),
        "negative offset": dict(offset=-info.offset - 8),
        "float length": dict(length=float(info.length)),
        "bool offset": dict(offset=True),
        "path an int": dict(relative_path=7),
        "too short for the chunk": dict(length=3 * 5 * 4 - 1),
    }
    for name, changes in cases.items():
        folder, md = _copy(source, tmp_path / name.replace(" ", "-"))
        _set_record(md, **changes)
        _save(folder, md)
        line = _refused(folder, source[1], KEY, info.relative_path)
        if name == "past the end":
            assert "truncated" in line, line


# ---------------------------------------------------------------- controls


def test_sound_metadata_reads_bit_exact_however_ordered(source, tmp_path):
    folder, md = _copy(source, tmp_path)
    _chunks(md).reverse()
    md.state_dict_metadata = dict(reversed(list(md.state_dict_metadata.items())))
    md.storage_data = dict(reversed(list(md.storage_data.items())))
    _save(folder, md)
    assert read_dcp_metadata(folder)[KEY] == TensorSpec((12, 5), "float32")
    assert torch.equal(load_tensor(folder, KEY, TensorSpec((12, 5), "float32")), source[1][KEY])
    state = {k: torch.empty_like(v) for k, v in source[1].items()}
    load_state(folder, state)
    assert all(torch.equal(state[k], v) for k, v in source[1].items())


def test_a_converted_model_passes(tiny_dcp):
    md = dcp.FileSystemReader(str(tiny_dcp)).read_metadata()
    assert read_dcp_metadata(tiny_dcp).keys() == md.state_dict_metadata.keys()
    assert all(isinstance(v, TensorStorageMetadata) for v in md.state_dict_metadata.values())
