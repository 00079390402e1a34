"""The guard's settings, declared once.

``GuardConfig`` is the declaration: each field's name, type, default and help (the docstring under the
field), checked in ``__post_init__``. Hosts carry the settings as ``checkpoint.<name>`` and derive their
forms from it: flame's argparse/TOML JobConfig (``flame_ext.flame.config``) from ``guard_options()``,
torchtitan 0.3's nested ``Config`` (``flame_ext.titan.v03``) from ``host_config()``, torchtitan 0.1's job
config by subclassing. A new setting is one new field here, with its docstring and its check.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from flame_ext.declaration import field_default, field_docs, value_type
from flame_ext.errors import GuardConfigError, short_value

__all__ = ["GuardConfig", "GuardOption", "guard_options", "field_docs", "host_config"]


@dataclass
class GuardConfig:
    """The guard's settings; hosts carry them as ``checkpoint.<name>`` (flame TOML, torchtitan Config)."""

    validate_initial_load: bool = False
    """Check the first load of training (the step-0 folder, initial_load_path or the HF assets) before step 1:
    key/shape/dtype parity with the checkpoint, non-persistent buffers, and the step-0 loss against the HF
    reference; abort every rank on a gap. With it on, every save records fingerprints of what it saved in the
    step folder's flame_ext.json, and every resume is checked against them (verify_resumes) and has its
    buffers checked (check_buffers_on_every_load)."""
    initial_load_max_loss_delta: float = 0.1
    """Largest |step-0 loss - HF reference loss|, in nats, that still counts as a correct load."""
    initial_load_reference: str | None = None
    """Manifest or `flame-ext reference` file to compare the step-0 loss with; default: the flame_ext.json in
    the checkpoint being loaded."""
    initial_load_repair_buffers: bool = True
    """Recompute wrong non-persistent buffers (RoPE inv_freq) from the config instead of failing."""
    initial_load_verify_values: bool | None = None
    """Verify every loaded tensor exactly against the fingerprints recorded at conversion, on every rank.
    Unset: verify when the reference has fingerprints (a loaded tensor without one: a warning); true: require one for
    every loaded tensor; false: skip (the loss gate still runs)."""
    initial_load_plot: str | None = None
    """PNG file for the per-position step-0 loss against the HF reference (rank 0 writes it; needs flame-ext[plot])."""
    check_buffers_on_every_load: bool = True
    """Check the non-persistent buffers (RoPE inv_freq) after every load, resumes included, not only the first;
    repaired when initial_load_repair_buffers is on, each repair logged."""
    verify_resumes: bool = True
    """After a resume, verify every loaded tensor (model, optimizer, other state) and every non-tensor state
    against the fingerprints and digests recorded when that step was saved; stop every rank before the next step
    on a difference. A step folder without the record resumes with a warning."""
    initial_load_max_token_delta: float = 0.1
    """Largest mean, over the reference batch's tokens, of |a token's step-0 loss - its HF reference loss|, in
    nats, that still counts as a correct load: errors of opposite sign cancel in the mean loss, never here."""

    def __post_init__(self) -> None:
        for name in (
            "validate_initial_load",
            "initial_load_repair_buffers",
            "check_buffers_on_every_load",
            "verify_resumes",
        ):
            if not isinstance(getattr(self, name), bool):
                raise GuardConfigError(f"checkpoint.{name} = {short_value(getattr(self, name))}: must be true or false")
        verify = self.initial_load_verify_values
        if verify is not None and not isinstance(verify, bool):
            raise GuardConfigError(
                f"checkpoint.initial_load_verify_values = {short_value(verify)}: must be true, false, or unset "
                "(unset: verify when the reference has fingerprints)"
            )
        delta = self.initial_load_max_loss_delta
        if not _finite_number(delta) or delta < 0:
            raise GuardConfigError(
                f"checkpoint.initial_load_max_loss_delta = {short_value(delta)}: must be a finite number of nats >= 0 "
                "(default 0.1)"
            )
        self.initial_load_max_loss_delta = float(delta)
        tokens = self.initial_load_max_token_delta
        if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not math.isfinite(tokens) or tokens < 0:
            raise GuardConfigError(
                f"checkpoint.initial_load_max_token_delta = {tokens!r}: must be a finite number of nats >= 0 "
                f"(default {type(self).initial_load_max_token_delta})"
            )
        self.initial_load_max_token_delta = float(tokens)
        ref = self.initial_load_reference
        if ref is not None and (not isinstance(ref, str) or not ref.strip()):
            raise GuardConfigError(
                f"checkpoint.initial_load_reference = {short_value(ref)}: must be a file path or unset"
            )
        if ref is not None:
            self.initial_load_reference = _user_path("initial_load_reference", ref)
        self._check_plot()

    def _check_plot(self) -> None:
        plot = self.initial_load_plot
        if plot is None:
            return
        if not isinstance(plot, str) or not plot.strip().lower().endswith(".png"):
            raise GuardConfigError(
                f"checkpoint.initial_load_plot = {short_value(plot)}: must be a file path ending in .png, or unset"
            )
        from flame_ext.io.plot import matplotlib_missing

        if matplotlib_missing():
            raise GuardConfigError(
                f"checkpoint.initial_load_plot = {plot!r}: drawing needs matplotlib: pip install flame-ext[plot]"
            )
        self.initial_load_plot = _user_path("initial_load_plot", plot)

    @classmethod
    def from_section(cls, section: Any) -> GuardConfig:
        """Read the fields from a host's checkpoint config; a stock config without them means "off"."""
        defaults = cls()
        return cls(**{name: getattr(section, name, getattr(defaults, name)) for name in asdict(defaults)})


def _finite_number(value: Any) -> bool:
    """A number that is finite as a float: a TOML integer of 400 digits is not (``float()`` of it overflows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _user_path(name: str, value: str) -> str:
    """A path setting with ``~`` and ``~user`` expanded; a user this machine does not know is a config error."""
    if "\x00" in value:
        raise GuardConfigError(f"checkpoint.{name} = {short_value(value)}: a path cannot hold a NUL character")
    try:
        return str(Path(value.strip()).expanduser())
    except RuntimeError as exc:  # "Could not determine home directory."
        raise GuardConfigError(
            f"checkpoint.{name} = {short_value(value)}: {value.strip().split('/')[0]} is not a user on this machine "
            "(cannot expand ~); give the path without it"
        ) from exc


@dataclass(frozen=True)
class GuardOption:
    """One setting as a host spells it: name under ``[checkpoint]``, value type, default, help text.

    ``type`` is the type of a given value (``str`` for a path that may be unset); ``annotation`` the full
    type of the field (``str | None``).
    """

    name: str
    type: type
    default: Any
    help: str
    annotation: Any


def guard_options(declaration: type = GuardConfig) -> tuple[GuardOption, ...]:
    """Every field of the declaration, in order: what each host form is generated from."""
    hints = typing.get_type_hints(declaration)
    docs = field_docs(declaration)
    options = []
    for f in fields(declaration):
        if f.name not in docs:
            raise TypeError(f"{declaration.__name__}.{f.name}: give the field a docstring (it is the option's help)")
        default = field_default(f)
        options.append(GuardOption(f.name, value_type(hints[f.name]), default, docs[f.name], hints[f.name]))
    return tuple(options)


def host_config(base: type, *, qualname: str, module: str, declaration: type[GuardConfig] = GuardConfig) -> type:
    """``base`` (a host's keyword-only, slotted config dataclass) with the guard's fields added.

    The fields' help goes into the class docstring's ``Attributes:`` section, where torchtitan's CLI (tyro)
    reads it; ``__post_init__`` runs the base's checks, then the declaration's, and keeps the normalised values.
    """
    options = guard_options(declaration)

    def __post_init__(self: Any) -> None:
        base_post_init = getattr(base, "__post_init__", None)
        if base_post_init is not None:
            base_post_init(self)
        checked = declaration.from_section(self)
        for opt in options:
            setattr(self, opt.name, getattr(checked, opt.name))

    attributes = "".join(f"\n    {opt.name}: {opt.help}" for opt in options)
    doc = f"{base.__qualname__} with the flame-ext initial-load guard's settings.\n\nAttributes:{attributes}\n"
    return make_dataclass(
        qualname.rsplit(".", 1)[-1],
        [(opt.name, opt.annotation, field(default=opt.default)) for opt in options],
        bases=(base,),
        namespace={"__post_init__": __post_init__, "__doc__": doc, "__module__": module, "__qualname__": qualname},
        kw_only=True,
        slots=True,
    )
