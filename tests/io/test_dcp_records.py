"""DCP tensors mapped from their data files: located in every record the converter writes, bit-exact with
torch's reader, and anything else left to torch's reader (same values, or its error)."""

from __future__ import annotations

import io
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.errors import CheckpointFormatError
from flame_ext.io.dcp import DCPRowReader, _unpickle_metadata, load_tensor, read_dcp_metadata
from flame_ext.io.dcp_records import mapped_blocks, stored_rows


@pytest.fixture(scope="module")
def chunked(sharded_model, tmp_path_factory) -> Path:
    """The sharded model converted with a small buffer: its larger tensors are stored as several row chunks."""
    out = tmp_path_factory.mktemp("records") / "step-0"
    small = 2**14
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(sharded_model), checkpoint=str(out), reference=False, progress=False, buffer_bytes=small
        )
    )
    return out


def _torch_reads(folder: Path, key: str) -> torch.Tensor:
    """The tensor as torch's own ``FileSystemReader`` reads it (``torch.load`` of each record)."""
    spec = read_dcp_metadata(folder)[key]
    assert spec is not None
    return load_tensor(folder, key, spec)


def test_every_record_the_converter_writes_is_located_and_maps_bit_exact(chunked):
    metadata = _unpickle_metadata(chunked)
    specs = {k: s for k, s in read_dcp_metadata(chunked).items() if s is not None and s.shape}
    several = [k for k in specs if len(metadata.state_dict_metadata[k].chunks) > 1]
    assert several, "the fixture should store some tensors as several chunks"
    for key, spec in specs.items():
        chunks = stored_rows(chunked, metadata, key)
        assert chunks is not None, key  # the fast path is taken, not silently skipped
        whole = _torch_reads(chunked, key)
        for buffer in (spec.nbytes, 3 * spec.nbytes // spec.shape[0] + 1):  # whole chunks; a few rows at a time
            blocks = list(mapped_blocks(chunks, spec, buffer))
            assert all(b.nbytes <= max(buffer, spec.nbytes // spec.shape[0]) for b in blocks)
            assert torch.cat(blocks).view(torch.uint8).equal(whole.view(torch.uint8)), key


def test_a_block_written_to_changes_its_own_copy_not_the_file(chunked):
    key = "model.embed_tokens.weight"
    spec = read_dcp_metadata(chunked)[key]
    block = next(DCPRowReader(chunked).blocks(key, spec, spec.nbytes))
    before = _torch_reads(chunked, key)
    block.zero_()
    assert _torch_reads(chunked, key).equal(before)


def _with_noncontiguous_record(folder: Path) -> Path:
    """A checkpoint written by torch's own ``dcp.save`` whose tensor is a transposed (non-contiguous) view."""
    value = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    dcp.save({"w": value}, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    return folder


def test_a_record_that_is_not_one_contiguous_range_is_read_through_dcp(tmp_path):
    folder = _with_noncontiguous_record(tmp_path / "ckpt")
    assert stored_rows(folder, _unpickle_metadata(folder), "w") is None
    spec = read_dcp_metadata(folder)["w"]
    got = torch.cat(list(DCPRowReader(folder).blocks("w", spec, 16)))
    assert got.equal(torch.arange(12, dtype=torch.float32).reshape(3, 4).t())


def test_a_damaged_record_is_left_to_dcp_which_names_it(chunked, tmp_path):
    folder = Path(shutil.copytree(chunked, tmp_path / "ckpt"))
    metadata = _unpickle_metadata(folder)
    key = "model.embed_tokens.weight"
    info = metadata.storage_data[next(i for i in metadata.storage_data if i.fqn == key)]
    with open(folder / info.relative_path, "r+b") as f:  # the record's zip signature: torch cannot parse it
        f.seek(info.offset)
        f.write(b"XXXX")
    assert stored_rows(folder, _unpickle_metadata(folder), key) is None
    spec = read_dcp_metadata(folder)[key]
    with pytest.raises(CheckpointFormatError, match="cannot read"):
        list(DCPRowReader(folder).blocks(key, spec, spec.nbytes))


def _as_big_endian(folder: Path, key: str) -> None:
    """Rewrite ``key``'s record as a big-endian machine's ``torch.save`` writes it: its byteorder entry says
    "big" and its data is byte-swapped (so torch, which swaps it back as it loads, reads the same values)."""
    metadata = _unpickle_metadata(folder)
    index = next(i for i in metadata.storage_data if i.fqn == key)
    info = metadata.storage_data[index]
    assert info.offset == 0, "torch's own writer: one record per file here"
    path = folder / info.relative_path
    itemsize = metadata.state_dict_metadata[key].properties.dtype.itemsize
    with zipfile.ZipFile(path) as source:
        entries = {e.filename: source.read(e) for e in source.infolist()}
    rewritten = io.BytesIO()
    with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_STORED) as target:
        for name, data in entries.items():
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                data = bytes(memoryview(data).cast("B")[i ^ (itemsize - 1)] for i in range(len(data)))
            target.writestr(name, data)
    path.write_bytes(rewritten.getvalue())
    metadata.storage_data[index] = type(info)(info.relative_path, 0, len(rewritten.getvalue()), None)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def test_a_record_declaring_another_byte_order_is_read_through_dcp(tmp_path):
    """torch byte-swaps such a record as it loads it; a view of the file would hand on the bytes unswapped."""
    folder = tmp_path / "ckpt"
    value = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 0.25
    dcp.save({"w": value}, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    assert stored_rows(folder, _unpickle_metadata(folder), "w") is not None  # control: mapped as written
    _as_big_endian(folder, "w")
    assert stored_rows(folder, _unpickle_metadata(folder), "w") is None
    spec = read_dcp_metadata(folder)["w"]
    assert torch.cat(list(DCPRowReader(folder).blocks("w", spec, 8))).equal(value)
