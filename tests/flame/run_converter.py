"""Run a flame converter file as ``__main__`` for several models in one process (``import fla`` once):

    python run_converter.py FLAME_DIR/flame/utils/convert_hf_to_dcp.py MODEL CHECKPOINT [MODEL CHECKPOINT ...]

Each run gets flame's own arguments (--model, --checkpoint) in ``sys.argv``; a non-zero exit stops here with it.
"""

from __future__ import annotations

import runpy
import sys

if __name__ == "__main__":
    file, pairs = sys.argv[1], sys.argv[2:]
    for model, checkpoint in zip(pairs[::2], pairs[1::2]):
        sys.argv = [file, "--model", model, "--checkpoint", checkpoint]
        try:
            runpy.run_path(file, run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                sys.exit(exc.code)
