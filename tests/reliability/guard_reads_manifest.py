"""The training guard on one checkpoint, outside a trainer: ``python guard_reads_manifest.py CKPT HF_CONFIG_DIR``.

Builds the model from the config, runs the guard's pre-load check, loads the checkpoint with DCP as torchtitan
does, then the post-load checks (buffers, the reference forward pass). Used by test_untrusted to watch what
the guard opens and runs while it reads a hostile manifest. Exit 0: passed; 1: the guard refused (one line).
"""

from __future__ import annotations

import sys

import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, AutoModelForCausalLM

from flame_ext.errors import InitialLoadValidationError
from flame_ext.guard import InitialLoadGuard, hf_loss_probe, split_request
from flame_ext.guard.options import GuardConfig
from flame_ext.io.dcp import read_dcp_metadata


def main() -> int:
    ckpt, config_dir = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    guard = InitialLoadGuard(GuardConfig(validate_initial_load=True), ckpt, [model])
    try:
        state = model.state_dict()
        guard.before_load(split_request(state), lambda: read_dcp_metadata(ckpt))
        dcp.load(state, checkpoint_id=ckpt, no_dist=True)
        model.load_state_dict(state)
        guard.after_load(hf_loss_probe(model))
    except InitialLoadValidationError as exc:
        print(f"guard: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print("guard: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
