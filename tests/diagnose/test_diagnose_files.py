"""``diagnose --files`` against ``convert --record-sha256``, and the limit it exists for: the fingerprints are sums,
so a forger who can write the checkpoint passes ``--values``; the SHA-256 of the files does not let them."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import pytest
import torch
from support.cli import report_json, run_cli
from torch.distributed.checkpoint import FileSystemReader

from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.fingerprints.algorithm import fingerprint, matches
from flame_ext.io.dcp import load_tensor, read_dcp_metadata
from flame_ext.io.manifest import MANIFEST_NAME, read_manifest

FORGED = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def recorded(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recorded") / "step-0"
    opts = ConvertOptions(
        model=str(tiny_model), checkpoint=str(out), reference=False, progress=False, record_sha256=True
    )
    convert_hf_to_dcp(opts)
    return out


@pytest.fixture
def checkpoint(recorded, tmp_path) -> Path:
    """A fresh copy of the recorded checkpoint, for a test to change."""
    return Path(shutil.copytree(recorded, tmp_path / "step-0"))


def diagnose(folder: Path, *flags: str) -> tuple[int, dict]:
    proc = run_cli("diagnose", "--checkpoint", str(folder), *flags, "--json")
    return proc.returncode, report_json(proc.stdout)


# ---------------------------------------------------------------- a forgery, built as the threat model describes


def _weyl(n: int, a: float) -> torch.Tensor:
    return 2 * torch.frac(torch.arange(1, n + 1, dtype=torch.float64) * a) - 1


def _terms(z: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear weights of the fingerprint, written out from docs/fingerprints.md (not taken from the code):
    per element, the weights of sum, row_p, row_q, col_p, col_q, row_p_col_q, row_q_col_p; and a function of
    the flat tensor giving those seven sums, sum_sq and sum_abs."""
    p, q = (math.sqrt(5) - 1) / 2, math.sqrt(2) - 1
    pi, qi = _weyl(rows, p)[:, None], _weyl(rows, q)[:, None]
    pj, qj = _weyl(cols, p)[None], _weyl(cols, q)[None]
    one = torch.ones(rows, cols, dtype=torch.float64)
    w = torch.stack([one, pi * one, qi * one, pj * one, qj * one, pi * qj, qi * pj]).reshape(7, -1)
    return w, torch.cat([w @ z, (z * z).sum()[None], z.abs().sum()[None]])


def forge(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows permuted, rows permuted and then nudged until the ten sums match ``x``'s again).

    The nudge solves the nine sums for the smallest change (Newton steps on the two that are not linear),
    first over every element relatively (no sign flips, so ``sum_abs`` stays linear), then over 64 small
    elements, where float32 rounding of the result costs least. Each step stores the values as float32."""
    rows, cols = x.shape
    w, target = _terms(x.double().reshape(-1), rows, cols)
    permuted = x[torch.randperm(rows, generator=torch.Generator().manual_seed(0))]

    def solve(z: torch.Tensor, idx: torch.Tensor, relative: bool) -> torch.Tensor:
        for _ in range(8):
            zi = z[idx]
            jac = torch.cat([w[:, idx], 2 * zi[None], torch.sign(zi)[None]]) * (zi if relative else 1)
            step = jac.T @ torch.linalg.solve(jac @ jac.T, target - _terms(z, rows, cols)[1])
            z = z.clone()
            z[idx] = zi * (1 + step) if relative else zi + step
            z = z.float().double()
        return z

    z = solve(permuted.double().reshape(-1), torch.arange(x.numel()), relative=True)
    size = z.abs() / z.abs().std()
    z = solve(z, torch.nonzero((size > 0.03) & (size < 0.08)).flatten()[:64], relative=False)
    return permuted, z.float().reshape(rows, cols)


def write_in_place(folder: Path, key: str, value: torch.Tensor) -> str:
    """Overwrite ``key``'s bytes inside its data file, as someone with write access to the checkpoint could:
    ``.metadata``, the manifest and every other byte stay as they were. Returns the file's name."""
    md = FileSystemReader(str(folder)).read_metadata()
    ((index, info),) = [(ix, s) for ix, s in md.storage_data.items() if ix.fqn == key]  # one chunk: one file
    buf = io.BytesIO()
    torch.save(value.contiguous(), buf)  # the per-item format torch's FileSystemWriter writes
    assert len(buf.getvalue()) == info.length, "the forged chunk must fill exactly the bytes of the original"
    with open(folder / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(buf.getvalue())
    return info.relative_path


@pytest.mark.slow  # commands in fresh processes (5-15 CPU-s); make test-fast leaves it out
def test_a_forged_tensor_passes_the_fingerprints_and_is_caught_by_the_files_sha256(checkpoint):
    spec = read_dcp_metadata(checkpoint)[FORGED]
    original = load_tensor(checkpoint, FORGED, spec)
    permuted, forged = forge(original)
    assert not torch.equal(forged, original) and (forged - original).abs().max() > 0.1 * original.abs().max()
    assert not matches(fingerprint(permuted), fingerprint(original))  # the permutation alone is seen
    assert matches(fingerprint(forged), fingerprint(original))  # the nudged one is not

    name = write_in_place(checkpoint, FORGED, forged)
    assert torch.equal(load_tensor(checkpoint, FORGED, spec), forged)  # what a trainer would load

    code, report = diagnose(checkpoint, "--values")
    assert (code, report["ok"]) == (0, True), report["problems"]  # the documented limit: linear sums are forgeable
    code, report = diagnose(checkpoint, "--files")
    assert code == 1 and report["checked"][-1] == "files"
    ((problem,),) = [[p for p in report["problems"] if p["kind"] == "manifest"]]
    assert problem["key"] == name and problem["severity"] == "error" and "bytes differ" in problem["detail"]


def test_the_permuted_tensor_without_the_forgers_nudge_fails_values(checkpoint):
    """The control for the test above: the same rows permuted, not nudged, is named by ``--values``."""
    spec = read_dcp_metadata(checkpoint)[FORGED]
    permuted, _ = forge(load_tensor(checkpoint, FORGED, spec))
    write_in_place(checkpoint, FORGED, permuted)
    code, report = diagnose(checkpoint, "--values")
    assert code == 1 and [p["key"] for p in report["problems"]] == [FORGED]
    assert "rows permuted" in report["problems"][0]["detail"]


# ---------------------------------------------------------------- --record-sha256 and --files themselves


def test_record_sha256_lists_every_file_written_but_the_manifest(recorded):
    section = read_manifest(recorded)["files"]
    assert section["algorithm"] == "sha256"
    assert sorted(section["files"]) == sorted(p.name for p in recorded.iterdir() if p.name != MANIFEST_NAME)
    assert ".metadata" in section["files"] and all(len(d) == 64 for d in section["files"].values())


def test_files_of_an_untouched_checkpoint_pass(recorded):
    code, report = diagnose(recorded, "--files")
    assert (code, report["ok"]) == (0, True)
    assert "files" in report["checked"]
    assert any(
        n.startswith(f"files: {len(read_manifest(recorded)['files']['files'])} recorded") for n in report["notes"]
    )


def test_files_added_or_changed_by_one_byte_are_each_one_problem(checkpoint):
    data = sorted(checkpoint.glob("__0_*.distcp"))
    (checkpoint / "notes.txt").write_text("added after conversion")
    for changed in data[:2]:
        raw = bytearray(changed.read_bytes())
        raw[-1] ^= 1
        changed.write_bytes(raw)
    code, report = diagnose(checkpoint, "--files")
    assert code == 1
    found = {p["key"]: p["detail"] for p in report["problems"] if p["kind"] == "manifest"}
    assert found.keys() == {data[0].name, data[1].name, "notes.txt"}
    assert found["notes.txt"].startswith("added since")
    assert all(found[f.name].startswith("its bytes differ") for f in data[:2])


def test_a_missing_data_file_is_refused_by_the_metadata_check_naming_it(checkpoint):
    """A DCP folder without one of its data files cannot be read at all: the metadata pass refuses it (exit 2)
    before any file is hashed; ``io.digests.compare_files`` itself names a missing file as one difference."""
    from flame_ext.io.digests import compare_files, recorded_files

    gone = sorted(checkpoint.glob("__0_*.distcp"))[0]
    gone.unlink()
    digests = recorded_files(read_manifest(checkpoint))
    assert compare_files(checkpoint, digests, ignore=[MANIFEST_NAME]) == [(gone.name, "missing")]
    proc = run_cli("diagnose", "--checkpoint", str(checkpoint), "--files")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert gone.name in line


def test_files_without_a_record_is_refused_with_one_line(tiny_dcp):
    proc = run_cli("diagnose", "--checkpoint", str(tiny_dcp), "--files")
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert "converted without --record-sha256" in line and "records no file digests" in line


def test_a_files_record_that_is_not_digests_is_refused_with_one_line(checkpoint):
    import json

    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    manifest["files"]["files"][".metadata"] = "not-a-digest"
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest))
    proc = run_cli("diagnose", "--checkpoint", str(checkpoint), "--files")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    # The manifest's schema refuses it when the manifest is read, naming the field
    assert line.startswith("flame-ext: error: ") and "files" in line and ".metadata" in line
    assert "64 lowercase hexadecimal digits" in line
