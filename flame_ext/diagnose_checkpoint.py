"""Drop-in for a flame-style ``diagnose_checkpoint.py``, with flame's argument names.

    python -m flame_ext.diagnose_checkpoint --checkpoint exp/olmo2/checkpoint/step-0 --model allenai/OLMo-2-1124-7B

Where a key-list comparison stops, this runs ``flame-ext diagnose``: keys, shapes, dtypes and layout
from metadata always, and on request the values (``--values``), the loss as a trainer would load the
checkpoint (``--loss``), the trainer's model config (``--train_config``) and tokenizer (``--tokenizer``).
Exit 0: no errors; 1: problems found; 2: unreadable input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from flame_ext.cli import OneLineParser

    p = OneLineParser(
        prog="diagnose_checkpoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=str, required=True, help="DCP folder (e.g. exp/.../checkpoint/step-0)")
    p.add_argument(
        "--model",
        type=str,
        help="HF model folder or hub id (default: the source recorded in the checkpoint's manifest)",
    )
    p.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true")
    p.add_argument("--values", action="store_true", help="also compare every tensor's values with the HF model")
    p.add_argument("--loss", action="store_true", help="also load the checkpoint as trainers do and compare the loss")
    p.add_argument("--threshold", type=float, default=0.1, help="loss gap that counts as an error, nats (default 0.1)")
    p.add_argument(
        "--train_config", "--train-config", help="the model config the trainer builds from (flame's --model.config)"
    )
    p.add_argument(
        "--tokenizer", help="the tokenizer the trainer uses (flame's --model.tokenizer_path; default: the model's)"
    )
    p.add_argument(
        "--reference", help="reference file from `flame-ext reference` for --loss (default: the checkpoint's manifest)"
    )
    p.add_argument("--plot", metavar="FILE.png", help="with --loss: per-position loss plot (needs flame-ext[plot])")
    p.add_argument("--json", action="store_true", help="print the report as JSON (docs/report-format.md)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    from flame_ext.commands.diagnose import run

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    from flame_ext.cli import run_command

    return run_command(parse_args, _run, argv, "diagnose_checkpoint")


if __name__ == "__main__":
    sys.exit(main())
