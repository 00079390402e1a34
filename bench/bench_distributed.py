"""Benchmark: HF -> DCP with 1 rank vs N ranks under torchrun, on a generated OLMo2-shaped bf16 checkpoint.

The checkpoint comes from ``bench_convert.generate`` (~1 GB safetensors shards, random bf16 data). Each
contender runs in a fresh process tree, with ``sync`` between them outside the timings:

  1 rank   ``flame-ext convert --no-reference`` (no process group)
  N ranks  ``torchrun --standalone --nproc_per_node N -m flame_ext.cli convert --no-reference``

Wall time is the whole launch (torchrun's agent and the process group included); peak RSS is each rank's
own (``ru_maxrss``, printed by every rank in its summary line). Every run is checked bit-exact on a sample
of tensors against the source. The ``.metadata`` size is divided by its chunk records, the figure the
405B estimate in docs/distributed.md starts from.

    python bench/bench_distributed.py                   # ~4 GB, 1 vs 2 ranks, warm page cache
    python bench/bench_distributed.py --size-gb 1 --ranks 1 2 3 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_convert import generate, verify_sample  # noqa: E402

RSS = re.compile(r"peak RSS ([\d,]+) MB")


def run(ranks: int, src: Path, out: Path) -> tuple[float, list[float]]:
    """Wall seconds of one conversion with ``ranks`` ranks, and each rank's peak RSS in MB (rank order)."""
    convert = ["-m", "flame_ext.cli", "convert", "--model", str(src), "--checkpoint", str(out), "--no-reference"]
    launch = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *launch, *convert], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{ranks} ranks failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    # rank 0 prints "wrote ...", rank r "rank r of N, its share: wrote ..."
    by_rank = {
        int(m.group(1)) if m else 0: line
        for line in lines
        if "peak RSS" in line
        for m in [re.match(r"rank (\d+)", line)]
    }
    return wall, [float(RSS.search(by_rank[r]).group(1).replace(",", "")) for r in sorted(by_rank)]


def metadata_record_bytes(checkpoint: Path) -> tuple[int, int]:
    """Size of ``.metadata`` and the number of chunk records it holds."""
    from flame_ext.io.dcp import _unpickle_metadata

    md = _unpickle_metadata(checkpoint)
    chunks = sum(len(item.chunks) for item in md.state_dict_metadata.values() if hasattr(item, "chunks"))
    return (checkpoint / ".metadata").stat().st_size, chunks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=4.0)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dist-", dir=args.workdir))
    try:
        src = work / "hf"
        total = generate(src, args.size_gb)
        shards = len(list(src.glob("*.safetensors")))
        print(f"checkpoint: {total / 1e9:.2f} GB bf16, {shards} shards, {os.cpu_count()} CPUs")
        print(f"{'ranks':>5} {'wall s (runs)':>24} {'GB/s':>6} {'peak RSS per rank, MB':>24} {'.metadata':>18}")
        for ranks in args.ranks:
            walls, rss = [], []
            for _ in range(args.repeat):
                out = work / f"dcp-{ranks}"
                wall, per_rank = run(ranks, src, out)
                walls.append(wall)
                rss = per_rank
                verify_sample(src, out)
                size, chunks = metadata_record_bytes(out)
                shutil.rmtree(out)
            best = min(walls)
            runs = ", ".join(f"{w:.1f}" for w in walls)
            rss_text = " / ".join(f"{r:,.0f}" for r in rss)
            meta = f"{size:,} B / {chunks} ch"
            print(f"{ranks:>5} {best:>8.1f} ({runs:>12}) {total / 1e9 / best:>6.2f} {rss_text:>24} {meta:>18}")
        print(f".metadata: {size / chunks:.0f} bytes per chunk record")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
