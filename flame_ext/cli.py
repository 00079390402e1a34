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
from typing import TYPE_CHECKING, Any, NoReturn

from flame_ext import __version__
from flame_ext.errors import InputError, UsageError
from flame_ext.process import run_guarded

if TYPE_CHECKING:  # the commands import torch: only when one runs
    from flame_ext.commands.diagnose import DiagnoseOptions
    from flame_ext.convert.dcp_to_hf import ToHFOptions
    from flame_ext.convert.hf_to_dcp import ConvertOptions
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
        (re.compile(r"argument (\S+?)(?:/\S+)?: (.*)"), r"\1: \2"),
        (re.compile(r"the following arguments are required: (.*)"), r"\1: required"),
    )

    def error(self, message: str) -> NoReturn:
        for pattern, repl in self._REWRITES:
            if pattern.fullmatch(message):
                message = pattern.sub(repl, message)
                break
        raise UsageError(message, prog=self.prog)


_ROWS_HELP = "rows of the reference batch, cut from consecutive stretches of the text (default 2)"
_DEVICE_HELP = "cpu, cuda or auto (default: cuda when torch sees a GPU): where the reference forward runs"


def _flag(name: str, flame: bool) -> list[str]:
    """``--trust-remote-code``; in a flame drop-in, flame's ``--trust_remote_code`` first, both accepted."""
    underscored = "--" + name[2:].replace("-", "_")
    return [underscored, name] if flame and underscored != name else [name]


def add_convert_arguments(p: argparse.ArgumentParser, *, flame: bool = False) -> None:
    """The arguments of ``convert`` (``flame``: as flame's convert_hf_to_dcp.py names them, --model required)."""
    p.add_argument("--model", help="HF model folder or hub id (required; `flame-ext demo` shows the embedded model)")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="output DCP folder (written atomically): absent, an empty folder, or with --force a DCP checkpoint",
    )
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's own), bfloat16 or float32")
    p.add_argument(
        "--layout",
        default="flat",
        help="flat (HF names, torchtitan model-only load, default), nested (model.-prefixed), or torchtitan:<module> "
        "(torchtitan's own model and key names, e.g. torchtitan:llama3; with --titan-config)",
    )
    p.add_argument(
        "--titan-config",
        help="with --layout torchtitan:<module>: the config function the run passes as torchtitan's --config "
        "(e.g. llama3_8b); it chooses the model (flavor) whose adapter maps the keys",
    )
    p.add_argument(
        "--allow-config-mismatch",
        action="append",
        default=[],
        metavar="FIELD",
        help="with --layout torchtitan:<module>: a config field (HF name, e.g. rope_theta) on which the torchtitan "
        "config may differ from the HF config, deliberately: a warning instead of a refusal (repeatable)",
    )
    p.add_argument(*_flag("--reference-text", flame), help="text file for the reference batch (default: bundled prose)")
    p.add_argument(
        *_flag("--reference-seq-len", flame), type=int, default=512, help="tokens per reference row (default 512)"
    )
    p.add_argument(*_flag("--reference-rows", flame), type=int, default=2, help=_ROWS_HELP)
    p.add_argument(*_flag("--no-reference", flame), action="store_true", help="skip the HF reference loss")
    p.add_argument(*_flag("--reference-device", flame), default="auto", help=_DEVICE_HELP)
    p.add_argument(*_flag("--trust-remote-code", flame), action="store_true", help="allow the model's own code to run")
    p.add_argument(
        *_flag("--include-future-predictor", flame), action="store_true", help="add a freshly initialised future head"
    )
    p.add_argument(*_flag("--future-predictor-head-type", flame), default="linear", choices=["linear", "mlp"])
    p.add_argument(
        *_flag("--buffer-mb", flame), type=int, default=256, help="memory for tensor data in flight, MiB (default 256)"
    )
    p.add_argument(
        *_flag("--record-sha256", flame),
        action="store_true",
        help="record a SHA-256 of every file written in flame_ext.json, for `diagnose --files` (costs a read-back)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing DCP checkpoint (never anything else: refused, exit 2)"
    )
    _add_timeout(p, flame)


def _add_timeout(p: argparse.ArgumentParser, flame: bool) -> None:
    p.add_argument(
        *_flag("--timeout-s", flame),
        type=float,
        default=300.0,
        help="under torchrun: seconds a rank waits for the others before giving up (default 300)",
    )


def convert_options(args: argparse.Namespace) -> ConvertOptions:
    """Parsed ``convert`` arguments (the CLI's or the drop-in's) as the converter's options."""
    from flame_ext.convert.hf_to_dcp import ConvertOptions

    if not args.model:
        raise InputError("--model is required; `flame-ext demo` shows the embedded model")
    return ConvertOptions(
        model=args.model,
        checkpoint=args.checkpoint,
        dtype=args.dtype,
        layout=args.layout,
        titan_config=getattr(args, "titan_config", None),
        allow_config_mismatch=tuple(getattr(args, "allow_config_mismatch", None) or ()),
        reference_text=args.reference_text,
        reference_seq_len=args.reference_seq_len,
        reference_rows=args.reference_rows,
        reference=not args.no_reference,
        reference_device=args.reference_device,
        trust_remote_code=args.trust_remote_code,
        future_predictor=args.future_predictor_head_type if args.include_future_predictor else None,
        force=args.force,
        buffer_bytes=args.buffer_mb * 1024 * 1024,
        progress=sys.stderr.isatty(),
        record_sha256=args.record_sha256,
    )


def _one_process_or_ranks(
    one_process: Callable[[Any], Summary],
    ranks: Callable[[Any, float], tuple[Summary, int, int]],
    opts: Any,
    args: argparse.Namespace,
    share: str,
) -> Summary | None:
    """Run in one process, or as a rank under torchrun; the summary to print, its notes and warnings printed.

    Rank 0 returns the output's summary; another rank prints one line for ``share`` (what it wrote) and returns None.
    """
    from flame_ext.collectives import launched_by_torchrun
    from flame_ext.convert.summary import command_seconds

    if launched_by_torchrun():
        summary, rank, world = ranks(opts, args.timeout_s)
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


def run_convert(args: argparse.Namespace) -> int:
    """Convert, then print the notes, the reference loss and the summary line."""
    from flame_ext.convert.distributed import convert_distributed
    from flame_ext.convert.hf_to_dcp import convert_hf_to_dcp

    summary = _one_process_or_ranks(convert_hf_to_dcp, convert_distributed, convert_options(args), args, "its share")
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


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="HF checkpoint -> DCP, streaming, with a reference loss in flame_ext.json",
        description=(
            "Convert an HF checkpoint to DCP by streaming tensors from the safetensors files: the model is never "
            "built for its weights, and memory stays near the buffer size whatever the model size. The reference "
            "step (skip it with --no-reference) runs the HF model on the reference batch at the checkpoint's dtype, "
            "one block of weights (the embedding or a decoder layer) read from the files at a time."
        ),
    )
    add_convert_arguments(p)
    p.set_defaults(run=run_convert)


def add_to_hf_arguments(p: argparse.ArgumentParser, *, flame: bool = False) -> None:
    """The arguments of ``to-hf`` besides where it reads and writes (the CLI and flame's drop-in name those apart)."""
    p.add_argument(
        "--config",
        required=True,
        help="HF model folder or hub id (or a folder with config.json) the checkpoint was made for",
    )
    p.add_argument("--tokenizer", help="local folder to copy tokenizer files from (default: --config)")
    p.add_argument(
        "--layout",
        help="torchtitan:<module> for a checkpoint in torchtitan's own key names (a torchtitan run's step-N), with "
        "--titan-config; read from flame_ext.json when a native conversion recorded it",
    )
    p.add_argument("--titan-config", help="with --layout torchtitan:<module>: the run's config function (--config)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's own), bfloat16 or float32")
    p.add_argument(
        *_flag("--max-shard-mb", flame),
        type=float,
        default=5 * 1024,
        help="largest safetensors shard, MiB (default 5120); under torchrun each rank writes whole shards",
    )
    p.add_argument(*_flag("--trust-remote-code", flame), action="store_true")
    p.add_argument(
        *_flag("--buffer-mb", flame), type=int, default=256, help="rows of a tensor read at once, MiB (default 256)"
    )
    p.add_argument(
        "--force", action="store_true", help="replace an HF folder written by to-hf (never anything else: exit 2)"
    )
    _add_timeout(p, flame)


def to_hf_options(args: argparse.Namespace) -> ToHFOptions:
    """Parsed ``to-hf`` arguments (``args.checkpoint`` and ``args.out`` set) as the converter's options."""
    from flame_ext.convert.dcp_to_hf import ToHFOptions

    return ToHFOptions(
        checkpoint=args.checkpoint,
        config=args.config,
        out=args.out,
        dtype=args.dtype,
        force=args.force,
        tokenizer=args.tokenizer,
        trust_remote_code=args.trust_remote_code,
        max_shard_bytes=int(args.max_shard_mb * 1024 * 1024),
        buffer_bytes=args.buffer_mb * 1024 * 1024,
        progress=sys.stderr.isatty(),
        layout=getattr(args, "layout", None),
        titan_config=getattr(args, "titan_config", None),
    )


def run_to_hf(args: argparse.Namespace) -> int:
    """Convert back to HF, then print the notes and the summary line."""
    from flame_ext.convert.dcp_to_hf import convert_dcp_to_hf
    from flame_ext.convert.distributed import to_hf_distributed

    summary = _one_process_or_ranks(convert_dcp_to_hf, to_hf_distributed, to_hf_options(args), args, "its shards")
    if summary is not None:
        print(summary.line())
    return 0


def _add_to_hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("to-hf", help="DCP checkpoint -> HF folder (safetensors shards, config, tokenizer)")
    p.add_argument(
        "--checkpoint", required=True, help="DCP folder: flat or nested, model-only or full training checkpoint"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output HF folder (written atomically; must be absent, an empty folder, or with --force an HF folder)",
    )
    add_to_hf_arguments(p)
    p.set_defaults(run=run_to_hf)


def _add_reference(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reference",
        help="write only the reference part of the manifest (for checkpoints converted elsewhere, or HF loads)",
        description=(
            "Runs the HF model (at its own dtype unless --dtype) on the reference batch, one block of weights at a "
            "time, and records its loss and the fingerprints of the tensors as that dtype stores them."
        ),
    )
    p.add_argument("--model", required=True, help="HF model folder or hub id")
    p.add_argument("--out", required=True, help="output JSON file (checked before the model runs; written atomically)")
    p.add_argument("--reference-text")
    p.add_argument("--reference-seq-len", type=int, default=512)
    p.add_argument("--reference-rows", type=int, default=2, help=_ROWS_HELP)
    p.add_argument("--reference-device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--dtype", default="auto", help="auto, bfloat16 or float32: the dtype the model runs in")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--force", action="store_true", help="replace a reference file written by `flame-ext reference` (only that)"
    )
    p.set_defaults(run=_run_reference)


def _run_reference(args: argparse.Namespace) -> int:
    from flame_ext.commands.reference import write_reference

    ref = write_reference(args)
    print(f"HF reference loss {ref['loss_mean']:.4f} nats ({ref['dtype']}); wrote {args.out}")
    return 0


def add_diagnose_arguments(p: argparse.ArgumentParser, *, flame: bool = False) -> None:
    """The arguments of ``diagnose`` (``flame``: with flame-style underscored names, --model required)."""
    p.add_argument("--checkpoint", required=True, help="DCP folder (model-only or a full training checkpoint)")
    model_help = "HF model folder or hub id the checkpoint was made from"
    p.add_argument(
        "--model",
        required=flame,
        help=model_help + ("" if flame else " (default: the source recorded in the checkpoint's flame_ext.json)"),
    )
    p.add_argument(
        "--values",
        action="store_true",
        help="also check every tensor's values: against the manifest's fingerprints, or the HF source with --model",
    )
    p.add_argument(
        "--files",
        action="store_true",
        help="also check every file byte for byte against the SHA-256 recorded by `convert --record-sha256`",
    )
    p.add_argument(
        "--atol", type=float, default=0.0, help="--values against the HF source with |ckpt - hf| <= atol + rtol |hf|"
    )
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for --values (with --atol)")
    p.add_argument("--loss", action="store_true", help="also build the model as trainers do and compare the loss")
    p.add_argument("--threshold", type=float, default=0.1, help="loss gap that counts as an error, nats (default 0.1)")
    p.add_argument(
        *_flag("--token-threshold", flame),
        type=float,
        help="mean per-token loss gap (|observed - reference| over every token of the reference batch) that counts "
        "as an error, nats (default: the training guard's, checkpoint.initial_load_max_token_delta)",
    )
    p.add_argument(
        *_flag("--train-config", flame),
        help="model config the trainer builds from (file or folder; flame's --model.config) to compare with the HF one",
    )
    p.add_argument(
        "--tokenizer", help="tokenizer folder the trainer uses (flame's --model.tokenizer_path; default: the model's)"
    )
    p.add_argument(
        "--reference", help="reference file from `flame-ext reference` for --loss (default: the checkpoint's manifest)"
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="with --loss: draw the per-position loss of the HF reference and the checkpoint (needs flame-ext[plot])",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print the report as JSON (docs/report-format.md; errors at exit 2 too: {"ok": false, "error": ...})',
    )
    p.add_argument(*_flag("--trust-remote-code", flame), action="store_true")


def diagnose_options(args: argparse.Namespace) -> DiagnoseOptions:
    """Parsed ``diagnose`` arguments (the CLI's or the drop-in's) as the diagnosis options."""
    from flame_ext.commands.diagnose import DiagnoseOptions

    return DiagnoseOptions(
        checkpoint=args.checkpoint,
        model=args.model,
        values=args.values,
        files=args.files,
        loss=args.loss,
        threshold=args.threshold,
        token_threshold=args.token_threshold,
        train_config=args.train_config,
        tokenizer=args.tokenizer,
        reference=args.reference,
        trust_remote_code=args.trust_remote_code,
        atol=args.atol,
        rtol=args.rtol,
    )


def run_diagnose(args: argparse.Namespace) -> int:
    """Diagnose and print the report; 0 when it holds no error, 1 otherwise."""
    from flame_ext.commands.diagnose import run

    return run(diagnose_options(args), as_json=args.json, plot=args.plot)


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="compare a DCP checkpoint with its HF source: every problem, with its cause",
        description=(
            "Always: keys, shapes, dtypes, key layout, manifest and data-file sizes from metadata (no tensor data "
            "read), and the tokenizer against the embedding. --values checks every tensor's values: without --model "
            "against the fingerprints the manifest recorded (only the checkpoint is read), with --model against "
            "the HF source, streamed; "
            "--loss loads the checkpoint as trainers do (meta -> to_empty -> torch.distributed.checkpoint) and "
            "compares its loss on the reference batch with the HF model's. Exit 0: no errors (warnings allowed); "
            "1: errors found; 2: unreadable input."
        ),
    )
    add_diagnose_arguments(p)
    p.set_defaults(run=run_diagnose)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole workflow on the embedded tiny model, under a minute on a CPU")
    p.add_argument("--workdir", help="folder to work in (default: a temporary folder, removed afterwards)")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from flame_ext.commands.demo import run

    return run(args)


def _add_patch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "patch",
        help="apply, check or revert flame-ext's patches to a flame checkout",
        description=(
            "flame's train.py builds the validating CheckpointManager and the JobConfig with the guard options; "
            "flame/utils/convert_*.py run flame-ext's converters. The patches are made against fla-org/flame "
            "e11e7be; each file is checked against it (or its patched form) before anything is written. "
            "Exit 0: done, or nothing to do; check: 1 when a patch does not apply; 2: not a flame checkout, or "
            "apply/revert refused (local edits or another flame version: nothing is changed)."
        ),
    )
    p.add_argument(
        "action",
        choices=["apply", "check", "revert"],
        help="apply (idempotent), check (report whether they apply), revert",
    )
    p.add_argument("flame_dir", help="path to a fla-org/flame checkout (the folder holding flame/ and train.sh)")
    p.set_defaults(run=_run_patch)


def _run_patch(args: argparse.Namespace) -> int:
    from flame_ext.flame.patching import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="flame-ext", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"flame-ext {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_convert, _add_to_hf, _add_reference, _add_diagnose, _add_demo, _add_patch):
        add(sub)
    return parser


def quiet_progress_bars() -> None:
    """transformers' and huggingface_hub's own progress bars stay off when stderr is not a terminal (a log
    file, a CI job): there they are only noise, one line per update."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by both libraries at import
    if "transformers" in sys.modules:  # already imported (a host, a test): tell it directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def run_command(
    parse: Callable[[list[str]], argparse.Namespace],
    run: Callable[[argparse.Namespace], int],
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
    return run_command(build_parser().parse_args, lambda args: args.run(args), argv, "flame-ext")


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
