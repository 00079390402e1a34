"""The JSON report contract: the schema file in the package, and what ``Report.to_dict`` promises (strict JSON,
versioned, every kind counted, non-finite numbers as null with a note), checked with ``jsonschema``."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
from support.cli import report_json, valid_report

from flame_ext.report import KINDS, SCHEMA_PATH, LossComparison, Problem, Report, bucket_label, error_record, plural


def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def test_the_schema_is_a_valid_schema_and_names_every_kind():
    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$defs"]["kind"]["enum"] == list(KINDS)
    assert schema["$defs"]["report"]["properties"]["problem_kinds"]["required"] == list(KINDS)


def test_the_schema_ships_as_package_data():
    from importlib.resources import files

    assert files("flame_ext").joinpath("schemas/report.schema.json").read_text() == SCHEMA_PATH.read_text()


def _report(observed: float) -> Report:
    buckets = [
        {"start": 0, "end": 128, "observed": observed, "reference": 2.0},
        {"start": 128, "end": 256, "observed": 2.1, "reference": 2.0},
    ]
    return Report(
        problems=[
            Problem("loss_gap", "error", None, "gap", "fix it"),
            Problem("dtype_mismatch", "warning", "w", "d", "h"),
        ],
        counts={"hf_params": 10, "dcp_params": 10},
        loss=LossComparison(2.0, observed, 0.1, buckets, first_position_delta=observed - 2.0),
        checked=["metadata", "loss"],
    )


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_null_with_a_note(value):
    text = _report(value).to_json()
    data = report_json(text)  # strict: a bare NaN/Infinity would fail here
    assert data["loss"]["observed"] is None and data["loss"]["delta"] is None
    assert data["loss"]["by_position"][0]["observed"] is None and data["loss"]["first_position_delta"] is None
    assert data["loss"]["reference"] == 2.0
    assert any(n.startswith("loss.observed is ") and "null" in n for n in data["notes"]), data["notes"]
    assert any("[0, 128) observed" in n for n in data["notes"])


def test_counts_verdict_and_kinds():
    data = valid_report(_report(2.5).to_dict())
    assert data["schema_version"] == 1 and data["verdict"] == "FAILED" and data["ok"] is False
    assert (data["errors"], data["warnings"]) == (1, 1)
    assert data["problem_kinds"]["loss_gap"] == 1 and data["problem_kinds"]["dtype_mismatch"] == 1
    assert sum(data["problem_kinds"].values()) == 2 and set(data["problem_kinds"]) == set(KINDS)
    assert data["not_checked"] == ["values"]
    assert [b["label"] for b in data["loss"]["by_position"]] == ["[0, 128)", "[128, 256)"]


def test_the_error_record_validates_and_a_wrong_report_does_not():
    valid_report(error_record("--threshold: 'abc' is not a number"))
    bad = _report(2.5).to_dict()
    bad["problems"][0]["kind"] = "no_such_kind"
    with pytest.raises(jsonschema.ValidationError):
        valid_report(bad)


def test_text_report_words_and_labels():
    text = _report(2.5).render_text(more="in the log")
    assert "verdict: FAILED (1 error, 1 warning)" in text
    assert "  [0, 128)" in text and "  [128, 256)" in text and "-127" not in text
    ok = Report(counts={"hf_params": 5, "dcp_params": 5}, checked=["metadata", "manifest", "tokenizer"])
    assert (
        ok.render_text().splitlines()[-1]
        == "verdict: OK (0 errors, 0 warnings; values and loss not checked (add --values --loss))"
    )
    assert plural(1, "error") == "1 error" and plural(0, "error") == "0 errors"
    assert bucket_label({"start": 256, "end": 384}) == "[256, 384)"


def test_no_parameter_line_when_nothing_was_counted():
    """A guard that stopped before the key comparison has no parameter counts: no "HF 0 checkpoint 0" line."""
    report = Report(problems=[Problem("manifest", "error", None, "no reference", "write one")])
    assert "parameters:" not in report.render_text()
