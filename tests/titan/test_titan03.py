"""torchtitan 0.3 API only (0.3.x and main): a native torchtitan model (llama3 debug) loaded from an HF Llama
through the host's state-dict adapter (``initial_load_in_hf``), the two ways to switch the guard on, and real
``torchtitan.train`` runs on CPU (launcher shims in ``cpu_train.py``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.titan_hosts import build_manager03_hf, titan_generation

if titan_generation() == "0.3":
    from flame_ext.titan.v03 import FOLDS_BATCH

pytestmark = pytest.mark.skipif(
    titan_generation() != "0.3",
    reason="torchtitan 0.3.x API (Config dataclasses, "
    "initial_load_in_hf, --override.imports); this environment has another generation",
)

HERE = Path(__file__).parent
STEP0 = re.compile(r"step-0 loss (\S+) vs HF reference (\S+) \(delta (\S+), threshold (\S+)\)")


def reference_file(hf_dir: Path, out: Path) -> Path:
    """The reference-only manifest, written by the code behind `flame-ext reference --model HF --out FILE`."""
    from flame_ext.command_options import ReferenceOptions
    from flame_ext.commands.reference import write_reference

    write_reference(ReferenceOptions(model=str(hf_dir), out=str(out), dtype="float32", reference_device="cpu"))
    return out


@pytest.fixture(scope="module")
def llama(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """An HF Llama shaped like the debug model, its reference, and its torchtitan DCP with flame_ext.json."""
    from _llama import convert_with_adapter, debug_model_config, make_hf_llama

    root = tmp_path_factory.mktemp("llama")
    hf = make_hf_llama(root / "hf", tiny_model)
    ref = reference_file(hf, root / "reference.json")
    assert max(max(r) for r in json.loads(ref.read_text())["reference"]["token_ids"]) < 2048
    dcp_dir = convert_with_adapter(hf, root / "dcp", debug_model_config())
    shutil.copy2(ref, dcp_dir / "flame_ext.json")
    other = make_hf_llama(root / "other-hf", tiny_model, seed=1, scale=1.0)  # another model's reference: a wrong one
    data = root / "data"
    data.mkdir()
    text = (Path(__file__).parents[2] / "flame_ext" / "assets" / "reference.txt").read_text()
    with open(data / "data.json", "w") as f:
        for i in range(64):
            f.write(json.dumps({"text": text[(i * 37) % 2000 : (i * 37) % 2000 + 800]}) + "\n")
    return {
        "hf": hf,
        "reference": ref,
        "dcp": dcp_dir,
        "wrong_reference": reference_file(other, root / "wrong.json"),
        "data": data,
        "root": root,
    }


def test_native_model_from_hf_safetensors_passes(llama, tmp_path, caplog):
    from _llama import build_like_trainer, debug_model_config
    from torchtitan.models.llama3 import Llama3StateDictAdapter

    caplog.set_level("INFO")
    config = debug_model_config()
    manager = build_manager03_hf(
        build_like_trainer(config),
        tmp_path,
        llama["hf"],
        Llama3StateDictAdapter(config, str(llama["hf"])),
        validate_initial_load=True,
        initial_load_reference=str(llama["reference"]),
    )
    assert manager.load() is True
    report = manager.initial_load_report
    assert report.ok and report.counts["missing"] == 0 and abs(report.loss.delta) < 0.01
    assert any(STEP0.search(r.getMessage()) for r in caplog.records)


def test_hf_keys_the_model_asks_for_are_all_listed_before_reading(llama, tmp_path):
    """An HF model with 5 layers for a 6-layer torchtitan model: every layers.5 key, at once."""
    from _llama import build_like_trainer, debug_model_config, make_hf_llama
    from torchtitan.models.llama3 import Llama3StateDictAdapter

    from flame_ext.errors import InitialLoadValidationError

    short = make_hf_llama(tmp_path / "hf5", llama["hf"], n_layers=5)
    config = debug_model_config()
    model = build_like_trainer(config)
    before = model.state_dict()["norm.weight"].clone()
    manager = build_manager03_hf(
        model,
        tmp_path / "run",
        short,
        Llama3StateDictAdapter(config, str(short)),
        validate_initial_load=True,
        initial_load_reference=str(llama["reference"]),
    )
    with pytest.raises(InitialLoadValidationError, match="nothing was read") as info:
        manager.load()
    missing = sorted(p.key for p in info.value.report.errors if p.kind == "missing_key")
    assert missing == sorted(
        f"model.layers.5.{k}"
        for k in (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        )
    )
    assert model.state_dict()["norm.weight"].equal(before)


def test_config_function_and_override_forms_build_the_guard():
    from torchtitan.config import ConfigManager
    from torchtitan.config.override import apply_overrides

    from flame_ext.titan import ValidatingCheckpointManager

    cfg = ConfigManager().parse_args(
        [
            "--module",
            "guarded_configs",
            "--config",
            "llama3_debugmodel_guarded",
            "--checkpoint.validate_initial_load",
            "--checkpoint.initial_load_max_loss_delta",
            "0.05",
        ]
    )
    assert type(cfg.checkpoint) is ValidatingCheckpointManager.Config
    assert (cfg.checkpoint.validate_initial_load, cfg.checkpoint.initial_load_max_loss_delta) == (True, 0.05)
    assert cfg.checkpoint._owner is ValidatingCheckpointManager

    stock = ConfigManager().parse_args(
        [
            "--module",
            "llama3",
            "--config",
            "llama3_debugmodel",
            "--override.imports",
            'flame_ext.titan.config03.initial_load_guard={"initial_load_max_loss_delta": 0.25}',
        ]
    )
    assert type(stock.checkpoint).__name__ == "Config" and not hasattr(stock.checkpoint, "validate_initial_load")
    apply_overrides(stock.override, stock)  # what Trainer.__init__ does before building the checkpointer
    assert type(stock.checkpoint) is ValidatingCheckpointManager.Config
    assert (stock.checkpoint.validate_initial_load, stock.checkpoint.initial_load_max_loss_delta) == (True, 0.25)
    assert stock.checkpoint.interval == 10  # the stock config's own fields are kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_args(llama: dict, cwd: Path) -> list[str]:
    """Two rows of 128 tokens, in the installed host's terms. A batch-folding torchtitan (main) counts tokens per
    microbatch and reads its debug data set from ``tests/assets/c4_test`` under the working directory."""
    if not FOLDS_BATCH:
        return [
            "--dataloader.dataset_path",
            str(llama["data"]),
            "--training.seq_len",
            "128",
            "--training.local_batch_size",
            "2",
        ]
    (cwd / "tests" / "assets").mkdir(parents=True, exist_ok=True)
    shutil.copytree(llama["data"], cwd / "tests" / "assets" / "c4_test", dirs_exist_ok=True)
    return ["--training.max_context_length", "128", "--training.num_tokens_per_microbatch_per_dp_rank", "256"]


def overrides(*names: str) -> list[str]:
    """``--override.imports`` with ``names``, after the CPU attention swap where the host needs it: 0.3 trains
    with causal SDPA in place of Flex. Main gets none: its SDPA takes ``[B, L, N, H]`` only (on folded tokens it
    computes something else, which the guard reports as a loss gap), and Flex runs the forward pass on CPU."""
    names = names if FOLDS_BATCH else ("cpu_overrides.cpu_sdpa", *names)
    return ["--override.imports", *names] if names else []


def train(llama: dict, out: Path, *args: str, steps: int = 2) -> subprocess.CompletedProcess:
    """``torchtitan.train`` for ``steps`` steps on CPU, one process, fp32, from the llama DCP at initial_load_path."""
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        str(HERE / "cpu_train.py"),
        *args,
        "--hf_assets_path",
        str(llama["hf"]),
        *_batch_args(llama, out.parent),
        "--training.steps",
        str(steps),
        "--training.disable_cuda_graphs",
        "--training.mixed_precision_param",
        "float32",
        "--checkpoint.enable",
        "--checkpoint.initial_load_path",
        str(llama["dcp"]),
        "--dump_folder",
        str(out),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent, timeout=120)


@pytest.mark.slow
def test_training_run_with_the_guard_on_a_stock_config(llama, tmp_path):
    proc = train(
        llama,
        tmp_path / "run",
        "--module",
        "llama3",
        "--config",
        "llama3_debugmodel",
        *overrides("flame_ext.titan.config03.initial_load_guard"),
    )
    log = proc.stdout + proc.stderr
    step0 = STEP0.search(log)
    assert step0 and abs(float(step0.group(3))) < 0.01, log[-4000:]
    assert log.index("step-0 loss") < log.index("Training starts at step 1")
    if FOLDS_BATCH:  # main's language models attend with Flex only, and CPU torch has no Flex backward
        assert proc.returncode != 0 and "FlexAttention does not support backward on CPU" in log, log[-4000:]
        return
    assert proc.returncode == 0, log[-4000:]
    assert re.search(r"step:\s+2\s", log) and (tmp_path / "run" / "checkpoint" / "step-2").is_dir()


@pytest.mark.slow
def test_training_run_stops_before_step_1_on_a_loss_gap(llama, tmp_path):
    proc = train(
        llama,
        tmp_path / "run",
        "--module",
        "guarded_configs",
        "--config",
        "llama3_debugmodel_guarded",
        "--checkpoint.validate_initial_load",
        "--checkpoint.initial_load_reference",
        str(llama["wrong_reference"]),
        *overrides(),
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "InitialLoadValidationError" in log and "loss_gap" in log
    assert not re.search(r"step:\s+1\s", log) and not (tmp_path / "run" / "checkpoint").exists()


def test_a_native_checkpoint_with_an_hf_keyed_reference_states_its_values_coverage(llama, tmp_path, caplog):
    """torchtitan's own llama3 keys, a reference with the HF files' keys: one tensor (``norm.weight``) has a
    fingerprint to check. The load passes with a warning and never says 'values' validated; with
    ``initial_load_verify_values = true`` it is stopped naming the count."""
    from _llama import build_like_trainer, debug_model_config
    from support.titan_hosts import build_manager

    from flame_ext.errors import InitialLoadValidationError

    caplog.set_level("INFO", logger="flame_ext")
    config = debug_model_config()

    def load(run: str, **guard):
        manager = build_manager(
            build_like_trainer(config),
            tmp_path / run,
            initial_load_path=str(llama["dcp"]),
            validate_initial_load=True,
            **guard,
        )
        assert manager.load() is True
        return manager.initial_load_report

    report = load("unset")
    (warning,) = [p for p in report.warnings if p.kind == "manifest"]
    assert warning.detail.startswith("values: 1 of 57 tensors verified: no fingerprint recorded for 56 loaded")
    assert any(n.startswith("values: 1 of 57 tensors verified") for n in report.notes)
    final = caplog.messages[-1]
    assert "validated (keys, manifest, values: 1 of 57, buffers" in final and "values," not in final
    with pytest.raises(InitialLoadValidationError, match="no fingerprint recorded for 56 loaded tensors"):
        load("required", initial_load_verify_values=True)


@pytest.mark.slow
def test_a_training_run_resumes_verified(llama, tmp_path):
    """``torchtitan.train`` saves full checkpoints with the guard on (the Trainer's own state and the dataloader's
    included), then a second run resumes from the last one: verified, and it trains on."""
    if FOLDS_BATCH:
        pytest.skip("main's language models attend with Flex only, and CPU torch has no Flex backward")
    guarded = ["--module", "llama3", "--config", "llama3_debugmodel"]
    guarded += [*overrides("flame_ext.titan.config03.initial_load_guard"), "--checkpoint.no_last_save_model_only"]
    first = train(llama, tmp_path / "run", *guarded)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    record = json.loads((tmp_path / "run" / "checkpoint" / "step-2" / "flame_ext.json").read_text())
    assert record["step"] == 2 and "train_state.step" in record["digests"] | record["fingerprints"]["tensors"]
    assert any(k.startswith("dataloader.") for k in record["digests"])
    again = train(llama, tmp_path / "run", *guarded, steps=3)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    tensors = len(record["fingerprints"]["tensors"])
    assert f"values: {tensors} of {tensors} tensors verified against the save-time record of step 2" in log
    assert "validated (values)" in log or "validated (buffers, values)" in log
    assert re.search(r"step:\s+3\s", log)
