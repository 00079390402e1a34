"""Benchmark: what fingerprints cost, at conversion and in the guard, and how exact they are.

1. Conversion with and without recording fingerprints, each in a fresh subprocess (wall, CPU seconds and
   peak RSS from ``os.wait4``), on a generated OLMo2-shaped bf16 checkpoint (``bench_convert.generate``),
   warm page cache, the variants interleaved run by run. "without" is the same converter with the
   recorder's ``add_rows`` replaced by a no-op; "plain only" records the fingerprints of the values as written
   but not their roundings to the other training dtypes. ``--dtype float32`` converts to fp32 (the output is
   then twice the source). With ``--before REV``, also the fingerprint code of git revision REV (its
   ``flame_ext/fingerprints/algorithm.py`` swapped in).
2. The guard's verification on OLMo-2-1124-7B shapes on CPU: one decoder layer's tensors (q/k/v/o
   4096x4096, gate/up 11008x4096, down 4096x11008, four norms) as random float32 parameters, fingerprinted
   at bfloat16 (the stored dtype) with ``local_fingerprint`` as the guard does, timed and scaled to 32
   layers; plus the embedding and the LM head (100352x4096) timed themselves. One thread (CPU seconds) and
   two threads (wall seconds), this code and, with ``--before REV``, REV's, alternating on the same tensors.
3. The guard's own path on one FSDP2 rank: the same layer as a module sharded with ``fully_shard`` (gloo,
   one process), its ``state_dict()`` DTensors fingerprinted and summed over ranks as the guard does.
4. Summation order: the largest relative difference (of ``sum_abs`` for the linear terms, of ``sum_sq`` for
   itself) between a whole-tensor fingerprint and a 3x3 grid of blocks, two workers, and REV's code.

    python bench/bench_fingerprint.py --size-gb 4 --before 5c6ab44
    python bench/bench_fingerprint.py --skip-convert                  # the guard figures only
    python bench/bench_fingerprint.py --size-gb 0.25 --dtype float32 --convert-only
    python bench/bench_fingerprint.py --sums-only --before d409d3e    # CPU-s per GB of the sums alone
    python bench/bench_fingerprint.py --passes                        # CPU-s per GB of each pass over a chunk
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_convert import generate_sized, measure  # noqa: E402

CLI = "from flame_ext.cli import main; sys.exit(main(sys.argv[1:]))"
VARIANTS = {
    "with fingerprints": "import sys; " + CLI,
    "plain only": "import sys, flame_ext.fingerprints.algorithm as f; f.rounding_dtypes = lambda stored: (); " + CLI,
    "without": (
        "import sys, flame_ext.fingerprints.algorithm as f; "
        "f.Recorder.add_rows = lambda self, key, start, block: None; " + CLI
    ),
}
BEFORE = (
    "import sys, importlib.util as u, flame_ext.fingerprints.algorithm as f; "
    "s = u.spec_from_file_location('before', {path!r}); m = sys.modules['before'] = u.module_from_spec(s); "
    "s.loader.exec_module(m); f.block_fingerprint = m.block_fingerprint; " + CLI
)
H, INTER, VOCAB, LAYERS = 4096, 11008, 100352, 32
LAYER_SHAPES = [(H, H)] * 4 + [(INTER, H)] * 2 + [(H, INTER)] + [(H,)] * 4


def use_tiny_shapes() -> None:
    """The guard figures on a tiny layer and vocabulary (``--tiny``): every step runs, in seconds."""
    global H, INTER, VOCAB, LAYERS, LAYER_SHAPES
    H, INTER, VOCAB, LAYERS = 128, 256, 1024, 2
    LAYER_SHAPES = [(H, H)] * 4 + [(INTER, H)] * 2 + [(H, INTER)] + [(H,)] * 4


def load_before(rev: str, work: Path) -> tuple[ModuleType, Path]:
    """REV's fingerprint module (torch only), loaded from a copy under ``work``."""
    path = work / "fingerprint_before.py"
    # The module was flame_ext/io/fingerprint.py before the fingerprints package: an older REV has it there.
    for name in ("flame_ext/fingerprints/algorithm.py", "flame_ext/io/fingerprint.py"):
        shown = subprocess.run(["git", "show", f"{rev}:{name}"], capture_output=True, text=True)
        if shown.returncode == 0:
            break
    shown.check_returncode()
    path.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("fingerprint_before", path)
    module = sys.modules["fingerprint_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def conversion(size_gb: float, repeat: int, before: Path | None, work: Path, dtype: str = "auto") -> None:
    import shutil

    variants = dict(VARIANTS)
    if before is not None:
        variants["with fingerprints (before)"] = BEFORE.format(path=str(before))
    src = work / "hf"
    total = generate_sized(src, size_gb)
    written = total * (2 if dtype == "float32" else 1)
    print(
        f"conversion of {total / 1e9:.2f} GB bf16 (OLMo2-shaped, warm cache) to {written / 1e9:.2f} GB "
        f"({dtype}), median of {repeat}:",
        flush=True,
    )
    runs: dict[str, list] = {name: [] for name in variants}
    for i in range(repeat):
        for name, code in variants.items():
            out = work / f"out-{i}"
            cmd = [sys.executable, "-c", code, "convert", "--model", str(src), "--checkpoint", str(out)]
            runs[name].append(measure(name, cmd + ["--no-reference", "--dtype", dtype]))
            shutil.rmtree(out, ignore_errors=True)
    base = {f: statistics.median(getattr(r, f) for r in runs["without"]) for f in ("wall", "cpu")}
    base_rss = max(r.rss_mb for r in runs["without"])
    for name, rs in runs.items():
        wall, cpu = statistics.median(r.wall for r in rs), statistics.median(r.cpu for r in rs)
        rss = max(r.rss_mb for r in rs)
        print(
            f"  {name:28s} wall {wall:6.1f} s (x{wall / base['wall']:.2f})   cpu {cpu:6.1f} s "
            f"(x{cpu / base['cpu']:.2f})   peak RSS {rss:6.0f} MB (x{rss / base_rss:.2f})   "
            f"walls {[round(r.wall, 1) for r in rs]}   rc {max(r.rc for r in rs)}",
            flush=True,
        )
        if name != "without":
            print(f"    {(cpu - base['cpu']) / (written / 1e9):.2f} CPU s per GB written over 'without'", flush=True)


def timed(fn, threads: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``fn()`` with torch set to ``threads`` intra-op threads."""
    import torch

    torch.set_num_threads(threads)
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def guard_7b(before: ModuleType | None, repeat: int) -> None:
    import torch

    from flame_ext.fingerprints import algorithm as fingerprint

    impls = {"after": fingerprint.local_fingerprint}
    if before is not None:
        impls["before"] = before.local_fingerprint
    gen = torch.Generator().manual_seed(0)
    layer = [torch.randn(s, generator=gen) * 0.02 for s in LAYER_SHAPES]
    emb = torch.randn((VOCAB, H), generator=gen) * 0.02
    n = LAYERS * sum(torch.Size(s).numel() for s in LAYER_SHAPES) + 2 * VOCAB * H
    print(
        f"guard verification, OLMo-2-7B shapes ({n / 1e9:.2f} G values), fp32 parameters fingerprinted at bf16 "
        f"({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start), best of {repeat}:",
        flush=True,
    )
    for threads in (1, 2):
        for name, fn in impls.items():
            fn(layer[-1], torch.bfloat16)  # warm up
            lay = [timed(lambda: [fn(t, torch.bfloat16) for t in layer], threads) for _ in range(repeat)]
            em = [timed(lambda: fn(emb, torch.bfloat16), threads) for _ in range(repeat)]
            cpu = min(c for c, _ in lay) * LAYERS + 2 * min(c for c, _ in em)
            wall = min(w for _, w in lay) * LAYERS + 2 * min(w for _, w in em)
            print(
                f"  {name:6s} {threads} thread(s): whole model {cpu:5.1f} CPU s, {wall:5.1f} s wall   (one layer "
                f"{min(c for c, _ in lay):.3f} CPU s / {min(w for _, w in lay):.3f} s wall, embedding "
                f"{min(c for c, _ in em):.3f} / {min(w for _, w in em):.3f} s); load average now "
                f"{os.getloadavg()[0]:.1f}",
                flush=True,
            )


def guard_path(repeat: int) -> None:
    """The guard's calls on one FSDP2 rank (DTensor shards, one all-reduce), for one 7B decoder layer."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from flame_ext.fingerprints.algorithm import local_fingerprint
    from flame_ext.guard.ranks import sum_over_ranks

    with tempfile.NamedTemporaryFile() as rendezvous:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous.name}", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            module = torch.nn.Module()
            for i, s in enumerate(LAYER_SHAPES):
                module.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(s) * 0.02))
            fully_shard(module, mesh=mesh)
            state = module.state_dict()

            def verify() -> torch.Tensor:
                return sum_over_ranks(torch.stack([local_fingerprint(v, torch.bfloat16) for v in state.values()]))

            for threads in (1, 2):
                runs = [timed(verify, threads) for _ in range(repeat)]
                cpu, wall = min(c for c, _ in runs), min(w for _, w in runs)
                print(
                    f"guard path (fully_shard DTensors, 1 rank, all-reduce), one 7B layer, {threads} thread(s): "
                    f"{cpu:.3f} CPU s, {wall:.3f} s wall -> x{LAYERS} layers {cpu * LAYERS:.1f} CPU s, "
                    f"{wall * LAYERS:.1f} s wall",
                    flush=True,
                )
        finally:
            dist.destroy_process_group()


def summation_order(before: ModuleType | None) -> None:
    """Largest relative difference between ways of summing the same tensor's fingerprint."""
    import torch

    from flame_ext.fingerprints.algorithm import TERMS, block_fingerprint

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        scale = torch.full_like(a, float(max(a[3], b[3])))
        scale[2], scale[0] = max(a[2], b[2]), 1.0
        return float(((a - b).abs() / scale).max())

    def grid(fn, t: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(len(TERMS), dtype=torch.float64)
        rows = [0, t.shape[0] // 3 + 1, 2 * t.shape[0] // 3 + 7, t.shape[0]]
        cols = [0, t.shape[1] // 3 + 3, 2 * t.shape[1] // 3 + 1, t.shape[1]] if t.dim() > 1 else [0, 1]
        for r0, r1 in zip(rows, rows[1:]):
            for c0, c1 in zip(cols, cols[1:]):
                block = t[r0:r1, c0:c1] if t.dim() > 1 else t[r0:r1]
                total += fn(block, [r0, c0][: t.dim()] + [0] * (t.dim() - 2), tuple(t.shape))
        return total

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    worst = {"3x3 blocks": 0.0, "2 workers": 0.0}
    if before is not None:
        worst["previous code"] = 0.0
    shapes = [(H, INTER), (INTER, H), (H * INTER // 7,), (64, 128, 512)]
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            t = (torch.randn(shape, generator=gen) * 0.02 + 1e-3).to(dtype)
            whole = block_fingerprint(t, [0] * t.dim(), shape)
            worst["3x3 blocks"] = max(worst["3x3 blocks"], rel(grid(block_fingerprint, t), whole))
            worst["2 workers"] = max(
                worst["2 workers"], rel(block_fingerprint(t, [0] * t.dim(), shape, workers=2), whole)
            )
            if before is not None:
                worst["previous code"] = max(worst["previous code"], rel(grid(before.block_fingerprint, t), whole))
    print(
        f"summation order, largest relative difference from the whole-tensor fingerprint over {shapes} in fp32 "
        "and bf16: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()),
        flush=True,
    )


def sums_per_gb(before: ModuleType | None, repeat: int) -> None:
    """The sums alone, in this process, one torch thread: CPU seconds per GB of bf16 for the plain fingerprint
    and for plain + fp16 rounding (what a bf16 conversion records), on one OLMo-2-7B decoder layer's matrix
    shapes (trained-like values: std 0.02), this code and REV's alternating; the fastest of ``repeat``."""
    import resource

    import torch

    from flame_ext.fingerprints import algorithm

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for s in [(H, H), (INTER, H), (H, INTER), (H,)]]
    gb = sum(t.numel() * 2 for t in tensors) / 1e9
    codes = {"this code": algorithm, **({"previous code": before} if before is not None else {})}
    best: dict[tuple[str, str], float] = {}
    for _ in range(repeat):
        for name, module in codes.items():
            for kind, dtypes in (("plain", (None,)), ("plain + fp16", (None, torch.float16))):
                t0 = cpu()
                for t in tensors:
                    module.block_fingerprints(t, [0] * t.dim(), tuple(t.shape), dtypes)
                took = (cpu() - t0) / gb
                best[name, kind] = min(best.get((name, kind), took), took)
    torch.set_num_threads(threads)
    for (name, kind), v in best.items():
        print(f"sums, {name}, {kind}: {v:.2f} CPU-s per GB of bf16", flush=True)


def passes(repeat: int, values: int = 1 << 26) -> None:
    """Where one chunk's CPU time goes, one torch thread: each pass of ``fingerprints.algorithm._Sums`` over the
    chunks of one 4096-column matrix (``values`` of them, trained-like: std 0.02), timed one by one as the loop
    runs them (each chunk in cache after its first read, as in the real loop); then whole-loop alternatives
    that compute the same sums, timed the same way. CPU seconds per GB of the source, the fastest of ``repeat``.
    """
    import torch

    from flame_ext.fingerprints import algorithm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cols = 4096
    step = algorithm._CHUNK // cols
    g = torch.Generator().manual_seed(0)
    base = torch.randn((values // cols, cols), generator=g) * 0.02
    print(
        f"passes over one {algorithm._CHUNK}-value chunk, one torch thread ({os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}), fastest of {repeat}:",
        flush=True,
    )
    for src_dtype in (torch.bfloat16, torch.float32):
        src = base.to(src_dtype)
        gb = src.numel() * src.element_size() / 1e9
        rows = src.shape[0]
        row_w = algorithm._row_weights(0, rows)
        acc = torch.zeros((3, cols), dtype=torch.float64)
        pair = torch.empty((2, step * cols), dtype=torch.float64)  # row 1: ones, for the mv alternative
        pair[1] = 1
        x, flat = pair[0].view(step, cols), pair[0]
        f32 = torch.empty((step, cols), dtype=torch.float32)
        narrow = {d: torch.empty((step, cols), dtype=d) for d in (torch.bfloat16, torch.float16)}
        name = str(src_dtype).removeprefix("torch.")
        steps: dict[str, Any] = {
            "copy to float64": lambda c, w: x.copy_(c),
            "addmm with the row weights": lambda c, w: acc.addmm_(w, x),
            "dot (sum_sq)": lambda c, w: torch.dot(flat, flat),
            "abs_ + sum (sum_abs)": lambda c, w: flat.abs_().sum(),
            "amin over 16 rows (bf16 -> fp16 scan)": lambda c, w: torch.amin(flat.view(16, -1), 0),
        }
        if src_dtype == torch.bfloat16:
            steps["rounding to fp16: bf16 -> fp32"] = lambda c, w: f32.copy_(c)
            steps["rounding to fp16: fp32 -> fp16"] = lambda c, w: narrow[torch.float16].copy_(f32)
            steps["rounding to fp16: fp16 -> float64"] = lambda c, w: x.copy_(narrow[torch.float16])
        else:
            steps["rounding to bf16: fp32 -> bf16"] = lambda c, w: narrow[torch.bfloat16].copy_(c)
            steps["rounding to bf16: bf16 -> float64"] = lambda c, w: x.copy_(narrow[torch.bfloat16])
            steps["rounding to fp16: fp32 -> fp16"] = lambda c, w: narrow[torch.float16].copy_(c)
            steps["rounding to fp16: fp16 -> float64"] = lambda c, w: x.copy_(narrow[torch.float16])
            steps["  (alternative) fp16 -> fp32"] = lambda c, w: f32.copy_(narrow[torch.float16])
            steps["  (alternative) fp32 -> float64"] = lambda c, w: x.copy_(f32)
        steps["a no-op torch call (x.view)"] = lambda c, w: x.view(-1)
        best: dict[str, float] = {}
        for _ in range(repeat):
            spent = dict.fromkeys(steps, 0.0)
            for start in range(0, rows - step + 1, step):
                chunk, w = src[start : start + step], row_w[:, start : start + step]
                for label, fn in steps.items():
                    t0 = time.thread_time()
                    fn(chunk, w)
                    spent[label] += time.thread_time() - t0
            for label, took in spent.items():
                best[label] = min(best.get(label, took / gb), took / gb)
        for label, v in best.items():
            print(f"  {name} source, {label:40s} {v:.3f} CPU-s per GB", flush=True)

        def loop(body: Any) -> float:
            t0 = time.thread_time()
            for start in range(0, rows - step + 1, step):
                body(src[start : start + step], row_w[:, start : start + step])
            return (time.thread_time() - t0) / gb

        def now(c: Any, w: Any) -> None:
            x.copy_(c), torch.dot(flat, flat), acc.addmm_(w, x), flat.abs_().sum()

        def norm1(c: Any, w: Any) -> None:
            x.copy_(c), torch.dot(flat, flat), acc.addmm_(w, x), torch.linalg.vector_norm(flat, 1)

        def mv(c: Any, w: Any) -> None:
            x.copy_(c), acc.addmm_(w, x), flat.abs_(), torch.mv(pair, flat)

        alternatives = {
            "copy, dot, addmm, abs_ + sum (the code)": now,
            "sum_abs by vector_norm(x, 1) (no write)": norm1,
            "sum_sq and sum_abs by one mv([|x|; 1], |x|)": mv,
        }
        whole = {k: min(loop(f) for _ in range(repeat)) for k, f in alternatives.items()}
        for label, v in whole.items():
            print(f"  {name} source, whole loop: {label:45s} {v:.3f} CPU-s per GB", flush=True)
    torch.set_num_threads(threads)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--before", metavar="REV", help="also time the fingerprint code of this git revision")
    p.add_argument("--skip-convert", action="store_true")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32"], help="the conversion's --dtype")
    p.add_argument("--convert-only", action="store_true", help="the conversion figures only")
    p.add_argument("--sums-only", action="store_true", help="the sums' CPU-s per GB and the summation order only")
    p.add_argument("--passes", action="store_true", help="the CPU-s per GB of each pass over a chunk, and alternatives")
    p.add_argument("--tiny", action="store_true", help="smoke run (tests/bench): tiny checkpoint and layer shapes")
    args = p.parse_args()
    if args.tiny:
        use_tiny_shapes()
        args.size_gb = min(args.size_gb, 0.01)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        work = Path(tmp)
        before, before_path = load_before(args.before, work) if args.before else (None, None)
        if args.passes:
            passes(args.repeat, 1 << 20 if args.tiny else 1 << 26)
            return 0
        if args.sums_only:
            sums_per_gb(before, args.repeat)
            summation_order(before)
            return 0
        if not args.skip_convert:
            conversion(args.size_gb, args.repeat, before_path, work, args.dtype)
        if args.convert_only:
            return 0
        guard_7b(before, args.repeat)
        guard_path(args.repeat)
        summation_order(before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
