"""torchtitan 0.3.x: continued pre-training of Llama-3.1-8B from its HF weights, initial-load guard on.

torchtitan 0.3 has no TOML: a config is a Python function. This one is torchtitan's own ``llama3_8b``
with the checkpoint config swapped for the guard's (every stock field kept) and the HF weights as the
initial load. The guard's reference sits in the HF folder, where the default looks for it::

    flame-ext reference --model ./assets/hf/Llama-3.1-8B --out ./assets/hf/Llama-3.1-8B/flame_ext.json --dtype bfloat16
    PYTHONPATH=/path/to/flame-ext/configs torchrun --nproc_per_node=8 -m torchtitan.train \\
        --module titan03_llama3_8b_cpt --config llama3_8b_cpt --checkpoint.initial_load_max_loss_delta 0.1

Every guard field is an ordinary flag (``--checkpoint.validate_initial_load`` /
``--checkpoint.no-validate-initial-load``, ``--checkpoint.initial_load_reference FILE``, ...), because tyro
reads them from the config's runtime class. Without a config function: ``--module llama3 --config llama3_8b
--override.imports flame_ext.titan.config03.initial_load_guard``.
"""

from __future__ import annotations

from torchtitan.components.optimizer import default_adamw
from torchtitan.models.llama3.config_registry import llama3_8b
from torchtitan.trainer import Trainer

from flame_ext.titan.config03 import with_initial_load_guard


def llama3_8b_cpt() -> Trainer.Config:
    config = llama3_8b()
    config.optimizer = default_adamw(lr=3e-5)  # continued pre-training: well below the pre-training peak
    return with_initial_load_guard(
        config,
        enable=True,
        initial_load_in_hf=True,  # read config.hf_assets_path's safetensors (initial_load_path unset)
        initial_load_model_only=True,
        validate_initial_load=True,
        # 0.1 nats: far above the numerical gap of a correct load, far below a broken one (see olmo2-7b-cpt.toml).
        initial_load_max_loss_delta=0.1,
        initial_load_repair_buffers=True,
    )
