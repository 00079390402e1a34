"""Benchmark: HF -> DCP conversion of a generated multi-shard, OLMo2-shaped bf16 checkpoint.

Side by side, each in its own fresh subprocess (wall seconds, CPU seconds and the command's own peak RSS):

  copy     ``cp -r`` of the same files: the physical limit for reading and writing those bytes
  convert  ``flame-ext convert --no-reference`` (this project's streaming converter)
  stock    flame's converter: ``AutoModelForCausalLM.from_pretrained`` -> ``state_dict()`` ->
           ``dcp.save({"model": sd}, FileSystemWriter(thread_count=8))``
  to-hf    ``flame-ext to-hf`` of the converted checkpoint back to safetensors (the way back after
           training), from a DCP made once per size before the timed runs
  import   ``import torch, transformers`` alone, for context

The checkpoint is written shard by shard (about 1 GB each, random bf16 data) without materialising the
model; its config is a real ``Olmo2ForCausalLM`` one (hidden 2048, vocab 100352; the number of layers is
chosen for the requested size). The converter's output is checked bit-exact against the source for a
sample of tensors. ``sync`` runs between contenders, outside the timings.

Two page-cache states, each a table of its own:

  warm  the checkpoint's files are in the page cache (they were just written): a copy never touches the
        disk for reading, and ``cp`` copies page cache to page cache inside the kernel.
  cold  before each contender the page cache is dropped (``/proc/sys/vm/drop_caches``, needs root) and
        the Python libraries are read back in by importing them: the checkpoint comes from the disk, the
        tools do not. This is the state a 7B checkpoint (29 GB in fp32, 15 GB in bf16) is usually in.

The converter fsyncs what it wrote before publishing it, so ``copy + sync`` is the like-for-like copy;
both ratios are printed.

    python bench/bench_convert.py                      # ~4 GB, in a temporary folder
    python bench/bench_convert.py --size-gb 1 2 4      # one table row set per size: memory stays flat
    python bench/bench_convert.py --workdir /big/disk --keep
    python bench/bench_convert.py --cache warm          # only the warm table (no root needed)

Limits: convert wall <= 1.5x copy; peak RSS <= 25% of the checkpoint size, flat as it grows.
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
from dataclasses import dataclass
from pathlib import Path

from fresh_process import run_fresh
from olmo2_checkpoint import DROP_CACHES, STOCK, can_drop_caches, drop_page_cache, generate, sized_config

HIDDEN, INTERMEDIATE, HEADS = 2048, 8192, 16


USERSPACE_COPY = (
    'mkdir "$1" && for f in "$0"/*; do dd if="$f" of="$1/${f##*/}" bs=16M status=none || exit 1; done && sync'
)


@dataclass
class Result:
    name: str
    wall: float
    rss_mb: float
    rc: int
    cpu: float = 0.0  # user + system seconds: less sensitive to a busy machine than wall time


def generate_sized(folder: Path, size_gb: float) -> int:
    """A bf16 checkpoint of about ``size_gb`` GB (hidden 2048, vocab 100352; below ``TINY_GB`` the smoke runs'
    tiny shape); returns the total tensor bytes."""
    width = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS)
    return generate(folder, sized_config(size_gb, width, "bfloat16"), dtype="bfloat16", std=1.0, tokenizer=False)


def measure(name: str, cmd: list[str], cold: bool = False) -> Result:
    """Run ``cmd`` in a fresh process; its own wall time, CPU seconds and peak RSS (``fresh_process``)."""
    os.sync()  # flush the previous contender's dirty pages outside the timing
    if cold:
        drop_page_cache()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = run_fresh(cmd, env)
    if run.rc != 0:
        print(f"{name} failed (exit {run.rc}):\n{run.output[-2000:]}", file=sys.stderr)
    return Result(name, run.wall, run.rss_mb, run.rc, run.cpu)


def verify_sample(source: Path, checkpoint: Path, n: int = 8) -> int:
    """Compare a spread of tensors (first, last, largest, a sample between) bit for bit; returns the count."""
    import torch
    from safetensors import safe_open

    from flame_ext.io.dcp import load_tensor, read_dcp_metadata

    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    found = read_dcp_metadata(checkpoint)
    keys = sorted(weight_map)
    step = max(1, len(keys) // n)
    sample = sorted(set(keys[::step] + ["model.embed_tokens.weight", "lm_head.weight", keys[-1]]))
    for key in sample:
        with safe_open(str(source / weight_map[key]), framework="pt") as f:
            expected = f.get_tensor(key)
        got = load_tensor(checkpoint, key, found[key])
        if got.dtype != expected.dtype or not torch.equal(got.view(torch.int16), expected.view(torch.int16)):
            raise SystemExit(f"MISMATCH: {key} differs between the source and the converted checkpoint")
    return len(sample)


def _helper(*args: str) -> str:
    """Run a step of this script in a child process and return its last output line.

    The parent must stay small: a child forked from a process holding a GB shard starts with that
    process's resident memory as its own peak (Linux carries the high-water mark across exec), which would
    inflate every measurement. So generating and verifying, which import torch, happen in children too.
    """
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def contenders(src: Path, dcp_dir: Path, out: Path) -> list[tuple[str, list[str]]]:
    py = sys.executable
    return [
        ("copy (cp -r)", ["cp", "-r", str(src), str(out)]),
        ("copy + sync (durable)", ["sh", "-c", 'cp -r "$0" "$1" && sync', str(src), str(out)]),
        # cp may copy inside the kernel (copy_file_range); dd moves the bytes through a process, as any
        # converter that looks at them must.
        ("copy via user space (dd bs=16M) + sync", ["sh", "-c", USERSPACE_COPY, str(src), str(out)]),
        (
            "flame-ext convert",
            [py, "-m", "flame_ext.cli", "convert", "--model", str(src), "--checkpoint", str(out), "--no-reference"],
        ),
        ("stock (from_pretrained + dcp.save)", [py, "-c", STOCK, str(src), str(out)]),
        (
            "flame-ext to-hf (DCP -> HF)",
            [py, "-m", "flame_ext.cli", "to-hf", "--checkpoint", str(dcp_dir), "--config", str(src), "--out", str(out)],
        ),
        ("import torch, transformers", [py, "-c", "import torch, transformers"]),
    ]


def run_size(size_gb: float, work: Path, repeat: int, caches: list[str]) -> None:
    """Generate the checkpoint once, then one table per page-cache state."""
    src = work / f"hf-{size_gb:g}gb"
    t0 = time.perf_counter()
    total = int(_helper("--generate-into", str(src), "--size-gb", str(size_gb)))
    shards = len(list(src.glob("*.safetensors")))
    print(
        f"\n== {total / 1e9:.2f} GB checkpoint, {shards} shards (generated in {time.perf_counter() - t0:.0f} s) ==",
        flush=True,
    )
    dcp_dir = work / f"dcp-{size_gb:g}gb"  # the input of the to-hf contender, made once, untimed
    if not dcp_dir.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "flame_ext.cli",
                "convert",
                "--model",
                str(src),
                "--checkpoint",
                str(dcp_dir),
                "--no-reference",
            ],
            check=True,
            capture_output=True,
        )
    for cache in caches:
        print(f"-- page cache {cache} --", flush=True)
        run_contenders(src, dcp_dir, work / f"out-{size_gb:g}gb", total, repeat, cold=cache == "cold")


def run_contenders(src: Path, dcp_dir: Path, out: Path, total: int, repeat: int, cold: bool) -> list[Result]:
    """Every contender ``repeat`` times, round robin (so a noisy neighbour hits all alike); medians."""
    runs: dict[str, list[Result]] = {}
    checked = 0
    for _ in range(repeat):
        for name, cmd in contenders(src, dcp_dir, out):
            runs.setdefault(name, []).append(measure(name, cmd, cold=cold))
            if name == "flame-ext convert" and runs[name][-1].rc == 0 and not checked:
                checked = int(_helper("--verify", str(src), str(out)))
            shutil.rmtree(out, ignore_errors=True)
    results = [median(rs) for rs in runs.values()]
    print_table(results, total, runs)
    print(f"converted checkpoint: {checked} sampled tensors bit-exact against the source")
    return results


def median(rs: list[Result]) -> Result:
    mid = len(rs) // 2
    walls, rss, cpu = (sorted(getattr(r, f) for r in rs) for f in ("wall", "rss_mb", "cpu"))
    return Result(rs[0].name, walls[mid], rss[mid], max(r.rc for r in rs), cpu[mid])


def print_table(results: list[Result], total: int, runs: dict[str, list[Result]]) -> None:
    copy, durable = results[0].wall, results[1].wall  # cp -r; cp -r + sync
    print(
        f"{'(median of ' + str(len(runs[results[0].name])) + ')':38} {'wall s':>7} {'x cp':>6} {'x cp+sync':>9} "
        f"{'CPU s':>6} {'peak RSS MB':>12} {'RSS % ckpt':>11}   all walls"
    )
    for r in results:
        flag = "" if r.rc == 0 else f"  (exit {r.rc})"
        walls = " ".join(f"{x.wall:.1f}" for x in runs[r.name])
        print(
            f"{r.name:38} {r.wall:7.1f} {r.wall / copy:6.2f} {r.wall / durable:9.2f} {r.cpu:6.1f} {r.rss_mb:12,.0f} "
            f"{100 * r.rss_mb * 2**20 / total:10.1f}%   {walls}{flag}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, nargs="+", default=[4.0], help="checkpoint size(s) in GB (default 4)")
    p.add_argument("--workdir", help="folder for the generated files (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint(s)")
    p.add_argument(
        "--repeat", type=int, default=3, help="runs of each contender, round robin; medians shown (default 3)"
    )
    p.add_argument(
        "--cache",
        choices=["warm", "cold", "both"],
        default="both",
        help="page-cache state(s) to measure (default both; cold needs root, else it is skipped with a note)",
    )
    p.add_argument("--generate-into", help=argparse.SUPPRESS)  # internal: the child that writes the checkpoint
    p.add_argument("--verify", nargs=2, help=argparse.SUPPRESS)  # internal: the child that checks the output
    args = p.parse_args()
    if args.generate_into:
        print(generate_sized(Path(args.generate_into), args.size_gb[0]))
        return 0
    if args.verify:
        print(verify_sample(Path(args.verify[0]), Path(args.verify[1])))
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, workdir {work}")
    caches = ["warm", "cold"] if args.cache == "both" else [args.cache]
    if "cold" in caches and not can_drop_caches():
        print(f"cold page cache skipped: {DROP_CACHES} is not writable (run as root for it)")
        caches.remove("cold")
    if not caches:
        return 2
    try:
        for size in args.size_gb:
            run_size(size, work, args.repeat, caches)
            if not args.keep:  # free the disk before the next size
                for stem in ("hf", "dcp"):
                    shutil.rmtree(work / f"{stem}-{size:g}gb", ignore_errors=True)
    finally:
        if not args.keep:
            for size in args.size_gb:
                for stem in ("hf", "dcp", "out"):
                    shutil.rmtree(work / f"{stem}-{size:g}gb", ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
