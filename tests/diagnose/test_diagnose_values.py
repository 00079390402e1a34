"""The --values pass: streaming in blocks, exact at equal dtypes, one rounding allowed across a cast."""

from __future__ import annotations

import pytest
import torch

from flame_ext.checks.checkpoint_values import narrower
from flame_ext.commands.diagnose import DiagnoseOptions, diagnose
from flame_ext.io.dcp import DCPRowReader, read_dcp_metadata
from flame_ext.io.dcp_save import WriteEntry, save_streaming
from flame_ext.io.specs import TensorSpec
from tests.diagnose.conftest import TRANSPOSED, load_all, one_thread, save_dcp


def test_row_reader_crosses_stored_chunks(tmp_path):
    """A tensor stored as 7-row chunks read back in arbitrary row ranges, and a 0-d tensor."""
    t, s = torch.randn(37, 5), torch.tensor(3.0)
    save_streaming(
        tmp_path / "c",
        [
            WriteEntry("a", TensorSpec((37, 5), "float32"), lambda a, b: t[a:b]),
            WriteEntry("s", TensorSpec((), "float32"), lambda a, b: s),
        ],
        buffer_bytes=7 * 5 * 4,
    )
    found = read_dcp_metadata(tmp_path / "c")
    reader = DCPRowReader(tmp_path / "c")
    for start, end in [(0, 37), (3, 11), (10, 30), (36, 37)]:
        assert torch.equal(reader.rows("a", found["a"], start, end), t[start:end])
    assert torch.equal(reader.rows("s", found["s"], 0, 1), s)


def test_narrower():
    assert narrower(torch.float32, torch.bfloat16) == torch.bfloat16
    assert narrower(torch.bfloat16, torch.float16) == torch.bfloat16
    assert narrower(torch.float32, torch.float32) == torch.float32


def _values(ckpt, model, **kw):
    with one_thread():
        return diagnose(DiagnoseOptions(checkpoint=str(ckpt), model=str(model), values=True, **kw))


def test_small_blocks_give_the_same_verdict(catalogue, hf_models):
    """1 KiB blocks (every tensor read in many row blocks on both sides) find the same problems."""
    ckpt = catalogue("olmo2", "swapped_layers")
    whole, blocks = _values(ckpt, hf_models["olmo2"]), _values(ckpt, hf_models["olmo2"], buffer_bytes=1024)
    assert [(p.kind, p.key, p.detail) for p in whole.problems] == [(p.kind, p.key, p.detail) for p in blocks.problems]
    assert any(p.kind == "value_mismatch" for p in blocks.problems)


def _nudged(sd: dict, key: str, ulps: int) -> dict:
    """``key`` moved ``ulps`` representable steps away from its value in its own dtype."""
    t = sd[key].clone()
    for _ in range(ulps):
        t = torch.nextafter(t, torch.full_like(t, float("inf")))
    return {**sd, key: t}


def test_equal_dtypes_must_match_exactly(catalogue, hf_models, tmp_path):
    sd = load_all(catalogue("olmo2"))
    report = _values(save_dcp(_nudged(sd, TRANSPOSED, 1), tmp_path / "c"), hf_models["olmo2"])
    assert [p.key for p in report.problems if p.kind == "value_mismatch"] == [TRANSPOSED]


def test_a_cast_may_round_once_not_twice(catalogue, hf_models, tmp_path):
    bf16 = load_all(catalogue("olmo2", "bf16"))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    ok = _values(catalogue("olmo2", "bf16"), hf_models["olmo2"])
    assert not [p for p in ok.problems if p.kind == "value_mismatch"]
    bad = _values(save_dcp(_nudged(bf16, TRANSPOSED, 2), tmp_path / "c"), hf_models["olmo2"])
    mismatch = [p for p in bad.problems if p.kind == "value_mismatch"]
    assert [p.key for p in mismatch] == [TRANSPOSED] and "float32 -> bfloat16 rounding" in mismatch[0].detail


def test_metadata_pass_reads_no_tensor_data(catalogue, hf_models, tmp_path, capsys):
    """Data files overwritten with zeros (same sizes): the metadata pass cannot tell; --values can."""
    import shutil

    from flame_ext.cli import main

    ckpt = shutil.copytree(catalogue("olmo2"), tmp_path / "zeros")
    for f in ckpt.glob("*.distcp"):
        f.write_bytes(bytes(f.stat().st_size))
    capsys.readouterr()
    with one_thread():
        assert main(["diagnose", "--checkpoint", str(ckpt), "--model", str(hf_models["olmo2"])]) == 0
        assert main(["diagnose", "--checkpoint", str(ckpt), "--model", str(hf_models["olmo2"]), "--values"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read" in err[0]


def test_values_without_a_model_verify_against_the_manifest_fingerprints(catalogue, diagnose_json, monkeypatch):
    """No --model: the checkpoint is checked against what was written, the HF files are never opened."""
    import flame_ext.checks.checkpoint_values as values

    monkeypatch.setattr(values, "read_tensor", lambda *a, **k: pytest.fail("the HF source was read"))
    code, r = diagnose_json("--checkpoint", catalogue("olmo2", "transposed"), "--values")
    assert code == 1
    (problem,) = [p for p in r["problems"] if p["kind"] == "value_mismatch"]
    assert problem["key"] == "model.layers.0.self_attn.o_proj.weight"
    assert "transposed" in problem["detail"] and "transposed" in problem["hint"]
    code, r = diagnose_json("--checkpoint", catalogue("olmo2"), "--values")
    assert code == 0 and not [p for p in r["problems"] if p["kind"] == "value_mismatch"]


def test_atol_rtol_set_a_deliberate_tolerance_against_the_hf_source(catalogue, hf_models, diagnose_json):
    """bf16 checkpoint of an fp32 model: beyond one rounding it fails; with a loose enough rtol it passes."""
    args = ("--checkpoint", catalogue("olmo2", "bf16"), "--model", hf_models["olmo2"], "--values")
    code, r = diagnose_json(*args, "--rtol", "1e-6")
    assert code == 1 and any(p["kind"] == "value_mismatch" for p in r["problems"])
    code, r = diagnose_json(*args, "--rtol", "0.01", "--atol", "1e-6")
    assert not [p for p in r["problems"] if p["kind"] == "value_mismatch"]


def _fp32_reference(model, out):
    """``flame-ext reference --model MODEL --out OUT --dtype float32``, through the real CLI."""
    from flame_ext.cli import main

    assert main(["reference", "--model", str(model), "--out", str(out), "--dtype", "float32"]) == 0
    return out


def test_values_of_a_bf16_checkpoint_verify_exactly_against_an_fp32_reference(
    catalogue, hf_models, diagnose_json, tmp_path
):
    """The reference records the fp32 values and their bf16 rounding: a bf16 checkpoint matches the latter."""
    import shutil

    checkpoint = tmp_path / "bf16"
    shutil.copytree(catalogue("olmo2", "bf16"), checkpoint)
    shutil.copy2(_fp32_reference(hf_models["olmo2"], tmp_path / "ref.json"), checkpoint / "flame_ext.json")
    code, r = diagnose_json("--checkpoint", checkpoint, "--values")
    assert code == 0, r["problems"]
    assert any(n.startswith("values: 25 of 25 tensors verified") for n in r["notes"]), r["notes"]


def test_values_moved_below_the_recorded_resolution_are_named(catalogue, diagnose_json, tmp_path):
    """An fp32 checkpoint whose o_proj sits within half a bf16 step of the bf16-recorded one: rounded, it would
    pass; as stored it is not what was written."""
    key = "model.layers.0.self_attn.o_proj.weight"
    bf16 = catalogue("olmo2", "bf16")
    state = {k: v.float() for k, v in load_all(bf16).items()}
    state[key] = state[key] * (1 + 2**-10)
    moved = save_dcp(state, tmp_path / "moved", manifest_from=bf16)
    code, r = diagnose_json("--checkpoint", moved, "--values")
    assert code == 1
    (problem,) = [p for p in r["problems"] if p["kind"] == "value_mismatch"]
    assert problem["key"] == key and "values of float32, recorded as bfloat16" in problem["detail"]
    assert any(n.startswith("values: 25 of 25 tensors verified") for n in r["notes"])


def test_values_of_tensors_without_a_fingerprint_are_an_error(catalogue, diagnose_json, tmp_path):
    """--values asks for every value: a manifest that records fewer tensors than the checkpoint holds fails,
    naming the count and the first keys."""
    import json
    import shutil

    checkpoint = tmp_path / "partial"
    shutil.copytree(catalogue("olmo2"), checkpoint)
    manifest = json.loads((checkpoint / "flame_ext.json").read_text())
    for key in ("lm_head.weight", "model.norm.weight"):
        del manifest["fingerprints"]["tensors"][key]
    (checkpoint / "flame_ext.json").write_text(json.dumps(manifest))
    code, r = diagnose_json("--checkpoint", checkpoint, "--values")
    assert code == 1
    (problem,) = [p for p in r["problems"] if p["kind"] == "manifest" and "fingerprint" in p["detail"]]
    assert problem["severity"] == "error"
    assert "values: 23 of 25 tensors verified: no fingerprint recorded for 2 stored tensors" in problem["detail"]
    assert "(e.g. lm_head.weight, model.norm.weight)" in problem["detail"]
