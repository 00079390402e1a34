"""The guard's settings are declared once (``GuardConfig``); every host form agrees with that declaration.

The declaration is read independently of the derivation here: names, types and defaults from the dataclass
itself, help texts by ``docstring_parser`` (the parser torchtitan's CLI uses). A setting added to a
declaration (a subclass with one more field, as a new option would be) reaches every host form with no
other edit.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import docstring_parser
import pytest

from flame_ext.errors import GuardConfigError
from flame_ext.flame.config import GUARD_OPTIONS, add_guard_arguments, guard_flags
from flame_ext.guard import GuardConfig, guard_options, host_config


def declared(cls: type = GuardConfig) -> dict[str, tuple[object, object, str]]:
    """name -> (annotation, default, help) as written in the class and the classes it derives from."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):
        docs.update(
            {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse_from_object(klass).params}
        )
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.default, docs[f.name]) for f in dataclasses.fields(cls)}


def flame_parser(options=GUARD_OPTIONS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_guard_arguments(parser, options)
    return parser


def flame_form(parser: argparse.ArgumentParser) -> dict[str, tuple[object, object, str]]:
    """name -> (value type, default, help) of the ``--checkpoint.<name>`` arguments."""
    out = {}
    for action in parser._actions:
        flag = next((s for s in action.option_strings if s.startswith("--checkpoint.")), None)
        if flag is None or flag.startswith("--checkpoint.no_"):
            continue
        kind = bool if isinstance(action, argparse._StoreTrueAction) else action.type
        out[flag.removeprefix("--checkpoint.")] = (kind, action.default, action.help)
    return out


def value_type(annotation: object) -> object:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def test_flames_arguments_are_the_declaration():
    want = declared()
    assert flame_form(flame_parser()) == {n: (value_type(t), d, h) for n, (t, d, h) in want.items()}
    assert [o.name for o in GUARD_OPTIONS] == list(want)


def test_booleans_switch_both_ways_on_flames_command_line():
    parser = flame_parser()
    for opt in (o for o in GUARD_OPTIONS if o.type is bool):
        for value in (True, False):
            assert getattr(parser.parse_args(guard_flags({opt.name: value})), f"checkpoint.{opt.name}") is value


def test_the_test_hosts_and_the_demo_use_the_declared_names():
    from support import titan_hosts as hosts

    from flame_ext.commands.demo import _guard_settings

    assert hosts.GUARD_FIELDS == tuple(declared())
    fields = _guard_settings(repair=False)
    parsed = vars(flame_parser().parse_args(guard_flags(fields)))
    assert {k: parsed[f"checkpoint.{k}"] for k in fields} == fields  # flame's flags say what the fields say


@pytest.mark.skipif(not version("torchtitan").startswith("0.3."), reason="torchtitan 0.3's Config")
def test_torchtitan_03_config_is_the_declaration():
    from flame_ext.titan.v03 import ValidatingCheckpointManager

    config = ValidatingCheckpointManager.Config
    docs = {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse_from_object(config).params}
    hints = typing.get_type_hints(config)
    got = {f.name: (hints[f.name], f.default, docs.get(f.name)) for f in dataclasses.fields(config)}
    assert {n: got[n] for n in declared()} == declared()
    with pytest.raises(GuardConfigError, match="initial_load_max_loss_delta"):
        config(initial_load_max_loss_delta=-1.0)


@pytest.mark.skipif(not version("torchtitan").startswith("0.1."), reason="torchtitan 0.1's job config")
def test_torchtitan_01_section_is_the_declaration():
    from flame_ext.titan.v01 import JobConfig

    section = typing.get_type_hints(JobConfig)["checkpoint"]
    assert declared(section) == declared()


# ----------------------------------------------------------------------------- one more setting


@dataclass
class WithOneMore(GuardConfig):
    """The declaration with one more setting, declared the way a new option is."""

    initial_load_sample_rows: int = 2
    """Reference rows to run at step 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.initial_load_sample_rows < 1:
            raise GuardConfigError(
                f"checkpoint.initial_load_sample_rows = {self.initial_load_sample_rows}: must be >= 1"
            )


@dataclass(kw_only=True, slots=True)
class HostSection:
    """A host's own checkpoint config (keyword-only and slotted, as torchtitan 0.3's are)."""

    interval: int = 500
    """Steps between saves."""


def test_a_new_setting_reaches_flames_arguments_and_flags():
    options = guard_options(WithOneMore)
    assert [o.name for o in options] == list(declared(WithOneMore))
    parser = flame_parser(options)
    assert flame_form(parser)["initial_load_sample_rows"] == (int, 2, "Reference rows to run at step 0.")
    args = parser.parse_args(guard_flags({"initial_load_sample_rows": 5, "validate_initial_load": True}, options))
    assert (vars(args)["checkpoint.initial_load_sample_rows"], vars(args)["checkpoint.validate_initial_load"]) == (
        5,
        True,
    )


def test_a_new_setting_reaches_a_host_config_with_its_help_and_its_check():
    config = host_config(HostSection, qualname="Host.Config", module=__name__, declaration=WithOneMore)
    assert [f.name for f in dataclasses.fields(config)] == ["interval", *declared(WithOneMore)]
    docs = {p.arg_name: p.description for p in docstring_parser.parse_from_object(config).params}
    assert docs["initial_load_sample_rows"] == "Reference rows to run at step 0."
    built = config(interval=10, initial_load_sample_rows=3, initial_load_reference=" ~/ref.json ")
    assert (built.interval, built.initial_load_sample_rows, built.validate_initial_load) == (10, 3, False)
    assert not built.initial_load_reference.startswith(("~", " "))  # normalised by the declaration's check
    with pytest.raises(GuardConfigError, match="initial_load_sample_rows"):
        config(initial_load_sample_rows=0)
    with pytest.raises(TypeError):
        config(10)  # keyword-only, like the host's own fields


def test_a_setting_without_help_is_refused():
    @dataclass
    class Undocumented(GuardConfig):
        initial_load_secret: bool = False

    with pytest.raises(TypeError, match="initial_load_secret: give the field a docstring"):
        guard_options(Undocumented)


@pytest.mark.parametrize("name", ["initial_load_reference", "initial_load_plot"])
@pytest.mark.parametrize("value, words", [("~nosuchuser/x.png", "~nosuchuser is not a user"), ("a\x00b.png", "NUL")])
def test_a_path_setting_that_cannot_be_resolved_is_a_config_error(name, value, words):
    """Path.expanduser raises RuntimeError for an unknown user, os.stat ValueError for a NUL: one line each."""
    from flame_ext.io.plot import matplotlib_missing

    if name == "initial_load_plot" and matplotlib_missing():
        pytest.skip("initial_load_plot needs matplotlib before its path is read")
    with pytest.raises(GuardConfigError, match=f"checkpoint.{name} = .*{words}") as info:
        GuardConfig(**{name: value})
    assert "\n" not in str(info.value)
    assert GuardConfig(**{name: "~/x.png"}).__dict__[name] == str(Path("~/x.png").expanduser())
