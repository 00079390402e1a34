"""fla-org/flame's real training entry, 2 steps on the CPU, from a converted checkpoint, guard on.

Runs only where FLAME_SRC names a flame checkout and flame's own dependencies are installed (fla,
datasets 3.x, torchdata: see requirements-flame-src.txt beside this file); CI has neither. Each flame run
is a fresh process (tests/flame/cpu_launch.py sets torchtitan's device to the CPU), with a fresh dump
folder and a free port.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

import pytest
from flame_src_env import FLAME_SRC_HOWTO, flame_checkout  # noqa: F401 -- a fixture

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HOWTO = f"{FLAME_SRC_HOWTO}, in an environment from tests/flame/requirements-flame-src.txt"


def _missing_packages() -> list[str]:
    missing = [name for name in ("fla", "datasets", "torchdata", "tiktoken", "einops") if find_spec(name) is None]
    try:
        if int(version("datasets").split(".")[0]) >= 4:
            missing.append("datasets<4 (flame imports ShufflingConfig, gone in 4.x)")
        if not version("torchtitan").startswith("0.1"):
            missing.append("torchtitan 0.1.x (flame's pin)")
    except PackageNotFoundError:
        pass
    return missing


@pytest.fixture(scope="module")
def flame_env(flame_checkout) -> Path:
    missing = _missing_packages()
    if missing:
        pytest.skip(f"flame's dependencies missing ({', '.join(missing)}): {HOWTO}")
    return flame_checkout


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(".git", "exp", "__pycache__"))
    return dst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": "",
    }


def _train(
    flame_dir: Path, module: str, dump: Path, model: Path, data: Path, *extra: str
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(HERE / "cpu_launch.py"),
        "-m",
        module,
        "--job.config_file",
        str(REPO / "configs" / "tiny-cpu.toml"),
        "--job.dump_folder",
        str(dump),
        "--model.config",
        str(model),
        "--model.tokenizer_path",
        str(model),
        "--training.data_files",
        str(data),
        "--training.steps",
        "2",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=flame_dir, env=_env(), capture_output=True, text=True, timeout=600)
    (dump.parent / f"{dump.name}.log").write_text(proc.stdout + proc.stderr)  # kept in tmp_path for a look
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """flame's json dataset: one {"text": ...} per paragraph of the bundled corpus."""
    out = tmp_path_factory.mktemp("data") / "train.jsonl"
    corpus = sorted((REPO / "flame_ext" / "assets" / "corpus").glob("*.txt"))
    paragraphs = [p for f in corpus for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    out.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return out


@pytest.fixture(scope="module")
def patched(flame_env, tmp_path_factory) -> Path:
    from flame_ext.cli import main as cli_main

    flame_dir = _copy(flame_env, tmp_path_factory.mktemp("patched") / "flame")
    assert cli_main(["patch", "apply", str(flame_dir)]) == 0
    return flame_dir


def test_patch_check_reports_applied(patched):
    proc = subprocess.run(
        [sys.executable, "-m", "flame_ext.cli", "patch", "check", str(patched)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(proc.stdout)
    assert proc.returncode == 0 and proc.stdout.count(": already applied") == 3


def test_patched_flame_converts_and_trains_with_the_guard(patched, tiny_model, data, tmp_path):
    dump = tmp_path / "exp"
    conv = subprocess.run(
        [
            sys.executable,
            "-m",
            "flame.utils.convert_hf_to_dcp",
            "--model",
            str(tiny_model),
            "--checkpoint",
            str(dump / "checkpoint" / "step-0"),
        ],
        cwd=patched,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert conv.returncode == 0, conv.stderr[-2000:]
    assert (dump / "checkpoint" / "step-0" / "flame_ext.json").is_file()  # flame's command, flame-ext's converter
    proc = _train(patched, "flame.train", dump, tiny_model, data)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    assert "step-0 loss" in out and "vs HF reference" in out
    assert "Training completed" in out
    # flame's own export command, patched: the last (full training) checkpoint back to HF.
    back = subprocess.run(
        [
            sys.executable,
            "-m",
            "flame.utils.convert_dcp_to_hf",
            "--path",
            str(dump),
            "--step",
            "2",
            "--config",
            str(tiny_model),
            "--tokenizer",
            str(tiny_model),
        ],
        cwd=patched,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert back.returncode == 0, back.stderr[-2000:]
    assert (dump / "hf-step-2" / "config.json").is_file() and list((dump / "hf-step-2").glob("*.safetensors"))


def test_patched_flame_stops_on_a_nested_checkpoint(patched, tiny_model, data, tmp_path):
    """The layout flame's stock converter writes: the guard names it before DCP reads a tensor."""
    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    dump = tmp_path / "exp"
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(tiny_model), checkpoint=str(dump / "checkpoint" / "step-0"), layout="nested", progress=False
        )
    )
    proc = _train(patched, "flame.train", dump, tiny_model, data)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode != 0
    assert "InitialLoadValidationError" in out and "layout" in out
    assert "Training completed" not in out


def test_unpatched_flame_through_flame_ext_train(flame_env, tiny_model, data, tmp_path):
    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    flame_dir = _copy(flame_env, tmp_path / "flame")
    dump = tmp_path / "exp"
    convert_hf_to_dcp(
        ConvertOptions(model=str(tiny_model), checkpoint=str(dump / "checkpoint" / "step-0"), progress=False)
    )
    proc = _train(flame_dir, "flame_ext.flame.train", dump, tiny_model, data)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    assert "step-0 loss" in out and "Training completed" in out
    assert (flame_dir / "flame" / "train.py").read_bytes() == (flame_env / "flame" / "train.py").read_bytes()


def test_launcher_help_lists_the_guard_options(flame_env):
    proc = subprocess.run(
        [sys.executable, "-m", "flame_ext.flame.train", "--help"],
        cwd=flame_env,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for option in (
        "--checkpoint.validate_initial_load",
        "--checkpoint.no_validate_initial_load",
        "--checkpoint.initial_load_max_loss_delta",
        "--checkpoint.initial_load_reference",
        "--checkpoint.no_initial_load_repair_buffers",
    ):
        assert option in proc.stdout
