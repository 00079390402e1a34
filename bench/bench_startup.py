"""Start-up: what a flame-ext command costs before (and besides) its work, warm cache, in fresh processes.

    python bench/bench_startup.py [--repeat 7] [--base /path/to/other/checkout] [--top 25]

Every row is a fresh interpreter (``sys.executable``, ``PYTHONPATH`` set to the tree being measured), run
--repeat times after one untimed warm-up round, rows interleaved so that load from other work on the machine
falls on every row alike. It prints the median wall seconds (and the fastest run), its median CPU seconds (user +
system, from ``os.wait4``: steadier than wall when other work loads the machine), and each median minus the
same median of ``import torch``:

  import torch              the baseline every command pays
  floor                     torch + torch.distributed.checkpoint + transformers' model class built on ``meta``
                            from the tiny model's config: the imports ``convert`` and ``diagnose`` need at least
  --help                    ``flame-ext --help``
  usage error               ``flame-ext convert`` without its required options (exit 2)
  convert --no-reference    the embedded tiny model (flame_ext/assets/tiny-olmo2) to a temporary folder
  convert                   the same with the default reference loss
  diagnose                  the default conversion's output against the tiny model
  to-hf                     that output back to an HF folder
  --model folder missing    ``convert`` with a --model folder that does not exist (exit 2): refused before
                            torch is imported
  first byte written        process start -> the first DCP data file opened for writing, in
                            ``convert --no-reference``: every import and the whole plan (config, headers,
                            model on ``meta``, key mapping) lie before it

With ``--base`` every row also runs against the other checkout (e.g. ``git worktree add ../base main``), in the
same rounds, so a change is compared under the same load.

Then ``python -X importtime`` of ``convert --no-reference`` (this tree): the imports the command started
itself, largest first, and for the heavy modules the chain of imports that first pulled each one in.
importtime's own bookkeeping makes its figures ~10-20% larger than plain imports.

The bench process itself never imports torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_IN_TREE = Path("flame_ext") / "assets" / "tiny-olmo2"

FLOOR = """
import sys, torch, torch.distributed.checkpoint
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    AutoModelForCausalLM.from_config(config)
"""

# An audit hook sees every file the command opens; the first ``.distcp`` opened for writing is the moment
# the conversion starts writing data. It prints the wall-clock time and the process's CPU time at that moment
# after the command exits.
FIRST_WRITE = """
import os, sys, time
first = []
def writing(mode, flags):  # open(): a mode string; os.open(): flags (the data files are opened with O_DIRECT)
    return "w" in str(mode or "") or bool(isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
def hook(event, args):
    if event == "open" and not first and str(args[0]).endswith(".distcp") and writing(args[1], args[2]):
        first.extend((time.time(), time.process_time()))
sys.addaudithook(hook)
from flame_ext.cli import main
code = main(sys.argv[1:])
print("FIRST_WRITE", *(first or ["none"]))
sys.exit(code)
"""

# Heavy modules whose import chain the importtime table shows.
WATCH = (
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.tensor",
    "torch._dynamo",
    "transformers",
    "transformers.modeling_utils",
    "transformers.masking_utils",
    "tokenizers",
    "safetensors",
    "matplotlib",
    "jsonschema",
)


@dataclass
class Case:
    name: str
    argv: list[str]  # after the interpreter; {model}, {out} and {tree} are filled in per run
    exit_code: int = 0
    first_write: bool = False
    fresh_out: bool = True  # remove {out} before each run


CASES = [
    Case("import torch", ["-c", "import torch"]),
    Case("floor: torch + DCP + HF model on meta", ["-c", FLOOR, "{model}"]),
    Case("flame-ext --help", ["-m", "flame_ext.cli", "--help"]),
    Case("flame-ext convert (usage error)", ["-m", "flame_ext.cli", "convert"], exit_code=2),
    Case(
        "convert --no-reference",
        ["-m", "flame_ext.cli", "convert", "--model", "{model}", "--checkpoint", "{out}", "--no-reference"],
    ),
    Case("convert (default)", ["-m", "flame_ext.cli", "convert", "--model", "{model}", "--checkpoint", "{out}"]),
    Case(
        "diagnose",
        ["-m", "flame_ext.cli", "diagnose", "--model", "{model}", "--checkpoint", "{converted}"],
        fresh_out=False,
    ),
    Case(
        "to-hf",
        ["-m", "flame_ext.cli", "to-hf", "--checkpoint", "{converted}", "--config", "{model}", "--out", "{out}"],
    ),
    Case(
        "convert, --model folder missing (exit 2)",
        ["-m", "flame_ext.cli", "convert", "--model", "{missing}", "--checkpoint", "{out}"],
        exit_code=2,
    ),
    Case(
        "first byte written (convert --no-reference)",
        ["-c", FIRST_WRITE, "convert", "--model", "{model}", "--checkpoint", "{out}", "--no-reference"],
        first_write=True,
    ),
]


def environment(tree: Path) -> dict[str, str]:
    """The child's environment: the tree on ``PYTHONPATH``, no hub access (the model is a local folder)."""
    return {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}


def run_once(case: Case, tree: Path, work: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) from spawn to exit, or to the first data write; raises when the
    command fails."""
    dest = work / "out"
    if case.fresh_out and dest.exists():
        shutil.rmtree(dest)
    fill = {
        "model": str(tree / MODEL_IN_TREE),
        "out": str(dest),
        "converted": str(work / "converted"),
        "missing": str(work / "no-such-model"),
        "tree": str(tree),
    }
    argv = [sys.executable, *(a.format(**fill) if a.startswith("{") else a for a in case.argv)]
    with open(work / "stdout", "w+b") as stdout, open(work / "stderr", "w+b") as stderr:
        start = time.time()
        proc = subprocess.Popen(argv, env=environment(tree), cwd=work, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own CPU time, not any other process's
        wall = time.time() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        out, err = stdout.read().decode(), stderr.read().decode()
    if proc.returncode != case.exit_code:
        raise SystemExit(f"{case.name} ({tree}): exit {proc.returncode}, expected {case.exit_code}\n{err}")
    if not case.first_write:
        return wall, usage.ru_utime + usage.ru_stime
    stamp = out.rsplit("FIRST_WRITE", 1)[-1].split()
    if stamp[0] == "none":
        raise SystemExit(f"{case.name} ({tree}): no .distcp file was opened for writing")
    return float(stamp[0]) - start, float(stamp[1])


def convert_argv(tree: Path, dest: Path, *extra: str) -> list[str]:
    """``flame-ext convert`` of the tree's tiny model to ``dest``; ``extra`` before ``-m`` are interpreter options."""
    return [
        sys.executable,
        *extra,
        "-m",
        "flame_ext.cli",
        "convert",
        "--model",
        str(tree / MODEL_IN_TREE),
        "--checkpoint",
        str(dest),
    ]


def prepare(tree: Path, work: Path) -> None:
    """The converted checkpoint ``diagnose`` reads (made once per tree, by that tree)."""
    argv = convert_argv(tree, work / "converted")
    subprocess.run(argv, env=environment(tree), cwd=work, check=True, capture_output=True)


def measure(trees: list[Path], repeat: int) -> dict[tuple[str, Path], list[tuple[float, float]]]:
    """Every case on every tree, ``repeat`` rounds after a warm-up round; rounds interleave cases and trees."""
    times: dict[tuple[str, Path], list[tuple[float, float]]] = {}
    works = {tree: Path(tempfile.mkdtemp(prefix="bench_startup_")) for tree in trees}
    try:
        for tree in trees:
            prepare(tree, works[tree])
        for round_ in range(repeat + 1):
            for case in CASES:
                for tree in trees:
                    t = run_once(case, tree, works[tree])
                    if round_:  # round 0 warms the page cache and the interpreter's .pyc files
                        times.setdefault((case.name, tree), []).append(t)
            print(f"round {round_}/{repeat} done", file=sys.stderr)
    finally:
        for work in works.values():
            shutil.rmtree(work, ignore_errors=True)
    return times


def print_table(times: dict[tuple[str, Path], list[tuple[float, float]]], trees: list[Path], repeat: int) -> None:
    """Per row and tree: median wall (fastest), median CPU, each also minus the same median of ``import torch``."""
    print(
        f"\nwarm cache, fresh processes, median of {repeat} runs, seconds: wall (fastest run), CPU (user + system); "
        "'+' = above the same median of `import torch`"
    )
    print(f"{'':44s}" + "".join(f"{label(tree, trees):^34s}" for tree in trees))
    print(f"{'':44s}" + f"{'wall':>8s}{'':7s}{'+':>5s}{'CPU':>8s}{'+':>6s}" * len(trees))
    torch_median = {tree: medians(times[("import torch", tree)]) for tree in trees}
    for case in CASES:
        row = f"{case.name:44s}"
        for tree in trees:
            runs = times[(case.name, tree)]
            wall, cpu = medians(runs)
            fastest = min(w for w, _ in runs)
            base_wall, base_cpu = torch_median[tree]
            above = ("", "") if case.name == "import torch" else (f"{wall - base_wall:+.2f}", f"{cpu - base_cpu:+.2f}")
            row += f"{wall:8.2f} ({fastest:4.2f}){above[0]:>6s}{cpu:8.2f}{above[1]:>6s}"
        print(row)


def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def label(tree: Path, trees: list[Path]) -> str:
    return "this tree" if tree == trees[0] else f"base {tree.name}"


@dataclass
class Imported:
    name: str
    depth: int
    cumulative_us: int
    parent: Imported | None = None


def parse_importtime(text: str) -> list[Imported]:
    """``-X importtime`` lines as modules with their importer (the lines come children first, parent after)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append(Imported(name.strip(), depth, int(cumulative)))
    pending: dict[int, list[Imported]] = {}  # children seen, waiting for their parent's line
    for mod in rows:
        for child in pending.pop(mod.depth + 1, []):
            child.parent = mod
        pending.setdefault(mod.depth, []).append(mod)
    return rows


def chain(mod: Imported) -> str:
    names = []
    node: Imported | None = mod
    while node is not None:
        names.append(node.name)
        node = node.parent
    return " <- ".join(names)


def importtime_table(tree: Path, top: int) -> None:
    """Where ``convert --no-reference`` spends its import time, from one ``-X importtime`` run."""
    work = Path(tempfile.mkdtemp(prefix="bench_startup_imports_"))
    try:
        argv = [*convert_argv(tree, work / "out", "-X", "importtime"), "--no-reference"]
        proc = subprocess.run(argv, env=environment(tree), cwd=work, capture_output=True, text=True, check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = parse_importtime(proc.stderr)
    total = sum(m.cumulative_us for m in rows if m.depth == 0)
    print(
        f"\n`python -X importtime -m flame_ext.cli convert --no-reference` ({label(tree, [tree])}): "
        f"{total / 1e6:.2f} s of imports in all"
    )
    print("imports the command started itself (top level), largest first:")
    for m in sorted((m for m in rows if m.depth == 0), key=lambda m: -m.cumulative_us)[:top]:
        print(f"  {m.cumulative_us / 1e6:6.3f} s  {m.name}")
    print("heavy modules, cumulative, and who first imported each:")
    by_name = {m.name: m for m in rows}
    for name in WATCH:
        m = by_name.get(name)
        print(f"  {m.cumulative_us / 1e6:6.3f} s  {chain(m)}" if m else f"      -    {name} (not imported)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs of each row (default 7)")
    parser.add_argument("--base", type=Path, help="another checkout of flame-ext to run beside this one")
    parser.add_argument("--top", type=int, default=15, help="rows of the importtime table (default 15)")
    parser.add_argument("--no-importtime", action="store_true", help="skip the importtime table")
    args = parser.parse_args()
    trees = [REPO] + ([args.base.resolve()] if args.base else [])
    versions = subprocess.run(
        [sys.executable, "-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        env=environment(REPO),
    ).stdout.split()
    print(
        f"python {sys.version.split()[0]}, torch {versions[0]}, transformers {versions[1]}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start"
    )
    times = measure(trees, args.repeat)
    print_table(times, trees, args.repeat)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if not args.no_importtime:
        importtime_table(REPO, args.top)


if __name__ == "__main__":
    main()
