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

from collections.abc import Sequence

from flame_ext.cli import drop_in_parser, exit_without_teardown, run_command, run_to_hf
from flame_ext.command_options import FlameDumpStep, ToHFOptions
from flame_ext.declaration import add_arguments, from_namespace


def parse_args(argv: Sequence[str] | None = None) -> ToHFOptions:
    """flame's arguments (``--path`` and ``--step`` name the checkpoint) as ``to-hf``'s options."""
    p = drop_in_parser("convert_dcp_to_hf", __doc__)
    add_arguments(p, FlameDumpStep, flame=True)
    add_arguments(p, ToHFOptions, flame=True, exclude=("checkpoint", "out"))
    parsed = p.parse_args(argv)
    step = from_namespace(FlameDumpStep, parsed)
    return from_namespace(ToHFOptions, parsed, checkpoint=step.checkpoint, out=step.hf_folder)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(parse_args, run_to_hf, argv, "convert_dcp_to_hf")


if __name__ == "__main__":
    exit_without_teardown(main)
