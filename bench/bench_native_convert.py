"""Benchmark: HF -> torchtitan-native DCP of a qwen3-MoE-shaped checkpoint, streamed a layer at a time and an
MoE layer's stacked experts a row block at a time (``flame-ext convert --layout torchtitan:...``), against
torchtitan's own ``scripts/checkpoint_conversion/convert_from_hf.py``. That script is not shipped in the 0.3.0
wheel, so its steps are run here with torchtitan's public API: build the whole model, ``to_hf`` of its state
dict, ``dcp.load`` of the HF files into it, ``from_hf`` on the whole state dict, ``dcp.save``.

Each contender runs in a fresh subprocess; the figures are its own wall seconds, CPU seconds and peak RSS, and
for each size one row gives flame-ext's figures as ratios of torchtitan's. The last line says how flame-ext's
peak RSS and torchtitan's move from the smallest size to the largest. The HF folder is generated one layer per
safetensors file (random bf16, shapes from torchtitan's own ``to_hf`` on ``meta``), never the whole model in
memory. Sizes are ``LxE`` (layers x experts per layer) on qwen3's MoE debug model widened to ``--dim`` (expert
hidden size = dim).

    python bench/bench_native_convert.py                       # 2x32, 8x32 (layers x4), 2x128, 2x512 (experts x4)
    python bench/bench_native_convert.py --sizes 8x16 32x16 --dim 512

This module is also the torchtitan config registry the conversion names (``--layout
torchtitan:bench_native_convert --titan-config moe``): the size comes from the environment.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def moe():
    """qwen3's MoE debug config at ``BENCH_LAYERS`` x ``BENCH_EXPERTS``, width ``BENCH_DIM`` (environment)."""
    from torchtitan.models.qwen3.config_registry import qwen3_moe_debug

    layers, experts, dim = (int(os.environ[k]) for k in ("BENCH_LAYERS", "BENCH_EXPERTS", "BENCH_DIM"))
    config = qwen3_moe_debug()
    model = config.model_spec.model
    model.layers = [copy.deepcopy(model.layers[0]) for _ in range(layers)]
    for layer in model.layers:
        m = layer.moe
        m.num_experts = m.router.num_experts = m.routed_experts.inner_experts.num_experts = experts
        m.routed_experts.token_dispatcher.num_experts = experts
        m.router.gate.out_features = experts
        m.routed_experts.inner_experts.hidden_dim = dim
        m.routed_experts.inner_experts.dim = dim
        m.router.gate.in_features = dim
    _widen(model, dim)
    return config


def _widen(model, dim: int) -> None:
    """Every ``dim``-wide part of the debug model at ``dim`` (attention keeps its heads and head size)."""
    old = model.dim
    model.dim = dim

    def fix(cfg) -> None:
        for name in ("in_features", "out_features", "normalized_shape", "embedding_dim", "dim"):
            if getattr(cfg, name, None) == old:
                setattr(cfg, name, dim)
        for value in list(vars(cfg).values()) if hasattr(cfg, "__dict__") else []:
            if hasattr(value, "__dataclass_fields__"):
                fix(value)
        for name in getattr(cfg, "__dataclass_fields__", {}):
            value = getattr(cfg, name, None)
            if hasattr(value, "__dataclass_fields__"):
                fix(value)
            elif isinstance(value, list):
                for v in value:
                    if hasattr(v, "__dataclass_fields__"):
                        fix(v)

    fix(model)


def generate(out: Path) -> int:
    """The HF folder, one safetensors file per layer; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    config = moe()
    spec = config.model_spec
    with torch.device("meta"):
        model = spec.model.build()
    adapter = spec.state_dict_adapter(spec.model, None)
    hf_meta = adapter.to_hf(dict(model.state_dict()))
    files: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf_meta.items():
        layer = key.split(".")[2] if key.startswith("model.layers.") else "rest"
        files.setdefault(layer, {})[key] = value
    out.mkdir(parents=True)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, (layer, tensors) in enumerate(sorted(files.items())):
        name = f"model-{i:05d}.safetensors"
        data = {k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.bfloat16) for k, v in tensors.items()}
        save_file(data, str(out / name))
        total += sum(t.numel() * 2 for t in data.values())
        weight_map.update(dict.fromkeys(data, name))
        del data
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # The HF config of the same model (conversion refuses a config that disagrees with torchtitan's).
    from flame_ext.checks.config.native import hf_config_for

    (out / "config.json").write_text(json.dumps(hf_config_for(spec.model, "qwen3_moe")))
    return total


def whole_state_dict(hf: str, out: str) -> None:
    """torchtitan's convert_from_hf.py path: the whole model in memory, the adapter on the whole state dict."""
    import torch
    import torch.distributed.checkpoint as dcp

    config = moe()
    spec = config.model_spec
    with torch.device("cpu"):
        model = spec.model.build()
    adapter = spec.state_dict_adapter(spec.model, hf)
    hf_sd = adapter.to_hf({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    del model
    dcp.load(hf_sd, storage_reader=dcp.HuggingFaceStorageReader(hf), no_dist=True)
    dcp.save(adapter.from_hf(hf_sd), checkpoint_id=out, no_dist=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["2x32", "8x32", "2x128", "2x512"], help="LAYERSxEXPERTS")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    from fresh_process import run_fresh

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-native-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    measured: dict[str, dict] = {}
    print(f"{'size':>8} {'HF MB':>8} {'contender':<22} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12}")
    try:
        for size in args.sizes:
            layers, experts = (int(x) for x in size.split("x"))
            env.update(BENCH_LAYERS=str(layers), BENCH_EXPERTS=str(experts), BENCH_DIM=str(args.dim))
            os.environ.update(BENCH_LAYERS=str(layers), BENCH_EXPERTS=str(experts), BENCH_DIM=str(args.dim))
            hf = root / f"hf-{size}"
            nbytes = generate(hf)
            runs = {
                "flame-ext (streamed)": [
                    sys.executable, "-m", "flame_ext.cli", "convert", "--model", str(hf), "--checkpoint",
                    str(root / f"ours-{size}"), "--layout", "torchtitan:bench_native_convert", "--titan-config", "moe",
                    "--no-reference",
                ],
                "whole state dict": [sys.executable, __file__, "--whole", str(hf), str(root / f"theirs-{size}")],
            }  # fmt: skip
            for name, cmd in runs.items():
                run = run_fresh(cmd, env=env)
                if run.rc != 0:
                    raise SystemExit(f"{name} failed at {size}:\n{run.output[-2000:]}")
                print(
                    f"{size:>8} {nbytes / 2**20:>8.0f} {name:<22} {run.wall:>8.1f} {run.cpu:>8.1f} {run.rss_mb:>12.0f}"
                )
                measured.setdefault(size, {})[name] = run
            ours, theirs = measured[size]["flame-ext (streamed)"], measured[size]["whole state dict"]
            print(
                f"{size:>8} {'':>8} {'flame-ext / whole':<22} {ours.wall / theirs.wall:>7.2f}x "
                f"{ours.cpu / theirs.cpu:>7.2f}x {ours.rss_mb / theirs.rss_mb:>11.2f}x"
            )
            for folder in (hf, root / f"ours-{size}", root / f"theirs-{size}"):
                shutil.rmtree(folder, ignore_errors=True)
        first, last = measured[args.sizes[0]], measured[args.sizes[-1]]
        print(
            f"peak RSS from {args.sizes[0]} to {args.sizes[-1]}: flame-ext "
            f"{first['flame-ext (streamed)'].rss_mb:.0f} -> {last['flame-ext (streamed)'].rss_mb:.0f} MB, "
            f"whole state dict {first['whole state dict'].rss_mb:.0f} -> {last['whole state dict'].rss_mb:.0f} MB"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--whole":
        whole_state_dict(sys.argv[2], sys.argv[3])
    else:
        main()
