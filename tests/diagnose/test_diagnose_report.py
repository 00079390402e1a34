"""What a user reads: the text report, the JSON contract, the drop-in module, the positional hint."""

from __future__ import annotations

from flame_ext.checks.loss import loss_gap_problem
from flame_ext.cli import main
from flame_ext.report import KINDS, LossComparison
from tests.diagnose.conftest import one_thread


def test_text_report_lines(catalogue, hf_models, capsys):
    capsys.readouterr()
    with one_thread():
        code = main(
            [
                "diagnose",
                "--checkpoint",
                str(catalogue("olmo2", "swapped_layers")),
                "--model",
                str(hf_models["olmo2"]),
                "--values",
                "--loss",
            ]
        )
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[0].startswith("flame-ext diagnose: ") and "(metadata, values, loss)" in out[0]
    assert out[1].startswith("parameters: HF ")
    errors = [line for line in out if line.startswith("  ERROR   ")]
    # One cause, one error line: the two layers and the count (22 tensors of OLMo2's two layers).
    assert any(
        line.startswith("  ERROR   value_mismatch: model.layers.0 and model.layers.1 are swapped: 22 tensors")
        for line in errors
    )
    assert any("loss_gap" in line for line in errors)
    assert any(line.strip().startswith("hint: ") for line in out)
    assert "  positions          observed   reference   delta" in out
    # Buckets are half-open ranges that meet without overlapping: [0, a), [a, b), ...
    rows = [line.split()[:2] for line in out if line.startswith("  [")]
    bounds = [(int(a.strip("[,")), int(b.strip(")"))) for a, b in rows]
    assert len(bounds) >= 2 and bounds[0][0] == 0 and all(x[1] == y[0] for x, y in zip(bounds, bounds[1:])), rows
    # At most 20 lines per kind, the rest counted.
    more = sum(int(line.split()[2]) for line in out if line.startswith("  ... and "))
    warnings = [line for line in out if line.startswith("  WARNING ")]  # the transformers 4.x load-path hazard
    n_err, n_warn = len(errors) + more, len(warnings)
    assert out[-1] == f"verdict: FAILED ({n_err} error{'s' * (n_err != 1)}, {n_warn} warning{'s' * (n_warn != 1)})"


def test_json_contract(catalogue, hf_models, diagnose_json):
    """The NaN checkpoint: its loss is NaN, which the JSON carries as null with a note (``diagnose_json``
    parses strictly and validates against the schema)."""
    _, r = diagnose_json("--checkpoint", catalogue("olmo2", "nan"), "--model", hf_models["olmo2"], "--values", "--loss")
    assert set(r) >= {"ok", "problems", "counts", "loss"} and r["ok"] is False
    assert r["schema_version"] == 1 and r["verdict"] == "FAILED" and r["checked"][-2:] == ["values", "loss"]
    assert r["errors"] == sum(p["severity"] == "error" for p in r["problems"]) and r["errors"] > 0
    assert r["warnings"] == len(r["problems"]) - r["errors"]
    assert list(r["problem_kinds"]) == list(KINDS) and r["problem_kinds"]["nonfinite"] >= 1
    # One note for every number written as null (a NaN loss makes seven): not one note each.
    (nulled,) = [n for n in r["notes"] if "written as null" in n]
    assert nulled == (
        "loss.observed, loss.delta, loss.by_position observed (4 buckets), loss.first_position_delta and "
        "loss.token_delta are nan (not finite); written as null"
    )
    assert r["loss"]["observed"] is None
    assert set(r["counts"]) == {"hf_params", "dcp_params", "missing", "unexpected", "shape", "dtype"}
    # The contract's loss fields, first_position_delta (an addition: what the positional hint reads), and the
    # per-token gap with its threshold (an addition: what the mean's cancelling errors hide).
    assert set(r["loss"]) == {
        "reference",
        "observed",
        "delta",
        "threshold",
        "by_position",
        "first_position_delta",
        "token_delta",
        "token_threshold",
    }
    assert r["loss"]["token_delta"] is None
    for p in r["problems"]:
        assert set(p) == {"kind", "severity", "key", "detail", "hint"} and p["kind"] in KINDS
        assert p["severity"] in ("error", "warning") and p["hint"]


def test_drop_in_module_in_process(catalogue, hf_models, capsys):
    from flame_ext.diagnose_checkpoint import main as drop_in

    with one_thread():
        code = drop_in(["--checkpoint", str(catalogue("olmo2")), "--model", str(hf_models["olmo2"]), "--values"])
    assert code == 0 and capsys.readouterr().out.splitlines()[-1].startswith("verdict: OK")
    with one_thread():
        code = drop_in(
            [
                "--checkpoint",
                str(catalogue("olmo2", "transposed")),
                "--model",
                str(hf_models["olmo2"]),
                "--values",
                "--trust_remote_code",
            ]
        )
    assert code == 1


def _buckets(gaps: list[float]) -> list[dict]:
    return [{"start": i * 10, "end": (i + 1) * 10, "observed": 2.0 + g, "reference": 2.0} for i, g in enumerate(gaps)]


def test_positional_hint_only_when_the_gap_grows_with_position():
    growing = LossComparison(reference=2.0, observed=2.5, threshold=0.1, by_position=_buckets([0.05, 0.3, 0.6, 1.0]))
    flat = LossComparison(reference=2.0, observed=2.5, threshold=0.1, by_position=_buckets([0.5, 0.5, 0.5, 0.5]))
    growing_problem = loss_gap_problem(growing, what="loss", next_step="run with --values")
    flat_problem = loss_gap_problem(flat, what="loss", next_step="run with --values")
    assert "positional encoding" in growing_problem.hint and "positional encoding" not in flat_problem.hint
    assert flat_problem.hint.endswith("; run with --values") and growing_problem.hint.endswith("; run with --values")
    assert (flat_problem.kind, flat_problem.severity) == ("loss_gap", "error")
    assert "2.5000 vs HF reference 2.0000: delta +0.5000 nats exceeds the threshold 0.1" in flat_problem.detail


def test_reference_file_for_a_checkpoint_converted_elsewhere(catalogue, hf_models, diagnose_json, tmp_path, capsys):
    """No manifest in the checkpoint: `flame-ext reference` records one, `--reference` passes it to --loss."""
    with one_thread():
        assert main(["reference", "--model", str(hf_models["llama"]), "--out", str(tmp_path / "ref.json")]) == 0
        assert main(["reference", "--model", str(hf_models["olmo2"]), "--out", str(tmp_path / "other.json")]) == 0
    ckpt = catalogue("llama", "nested")
    _, r = diagnose_json(
        "--checkpoint", ckpt, "--model", hf_models["llama"], "--loss", "--reference", tmp_path / "ref.json"
    )
    assert not [p for p in r["problems"] if p["kind"] == "manifest"]
    assert any("recorded HF reference" in n for n in r["notes"]) and abs(r["loss"]["delta"]) < 1e-3
    _, r = diagnose_json(
        "--checkpoint", ckpt, "--model", hf_models["llama"], "--loss", "--reference", tmp_path / "other.json"
    )
    foreign = [p for p in r["problems"] if p["kind"] == "manifest" and p["severity"] == "error"]
    assert len(foreign) == 1 and "another model" in foreign[0]["detail"] and "'olmo2'" in foreign[0]["detail"]
    assert any("measured now" in n for n in r["notes"])  # the foreign reference was not used


def test_a_reference_batch_for_another_vocabulary_is_a_manifest_error(catalogue, hf_models, diagnose_json, tmp_path):
    """The same rule as the guard's (checks.loss.reference_fit_problem): named, and the loss not measured."""
    import json
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(catalogue("olmo2"), ckpt)
    manifest = json.loads((ckpt / "flame_ext.json").read_text())
    manifest["reference"]["token_ids"][0][3] = 10**6
    (ckpt / "flame_ext.json").write_text(json.dumps(manifest))
    code, r = diagnose_json("--checkpoint", ckpt, "--model", hf_models["olmo2"], "--loss")
    assert code == 1 and r["loss"] is None
    foreign = [p for p in r["problems"] if p["kind"] == "manifest" and p["severity"] == "error"]
    assert len(foreign) == 1 and "token id 1000000 is outside the model's vocabulary" in foreign[0]["detail"]
    assert foreign[0]["detail"].startswith(str(ckpt / "flame_ext.json"))
