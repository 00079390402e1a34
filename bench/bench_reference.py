"""Benchmark: the reference loss inside conversion, streamed block by block, against the whole-model way.

Side by side, each in its own fresh subprocess (wall seconds and peak RSS from ``os.wait4``), on generated
OLMo2-shaped checkpoints (random weights of std 0.02, written one ~1 GB shard at a time):

  read        ``cat`` of the files to /dev/null: the read limit
  no-ref      ``flame-ext convert --no-reference``
  default     ``flame-ext convert`` (conversion, then the streamed reference forward)
  ref-stream  ``flame-ext reference``: the streamed reference forward alone
  ref-whole   ``from_pretrained`` + the same forward: what the reference cost before streaming

Memory should stay flat across sizes for every flame-ext row and grow with the model for ``ref-whole``.

    python bench/bench_reference.py                          # 1, 2 and 3 GB fp32 -> bf16
    python bench/bench_reference.py --size-gb 1 2 4
    python bench/bench_reference.py --olmo2-7b --workdir /big/disk   # 29 GB of disk, fp32 OLMo-2-1124-7B shapes
    python bench/bench_reference.py --cold                   # drop the page cache before each row (root)

Targets (issue 13): default convert <= 2 GB peak RSS at the 7B shape; wall <= 2.0x ``no-ref`` and
<= 1.3x (read + ref-stream).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD_BYTES = 1_000_000_000
SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32)
SHAPE_SMALL = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16)
VOCAB = 100352

WHOLE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from flame_ext.model.reference import per_token_loss, read_reference_text, reference_batch
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = reference_batch(tok, read_reference_text(None), 512)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
with torch.no_grad():
    print(per_token_loss(model(ids).logits, ids).mean().item())
"""


def olmo2_config(size_gb: float | None, itemsize: int) -> dict:
    """An Olmo2ForCausalLM config: OLMo-2-1124-7B's shapes, or a smaller width with layers for ``size_gb``."""
    from transformers import Olmo2Config

    shape = dict(SHAPE_7B) if size_gb is None else dict(SHAPE_SMALL)
    if size_gb is not None:
        h, i = shape["hidden_size"], shape["intermediate_size"]
        per_layer = (4 * h * h + 3 * h * i + 4 * h) * itemsize
        shape["num_hidden_layers"] = max(1, round((size_gb * 1e9 - 2 * VOCAB * h * itemsize) / per_layer))
    cfg = Olmo2Config(
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        pad_token_id=1,
        eos_token_id=VOCAB - 1,
        bos_token_id=None,
        tie_word_embeddings=False,
        **shape,
    )
    cfg.architectures = ["Olmo2ForCausalLM"]
    out = cfg.to_dict()
    out["dtype" if "dtype" in out else "torch_dtype"] = "float32"
    return out


def generate(folder: Path, config: dict) -> int:
    """config.json, a byte-level tokenizer (the embedded model's), fp32 shards and their index."""
    import torch
    from safetensors.torch import save_file
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from flame_ext.io.hf import DEFAULT_MODEL

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEFAULT_MODEL / name, folder / name)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Olmo2ForCausalLM(Olmo2Config.from_dict(config)).state_dict().items()}
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        if groups[-1] and size + 4 * shape.numel() > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += 4 * shape.numel()
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for k in keys:
            shard[k] = (
                torch.ones(shapes[k]) if k.endswith("norm.weight") else torch.randn(shapes[k], generator=gen) * 0.02
            )
        save_file(shard, folder / name, metadata={"format": "pt"})
        total += sum(t.nbytes for t in shard.values())
        weight_map.update(dict.fromkeys(keys, name))
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def run(cmd: list[str], cold: bool) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB and exit code of one command in a fresh process."""
    subprocess.run(["sync"], check=True)
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        sys.stderr.write(proc.stderr.read().decode()[-2000:])
    return wall, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def contenders(model: Path, work: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "flame_ext.cli"]
    files = sorted(str(f) for f in model.glob("*.safetensors"))
    return {
        "read": ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files],
        "no-ref": cli
        + ["convert", "--model", str(model), "--checkpoint", str(work / "a"), "--dtype", "bfloat16", "--no-reference"],
        "default": cli + ["convert", "--model", str(model), "--checkpoint", str(work / "b"), "--dtype", "bfloat16"],
        "ref-stream": cli
        + ["reference", "--model", str(model), "--out", str(work / "ref.json"), "--dtype", "bfloat16"],
        "ref-whole": [sys.executable, "-c", WHOLE, str(model)],
    }


def bench_one(label: str, size_gb: float | None, root: Path, cold: bool, skip: set[str]) -> dict[str, tuple]:
    """Generate one checkpoint and time every contender on it.

    The generator runs in a child process and this one never imports torch: Linux carries a process's
    peak RSS across fork and exec, so a contender forked from a 2 GB parent would report at least 2 GB.
    """
    model = root / f"model-{label}"
    size = "7b" if size_gb is None else str(size_gb)
    cmd = [sys.executable, __file__, "--generate", str(model), size]
    total = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
    config = json.loads((model / "config.json").read_text())
    print(f"\n{label}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, {total / 1e9:.2f} GB fp32")
    rows = {}
    for name, cmd in contenders(model, root / f"out-{label}").items():
        if name in skip:
            continue
        rows[name] = run(cmd, cold)
        for out in (root / f"out-{label}").glob("*"):
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        wall, rss, rc = rows[name]
        print(f"  {name:11} {wall:8.1f} s  {rss:8.0f} MB  rc={rc}", flush=True)
    if {"default", "no-ref"} <= rows.keys():
        print(f"  default / no-ref wall: {rows['default'][0] / rows['no-ref'][0]:.2f}x")
    if {"default", "read", "ref-stream"} <= rows.keys():
        limit = rows["read"][0] + rows["ref-stream"][0]
        print(f"  default / (read + ref-stream) wall: {rows['default'][0] / limit:.2f}x")
    shutil.rmtree(model)
    shutil.rmtree(root / f"out-{label}", ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--olmo2-7b", action="store_true", help="the OLMo-2-1124-7B shape in fp32 (29 GB of disk)")
    ap.add_argument("--workdir", help="where the checkpoints go (default: a temporary folder)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each row (root)")
    ap.add_argument("--skip", nargs="*", default=[], help="rows to leave out, e.g. ref-whole on a small machine")
    ap.add_argument("--generate", nargs=2, metavar=("FOLDER", "SIZE_GB_OR_7B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        size = None if args.generate[1] == "7b" else float(args.generate[1])
        print(generate(Path(args.generate[0]), olmo2_config(size, 4)))
        return
    root = Path(args.workdir or tempfile.mkdtemp(prefix="flame-ext-bench-ref-"))
    root.mkdir(parents=True, exist_ok=True)
    sizes = [("7b", None)] if args.olmo2_7b else [(f"{s:g}GB", s) for s in args.size_gb]
    results = {label: bench_one(label, size, root, args.cold, set(args.skip)) for label, size in sizes}
    print(
        "\n"
        + json.dumps(
            {
                k: {n: {"wall_s": round(w, 1), "rss_mb": round(r)} for n, (w, r, _) in v.items()}
                for k, v in results.items()
            }
        )
    )
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
