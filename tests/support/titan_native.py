"""Tiny torchtitan-native models for the tests, as a config registry torchtitan's CLI can name
(``--module support.titan_native --config llama3_tiny``; flame-ext: ``--layout torchtitan:support.titan_native
--titan-config llama3_tiny``), and HF-named safetensors folders made for them.

The config functions are torchtitan 0.3's own debug configs with fewer layers (and, for the MoE bench, other
layer and expert counts). The HF folders are written from a torchtitan model with torchtitan's own adapter
(``to_hf``): HF key names and HF layouts (llama3's q/k permutation, one tensor per expert), nothing of
flame-ext's. Importing this module imports torchtitan's trainer (needs triton), so tests import it lazily.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

# The HF ``model_type`` each torchtitan model corresponds to (config.json of the generated folders).
HF_TYPES = {"llama3": "llama", "qwen3": "qwen3", "deepseek_v3": "deepseek_v3"}


def _cut(config: Any, layers: int) -> Any:
    config.model_spec.model.layers = config.model_spec.model.layers[:layers]
    return config


def _experts(config: Any, experts: int) -> Any:
    """Every MoE layer with ``experts`` routed experts (top-k kept at most half of them)."""
    for layer in config.model_spec.model.layers:
        moe = getattr(layer, "moe", None)
        if moe is None:
            continue
        top_k = min(moe.router.top_k, max(1, experts // 2))
        moe.num_experts = moe.router.num_experts = moe.routed_experts.inner_experts.num_experts = experts
        moe.routed_experts.token_dispatcher.num_experts = experts
        moe.routed_experts.token_dispatcher.top_k = moe.router.top_k = top_k
        moe.router.gate.out_features = experts
    return config


def llama3_tiny():
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    return _cut(llama3_debugmodel(), 2)


def qwen3_tiny():
    from torchtitan.models.qwen3.config_registry import qwen3_debugmodel

    return _cut(qwen3_debugmodel(), 2)  # tied embeddings: the HF files hold no lm_head


def qwen3_moe_tiny():
    from torchtitan.models.qwen3.config_registry import qwen3_moe_debug

    return _experts(_cut(qwen3_moe_debug(), 2), 4)


def _deepseek_v3(score_func: str):
    from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel

    config = _experts(_cut(deepseek_v3_debugmodel(), 3), 4)
    for layer in config.model_spec.model.layers:
        router = getattr(getattr(layer, "moe", None), "router", None)
        if router is not None:
            router.score_func, router.route_norm, router.route_scale = score_func, True, 2.5
    return config


def deepseek_v3_tiny():
    """A dense first layer, then MoE with shared experts, routed as DeepSeek-V3 routes (and as transformers'
    deepseek_v3 can only route): sigmoid scores, normalized over the top-k and scaled; no expert groups."""
    return _deepseek_v3("sigmoid")


def deepseek_v3_softmax_tiny():
    """deepseek_v3_tiny scoring experts with a softmax (as torchtitan's debug router does): no HF deepseek_v3
    config can express it."""
    return _deepseek_v3("softmax")


def moe_sized(layers: int, experts: int):
    """qwen3's MoE debug model with ``layers`` layers of ``experts`` experts (the bench's sizes)."""
    from torchtitan.models.qwen3.config_registry import qwen3_moe_debug

    config = qwen3_moe_debug()
    model = config.model_spec.model
    model.layers = [copy.deepcopy(model.layers[i % len(model.layers)]) for i in range(layers)]
    return _experts(config, experts)


def model_spec(function: str) -> Any:
    return globals()[function]().model_spec


def build_model(spec: Any, seed: int = 0) -> torch.nn.Module:
    """The model as torchtitan's trainer builds it (meta, ``to_empty``, ``init_weights``), seeded."""
    with torch.device("meta"):
        model = spec.model.build()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
        for p in model.parameters():  # no all-equal norms: a swapped or permuted tensor must show
            p.add_(torch.randn_like(p) * 0.02)
    return model


def write_hf_folder(function: str, out: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """An HF-named folder for the model of ``function``, written through torchtitan's adapter (``to_hf``)."""
    from safetensors.torch import save_file

    spec = model_spec(function)
    model = build_model(spec, seed)
    adapter = spec.state_dict_adapter(spec.model, None)
    hf = adapter.to_hf({k: v.detach() for k, v in model.state_dict().items()})
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in hf.items()}, str(out / "model.safetensors"))
    hf_config(spec).save_pretrained(out)
    return out


def hf_config(spec: Any) -> Any:
    """The transformers config describing the same model, every field the conversion's config parity check
    compares included (rope scaling, MoE routing): flame-ext's ``hf_config_for``, read by the config class."""
    from transformers import CONFIG_MAPPING

    from flame_ext.checks.config.native import hf_config_for

    model_type = HF_TYPES.get(spec.name, spec.name)
    if model_type == "qwen3" and any(getattr(layer, "moe", None) is not None for layer in spec.model.layers):
        model_type = "qwen3_moe"
    return CONFIG_MAPPING[model_type].from_dict(hf_config_for(spec.model, model_type))


def whole_adapter_state(function: str, hf_dir: Path) -> dict[str, torch.Tensor]:
    """torchtitan's own adapter applied to the whole HF state dict at once (what its convert_from_hf does)."""
    from safetensors.torch import load_file

    spec = model_spec(function)
    adapter = spec.state_dict_adapter(spec.model, None)
    return adapter.from_hf(load_file(str(hf_dir / "model.safetensors")))
