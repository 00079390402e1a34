"""``flame-ext reference``: its destination is checked before the model runs, the file is written atomically,
``--force`` replaces only a reference file, and nothing is left beside it (issue 10 found ``.ref.json.tmp-PID``)."""

from __future__ import annotations

import json

from flame_ext.cli import main


def _reference(capsys, model, out, *extra) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["reference", "--model", str(model), "--out", str(out), "--reference-seq-len", "32", *extra])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_written_once_replaced_with_force_and_nothing_beside(capsys, tiny_model, tmp_path):
    out = tmp_path / "refs" / "ref.json"  # the parent is created
    assert _reference(capsys, tiny_model, out)[0] == 0
    first = json.loads(out.read_text())
    assert first["kind"] == "reference" and len(first["reference"]["token_ids"][0]) == 32
    code, err = _reference(capsys, tiny_model, out)
    assert code == 2 and err == [
        f"flame-ext: error: {out}: already exists (a reference file); choose another path or pass --force to replace it"
    ]
    assert _reference(capsys, tiny_model, out, "--force")[0] == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["ref.json"]


def test_destination_is_refused_before_the_model_runs(capsys, tmp_path):
    """A foreign file at --out is the error, although the model does not exist either: the destination is
    checked first (it used to be checked after the model had run)."""
    out = tmp_path / "results.json"
    out.write_text('{"accuracy": 0.5}')
    code, err = _reference(capsys, tmp_path / "no-such-model", out, "--force")
    assert code == 2 and len(err) == 1 and "not a reference file" in err[0] and str(out) in err[0]
    assert out.read_text() == '{"accuracy": 0.5}' and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_failed_run_creates_nothing(capsys, tmp_path):
    out = tmp_path / "new" / "a" / "ref.json"
    code, err = _reference(capsys, tmp_path / "no-such-model", out)
    assert code == 2 and "no-such-model" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_rows_and_kinds_of_text(capsys, tiny_model, tmp_path):
    """``--reference-rows`` sets the batch's rows; the default text's first two 512-token rows (bytes, for
    the embedded byte-level model) already hold prose, code, numbers and another language."""
    out = tmp_path / "ref.json"
    assert _reference(capsys, tiny_model, out, "--reference-rows", "5")[0] == 0
    assert len(json.loads(out.read_text())["reference"]["token_ids"]) == 5
    assert main(["reference", "--model", str(tiny_model), "--out", str(out), "--force"]) == 0
    ids = json.loads(out.read_text())["reference"]["token_ids"]
    assert [len(row) for row in ids] == [512, 512]
    text = bytes(ids[0] + ids[1]).decode("utf-8", errors="ignore")
    for sample in ("the keeper climbed", "def lamp_hours(", "1891,365,1001.2", "la gardienne"):
        assert sample in text, sample


def test_a_reference_file_records_its_source_as_a_converted_checkpoint_does(capsys, tiny_model, tiny_dcp, tmp_path):
    """One ``build_manifest``: the reference file's source block is the converted checkpoint's, field for field
    (reference files used to leave out ``architectures``)."""
    out = tmp_path / "ref.json"
    assert _reference(capsys, tiny_model, out)[0] == 0
    source = json.loads(out.read_text())["source"]
    assert source["architectures"] == json.loads((tiny_model / "config.json").read_text())["architectures"]
    assert source == json.loads((tiny_dcp / "flame_ext.json").read_text())["source"]
