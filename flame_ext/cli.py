"""flame-ext: convert Hugging Face checkpoints to DCP and back, and check that they arrived intact.

Every command exits 0 on success, 2 on bad usage or unreadable input (one line naming the input and the
problem; ``--debug`` shows the traceback), and 1 when it ran but the result is not good (``diagnose``
found problems, a write failed).
"""

from __future__ import annotations

import argparse
import atexit
import io
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from flame_ext import __version__
from flame_ext.command_options import (
    ConvertOptions,
    DemoOptions,
    DiagnoseOptions,
    PatchOptions,
    ReferenceOptions,
    ToHFOptions,
)
from flame_ext.declaration import add_arguments, from_namespace
from flame_ext.errors import UsageError
from flame_ext.process import collector_paused, command_is_the_process, run_guarded

if TYPE_CHECKING:  # the commands import torch: only when one runs
    from flame_ext.convert.summary import Summary

EPILOG = """examples:
  flame-ext convert --model allenai/OLMo-2-1124-7B --checkpoint exp/olmo2/checkpoint/step-0 --dtype bfloat16
  flame-ext diagnose --checkpoint exp/olmo2/checkpoint/step-0 --model allenai/OLMo-2-1124-7B --loss
  flame-ext to-hf --checkpoint exp/olmo2/checkpoint/step-1000 --config allenai/OLMo-2-1124-7B --out olmo2-cpt
  flame-ext demo
"""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the option and what is wrong (``--help`` shows usage).

    argparse's own ``error`` prints the whole usage, then the message; a user who typed ``--threshold abc``
    needs only: "--threshold: 'abc' is not a number". The error becomes a ``UsageError``, so it is printed
    (and, with ``--json``, reported as JSON) by the same code as every other bad input: exit 2.
    """

    _REWRITES = (
        (re.compile(r"argument (\S+?)(?:/\S+)?: invalid float value: (.*)"), r"\1: \2 is not a number"),
        (re.compile(r"argument (\S+?)(?:/\S+)?: invalid int value: (.*)"), r"\1: \2 is not a whole number"),
        (
            re.compile(r"argument (\S+?)(?:/\S+)?: invalid choice: (.*) \(choose from (.*)\)"),
            lambda m: f"{m[1]} {m[2]}: choose one of {m[3].replace(chr(39), '')}",
        ),
        (re.compile(r"argument (\S+?)(?:/\S+)?: (.*)"), r"\1: \2"),
        (re.compile(r"the following arguments are required: (.*)"), r"\1: required"),
    )

    def error(self, message: str) -> NoReturn:
        for pattern, repl in self._REWRITES:
            if pattern.fullmatch(message):
                message = pattern.sub(repl, message)
                break
        raise UsageError(message, prog=self.prog)


def _one_process_or_ranks(
    one_process: Callable[[Any], Summary],
    ranks: Callable[[Any, float], tuple[Summary, int, int]],
    opts: ConvertOptions | ToHFOptions,
    share: str,
) -> Summary | None:
    """Run in one process, or as a rank under torchrun; the summary to print, its notes and warnings printed.

    Rank 0 returns the output's summary; another rank prints one line for ``share`` (what it wrote) and returns None.
    """
    from flame_ext.collectives import launched_by_torchrun
    from flame_ext.convert.summary import command_seconds

    if launched_by_torchrun():
        summary, rank, world = ranks(opts, opts.timeout_s)
        summary.seconds = command_seconds()  # the command's wall time, start-up and imports included
        if rank != 0:
            print(f"rank {rank} of {world}, {share}: {summary.line()}")
            return None
    else:
        summary = one_process(opts)
        summary.seconds = command_seconds()
    for note in summary.notes:
        print(f"note: {note}")
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return summary


# The torchrun forms are imported only under torchrun: ``convert.distributed`` imports both directions.
def _convert_ranks(opts: ConvertOptions, timeout_s: float) -> tuple[Summary, int, int]:
    from flame_ext.convert.distributed import convert_distributed

    return convert_distributed(opts, timeout_s)


def _to_hf_ranks(opts: ToHFOptions, timeout_s: float) -> tuple[Summary, int, int]:
    from flame_ext.convert.distributed import to_hf_distributed

    return to_hf_distributed(opts, timeout_s)


def run_convert(opts: ConvertOptions) -> int:
    """Convert, then print the notes, the reference loss and the summary line."""
    with collector_paused():  # resumed once the plan is made (process.collector_paused)
        from flame_ext.convert.hf_to_dcp import convert_hf_to_dcp

        summary = _one_process_or_ranks(convert_hf_to_dcp, _convert_ranks, opts, "its share")
    if summary is None:
        return 0
    ref = (summary.manifest or {}).get("reference")
    if ref:
        shape = f"{len(ref['token_ids'])}x{ref['seq_len']}"
        print(
            f"HF reference loss {ref['loss_mean']:.4f} nats on {shape} tokens "
            f"({ref['dtype']}, {ref['attn_implementation']})"
        )
    print(summary.line())
    return 0


def run_to_hf(opts: ToHFOptions) -> int:
    """Convert back to HF, then print the notes and the summary line."""
    with collector_paused():  # resumed once the plan is made (process.collector_paused)
        from flame_ext.convert.dcp_to_hf import convert_dcp_to_hf

        summary = _one_process_or_ranks(convert_dcp_to_hf, _to_hf_ranks, opts, "its shards")
    if summary is not None:
        print(summary.line())
    return 0


def run_reference(opts: ReferenceOptions) -> int:
    from flame_ext.commands.reference import write_reference

    ref = write_reference(opts)
    print(f"HF reference loss {ref['loss_mean']:.4f} nats ({ref['dtype']}); wrote {opts.out}")
    return 0


def run_diagnose(opts: DiagnoseOptions) -> int:
    """Diagnose and print the report; 0 when it holds no error, 1 otherwise."""
    with collector_paused():  # resumed once the metadata pass is done (process.collector_paused)
        from flame_ext.commands.diagnose import run

        return run(opts)


def run_demo(opts: DemoOptions) -> int:
    from flame_ext.commands.demo import run

    return run(opts)


def run_patch(opts: PatchOptions) -> int:
    from flame_ext.flame.patching import run

    return run(opts)


@dataclass(frozen=True)
class Command:
    """One ``flame-ext`` command: its options' declaration, what runs it, and its help."""

    name: str
    options: type
    run: Callable[[Any], int]
    help: str
    description: str


COMMANDS = (
    Command(
        "convert",
        ConvertOptions,
        run_convert,
        "HF checkpoint -> DCP, streaming, with a reference loss in flame_ext.json",
        "Convert an HF checkpoint to DCP by streaming tensors from the safetensors files: the model is never "
        "built for its weights, and memory stays near the buffer size whatever the model size. The reference "
        "step (skip it with --no-reference) runs the HF model on the reference batch at the checkpoint's dtype, "
        "one block of weights (the embedding or a decoder layer) read from the files at a time.",
    ),
    Command(
        "to-hf",
        ToHFOptions,
        run_to_hf,
        "DCP checkpoint -> HF folder (safetensors shards, config, tokenizer)",
        "Convert a DCP checkpoint (flat or nested, model-only or a full training checkpoint) back to an HF model "
        "folder: the tensors streamed into safetensors shards, with the config and tokenizer files of --config. "
        "The output appears only when complete. Under torchrun the ranks share the shards (docs/distributed.md).",
    ),
    Command(
        "reference",
        ReferenceOptions,
        run_reference,
        "write only the reference part of the manifest (for checkpoints converted elsewhere, or HF loads)",
        "Runs the HF model (at its own dtype unless --dtype) on the reference batch, one block of weights at a "
        "time, and records its loss and the fingerprints of the tensors as that dtype stores them.",
    ),
    Command(
        "diagnose",
        DiagnoseOptions,
        run_diagnose,
        "compare a DCP checkpoint with its HF source: every problem, with its cause",
        "Always: keys, shapes, dtypes, key layout, manifest and data-file sizes from metadata (no tensor data "
        "read), and the tokenizer against the embedding. --values checks every tensor's values: without --model "
        "against the fingerprints the manifest recorded (only the checkpoint is read), with --model against the HF "
        "source, streamed; --loss loads the checkpoint as trainers do (meta -> to_empty -> "
        "torch.distributed.checkpoint) and compares its loss on the reference batch with the HF model's. Exit 0: no "
        "errors (warnings allowed); 1: errors found; 2: unreadable input.",
    ),
    Command(
        "demo",
        DemoOptions,
        run_demo,
        "the whole workflow on the embedded tiny model, under a minute on a CPU",
        "convert -> diagnose -> start training twice the way flame does: with the RoPE buffer left as to_empty() "
        "left it the guard stops the run before step 1 and says why; with the repair on, the step-0 loss matches "
        "the HF reference and a few training steps run. Single process, CPU. Exit 0 when both runs behave so.",
    ),
    Command(
        "patch",
        PatchOptions,
        run_patch,
        "apply, check or revert flame-ext's patches to a flame checkout",
        "flame's train.py builds the validating CheckpointManager and the JobConfig with the guard options; "
        "flame/utils/convert_*.py run flame-ext's converters. The patches are made against fla-org/flame "
        "e11e7be; each file is checked against it (or its patched form) before anything is written. "
        "Exit 0: done, or nothing to do; check: 1 when a patch does not apply; 2: not a flame checkout, or "
        "apply/revert refused (local edits or another flame version: nothing is changed).",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="flame-ext", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"flame-ext {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        add_arguments(p, command.options)
        p.set_defaults(run=command.run, options=command.options)
    return parser


def parse(argv: Sequence[str]) -> tuple[Callable[[Any], int], Any]:
    """``flame-ext ARGV``: the command to run and its options object (checked: a bad value raises here)."""
    parsed = build_parser().parse_args(list(argv))
    return parsed.run, from_namespace(parsed.options, parsed)


def drop_in_parser(prog: str, doc: str | None) -> OneLineParser:
    """The parser of one of flame's drop-in scripts (``python -m flame_ext.convert_hf_to_dcp``)."""
    p = OneLineParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def quiet_progress_bars() -> None:
    """transformers' and huggingface_hub's own progress bars stay off when stderr is not a terminal (a log
    file, a CI job): there they are only noise, one line per update."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by both libraries at import
    if "transformers" in sys.modules:  # already imported (a host, a test): tell it directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def run_command(
    parse: Callable[[list[str]], Any],
    run: Callable[[Any], int],
    argv: Sequence[str] | None,
    prog: str,
) -> int:
    """Parse and run one command line under ``run_guarded`` (so a usage error is one line too, and JSON with
    ``--json``): the one way ``flame-ext`` and the drop-in modules start."""
    quiet_progress_bars()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("FLAME_EXT_DEBUG"))
    return run_guarded(lambda a: run(parse(a)), argv, debug=debug, prog=prog, json_errors="--json" in argv)


def main(argv: Sequence[str] | None = None) -> int:
    def parse_and_run(args: list[str]) -> int:
        run, opts = parse(args)
        return run(opts)

    return run_command(lambda args: args, parse_and_run, argv, "flame-ext")


def exit_without_teardown(command: Callable[[], int]) -> NoReturn:
    """Run a command that is the whole process and exit with its code, skipping the interpreter's teardown.

    Clearing the modules torch, torch.distributed.checkpoint and transformers load takes about 1 s of CPU and
    changes nothing on disk: every output is written, synced and renamed before a command returns. The exit
    is otherwise the usual one: non-daemon threads are joined and every exit handler the command's imports
    register runs (this one is registered before the command starts, so it runs after them; call this at the
    start of a process), then the standard streams are flushed. A command that raises ends the usual way
    (traceback, exit 1 or the signal).
    """
    from flame_ext.collectives import launched_by_torchrun

    if launched_by_torchrun():
        _one_write_per_line()
    command_is_the_process()
    returned: list[int] = []
    atexit.register(_end_process, returned)
    returned.append(command())
    sys.exit(returned[0])


def _one_write_per_line() -> None:
    """The ranks share one stdout and stderr. Unbuffered (``python -u``, ``PYTHONUNBUFFERED``), ``print`` writes
    a line's text and its newline apart, and two ranks' lines run together into one; line buffering writes each
    line whole, and a pipe keeps a write of under 4 KB whole."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True, write_through=False)


def _end_process(returned: list[int]) -> None:
    if not returned:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: leave it to the interpreter's own exit to report
        return
    os._exit(returned[0])


def console_main() -> NoReturn:
    """``flame-ext`` as a command (the console script, ``python -m flame_ext.cli``)."""
    exit_without_teardown(main)


if __name__ == "__main__":
    console_main()
