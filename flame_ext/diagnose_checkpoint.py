"""Drop-in for a flame-style ``diagnose_checkpoint.py``, with flame's argument names.

    python -m flame_ext.diagnose_checkpoint --checkpoint exp/olmo2/checkpoint/step-0 --model allenai/OLMo-2-1124-7B

Where a key-list comparison stops, this runs ``flame-ext diagnose``: keys, shapes, dtypes and layout
from metadata always, and on request the values (``--values``), the loss as a trainer would load the
checkpoint (``--loss``), the trainer's model config (``--train_config``) and tokenizer (``--tokenizer``).
Exit 0: no errors; 1: problems found; 2: unreadable input.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flame_ext.cli import OneLineParser, add_diagnose_arguments, exit_without_teardown, run_command, run_diagnose


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(
        prog="diagnose_checkpoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_diagnose_arguments(p, flame=True)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(parse_args, run_diagnose, argv, "diagnose_checkpoint")


if __name__ == "__main__":
    exit_without_teardown(main)
