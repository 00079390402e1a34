"""A stand-in with the protocol of flame's argparse JobConfig, for CI where no flame checkout exists.

Written for these tests (not flame's code): the behaviour ``GuardOptionsMixin`` relies on, as documented
in flame/config_manager.py's docstring — ``--section.name`` arguments on ``self.parser``; precedence
command line > TOML > argparse defaults; command-line values found by a second parser that knows one
option per destination; one attribute per section; ``args_dict``; ``_validate_config``. The same tests run
against flame's real class when FLAME_SRC points at a checkout, which keeps this stand-in honest.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import tomllib


class FlameStyleJobConfig:
    def __init__(self) -> None:
        self.args_dict = None
        self.parser = argparse.ArgumentParser()
        self.parser.add_argument("--job.config_file", type=str, default=None)
        self.parser.add_argument("--job.dump_folder", type=str, default="./outputs")
        self.parser.add_argument("--checkpoint.enable_checkpoint", action="store_true")
        self.parser.add_argument("--checkpoint.interval", type=int, default=500)
        self.parser.add_argument(
            "--checkpoint.initial_load_model_weights_only",
            dest="checkpoint.initial_load_model_weights_only",
            action="store_true",
            default=True,
        )
        self.parser.add_argument(
            "--checkpoint.no_initial_load_model_weights_only",
            dest="checkpoint.initial_load_model_weights_only",
            action="store_false",
        )

    def to_dict(self):
        return self.args_dict

    def parse_args(self, args_list: list) -> None:
        args, cmd_args = self.parse_args_from_command_line(args_list)
        merged = _two_levels(args)
        if args.__dict__["job.config_file"]:
            with open(args.__dict__["job.config_file"], "rb") as f:
                for section, values in tomllib.load(f).items():
                    merged[section] |= values
        for section, values in _two_levels(cmd_args).items():
            merged[section].update(values)
        self.args_dict = merged
        for section, values in merged.items():
            setattr(self, section, type(section.title(), (), dict(values))())
        self._validate_config()

    def _validate_config(self) -> None:
        pass

    def parse_args_from_command_line(self, args_list: list) -> tuple[argparse.Namespace, argparse.Namespace]:
        args = self.parser.parse_args(args_list)
        given = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
        for dest, value in vars(args).items():
            if isinstance(value, bool):
                given.add_argument("--" + dest, action="store_true" if value else "store_false")
            else:
                given.add_argument("--" + dest, type=type(value))
        cmd_args, _ = given.parse_known_args(args_list)
        return args, cmd_args


def _two_levels(ns: argparse.Namespace) -> defaultdict:
    out: defaultdict = defaultdict(dict)
    for key, value in vars(ns).items():
        section, name = key.split(".", 1)
        out[section][name] = value
    return out
