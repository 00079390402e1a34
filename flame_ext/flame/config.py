"""flame's JobConfig with the initial-load guard's options under ``[checkpoint]``.

flame (fla-org/flame at e11e7be) does not use torchtitan's dataclass JobConfig: ``flame/config_manager.py``
keeps its own argparse class (``--section.name`` arguments, TOML merged over the argparse defaults, then the
arguments given on the command line merged over the TOML). The subclass here adds the guard's arguments to
that parser, so the options read the same from TOML and from the command line::

    [checkpoint]
    validate_initial_load = true
    initial_load_max_loss_delta = 0.1

    --checkpoint.validate_initial_load --checkpoint.initial_load_max_loss_delta 0.2
    --checkpoint.no_validate_initial_load            # turns a TOML `true` off

flame is not on the package index, so its class is imported only when ``JobConfig`` is first asked for,
from whatever flame checkout is on ``sys.path`` (flame's own root when you run from it).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from typing import Any

from flame_ext.errors import InputError
from flame_ext.guard import GuardConfig, GuardOption, guard_options

__all__ = [
    "GUARD_OPTIONS",
    "GuardOptionsMixin",
    "add_guard_arguments",
    "guard_flags",
    "check_guard_values",
    "job_config_class",
    "flame_job_config",
]

SECTION = "checkpoint"


# flame's form of the guard's settings, generated from their declaration (``GuardConfig``).
GUARD_OPTIONS: tuple[GuardOption, ...] = guard_options()


def _dest(opt: GuardOption) -> str:
    return f"{SECTION}.{opt.name}"


def add_guard_arguments(parser: argparse.ArgumentParser, options: tuple[GuardOption, ...] = GUARD_OPTIONS) -> None:
    """Add the guard options to a flame-style parser; each boolean also gets flame's ``no_`` form."""
    for opt in options:
        dest = _dest(opt)
        if opt.type is bool:
            parser.add_argument(f"--{dest}", dest=dest, action="store_true", default=opt.default, help=opt.help)
            parser.add_argument(
                f"--{SECTION}.no_{opt.name}", dest=dest, action="store_false", help=f"Turn off --{dest}."
            )
        else:
            parser.add_argument(f"--{dest}", dest=dest, type=opt.type, default=opt.default, help=opt.help)


def guard_flags(values: dict[str, Any], options: tuple[GuardOption, ...] = GUARD_OPTIONS) -> list[str]:
    """The command-line flags that set ``values`` (option name -> value), as flame and torchtitan 0.1 read them."""
    by_name = {opt.name: opt for opt in options}
    flags: list[str] = []
    for name, value in values.items():
        if by_name[name].type is bool:
            flags.append(f"--{SECTION}.{name}" if value else f"--{SECTION}.no_{name}")
        elif value is not None:
            flags += [f"--{SECTION}.{name}", str(value)]
    return flags


def _switch_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A parser holding only the boolean switches that come in on/off pairs, with no defaults.

    flame merges command-line values over the TOML through a second parser that knows one option string
    per destination (``--section.name``); a ``--section.no_name`` given on the command line never reaches
    that merge, so a TOML ``true`` cannot be turned off. Parsing the pairs again, defaults suppressed,
    yields exactly the switches the user typed (the last one wins, as in argparse).
    """
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            by_dest.setdefault(action.dest, []).append(action)
    switches = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for dest, actions in by_dest.items():
        if len(actions) < 2:
            continue
        for action in actions:
            kind = "store_true" if isinstance(action, argparse._StoreTrueAction) else "store_false"
            switches.add_argument(*action.option_strings, dest=dest, action=kind)
    return switches


def check_guard_values(values: dict[str, Any]) -> dict[str, Any]:
    """Check the guard options (TOML gives no types) and return them normalised.

    The rules are the guard's own (``GuardConfig``: raises ``GuardConfigError`` naming the option, the
    value and the fix). One more check belongs to reading a config: a reference file that does not exist
    fails now, not minutes later at the first load.
    """
    out = asdict(GuardConfig(**{o.name: values.get(o.name, o.default) for o in GUARD_OPTIONS}))
    reference = out["initial_load_reference"]
    if out["validate_initial_load"] and reference is not None and not os.path.exists(reference):
        raise InputError(
            f"checkpoint.initial_load_reference = {reference!r}: no such file; point it at a flame_ext.json "
            "(written by `flame-ext convert`) or a `flame-ext reference` file, or leave it unset to use the "
            "manifest in the checkpoint being loaded"
        )
    return out


def check_config_file(argv: list[str]) -> None:
    """``--job.config_file`` readable as TOML, or one line saying why not.

    flame reads the file itself, but on a missing or malformed file it logs two tracebacks
    (``logger.exception``) before re-raising, some twenty lines ahead of the error a user needs. Reading it
    first turns that into the one line every other config error is.
    """
    import tomllib

    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--job.config_file", dest="config_file", default=None)
    path = finder.parse_known_args(argv)[0].config_file
    if path is None:
        return
    try:
        with open(path, "rb") as f:
            tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"--job.config_file {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"--job.config_file {path}: a folder, not a TOML file") from None
    except OSError as exc:
        raise InputError(f"--job.config_file {path}: cannot be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--job.config_file {path}: not valid TOML ({exc})") from None


# The flame-style JobConfig the mixin is combined with: untyped here (flame is not a dependency).
_FlameJobConfig: Any = object


class GuardOptionsMixin(_FlameJobConfig):
    """The guard options for a flame-style argparse JobConfig (flame/config_manager.py's protocol).

    Relies on what that class does: ``self.parser`` built in ``__init__``; ``parse_args(args_list)``
    merging argparse defaults < TOML < ``parse_args_from_command_line(args_list)[1]``; one attribute per
    section holding the merged values; ``self.args_dict`` for ``to_dict()``; ``_validate_config()``.
    """

    parser: argparse.ArgumentParser
    args_dict: Any

    def __init__(self) -> None:
        super().__init__()
        add_guard_arguments(self.parser)

    def parse_args(self, args_list: list[str] | None = None) -> None:
        # flame binds ``sys.argv[1:]`` as the default when its module is imported; read it at call time
        # instead, so a launcher that sets sys.argv after importing flame is honoured.
        argv = sys.argv[1:] if args_list is None else list(args_list)
        check_config_file(argv)
        super().parse_args(argv)

    def parse_args_from_command_line(self, args_list: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
        args, cmd_args = super().parse_args_from_command_line(args_list)
        typed, _ = _switch_parser(self.parser).parse_known_args(args_list)
        for dest, value in vars(typed).items():
            setattr(cmd_args, dest, value)
        return args, cmd_args

    def _validate_config(self) -> None:
        super()._validate_config()
        section = getattr(self, SECTION)
        values = check_guard_values({o.name: getattr(section, o.name, o.default) for o in GUARD_OPTIONS})
        for name, value in values.items():
            setattr(section, name, value)
            if self.args_dict is not None:
                self.args_dict[SECTION][name] = value


_CLASSES: dict[type, type] = {}


def job_config_class(base: type | None = None) -> type:
    """flame's JobConfig extended with the guard options (built once per base class).

    ``base`` defaults to ``flame.config_manager.JobConfig`` from the flame checkout on ``sys.path``.
    """
    if base is None:
        base = flame_job_config()
    if issubclass(base, GuardOptionsMixin):  # already extended (flame_ext.flame.train installed it)
        return base
    if base not in _CLASSES:
        _CLASSES[base] = type(
            "JobConfig",
            (GuardOptionsMixin, base),
            {
                "__module__": __name__,
                "__doc__": f"{base.__module__}.{base.__qualname__} with the guard's options under [checkpoint].",
            },
        )
    return _CLASSES[base]


def flame_job_config() -> type:
    """flame's own ``JobConfig`` as it is now (``flame_ext.flame.train`` may have replaced it by the extended one)."""
    try:
        from flame.config_manager import JobConfig as FlameJobConfig
    except ModuleNotFoundError as exc:
        if exc.name not in ("flame", "flame.config_manager"):
            raise InputError(f"flame's config_manager does not import: {exc}; install flame's requirements") from exc
        raise InputError(
            "flame is not importable: run from the root of a fla-org/flame checkout, or put one on PYTHONPATH "
            "(flame is not on the package index; git clone https://github.com/fla-org/flame)"
        ) from exc
    return FlameJobConfig


def __getattr__(name: str) -> Any:
    # ``from flame_ext.flame.config import JobConfig`` (what the train.py patch does) builds the class on first use.
    if name == "JobConfig":
        return job_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
