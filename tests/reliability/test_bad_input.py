"""Bad input: every command refuses it the same way.

For each case of the catalogue below (convert, to-hf, reference, diagnose, the drop-in modules): exit code 2,
exactly one line on stderr that names the input and says what is wrong with it, no traceback, and nothing
created, changed or left behind anywhere under the test's folder (inputs and destination parent alike). The
guard's settings are checked the same way in-process: a bad value is a ``FlameExtError`` at construction.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flame_ext.errors import FlameExtError
from tests.reliability._rel import diff_snapshots, run_subprocess, snapshot


@dataclass
class Case:
    argv: list[str]
    names: list[str]  # the stderr line must contain one of these (the input it is about)
    what: list[str]  # ... and one of these (what is wrong), case-insensitive
    module: str = "flame_ext.cli"
    env: dict[str, str] = field(default_factory=dict)
    subprocess: bool = False  # run as a fresh interpreter instead of through the fork server
    needs: str | None = None  # a module that must exist for the case to apply


@dataclass
class Inputs:
    """Where a case builds its inputs (``root/in``) and points its output (``root/out``); both exist once made."""

    root: Path
    small_model: Path
    small_dcp: Path

    def __post_init__(self) -> None:
        self.inp.mkdir()
        self.out.mkdir()

    @property
    def inp(self) -> Path:
        return self.root / "in"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def model_copy(self, name: str = "model") -> Path:
        return Path(shutil.copytree(self.small_model, self.inp / name))

    def dcp_copy(self, name: str = "ckpt") -> Path:
        return Path(shutil.copytree(self.small_dcp, self.inp / name))

    def shard(self, model: Path, i: int = 1) -> Path:
        return sorted(model.glob("*.safetensors"))[i]


def _convert(m: Path | str, io: Inputs, *extra: str) -> list[str]:
    return ["convert", "--model", str(m), "--checkpoint", str(io.out / "step-0"), "--no-reference", *extra]


def _to_hf(c: Path | str, cfg: Path | str, io: Inputs, *extra: str) -> list[str]:
    return ["to-hf", "--checkpoint", str(c), "--config", str(cfg), "--out", str(io.out / "hf"), *extra]


def _diagnose(c: Path | str, m: Path | str, *extra: str) -> list[str]:
    return ["diagnose", "--checkpoint", str(c), "--model", str(m), *extra]


def _truncate(file: Path, keep: float = 0.5) -> Path:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    return file


def _edit_json(file: Path, **changes) -> Path:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))
    return file


def _biggest_distcp(ckpt: Path) -> Path:
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


# ---------------------------------------------------------------- the catalogue


def c_missing_model(io: Inputs) -> Case:
    return Case(_convert(io.inp / "nope", io), ["nope"], ["no such", "not found", "does not exist"])


def c_model_is_file(io: Inputs) -> Case:
    f = io.inp / "weights.safetensors"
    f.write_bytes(b"x" * 64)
    return Case(_convert(f, io), [str(f)], ["is a file", "not a folder"])


def c_empty_model_folder(io: Inputs) -> Case:
    (io.inp / "empty").mkdir()
    return Case(_convert(io.inp / "empty", io), ["empty"], ["no config.json"])


def c_bad_safetensors_header(io: Inputs) -> Case:
    m = io.model_copy()
    shard = io.shard(m)
    raw = bytearray(shard.read_bytes())
    raw[:8] = (2**40).to_bytes(8, "little")  # a header "longer" than the file
    shard.write_bytes(bytes(raw))
    return Case(_convert(m, io), [shard.name], ["header"])


def c_garbage_safetensors_header(io: Inputs) -> Case:
    m = io.model_copy()
    shard = io.shard(m, 0)
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 : 8 + n] = b"\xff" * n  # right length, not JSON
    shard.write_bytes(bytes(raw))
    return Case(_convert(m, io), [shard.name], ["header", "not json"])


def c_truncated_safetensors(io: Inputs) -> Case:
    m = io.model_copy()
    shard = _truncate(io.shard(m, 2), 0.6)
    return Case(_convert(m, io), [shard.name], ["truncated"])


def c_index_names_missing_shard(io: Inputs) -> Case:
    m = io.model_copy()
    shard = io.shard(m, 1)
    shard.unlink()
    return Case(_convert(m, io), [shard.name], ["missing"])


def c_unknown_architecture(io: Inputs) -> Case:
    m = io.model_copy()
    _edit_json(m / "config.json", model_type="olmo-from-the-future", architectures=["OlmoFromTheFuture"])
    return Case(
        _convert(m, io), [str(m), "olmo-from-the-future"], ["cannot build", "unknown", "unrecognized", "model_type"]
    )


def c_tokenizer_does_not_load(io: Inputs) -> Case:
    m = io.model_copy()
    (m / "tokenizer.json").write_text("{ this is not a tokenizer")
    (m / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    argv = [
        "convert",
        "--model",
        str(m),
        "--checkpoint",
        str(io.out / "step-0"),
    ]  # with the reference: reads the tokenizer
    return Case(argv, [str(m)], ["tokenizer"])


def c_convert_dtype_nonsense(io: Inputs) -> Case:
    return Case(
        _convert(io.small_model, io, "--dtype", "float13"), ["--dtype", "float13"], ["choose one of", "float32"]
    )


def c_convert_layout_nonsense(io: Inputs) -> Case:
    return Case(_convert(io.small_model, io, "--layout", "sideways"), ["--layout", "sideways"], ["choose one of"])


def c_hub_id_offline(io: Inputs) -> Case:
    return Case(
        _convert("flame-ext-test/no-such-model", io),
        ["flame-ext-test/no-such-model"],
        ["hub", "network", "offline"],
        env={"HF_HUB_OFFLINE": "1"},
    )


def c_hub_id_unreachable(io: Inputs) -> Case:
    # A fresh interpreter: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported.
    env = {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(io.root.parent / "hf_home_unreachable"),
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    return Case(
        _convert("flame-ext-test/no-such-model", io),
        ["flame-ext-test/no-such-model"],
        ["hub", "network"],
        env=env,
        subprocess=True,
    )


def c_destination_exists(io: Inputs) -> Case:
    shutil.copytree(io.small_dcp, io.out / "step-0")  # a finished conversion: must stay exactly as it is
    return Case(_convert(io.small_model, io), [str(io.out / "step-0")], ["already exists"])


def c_destination_parent_is_file(io: Inputs) -> Case:
    (io.out / "afile").write_text("not a folder")
    argv = [
        "convert",
        "--model",
        str(io.small_model),
        "--checkpoint",
        str(io.out / "afile" / "step-0"),
        "--no-reference",
    ]
    return Case(argv, ["afile"], ["is a file", "not a folder", "not a directory"])


def c_reference_seq_len_nonsense(io: Inputs) -> Case:
    return Case(_convert(io.small_model, io, "--reference-seq-len", "1"), ["--reference-seq-len"], ["at least"])


def c_reference_rows_nonsense(io: Inputs) -> Case:
    return Case(_convert(io.small_model, io, "--reference-rows", "0"), ["--reference-rows"], ["at least"])


def c_tohf_missing_checkpoint(io: Inputs) -> Case:
    return Case(_to_hf(io.inp / "nope", io.small_model, io), ["nope"], ["no such", "not found", "does not exist"])


def c_tohf_checkpoint_is_file(io: Inputs) -> Case:
    f = io.inp / "ckpt.distcp"
    f.write_bytes(b"\0" * 128)
    return Case(_to_hf(f, io.small_model, io), [str(f)], ["is a file", "not a folder"])


def c_tohf_empty_folder(io: Inputs) -> Case:
    (io.inp / "empty").mkdir()
    return Case(_to_hf(io.inp / "empty", io.small_model, io), ["empty"], [".metadata", "not a dcp"])


def c_tohf_no_metadata(io: Inputs) -> Case:
    c = io.dcp_copy()
    (c / ".metadata").unlink()
    return Case(_to_hf(c, io.small_model, io), [str(c)], [".metadata"])


def c_tohf_corrupt_metadata(io: Inputs) -> Case:
    c = io.dcp_copy()
    (c / ".metadata").write_bytes(bytes(range(256)) * 8)
    return Case(_to_hf(c, io.small_model, io), [str(c)], ["corrupt", "unreadable", "not a dcp"])


def c_tohf_truncated_metadata(io: Inputs) -> Case:
    c = io.dcp_copy()
    _truncate(c / ".metadata", 0.5)
    return Case(_to_hf(c, io.small_model, io), [str(c)], ["corrupt", "unreadable", "truncated"])


def c_tohf_truncated_distcp(io: Inputs) -> Case:
    c = io.dcp_copy()
    f = _truncate(_biggest_distcp(c), 0.5)
    return Case(_to_hf(c, io.small_model, io), [str(c), f.name], ["truncated", "cannot read", "corrupt", "short"])


def c_tohf_config_missing(io: Inputs) -> Case:
    return Case(_to_hf(io.small_dcp, io.inp / "nocfg", io), ["nocfg"], ["no such"])


def c_tohf_config_unknown_architecture(io: Inputs) -> Case:
    m = io.model_copy()
    _edit_json(m / "config.json", model_type="olmo-from-the-future")
    return Case(
        _to_hf(io.small_dcp, m, io),
        [str(m), "olmo-from-the-future"],
        ["cannot build", "unknown", "unrecognized", "model_type"],
    )


def c_tohf_checkpoint_of_another_model(io: Inputs) -> Case:
    m = io.model_copy()
    _edit_json(m / "config.json", intermediate_size=96)  # every MLP matrix changes shape
    return Case(_to_hf(io.small_dcp, m, io), [str(io.small_dcp)], ["does not match", "shape"])


def c_tohf_dtype_nonsense(io: Inputs) -> Case:
    return Case(_to_hf(io.small_dcp, io.small_model, io, "--dtype", "fp4"), ["--dtype", "fp4"], ["choose one of"])


def c_tohf_destination_exists(io: Inputs) -> Case:
    dest = io.out / "hf"
    shutil.copytree(io.small_model, dest)
    return Case(_to_hf(io.small_dcp, io.small_model, io), [str(dest)], ["already exists"])


def c_reference_missing_model(io: Inputs) -> Case:
    argv = ["reference", "--model", str(io.inp / "nope"), "--out", str(io.out / "reference.json")]
    return Case(argv, ["nope"], ["no such"])


def c_reference_dtype_nonsense(io: Inputs) -> Case:
    argv = ["reference", "--model", str(io.small_model), "--out", str(io.out / "reference.json"), "--dtype", "float7"]
    return Case(argv, ["--dtype", "float7"], ["choose one of"])


def c_dropin_convert_missing_model(io: Inputs) -> Case:
    argv = ["--model", str(io.inp / "nope"), "--checkpoint", str(io.out / "step-0")]
    return Case(argv, ["nope"], ["no such"], module="flame_ext.convert_hf_to_dcp")


def c_dropin_convert_dtype_nonsense(io: Inputs) -> Case:
    argv = [
        "--model",
        str(io.small_model),
        "--checkpoint",
        str(io.out / "step-0"),
        "--dtype",
        "half-ish",
        "--no_reference",
    ]
    return Case(argv, ["--dtype", "half-ish"], ["choose one of"], module="flame_ext.convert_hf_to_dcp")


def c_dropin_tohf_missing_step(io: Inputs) -> Case:
    (io.inp / "exp" / "checkpoint" / "step-1").mkdir(parents=True)
    argv = ["--path", str(io.inp / "exp"), "--step", "7", "--config", str(io.small_model), "--out", str(io.out / "hf")]
    return Case(argv, ["step-7"], ["no such"], module="flame_ext.convert_dcp_to_hf")


def c_dropin_tohf_corrupt_metadata(io: Inputs) -> Case:
    (io.inp / "exp" / "checkpoint").mkdir(parents=True)
    c = Path(shutil.copytree(io.small_dcp, io.inp / "exp" / "checkpoint" / "step-3"))
    (c / ".metadata").write_bytes(b"\x80\x04garbage")
    argv = ["--path", str(io.inp / "exp"), "--step", "3", "--config", str(io.small_model), "--out", str(io.out / "hf")]
    return Case(argv, ["step-3"], ["corrupt", "unreadable"], module="flame_ext.convert_dcp_to_hf")


def c_dropin_diagnose_missing_checkpoint(io: Inputs) -> Case:
    argv = ["--checkpoint", str(io.inp / "nope"), "--model", str(io.small_model)]
    return Case(
        argv, ["nope"], ["no such"], module="flame_ext.diagnose_checkpoint", needs="flame_ext.diagnose_checkpoint"
    )


def c_dropin_diagnose_nan_threshold(io: Inputs) -> Case:
    argv = ["--checkpoint", str(io.small_dcp), "--model", str(io.small_model), "--threshold", "nan"]
    return Case(
        argv,
        ["--threshold", "nan"],
        ["finite", "must be"],
        module="flame_ext.diagnose_checkpoint",
        needs="flame_ext.diagnose_checkpoint",
    )


def c_diagnose_missing_checkpoint(io: Inputs) -> Case:
    return Case(_diagnose(io.inp / "nope", io.small_model), ["nope"], ["no such"], needs="flame_ext.commands.diagnose")


def c_diagnose_missing_model(io: Inputs) -> Case:
    argv = _diagnose(io.small_dcp, io.inp / "nomodel")
    return Case(argv, ["nomodel"], ["no such"], needs="flame_ext.commands.diagnose")


def c_diagnose_truncated_metadata(io: Inputs) -> Case:
    c = io.dcp_copy()
    _truncate(c / ".metadata", 0.3)
    argv = _diagnose(c, io.small_model)
    return Case(argv, [str(c)], ["corrupt", "unreadable", "truncated"], needs="flame_ext.commands.diagnose")


def c_diagnose_truncated_distcp(io: Inputs) -> Case:
    c = io.dcp_copy()
    f = _truncate(_biggest_distcp(c), 0.5)
    return Case(
        _diagnose(c, io.small_model, "--values"),
        [f.name, str(c)],
        ["truncated", "cannot read"],
        needs="flame_ext.commands.diagnose",
    )


def c_diagnose_tokenizer_does_not_load(io: Inputs) -> Case:
    tok = io.inp / "tokenizer"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("[1, 2")
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return Case(
        _diagnose(io.small_dcp, io.small_model, "--tokenizer", str(tok)),
        [str(tok)],
        ["tokenizer"],
        needs="flame_ext.commands.diagnose",
    )


def c_diagnose_negative_threshold(io: Inputs) -> Case:
    return Case(
        _diagnose(io.small_dcp, io.small_model, "--threshold", "-0.5"),
        ["--threshold", "-0.5"],
        [">= 0", "must be"],
        needs="flame_ext.commands.diagnose",
    )


def c_diagnose_nan_threshold(io: Inputs) -> Case:
    return Case(
        _diagnose(io.small_dcp, io.small_model, "--threshold", "nan"),
        ["--threshold", "nan"],
        ["finite", "must be"],
        needs="flame_ext.commands.diagnose",
    )


def c_diagnose_manifest_other_version(io: Inputs) -> Case:
    c = io.dcp_copy()
    _edit_json(c / "flame_ext.json", format_version=99)
    return Case(_diagnose(c, io.small_model), ["flame_ext.json"], ["version"], needs="flame_ext.commands.diagnose")


def c_diagnose_hub_id_offline(io: Inputs) -> Case:
    return Case(
        _diagnose(io.small_dcp, "flame-ext-test/no-such-model"),
        ["flame-ext-test/no-such-model"],
        ["hub", "network"],
        env={"HF_HUB_OFFLINE": "1"},
        needs="flame_ext.commands.diagnose",
    )


# ---------------------------------------------------------------- destinations, explicit inputs, option values
# (issue 9: --force replaces only what flame-ext writes; no silent default model; one line for a bad value)


def c_convert_without_model(io: Inputs) -> Case:
    argv = ["convert", "--checkpoint", str(io.out / "step-0"), "--no-reference"]
    return Case(argv, ["--model"], ["required"])


def c_convert_force_onto_a_folder_of_notes(io: Inputs) -> Case:
    dest = io.out / "precious"
    dest.mkdir()
    (dest / "notes.txt").write_text("notes\n")
    argv = ["convert", "--model", str(io.small_model), "--checkpoint", str(dest), "--no-reference", "--force"]
    return Case(argv, [str(dest)], ["notes.txt"])


def c_convert_force_onto_a_regular_file(io: Inputs) -> Case:
    dest = io.out / "afile"
    dest.write_text("mine")
    argv = ["convert", "--model", str(io.small_model), "--checkpoint", str(dest), "--no-reference", "--force"]
    return Case(argv, [str(dest)], ["regular file"])


def c_convert_onto_a_dangling_symlink(io: Inputs) -> Case:
    dest = io.out / "step-0"
    dest.symlink_to(io.out / "gone")
    argv = ["convert", "--model", str(io.small_model), "--checkpoint", str(dest), "--no-reference", "--force"]
    return Case(argv, [str(dest)], ["symlink"])


def c_tohf_force_onto_a_dcp_checkpoint(io: Inputs) -> Case:
    dest = Path(shutil.copytree(io.small_dcp, io.out / "hf"))  # a checkpoint is not what to-hf writes
    return Case(_to_hf(io.small_dcp, io.small_model, io, "--force"), [str(dest)], ["not an HF model folder"])


def c_reference_force_onto_a_foreign_json(io: Inputs) -> Case:
    dest = io.out / "results.json"
    dest.write_text(json.dumps({"accuracy": 0.5}))
    argv = ["reference", "--model", str(io.small_model), "--out", str(dest), "--force"]
    return Case(argv, [str(dest)], ["not a reference file"])


def c_reference_onto_a_folder(io: Inputs) -> Case:
    dest = io.out / "refs"
    dest.mkdir()
    argv = ["reference", "--model", str(io.inp / "nope"), "--out", str(dest)]  # the destination is checked first
    return Case(argv, [str(dest)], ["not a reference file"])


def c_tohf_missing_data_file(io: Inputs) -> Case:
    c = io.dcp_copy()
    f = _biggest_distcp(c)
    f.unlink()
    return Case(_to_hf(c, io.small_model, io), [str(f)], ["missing"])


def c_tohf_config_hub_id_offline(io: Inputs) -> Case:
    return Case(
        _to_hf(io.small_dcp, "flame-ext-test/no-such-config", io),
        ["flame-ext-test/no-such-config"],
        ["hub"],
        env={"HF_HUB_OFFLINE": "1"},
    )


def c_diagnose_folder_of_steps(io: Inputs) -> Case:
    run = io.inp / "exp" / "checkpoint"
    run.mkdir(parents=True)
    shutil.copytree(io.small_dcp, run / "step-0")
    return Case(_diagnose(run, io.small_model), [str(run)], [f"did you mean {run / 'step-0'}?"])


def c_diagnose_without_model_or_manifest(io: Inputs) -> Case:
    c = io.dcp_copy()
    (c / "flame_ext.json").unlink()
    return Case(["diagnose", "--checkpoint", str(c)], ["--model", str(c)], ["not given"])


def c_diagnose_threshold_not_a_number(io: Inputs) -> Case:
    return Case(
        _diagnose(io.small_dcp, io.small_model, "--threshold", "abc"), ["--threshold", "'abc'"], ["not a number"]
    )


def c_convert_buffer_not_a_whole_number(io: Inputs) -> Case:
    return Case(_convert(io.small_model, io, "--buffer-mb", "lots"), ["--buffer-mb", "'lots'"], ["not a whole number"])


def c_diagnose_unknown_option(io: Inputs) -> Case:
    return Case(_diagnose(io.small_dcp, io.small_model, "--valuez"), ["--valuez"], ["unrecognized"])


def c_diagnose_plot_without_loss(io: Inputs) -> Case:
    plot = io.out / "loss.png"
    return Case(_diagnose(io.small_dcp, io.small_model, "--plot", str(plot)), ["--plot"], ["needs --loss"])


def c_diagnose_plot_onto_a_foreign_file(io: Inputs) -> Case:
    plot = io.out / "loss.png"
    plot.write_text("my notes, not an image")
    return Case(_diagnose(io.small_dcp, io.small_model, "--loss", "--plot", str(plot)), [str(plot)], ["not a PNG"])


def c_dropin_diagnose_threshold_not_a_number(io: Inputs) -> Case:
    argv = ["--checkpoint", str(io.small_dcp), "--model", str(io.small_model), "--threshold", "abc"]
    return Case(argv, ["--threshold", "'abc'"], ["not a number"], module="flame_ext.diagnose_checkpoint")


CASES: dict[str, Callable[[Inputs], Case]] = {
    name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_") and callable(fn)
}


def _needs_missing(module: str | None) -> bool:
    return module is not None and importlib.util.find_spec(module) is None


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_cleanly(name, forkserver, small_model, small_dcp, tmp_path, figures):
    io = Inputs(tmp_path, small_model, small_dcp)
    case = CASES[name](io)
    # A missing module is a failure, never a skip: a rename must not silently stop these cases from running.
    assert not _needs_missing(case.needs), f"{case.needs} does not exist: the case's module was renamed or removed"
    before = snapshot(tmp_path)
    if case.subprocess:
        r = run_subprocess(*case.argv, module=case.module, env=case.env, timeout=120)
    else:
        r = forkserver.run(*case.argv, module=case.module, env=case.env, timeout=120)
    changes = diff_snapshots(before, snapshot(tmp_path))
    figures.setdefault("bad_input_cases", []).append(name)
    assert r.returncode == 2, f"exit {r.returncode}, expected 2\nstdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    assert len(r.err_lines) == 1, f"expected exactly one line on stderr, got {len(r.err_lines)}:\n{r.stderr[-3000:]}"
    line = r.err_lines[0]
    assert any(n in line for n in case.names), f"the message does not name the input ({case.names}): {line}"
    assert any(w.lower() in line.lower() for w in case.what), (
        f"the message does not say what is wrong ({case.what}): {line}"
    )
    assert not changes, f"the failed run changed files: {changes}"


def test_debug_shows_the_traceback(tmp_path):
    """``--debug`` is the way to see where a refusal came from (a fresh interpreter, not the fork server; the
    same case without it is ``missing_model`` above)."""
    argv = ["convert", "--model", str(tmp_path / "nope"), "--checkpoint", str(tmp_path / "out"), "--no-reference"]
    debug = run_subprocess("--debug", *argv)
    assert debug.returncode != 0 and "Traceback" in debug.stderr, debug.stderr
    assert "nope" in debug.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the guard's settings


def _guard_cases():
    return [("negative", -0.5), ("nan", math.nan), ("inf", math.inf), ("text", "0.1")]


@pytest.mark.parametrize("label,value", _guard_cases(), ids=[c[0] for c in _guard_cases()])
def test_guard_threshold_is_refused_at_construction(label, value, figures):
    from flame_ext.errors import short_value
    from flame_ext.guard.options import GuardConfig

    with pytest.raises(FlameExtError) as info:
        GuardConfig(validate_initial_load=True, initial_load_max_loss_delta=value)
    message = str(info.value)
    figures.setdefault("bad_input_cases", []).append(f"guard_threshold_{label}")
    quoted = short_value(value)  # the value as the message quotes it: "0.1" for the text, nan, inf, -0.5
    assert "\n" not in message and "initial_load_max_loss_delta" in message and quoted in message, message


def test_guard_threshold_in_the_host_config_is_refused(figures):
    """The same check where users set it: torchtitan 0.3's Config, torchtitan 0.1's job config section."""
    from types import SimpleNamespace

    from flame_ext.titan import generation

    figures.setdefault("bad_input_cases", []).append("guard_threshold_host_config")
    if generation() == "0.3":
        from flame_ext.titan.v03 import ValidatingCheckpointManager

        with pytest.raises(FlameExtError, match="initial_load_max_loss_delta"):
            ValidatingCheckpointManager.Config(validate_initial_load=True, initial_load_max_loss_delta=float("nan"))
    else:
        from flame_ext.guard.options import GuardConfig

        section = SimpleNamespace(validate_initial_load=True, initial_load_max_loss_delta=-1.0)
        with pytest.raises(FlameExtError, match="initial_load_max_loss_delta"):
            GuardConfig.from_section(section)


def test_guard_reference_of_another_format_version(small_dcp, tmp_path, figures):
    """A manifest of another format version stops the guard before anything is loaded, with one clear finding."""
    import torch

    from flame_ext.errors import InitialLoadValidationError
    from flame_ext.guard import InitialLoadGuard, RequestedLoad
    from flame_ext.guard.options import GuardConfig

    manifest = json.loads((small_dcp / "flame_ext.json").read_text())
    manifest["format_version"] = 99
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps(manifest))
    before = snapshot(tmp_path)
    guard = InitialLoadGuard(
        GuardConfig(validate_initial_load=True, initial_load_reference=str(ref)),
        str(small_dcp),
        [torch.nn.Embedding(260, 8)],
    )
    with pytest.raises(InitialLoadValidationError) as info:
        guard.before_load(RequestedLoad({}, []), lambda: {})
    figures.setdefault("bad_input_cases", []).append("guard_reference_other_version")
    # The guard's message is its report (a trainer shows it in the log); the finding itself is one problem.
    problems = info.value.report.errors
    assert [p.kind for p in problems] == ["manifest"], info.value.report.to_dict()
    assert "\n" not in problems[0].detail and str(ref) in problems[0].detail and "version" in problems[0].detail
    assert str(small_dcp) in str(info.value).splitlines()[0]
    assert not diff_snapshots(before, snapshot(tmp_path))
