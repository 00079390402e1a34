"""SHA-256 of files and tensor blocks, the manifest's ``files`` section, and the folder comparison."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from flame_ext.errors import CheckpointFormatError
from flame_ext.io.digests import (
    block_sha256,
    compare_files,
    digest_files,
    file_sha256,
    files_section,
    recorded_files,
    written_files,
)


def test_file_sha256_is_hashlibs_over_the_whole_file_across_read_pieces(tmp_path):
    data = os.urandom((8 << 20) + 12345)  # more than one 8 MiB piece
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_block_sha256_is_of_the_bytes_as_stored_and_sees_one_bit():
    x = torch.randn(64, 32).to(torch.bfloat16)
    assert block_sha256(x) == hashlib.sha256(x.view(torch.uint8).numpy().tobytes()).hexdigest()
    assert block_sha256(x.t()) == block_sha256(x.t().contiguous())  # non-contiguous: row-major bytes
    y = x.clone()
    y.view(torch.int16)[3, 5] ^= 1  # one bit of one value
    assert block_sha256(y) != block_sha256(x)
    assert block_sha256(torch.tensor(2.0)) == hashlib.sha256(torch.tensor(2.0).numpy().tobytes()).hexdigest()


def test_the_section_round_trips_and_compare_names_each_difference(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(name.encode() * 10)
    (tmp_path / "flame_ext.json").write_text("{}")
    names = written_files(tmp_path, "flame_ext.json")
    assert names == ["a", "b", "c"]
    manifest = {"files": files_section(digest_files(tmp_path, names))}
    recorded = recorded_files(manifest)
    assert compare_files(tmp_path, recorded, ignore=["flame_ext.json"]) == []
    (tmp_path / "a").write_bytes(b"A" + b"a" * 9)
    (tmp_path / "b").unlink()
    (tmp_path / "d").write_bytes(b"new")
    (tmp_path / "c").unlink()
    (tmp_path / "c").symlink_to(tmp_path / "d")
    found = {d.name: d.what for d in compare_files(tmp_path, recorded, ignore=["flame_ext.json"])}
    assert found.keys() == {"a", "b", "c", "d"}
    assert found["a"].startswith("its bytes differ") and found["b"] == "missing"
    assert found["c"] == "not a regular file" and found["d"] == "added since"


def test_no_section_is_none():
    assert recorded_files({"format_version": 1}) is None
    assert recorded_files(None) is None


@pytest.mark.parametrize(
    "section",
    [
        "sha256",
        {"algorithm": "md5", "files": {"a": "0" * 64}},
        {"algorithm": "sha256", "files": {}},
        {"algorithm": "sha256", "files": {"../x": "0" * 64}},
        {"algorithm": "sha256", "files": {"a/b": "0" * 64}},
        {"algorithm": "sha256", "files": {"a": "0" * 63}},
        {"algorithm": "sha256", "files": {"a": "A" * 64}},
        {"algorithm": "sha256", "files": {"a": 7}},
    ],
)
def test_a_malformed_section_is_one_line_naming_the_field(tiny_dcp, tmp_path, section):
    """The manifest's schema is the one check of the section: reading the manifest refuses it, naming it."""
    import json

    from flame_ext.io.manifest import MANIFEST_NAME, read_manifest

    manifest = json.loads((tiny_dcp / MANIFEST_NAME).read_text())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest, "files": section}))
    with pytest.raises(CheckpointFormatError) as e:
        read_manifest(tmp_path)
    assert str(e.value).startswith(str(tmp_path / MANIFEST_NAME)) and "files" in str(e.value)
    assert "\n" not in str(e.value)
