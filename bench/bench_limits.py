"""Every speed and memory limit the project holds itself to, in one run, each beside its limit as a ratio
(lower is better; <= 1.00x of the limit is met), then the device section: the CPU figures beside the GPU's
when torch sees one.

    python bench/bench_limits.py --size 4      # the real figures: a 4 GB bf16 checkpoint (cold where root)
    python bench/bench_limits.py --size 7b     # OLMo-2-1124-7B shapes in bf16 (15 GB of disk, twice)
    python bench/bench_limits.py --size tiny   # the smoke run (tests/bench): every row, a few MB, warm

Rows (each command in a fresh process through ``fresh_process``: wall, CPU seconds, its own peak RSS):

  convert --no-reference vs cat          wall of ``flame-ext convert --no-reference`` over ``cat`` of the source
                                         files to /dev/null; limit 1.25x
  <size> cold, vs cp + sync              the same convert over ``cp -r`` + ``sync``, page cache dropped before
                                         each (root: /proc/sys/vm/drop_caches); limit 1.3x
  to-hf vs convert, 1 rank               ``flame-ext to-hf`` of that checkpoint over the convert; limit 1.0x
  diagnose --values vs reading the bytes ``diagnose --values`` (the manifest's fingerprints) over ``cat`` of the
                                         checkpoint's data files; limit 1.0x
  diagnose --loss peak RSS vs 2 GB       ``bench_diagnose.measure_loss``: a bf16 OLMo2 of the same size with its
                                         reference; limit 2 GB
  fingerprint CPU-s/GB vs 0.4            the conversion's ``Recorder`` (values and roundings) on bf16 blocks,
                                         one thread, CPU seconds per GB; limit 0.4
  start-up above import torch vs 1.0 s   CPU seconds of convert / diagnose / to-hf on the embedded tiny model
                                         minus those of ``import torch``; limit 1.0 s

Each timed command starts from the same state of the machine's memory: ``--settle`` seconds (default 5; 0 with
``--size tiny``) after the previous one and after any page-cache drop. On a virtual machine whose hypervisor
takes back the memory the guest frees (free page reporting), a page the guest has not touched for a few seconds
costs a fault in the host the first time it is written: writing 1 GB of new file data took 2.2-2.6 s of system
time here 3 s or more after a delete, and 0.2-0.4 s within 1 s of it. Without the pause a command's figure
depends on what the one before it freed. The last line measures that cost on the machine the bench runs on.

The 7B table of docs/benchmarks.md measures the first row on the fp32 source cast to bf16; here every row uses one bf16
checkpoint of ``--size`` (``7b``: the 7B shape in bf16), so the cast is not in it. ``--size tiny`` never drops
the page cache (a test must not slow the machine down for everyone); the cold row then says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fresh_process import Run, run_fresh
from olmo2_checkpoint import can_drop_caches, drop_page_cache

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "flame_ext" / "assets" / "tiny-olmo2"
CLI = [sys.executable, "-m", "flame_ext.cli"]
SIZES = {"tiny": 0.003, "7b": None}  # 7b: the OLMo-2-1124-7B shape; any other: GB

FINGERPRINT = """
import resource, sys, torch
from flame_ext.fingerprints.algorithm import Recorder
torch.manual_seed(0)
mb = float(sys.argv[1])
rows = max(1, int(mb * 2**20 / (4096 * 2)))
block = torch.randn(rows, 4096).to(torch.bfloat16)
rec = Recorder({"w": (rows, 4096)}, rounded=True)
rec.add_rows("w", 0, block)  # warm-up: lazy imports and first-call costs
rec = Recorder({"w": (rows, 4096)}, rounded=True)
t0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(int(sys.argv[2])):
    rec.add_rows("w", 0, block)
t1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (t1.ru_utime - t0.ru_utime) + (t1.ru_stime - t0.ru_stime)
print(cpu / (block.numel() * 2 * int(sys.argv[2]) / 1e9))
"""

DEVICES = """
import time, torch
from flame_ext.fingerprints.algorithm import local_fingerprint
print("cpu", torch.get_num_threads(), "threads")
cuda = torch.cuda.is_available()
print("cuda", torch.cuda.get_device_name(0) if cuda else "absent")
t = torch.randn(4096, 11008)
for device in ["cpu"] + (["cuda"] if cuda else []):
    x = t.to(device)
    local_fingerprint(x, torch.bfloat16)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    local_fingerprint(x, torch.bfloat16)
    if cuda:
        torch.cuda.synchronize()
    print("guard", device, time.perf_counter() - t0)
"""


@dataclass
class Row:
    """One row: what was measured, the figure in the limit's unit, the limit; the ratio is figure / limit."""

    name: str
    detail: str
    value: float
    limit: float
    unit: str  # "x" for a ratio to another command's time, else the unit of value and limit
    note: str = ""

    def line(self) -> str:
        ratio = self.value / self.limit
        met = "met" if ratio <= 1.0 else "NOT met"
        figure = f"{self.value:.2f}{self.unit}"
        limit = f"{self.limit:g}{self.unit}"
        verdict = f"{ratio:5.2f}x of the limit, {met}"
        return f"  {self.name:44} {figure:>14} limit {limit:<14} {verdict}; {self.detail}{self.note}"


SETTLE_S = 5.0  # set from --settle in main

PAGE_COST = """
import os, sys, time
path, mb = sys.argv[1], int(sys.argv[2])
block = bytes(8 << 20)
def write():
    t = os.times()
    with open(path, "wb") as f:
        for _ in range(mb // 8):
            f.write(block)
    u = os.times()
    os.remove(path)
    return (u.system - t.system) + (u.user - t.user)
time.sleep(float(sys.argv[3]))
settled = write()
again = write()  # into the pages the delete just freed
print(settled, again)
"""


def fresh(cmd: list[str], cold: bool = False) -> Run:
    os.sync()
    if cold:
        drop_page_cache()
    time.sleep(SETTLE_S)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = run_fresh(cmd, env)
    if run.rc != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed (exit {run.rc}):\n{run.output[-3000:]}")
    return run


def cat(files: list[Path], cold: bool = False) -> Run:
    return fresh(["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, files)], cold)


def generate(folder: Path, size: str) -> int:
    """The bf16 source in a child process (this one stays small); its tensor bytes."""
    if size == "7b":
        code = (
            "import sys; from pathlib import Path; from olmo2_checkpoint import SHAPE_7B, generate, olmo2_config; "
            "print(generate(Path(sys.argv[1]), olmo2_config(dict(SHAPE_7B), 'bfloat16'), dtype='bfloat16', "
            "std=0.02, tokenizer=False))"
        )
        args = [str(folder)]
    else:
        code = "import sys; from pathlib import Path; from bench_convert import generate_sized; "
        code += "print(generate_sized(Path(sys.argv[1]), float(sys.argv[2])))"
        args = [str(folder), str(SIZES.get(size) or float(size))]
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return int(out.stdout.strip().splitlines()[-1])


def conversion_rows(work: Path, size: str, cold: bool) -> list[Row]:
    src, ckpt, hf_out = work / "hf", work / "dcp", work / "hf-out"
    total = generate(src, size)
    files = sorted(src.glob("*.safetensors"))
    convert = CLI + ["convert", "--model", str(src), "--checkpoint", str(ckpt), "--no-reference"]
    rows = []
    # Both rows cold where the page cache can be dropped (as the limits are stated), else both warm, saying why.
    state = "cold" if cold else "warm"
    read = cat(files, cold)
    conv = fresh(convert, cold)
    figure = f"{conv.wall:.1f} s vs {read.wall:.1f} s ({state})"
    rows.append(Row("convert --no-reference vs cat", figure, conv.wall / read.wall, 1.25, "x"))
    durable = fresh(["sh", "-c", 'cp -r "$0" "$1" && sync', str(src), str(hf_out)], cold)
    shutil.rmtree(hf_out)
    reason = "--size tiny" if size == "tiny" else "/proc/sys/vm/drop_caches is not writable (needs root)"
    note = "" if cold else f"  (page cache not dropped: {reason})"
    figure = f"{conv.wall:.1f} s vs {durable.wall:.1f} s ({state})"
    rows.append(Row(f"{total / 1e9:.2f} GB cold, vs cp + sync", figure, conv.wall / durable.wall, 1.3, "x", note))
    to_hf = fresh(CLI + ["to-hf", "--checkpoint", str(ckpt), "--config", str(src), "--out", str(hf_out)])
    rows.append(
        Row("to-hf vs convert, 1 rank", f"{to_hf.wall:.1f} s vs {conv.wall:.1f} s", to_hf.wall / conv.wall, 1.0, "x")
    )
    shutil.rmtree(hf_out)
    data = sorted(ckpt.glob("*.distcp"))
    read = cat(data, cold)
    values = fresh(CLI + ["diagnose", "--checkpoint", str(ckpt), "--values"], cold)
    figure = f"{values.wall:.1f} s vs {read.wall:.1f} s, {values.rss_mb / 1e3:.2f} GB RSS"
    rows.append(Row("diagnose --values vs reading the bytes", figure, values.wall / read.wall, 1.0, "x"))
    shutil.rmtree(ckpt)
    shutil.rmtree(src)
    return rows


def loss_row(work: Path, size: str) -> Row:
    from bench_diagnose import measure_loss

    run = measure_loss(work / "loss", size="7b" if size == "7b" else str(SIZES.get(size) or float(size)))
    detail = f"{run.size_gb:.2f} GB checkpoint, {run.layers} layers, {run.wall:.0f} s wall, {run.cpu:.0f} CPU s"
    return Row("diagnose --loss peak RSS vs 2 GB", detail, run.rss_mb * 2**20 / 1e9, 2.0, " GB")


def fingerprint_row(size: str) -> Row:
    mb, repeat = ("16", "2") if size == "tiny" else ("256", "4")
    out = subprocess.run([sys.executable, "-c", FINGERPRINT, mb, repeat], check=True, capture_output=True, text=True)
    per_gb = float(out.stdout.strip().splitlines()[-1])
    detail = f"the conversion's Recorder on {mb} MB bf16 blocks, one thread"
    return Row("fingerprint CPU-s/GB vs 0.4", detail, per_gb, 0.4, " CPU-s/GB")


def startup_rows(work: Path) -> list[Row]:
    ckpt, out = work / "tiny-dcp", work / "tiny-hf"
    torch_cpu = min(fresh([sys.executable, "-c", "import torch"]).cpu for _ in range(3))
    commands = {
        "convert": CLI + ["convert", "--model", str(TINY_MODEL), "--checkpoint", str(ckpt), "--no-reference"],
        "diagnose": CLI + ["diagnose", "--checkpoint", str(ckpt)],
        "to-hf": CLI + ["to-hf", "--checkpoint", str(ckpt), "--config", str(TINY_MODEL), "--out", str(out)],
    }
    rows = []
    for name, cmd in commands.items():
        above = fresh(cmd).cpu - torch_cpu
        detail = f"CPU s above import torch ({torch_cpu:.2f} CPU s), embedded tiny model"
        rows.append(Row(f"start-up above import torch vs 1.0 s: {name}", detail, above, 1.0, " s"))
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def page_cost_line(work: Path, size: str) -> str:
    """What writing new file data costs here: after the pause every timed command gets, and again at once into
    the pages the delete just freed (the cost a command pays when it follows another without a pause)."""
    mb = 64 if size == "tiny" else 1024
    out = subprocess.run(
        [sys.executable, "-c", PAGE_COST, str(work / "page-cost"), str(mb), str(SETTLE_S)],
        check=True,
        capture_output=True,
        text=True,
    )
    settled, again = (float(v) for v in out.stdout.split())
    return (
        f"machine: writing {mb} MB of new file data took {settled:.2f} CPU s {SETTLE_S:g} s after the last command, "
        f"{again:.2f} CPU s at once after a delete (x{settled / max(again, 1e-9):.1f}): the first is what every "
        "timed command above started from"
    )


def device_section(work: Path, size: str) -> list[str]:
    """The device, the guard's fingerprint of a 7B MLP matrix on each device, and the reference forward with
    ``--reference-device`` cpu and (when present) cuda."""
    out = subprocess.run([sys.executable, "-c", DEVICES], check=True, capture_output=True, text=True)
    fields = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines() if not line.startswith("guard"))
    guard = {line.split()[1]: float(line.split()[2]) for line in out.stdout.splitlines() if line.startswith("guard")}
    cuda = fields["cuda"] != "absent"
    lines = [f"device: cpu ({fields['cpu']}), cuda {'present: ' + fields['cuda'] if cuda else 'absent'}"]
    lines.append(
        "  guard, fingerprint of one 4096x11008 matrix at bf16: "
        + ", ".join(f"{d} {s * 1e3:.0f} ms" for d, s in guard.items())
        + ("" if cuda else " (cuda absent: torch.cuda.is_available() is False)")
    )
    ref = {}
    for device in ["cpu"] + (["cuda"] if cuda else []):
        run = fresh(
            CLI
            + [
                "reference",
                "--model",
                str(TINY_MODEL),
                "--out",
                str(work / f"ref-{device}.json"),
                "--reference-device",
                device,
            ]
        )
        ref[device] = run
    lines.append(
        "  reference forward (flame-ext reference, embedded tiny model): "
        + ", ".join(f"{d} {r.wall:.1f} s wall, {r.rss_mb:.0f} MB" for d, r in ref.items())
        + ("" if cuda else "; --reference-device cuda: not measured, cuda absent")
    )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="4", help="tiny, a size in GB (default 4), or 7b")
    p.add_argument("--workdir", help="where the generated files go (default: a temporary folder; deleted)")
    p.add_argument(
        "--settle", type=float, help="seconds of pause before each timed command (default 5; 0 with --size tiny)"
    )
    args = p.parse_args()
    global SETTLE_S
    SETTLE_S = args.settle if args.settle is not None else 0.0 if args.size == "tiny" else 5.0
    if args.size not in SIZES:
        try:
            float(args.size)
        except ValueError:
            p.error(f"--size {args.size!r}: tiny, a number of GB, or 7b")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-limits-"))
    work.mkdir(parents=True, exist_ok=True)
    cold = args.size != "tiny" and can_drop_caches()
    shape = "OLMo-2-1124-7B shape" if args.size == "7b" else f"{args.size} GB" if args.size != "tiny" else "tiny"
    print(
        f"limits, every row at {shape} (bf16), python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}; ratio = figure / limit, <= 1.00x met",
        flush=True,
    )
    try:
        rows = conversion_rows(work, args.size, cold)
        rows.append(loss_row(work, args.size))
        rows.append(fingerprint_row(args.size))
        rows += startup_rows(work)
        for row in rows:
            print(row.line(), flush=True)
        for line in device_section(work, args.size):
            print(line, flush=True)
        print(page_cost_line(work, args.size), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
