"""Draw docs/images/demo-broken-start.png: the per-position step-0 loss of the demo's broken start.

The demo's step 3 (``flame-ext demo``): the embedded tiny OLMo2 converted, then built as flame builds it on
transformers 4.x (``meta`` -> ``to_empty()`` -> ``post_init()`` leaving the RoPE ``inv_freq`` as
``to_empty()`` left it), the checkpoint loaded, and the guard run with ``initial_load_repair_buffers = false``
and ``initial_load_plot`` set. The guard is driven directly (no trainer), so this runs on any host generation.

    PYTHONPATH=. python bench/plot_demo_broken_start.py [OUT.png]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from flame_ext.commands.demo import _flame_model
from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.errors import InitialLoadValidationError
from flame_ext.guard import InitialLoadGuard, hf_loss_probe, split_request
from flame_ext.guard.options import GuardConfig
from flame_ext.io.dcp import read_dcp_metadata
from flame_ext.io.hf import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "images" / "demo-broken-start.png"
    out = out.absolute()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the plot's title names the checkpoint as the demo does: exp/checkpoint/step-0
        step0 = Path("exp") / "checkpoint" / "step-0"
        convert_hf_to_dcp(ConvertOptions(model=str(DEFAULT_MODEL), checkpoint=str(step0), progress=False))
        torch.manual_seed(0)
        model, simulated, _ = _flame_model(DEFAULT_MODEL, simulate_tf4=True)
        config = GuardConfig(validate_initial_load=True, initial_load_repair_buffers=False, initial_load_plot=str(out))
        guard = InitialLoadGuard(config, str(step0), [model])
        state = model.state_dict()
        guard.before_load(split_request(state), lambda: read_dcp_metadata(step0))
        dcp.load(state, checkpoint_id=str(step0), no_dist=True)
        try:
            guard.after_load(hf_loss_probe(model))
            print("the guard passed: nothing broken to draw", file=sys.stderr)
            return 1
        except InitialLoadValidationError as exc:
            print(str(exc).splitlines()[0])
            lo = exc.report.loss
            print(f"step-0 loss {lo.observed:.4f} vs HF reference {lo.reference:.4f}; drawn in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
