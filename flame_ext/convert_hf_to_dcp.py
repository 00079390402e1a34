"""Drop-in for flame's ``flame/utils/convert_hf_to_dcp.py``, with flame's argument names.

    python -m flame_ext.convert_hf_to_dcp --model allenai/OLMo-2-1124-7B --checkpoint exp/olmo2/checkpoint/step-0

Unlike the original it streams (no whole model in RAM), writes the flat keys torchtitan's step-0 load
asks for, and records a reference loss in ``flame_ext.json`` for the training guard.
"""

from __future__ import annotations

from collections.abc import Sequence

from flame_ext.cli import drop_in_parser, exit_without_teardown, run_command, run_convert
from flame_ext.command_options import ConvertOptions
from flame_ext.declaration import add_arguments, from_namespace


def parse_args(argv: Sequence[str] | None = None) -> ConvertOptions:
    """flame's arguments (its underscored names; the dashed ones accepted too) as ``convert``'s options."""
    p = drop_in_parser("convert_hf_to_dcp", __doc__)
    add_arguments(p, ConvertOptions, flame=True)
    return from_namespace(ConvertOptions, p.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(parse_args, run_convert, argv, "convert_hf_to_dcp")


if __name__ == "__main__":
    exit_without_teardown(main)
