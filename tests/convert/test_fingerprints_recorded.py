"""Conversion and `flame-ext reference` record each tensor's fingerprint of the values as stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flame_ext.commands.reference import source_fingerprints
from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.fingerprints.algorithm import TERMS, fingerprint, matches
from flame_ext.fingerprints.record import read_fingerprints
from flame_ext.io.dcp import load_tensor, read_dcp_metadata
from flame_ext.io.hf import open_hf
from flame_ext.io.manifest import read_manifest


def written_fingerprints(folder: Path) -> dict:
    return {k: fingerprint(load_tensor(folder, k, s)) for k, s in read_dcp_metadata(folder).items() if s is not None}


def test_every_written_tensor_has_the_fingerprint_of_what_was_written(tiny_dcp):
    recorded, note = read_fingerprints(read_manifest(tiny_dcp))
    assert note is None
    actual = written_fingerprints(tiny_dcp)
    assert set(recorded) == set(actual)
    for key, (dtype, fp) in recorded.items():
        assert matches(fp, actual[key], recorded.tolerance), key
    # JSON stays strict: the file parses without NaN/Infinity literals
    json.loads((tiny_dcp / "flame_ext.json").read_text(), parse_constant=lambda c: pytest.fail(c))


@pytest.mark.slow  # a conversion and a source pass at 4 KB blocks (7 CPU-s); make test-fast leaves it out
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_small_blocks_and_a_cast_record_the_cast_values(tiny_model, tmp_path, dtype):
    out = tmp_path / "ck"
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(tiny_model), checkpoint=str(out), dtype=dtype, buffer_bytes=4096, progress=False, reference=False
        )
    )
    recorded, _ = read_fingerprints(read_manifest(out))
    actual = written_fingerprints(out)
    assert all(d == dtype for d, _ in recorded.values())
    assert all(matches(fp, actual[k]) for k, (_, fp) in recorded.items())
    # `flame-ext reference --dtype` streams the HF files to the same fingerprints, without a checkpoint
    section = source_fingerprints(open_hf(tiny_model), dtype, buffer_bytes=2048)
    assert section["terms"] == list(TERMS)
    for key, item in section["tensors"].items():
        assert matches(item["fingerprint"], recorded[key][1]), key


def test_the_roundings_to_the_other_training_dtypes_are_recorded_and_equal_a_conversion_at_them(tiny_dcp, tmp_path):
    """An fp32 conversion records, per tensor, the fingerprints of its values rounded to bf16 and fp16. The
    bf16 one is exactly what a bf16 conversion of the same source records (and the reference command's): a
    checkpoint stored or loaded at bf16 verifies against either record."""
    recorded, _ = read_fingerprints(read_manifest(tiny_dcp))
    assert all(sorted(recorded.rounded[k]) == ["bfloat16", "float16"] for k in recorded)
    bf16 = tmp_path / "bf16"
    source = read_manifest(tiny_dcp)["source"]["path"]
    convert_hf_to_dcp(
        ConvertOptions(model=source, checkpoint=str(bf16), dtype="bfloat16", reference=False, progress=False)
    )
    at_bf16, _ = read_fingerprints(read_manifest(bf16))
    assert all(sorted(at_bf16.rounded[k]) == ["float16"] for k in at_bf16)  # bf16 -> fp32 is exact: not recorded
    for key, (_, fp) in at_bf16.items():
        assert matches(recorded.rounded[key]["bfloat16"], fp, recorded.tolerance), key
    section = source_fingerprints(open_hf(source), "float32")  # what `flame-ext reference --dtype float32` records
    for key, item in section["tensors"].items():
        assert matches(item["rounded"]["bfloat16"], at_bf16[key][1]), key
        assert matches(item["rounded"]["float16"], recorded.rounded[key]["float16"]), key


def test_fresh_keys_get_the_fingerprint_of_the_values_written(tiny_model, tmp_path):
    out = tmp_path / "fp"
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(tiny_model),
            checkpoint=str(out),
            include_future_predictor=True,
            future_predictor_head_type="linear",
            reference=False,
            progress=False,
        )
    )
    manifest = read_manifest(out)
    recorded, _ = read_fingerprints(manifest)
    actual = written_fingerprints(out)
    assert manifest["fresh_keys"] and all(k in recorded for k in manifest["fresh_keys"])
    assert all(matches(recorded[k][1], actual[k]) for k in manifest["fresh_keys"])


def test_a_manifest_without_fingerprints_still_reads_with_a_note(tiny_dcp, tmp_path):
    data = json.loads((tiny_dcp / "flame_ext.json").read_text())
    del data["fingerprints"]
    (tmp_path / "flame_ext.json").write_text(json.dumps(data))
    fps, note = read_fingerprints(read_manifest(tmp_path))
    assert fps is None and "no fingerprints" in note


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.update(tolerance=float("inf")),
        lambda s: s["tensors"].update(x={"dtype": "float32", "fingerprint": [1, 2]}),
        lambda s: s["tensors"].update(x={"dtype": "os.system", "fingerprint": [0] * len(TERMS)}),
    ],
)
def test_a_malformed_fingerprint_section_is_refused_in_one_line(tiny_dcp, tmp_path, damage):
    from flame_ext.errors import CheckpointFormatError

    data = json.loads((tiny_dcp / "flame_ext.json").read_text())
    damage(data["fingerprints"])
    (tmp_path / "flame_ext.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointFormatError, match="fingerprints"):
        read_manifest(tmp_path)
