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
    (note,) = [n for n in data["notes"] if "null" in n]  # one cause, one note: not one per field
    assert note == (
        f"loss.observed, loss.delta, loss.by_position [0, 128) observed and loss.first_position_delta are {value} "
        "(not finite); written as null"
    )


def test_a_nan_loss_is_one_note_in_the_text_a_user_reads():
    buckets = [{"start": 64 * i, "end": 64 * (i + 1), "observed": math.nan, "reference": 2.0} for i in range(4)]
    loss = LossComparison(2.0, math.nan, 0.1, buckets, first_position_delta=math.nan, token_delta=math.nan)
    loss.token_threshold = 0.1
    report = Report(loss=loss, notes=["values: 25 tensors compared", "values: 25 tensors compared"])
    notes = [line for line in report.render_text().splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: values: 25 tensors compared",  # a note said twice is shown once
        "note: loss.observed, loss.delta, loss.by_position observed (4 buckets), loss.first_position_delta and "
        "loss.token_delta are nan (not finite); written as null",
    ]
    mixed = Report(loss=LossComparison(2.0, math.inf, 0.1, first_position_delta=math.nan)).to_dict()["notes"]
    assert mixed == [
        "loss.observed and loss.delta are inf; loss.first_position_delta is nan (not finite); written as null"
    ]


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
