"""Drop-in for flame's ``flame/utils/convert_dcp_to_hf.py``, with flame's argument names.

    python -m flame_ext.convert_dcp_to_hf --path exp/olmo2 --step 1000 --config allenai/OLMo-2-1124-7B

Reads ``PATH/checkpoint/step-STEP`` like flame's, streams tensor by tensor instead of going through a
whole-model ``torch.save`` file, and writes the HF model to ``PATH/hf-step-STEP`` (``--out`` to choose):
flame's writes into ``PATH`` itself, beside ``checkpoint/``, but the output is written atomically (a
temporary sibling renamed into place), and ``PATH`` already exists. Tokenizer files are copied from
``--tokenizer`` (a local folder; default ``--config``). Under ``torchrun`` the ranks share the safetensors shards
and write the folder one process writes (docs/distributed.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from flame_ext.cli import OneLineParser, add_to_hf_arguments, exit_without_teardown, run_command, run_to_hf


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """flame's arguments (``--path`` and ``--step`` name the checkpoint); ``checkpoint`` and ``out`` derived."""
    p = OneLineParser(
        prog="convert_dcp_to_hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--path", type=str, required=True, help="flame dump folder holding checkpoint/step-N")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--out", type=str, default=None, help="output folder (default: PATH/hf-step-STEP)")
    add_to_hf_arguments(p, flame=True)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    args.checkpoint = str(Path(args.path) / "checkpoint" / f"step-{args.step}")
    args.out = args.out or str(Path(args.path) / f"hf-step-{args.step}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(parse_args, run_to_hf, argv, "convert_dcp_to_hf")


if __name__ == "__main__":
    exit_without_teardown(main)
