"""Settings declared once, as dataclasses; their command-line forms derived from the declaration.

A field is a setting: its name, its type (a ``Literal`` gives the choices), its default and its help (the
docstring written under it). ``add_arguments`` derives the argparse options from the fields, with flame's
underscored spellings beside the dashed ones in the drop-ins (``--reference_seq_len`` and
``--reference-seq-len``); ``from_namespace`` builds the options object back from what argparse parsed. A field
whose command-line form differs from ``--its-name`` says how in its ``metadata`` (``cli(...)``); a field that
is no option at all (set by the program) is marked ``NOT_AN_OPTION``. The guard's settings
(``flame_ext.guard.options``) use the same ``field_docs``.

Imports nothing heavy: the commands declare and check their options before torch is imported.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import linecache
import textwrap
import types
import typing
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, Literal

__all__ = [
    "Cli",
    "NOT_AN_OPTION",
    "CommandOption",
    "add_arguments",
    "cli",
    "command_options",
    "field_default",
    "field_docs",
    "from_namespace",
    "value_type",
]


@dataclass(frozen=True)
class Cli:
    """How a field is spelled on the command line when it is not plainly ``--field-name VALUE``."""

    flag: str | None = None
    """the dashed flag (``--buffer-mb`` for ``buffer_bytes``); default ``--`` + the name with dashes"""
    unit: int = 1
    """the field holds the given number times this (``--buffer-mb 256`` -> 256 MiB in bytes)"""
    unit_type: type | None = None
    """the type of the given number when it differs from the field's (``--max-shard-mb`` takes 0.5)"""
    negate: bool = False
    """a boolean that is true unless the flag is given (``--no-reference`` sets ``reference`` false)"""
    positional: bool = False
    required: bool | None = None
    """required on the command line; unset: when the field has no default. True for a field the API may leave
    unset; False for one whose absence ``__post_init__`` explains better than argparse can"""
    flame_required: bool = False
    """required in flame's drop-ins only"""
    underscored: bool = True
    """flame's drop-ins accept ``--the_name`` beside ``--the-name`` (flame's own spelling)"""
    metavar: str | None = None
    """shown in --help instead of the choices (a value the choices cannot list, such as ``torchtitan:<name>``)"""


def cli(**spelling: Any) -> dict[str, Cli]:
    """``field(metadata=cli(flag="--buffer-mb", unit=MiB))``: a field's command-line spelling."""
    return {"cli": Cli(**spelling)}


NOT_AN_OPTION: dict[str, Cli | None] = {"cli": None}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (and of its dataclass bases), whitespace folded."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not hasattr(klass, "__dataclass_fields__"):
            continue
        node = _class_node(klass)
        if node is None:
            continue
        body = node.body
        for stmt, after in zip(body, body[1:]):
            doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else None
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(doc, str):
                docs[stmt.target.id] = " ".join(doc.split())
    return docs


def _class_node(klass: type) -> ast.ClassDef | None:
    """The class statement of ``klass``, None when it has no source (built at run time by ``make_dataclass``).

    Found in its module's syntax tree, parsed once per module: ``inspect.getsource`` of a class parses the whole
    module again for every class (Python 3.11), and every command's start-up asks for all the options classes.
    A class defined inside a function is not a module-level name: ``inspect`` finds it.
    """
    if "<locals>" not in klass.__qualname__:
        try:
            file = inspect.getsourcefile(klass)
        except TypeError:  # a built-in or a module without a file
            file = None
        if file is not None:
            node = _module_classes(file).get(klass.__qualname__)
            if node is not None:
                return node
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # built at run time (make_dataclass): no source, no docstrings
        return None
    first = ast.parse(source).body[0]
    return first if isinstance(first, ast.ClassDef) else None


@functools.cache
def _module_classes(file: str) -> dict[str, ast.ClassDef]:
    """The class statements at the top of a source file and in their bodies, by qualified name (``Outer.Inner``);
    the first of a name, as ``inspect`` finds it. One elsewhere (under an ``if``) is left to ``inspect``."""
    found: dict[str, ast.ClassDef] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for stmt in body:
            if isinstance(stmt, ast.ClassDef):
                found.setdefault(prefix + stmt.name, stmt)
                visit(stmt.body, f"{prefix}{stmt.name}.")

    try:
        visit(ast.parse("".join(linecache.getlines(file))).body, "")
    except SyntaxError:
        return {}
    return found


def value_type(annotation: Any) -> Any:
    """``str | None`` -> ``str``: the type of a value that is given."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        given = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(given) == 1:
            return given[0]
    return annotation


def field_default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@dataclass(frozen=True)
class CommandOption:
    """One field as the command line spells it: everything ``add_argument`` is given, derived from the field."""

    name: str
    flag: str
    type: Any
    """the type argparse converts a given value to (None for a switch)"""
    default: Any
    """the command line's default, in the command line's unit"""
    choices: tuple[Any, ...] | None
    help: str
    required: bool
    spelling: Cli
    repeated: bool = False
    """a ``tuple[X, ...]`` field: the option may be given several times, each value one item"""

    def flags(self, flame: bool) -> list[str]:
        """``--reference-seq-len``; in a drop-in flame's ``--reference_seq_len`` first, both accepted."""
        if self.spelling.positional:
            return []
        underscored = "--" + self.flag[2:].replace("-", "_")
        both = flame and self.spelling.underscored and underscored != self.flag
        return [underscored, self.flag] if both else [self.flag]


def command_options(cls: type) -> tuple[CommandOption, ...]:
    """Every option field of an options dataclass, in order; a field without a docstring is a mistake."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    own = cls.__dict__.get("__annotations__", {})
    for f in sorted(fields(cls), key=lambda f: f.name not in own):  # the command's own options first
        spelling = f.metadata.get("cli", Cli())
        if spelling is None:
            continue
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name}: give the field a docstring (it is the option's help)")
        given = value_type(hints[f.name])
        repeated = typing.get_origin(given) is tuple
        if repeated:
            given = typing.get_args(given)[0]
        choices = typing.get_args(given) if typing.get_origin(given) is Literal else None
        default = field_default(f)
        if given is bool:
            if default is not False and not spelling.negate:
                raise TypeError(f"{cls.__name__}.{f.name}: a switch defaults to false (or is a negated flag)")
            kind: Any = None
        elif choices:
            kind = type(choices[0])
        else:
            kind = spelling.unit_type or given
        if default is not MISSING and default is not None and spelling.unit != 1:
            default = kind(default / spelling.unit)
        required = (default is MISSING and not spelling.positional) if spelling.required is None else spelling.required
        out.append(
            CommandOption(
                name=f.name,
                flag=spelling.flag or "--" + f.name.replace("_", "-"),
                type=kind,
                default=None if default is MISSING else default,
                choices=choices,
                help=docs[f.name],
                required=required,
                spelling=spelling,
                repeated=repeated,
            )
        )
    return tuple(out)


def help_text(opt: CommandOption) -> str:
    """The docstring, and the default when there is one to show."""
    if opt.type is None or opt.default is None or opt.required or opt.repeated:
        return opt.help
    shown = f"{opt.default:g}" if isinstance(opt.default, float) else str(opt.default)
    return f"{opt.help} (default {shown})"


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, *, flame: bool = False, exclude: typing.Collection[str] = ()
) -> None:
    """The argparse options of the options dataclass ``cls`` (``flame``: a drop-in, with flame's spellings)."""
    for opt in command_options(cls):
        if opt.name in exclude:
            continue
        kwargs: dict[str, Any] = {"help": help_text(opt)}
        if opt.spelling.metavar:
            kwargs["metavar"] = opt.spelling.metavar
        elif opt.type is not None and not opt.choices and not opt.spelling.positional:
            kwargs["metavar"] = opt.flag[2:].replace("-", "_").upper()  # --buffer-mb BUFFER_MB, not the field's name
        if opt.type is None:
            kwargs["action"] = "store_false" if opt.spelling.negate else "store_true"
        elif opt.repeated:
            kwargs.update(action="append", type=opt.type, default=None)
        else:
            kwargs.update(type=opt.type, default=opt.default)
            if opt.choices:
                kwargs["choices"] = opt.choices
        if opt.spelling.positional:
            parser.add_argument(opt.name, **kwargs)
            continue
        required = opt.required or (flame and opt.spelling.flame_required)
        parser.add_argument(*opt.flags(flame), dest=opt.name, required=required, **kwargs)


def from_namespace(cls: type, parsed: argparse.Namespace, **given: Any) -> Any:
    """The options object for what argparse parsed (each value in the field's unit); ``given`` set besides."""
    values = {}
    for opt in command_options(cls):
        if opt.name in given or not hasattr(parsed, opt.name):
            continue
        value = getattr(parsed, opt.name)
        if opt.repeated:
            value = tuple(value or ())
        if opt.spelling.unit != 1 and value is not None:
            value = int(value * opt.spelling.unit)
        values[opt.name] = value
    return cls(**values, **given)
