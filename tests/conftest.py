"""Shared fixtures: tiny real models and checkpoints, built once per test session.

Everything here is real: real transformers models saved with ``save_pretrained``, real DCP folders written
by the converter. Session-scoped fixtures keep the suite fast on 2 CPU cores.
"""

from __future__ import annotations

import os

# One intra-op thread for torch here and in every command a test starts (set before torch is imported): the
# tensors are tiny, and `make test` runs the two environments side by side on 2 cores, where two-thread OpenMP
# teams spin against each other (a file of value checks took 2.6x the wall time and 1.7x the CPU with two).
# The fingerprint's split between workers is tested with its worker count given (tests/fingerprints).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from support.cli import run_cli, titan_version, transformers_major  # noqa: F401  (re-exported)

from flame_ext.io.hf import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]


# ``once`` is for a test whose outcome cannot depend on the environment (what it exercises is torch, safetensors,
# jsonschema and flame-ext's own formats, pinned alike in both), or a smoke run whose purpose (the script still
# runs) one environment serves. `make test` runs the two environments side by side, so each such test runs in the
# one that leaves both finishing together (docs/benchmarks.md, "Test suite").
ENVIRONMENTS = ("0.1", "0.3")  # the torchtitan generations of .venv-titan01 and .venv


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` run only where torch sees a GPU; tests marked ``once(generation)`` only in the
    environment whose torchtitan is that generation."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    here = titan_version()
    for item in items:
        if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
            item.add_marker(no_gpu)  # the marker, not a parameter id that reads "cuda"
        once = item.get_closest_marker("once")
        if once is not None and once.args[0] not in ENVIRONMENTS:  # else a typo would skip it everywhere
            raise pytest.UsageError(f"{item.nodeid}: once({once.args[0]!r}) names no environment: {ENVIRONMENTS}")
        if once is not None and once.args[0] != here:
            item.add_marker(pytest.mark.skip(reason=f"run once, in the torchtitan {once.args[0]} environment"))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The embedded trained byte-level OLMo2 (HF folder)."""
    assert (DEFAULT_MODEL / "model.safetensors").is_file(), "embedded model missing"
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def sharded_model(tmp_path_factory) -> Path:
    """A random tiny OLMo2 saved as 5 safetensors shards with an index (the layout of real 7B repos)."""
    from support.models import save_tiny_model

    out = save_tiny_model(tmp_path_factory.mktemp("sharded") / "olmo2", shard_kb=60)
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


@pytest.fixture(scope="session")
def tiny_dcp(tiny_model, tmp_path_factory) -> Path:
    """The embedded model converted with defaults (flat layout, reference recorded)."""
    from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp

    out = tmp_path_factory.mktemp("dcp") / "step-0"
    convert_hf_to_dcp(ConvertOptions(model=str(tiny_model), checkpoint=str(out), progress=False))
    return out


# The transposed-q_proj case: a tiny trained Mistral whose layer-1 q_proj (square) is transposed, in a
# checkpoint with no manifest, checked against a reference file written by `flame-ext reference`.
Q_TRANSPOSED = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="session")
def mistral_model(tiny_model, request) -> Path:
    """A tiny Mistral (hidden 64, 4 layers, 4 heads, 2 kv heads) trained on the corpus as the diagnose
    catalogue's models are (cached in pytest's cache folder)."""
    from diagnose.conftest import trained

    return trained("mistral", tiny_model, Path(request.config.cache.mkdir("flame-ext-diagnose-models")))


@pytest.fixture(scope="session")
def mistral_reference(mistral_model, tmp_path_factory) -> Path:
    """`flame-ext reference --model MISTRAL --out FILE`: the HF reference for checkpoints without a manifest."""
    out = tmp_path_factory.mktemp("mistral") / "reference.json"
    proc = run_cli("reference", "--model", str(mistral_model), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def mistral_dcp(mistral_model, tmp_path_factory) -> dict[str, Path]:
    """``healthy`` and ``q_transposed``: `flame-ext convert --no-reference`, then flame_ext.json removed (a
    checkpoint converted elsewhere); the second has ``Q_TRANSPOSED`` transposed, written by DCP."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from flame_ext.io.dcp import load_tensor, read_dcp_metadata

    root = tmp_path_factory.mktemp("mistral")
    healthy = root / "healthy"
    proc = run_cli("convert", "--model", str(mistral_model), "--checkpoint", str(healthy), "--no-reference")
    assert proc.returncode == 0, proc.stderr
    (healthy / "flame_ext.json").unlink()
    sd = {k: load_tensor(healthy, k, spec) for k, spec in read_dcp_metadata(healthy).items() if spec is not None}
    assert sd[Q_TRANSPOSED].shape[0] == sd[Q_TRANSPOSED].shape[1]  # square: the transposed copy loads
    sd[Q_TRANSPOSED] = sd[Q_TRANSPOSED].t().contiguous()
    transposed = root / "q_transposed"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(sd, checkpoint_id=str(transposed), no_dist=True)
    assert not list(healthy.glob("*.json")) and not list(transposed.glob("*.json"))  # no manifest in either
    return {"healthy": healthy, "q_transposed": transposed}
