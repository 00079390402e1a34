"""Fixtures of the reliability tests: a fork server to run commands cheaply, and models made once per session.

``small_*``: a 3-shard OLMo2 of ~70k parameters with a byte-level tokenizer, the base that the bad-input
cases corrupt.
``big_*``: an 8-shard OLMo2 of ~6M parameters (24 MB) with the same tokenizer: with ``--buffer-mb 1`` a
conversion writes ~75 files (the embedding and head in 1 MiB row blocks), so a kill at a random moment lands
mid-write. That takes 0.5-2 s depending on the machine's load and disk (more with the reference step); the kill
tests measure it and scale their delays to it.

Set ``RELIABILITY_FIGURES=FILE`` to get the measured figures (cases tried, kills survived, files lost) as
JSON; docs/reliability.md quotes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.reliability._rel import ForkServer

FIGURES: dict[str, object] = {}


@pytest.fixture(scope="session")
def rel_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def forkserver(rel_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("FLAME_EXT_DEBUG", "HF_ENDPOINT")}
    env.update(
        HF_HUB_OFFLINE="1", HF_HOME=str(rel_dir / "hf_home"), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false"
    )
    logs = rel_dir / "runs"
    logs.mkdir()
    server = ForkServer(logs, env)
    yield server
    server.close()


def _make_model(out: Path, hidden: int, layers: int, vocab: int, shard_kb: int) -> Path:
    """A random OLMo2 in shards of ``shard_kb`` KB, with a byte-level tokenizer (the commands that run the HF
    model get past loading it): these tests check that bytes arrive whole, not what the model computes."""
    from support.models import save_tiny_model

    return save_tiny_model(
        out,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        vocab_size=vocab,
        shard_kb=shard_kb,
        tokenizer=True,
        # the byte tokenizer's ids, inside any vocabulary here (OLMo2's own eos 50279 makes transformers warn)
        eos_token_id=256,
        pad_token_id=256,
        bos_token_id=None,
    )


def _convert(forkserver: ForkServer, model: Path, out: Path) -> Path:
    r = forkserver.run("convert", "--model", model, "--checkpoint", out, "--no-reference")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def small_model(rel_dir) -> Path:
    out = _make_model(rel_dir / "small-hf", hidden=64, layers=2, vocab=260, shard_kb=60)
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


@pytest.fixture(scope="session")
def small_dcp(forkserver, small_model, rel_dir) -> Path:
    return _convert(forkserver, small_model, rel_dir / "small-dcp")


@pytest.fixture(scope="session")
def big_model(rel_dir) -> Path:
    out = _make_model(rel_dir / "big-hf", hidden=256, layers=6, vocab=4096, shard_kb=3000)
    assert len(list(out.glob("*.safetensors"))) >= 5
    return out


@pytest.fixture(scope="session")
def big_dcp(forkserver, big_model, rel_dir) -> Path:
    return _convert(forkserver, big_model, rel_dir / "big-dcp")


@pytest.fixture(scope="session")
def figures(rel_dir):
    """Measured numbers, collected by the tests and written out at the end of the session."""
    yield FIGURES
    text = json.dumps(FIGURES, indent=1, sort_keys=True)
    (rel_dir / "figures.json").write_text(text)
    if os.environ.get("RELIABILITY_FIGURES"):
        Path(os.environ["RELIABILITY_FIGURES"]).write_text(text)
