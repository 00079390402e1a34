"""Drop-in for flame's ``flame/utils/convert_hf_to_dcp.py``, with flame's argument names.

    python -m flame_ext.convert_hf_to_dcp --model allenai/OLMo-2-1124-7B --checkpoint exp/olmo2/checkpoint/step-0

Unlike the original it streams (no whole model in RAM), writes the flat keys torchtitan's step-0 load
asks for, and records a reference loss in ``flame_ext.json`` for the training guard.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from flame_ext.cli import OneLineParser

    p = OneLineParser(
        prog="convert_hf_to_dcp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=str, required=True)
    p.add_argument("--checkpoint", type=str, required=True)
    p.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true")
    p.add_argument("--include_future_predictor", "--include-future-predictor", action="store_true")
    p.add_argument(
        "--future_predictor_head_type", "--future-predictor-head-type", default="linear", choices=["linear", "mlp"]
    )
    p.add_argument("--dtype", default="auto", help="auto, bfloat16 or float32")
    p.add_argument("--layout", default="flat", help="flat (default) or nested")
    p.add_argument("--no_reference", "--no-reference", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    from flame_ext.cli import main as cli_main

    argv = [
        "convert",
        "--model",
        args.model,
        "--checkpoint",
        args.checkpoint,
        "--dtype",
        args.dtype,
        "--layout",
        args.layout,
    ]
    argv += (
        ["--trust-remote-code"] * args.trust_remote_code
        + ["--no-reference"] * args.no_reference
        + ["--force"] * args.force
    )
    if args.include_future_predictor:
        argv += ["--include-future-predictor", "--future-predictor-head-type", args.future_predictor_head_type]
    return cli_main((["--debug"] if args.debug else []) + argv)


def main(argv: Sequence[str] | None = None) -> int:
    from flame_ext.cli import run_command

    return run_command(parse_args, _run, argv, "convert_hf_to_dcp")


if __name__ == "__main__":
    sys.exit(main())
