"""``flame_ext.checks.checkpoint_values``: every tensor of a DCP checkpoint against its HF source or its
recorded fingerprints, on the embedded tiny model's real tensors, edited one way at a time and saved with
``torch.distributed.checkpoint``; each decision shown as the problem a user reads."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flame_ext.checks.checkpoint_values import Tolerance, compare_values, narrower, verify_fingerprints
from flame_ext.fingerprints.record import read_fingerprints
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.hf import open_hf
from flame_ext.io.manifest import MANIFEST_NAME, read_manifest

KEY = "model.layers.0.mlp.down_proj.weight"


def _save(state: dict[str, torch.Tensor], folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(folder))
    return folder


@pytest.fixture(scope="module")
def source(tiny_model) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model / "model.safetensors"))


def _against_hf(tiny_model: Path, folder: Path, tolerance: Tolerance = Tolerance()) -> tuple[list, object]:
    found = read_dcp_metadata(folder)
    return compare_values(
        folder,
        found,
        open_hf(str(tiny_model)),
        {k: k for k in found},
        tied={},
        base_prefix="model.",
        tolerance=tolerance,
    )


def _against_record(folder: Path, manifest_from: Path) -> list:
    recorded, _ = read_fingerprints(read_manifest(manifest_from / MANIFEST_NAME))
    problems, _ = verify_fingerprints(folder, read_dcp_metadata(folder), recorded)
    return problems


def test_the_rounding_rule_picks_the_coarser_dtype():
    assert narrower(torch.float32, torch.bfloat16) == narrower(torch.bfloat16, torch.float16) == torch.bfloat16
    assert narrower(torch.int64, torch.float32) == torch.int64
    assert not Tolerance().given and Tolerance(atol=1e-3).given


def test_the_same_tensors_pass_both_ways(tiny_model, tiny_dcp, source, tmp_path):
    folder = _save(dict(source), tmp_path / "same")
    problems, stats = _against_hf(tiny_model, folder)
    assert problems == [] and stats.compared == len(source) and stats.bytes_read > 0
    assert _against_record(folder, tiny_dcp) == []


def test_one_scaled_tensor_is_one_error_naming_the_scale(tiny_model, tiny_dcp, source, tmp_path):
    folder = _save({**source, KEY: source[KEY] * 2}, tmp_path / "scaled")
    (problem,) = _against_hf(tiny_model, folder)[0]
    assert (problem.kind, problem.key) == ("value_mismatch", KEY)
    assert "values differ from the HF source" in problem.detail and "scaled by 2" in problem.detail
    (recorded,) = _against_record(folder, tiny_dcp)
    assert recorded.key == KEY and "scaled by 2" in recorded.detail and "after conversion" in recorded.hint
    # A deliberate tolerance wide enough lets it through; the default compares exactly.
    assert _against_hf(tiny_model, folder, Tolerance(atol=10.0))[0] == []


def test_a_nan_is_a_nonfinite_error_beside_the_value_error(tiny_model, source, tmp_path):
    broken = source[KEY].clone()
    broken[0, 0] = float("nan")
    folder = _save({**source, KEY: broken}, tmp_path / "nan")
    problems, _ = _against_hf(tiny_model, folder)
    assert [(p.kind, p.key) for p in problems] == [("nonfinite", KEY)]
    assert problems[0].detail.startswith("1 of ") and "NaN or inf in the checkpoint" in problems[0].detail


def test_every_tensor_unrelated_to_its_source_is_one_never_loaded_error(tiny_model, tiny_dcp, source, tmp_path):
    torch.manual_seed(0)
    folder = _save({k: torch.randn_like(v) * 1e3 for k, v in source.items()}, tmp_path / "never")
    for problems in (_against_hf(tiny_model, folder)[0], _against_record(folder, tiny_dcp)):
        (problem,) = problems
        assert problem.kind == "value_mismatch" and problem.key is None
        assert problem.detail.startswith(f"never loaded: all {len(source)} tensors hold values unrelated to ")
        assert "load the converted checkpoint before saving" in problem.hint
    # One tensor of the source among them ties the rest to something real: each is listed on its own.
    folder = _save({**{k: torch.randn_like(v) for k, v in source.items()}, KEY: source[KEY]}, tmp_path / "some")
    problems, _ = _against_hf(tiny_model, folder)
    assert len(problems) == len(source) - 1 and all(p.key for p in problems)


def test_two_layers_swapped_are_one_error_and_one_pair_stays_per_tensor(tiny_model, tiny_dcp, source, tmp_path):
    a, b = "model.layers.0.", "model.layers.1."
    swapped = {
        (b + k[len(a) :] if k.startswith(a) else a + k[len(b) :] if k.startswith(b) else k): v
        for k, v in source.items()
    }
    folder = _save(swapped, tmp_path / "layers")
    n = sum(1 for k in source if k.startswith((a, b)))
    for problems in (_against_hf(tiny_model, folder)[0], _against_record(folder, tiny_dcp)):
        (problem,) = problems
        assert problem.key is None and problem.detail.startswith(
            f"model.layers.0 and model.layers.1 are swapped: {n} tensors hold each other's values instead of "
        )
        assert problem.hint.startswith("two keys hold each other's tensors")
    q, o = a + "self_attn.q_proj.weight", a + "self_attn.o_proj.weight"
    folder = _save({**source, q: source[o], o: source[q]}, tmp_path / "one-pair")  # one pair: named tensor by tensor
    problems, _ = _against_hf(tiny_model, folder)
    assert sorted(p.key for p in problems) == sorted([q, o])
    assert all("it holds the values expected for" in p.detail for p in problems)
