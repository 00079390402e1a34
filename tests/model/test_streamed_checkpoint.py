"""``diagnose --loss`` streamed: a DCP checkpoint loaded and run one block at a time gives the per-token losses
of the whole model built, loaded and repaired as a trainer does, on every architecture; the memory it holds
does not grow with the number of layers; a model it cannot walk is loaded whole and says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from arch_support import ARCHS, MAY_FALL_BACK, save_arch_model, token_ids
from support.cli import report_json

from flame_ext.checks.loss import _device_for, _streamed_losses, build_like_trainer, check_loss, load_into
from flame_ext.checks.nonpersistent_buffers import check_buffers
from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.hf import build_meta_model, expected_tensors, open_hf
from flame_ext.io.key_names import locate_keys
from flame_ext.model.reference_loss import per_token_loss, run_forward
from flame_ext.model.streamed import NotStreamable
from flame_ext.model.streamed_checkpoint import CheckpointStreamedModel


def _convert(model: Path, out: Path, dtype: str) -> Path:
    convert_hf_to_dcp(
        ConvertOptions(model=str(model), checkpoint=str(out), dtype=dtype, progress=False, reference=False)
    )
    return out


@pytest.fixture(scope="module")
def checkpoints(arch_models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("streamed-ckpts")
    return {
        (arch, dtype): _convert(arch_models[arch], root / f"{arch}-{dtype}", dtype)
        for arch in ARCHS
        for dtype in ("float32", "bfloat16")
    }


def _inputs(model: Path, folder: Path):
    hf = open_hf(str(model))
    found = read_dcp_metadata(folder)
    return hf, found, locate_keys(expected_tensors(build_meta_model(hf)), found)


def _whole(model: Path, folder: Path, dtype: str, ids: torch.Tensor) -> torch.Tensor:
    """The trainer's whole-model path: meta, to_empty, dcp.load of every tensor, buffers repaired, forward."""
    hf, found, key_map = _inputs(model, folder)
    whole = build_like_trainer(hf, dtype)
    assert load_into(whole, folder, found, key_map) == []
    check_buffers(whole, repair=True)
    return per_token_loss(run_forward(whole, ids), ids)


def _streamed(model: Path, folder: Path, dtype: str, ids: torch.Tensor) -> tuple[torch.Tensor, CheckpointStreamedModel]:
    hf, found, key_map = _inputs(model, folder)
    sm = CheckpointStreamedModel.build(hf, dtype, folder, found, key_map)
    return _streamed_losses(sm, ids, _device_for(sm.module)), sm


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "ckpt_dtype, run_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32")]
)
@torch.no_grad()
def test_streamed_losses_equal_the_whole_model_loaded_as_a_trainer_loads_it(
    arch_models, checkpoints, arch, ckpt_dtype, run_dtype
):
    """A bf16 checkpoint run in float32 is the issue's case: DCP casts each block into the fp32 tensors."""
    ids = token_ids()
    folder = checkpoints[(arch, ckpt_dtype)]
    whole = _whole(arch_models[arch], folder, run_dtype, ids)
    try:
        streamed, sm = _streamed(arch_models[arch], folder, run_dtype, ids)
    except NotStreamable as exc:  # the whole model is loaded instead (tested below)
        assert arch in MAY_FALL_BACK and "non-persistent buffer" in str(exc), exc
        return
    assert torch.isfinite(streamed).all()
    # Same values, same kernels, same order: measured equal; 1e-5 nats promised in fp32.
    assert torch.allclose(streamed, whole, atol=1e-5 if run_dtype == "float32" else 1e-2, rtol=0)
    assert _resident_bytes(sm.module) < sm.largest_block  # every block dropped after it ran: the final norm stays


def _resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors that hold memory now (not on meta), each counted once."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            seen[t.data_ptr()] = t.nbytes
    return sum(seen.values())


@torch.no_grad()
def test_the_memory_held_does_not_grow_with_the_number_of_layers(tmp_path):
    """The same width with 2 and 8 layers: the most tensor bytes resident at once while the forward runs
    (counted after each block has loaded) are the same, and about two layers', not the model's."""
    ids = token_ids()
    peaks, sizes = {}, {}
    for layers in (2, 8):
        model = save_arch_model("llama_gqa", tmp_path / f"hf{layers}", layers=layers)
        folder = _convert(model, tmp_path / f"ckpt{layers}", "float32")
        hf, found, key_map = _inputs(model, folder)
        sm = CheckpointStreamedModel.build(hf, "float32", folder, found, key_map)
        most = [0]

        def measure(module, args, most=most, sm=sm):
            most[0] = max(most[0], _resident_bytes(sm.module))

        handles = [layer.register_forward_pre_hook(measure) for layer in sm.module.model.layers]
        handles.append(sm.module.lm_head.register_forward_pre_hook(measure))
        _streamed_losses(sm, ids, torch.device("cpu"))
        for h in handles:
            h.remove()
        peaks[layers], sizes[layers] = most[0], sum(s.nbytes for s in found.values() if s is not None)
    assert sizes[8] > 2.5 * sizes[2]  # the model grew
    assert peaks[8] == peaks[2]  # what is held did not
    assert peaks[8] < sizes[8] / 2


def test_a_model_that_cannot_be_streamed_is_loaded_whole_and_says_so(arch_models, checkpoints):
    """Gemma2 on transformers 5: its embedding's scale is a non-persistent buffer no config rebuilds alone."""
    hf, found, key_map = _inputs(arch_models["gemma2"], checkpoints[("gemma2", "float32")])
    sm = CheckpointStreamedModel.build(hf, "float32", checkpoints[("gemma2", "float32")], found, key_map)
    if not any(n == "embed_scale" for m in sm.module.modules() for n in m._non_persistent_buffers_set):
        pytest.skip("this transformers' Gemma2 keeps no embedding scale buffer: it streams")
    from flame_ext.model.reference_loss import reference_losses

    losses, _, _ = reference_losses(hf, token_ids(), "float32")
    ref = {"token_ids": token_ids().tolist(), "loss_per_token": losses.tolist(), "loss_mean": losses.mean().item()}
    ref["dtype"] = "float32"
    result = check_loss(
        hf,
        checkpoints[("gemma2", "float32")],
        found,
        key_map,
        {"reference": ref},
        threshold=0.1,
        token_threshold=0.1,
        dtype="float32",
    )
    assert any("whole model in memory" in n and "non-persistent buffer" in n for n in result.notes), result.notes


def test_a_damaged_data_file_is_one_line_and_exit_2(tiny_model, tmp_path, capsys):
    """The load of a block fails while the forward runs (possibly on the read-ahead thread): the user gets
    the read's own error, one line, exit 2."""
    from flame_ext.cli import main

    folder = tmp_path / "step-0"
    convert_hf_to_dcp(ConvertOptions(model=str(tiny_model), checkpoint=str(folder), progress=False))
    data = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data.write_bytes(b"\0" * data.stat().st_size)  # right size, no tensor records in it
    code = main(["diagnose", "--checkpoint", str(folder), "--loss", "--json"])
    out = report_json(capsys.readouterr().out)
    assert code == 2 and "cannot read" in out["error"] and "\n" not in out["error"], out
