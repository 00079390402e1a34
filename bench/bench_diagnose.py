"""How long the metadata pass of ``flame-ext diagnose`` takes on a 7B-sized checkpoint pair.

    .venv/bin/python bench/bench_diagnose.py [--workdir DIR] [--repeat 5]

Builds, without any tensor data, an OLMo-2-1124-7B-shaped pair (32 layers, hidden 4096, vocab 100352,
355 keys, 7.3 B parameters):
* an HF folder: config.json, three safetensors shards whose headers are real and whose data sections are
  sparse (the files have their full size, 29 GB in all, but occupy no disk blocks), and an index;
* a DCP folder: ``dcp.save`` of the model's ``meta`` state dict through a ``FileSystemWriter`` whose data
  writes are replaced by sparse files of the right size, so ``.metadata`` is the one torch writes, and a
  ``flame_ext.json`` manifest with the tensor table.
Then times what the metadata pass does (median of --repeat runs): read ``.metadata``, check the data
files' sizes, index the HF headers, read the manifest, compare the spec tables, check the manifest.
Building the model on ``meta`` (transformers) is timed separately: the 1 s target excludes it and the
transformers import. Nothing here reads a tensor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.storage import WriteResult

OLMO2_7B = {
    "architectures": ["Olmo2ForCausalLM"],
    "model_type": "olmo2",
    "vocab_size": 100352,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-06,
    "rope_theta": 500000,
    "rope_scaling": None,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": 100257,
    "pad_token_id": 100277,
    "torch_dtype": "float32",
    "initializer_range": 0.02,
    "use_cache": True,
}
_ST = {torch.float32: "F32", torch.bfloat16: "BF16"}


def write_sparse_hf(folder: Path, state: dict[str, torch.Tensor], shards: int = 3) -> None:
    """Real safetensors headers over sparse data sections, plus the index: what open_hf reads."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(OLMO2_7B, indent=2))
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for k in keys[i * per : (i + 1) * per]:
            t = state[k]
            n = t.numel() * t.element_size()
            header[k] = {"dtype": _ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[k] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # sparse: the size is real, the blocks are not
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


class _NoDataWriter(dcp.FileSystemWriter):
    """torch's own writer, except each item's data file is a sparse file of the item's size."""

    def write_data(self, plan, planner):  # type: ignore[override]
        results = []
        for i, item in enumerate(plan.items):
            name = f"{plan.storage_data.prefix}{i}.distcp"
            size = item.tensor_data.size
            length = torch.Size(size).numel() * item.tensor_data.properties.dtype.itemsize
            with open(Path(self.path) / name, "wb") as f:
                f.truncate(length)
            results.append(
                WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(name, 0, length))
            )
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(results)
        return fut


def write_sparse_dcp(folder: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    from flame_ext.io.manifest import FORMAT_VERSION, config_hash, write_manifest

    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=_NoDataWriter(str(folder), single_file_per_rank=False), no_dist=True)
    tensors = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "numel": v.numel()}
        for k, v in state.items()
    }
    write_manifest(
        folder,
        {
            "format_version": FORMAT_VERSION,
            "kind": "checkpoint",
            "tool_version": "bench",
            "source": {"model": "bench", "model_type": config["model_type"], "config_sha256": config_hash(config)},
            "tensors": tensors,
            "total_parameters": sum(v["numel"] for v in tensors.values()),
            "fresh_keys": [],
            "reference": None,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to build the sparse folders (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import transformers  # noqa: F401  (imported before any timing: the target excludes it)

    from flame_ext.commands.diagnose import (
        DiagnoseOptions,
        _Context,
        diagnose,
        manifest_problems,
        metadata_pass,
    )
    from flame_ext.io.dcp import read_dcp_metadata
    from flame_ext.io.hf import build_meta_model, expected_tensors, open_hf, tied_aliases
    from flame_ext.io.manifest import read_manifest

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-diagnose-"))
    hf_dir, dcp_dir = work / "olmo2-7b-hf", work / "olmo2-7b-dcp"
    if not hf_dir.exists():
        from flame_ext.io.hf import HFCheckpoint

        stub = HFCheckpoint("bench", work, None, OLMO2_7B, {}, "safetensors")
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(json.dumps(OLMO2_7B))
        state = build_meta_model(stub).state_dict()
        write_sparse_hf(hf_dir, state)
        write_sparse_dcp(dcp_dir, state, json.loads((hf_dir / "config.json").read_text()))

    t0 = time.perf_counter()
    hf = open_hf(hf_dir)
    model = build_meta_model(hf)
    expected, tied = expected_tensors(model), tied_aliases(model)
    meta_build = time.perf_counter() - t0

    runs = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        found = read_dcp_metadata(dcp_dir)
        hf = open_hf(hf_dir)
        manifest = read_manifest(dcp_dir)
        report, key_map = metadata_pass(found, expected, tied)
        ctx = _Context(dcp_dir, found, hf, model, expected, tied, key_map, manifest)
        report.extend(manifest_problems(ctx))
        runs.append(time.perf_counter() - t0)
    assert report.ok and not report.problems, report.render_text()

    whole = []
    for _ in range(2):  # the first call also pays lazy imports (manifest, tokenizer and config modules)
        t0 = time.perf_counter()
        diagnose(DiagnoseOptions(checkpoint=str(dcp_dir), model=str(hf_dir)))
        whole.append(time.perf_counter() - t0)

    n_params = sum(s.numel for s in expected.values())
    print(f"7B-sized pair: {len(found)} keys, {n_params / 1e9:.2f} B parameters (sparse files under {work})")
    print(
        f"metadata pass (no tensor data): median {statistics.median(runs) * 1000:.0f} ms, "
        f"min {min(runs) * 1000:.0f} ms over {len(runs)} runs"
    )
    print(
        f"meta model build (excluded from the target): {meta_build * 1000:.0f} ms; "
        f"whole `diagnose` call without --values/--loss: {whole[0] * 1000:.0f} ms first, {whole[1] * 1000:.0f} ms again"
    )


if __name__ == "__main__":
    main()
