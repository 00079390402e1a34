"""Drop-in for flame's ``flame/utils/convert_dcp_to_hf.py``, with flame's argument names.

    python -m flame_ext.convert_dcp_to_hf --path exp/olmo2 --step 1000 --config allenai/OLMo-2-1124-7B --tokenizer allenai/OLMo-2-1124-7B

Reads ``PATH/checkpoint/step-STEP`` and writes the HF model into ``PATH`` as flame's does, but streams
tensor by tensor instead of going through a whole-model ``torch.save`` file. ``--out`` writes elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", type=str, required=True, help="flame dump folder holding checkpoint/step-N")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--config", type=str, required=True, help="HF model folder the checkpoint was made for")
    p.add_argument("--tokenizer", type=str, default=None, help="accepted for compatibility; tokenizer files are copied from --config")
    p.add_argument("--out", type=str, default=None, help="output folder (default: PATH/hf-step-STEP)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--force", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import main as cli_main

    args = parse_args(argv)
    checkpoint = Path(args.path) / "checkpoint" / f"step-{args.step}"
    out = args.out or str(Path(args.path) / f"hf-step-{args.step}")
    argv2 = ["to-hf", "--checkpoint", str(checkpoint), "--config", args.config, "--out", out, "--dtype", args.dtype]
    argv2 += ["--force"] * args.force
    return cli_main((["--debug"] if args.debug else []) + argv2)


if __name__ == "__main__":
    sys.exit(main())
