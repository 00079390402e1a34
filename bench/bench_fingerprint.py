"""Benchmark: what fingerprints cost, at conversion and in the guard.

1. Conversion with and without recording fingerprints, each in a fresh subprocess (wall, CPU seconds and
   peak RSS from ``os.wait4``), on a generated OLMo2-shaped bf16 checkpoint (``bench_convert.generate``),
   warm page cache. "without" is the same converter with the recorder's ``add_rows`` replaced by a no-op.
2. The guard's verification on OLMo-2-1124-7B shapes on CPU, one process: one decoder layer's tensors
   (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008, four norms) built in memory as random
   float32 parameters, fingerprinted at bfloat16 (the stored dtype) as the guard does, timed and scaled to
   32 layers; plus the embedding and the LM head (100352x4096) timed themselves.

    python bench/bench_fingerprint.py                  # ~1 GB conversion + the 7B estimate
    python bench/bench_fingerprint.py --size-gb 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_convert import generate, measure  # noqa: E402

NO_RECORD = (
    "import sys, flame_ext.io.fingerprint as f; f.Recorder.add_rows = lambda self, key, start, block: None; "
    "from flame_ext.cli import main; sys.exit(main(sys.argv[1:]))"
)
WITH_RECORD = "import sys; from flame_ext.cli import main; sys.exit(main(sys.argv[1:]))"


def conversion(size_gb: float, repeat: int) -> None:
    import shutil

    with tempfile.TemporaryDirectory(dir=Path.cwd()) as work:
        src = Path(work) / "hf"
        total = generate(src, size_gb)
        print(f"conversion of {total / 1e9:.2f} GB bf16 (OLMo2-shaped, warm cache), median of {repeat}:")
        runs: dict[str, list] = {"with fingerprints": [], "without": []}
        for i in range(repeat):
            for name, code in (("with fingerprints", WITH_RECORD), ("without", NO_RECORD)):
                out = Path(work) / f"out-{i}-{len(runs[name])}"
                cmd = [sys.executable, "-c", code, "convert", "--model", str(src), "--checkpoint", str(out)]
                runs[name].append(measure(name, cmd + ["--no-reference"]))
                shutil.rmtree(out, ignore_errors=True)
        for name, rs in runs.items():
            print(
                f"  {name:18s} wall {statistics.median(r.wall for r in rs):6.1f} s   "
                f"cpu {statistics.median(r.cpu for r in rs):6.1f} s   peak RSS {max(r.rss_mb for r in rs):7.0f} MB"
            )


def guard_7b() -> None:
    import torch

    from flame_ext.io.fingerprint import local_fingerprint

    h, inter, vocab, layers = 4096, 11008, 100352, 32
    shapes = [(h, h)] * 4 + [(inter, h)] * 2 + [(h, inter)] + [(h,)] * 4
    torch.set_num_threads(1)  # one rank's work on one core: a shared, loaded machine makes 2 threads spin
    gen = torch.Generator().manual_seed(0)
    layer = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    local_fingerprint(layer[-1], torch.bfloat16)  # warm up
    times = []
    for _ in range(2):
        t0 = time.process_time()
        for t in layer:
            local_fingerprint(t, torch.bfloat16)
        times.append(time.process_time() - t0)
    per_layer = min(times)
    del layer
    emb = torch.randn((vocab, h), generator=gen) * 0.02
    t0 = time.process_time()
    local_fingerprint(emb, torch.bfloat16)
    emb_s = time.process_time() - t0
    total = per_layer * layers + 2 * emb_s
    n = layers * sum(torch.Size(s).numel() for s in shapes) + 2 * vocab * h
    print(
        f"guard verification, OLMo-2-7B shapes, fp32 parameters fingerprinted at bf16, one thread, CPU "
        f"seconds: one layer {per_layer:.2f} s, embedding {emb_s:.2f} s -> whole model ({n / 1e9:.2f} G values) "
        f"{total:.1f} s on one rank ({total / 8:.1f} s per rank when 8 ranks share the shards)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-convert", action="store_true")
    args = p.parse_args()
    if not args.skip_convert:
        conversion(args.size_gb, args.repeat)
    guard_7b()
    return 0


if __name__ == "__main__":
    sys.exit(main())
