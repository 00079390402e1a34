"""fla-org/flame's real training entry, 2 steps on the CPU, from a converted checkpoint, guard on.

Runs only where FLAME_SRC names a flame checkout and flame's own dependencies are installed (fla,
datasets 3.x, torchdata: see requirements-flame-src.txt beside this file); CI has neither. Each flame run
is a fresh process (tests/flame/cpu_launch.py sets torchtitan's device to the CPU), with a fresh dump
folder and a free port.
"""

from __future__ import annotations

import json
import os
import re
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
    flame_dir: Path, module: str, dump: Path, model: Path, data: Path, *extra: str, env: dict | None = None
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
    env = {**_env(), **(env or {})}
    proc = subprocess.run(cmd, cwd=flame_dir, env=env, capture_output=True, text=True, timeout=600)
    (dump.parent / f"{dump.name}.log").write_text(proc.stdout + proc.stderr)  # kept in tmp_path for a look
    return proc


def _guard_report(out: str) -> dict:
    """The JSON record the guard logs as 'flame-ext initial-load report: {...}' (one line)."""
    marker = "flame-ext initial-load report: "
    lines = [line for line in out.splitlines() if marker in line]
    assert len(lines) == 1, out[-3000:]
    return json.loads(lines[0].split(marker, 1)[1])


def _tensors_verified(out: str) -> int:
    found = re.findall(r"verified the values of (\d+) loaded tensors", out)
    assert len(found) == 1, out[-3000:]
    return int(found[0])


def _step0_scalars(dump: Path) -> dict[str, list[tuple[int, float]]]:
    """The ``initial_load/*`` scalars of the run's TensorBoard event file, read back with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (dump / "tb").iterdir()  # torchtitan writes <dump>/<save_tb_folder>/<date-time>/events.out.tfevents.*
    events = EventAccumulator(str(run))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith("initial_load/")
    }


def _assert_step0_figures_match(dump: Path, out: str) -> None:
    """Loss, reference, delta, tensors verified (= the checkpoint's tensor count) and 0 mismatches, at step 0."""
    from flame_ext.io.dcp import read_dcp_metadata

    loss = _guard_report(out)["loss"]
    scalars = _step0_scalars(dump)
    assert all(steps == [steps[0]] and steps[0][0] == 0 for steps in scalars.values()), scalars  # once, at step 0
    figures = {tag: steps[0][1] for tag, steps in scalars.items()}
    assert figures["initial_load/loss"] == pytest.approx(loss["observed"], rel=1e-6)
    assert figures["initial_load/reference_loss"] == pytest.approx(loss["reference"], rel=1e-6)
    assert figures["initial_load/loss_delta"] == pytest.approx(loss["delta"], rel=1e-4, abs=1e-9)
    tensors = [k for k, spec in read_dcp_metadata(dump / "checkpoint" / "step-0").items() if spec is not None]
    assert figures["initial_load/tensors_verified"] == _tensors_verified(out) == len(tensors)
    assert figures["initial_load/value_mismatches"] == 0


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


def test_patched_flame_writes_the_step0_figures_to_tensorboard(patched, tiny_dcp, data, tiny_model, tmp_path):
    """A healthy run with flame's TensorBoard on: the guard's step-0 figures are in the event file at step 0."""
    dump = tmp_path / "exp"
    shutil.copytree(tiny_dcp, dump / "checkpoint" / "step-0")
    proc = _train(patched, "flame.train", dump, tiny_model, data, "--metrics.enable_tensorboard")
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0 and "Training completed" in out, out[-3000:]
    assert _guard_report(out)["ok"] is True
    _assert_step0_figures_match(dump, out)


def test_patched_flame_stops_a_damage_the_loss_gate_passes(patched, tiny_dcp, data, tiny_model, tmp_path, monkeypatch):
    """One o_proj scaled by 0.9 after conversion (manifest kept): the step-0 loss moves far less than the gate's
    threshold, so the fingerprints alone stop the run, before step 1."""
    import torch

    monkeypatch.syspath_prepend(str(HERE.parent / "titan"))
    from _models import rewrite_dcp  # the catalogue's way of damaging a DCP while keeping its manifest

    key = "model.layers.0.self_attn.o_proj.weight"
    dump = tmp_path / "exp"
    rewrite_dcp(tiny_dcp, dump / "checkpoint" / "step-0", lambda sd: {**sd, key: sd[key] * torch.tensor(0.9)})
    proc = _train(patched, "flame.train", dump, tiny_model, data)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode != 0
    assert "InitialLoadValidationError" in out and "Training completed" not in out
    assert not re.search(r"step:\s+1\s", out) and not (dump / "checkpoint" / "step-1").exists()
    report = _guard_report(out)
    (problem,) = report["problems"]
    assert problem["kind"] == "value_mismatch" and problem["key"] == key
    assert "scaled by 0.9" in problem["detail"]
    # the loss gate ran and passed it: only the fingerprints caught it
    assert {"values", "loss"} <= set(report["checked"]) and report["problem_kinds"]["loss_gap"] == 0
    assert abs(report["loss"]["delta"]) < report["loss"]["threshold"]
    assert f"value_mismatch {key}: its values are not the ones written at conversion" in out


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
    proc = _train(flame_dir, "flame_ext.flame.train", dump, tiny_model, data, "--metrics.enable_tensorboard")
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    assert "step-0 loss" in out and "Training completed" in out
    _assert_step0_figures_match(dump, out)  # install() hands flame's metric logger the figures too
    assert (flame_dir / "flame" / "train.py").read_bytes() == (flame_env / "flame" / "train.py").read_bytes()


@pytest.mark.parametrize(
    "toml_line, argv, words",
    [
        (f"initial_load_max_loss_delta = {'9' * 400}", [], "initial_load_max_loss_delta = an integer of 400 digits"),
        ("", ["--checkpoint.initial_load_max_loss_delta", "9" * 400], "initial_load_max_loss_delta = inf"),
        ('initial_load_reference = "~nosuchuser/ref.json"', [], "initial_load_reference"),
    ],
)
def test_launcher_refuses_config_values_it_cannot_use(flame_env, tmp_path, toml_line, argv, words):
    """Through flame's own config parsing: one line naming the option, exit 2, no traceback."""
    config = tmp_path / "job.toml"
    config.write_text(f"[checkpoint]\nvalidate_initial_load = true\n{toml_line}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "flame_ext.flame.train", "--job.config_file", str(config), *argv],
        cwd=flame_env,
        env={**_env(), "PYTHONPATH": str(REPO)},  # this checkout's flame_ext, whatever the environment installed
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and words in errors[0], proc.stderr[-2000:]


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


def _torchrun_train(flame_dir: Path, dump: Path, model: Path, data: Path, steps: int) -> subprocess.CompletedProcess:
    """``_train`` on 2 ranks (torchrun, gloo, FSDP over both)."""
    env = {k: v for k, v in _env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env.pop("MASTER_ADDR"), env.pop("MASTER_PORT")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend", "c10d"]
    cmd += ["--rdzv_endpoint", f"localhost:{_free_port()}", str(HERE / "cpu_launch.py"), "-m", "flame.train"]
    cmd += ["--job.config_file", str(REPO / "configs" / "tiny-cpu.toml"), "--job.dump_folder", str(dump)]
    cmd += ["--model.config", str(model), "--model.tokenizer_path", str(model), "--training.data_files", str(data)]
    cmd += ["--training.steps", str(steps)]
    proc = subprocess.run(cmd, cwd=flame_dir, env=env, capture_output=True, text=True, timeout=600)
    (dump.parent / f"{dump.name}-{steps}.log").write_text(proc.stdout + proc.stderr)
    return proc


def _hf_loss(step: Path, config: Path, probe: dict, out: Path) -> float:
    """The HF model's own loss on the probed batch, with the weights of ``step`` (exported by ``to-hf``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from flame_ext.cli import main as cli_main

    assert cli_main(["to-hf", "--checkpoint", str(step), "--config", str(config), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    batch = {k: probe[k] for k in ("input_ids", "labels", "position_ids") if k in probe}
    with torch.no_grad():
        return float(model(**batch).loss)


def test_patched_flame_resumes_verified_with_rope_repaired(patched, tiny_dcp, data, tiny_model, tmp_path):
    """Train 2 steps, restart, resume. The resume is verified against the save-time record of step 2, the RoPE
    buffer is repaired (transformers 4.x leaves it as uninitialised memory on every resume), and the step-3 loss
    equals the HF model's loss on the same batch with step 2's weights. The control, with the buffer check off,
    trains step 3 on a broken RoPE (4.x) and its loss is far from HF's."""
    import torch
    from support.cli import transformers_major

    dump = tmp_path / "exp"
    shutil.copytree(tiny_dcp, dump / "checkpoint" / "step-0")
    first = _train(patched, "flame.train", dump, tiny_model, data)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    step2 = dump / "checkpoint" / "step-2"
    record = json.loads((step2 / "flame_ext.json").read_text())
    assert record["kind"] == "training_step" and record["step"] == 2
    tensors = len(record["fingerprints"]["tensors"])

    def resume(name: str, *extra: str) -> tuple[str, dict]:
        shutil.rmtree(dump / "checkpoint" / "step-3", ignore_errors=True)
        probe = tmp_path / f"{name}.pt"
        steps = ("--training.steps", "3")  # the last of two wins: a restart asked to go one step further
        probed = {"FLAME_EXT_PROBE": str(probe)}
        proc = _train(patched, "flame.train", dump, tiny_model, data, *steps, *extra, env=probed)
        out = proc.stdout + proc.stderr
        (tmp_path / f"{name}.log").write_text(out)
        assert proc.returncode == 0 and "Training completed" in out, out[-3000:]
        return out, torch.load(probe)

    out, probe = resume("resume")
    assert f"values: {tensors} of {tensors} tensors verified against the save-time record of step 2" in out
    assert f"resume from {step2} validated" in out or "step-2 validated" in out
    repaired = "repaired non-persistent buffer model.rotary_emb.inv_freq after loading" in out
    assert repaired == (transformers_major() == 4), out[-3000:]
    hf = _hf_loss(step2, tiny_model, probe, tmp_path / "hf-step-2")
    print(f"step-3 loss: flame {float(probe['loss']):.7f}, HF on the same batch and weights {hf:.7f}")
    assert float(probe["loss"]) == pytest.approx(hf, abs=1e-5)

    out, control = resume("control", "--checkpoint.no_check_buffers_on_every_load")
    gap = abs(float(control["loss"]) - hf)
    print(f"control (buffer check off): step-3 loss {float(control['loss']):.4f}, {gap:.4f} nats from HF")
    assert (gap > 0.1) == (transformers_major() == 4)


def test_patched_flame_stops_a_resume_whose_optimizer_state_changed_on_both_ranks(
    patched, tiny_dcp, data, tiny_model, tmp_path, monkeypatch
):
    """2 ranks train 2 steps and save; one exp_avg of step 2 is halved on disk (its record kept); the resume on 2
    ranks stops on both, before step 3, naming the key as optimizer state."""
    import torch

    monkeypatch.syspath_prepend(str(HERE.parent / "titan"))
    from _steps import key_ending, read_step, rewrite_step

    dump = tmp_path / "exp"
    shutil.copytree(tiny_dcp, dump / "checkpoint" / "step-0")
    first = _torchrun_train(patched, dump, tiny_model, data, steps=2)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    step2 = dump / "checkpoint" / "step-2"
    key = key_ending(read_step(step2), "layers.0.mlp.down_proj.weight.exp_avg")
    damaged = tmp_path / "damaged"
    shutil.copytree(dump / "checkpoint" / "step-0", damaged / "checkpoint" / "step-0")
    rewrite_step(step2, damaged / "checkpoint" / "step-2", lambda sd: sd.__setitem__(key, sd[key] * torch.tensor(0.5)))
    proc = _torchrun_train(patched, damaged, tiny_model, data, steps=3)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode != 0 and not re.search(r"step:\s+3\s", out)
    assert not (damaged / "checkpoint" / "step-3").exists()
    for rank in (0, 1):
        assert f"failed validation on rank {rank} of 2" in out
        assert re.search(rf"\[rank{rank}\]:\s+ERROR\s+value_mismatch {re.escape(key)}: .*\(optimizer state\)", out)
    assert "scaled by 0.5" in out
