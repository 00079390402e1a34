"""On a machine with a GPU: the reference loss is recorded at conversion and the guard's loss gate runs.

Marked ``cuda`` (skipped where torch sees no GPU): fla's Triton kernels run only there. The same families as
the CPU tests; the model is built as flame builds it, on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from fla_models import FAMILIES
from support.titan_hosts import build_manager, titan_generation

from flame_ext.io.manifest import read_manifest

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(titan_generation() not in ("0.1", "0.3"), reason="needs torchtitan 0.1.x or 0.3.x installed"),
]


def like_flame_on_gpu(hf_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir))
    model.apply(lambda m: setattr(m, "_is_hf_initialized", False))
    model.to_empty(device="cuda")
    with torch.no_grad():
        model.post_init()
    return model.train()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_reference_recorded_and_the_loss_gate_measures_the_step0_loss(name, fla_hf, fla_dcp, tmp_path):
    dcp_dir, _ = fla_dcp(name)
    manifest = read_manifest(dcp_dir)
    assert manifest["reference"] is not None and "reference_unavailable" not in manifest
    manager = build_manager(
        like_flame_on_gpu(fla_hf(name)), tmp_path / "ok", initial_load_path=str(dcp_dir), validate_initial_load=True
    )
    assert manager.load() is True
    loss = manager.initial_load_report.loss
    assert loss is not None and abs(loss.delta) < 0.01
    manager.close()
