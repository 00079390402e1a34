"""Unreadable or mismatched inputs: one line naming the input, exit 2, never a traceback."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from flame_ext.cli import main
from tests.diagnose.conftest import one_thread


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _largest(folder: Path, pattern: str) -> Path:
    return max(folder.glob(pattern), key=lambda p: p.stat().st_size)


def _corrupt_metadata(ckpt, tmp):
    bad = _copy(ckpt, tmp / "c")
    (bad / ".metadata").write_bytes(b"\x80\x05 not a pickle at all" * 10)
    return bad


def _truncated_metadata(ckpt, tmp):
    bad = _copy(ckpt, tmp / "c")
    data = (bad / ".metadata").read_bytes()
    (bad / ".metadata").write_bytes(data[: len(data) // 2])
    return bad


def _truncated_shard(ckpt, tmp):
    bad = _copy(ckpt, tmp / "c")
    shard = _largest(bad, "*.distcp")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return bad


def _missing_shard(ckpt, tmp):
    bad = _copy(ckpt, tmp / "c")
    _largest(bad, "*.distcp").unlink()
    return bad


def _other_manifest_version(ckpt, tmp):
    bad = _copy(ckpt, tmp / "c")
    m = json.loads((bad / "flame_ext.json").read_text())
    m["format_version"] = 99
    (bad / "flame_ext.json").write_text(json.dumps(m))
    return bad


def _bad_header(model, tmp):
    bad = _copy(model, tmp / "m")
    st = bad / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    st.write_bytes(bytes(data))
    return bad


def _truncated_safetensors(model, tmp):
    bad = _copy(model, tmp / "m")
    st = bad / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size - 1000)
    return bad


def _unknown_architecture(model, tmp):
    bad = _copy(model, tmp / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "not_a_real_arch", ["NotARealArchForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


# case -> (build (checkpoint, model, extra args) from the healthy pair and tmp, text the message must hold)
CASES = {
    "missing checkpoint": (lambda c, m, t: (t / "nope", m, []), "no such folder"),
    "checkpoint is a file": (lambda c, m, t: (c / ".metadata", m, []), "is a file"),
    "not a DCP folder": (lambda c, m, t: (m, m, []), "not a DCP checkpoint"),
    "empty folder": (lambda c, m, t: ((t / "empty").mkdir() or t / "empty", m, []), "not a DCP checkpoint"),
    "corrupt .metadata": (lambda c, m, t: (_corrupt_metadata(c, t), m, []), "corrupt"),
    "truncated .metadata": (lambda c, m, t: (_truncated_metadata(c, t), m, []), "corrupt"),
    "truncated shard": (lambda c, m, t: (_truncated_shard(c, t), m, []), "truncated"),
    "missing shard": (lambda c, m, t: (_missing_shard(c, t), m, []), "missing"),
    "manifest of another format version": (lambda c, m, t: (_other_manifest_version(c, t), m, []), "format version 99"),
    "missing model": (lambda c, m, t: (c, t / "no-model", []), "no such folder"),
    "safetensors bad header": (lambda c, m, t: (c, _bad_header(m, t), []), "bad safetensors header"),
    "safetensors truncated": (lambda c, m, t: (c, _truncated_safetensors(m, t), []), "truncated"),
    "config of an unknown architecture": (lambda c, m, t: (c, _unknown_architecture(m, t), []), "not_a_real_arch"),
    "threshold NaN": (lambda c, m, t: (c, m, ["--threshold", "nan"]), "--threshold"),
    "threshold negative": (lambda c, m, t: (c, m, ["--threshold", "-1"]), "--threshold"),
    "train config missing": (lambda c, m, t: (c, m, ["--train-config", str(t / "nope.json")]), "no such file"),
    "tokenizer that does not load": (
        lambda c, m, t: (c, m, ["--tokenizer", str((t / "tok").mkdir() or t / "tok")]),
        "tokenizer",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, catalogue, hf_models, tmp_path, capsys):
    build, must_say = CASES[case]
    ckpt, model, extra = build(catalogue("olmo2"), hf_models["olmo2"], tmp_path)
    capsys.readouterr()
    with one_thread():
        code = main(["diagnose", "--checkpoint", str(ckpt), "--model", str(model), *extra])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flame-ext: error: "), err
    assert must_say in lines[0] and "Traceback" not in err and out == ""


def test_train_config_of_another_architecture(catalogue, hf_models, capsys):
    code = main(
        [
            "diagnose",
            "--checkpoint",
            str(catalogue("olmo2")),
            "--model",
            str(hf_models["olmo2"]),
            "--train-config",
            str(hf_models["llama"] / "config.json"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'llama'" in err[0] and "'olmo2'" in err[0]


def test_drop_in_module_bad_input_in_a_real_process(tmp_path, hf_models):
    from support.cli import run_cli

    proc = run_cli(
        "--checkpoint",
        str(tmp_path / "missing"),
        "--model",
        str(hf_models["olmo2"]),
        module="flame_ext.diagnose_checkpoint",
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diagnose_checkpoint: error: ") and "no such folder" in lines[0]
