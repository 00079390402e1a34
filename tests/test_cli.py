"""The command line as a user meets it: one-line errors for bad option values, explicit inputs (no silent
default model), JSON on stdout for failures under ``--json``, the recorded source for ``diagnose`` without
``--model``, hub ids for ``to-hf --config``, the ``step-N`` hint, ``--plot``, and quiet library progress bars;
and the drop-in modules build the very options the CLI builds (flame's argument names, the same converter call)."""

from __future__ import annotations

import io
import json
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from PIL import Image
from support.cli import report_json, run_cli

from flame_ext import convert_dcp_to_hf, convert_hf_to_dcp, diagnose_checkpoint
from flame_ext.cli import _one_write_per_line, main, parse
from flame_ext.io.plot import PLOT_SIZE


def _run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["diagnose", "--checkpoint", "c", "--threshold", "abc"],
            "flame-ext diagnose: error: --threshold: 'abc' is not a number",
        ),
        (
            ["convert", "--model", "m", "--checkpoint", "c", "--buffer-mb", "1.5"],
            "flame-ext convert: error: --buffer-mb: '1.5' is not a whole number",
        ),
        (["diagnose", "--checkpoint", "c", "--frobnicate"], "flame-ext: error: unrecognized arguments: --frobnicate"),
        (["to-hf", "--checkpoint", "c", "--out", "o"], "flame-ext to-hf: error: --config: required"),
        (
            ["convert", "--checkpoint", "c"],
            "flame-ext: error: --model is required; `flame-ext demo` shows the embedded model",
        ),
        (
            ["convert", "--model", "m", "--checkpoint", "c", "--dtype", "float16"],
            "flame-ext convert: error: --dtype 'float16': choose one of auto, bfloat16, float32",
        ),
        (
            ["convert", "--model", "m", "--checkpoint", "c", "--layout", "deep"],
            "flame-ext: error: --layout 'deep': choose one of flat, nested, or torchtitan:<module> (torchtitan's "
            "own key names, e.g. torchtitan:llama3, with --titan-config)",
        ),
    ],
    ids=["not-a-number", "not-a-whole-number", "unknown-option", "missing-option", "no-model", "dtype", "layout"],
)
def test_bad_usage_is_one_line(capsys, tmp_path, argv, line):
    code, out, err = _run(capsys, *argv)
    assert (code, err, out) == (2, [line], "")
    assert not (Path("c").exists() or (tmp_path / "c").exists())


def test_json_failures_are_json_on_stdout(capsys, tmp_path):
    code, out, err = _run(capsys, "diagnose", "--checkpoint", tmp_path / "nope", "--json")
    record = report_json(out)
    assert code == 2 and record == {"schema_version": 1, "ok": False, "verdict": "ERROR", "error": record["error"]}
    assert str(tmp_path / "nope") in record["error"] and err == [f"flame-ext: error: {record['error']}"]
    code, out, _ = _run(capsys, "diagnose", "--checkpoint", tmp_path, "--threshold", "x", "--json")
    assert code == 2 and report_json(out)["error"] == "--threshold: 'x' is not a number"


def test_diagnose_without_model_uses_the_recorded_source(capsys, tiny_dcp, tiny_model):
    code, out, _ = _run(capsys, "diagnose", "--checkpoint", tiny_dcp)
    lines = out.splitlines()
    assert code == 0 and str(tiny_model) in lines[0]
    assert f"note: model: {tiny_model}, the source recorded in flame_ext.json (--model not given)" in lines
    code, out, _ = _run(capsys, "diagnose", "--checkpoint", tiny_dcp, "--json")
    assert code == 0 and any("--model not given" in n for n in report_json(out)["notes"])


def test_diagnose_without_model_or_manifest_is_refused(capsys, tiny_dcp, tmp_path):
    ckpt = Path(shutil.copytree(tiny_dcp, tmp_path / "step-0"))
    (ckpt / "flame_ext.json").unlink()
    code, out, err = _run(capsys, "diagnose", "--checkpoint", ckpt)
    assert code == 2 and len(err) == 1 and "--model: not given" in err[0] and "no flame_ext.json" in err[0]


def test_checkpoint_folder_of_steps_suggests_the_step(capsys, tiny_dcp, tmp_path):
    run = tmp_path / "exp" / "checkpoint"
    for step in (0, 500):
        shutil.copytree(tiny_dcp, run / f"step-{step}")
    code, _, err = _run(capsys, "diagnose", "--checkpoint", run)
    assert code == 2 and len(err) == 1
    assert f"did you mean {run / 'step-0'}?" in err[0] and "2 saved steps, step-0 to step-500" in err[0], err


def test_to_hf_config_takes_a_hub_id(tiny_dcp, tmp_path):
    """Offline (the tests' network), a hub id is tried on the hub and fails with one line naming it."""
    r = run_cli(
        "to-hf",
        "--checkpoint",
        str(tiny_dcp),
        "--config",
        "flame-ext-test/no-such-model",
        "--out",
        str(tmp_path / "o"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")},
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "flame-ext-test/no-such-model" in lines[0] and "hub" in lines[0]
    assert not (tmp_path / "o").exists()


def test_diagnose_plot(capsys, tiny_dcp, tiny_model, tmp_path):
    plot = tmp_path / "loss.png"
    code, out, _ = _run(capsys, "diagnose", "--checkpoint", tiny_dcp, "--model", tiny_model, "--loss", "--plot", plot)
    assert code == 0 and f"note: per-position loss drawn in {plot}" in out.splitlines()
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size == PLOT_SIZE
    code, _, err = _run(capsys, "diagnose", "--checkpoint", tiny_dcp, "--plot", tmp_path / "other.png")
    assert code == 2 and err == [
        f"flame-ext: error: --plot {tmp_path / 'other.png'}: draws the per-position loss, so it needs --loss"
    ]


def test_library_progress_bars_stay_off_without_a_terminal(tiny_model, tmp_path):
    """The reference step loads the HF model (transformers draws a "Loading weights" bar on a terminal); with
    stderr a pipe, nothing is written there."""
    r = run_cli(
        "convert", "--model", str(tiny_model), "--checkpoint", str(tmp_path / "step-0"), "--reference-seq-len", "64"
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr


def test_bf16_to_hf_says_bfloat16_in_config(tiny_dcp, tmp_path):
    from transformers import AutoConfig

    from flame_ext.io.hf import DEFAULT_MODEL

    out = tmp_path / "hf-bf16"
    r = run_cli(
        "to-hf", "--checkpoint", str(tiny_dcp), "--config", str(DEFAULT_MODEL), "--out", str(out), "--dtype", "bfloat16"
    )
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    loaded = AutoConfig.from_pretrained(out)
    assert str(getattr(loaded, "dtype", None) or loaded.torch_dtype).removeprefix("torch.") == "bfloat16"


def cli(*argv: str):
    """The options object ``flame-ext ARGV`` runs its command with."""
    return parse(list(argv))[1]


def changed(options: object, default: object) -> set[str]:
    return {f.name for f in fields(options) if getattr(options, f.name) != getattr(default, f.name)}


def test_convert_drop_in_gives_the_clis_options():
    given = ["--model", "m", "--checkpoint", "out", "--dtype", "bfloat16", "--layout", "nested"]
    clis = cli(
        "convert",
        *given,
        "--no-reference",
        "--trust-remote-code",
        "--include-future-predictor",
        "--future-predictor-head-type",
        "mlp",
        "--reference-seq-len",
        "64",
        "--reference-rows",
        "3",
        "--buffer-mb",
        "8",
        "--reference-device",
        "cpu",
        "--record-sha256",
        "--force",
    )
    flames = convert_hf_to_dcp.parse_args(
        [
            *given,
            "--no_reference",
            "--trust_remote_code",
            "--include_future_predictor",
            "--future_predictor_head_type",
            "mlp",
            "--reference_seq_len",
            "64",
            "--reference_rows",
            "3",
            "--buffer_mb",
            "8",
            "--reference_device",
            "cpu",
            "--record_sha256",
            "--force",
        ]
    )
    assert flames == clis
    defaults = cli("convert", "--model", "m", "--checkpoint", "out")
    assert changed(clis, defaults) == {f.name for f in fields(clis)} - {
        "model",
        "checkpoint",
        "reference_text",
        "timeout_s",
        "progress",
        # torchtitan-native options: they go with --layout torchtitan:<module>, not with the nested layout here
        "titan_config",
        "allow_config_mismatch",
    }


def test_to_hf_drop_in_gives_the_clis_options(tmp_path):
    run = tmp_path / "exp"
    (run / "checkpoint" / "step-7").mkdir(parents=True)
    clis = cli(
        "to-hf",
        "--checkpoint",
        str(run / "checkpoint" / "step-7"),
        "--out",
        str(run / "hf-step-7"),
        "--config",
        "m",
        "--tokenizer",
        "tok",
        "--dtype",
        "float32",
        "--max-shard-mb",
        "16",
        "--force",
    )
    flames = convert_dcp_to_hf.parse_args(
        ["--path", str(run), "--step", "7", "--config", "m", "--tokenizer", "tok", "--dtype", "float32"]
        + ["--max_shard_mb", "16", "--force"]
    )
    assert flames == clis
    chosen = convert_dcp_to_hf.parse_args(["--path", str(run), "--step", "7", "--config", "m", "--out", "elsewhere"])
    assert chosen.out == "elsewhere"


def test_diagnose_drop_in_gives_the_clis_options(tmp_path):
    (tmp_path / "r.json").write_text("{}")
    given = ["--checkpoint", str(tmp_path), "--model", "m", "--values", "--loss", "--threshold", "0.2"]
    given += ["--tokenizer", "t", "--reference", str(tmp_path / "r.json"), "--json"]
    clis = cli("diagnose", *given, "--train-config", "cfg.json", "--trust-remote-code")
    flames = diagnose_checkpoint.parse_args([*given, "--train_config", "cfg.json", "--trust_remote_code"])
    assert flames == clis and clis.train_config == "cfg.json" and clis.trust_remote_code


@pytest.mark.parametrize("module", [convert_hf_to_dcp, diagnose_checkpoint])
def test_drop_ins_ask_for_the_model_as_flames_scripts_do(module, capsys):
    assert module.main(["--checkpoint", "c"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--model" in lines[0], lines


class _Writes(io.RawIOBase):
    """A raw stream that keeps each write apart, as a pipe shared by ranks sees them."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.calls.append(bytes(data))
        return len(data)


@pytest.mark.parametrize("whole", [False, True])
def test_ranks_write_each_line_whole(monkeypatch, whole):
    """Under torchrun every rank prints to the same pipe: unbuffered, a line's text and its newline are two
    writes (another rank's line lands between them); the ranks' streams are set to write each line whole."""
    raw = _Writes()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, write_through=True))  # as python -u makes it
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(_Writes(), write_through=True))
    if whole:
        _one_write_per_line()
    print("rank 1 of 2, its shards:", "wrote out: 5 tensors")
    sys.stdout.flush()
    line = b"rank 1 of 2, its shards: wrote out: 5 tensors\n"
    assert (raw.calls == [line]) is whole, raw.calls
