"""Benchmark: HF -> DCP and DCP -> HF with 1 rank vs N ranks under torchrun, on a generated OLMo2-shaped bf16
checkpoint.

The checkpoint comes from ``bench_convert.generate_sized`` (~1 GB safetensors shards, random bf16 data). Each
contender runs in a fresh process tree, with ``sync`` between them outside the timings:

  convert, 1 rank   ``flame-ext convert --no-reference`` (no process group)
  convert, N ranks  ``torchrun --standalone --nproc_per_node N -m flame_ext.cli convert --no-reference``
  to-hf, 1 / N      ``flame-ext to-hf --max-shard-mb 1024`` of the 1-rank checkpoint, the same under torchrun
                    (ranks share whole shards: ``--shard-mb`` sets how many there are)

Wall time is the whole launch (torchrun's agent and the process group included); peak RSS is each rank's
own (``ru_maxrss``, printed by every rank in its summary line). Every convert run is checked bit-exact on a
sample of tensors against the source; the 1-rank to-hf folder likewise, and every N-rank to-hf folder byte for
byte against it. The ``.metadata`` size is divided by its chunk records, the figure the
405B estimate in docs/distributed.md starts from.

    python bench/bench_distributed.py                   # ~4 GB, 1 vs 2 ranks, warm page cache
    python bench/bench_distributed.py --size-gb 1 --ranks 1 2 3 --repeat 3 --shard-mb 256
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_convert import generate_sized, verify_sample  # noqa: E402

RSS = re.compile(r"peak RSS ([\d,]+) MB")
# Linux keeps a process's peak RSS across exec, and a child forked from this process (which holds a generated
# shard and torch) starts with this process's peak: a 1-rank run would report ours, not its own. A small
# launcher forks the run instead, so each run's figure is its own (torchrun's ranks are forked by its agent).
FRESH = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def convert_command(src: Path, out: Path) -> list[str]:
    return ["-m", "flame_ext.cli", "convert", "--model", str(src), "--checkpoint", str(out), "--no-reference"]


def to_hf_command(checkpoint: Path, config: Path, out: Path, shard_mb: float) -> list[str]:
    return [
        "-m", "flame_ext.cli", "to-hf", "--checkpoint", str(checkpoint), "--config", str(config), "--out", str(out),
        "--max-shard-mb", f"{shard_mb:g}",
    ]  # fmt: skip


def run(ranks: int, command: list[str]) -> tuple[float, list[float]]:
    """Wall seconds of one run of ``command`` with ``ranks`` ranks, and each rank's peak RSS in MB (rank order)."""
    launch = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    os.sync()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", FRESH, sys.executable, *launch, *command]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{ranks} ranks failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    # rank 0 prints "wrote ...", rank r "rank r of N, its share(s): wrote ..."
    by_rank = {
        int(m.group(1)) if m else 0: line
        for line in lines
        if "peak RSS" in line
        for m in [re.match(r"rank (\d+)", line)]
    }
    return wall, [float(RSS.search(by_rank[r]).group(1).replace(",", "")) for r in sorted(by_rank)]


def measure(ranks: int, repeat: int, command: list[str], out: Path) -> tuple[float, list[float], list[float]]:
    """Best wall, every wall and the last run's RSS per rank; ``out`` of the last run is kept."""
    walls, rss = [], []
    for n in range(repeat):
        wall, rss = run(ranks, command)
        walls.append(wall)
        if n + 1 < repeat:
            shutil.rmtree(out)
    return min(walls), walls, rss


def report(what: str, ranks: int, best: float, walls: list[float], total: int, rss: list[float], extra: str) -> None:
    runs = ", ".join(f"{w:.1f}" for w in walls)
    rss_text = " / ".join(f"{r:,.0f}" for r in rss)
    print(f"{what:>7}{ranks:>4} {best:>8.1f} ({runs:>12}) {total / 1e9 / best:>6.2f} {rss_text:>24} {extra:>18}")


def verify_hf_sample(source: Path, out: Path, n: int = 8) -> None:
    """A spread of the source's tensors, bit for bit, in the HF folder ``to-hf`` wrote."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, str]:
        if not (folder / "model.safetensors.index.json").is_file():
            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                return dict.fromkeys(f.keys(), "model.safetensors")
        return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]

    src_map, out_map = index(source), index(out)
    assert sorted(src_map) == sorted(out_map), "to-hf wrote other keys than the source holds"
    keys = sorted(src_map)
    for key in sorted(set(keys[:: max(1, len(keys) // n)] + ["model.embed_tokens.weight", "lm_head.weight"])):
        with safe_open(str(source / src_map[key]), framework="pt") as a, safe_open(str(out / out_map[key]), "pt") as b:
            x, y = a.get_tensor(key), b.get_tensor(key)
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"{key} differs"


def same_folder(ours: Path, single: Path) -> None:
    """The N-rank to-hf folder is the 1-rank one, file names and bytes."""
    names = sorted(p.name for p in ours.iterdir())
    assert names == sorted(p.name for p in single.iterdir()), "other file names than the 1-rank to-hf"
    for name in names:
        assert filecmp.cmp(ours / name, single / name, shallow=False), f"{name} differs from the 1-rank to-hf"


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
    p.add_argument("--shard-mb", type=float, default=1024, help="to-hf --max-shard-mb: ranks share whole shards")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dist-", dir=args.workdir))
    try:
        src = work / "hf"
        total = generate_sized(src, args.size_gb)
        shards = len(list(src.glob("*.safetensors")))
        print(f"checkpoint: {total / 1e9:.2f} GB bf16, {shards} shards, {os.cpu_count()} CPUs")
        print(f"{'':>6}{'ranks':>5} {'wall s (runs)':>24} {'GB/s':>6} {'peak RSS per rank, MB':>24} {'.metadata':>18}")
        dcp, kept = work / "dcp", work / "dcp-kept"
        for ranks in args.ranks:
            best, walls, rss = measure(ranks, args.repeat, convert_command(src, dcp), dcp)
            verify_sample(src, dcp)
            size, chunks = metadata_record_bytes(dcp)
            report("convert", ranks, best, walls, total, rss, f"{size:,} B / {chunks} ch")
            if kept.exists():
                shutil.rmtree(dcp)
            else:
                os.rename(dcp, kept)  # the to-hf input below
        print(f".metadata: {size / chunks:.0f} bytes per chunk record")
        first = work / f"hf-{args.ranks[0]}"
        for ranks in args.ranks:
            hf = work / f"hf-{ranks}"
            best, walls, rss = measure(ranks, args.repeat, to_hf_command(kept, src, hf, args.shard_mb), hf)
            shards = len(list(hf.glob("*.safetensors")))
            if hf == first:
                verify_hf_sample(src, hf)
            else:
                same_folder(hf, first)
                shutil.rmtree(hf)
            report("to-hf", ranks, best, walls, total, rss, f"{shards} shards")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
