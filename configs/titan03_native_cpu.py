"""torchtitan 0.3.x on a CPU: its own llama3 (the debug model cut to 2 layers) trained from a flame-ext native
conversion, initial-load guard on. From a flame-ext source checkout, in the environment with torchtitan 0.3::

    python configs/titan03_native_cpu.py            # a healthy start: validated, 2 training steps, exit 0
    python configs/titan03_native_cpu.py --damage   # one q head permuted after conversion: stopped, exit 1

Each run makes everything locally in a temporary folder (``--workdir DIR`` keeps it): a random HF Llama written
through torchtitan's own adapter (``to_hf``), ``flame-ext convert --layout torchtitan:titan03_native_cpu
--titan-config llama3_tiny_cpu`` (this module is the config registry, as ``--module``), a JSON data set from
flame-ext's bundled corpus, then ``torchtitan.train`` in a subprocess, the command printed. torchtitan 0.3
assumes an accelerator in a few places: the run goes through the CPU shims of flame-ext's tests
(``tests/titan/cpu_train.py``, ``--override.imports cpu_overrides.cpu_sdpa``), which change no training code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIMS = HERE.parent / "tests" / "titan"
MODULE, FUNCTION = "titan03_native_cpu", "llama3_tiny_cpu"
DAMAGED = "layers.1.attention.qkv_linear.wq.weight"
LOGGED = re.compile(r"^\[titan\] \S+ \S+ - \S+ - (?:INFO|WARNING|ERROR) - (.*)$")  # torchtitan's log format
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the colours of torchtitan's step lines
SHOWN = ("flame-ext:", "step-0 loss", "step:", "Training starts")  # the guard's lines and the trainer's steps


def llama3_tiny_cpu():
    """torchtitan's ``llama3_debugmodel`` with 2 layers, fp32, 2 steps of 2 rows of 128 tokens, the guard on
    (every loaded tensor must have its fingerprint: ``initial_load_verify_values``)."""
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    from flame_ext.titan.config03 import with_initial_load_guard

    config = llama3_debugmodel()
    config.model_spec.model.layers = config.model_spec.model.layers[:2]
    config.training.local_batch_size, config.training.seq_len, config.training.steps = 2, 128, 2
    config.training.mixed_precision_param = "float32"
    config.training.disable_cuda_graphs = True
    return with_initial_load_guard(
        config,
        enable=True,
        validate_initial_load=True,
        initial_load_verify_values=True,
        initial_load_max_loss_delta=0.01,
    )


def _say(text: str) -> None:
    print(text, flush=True)


def _hf_folder(out: Path) -> Path:
    """A random HF Llama of the tiny model's shape: torchtitan's model, seeded, through its adapter's ``to_hf``;
    the tokenizer is flame-ext's embedded byte-level one (every id below the 2048-token vocabulary)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from flame_ext.checks.config.native import hf_config_for
    from flame_ext.io.hf import DEFAULT_MODEL

    spec = llama3_tiny_cpu().model_spec
    with torch.device("meta"):
        model = spec.model.build()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
        for p in model.parameters():  # no all-ones norms: a wrong layout must move the loss
            p.add_(torch.randn_like(p) * 0.02)
    hf = spec.state_dict_adapter(spec.model, None).to_hf({k: v.detach() for k, v in model.state_dict().items()})
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"))
    LlamaConfig.from_dict(hf_config_for(spec.model, "llama")).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(DEFAULT_MODEL / name, out / name)
    return out


def _data(out: Path) -> Path:
    """``data.json``: one ``{"text": ...}`` per paragraph of flame-ext's bundled corpus."""
    corpus = sorted((Path(__import__("flame_ext").__file__).parent / "assets" / "corpus").glob("*.txt"))
    out.mkdir(parents=True)
    with open(out / "data.json", "w", encoding="utf-8") as f:
        for path in corpus:
            for text in path.read_text(encoding="utf-8").split("\n\n"):
                if len(text) > 200:
                    f.write(json.dumps({"text": text}) + "\n")
    return out


def _damage(step0: Path, out: Path) -> Path:
    """A copy of ``step0`` whose layer-1 q projection has its first head's rows reversed (shape kept)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step0, out.parent / "step-0.pt")
    state = torch.load(out.parent / "step-0.pt")
    head = state[DAMAGED].shape[0] // 16  # 16 heads
    state[DAMAGED][:head] = state[DAMAGED][:head].flip(0)
    dcp.save(state, checkpoint_id=str(out), no_dist=True)
    shutil.copy2(step0 / "flame_ext.json", out / "flame_ext.json")  # the conversion's record, unchanged
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(work: Path, checkpoint: Path, hf: Path, data: Path) -> int:
    """``torchtitan.train`` in one CPU process through the tests' shims; its log in ``work/train.log``, the
    guard's and the trainer's step lines shown."""
    cmd = [
        sys.executable, str(SHIMS / "cpu_train.py"), "--module", MODULE, "--config", FUNCTION,
        "--override.imports", "cpu_overrides.cpu_sdpa", "--hf_assets_path", str(hf),
        "--dataloader.dataset_path", str(data), "--checkpoint.initial_load_path", str(checkpoint),
        "--dump_folder", str(work / "run"),
    ]  # fmt: skip
    env = {
        **os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    _say("    " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    log = ANSI.sub("", proc.stdout + proc.stderr)
    (work / "train.log").write_text(log)
    for line in log.splitlines():
        if line.startswith("[rank0]: "):
            _say("      | " + line[len("[rank0]: ") :])  # the guard's report of a stopped run
            continue
        logged = LOGGED.match(line)
        if logged and any(s in logged.group(1) for s in SHOWN) and "initial-load report:" not in line:
            _say("      | " + logged.group(1))
    _say(f"    torchtitan.train exited with {proc.returncode} (full log: {work / 'train.log'})")
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--damage", action="store_true", help="permute one q head after conversion")
    parser.add_argument("--workdir", help="keep the files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    logging.getLogger().setLevel(logging.ERROR)  # torchtitan's notes about the training run, while converting
    warnings.simplefilter("ignore", UserWarning)  # DCP: "torch.distributed is disabled ... single process"
    with tempfile.TemporaryDirectory(prefix="flame-ext-native-cpu-") as tmp:
        work = Path(args.workdir or tmp).resolve()
        shutil.rmtree(work / "native-cpu", ignore_errors=True)
        work = work / "native-cpu"
        work.mkdir(parents=True)
        from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

        hf = _hf_folder(work / "hf")
        _say(f"[1/3] a random tiny HF Llama written through torchtitan's Llama3StateDictAdapter: {hf}")
        step0 = work / "step-0"
        _say(f"[2/3] flame-ext convert --model {hf} --checkpoint {step0} --layout torchtitan:{MODULE} "
             f"--titan-config {FUNCTION}")  # fmt: skip
        summary = convert_hf_to_dcp(
            ConvertOptions(model=str(hf), checkpoint=str(step0), layout=f"torchtitan:{MODULE}", titan_config=FUNCTION,
                           progress=False)
        )  # fmt: skip
        _say(f"    {summary.line()}")
        checkpoint = step0
        if args.damage:
            checkpoint = _damage(step0, work / "damaged")
            _say(f"    damaged copy: {checkpoint} ({DAMAGED}: one head's rows reversed, shape unchanged)")
        _say(f"[3/3] torchtitan.train from {checkpoint.name}, checkpoint.validate_initial_load on:")
        code = _train(work, checkpoint, hf, _data(work / "data"))
    cpu = time.process_time() + os.times().children_user + os.times().children_system
    _say(f"({time.perf_counter() - start:.1f} s, {cpu:.1f} s of CPU)")
    return code


if __name__ == "__main__":
    sys.exit(main())
