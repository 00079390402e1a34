"""Drop-in for flame's ``flame/utils/convert_dcp_to_hf.py``, with flame's argument names.

    python -m flame_ext.convert_dcp_to_hf --path exp/olmo2 --step 1000 --config allenai/OLMo-2-1124-7B --tokenizer allenai/OLMo-2-1124-7B

Reads ``PATH/checkpoint/step-STEP`` like flame's, streams tensor by tensor instead of going through a
whole-model ``torch.save`` file, and writes the HF model to ``PATH/hf-step-STEP`` (``--out`` to choose):
flame's writes into ``PATH`` itself, beside ``checkpoint/``, but the output is written atomically (a
temporary sibling renamed into place), and ``PATH`` already exists. Tokenizer files are copied from
``--tokenizer`` (a local folder; default ``--config``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from flame_ext.cli import OneLineParser

    p = OneLineParser(
        prog="convert_dcp_to_hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--path", type=str, required=True, help="flame dump folder holding checkpoint/step-N")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--config", type=str, required=True, help="HF model folder the checkpoint was made for")
    p.add_argument(
        "--tokenizer", type=str, default=None, help="local folder to copy tokenizer files from (default: --config)"
    )
    p.add_argument("--out", type=str, default=None, help="output folder (default: PATH/hf-step-STEP)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--force", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    from flame_ext.convert.dcp_to_hf import ToHFOptions, convert_dcp_to_hf

    checkpoint = Path(args.path) / "checkpoint" / f"step-{args.step}"
    out = args.out or str(Path(args.path) / f"hf-step-{args.step}")
    summary = convert_dcp_to_hf(
        ToHFOptions(
            checkpoint=str(checkpoint),
            config=args.config,
            out=out,
            dtype=args.dtype,
            force=args.force,
            tokenizer=args.tokenizer,
            progress=sys.stderr.isatty(),
        )
    )
    for note in summary.notes:
        print(f"note: {note}")
    print(summary.line())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from flame_ext.cli import run_command

    return run_command(parse_args, _run, argv, "convert_dcp_to_hf")


if __name__ == "__main__":
    sys.exit(main())
