"""Shared fixtures: tiny real models and checkpoints, built once per test session.

Everything here is real: real transformers models saved with ``save_pretrained``, real DCP folders written
by the converter. Session-scoped fixtures keep the suite fast on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flame_ext.hf import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def titan_version() -> str | None:
    """'0.1', '0.3', ... of the installed torchtitan, or None."""
    try:
        from importlib.metadata import version

        return ".".join(version("torchtitan").split(".")[:2])
    except Exception:
        return None


def run_cli(*args: str, module: str = "flame_ext.cli", env: dict | None = None, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    """Run a flame-ext command in a fresh interpreter, as a user would; returns the finished process."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=full_env, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The embedded trained byte-level OLMo2 (HF folder)."""
    assert (DEFAULT_MODEL / "model.safetensors").is_file(), "embedded model missing"
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def sharded_model(tmp_path_factory) -> Path:
    """A random tiny OLMo2 saved as 5 safetensors shards with an index (the layout of real 7B repos)."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    cfg = Olmo2Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=256, eos_token_id=256, pad_token_id=256, bos_token_id=None)
    out = tmp_path_factory.mktemp("sharded") / "olmo2"
    Olmo2ForCausalLM(cfg).save_pretrained(out, max_shard_size="60KB")
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


@pytest.fixture(scope="session")
def tiny_dcp(tiny_model, tmp_path_factory) -> Path:
    """The embedded model converted with defaults (flat layout, reference recorded)."""
    from flame_ext.convert import ConvertOptions, convert_hf_to_dcp

    out = tmp_path_factory.mktemp("dcp") / "step-0"
    convert_hf_to_dcp(ConvertOptions(model=str(tiny_model), checkpoint=str(out), progress=False))
    return out
