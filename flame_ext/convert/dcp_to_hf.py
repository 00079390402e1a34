"""DCP -> HF, streaming: safetensors shards written one block of rows at a time, then config and tokenizer.

The checkpoint may be flat or nested, model-only or a full training checkpoint; the model the config
describes (built on ``meta``) says which keys make the HF folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flame_ext.command_options import ToHFOptions
from flame_ext.convert.summary import Progress, Summary, nonfinite_warning, peak_rss_mb
from flame_ext.errors import CheckpointFormatError, InputError, naming_file
from flame_ext.fingerprints.algorithm import Recorder, nonfinite_keys
from flame_ext.io.dcp import (
    NON_MODEL_PREFIXES,
    DCPRowReader,
    model_prefix,
    read_dcp_metadata,
    replace_dtype,
)
from flame_ext.io.destination import FILES_RECORD, atomic_folder, check_destination, write_files_record
from flame_ext.io.hf import HFCheckpoint, build_meta_model, expected_tensors, resolve_folder, tied_aliases
from flame_ext.io.hf_config import read_model_config
from flame_ext.io.manifest import MANIFEST_NAME
from flame_ext.io.safetensors_writer import shard_plan, write_safetensors
from flame_ext.io.specs import TensorSpec
from flame_ext.process import resume_collector
from flame_ext.titan.native import NativeModel, is_native

if TYPE_CHECKING:
    from flame_ext.convert.native import NativeExport

__all__ = ["ToHFOptions", "ToHFPlan", "convert_dcp_to_hf", "prepare_to_hf", "write_shards", "finish_folder"]

# Never copied from the source folder: weights in any format, their indexes, what to-hf writes itself.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".distcp")
_WRITTEN_HERE = ("config.json", MANIFEST_NAME, FILES_RECORD)


def _config_folder(config: str | None) -> Path:
    """The folder holding config.json: a local folder, or a hub id fetched (config and tokenizer only) like
    ``convert --model`` fetches a model."""
    if not config:
        raise InputError("--config: required (the HF model folder or hub id, or a folder with its config.json)")
    path, _ = resolve_folder(config, weights=False)
    if not (path / "config.json").is_file():
        raise InputError(f"{config}: no config.json")
    return path


def _meta_model_from_config(folder: Path, trust_remote_code: bool, weight_bytes: int) -> torch.nn.Module:
    """The model ``folder``'s config describes, on meta; the config is checked against the checkpoint's bytes
    first, so a config asking for an absurd model is refused before building it costs minutes."""
    config = read_model_config(folder / "config.json")
    stub = HFCheckpoint(str(folder), folder, None, config, {}, "none")
    return build_meta_model(stub, trust_remote_code=trust_remote_code, weight_bytes=weight_bytes)


@dataclass
class ToHFPlan:
    """What ``to-hf`` writes, worked out from metadata alone (every rank of a distributed run makes the same):
    the tensors at their output dtype, grouped into the shards one process writes, under the same names."""

    checkpoint: Path
    found: dict[str, TensorSpec | None]
    config_dir: Path
    tokenizer_dir: Path
    prefix: str
    specs: dict[str, TensorSpec]
    shards: list[list[str]]
    names: list[str]
    notes: list[str]
    export: NativeExport | None = None  # a checkpoint in torchtitan's own key names, exported through to_hf

    @property
    def total(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def shard_bytes(self, i: int) -> int:
        return sum(self.specs[k].nbytes for k in self.shards[i])


def prepare_to_hf(opts: ToHFOptions) -> ToHFPlan:
    """Read the checkpoint's metadata and the config, map every key; raises before anything is written."""
    ckpt = Path(opts.checkpoint)
    found = read_dcp_metadata(ckpt)  # validated: every byte range it promises exists (io.dcp_metadata)
    config_dir = _config_folder(opts.config)
    tokenizer_dir = _tokenizer_folder(opts.tokenizer, config_dir)
    weight_bytes = sum(s.nbytes for s in found.values() if s is not None)
    model = _meta_model_from_config(config_dir, opts.trust_remote_code, weight_bytes)
    aliases = tied_aliases(model)
    wanted = {k: s for k, s in expected_tensors(model).items() if k not in aliases}  # HF files omit tied twins
    native = _native_model(opts, ckpt, config_dir)
    if native is not None:
        return _prepare_native(opts, ckpt, found, config_dir, tokenizer_dir, native, wanted)
    prefix = model_prefix(found, wanted)
    missing = [k for k in wanted if prefix + k not in found]
    stored = {k: found.get(prefix + k) for k in wanted}
    shapes = [
        f"{k}: checkpoint {have.shape}, config asks {wanted[k].shape}"
        for k, have in stored.items()
        if have is not None and have.shape != wanted[k].shape
    ]
    if missing or shapes:
        detail = (
            (f"missing {len(missing)}: {', '.join(missing)}" if missing else "")
            + (" | " if missing and shapes else "")
            + "; ".join(shapes)
        )
        raise CheckpointFormatError(f"{ckpt}: does not match the model of {config_dir}: {detail}")
    out_dtype = None if opts.dtype == "auto" else opts.dtype
    specs = {k: replace_dtype(found[prefix + k], out_dtype) for k in wanted}  # type: ignore[arg-type]
    model_keys = {prefix + k for k in wanted}
    skipped = sorted(k for k in found if k not in model_keys and not k.startswith(NON_MODEL_PREFIXES))
    shards = shard_plan(specs, opts.max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    notes = [_skip_note(k, prefix, aliases) for k in skipped]
    return ToHFPlan(ckpt, found, config_dir, tokenizer_dir, prefix, specs, shards, names, notes)


def _native_model(opts: ToHFOptions, ckpt: Path, config_dir: Path) -> NativeModel | None:
    """The torchtitan model whose keys the checkpoint holds: from the options, else from its flame_ext.json."""
    from flame_ext.io.manifest import manifest_present, read_manifest
    from flame_ext.titan.native import resolve_native

    layout, config = opts.layout, opts.titan_config
    if layout is None and manifest_present(ckpt / MANIFEST_NAME):
        recorded = read_manifest(ckpt / MANIFEST_NAME)
        if is_native(recorded.get("layout")) and recorded.get("native"):
            layout, config = recorded["layout"], recorded["native"]["config"]
    return resolve_native(layout, config, str(config_dir)) if layout is not None else None


def _prepare_native(
    opts: ToHFOptions,
    ckpt: Path,
    found: dict[str, TensorSpec | None],
    config_dir: Path,
    tokenizer_dir: Path,
    native: NativeModel,
    wanted: dict[str, TensorSpec],
) -> ToHFPlan:
    """The plan for a native checkpoint: HF keys from the model's ``to_hf``, checked against the HF config's model."""
    from flame_ext.convert.native import plan_native_export

    export = plan_native_export(ckpt, found, native, None if opts.dtype == "auto" else opts.dtype)
    specs = export.hf_specs
    # The HF config's model is checked by shape only where its keys are the files' keys: transformers 5 holds an
    # MoE layer's experts fused in memory (``experts.gate_up_proj``) and converts the per-expert files on load.
    shapes = [f"{k}: to_hf gives {specs[k].shape}, config asks {s.shape}"
              for k, s in wanted.items() if k in specs and specs[k].shape != s.shape]  # fmt: skip
    if shapes:
        raise CheckpointFormatError(
            f"{ckpt}: torchtitan's {native.module} ({native.config}) does not map to the model of {config_dir}: "
            + "; ".join(shapes[:10])
            + (f" (and {len(shapes) - 10} more)" if len(shapes) > 10 else "")
        )
    shards = shard_plan(specs, opts.max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    model_keys = {export.prefix + k for k in export.stored}
    notes = [f"{export.prefix + k}: {type(native.adapter).__name__}.to_hf maps it to no HF key; not written"
             for k in export.dropped if not (native.tied() and k == "lm_head.weight")]  # fmt: skip
    notes += [f"{k}: not part of the model; not written"
              for k in sorted(found) if k not in model_keys and not k.startswith(NON_MODEL_PREFIXES)]  # fmt: skip
    return ToHFPlan(ckpt, found, config_dir, tokenizer_dir, export.prefix, specs, shards, names, notes, export)


def write_shards(
    plan: ToHFPlan,
    folder: Path,
    which: list[int],
    buffer_bytes: int,
    on_written: Callable[[int], None],
    *,
    as_read: Recorder | None = None,
) -> Recorder:
    """Write shards ``which`` of the plan into ``folder``, one block of rows at a time; returns the fingerprints
    of what was written (their non-finite counts say which tensors hold NaN or Inf, at no second read).
    ``as_read`` also gets the fingerprints of the values as stored, for tensors whose dtype the export changes."""
    # Huge pages for the blocks read (fresh allocations of tens of MB), as the DCP writer does at conversion
    # (``io.dcp_save.save_streaming``): page faults and page clearing were 6% of the export's CPU (``perf``).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    keys = [k for i in which for k in plan.shards[i]]
    recorder = Recorder({k: plan.specs[k].shape for k in keys})
    reader = DCPRowReader(plan.checkpoint)
    native_read = plan.export.reader(buffer_bytes, as_read) if plan.export is not None else None

    def read(key: str) -> Iterator[torch.Tensor]:
        if native_read is not None:  # as_read sees the native tensors as stored
            start = 0
            for block in native_read(key):
                recorder.add_rows(key, start, block)
                start += block.shape[0] if block.dim() else 1
                yield block
            return
        # The block is sized at the stored dtype; a cast to a wider one at most doubles it. A third of the
        # buffer: up to three blocks are held at once (being written, queued, being read: see _read_ahead).
        stored, start = plan.found[plan.prefix + key], 0
        for block in reader.blocks(plan.prefix + key, stored, max(1, buffer_bytes // 3)):  # type: ignore[arg-type]
            if as_read is not None and stored.dtype != plan.specs[key].dtype:  # type: ignore[union-attr]
                as_read.add_rows(key, start, block)
            block = block.to(getattr(torch, plan.specs[key].dtype))
            recorder.add_rows(key, start, block)
            start += block.shape[0] if block.dim() else 1
            yield block

    for i in which:
        # a failed write names its shard (on every rank, under torchrun)
        with naming_file(folder / plan.names[i]), _read_ahead(plan.shards[i], read) as ahead:
            write_safetensors(
                folder / plan.names[i], {k: plan.specs[k] for k in plan.shards[i]}, ahead, on_written=on_written
            )
    return recorder


_DONE = object()


@contextlib.contextmanager
def _read_ahead(
    keys: list[str], read: Callable[[str], Iterator[torch.Tensor]]
) -> Iterator[Callable[[str], Iterator[torch.Tensor]]]:
    """``read`` run one block ahead in a thread of its own, for ``keys`` in order: the next block is read, cast and
    fingerprinted while this one is written (the two overlap on two cores; in one thread the export took 1.4-1.6x
    the conversion's time at the same size). The thread runs torch single-threaded (an OpenMP team spinning
    beside the writer cost 5% of the export's CPU, by ``perf``). Its failure is raised in the writer; a writer's
    failure stops it within one block."""
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        torch.set_num_threads(1)
        try:
            for key in keys:
                for block in read(key):
                    if not put((key, block)):
                        return
                if not put((key, _DONE)):
                    return
        except BaseException as exc:  # handed to the writer
            put((None, exc))

    def take(key: str) -> Iterator[torch.Tensor]:
        while True:
            got, item = handoff.get()
            if got is None:
                raise item
            if got != key:
                raise RuntimeError(f"read ahead out of order: {got} while writing {key}")
            if item is _DONE:
                return
            yield item

    thread = threading.Thread(target=produce, name="flame-ext-read-ahead", daemon=True)
    thread.start()
    try:
        yield take
    finally:
        stop.set()
        thread.join()


def finish_folder(plan: ToHFPlan, folder: Path) -> list[str]:
    """After every shard is written: the index (when sharded), config and side files, then the record of every
    file written (what a later ``to-hf --force`` may replace); returns notes."""
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.total},
            "weight_map": {k: n for n, keys in zip(plan.names, plan.shards) for k in keys},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _write_config(plan.config_dir, folder, _dominant_dtype(plan.specs))
    notes = _copy_side_files(plan.config_dir, plan.tokenizer_dir, folder)
    write_files_record(folder)
    return notes


def nonfinite_note(plan: ToHFPlan, fingerprints: dict[str, torch.Tensor]) -> list[str]:
    """The warning naming the checkpoint's tensors that hold NaN or Inf (none: no warning)."""
    bad = nonfinite_keys(fingerprints)
    return [nonfinite_warning([plan.prefix + k for k in bad], str(plan.checkpoint))] if bad else []


def convert_dcp_to_hf(opts: ToHFOptions) -> Summary:
    """DCP (flat or nested, model-only or full training checkpoint) -> HF folder, one block of rows at a time."""
    t0 = time.perf_counter()
    check_destination(opts.out, kind="hf", force=opts.force)
    plan = prepare_to_hf(opts)
    summary = Summary(Path(opts.out).absolute(), notes=list(plan.notes))
    record = _save_time_record(plan, summary)
    as_read = Recorder(_as_read_shapes(plan)) if record is not None else None
    resume_collector()  # start-up is over: the tensor data follows
    with atomic_folder(opts.out, kind="hf", force=opts.force) as tmp:
        with Progress(plan.total, opts.progress, "to-hf") as bar:
            shards = list(range(len(plan.shards)))
            recorder = write_shards(plan, tmp, shards, opts.buffer_bytes, bar.update, as_read=as_read)
        if record is not None and as_read is not None:
            _check_against_record(plan, record, recorder, as_read, summary)  # raises: nothing is published
        summary.notes += finish_folder(plan, tmp)
    summary.warnings += nonfinite_note(plan, recorder.values)
    summary.tensors = len(plan.specs)
    summary.parameters = sum(s.numel for s in plan.specs.values())
    summary.bytes = plan.total
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_mb = peak_rss_mb()
    return summary


def _save_time_record(plan: ToHFPlan, summary: Summary) -> dict | None:
    """The step folder's save-time record when the checkpoint is a guarded run's ``step-N``, else None."""
    from flame_ext.checks.saved_state import step_record

    record, _ = step_record(plan.checkpoint)
    if record is not None:
        summary.notes.append(f"every exported tensor checked against the save-time record of step {record['step']}")
    return record


def _as_read_shapes(plan: ToHFPlan) -> dict[str, tuple[int, ...]]:
    """The tensors whose values as stored are fingerprinted while exporting: the HF keys, or a native
    checkpoint's own keys (what its save-time record names)."""
    if plan.export is not None:
        return {plan.prefix + k: s.shape for k, s in plan.export.stored.items()}
    return {k: s.shape for k, s in plan.specs.items()}


def _check_against_record(plan: ToHFPlan, record: dict, written: Recorder, as_read: Recorder, summary: Summary) -> None:
    """Each exported tensor's values as stored against the record; a difference ends the export, unpublished."""
    from flame_ext.checks.saved_state import export_problems

    observed = {}
    if plan.export is not None:
        observed = dict(as_read.values)  # every native tensor read, as stored
    for key, spec in ({} if plan.export is not None else plan.specs).items():
        cast = plan.found[plan.prefix + key].dtype != spec.dtype  # type: ignore[union-attr]
        observed[plan.prefix + key] = (as_read if cast else written).values[key]  # as stored, before any cast
    errors = [p for p in export_problems(record, observed, plan.found) if p.severity == "error"]
    if errors:
        first = errors[0]
        raise CheckpointFormatError(
            f"{plan.checkpoint}: {len(errors)} exported tensor(s) differ from the save-time record of step "
            f"{record['step']} (first: {first.key}: {first.detail}); nothing written: export another step, or "
            "restore this one from a copy"
        )
    tensors = record["fingerprints"]["tensors"]
    checked = sum(1 for k in observed if k in tensors)
    summary.notes.append(f"values: {checked} of {len(observed)} exported tensors match the save-time record")


def _copy_side_files(config_dir: Path, tokenizer_dir: Path, out: Path) -> list[str]:
    """Copy what the source folder holds besides weights: tokenizer, chat template, generation config, code,
    docs, whatever their names. With a separate tokenizer folder, the config folder gives only its
    generation config. Top-level regular files only (no subfolders: a model folder's subfolders hold other
    formats or other models); returns a note for each file left out as unsafe."""
    notes: list[str] = []
    picked: dict[str, Path] = {}
    for folder in (config_dir, tokenizer_dir) if tokenizer_dir != config_dir else (config_dir,):
        for entry in sorted(folder.iterdir()):
            name = entry.name
            if folder != tokenizer_dir and name != "generation_config.json":
                continue
            if name.startswith(".") or name in _WRITTEN_HERE or name.endswith(_WEIGHT_SUFFIXES + (".index.json",)):
                continue
            problem = _side_file_problem(folder, entry)
            if problem is None:
                picked[name] = entry
            elif problem:
                notes.append(f"{entry}: {problem}; not copied")
    for name, entry in picked.items():
        shutil.copyfile(entry, out / name)
    return notes


def _side_file_problem(folder: Path, entry: Path) -> str | None:
    """None for a file to copy; "" for a folder (silently skipped); else why it is not copied.

    A symlink is followed when it stays inside the folder, or, in a hub cache snapshot
    (``.../snapshots/REV/``), when it leads into that repository's ``blobs/`` (how the hub cache stores files).
    """
    if entry.is_symlink():
        target = entry.resolve()
        inside = [folder.resolve()]
        if folder.resolve().parent.name == "snapshots":
            inside.append(folder.resolve().parent.parent / "blobs")
        if not any(target.is_relative_to(root) for root in inside):
            return f"a symlink to {target}, outside the source folder"
    if entry.is_dir():
        return ""
    if not entry.is_file():
        return "not a regular file"
    return None


def _tokenizer_folder(tokenizer: str | None, config_dir: Path) -> Path:
    if tokenizer is None:
        return config_dir
    if not Path(tokenizer).is_dir():
        raise InputError(f"--tokenizer {tokenizer}: no such folder (give the local folder holding the tokenizer files)")
    return Path(tokenizer)


def _skip_note(key: str, prefix: str, aliases: dict[str, str]) -> str:
    name = key.removeprefix(prefix)
    if name in aliases:
        return f"{key}: tied to {aliases[name]} (the same tensor); HF files hold it once, as {aliases[name]}"
    return f"{key}: not part of the HF model; not written"


def _dominant_dtype(specs: dict[str, TensorSpec]) -> str | None:
    floats = [s.dtype for s in specs.values() if getattr(torch, s.dtype).is_floating_point]
    return max(set(floats), key=floats.count) if floats else None


def _write_config(config_dir: Path, out: Path, dtype: str | None) -> None:
    """Copy config.json as is (so a round trip keeps it byte for byte) unless the weights' dtype differs from the
    one it declares: then ``dtype`` (transformers 5) and ``torch_dtype`` (4.x) both say what the shards hold."""
    config = json.loads((config_dir / "config.json").read_text())
    declared = config.get("dtype") or config.get("torch_dtype")
    if dtype is None or declared == dtype:
        shutil.copy2(config_dir / "config.json", out / "config.json")
        return
    config["dtype"] = config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
