"""Every command's options, declared once: one dataclass per command.

Each field is one option: its type (a ``Literal`` lists the choices), its default, the docstring under it (the
``--help`` text) and its check in ``__post_init__`` (an ``InputError``: one line, exit 2). ``flame_ext.cli`` and
flame's drop-ins derive their argparse options, flame's underscored aliases and the help from these classes
(``flame_ext.declaration``); the commands take the objects, never argparse's namespace.

The checks here are the cheap ones (names, numbers, choices, whether a local folder exists) and run before
torch or transformers is imported, so a mistyped path is reported at once. Only a ``cuda`` request imports torch
here, to ask it for a GPU, after every other check.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from flame_ext.declaration import NOT_AN_OPTION, cli
from flame_ext.errors import InputError
from flame_ext.io.destination import check_destination

__all__ = [
    "ConvertOptions",
    "DemoOptions",
    "DiagnoseOptions",
    "DTYPES",
    "DEVICES",
    "Device",
    "Dtype",
    "FlameDumpStep",
    "HeadType",
    "LAYOUT_NAMES",
    "PatchOptions",
    "ReferenceOptions",
    "ToHFOptions",
    "check_device",
    "check_layout",
    "check_model_name",
    "looks_local",
]

MiB = 1024 * 1024
DEFAULT_BUFFER_BYTES = 256 * MiB

Dtype = Literal["auto", "bfloat16", "float32"]
"""auto: the source's (or the checkpoint's) own dtype"""
Device = Literal["auto", "cpu", "cuda"]
"""auto: cuda when torch sees a GPU, else cpu"""
HeadType = Literal["linear", "mlp"]
DTYPES: tuple[str, ...] = get_args(Dtype)
DEVICES: tuple[str, ...] = get_args(Device)
# The key layouts a checkpoint is written in (``flame_ext.io.dcp.LAYOUTS`` maps each to its key prefix).
LAYOUT_NAMES = ("flat", "nested")


def looks_local(name: str) -> bool:
    """A model name that can only be a local path (a hub id is ``org/name``): absent, it is a missing folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name


def check_model_name(flag: str, name: str | None) -> None:
    """``--model``/``--config``: a local folder, or a hub id (fetched later); a missing local folder or a file is
    refused here, before anything heavy is imported."""
    if name is None:
        return
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{flag}: give an HF model folder or hub id")
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise InputError(f"{name}: is a file; expected an HF model folder (config.json + weights) or a hub id")
    if looks_local(name):
        raise InputError(f"{name}: no such folder")


NATIVE_PREFIX = "torchtitan:"  # torchtitan's own key names (``flame_ext.titan.native``)


def check_layout(layout: str) -> None:
    if layout.startswith(NATIVE_PREFIX):
        if not layout[len(NATIVE_PREFIX) :]:
            raise InputError(f"--layout {layout!r}: name torchtitan's model module, e.g. torchtitan:llama3")
        return
    if layout not in LAYOUT_NAMES:
        raise InputError(
            f"--layout {layout!r}: choose one of {', '.join(LAYOUT_NAMES)}, or torchtitan:<module> (torchtitan's own "
            "key names, e.g. torchtitan:llama3, with --titan-config)"
        )


def _check_allowed_mismatch(layout: str) -> None:
    if not layout.startswith(NATIVE_PREFIX):
        raise InputError("--allow-config-mismatch is for --layout torchtitan:<module> (a torchtitan config)")
    # The field names are checked by the config check itself (flame_ext.checks.config.native), which lists the
    # fields it compares, before anything is planned or written.


def _check_choice(flag: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{flag} {value!r}: choose one of {', '.join(choices)}")


def _check_number(flag: str, value: object, *, least: float, what: str = "") -> None:
    """A finite number (not a bool) >= ``least``; ``what`` it must be, for the message (a count: none)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= least
    if not ok:
        raise InputError(
            f"{flag} {value}: must be {what} >= {least:g}" if what else f"{flag} {value}: must be at least {least:g}"
        )


def _check_folder(value: str) -> None:
    """A checkpoint folder to read must exist (named by its path: a drop-in names it by --path and --step)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise InputError(f"{value}: no such folder")
    if not path.is_dir():
        raise InputError(f"{value}: is a file; expected a DCP checkpoint folder")


def _check_file(flag: str, value: str | None) -> None:
    if value is None:
        return
    path = Path(value).expanduser()
    if not path.exists():
        raise InputError(f"{flag} {value}: no such file")
    if not path.is_file():  # a device or a FIFO would be read without end
        raise InputError(f"{flag} {value}: not a regular file; give a text file")


def check_device(device: str) -> None:
    """``cuda`` is refused here, one line, when torch sees no GPU (torch is imported only for that question)."""
    _check_choice("--reference-device", device, DEVICES)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--reference-device cuda: torch sees no GPU here; use cpu or auto")


@dataclass(kw_only=True)
class ReferenceBatchOptions:
    """The reference batch and where the HF model runs on it: shared by ``convert`` and ``reference``."""

    reference_text: str | None = None
    """text file for the reference batch (default: bundled prose)"""
    reference_seq_len: int = 512
    """tokens per reference row"""
    reference_rows: int = 2
    """rows of the reference batch, cut from consecutive stretches of the text"""
    reference_device: Device = "auto"
    """where the reference forward runs; auto: cuda when torch sees a GPU, else cpu"""

    def _check_reference_batch(self) -> None:
        _check_file("--reference-text", self.reference_text)
        _check_number("--reference-seq-len", self.reference_seq_len, least=2)
        _check_number("--reference-rows", self.reference_rows, least=1)
        _check_choice("--reference-device", self.reference_device, DEVICES)


@dataclass
class ConvertOptions(ReferenceBatchOptions):
    """``flame-ext convert``: HF folder or hub id -> DCP folder (+ ``flame_ext.json``)."""

    model: str = field(metadata=cli(required=False))  # its absence is explained in __post_init__
    """HF model folder or hub id (required; `flame-ext demo` shows the embedded model)"""
    checkpoint: str
    """output DCP folder (written atomically): absent, an empty folder, or with --force a DCP checkpoint"""
    dtype: Dtype = "auto"
    """dtype of the checkpoint's tensors: auto (the source's own), bfloat16 or float32"""
    layout: str = field(default="flat", metadata=cli(metavar="{flat,nested,torchtitan:MODULE}"))
    """key layout: flat (HF names: what torchtitan's model-only step-0 load asks for), nested (model.-prefixed), or
    torchtitan:<module> (torchtitan's own model and key names, e.g. torchtitan:llama3; with --titan-config)"""
    titan_config: str | None = None
    """with --layout torchtitan:<module>: the config function the run passes as torchtitan's --config (e.g.
    llama3_8b); it chooses the model whose state-dict adapter maps the keys"""
    allow_config_mismatch: tuple[str, ...] = field(default=(), metadata=cli(metavar="FIELD"))
    """with --layout torchtitan:<module>: a config field (HF name, e.g. rope_theta) on which the torchtitan config
    may differ from the HF config, deliberately: a warning instead of a refusal (repeatable)"""
    reference: bool = field(default=True, metadata=cli(flag="--no-reference", negate=True))
    """the HF reference loss on the reference batch, recorded for the training guard and diagnose --loss
    (--no-reference: skip it)"""
    trust_remote_code: bool = False
    """allow the model's own code to run"""
    include_future_predictor: bool = False
    """add a freshly initialised future-predictor head"""
    future_predictor_head_type: HeadType = "linear"
    """the future-predictor head's type, with --include-future-predictor"""
    force: bool = False
    """replace an existing DCP checkpoint (never anything else: refused, exit 2)"""
    buffer_bytes: int = field(default=DEFAULT_BUFFER_BYTES, metadata=cli(flag="--buffer-mb", unit=MiB))
    """memory for tensor data in flight, MiB"""
    record_sha256: bool = False
    """record a SHA-256 of every file written in flame_ext.json, for `diagnose --files` (costs a read-back)"""
    timeout_s: float = 300.0
    """under torchrun: seconds a rank waits for the others before giving up"""
    progress: bool = field(default_factory=sys.stderr.isatty, metadata=NOT_AN_OPTION)
    """show progress bars (default: when stderr is a terminal)"""

    def __post_init__(self) -> None:
        if not self.model:
            raise InputError("--model is required; `flame-ext demo` shows the embedded model")
        _check_choice("--dtype", self.dtype, DTYPES)
        check_layout(self.layout)
        if self.layout.startswith(NATIVE_PREFIX) and self.include_future_predictor:
            raise InputError("--include-future-predictor is for HF-named checkpoints, not --layout torchtitan:*")
        if not self.layout.startswith(NATIVE_PREFIX) and self.titan_config is not None:
            raise InputError("--titan-config names the torchtitan config of --layout torchtitan:<module>; give both")
        if self.allow_config_mismatch:
            _check_allowed_mismatch(self.layout)
        _check_choice("--future-predictor-head-type", self.future_predictor_head_type, get_args(HeadType))
        _check_number("--timeout-s", self.timeout_s, least=0)
        if self.timeout_s <= 0:
            raise InputError(f"--timeout-s {self.timeout_s}: must be positive")
        if self.buffer_bytes < 1024:
            raise InputError(f"buffer of {self.buffer_bytes} bytes: must be at least 1 KiB")
        self._check_reference_batch()
        check_destination(self.checkpoint, kind="dcp", force=self.force)  # the destination's message comes first
        check_model_name("--model", self.model)
        if self.reference:
            check_device(self.reference_device)  # refused before anything is written

    @property
    def future_predictor(self) -> HeadType | None:
        """The head to add, or None."""
        return self.future_predictor_head_type if self.include_future_predictor else None


@dataclass
class ToHFOptions:
    """``flame-ext to-hf``: DCP folder + HF config folder -> HF folder (safetensors shards, config, tokenizer)."""

    checkpoint: str
    """DCP folder: flat or nested, model-only or full training checkpoint"""
    config: str | None = field(metadata=cli(required=True))
    """HF model folder or hub id (or a folder with config.json) the checkpoint was made for"""
    out: str
    """output HF folder (written atomically; must be absent, an empty folder, or with --force an HF folder)"""
    dtype: Dtype = "auto"
    """dtype of the written tensors: auto (the checkpoint's own), bfloat16 or float32"""
    force: bool = False
    """replace an HF folder written by to-hf (never anything else: exit 2)"""
    trust_remote_code: bool = False
    """allow the model's own code to run (to build the model the config names)"""
    max_shard_bytes: int = field(default=5 * 1024 * MiB, metadata=cli(flag="--max-shard-mb", unit=MiB, unit_type=float))
    """largest safetensors shard, MiB; under torchrun each rank writes whole shards"""
    tokenizer: str | None = None
    """local folder to copy tokenizer files from (default: --config)"""
    buffer_bytes: int = field(default=DEFAULT_BUFFER_BYTES, metadata=cli(flag="--buffer-mb", unit=MiB))
    """rows of a tensor read at once, MiB"""
    timeout_s: float = 300.0
    """under torchrun: seconds a rank waits for the others before giving up"""
    layout: str | None = None
    """torchtitan:<module> for a checkpoint in torchtitan's own key names (a torchtitan run's step-N), with
    --titan-config; read from flame_ext.json when a native conversion recorded it"""
    titan_config: str | None = None
    """with --layout torchtitan:<module>: the run's config function (torchtitan's --config)"""
    progress: bool = field(default_factory=sys.stderr.isatty, metadata=NOT_AN_OPTION)
    """show progress bars (default: when stderr is a terminal)"""

    def __post_init__(self) -> None:
        if self.layout is not None and not self.layout.startswith(NATIVE_PREFIX):
            raise InputError(f"--layout {self.layout!r}: to-hf takes torchtitan:<module> (torchtitan's own key names)")
        if (self.layout is None) != (self.titan_config is None):
            raise InputError("--layout torchtitan:<module> and --titan-config go together")
        if not self.config:
            raise InputError("--config: required (the HF model folder or hub id, or a folder with its config.json)")
        _check_choice("--dtype", self.dtype, DTYPES)
        if self.buffer_bytes < 1024:
            raise InputError(f"buffer of {self.buffer_bytes} bytes: must be at least 1 KiB")
        if self.max_shard_bytes < 1:
            raise InputError(f"--max-shard-mb: {self.max_shard_bytes / MiB:g} is not a positive size")
        _check_number("--timeout-s", self.timeout_s, least=0)
        if self.timeout_s <= 0:
            raise InputError(f"--timeout-s {self.timeout_s}: must be positive")
        check_destination(self.out, kind="hf", force=self.force)  # the destination's message comes first
        _check_folder(self.checkpoint)
        check_model_name("--config", self.config)


@dataclass
class FlameDumpStep:
    """flame's ``convert_dcp_to_hf.py`` names the checkpoint by its dump folder and step (the drop-in's own options)."""

    path: str
    """flame dump folder holding checkpoint/step-N"""
    step: int
    """the step to convert"""
    out: str | None = None
    """output folder (default: PATH/hf-step-STEP)"""

    def __post_init__(self) -> None:
        _check_number("--step", self.step, least=0)

    @property
    def checkpoint(self) -> str:
        return str(Path(self.path) / "checkpoint" / f"step-{self.step}")

    @property
    def hf_folder(self) -> str:
        return self.out or str(Path(self.path) / f"hf-step-{self.step}")


@dataclass
class ReferenceOptions(ReferenceBatchOptions):
    """``flame-ext reference``: the reference part of the manifest alone, for checkpoints converted elsewhere."""

    model: str
    """HF model folder or hub id"""
    out: str
    """output JSON file (checked before the model runs; written atomically)"""
    dtype: Dtype = "auto"
    """the dtype the model runs in: auto (the model's own), bfloat16 or float32"""
    trust_remote_code: bool = False
    """allow the model's own code to run"""
    force: bool = False
    """replace a reference file written by `flame-ext reference` (only that)"""

    def __post_init__(self) -> None:
        _check_choice("--dtype", self.dtype, DTYPES)
        self._check_reference_batch()
        check_destination(self.out, kind="reference", force=self.force)  # the destination first: it is cheapest
        check_model_name("--model", self.model)
        check_device(self.reference_device)


@dataclass
class DiagnoseOptions:
    """``flame-ext diagnose``: a DCP checkpoint against the HF model it was made from."""

    checkpoint: str
    """DCP folder (model-only or a full training checkpoint)"""
    model: str | None = field(default=None, metadata=cli(flame_required=True))
    """HF model folder or hub id the checkpoint was made from (flame-ext diagnose: default the source recorded in
    the checkpoint's flame_ext.json)"""
    values: bool = False
    """also check every tensor's values: against the manifest's fingerprints, or the HF source with --model"""
    files: bool = False
    """also check every file byte for byte against the SHA-256 recorded by `convert --record-sha256`"""
    atol: float = 0.0
    """--values against the HF source with |ckpt - hf| <= atol + rtol |hf|"""
    rtol: float = 0.0
    """relative tolerance for --values (with --atol)"""
    loss: bool = False
    """also build the model as trainers do and compare the loss"""
    threshold: float = 0.1
    """loss gap that counts as an error, nats"""
    token_threshold: float | None = None
    """mean per-token loss gap (|observed - reference| over every token of the reference batch) that counts as an
    error, nats (default: the training guard's, checkpoint.initial_load_max_token_delta)"""
    train_config: str | None = None
    """model config the trainer builds from (file or folder; flame's --model.config) to compare with the HF one"""
    tokenizer: str | None = None
    """tokenizer folder the trainer uses (flame's --model.tokenizer_path; default: the model's)"""
    reference: str | None = None
    """reference file from `flame-ext reference` for --loss (default: the checkpoint's manifest)"""
    plot: str | None = field(default=None, metadata=cli(metavar="FILE.png"))
    """with --loss: draw the per-position loss of the HF reference and the checkpoint (needs flame-ext[plot])"""
    json: bool = False
    """print the report as JSON (docs/report-format.md; errors at exit 2 too: {"ok": false, "error": ...})"""
    trust_remote_code: bool = False
    """allow the model's own code to run"""
    buffer_bytes: int = field(default=DEFAULT_BUFFER_BYTES // 4, metadata=NOT_AN_OPTION)
    """rows of a tensor read at once by --values and --files"""

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            _check_number(f"--{name}", getattr(self, name), least=0, what="a finite number")
        _check_number("--threshold", self.threshold, least=0, what="a finite number of nats")
        if self.token_threshold is not None:
            _check_number("--token-threshold", self.token_threshold, least=0, what="a finite number of nats")
        if self.plot and not self.loss:
            raise InputError(f"--plot {self.plot}: draws the per-position loss, so it needs --loss")
        _check_folder(self.checkpoint)
        check_model_name("--model", self.model)
        _check_file("--reference", self.reference)


@dataclass
class DemoOptions:
    """``flame-ext demo``: the whole workflow on the embedded tiny model."""

    workdir: str | None = None
    """folder to work in (default: a temporary folder, removed afterwards)"""


PatchAction = Literal["apply", "check", "revert"]


@dataclass
class PatchOptions:
    """``flame-ext patch ACTION FLAME_DIR``: flame-ext's patches to a flame checkout."""

    action: PatchAction = field(metadata=cli(positional=True))
    """apply (idempotent), check (report whether they apply), revert"""
    flame_dir: str = field(metadata=cli(positional=True))
    """path to a fla-org/flame checkout (the folder holding flame/ and train.sh)"""
    patch_dir: str | None = field(default=None, metadata=NOT_AN_OPTION)
    """folder of the patches (default: the ones flame-ext ships)"""

    def __post_init__(self) -> None:
        _check_choice("patch", self.action, get_args(PatchAction))
