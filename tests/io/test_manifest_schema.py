"""The manifest schema (``flame_ext/schemas/manifest.schema.json``) and its enforcement in ``read_manifest``.

Every manifest the code writes validates (conversions at fp32 and bf16, flat and nested, without a reference,
with the future predictor; `flame-ext reference`). Then a property test: every field of a real manifest and of
a real reference file is mutated (wrong type, out of bounds, NaN, empty, missing, extra, ...). Each mutation is
either refused (``diagnose`` exits 2 with one stderr line naming the file; the guard reports a ``manifest``
problem) or harmless: the mutated file still validates, the field is one ``HARMLESS`` lists, and diagnose and
the guard run on it to a verdict, without a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from flame_ext.cli import main as cli_main
from flame_ext.errors import CheckpointFormatError, InitialLoadValidationError
from flame_ext.io.manifest import MANIFEST_NAME, read_manifest
from flame_ext.io.manifest_schema import MAX_REFERENCE_ROWS, MAX_REFERENCE_TOKENS, check_manifest, schema
from flame_ext.io.specs import SAFETENSORS_DTYPES, dtype_name
from flame_ext.report import KINDS

# ---------------------------------------------------------------- the manifests the code writes


def _convert(model: Path, out: Path, *flags: str) -> dict:
    assert cli_main(["convert", "--model", str(model), "--checkpoint", str(out), *flags]) == 0
    return json.loads((out / MANIFEST_NAME).read_text())


@pytest.fixture(scope="module")
def reference_file(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.json"
    assert cli_main(["reference", "--model", str(tiny_model), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "flags",
    [
        ("--dtype", "float32"),
        ("--dtype", "bfloat16", "--layout", "nested"),
        ("--no-reference",),
        ("--include-future-predictor", "--future-predictor-head-type", "mlp", "--dtype", "bfloat16"),
    ],
    ids=["fp32-flat", "bf16-nested", "no-reference", "future-predictor"],
)
def test_every_manifest_convert_writes_validates(tiny_model, tmp_path, flags):
    manifest = _convert(tiny_model, tmp_path / "ckpt", *flags)
    jsonschema.Draft202012Validator(schema()).validate(manifest)  # the stock validator agrees
    assert read_manifest(tmp_path / "ckpt") == manifest


def test_a_reference_file_validates(reference_file):
    data = json.loads(reference_file.read_text())
    assert data["kind"] == "reference"
    jsonschema.Draft202012Validator(schema()).validate(data)
    assert read_manifest(reference_file) == data


def test_the_sections_being_added_validate(tiny_dcp):
    """Shapes agreed for the fingerprints at other dtypes, the data files' digests and the save-time record."""
    manifest = json.loads((tiny_dcp / MANIFEST_NAME).read_text())
    check_manifest(_with_new_sections(manifest, tiny_dcp), "m")
    check_manifest(_training_step(manifest), "s")


def _with_new_sections(manifest: dict, folder: Path) -> dict:
    out = copy.deepcopy(manifest)
    for entry in out["fingerprints"]["tensors"].values():
        entry["rounded"] = {"bfloat16": list(entry["fingerprint"]), "float16": list(entry["fingerprint"])}
    files = sorted(p for p in folder.iterdir() if p.name != MANIFEST_NAME)
    out["files"] = {"algorithm": "sha256", "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
    return out


def _training_step(manifest: dict) -> dict:
    section = copy.deepcopy(manifest["fingerprints"])
    for entry in section["tensors"].values():
        entry["group"] = "model"
    return {
        "format_version": 1,
        "kind": "training_step",
        "step": 20,
        "world_size": 2,
        "tool_version": manifest["tool_version"],
        "fingerprints": section,
        "digests": {"train_state": {"group": "state", "sha256": "0" * 64}},
    }


def test_the_schemas_dtypes_are_the_formats_and_each_can_be_fingerprinted():
    """Every dtype the schema admits is one a safetensors file or DCP holds, and the fingerprint computes at it
    (an unknown dtype used to reach torch as an INTERNAL ASSERT)."""
    import torch

    from flame_ext.fingerprints.algorithm import block_fingerprint

    admitted = schema()["$defs"]["dtype"]["enum"]
    assert sorted(admitted) == sorted(dtype_name(d) for d in SAFETENSORS_DTYPES.values())
    for name in admitted:
        block_fingerprint(torch.ones(2, 3), (0, 0), (2, 3), getattr(torch, name))


def test_the_documented_cap_is_the_schemas():
    ref = schema()["$defs"]["reference_record"]["properties"]["token_ids"]
    assert ref["maxItems"] == MAX_REFERENCE_ROWS
    assert schema()["$defs"]["token_row"]["maxItems"] == MAX_REFERENCE_TOKENS
    assert schema()["$defs"]["token_row"]["items"]["maximum"] == 2**31 - 1


# ---------------------------------------------------------------- mutations


NAN = float("nan")
REPLACEMENTS: dict[str, Any] = {
    "a string": "x",
    "an empty string": "",
    "a number": 7,
    "a negative number": -1,
    "a fraction": 0.5,
    "a 400-digit integer": 10**400,
    "NaN": NAN,
    "null": None,
    "true": True,
    "an empty list": [],
    "a list": ["x"],
    "an object": {"x": 1},
}
# Tables whose entries share one shape: three entries of each are mutated (first, middle, last), as in lists.
TABLES = {("tensors",), ("fingerprints", "tensors"), ("files", "files"), ("digests",)}

# Fields whose mutation may validate, and why each is harmless. A path is matched with its indexes and table
# keys replaced by "*". Anything accepted at another path fails the test.
HARMLESS = {
    # Informational: shown or recorded, never computed with.
    r"tool_version|layout|dtype|reference_note|reference_unavailable": "informational",
    r"source\.(model|path|revision|architectures(\.\*)?)": "informational (diagnose without --model opens model/path)",
    r"source\.model_type": "compared with the model's: another value is a `manifest` problem (another model)",
    r"reference\.(attn_implementation|device|text|transformers_version|torch_version|notes(\.\*)?|seq_len)": (
        "informational"
    ),
    r"kind": "the default kind; the record is the same",
    r"fresh_keys(\.\*)?|nonfinite_keys(\.\*)?": "key names: an unknown one matches no tensor",
    r"future_predictor": "no head (null) is a checkpoint without one: keys are then unexpected, a key problem",
    # Data within bounds: a different value is a finding of the checks, not a format error.
    r"tensors\.\*\.(shape(\.\*)?|numel|dtype)|total_parameters|tensors\.\*": "a stale table: a `manifest` problem",
    r"tensors": "a stale table: a `manifest` problem",
    r"fingerprints\.tensors\.\*\.fingerprint\.\*|fingerprints\.tensors\.\*": "a value_mismatch, or not verified",
    r"fingerprints\.tensors": "no fingerprints: values are not verified, and the report says so",
    r"fingerprints\.tensors\.\*\.rounded(\.\w+(\.\*)?)?": (
        "a record without them (an earlier manifest): a load at that dtype is 'not verified', said; other sums: "
        "a value_mismatch at that dtype"
    ),
    r"fingerprints(\.(version|algorithm))?": "another version or none: values are not verified, the report says so",
    r"fingerprints\.(terms|tolerance)": "another version or algorithm: not read, the report says so",
    r"reference(\.(token_ids(\.\*)*|loss_mean|loss_per_token(\.\*)*))?": "a loss_gap or another reference",
    r"reference\.dtype": "the dtype the step-0 forward runs in",
}


def _nodes(value: Any, path: tuple = (), siblings: int = 2) -> Iterator[tuple]:
    """Every position worth mutating: all fields, and the first and last entry of each list or table (their
    siblings have the same schema; ``siblings=1``: the first only)."""
    yield path
    if isinstance(value, dict):
        keys = list(value)
        if path in TABLES:
            keys = keys[:1] + keys[-1:][: siblings - 1]
        for k in keys:
            yield from _nodes(value[k], path + (k,), siblings)
    elif isinstance(value, list):
        for i in sorted(set([0, len(value) - 1][:siblings])) if value else []:
            yield from _nodes(value[i], path + (i,), siblings)


def _mutations(manifest: dict, siblings: int = 2) -> Iterator[tuple[str, tuple, Any]]:
    """(what, where, a function returning the mutated manifest) for every node."""
    for path in _nodes(manifest, siblings=siblings):
        parent, last = _parent(manifest, path)
        current = parent[last] if path else manifest
        for name, value in REPLACEMENTS.items():
            if path and not _same(current, value):
                yield name, path, functools.partial(_set, manifest, path, value)
        if isinstance(current, dict):
            for k in current:
                yield "missing", path + (k,), functools.partial(_set, manifest, path + (k,), _DELETE)
            yield "an extra field", path + ("zz_extra",), functools.partial(_set, manifest, path + ("zz_extra",), "x")
        if isinstance(current, list) and path:
            yield "an extra item", path, functools.partial(_set, manifest, path, [*current, "x"])


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


_DELETE = object()


def _parent(root: Any, path: tuple) -> tuple[Any, Any]:
    target = root
    for p in path[:-1]:
        target = target[p]
    return target, (path[-1] if path else None)


def _set(root: dict, path: tuple, value: Any) -> dict:
    out = copy.deepcopy(root)
    parent, last = _parent(out, path)
    if value is _DELETE:
        del parent[last]
    else:
        parent[last] = copy.deepcopy(value)
    return out


def _pattern(path: tuple, tables: set = TABLES) -> str:
    """The path with indexes and table keys as "*": ``fingerprints.tensors.*.fingerprint.*``."""
    parts = []
    for i, p in enumerate(path):
        parts.append("*" if isinstance(p, int) or path[:i] in tables else str(p))
    return ".".join(parts)


def _harmless(path: tuple) -> str | None:
    """The HARMLESS entry (its pattern) a path falls under, or None."""
    pattern = _pattern(path)
    return next((rx for rx in HARMLESS if re.fullmatch(rx, pattern)), None)


def _write(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, allow_nan=True))  # NaN and Infinity written as Python's json writes them


def _cli(*argv: str, stdout: list | None = None) -> tuple[int, str]:
    """``flame-ext ARGV`` in this process: exit code and stderr (stdout appended to ``stdout`` when given)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli_main(list(argv))
    if stdout is not None:
        stdout.append(out.getvalue())
    return code, err.getvalue()


@pytest.fixture(scope="module")
def guard_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)


def _guard_problems(guard_model, checkpoint: Path, reference: Path | None = None, *, load: bool = False) -> list:
    """The guard's verdict as a trainer runs it: before the load, and with ``load`` the load and the checks after
    it (values, buffers, the step-0 loss); the problems it raised, [] if it passed."""
    import torch.distributed.checkpoint as dcp

    from flame_ext.guard import InitialLoadGuard, hf_loss_probe, split_request
    from flame_ext.guard.options import GuardConfig
    from flame_ext.io.dcp import read_dcp_metadata

    config = GuardConfig(validate_initial_load=True, initial_load_reference=str(reference) if reference else None)
    guard = InitialLoadGuard(config, str(checkpoint), [guard_model])
    try:
        state = guard_model.state_dict()
        guard.before_load(split_request(state), lambda: read_dcp_metadata(checkpoint))
        if load:
            dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
            guard.after_load(hf_loss_probe(guard_model), loaded=state)
    except InitialLoadValidationError as exc:
        return exc.report.problems
    return []


@pytest.fixture()
def workdir(tiny_dcp, tmp_path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dcp, ckpt)
    return ckpt


def _run_property(
    base: dict, file: Path, diagnose_argv: list[str], guard, figures_name: str, record, siblings: int = 2
) -> None:
    refused = accepted = 0
    harmless_seen: dict[str, tuple] = {}
    run: set[str] = set()
    for what, path, mutate in _mutations(base, siblings):
        mutated = mutate()
        _write(file, mutated)
        label = f"{_pattern(path)} := {what}"
        try:
            read_manifest(file)
        except CheckpointFormatError as exc:
            refused += 1
            message = str(exc)
            assert "\n" not in message and message.startswith(f"{file}: "), f"{label}: {message}"
            assert len(message) < 600, f"{label}: {message}"  # values are quoted short
            if label in run:  # the same change at a sibling (another row, key or item) takes the same path
                continue
            run.add(label)
            code, err = _cli(*diagnose_argv)
            assert code == 2, f"{label}: diagnose exited {code}: {err}"
            assert err.count("\n") == 1 and str(file) in err, f"{label}: {err}"
            problems = guard()
            assert [p.kind for p in problems if p.severity == "error"][:1] == ["manifest"], f"{label}: {problems}"
            assert any(str(file) in p.detail for p in problems if p.kind == "manifest"), f"{label}: {problems}"
            continue
        accepted += 1
        group = _harmless(path)
        assert group is not None, f"{label}: accepted, and the field is not one HARMLESS lists"
        harmless_seen.setdefault(group, (what, path, mutated))
    # One accepted mutation per HARMLESS entry runs through diagnose and the guard to a verdict; those of the
    # fields the values and loss checks read, through those checks too (a load and a forward pass).
    for group, (what, path, mutated) in harmless_seen.items():
        _write(file, mutated)
        deep = {"fingerprints": ("--values",), "reference": ("--loss",)}.get(re.split(r"\W", group)[0], ())
        code, err = _cli(*diagnose_argv, *deep)
        assert code in (0, 1), f"{_pattern(path)} := {what}: diagnose exited {code}: {err}"
        problems = guard(load=bool(deep))
        assert all(p.kind in KINDS for p in problems), problems
    record(figures_name, refused, accepted, len(harmless_seen))
    assert refused > 10 * accepted / 2


@pytest.fixture(scope="module")
def tally():
    counts: dict[str, tuple] = {}
    yield lambda name, refused, accepted, fields: counts.__setitem__(name, (refused, accepted, fields))
    for name, (refused, accepted, fields) in counts.items():
        print(f"\n{name}: {refused + accepted} mutations, {refused} refused, {accepted} harmless ({fields} fields)")


@pytest.mark.slow  # every field mutated, each refusal through diagnose and the guard (tens of CPU-s)
@pytest.mark.once("0.3")  # the schema and flame-ext's reader of it: alike in both environments
def test_every_field_of_a_manifest_mutated(workdir, tiny_model, guard_model, tally):
    base = json.loads((workdir / MANIFEST_NAME).read_text())
    file = workdir / MANIFEST_NAME
    argv = ["diagnose", "--checkpoint", str(workdir), "--model", str(tiny_model)]
    _run_property(base, file, argv, lambda **kw: _guard_problems(guard_model, workdir, **kw), "flame_ext.json", tally)


@pytest.mark.slow  # every field mutated, each refusal through diagnose and the guard (tens of CPU-s)
@pytest.mark.once("0.3")  # the schema and flame-ext's reader of it: alike in both environments
def test_every_field_of_a_reference_file_mutated(workdir, tiny_model, reference_file, guard_model, tmp_path, tally):
    base = json.loads(reference_file.read_text())
    file = tmp_path / "ref.json"
    argv = ["diagnose", "--checkpoint", str(workdir), "--model", str(tiny_model), "--reference", str(file)]
    guard = lambda **kw: _guard_problems(guard_model, workdir, file, **kw)  # noqa: E731
    # The record and the fingerprints have the manifest's schema (tested above at two siblings): one here.
    _run_property(base, file, argv, guard, "reference file", tally, siblings=1)


@pytest.mark.slow  # every field of the new sections mutated (7 CPU-s)
@pytest.mark.once("0.3")  # the schema and flame-ext's reader of it: alike in both environments
def test_every_field_of_the_new_sections_mutated(tiny_dcp, tmp_path):
    """The fingerprints at other dtypes, the files' digests, the save-time record: refused or still valid."""
    manifest = json.loads((tiny_dcp / MANIFEST_NAME).read_text())
    extended, step = _with_new_sections(manifest, tiny_dcp), _training_step(manifest)
    file = tmp_path / MANIFEST_NAME
    count = refused = 0
    for base, roots in ((extended, ("files",)), (extended, ("fingerprints",)), (step, ())):
        for what, path, mutate in _mutations(base):
            if path[: len(roots)] != roots or (roots == ("fingerprints",) and "rounded" not in path):
                continue
            count += 1
            _write(file, mutate())
            try:
                read_manifest(file)
            except CheckpointFormatError as exc:
                refused += 1
                assert "\n" not in str(exc) and str(exc).startswith(f"{file}: ")
    print(f"\nnew sections (rounded, files, training_step): {count} mutations, {refused} refused")
    assert count > 200 and refused > count / 2


# ---------------------------------------------------------------- the issue's cases, by name


def _first_key(m: dict) -> str:
    return next(iter(m["tensors"]))


NAMED = {
    "a 400-digit fingerprint": (
        lambda m: m["fingerprints"]["tensors"][_first_key(m)]["fingerprint"].__setitem__(1, 10**400),
        "fingerprint[1] is an integer of 401 digits",
    ),
    "a 400-digit loss": (lambda m: m["reference"].__setitem__("loss_mean", 10**400), "reference.loss_mean"),
    "source as a string": (lambda m: m.__setitem__("source", "x"), 'source is "x" (a string); it must be an object'),
    "fresh_keys as a number": (lambda m: m.__setitem__("fresh_keys", 3), "fresh_keys is 3 (an integer)"),
    "an unknown fingerprint dtype": (
        lambda m: m["fingerprints"]["tensors"][_first_key(m)].__setitem__("dtype", "quint8"),
        'dtype is "quint8"; it must be one of',
    ),
    "a shape given as a number": (
        lambda m: m["tensors"][_first_key(m)].__setitem__("shape", 5),
        "].shape is 5 (an integer); it must be a list",
    ),
    "reference.dtype foo": (lambda m: m["reference"].__setitem__("dtype", "foo"), 'reference.dtype is "foo"'),
    "a garbage future_predictor": (
        lambda m: m.__setitem__("future_predictor", {"head": "rm -rf"}),
        "future_predictor is an object of 1 field;",
    ),
    "a nonfinite count of 0.5": (
        lambda m: m["fingerprints"]["tensors"][_first_key(m)]["fingerprint"].__setitem__(0, 0.5),
        "fingerprint[0] is 0.5 (a number); it must be an integer",
    ),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_the_issues_cases_exit_2_with_one_line(name, workdir, tiny_model, guard_model):
    change, words = NAMED[name]
    manifest = json.loads((workdir / MANIFEST_NAME).read_text())
    change(manifest)
    _write(workdir / MANIFEST_NAME, manifest)
    code, err = _cli("diagnose", "--checkpoint", str(workdir), "--model", str(tiny_model))
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert err.startswith(f"flame-ext: error: {workdir / MANIFEST_NAME}: not a valid manifest: ")
    problems = _guard_problems(guard_model, workdir)
    assert problems[0].kind == "manifest" and words in problems[0].detail


def test_a_row_of_131073_tokens_is_refused_before_any_forward(workdir, tiny_model, guard_model, capsys):
    """Was 104-112 s in `diagnose --loss` and 136 s in the guard (a forward quadratic in the length)."""
    manifest = json.loads((workdir / MANIFEST_NAME).read_text())
    manifest["reference"]["token_ids"] = [[(7 * i) % 250 for i in range(131_073)]]
    manifest["reference"]["loss_per_token"] = [[1.0] * 131_072]
    _write(workdir / MANIFEST_NAME, manifest)
    assert (workdir / MANIFEST_NAME).stat().st_size > 1_000_000
    t0 = time.perf_counter()
    code, err = _cli("diagnose", "--checkpoint", str(workdir), "--model", str(tiny_model), "--loss")
    cli_s = time.perf_counter() - t0
    assert code == 2 and "reference.token_ids[0] has 131,073 items; it must have at most 8,192" in err, err
    t0 = time.perf_counter()
    problems = _guard_problems(guard_model, workdir)
    guard_s = time.perf_counter() - t0
    assert problems[0].kind == "manifest" and "131,073 items" in problems[0].detail
    print(f"\nrow of 131,073 tokens refused: diagnose --loss {cli_s:.2f} s, guard {guard_s:.2f} s")
    assert cli_s < 5 and guard_s < 5


def test_rows_longer_than_the_models_positions_are_refused_where_the_model_is(workdir, tiny_model, guard_model):
    """Within the schema's cap, beyond the model's max_position_embeddings (1024 for the embedded model)."""
    manifest = json.loads((workdir / MANIFEST_NAME).read_text())
    manifest["reference"]["token_ids"] = [[(7 * i) % 250 for i in range(2048)]]
    manifest["reference"]["loss_per_token"] = [[1.0] * 2047]
    _write(workdir / MANIFEST_NAME, manifest)
    read_manifest(workdir)  # the file is well formed
    words = "reference rows of 2,048 tokens are longer than the model's max_position_embeddings (1,024)"
    out: list = []
    code, err = _cli(
        "diagnose", "--checkpoint", str(workdir), "--model", str(tiny_model), "--loss", "--json", stdout=out
    )
    report = json.loads(out[0])
    assert code == 1 and report["loss"] is None, err
    assert any(p["kind"] == "manifest" and words in p["detail"] for p in report["problems"]), report["problems"]
    problems = _guard_problems(guard_model, workdir)
    assert problems[0].kind == "manifest" and words in problems[0].detail


# ---------------------------------------------------------------- file kinds


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_not_absent(
    kind, workdir, tiny_dcp, tiny_model, guard_model, tmp_path
):
    import os

    manifest = workdir / MANIFEST_NAME
    manifest.unlink()
    if kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to("/dev/zero")
    code, err = _cli("diagnose", "--checkpoint", str(workdir), "--model", str(tiny_model))
    assert code == 2 and err.count("\n") == 1 and f"{manifest}: not a regular file" in err, err
    problems = _guard_problems(guard_model, workdir)
    assert problems[0].kind == "manifest" and "not a regular file" in problems[0].detail
    manifest.unlink()
    shutil.copy(tiny_dcp / MANIFEST_NAME, manifest)  # the checkpoint's own manifest sound; the --reference not
    ref = tmp_path / "ref.json"
    os.mkfifo(ref) if kind == "fifo" else ref.symlink_to("/dev/zero")
    problems = _guard_problems(guard_model, workdir, ref)
    assert any(p.kind == "manifest" and f"{ref}: not a regular file" in p.detail for p in problems), problems


def test_refusals_by_the_command_line_exit_2_without_a_traceback(workdir, tiny_model):
    """A few of the cases in a process of their own: the exit code and stderr a user sees."""
    manifest = json.loads((workdir / MANIFEST_NAME).read_text())
    for change, words in (NAMED["a 400-digit loss"], NAMED["an unknown fingerprint dtype"]):
        mutated = copy.deepcopy(manifest)
        change(mutated)
        _write(workdir / MANIFEST_NAME, mutated)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "flame_ext.cli",
                "diagnose",
                "--checkpoint",
                str(workdir),
                "--model",
                str(tiny_model),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and words in proc.stderr


def test_the_schema_names_the_versions_the_code_writes():
    """A new fingerprint version, algorithm or term list, or a new manifest format, changes the schema too."""
    from flame_ext.fingerprints.algorithm import ALGORITHM, TERMS, TOLERANCE
    from flame_ext.fingerprints.record import FINGERPRINTS_VERSION
    from flame_ext.io.manifest import FORMAT_VERSION

    section = schema()["$defs"]["fingerprints"]
    strict_when = {"version": {"const": FINGERPRINTS_VERSION}, "algorithm": {"const": ALGORITHM}}
    assert section["if"]["properties"] == strict_when
    assert section["then"]["properties"]["terms"] == {"const": list(TERMS)}
    assert schema()["$defs"]["fingerprint"]["maxItems"] == len(TERMS) == schema()["$defs"]["fingerprint"]["minItems"]
    assert 0 < TOLERANCE <= section["then"]["properties"]["tolerance"]["maximum"]
    assert schema()["properties"]["format_version"]["const"] == FORMAT_VERSION
