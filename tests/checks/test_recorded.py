"""``flame_ext.checks.recorded``: what a manifest records as chosen at conversion, read from real manifests
written by ``flame-ext convert`` and from edited copies."""

from __future__ import annotations

from flame_ext.checks.recorded import RecordedChoices, recorded_choices
from flame_ext.io.manifest import MANIFEST_NAME, read_manifest


def test_a_default_conversion_records_flat_and_its_own_dtype(tiny_dcp):
    choices = recorded_choices(read_manifest(tiny_dcp / MANIFEST_NAME))
    assert choices == RecordedChoices(layout="flat", dtype=None)  # dtype auto: the source's own, no cast chosen
    assert not choices.nested and not choices.chose_dtype("float32")


def test_the_choices_a_manifest_records_and_what_records_none():
    assert recorded_choices({"kind": "checkpoint", "layout": "nested", "dtype": "bfloat16"}) == RecordedChoices(
        "nested", "bfloat16"
    )
    chosen = recorded_choices({"layout": "nested", "dtype": "bfloat16"}, where="/c/flame_ext.json")
    assert chosen.nested and chosen.chose_dtype("bfloat16") and not chosen.chose_dtype("float32")
    assert "recorded in /c/flame_ext.json" in chosen.layout_note(3) and "the 3 model keys" in chosen.layout_note(3)
    assert chosen.dtype_note("bfloat16", "float32", 1).endswith("a load casts the 1 tensor")
    # No manifest, a training step's record, a reference file, a value it does not know: nothing chosen.
    for manifest in (
        None,
        {},
        {"kind": "training_step", "layout": "nested"},
        {"kind": "reference", "dtype": "bfloat16"},
    ):
        assert recorded_choices(manifest) == RecordedChoices()
    assert recorded_choices({"layout": "sideways", "dtype": 3}) == RecordedChoices()
