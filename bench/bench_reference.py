"""Benchmark: conversion with the reference loss (the default), against its parts and the stock approach.

Side by side, each in its own fresh subprocess (wall seconds, CPU seconds and peak RSS from ``os.wait4``),
on generated OLMo2-shaped fp32 checkpoints (random weights of std 0.02), converted to bf16:

  read        ``cat`` of the files to /dev/null: the read limit
  write       ``dd`` of the bf16 output's size from /dev/zero, fsynced: the write limit
  stock       flame's way: ``from_pretrained(dtype=bfloat16)`` + ``dcp.save`` (8 writer threads)
  no-ref      ``flame-ext convert --dtype bfloat16 --no-reference``
  default     ``flame-ext convert --dtype bfloat16``: the reference forward runs beside the writer
  ref-stream  the streamed reference forward alone (``compute_reference``, as ``convert`` runs it)
  ref-whole   (``--whole``) ``from_pretrained`` + the same forward: what the reference cost before streaming

Then the flatness table: peak RSS of the flame-ext rows at every size.

    python bench/bench_reference.py                            # 1, 2 and 3 GB, every row
    python bench/bench_reference.py --olmo2-7b --cold --workdir /big/disk
        # OLMo-2-1124-7B shapes (29 GB of disk, + 14.6 GB of output at a time), every row; then, for the
        # flatness table, the same width with 8 layers and a 1 GB model (flame-ext rows only)

``--cold`` drops the page cache before each row (root) and reads the Python libraries back in: the
checkpoint comes from the disk, the tools do not.

Limits: default convert <= 2 GB peak RSS at the 7B shape, flat in the model size; wall <= 2.0x
``no-ref`` and <= 1.3x (read + ref-stream).
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

from fresh_process import run_fresh
from olmo2_checkpoint import SHAPE_7B, can_drop_caches, drop_page_cache, generate, olmo2_config, sized_config

SHAPE_SMALL = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16)
FLAME_ROWS = ("no-ref", "default", "ref-stream")

STOCK_BF16 = """
import sys, torch, torch.distributed.checkpoint as DCP
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
DCP.save({"model": model.state_dict()}, storage_writer=DCP.filesystem.FileSystemWriter(sys.argv[2], thread_count=8))
"""

STREAMED = """
import sys
from flame_ext.io.hf import open_hf
from flame_ext.model.reference_loss import compute_reference
print(compute_reference(open_hf(sys.argv[1]), dtype="bfloat16")["loss_mean"])
"""

WHOLE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from flame_ext.model.reference_loss import per_token_loss, read_reference_text, reference_batch
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = reference_batch(tok, read_reference_text(None), 512)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
with torch.no_grad():
    print(per_token_loss(model(ids).logits, ids).mean().item())
"""


def config_for(case: str) -> dict:
    """config.json of ``7b``: OLMo-2-1124-7B; ``7b-<n>L``: its width with n layers; ``<x>GB``: hidden 1024,
    layers for x GB (below ``TINY_GB``: the smoke runs' tiny shape)."""
    if case == "7b":
        return olmo2_config(dict(SHAPE_7B), "float32")
    if case.startswith("7b-"):
        return olmo2_config({**SHAPE_7B, "num_hidden_layers": int(case[3:-1])}, "float32")
    return sized_config(float(case[:-2]), SHAPE_SMALL, "float32")


def run(cmd: list[str], cold: bool) -> tuple[float, float, float, int]:
    """Wall seconds, CPU seconds, peak RSS in MB and exit code of one command in a fresh process."""
    os.sync()
    if cold:
        drop_page_cache()
    result = run_fresh(cmd)
    if result.rc != 0:
        sys.stderr.write(result.output[-2000:])
    return result.wall, result.cpu, result.rss_mb, result.rc


def contenders(model: Path, work: Path, out_bytes: int) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "flame_ext.cli"]
    files = sorted(str(f) for f in model.glob("*.safetensors"))
    convert = cli + ["convert", "--model", str(model), "--checkpoint", str(work / "dcp"), "--dtype", "bfloat16"]
    mib = -(-out_bytes // 2**20)
    return {
        "read": ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files],
        "ref-stream": [sys.executable, "-c", STREAMED, str(model)],
        "write": ["dd", "if=/dev/zero", f"of={work / 'zeros'}", "bs=1M", f"count={mib}", "conv=fsync", "status=none"],
        "no-ref": convert + ["--no-reference"],
        "default": convert,
        "stock": [sys.executable, "-c", STOCK_BF16, str(model), str(work / "dcp")],
        "ref-whole": [sys.executable, "-c", WHOLE, str(model)],
    }


WRITERS = ("write", "no-ref", "default", "stock")


def wait_for_disk(folder: Path, needed: int, patience_s: float = 900) -> None:
    """On a shared disk, wait (outside every timing) until the output of a row fits, with 1 GB to spare."""
    t0 = time.monotonic()
    while shutil.disk_usage(folder).free < needed + 10**9 and time.monotonic() - t0 < patience_s:
        print(f"  (waiting for {needed / 1e9:.1f} GB of free disk: {shutil.disk_usage(folder).free / 1e9:.1f} GB)")
        time.sleep(30)


def bench_one(case: str, root: Path, cold: bool, rows: list[str], keep: bool = False) -> dict[str, tuple]:
    """Generate one checkpoint (or take the one an earlier run in ``root`` kept), time the rows on it (outputs
    deleted after each), delete it unless ``keep``.

    The generator runs in a child process and this one never imports torch: Linux carries a process's
    peak RSS across fork and exec, so a contender forked from a 2 GB parent would report at least 2 GB.
    """
    model, work = root / f"model-{case}", root / f"out-{case}"
    t0 = time.perf_counter()
    index = model / "model.safetensors.index.json"  # written last: a complete checkpoint from an earlier run
    if not index.is_file():
        shutil.rmtree(model, ignore_errors=True)
        subprocess.run([sys.executable, __file__, "--generate", str(model), case], check=True, capture_output=True)
    total = json.loads(index.read_text())["metadata"]["total_size"]
    config = json.loads((model / "config.json").read_text())
    print(
        f"\n{case}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, {total / 1e9:.2f} GB fp32 "
        f"(generated in {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, cmd in contenders(model, work, total // 2).items():
        if name not in rows:
            continue
        if name in WRITERS:
            wait_for_disk(work, total // 2)
        results[name] = run(cmd, cold)
        for out in work.glob("*"):
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        wall, cpu, rss, rc = results[name]
        print(f"  {name:11} {wall:8.1f} s wall {cpu:8.1f} s CPU {rss:8.0f} MB  rc={rc}", flush=True)
    if not keep:
        shutil.rmtree(model)
    shutil.rmtree(work, ignore_errors=True)
    print_ratios(results)
    return results


def print_ratios(results: dict[str, tuple]) -> None:
    """Every row against the read limit, and the two wall-time targets."""
    if "read" in results:
        read = results["read"][0]
        print("  x read: " + "  ".join(f"{n} {r[0] / read:.2f}" for n, r in results.items()))
    if {"default", "no-ref"} <= results.keys():
        print(f"  default / no-ref: {results['default'][0] / results['no-ref'][0]:.2f}x  (target <= 2.0)")
    if {"default", "read", "ref-stream"} <= results.keys():
        limit = results["read"][0] + results["ref-stream"][0]
        print(f"  default / (read + ref-stream): {results['default'][0] / limit:.2f}x  (target <= 1.3)")
    if {"default", "no-ref", "ref-stream"} <= results.keys():
        serial = results["no-ref"][0] + results["ref-stream"][0]
        print(
            f"  default / (no-ref + ref-stream), i.e. against running them one after the other: "
            f"{results['default'][0] / serial:.2f}x"
        )


def print_flatness(all_results: dict[str, dict[str, tuple]]) -> None:
    print("\npeak RSS (MB) by size:")
    print(f"  {'row':11}" + "".join(f"{case:>12}" for case in all_results))
    for name in FLAME_ROWS:
        cells = [f"{r[name][2]:12.0f}" if name in r else f"{'-':>12}" for r in all_results.values()]
        print(f"  {name:11}" + "".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--olmo2-7b", action="store_true", help="the OLMo-2-1124-7B shape in fp32 (29 GB of disk)")
    ap.add_argument("--workdir", help="where the checkpoints go (default: a temporary folder)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each row (root)")
    ap.add_argument("--whole", action="store_true", help="also the whole-model reference (the model's size in RAM)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints in --workdir for a next run")
    ap.add_argument("--skip", nargs="*", default=[], help="rows to leave out, e.g. stock on a small machine")
    ap.add_argument("--generate", nargs=2, metavar=("FOLDER", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        config = config_for(args.generate[1])
        print(generate(Path(args.generate[0]), config, dtype="float32", std=0.02, tokenizer=True))
        return
    if args.cold and not can_drop_caches():
        sys.exit("--cold: /proc/sys/vm/drop_caches is not writable here (run as root, or leave --cold out)")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="flame-ext-bench-ref-"))
    root.mkdir(parents=True, exist_ok=True)
    every = [r for r in ("read", "write", "stock", *FLAME_ROWS) if r not in args.skip]  # run in contenders' order
    every += ["ref-whole"] if args.whole else []
    if args.olmo2_7b:
        cases = [("7b", every), ("7b-8L", list(FLAME_ROWS)), ("1GB", list(FLAME_ROWS))]
    else:
        cases = [(f"{s:g}GB", every) for s in args.size_gb]
    try:
        results = {case: bench_one(case, root, args.cold, rows, args.keep) for case, rows in cases}
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print_flatness(results)
    summary = {
        case: {n: {"wall_s": round(w, 1), "cpu_s": round(c, 1), "rss_mb": round(r)} for n, (w, c, r, _) in v.items()}
        for case, v in results.items()
    }
    print("\n" + json.dumps(summary))


if __name__ == "__main__":
    main()
