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

With ``--loss-size-gb X`` (or ``--loss-model HF_FOLDER``, an OLMo2 made by ``olmo2_checkpoint.generate``), also
``diagnose --loss`` on a real checkpoint: a bf16 OLMo2 of about X GB (hidden 4096 as the 7B; ``7b``: the
OLMo-2-1124-7B shape; below 0.1 GB the smoke runs' tiny shape) is generated and converted with its reference,
then ``flame-ext diagnose --checkpoint C --loss`` runs in a fresh process: wall, CPU seconds and its own peak
RSS (``fresh_process``), against the 2 GB the streamed load must stay within. Generated files are deleted.

    .venv/bin/python bench/bench_diagnose.py --loss-size-gb 1 7b --workdir /big/disk
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
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


@dataclass
class LossRun:
    size_gb: float
    layers: int
    wall: float
    cpu: float
    rss_mb: float
    output: str


def measure_loss(work: Path, *, size: str | None = None, model: Path | None = None) -> LossRun:
    """Generate (unless ``model``) and convert a bf16 OLMo2, then time ``diagnose --loss`` in a fresh process.
    Everything generated is deleted afterwards; ``model`` is left as it was."""
    from fresh_process import run_fresh
    from olmo2_checkpoint import SHAPE_7B, generate, olmo2_config, sized_config

    work.mkdir(parents=True, exist_ok=True)
    src, ckpt = model or work / f"hf-{size}", work / f"dcp-{size or 'model'}"
    try:
        if model is None:
            width = {k: SHAPE_7B[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads")}
            config = olmo2_config(dict(SHAPE_7B), "bfloat16") if size == "7b" else None
            config = config or sized_config(float(size), width, "bfloat16")  # type: ignore[arg-type]
            generate(src, config, dtype="bfloat16", std=0.02, tokenizer=True)
        cli = [sys.executable, "-m", "flame_ext.cli"]
        convert = cli + ["convert", "--model", str(src), "--checkpoint", str(ckpt)]
        subprocess.run(convert, check=True, capture_output=True)
        run = run_fresh(cli + ["diagnose", "--checkpoint", str(ckpt), "--loss"])
        if run.rc != 0:
            raise SystemExit(f"diagnose --loss failed (exit {run.rc}):\n{run.output[-3000:]}")
        config = json.loads((src / "config.json").read_text())
        total = sum(f.stat().st_size for f in ckpt.glob("*.distcp"))
        return LossRun(total / 1e9, config["num_hidden_layers"], run.wall, run.cpu, run.rss_mb, run.output)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
        if model is None:
            shutil.rmtree(src, ignore_errors=True)


def loss_line(run: LossRun) -> str:
    return (
        f"diagnose --loss, {run.size_gb:.2f} GB bf16 checkpoint, {run.layers} layers: {run.wall:.1f} s wall, "
        f"{run.cpu:.1f} CPU s, peak RSS {run.rss_mb:,.0f} MB ({run.rss_mb * 2**20 / 2e9:.2f}x the 2 GB limit)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to build the sparse folders (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--loss-size-gb", nargs="*", default=[], help="also diagnose --loss at these sizes (GB or 7b)")
    parser.add_argument("--loss-model", type=Path, help="also diagnose --loss on a converted copy of this HF folder")
    parser.add_argument("--loss-only", action="store_true", help="the --loss figures only")
    args = parser.parse_args()
    if args.loss_size_gb or args.loss_model:
        work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-diagnose-loss-"))
        for size in args.loss_size_gb:
            print(loss_line(measure_loss(work, size=size)), flush=True)
        if args.loss_model:
            print(loss_line(measure_loss(work, model=args.loss_model)), flush=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        if args.loss_only:
            return

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
        # No weights exist yet (the sparse files are made from this state dict): the config's own size is the bound.
        state = build_meta_model(stub, weight_bytes=40 * 10**9).state_dict()
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
