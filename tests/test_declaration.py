"""Every command's options are declared once (``flame_ext.command_options``); the CLI's arguments, flame's drop-ins
and the help agree with that declaration.

The declaration is read here independently of the derivation: names, types and defaults from the dataclass
itself, help texts by ``docstring_parser``; the forms are read from the parsers argparse built.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing

import docstring_parser
import pytest

from flame_ext import convert_dcp_to_hf, convert_hf_to_dcp, diagnose_checkpoint
from flame_ext.cli import COMMANDS, OneLineParser, build_parser, drop_in_parser
from flame_ext.command_options import ConvertOptions, DiagnoseOptions, FlameDumpStep, ToHFOptions
from flame_ext.declaration import add_arguments

MiB = 1024 * 1024
# Fields the program sets, never the user (their docstrings say so).
NOT_OPTIONS = {"progress", "buffer_bytes@DiagnoseOptions", "patch_dir"}
# Fields spelled otherwise on the command line: (flag, the field's value per unit given).
SPELLED = {
    "buffer_bytes": ("--buffer-mb", MiB),
    "max_shard_bytes": ("--max-shard-mb", MiB),
    "reference@ConvertOptions": ("--no-reference", 1),
}


def declared(cls: type) -> dict[str, tuple[object, object, str]]:
    """name -> (annotation, default, help) as written in the class and the classes it derives from."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):
        docs.update(
            {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse_from_object(klass).params}
        )
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in NOT_OPTIONS or f"{f.name}@{cls.__name__}" in NOT_OPTIONS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = (hints[f.name], default, docs[f.name])
    return out


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def arguments(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action, leaving out --help and --debug."""
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "debug")}


def check_form(cls: type, actions: dict[str, argparse.Action], *, flame: bool) -> None:
    want = declared(cls)
    assert set(actions) == set(want), f"{cls.__name__}: the arguments are not the declared fields"
    for name, (annotation, default, doc) in want.items():
        action = actions[name]
        flag, unit = SPELLED.get(f"{name}@{cls.__name__}", SPELLED.get(name, ("--" + name.replace("_", "-"), 1)))
        given = typing.get_args(annotation)
        literal = next((a for a in [annotation, *given] if typing.get_origin(a) is typing.Literal), None)
        assert action.help.startswith(doc), (cls.__name__, name)
        if action.option_strings:
            underscored = "--" + flag[2:].replace("-", "_")
            want_flags = [underscored, flag] if flame and underscored != flag else [flag]
            assert action.option_strings == want_flags, (cls.__name__, name)
        if annotation is bool:
            negated = flag.startswith("--no-")
            assert action.nargs == 0 and action.default is negated and action.const is not negated, (cls.__name__, name)
            continue
        if typing.get_origin(annotation) is tuple:  # repeatable: each given value one item, none given ()
            assert isinstance(action, argparse._AppendAction) and action.default is None, (cls.__name__, name)
            continue
        assert action.choices == (typing.get_args(literal) if literal else None), (cls.__name__, name)
        if default is not None:
            assert action.default * unit == default, (cls.__name__, name)
            shown = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
            assert action.help == f"{doc} (default {shown})", (cls.__name__, name)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_every_commands_arguments_are_its_declaration(command):
    check_form(command.options, arguments(subparser(command.name)), flame=False)


@pytest.mark.parametrize(
    "module, options",
    [(convert_hf_to_dcp, ConvertOptions), (diagnose_checkpoint, DiagnoseOptions)],
    ids=["convert_hf_to_dcp", "diagnose_checkpoint"],
)
def test_flames_drop_ins_take_the_declaration_with_flames_names(module, options):
    parser = drop_in_parser("x", None)
    add_arguments(parser, options, flame=True)
    check_form(options, arguments(parser), flame=True)
    assert module.parse_args.__annotations__["return"] == options.__name__


def test_the_to_hf_drop_in_names_the_checkpoint_by_flames_path_and_step():
    parser = drop_in_parser("x", None)
    add_arguments(parser, FlameDumpStep, flame=True)
    add_arguments(parser, ToHFOptions, flame=True, exclude=("checkpoint", "out"))
    actions = arguments(parser)
    check_form(FlameDumpStep, {k: actions[k] for k in declared(FlameDumpStep)}, flame=True)
    to_hf = {k: a for k, a in actions.items() if k not in declared(FlameDumpStep)}
    assert set(to_hf) == set(declared(ToHFOptions)) - {"checkpoint", "out"}
    assert convert_dcp_to_hf.parse_args.__annotations__["return"] == "ToHFOptions"


def test_every_command_takes_its_options_object():
    for command in COMMANDS:
        (param,) = inspect.signature(command.run).parameters.values()
        assert param.annotation == command.options.__name__, command.name


def test_a_field_without_a_docstring_cannot_be_an_option():
    @dataclasses.dataclass
    class Undocumented:
        size: int = 1

    with pytest.raises(TypeError, match="give the field a docstring"):
        add_arguments(OneLineParser(), Undocumented)


def test_a_new_field_reaches_the_cli_and_the_drop_in_with_no_other_edit():
    @dataclasses.dataclass
    class WithOneMore(ConvertOptions):
        reference_warmup_steps: int = 0
        """forward passes run and discarded before the reference one"""

    cli, flame = OneLineParser(), OneLineParser()
    add_arguments(cli, WithOneMore)
    add_arguments(flame, WithOneMore, flame=True)
    assert (
        cli.parse_args(["--model", "m", "--checkpoint", "c", "--reference-warmup-steps", "3"]).reference_warmup_steps
        == 3
    )
    assert (
        flame.parse_args(["--model", "m", "--checkpoint", "c", "--reference_warmup_steps", "3"]).reference_warmup_steps
        == 3
    )
    assert "forward passes run and discarded" in cli.format_help()


def test_the_help_shows_the_choices_and_every_command_describes_itself():
    for command in COMMANDS:
        assert subparser(command.name).description, command.name
    text = subparser("convert").format_help()
    assert "--dtype {auto,bfloat16,float32}" in text and "--layout {flat,nested,torchtitan:MODULE}" in text
    assert "--dtype {auto,bfloat16,float32}" in subparser("to-hf").format_help()
