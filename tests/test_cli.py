"""The drop-in modules build the very options the CLI builds: flame's argument names, the same converter call."""

from __future__ import annotations

from dataclasses import fields

import pytest

from flame_ext import convert_dcp_to_hf, convert_hf_to_dcp, diagnose_checkpoint
from flame_ext.cli import build_parser, convert_options, diagnose_options, to_hf_options


def cli(*argv: str):
    return build_parser().parse_args(list(argv))


def changed(options: object, default: object) -> set[str]:
    return {f.name for f in fields(options) if getattr(options, f.name) != getattr(default, f.name)}


def test_convert_drop_in_gives_the_clis_options():
    given = ["--model", "m", "--checkpoint", "out", "--dtype", "bfloat16", "--layout", "nested"]
    clis = convert_options(
        cli(
            "convert",
            *given,
            "--no-reference",
            "--trust-remote-code",
            "--include-future-predictor",
            "--future-predictor-head-type",
            "mlp",
            "--reference-seq-len",
            "64",
            "--buffer-mb",
            "8",
            "--reference-device",
            "cpu",
            "--force",
        )
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
            "--buffer_mb",
            "8",
            "--reference_device",
            "cpu",
            "--force",
        ]
    )
    assert convert_options(flames) == clis
    defaults = convert_options(cli("convert", "--model", "m", "--checkpoint", "out"))
    assert changed(clis, defaults) == {f.name for f in fields(clis)} - {
        "model",
        "checkpoint",
        "reference_text",
        "progress",
    }


def test_to_hf_drop_in_gives_the_clis_options(tmp_path):
    run = tmp_path / "exp"
    clis = to_hf_options(
        cli(
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
    )
    flames = convert_dcp_to_hf.parse_args(
        ["--path", str(run), "--step", "7", "--config", "m", "--tokenizer", "tok", "--dtype", "float32"]
        + ["--max_shard_mb", "16", "--force"]
    )
    assert to_hf_options(flames) == clis
    chosen = convert_dcp_to_hf.parse_args(["--path", str(run), "--step", "7", "--config", "m", "--out", "elsewhere"])
    assert to_hf_options(chosen).out == "elsewhere"


def test_diagnose_drop_in_gives_the_clis_options():
    given = ["--checkpoint", "c", "--model", "m", "--values", "--loss", "--threshold", "0.2", "--tokenizer", "t"]
    given += ["--reference", "r.json", "--json"]
    clis = diagnose_options(cli("diagnose", *given, "--train-config", "cfg.json", "--trust-remote-code"))
    flames = diagnose_options(
        diagnose_checkpoint.parse_args([*given, "--train_config", "cfg.json", "--trust_remote_code"])
    )
    assert flames == clis and clis.train_config == "cfg.json" and clis.trust_remote_code


@pytest.mark.parametrize("module", [convert_hf_to_dcp, diagnose_checkpoint])
def test_drop_ins_ask_for_the_model_as_flames_scripts_do(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--checkpoint", "c"])
    assert exit_.value.code == 2 and "--model" in capsys.readouterr().err
