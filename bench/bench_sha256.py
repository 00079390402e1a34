"""Benchmark: what the SHA-256 options cost, on a generated OLMo2-shaped bf16 checkpoint.

Three figures, each per GB of checkpoint data:

  record   ``flame-ext convert --no-reference`` with and without ``--record-sha256`` (fresh processes, taken in
           turn, median of ``--repeat``): the read-back and hashing of every written file before publishing;
  files    ``flame-ext diagnose --checkpoint C --files`` against ``--values`` (the manifest's fingerprints) and
           against the metadata pass alone, which both include;
  ranks    the torchrun agreement check, in-process on the converter's own plan: the SHA-256 a rank takes of
           every block it writes (``BlockDigests.add``, the writer threads' extra work) and rank 0's second
           conversion and hashing of those blocks from its own files (``differing_keys``; it reads the other
           ranks' shares once more, at most (N-1)/N of the model). Warm page cache: the CPU cost; from a cold
           cache rank 0 also reads those bytes from its disk.

Also, for the choice between hashing inside the writer and reading back: SHA-256 of bytes already in memory
against ``file_sha256`` of the files just written (page cache).

    python bench/bench_sha256.py --size-gb 0.5 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fresh_process import run_fresh
from olmo2_checkpoint import generate, sized_config

HIDDEN, INTERMEDIATE, HEADS = 2048, 8192, 16


def generate_sized(folder: Path, size_gb: float) -> int:
    width = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS)
    return generate(folder, sized_config(size_gb, width, "bfloat16"), dtype="bfloat16", std=1.0, tokenizer=False)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flame_ext.cli", *args]


def timed(cmd: list[str]) -> tuple[float, float]:
    os.sync()
    run = run_fresh(cmd, {**os.environ, "HF_HUB_OFFLINE": "1"})
    if run.rc not in (0, 1):
        raise SystemExit(f"{cmd} failed ({run.rc}):\n{run.output[-2000:]}")
    return run.wall, run.cpu


def in_process(src: Path, out: Path) -> dict[str, float]:
    """The agreement check's two halves and the two ways of hashing files, CPU seconds each."""
    import torch

    from flame_ext.convert.hf_to_dcp import ConvertOptions, prepare_conversion
    from flame_ext.convert.same_source import BlockDigests, differing_keys
    from flame_ext.io.dcp import DEFAULT_BUFFER_BYTES, row_blocks
    from flame_ext.io.digests import file_sha256

    torch.set_num_threads(1)
    # The plan only (nothing is written): its destination must not exist, so not the checkpoint ``out``.
    unused = out.with_name(out.name + "-plan")
    plan = prepare_conversion(ConvertOptions(model=str(src), checkpoint=str(unused), reference=False, progress=False))
    blocks = BlockDigests()
    t = time.process_time()
    for e in plan.entries:
        for a, b in row_blocks(e.spec, DEFAULT_BUFFER_BYTES // 4):
            blocks.add(e.key, a, e.read_rows(a, b))
    digest = time.process_time() - t
    t = time.process_time()
    assert differing_keys(plan.entries, blocks.blocks) == []
    recheck = time.process_time() - t
    files = sorted(p for p in out.iterdir() if p.is_file())
    t = time.process_time()
    for f in files:
        file_sha256(f)
    read_back = time.process_time() - t
    data = [f.read_bytes() for f in files[:4]]
    t = time.process_time()
    for d in data:
        hashlib.sha256(d).hexdigest()
    in_memory = (time.process_time() - t) * sum(f.stat().st_size for f in files) / sum(map(len, data))
    return {"block digests": digest, "rank 0 re-check": recheck, "read-back": read_back, "in memory": in_memory}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        src, work = Path(work) / "src", Path(work)
        total = generate_sized(src, args.size_gb)
        gb = total / 1e9
        print(f"{gb:.2f} GB bf16, warm page cache, median of {args.repeat}; wall s / CPU s", flush=True)

        def report(name: str, rs: list[tuple[float, float]]) -> None:
            wall, cpu = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
            print(f"  {name:14} {wall:6.2f} / {cpu:6.2f}   per GB {wall / gb:5.2f} / {cpu / gb:5.2f}", flush=True)

        runs: dict[str, list[tuple[float, float]]] = {"convert": [], "--record-sha256": []}
        for i in range(args.repeat):
            for name, extra in (("convert", []), ("--record-sha256", ["--record-sha256"])):
                out = work / f"{'record' if extra else 'plain'}-{i}"
                runs[name].append(
                    timed(cli("convert", "--model", str(src), "--checkpoint", str(out), "--no-reference", *extra))
                )
        for name, rs in runs.items():
            report(name, rs)
        ckpt = work / f"record-{args.repeat - 1}"
        for name, flags in (("diagnose", []), ("--files", ["--files"]), ("--values", ["--values"])):
            report(name, [timed(cli("diagnose", "--checkpoint", str(ckpt), *flags)) for _ in range(args.repeat)])
        for name, cpu in in_process(src, ckpt).items():
            print(f"  {name:14} CPU {cpu:6.2f} s   per GB {cpu / gb:5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
