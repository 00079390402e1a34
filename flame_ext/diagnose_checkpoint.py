"""Drop-in for a flame-style ``diagnose_checkpoint.py``, with flame's argument names.

    python -m flame_ext.diagnose_checkpoint --checkpoint exp/olmo2/checkpoint/step-0 --model allenai/OLMo-2-1124-7B

Where a key-list comparison stops, this runs ``flame-ext diagnose``: keys, shapes, dtypes and layout
from metadata always, and on request the values (``--values``), the loss as a trainer would load the
checkpoint (``--loss``), the trainer's model config (``--train_config``) and tokenizer (``--tokenizer``).
Exit 0: no errors; 1: problems found; 2: unreadable input.
"""

from __future__ import annotations

from collections.abc import Sequence

from flame_ext.cli import drop_in_parser, exit_without_teardown, run_command, run_diagnose
from flame_ext.command_options import DiagnoseOptions
from flame_ext.declaration import add_arguments, from_namespace


def parse_args(argv: Sequence[str] | None = None) -> DiagnoseOptions:
    """flame-style arguments (underscored names, --model required) as ``diagnose``'s options."""
    p = drop_in_parser("diagnose_checkpoint", __doc__)
    add_arguments(p, DiagnoseOptions, flame=True)
    return from_namespace(DiagnoseOptions, p.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(parse_args, run_diagnose, argv, "diagnose_checkpoint")


if __name__ == "__main__":
    exit_without_teardown(main)
