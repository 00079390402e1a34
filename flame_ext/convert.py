"""HF -> DCP and DCP -> HF, streaming.

The mapping is worked out from metadata first (which source tensor feeds each key the model asks for,
at which dtype), every problem with it is reported at once, and only then are tensors read, one block at
a time, straight into the output. The output folder appears only when complete (see ``destination``).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .dcp import (
    DEFAULT_BUFFER_BYTES,
    LAYOUTS,
    NON_MODEL_PREFIXES,
    WriteEntry,
    model_prefix,
    read_dcp_metadata,
    replace_dtype,
    save_streaming,
)
from .destination import atomic_folder, check_destination
from .errors import CheckpointFormatError, InputError
from .future_predictor import ATTRIBUTE as FP_ATTRIBUTE
from .future_predictor import attach_future_predictor
from .hf import HFCheckpoint, HFTensor, TensorSpec, build_meta_model, dtype_name, expected_tensors, map_tensor, hf_source, open_hf, tied_aliases
from .hf_writer import shard_plan, write_safetensors
from .manifest import FORMAT_VERSION, config_hash, write_manifest

__all__ = ["ConvertOptions", "ToHFOptions", "Summary", "convert_hf_to_dcp", "convert_dcp_to_hf", "plan_hf_to_dcp", "DTYPES"]

DTYPES = ("auto", "bfloat16", "float32")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
_MODEL_FILES = ("generation_config.json",)


@dataclass
class ConvertOptions:
    """``flame-ext convert``: HF folder or hub id -> DCP folder (+ ``flame_ext.json``)."""

    model: str | None
    checkpoint: str
    dtype: str = "auto"
    layout: str = "flat"
    reference_text: str | None = None
    reference_seq_len: int = 512
    reference: bool = True
    trust_remote_code: bool = False
    future_predictor: str | None = None  # None, "linear" or "mlp"
    force: bool = False
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.layout not in LAYOUTS:
            raise InputError(f"--layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.reference_seq_len < 2:
            raise InputError(f"--reference-seq-len {self.reference_seq_len}: must be at least 2")
        if self.buffer_bytes < 1024:
            raise InputError(f"buffer of {self.buffer_bytes} bytes: must be at least 1 KiB")


@dataclass
class ToHFOptions:
    """``flame-ext to-hf``: DCP folder + HF config folder -> HF folder (safetensors shards, config, tokenizer)."""

    checkpoint: str
    config: str | None
    out: str
    dtype: str = "auto"
    force: bool = False
    trust_remote_code: bool = False
    max_shard_bytes: int = 5 * 1024**3
    progress: bool = True
    tokenizer: str | None = None  # folder to copy tokenizer files from (default: ``config``)
    buffer_bytes: int = DEFAULT_BUFFER_BYTES  # rows of a tensor read at once

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.buffer_bytes < 1024:
            raise InputError(f"buffer of {self.buffer_bytes} bytes: must be at least 1 KiB")


@dataclass
class Summary:
    """What a conversion wrote and what it cost."""

    destination: Path
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    def line(self) -> str:
        return (
            f"wrote {self.destination}: {self.tensors} tensors, {self.parameters:,} parameters, "
            f"{self.bytes / 1e6:,.1f} MB in {self.seconds:.1f} s, peak RSS {self.peak_rss_mb:,.0f} MB"
        )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Progress:
    """A tqdm bar over bytes when asked for (and when stderr is a terminal or the caller insists)."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- HF -> DCP


def _reader(t: HFTensor, dtype: str) -> Any:
    out_dtype = getattr(torch, dtype)

    def read_rows(start: int, end: int) -> torch.Tensor:
        if not t.spec.shape:
            return map_tensor(t).to(out_dtype)
        if getattr(torch, t.spec.dtype) == out_dtype:
            return map_tensor(t, (start, end))  # pages of the source file, passed on without a copy
        # A dtype change converts the source in slices into the result, so a whole source block (twice
        # the size of the result for float32 -> bfloat16) is never mapped beside it.
        out = torch.empty((end - start, *t.spec.shape[1:]), dtype=out_dtype)
        step = max(1, (end - start) // 8)
        for a in range(start, end, step):
            b = min(a + step, end)
            out[a - start : b - start] = map_tensor(t, (a, b))
        return out

    return read_rows


def _fresh_reader(value: torch.Tensor) -> Any:
    return lambda start, end: value[start:end] if value.dim() else value


def plan_hf_to_dcp(
    hf: HFCheckpoint, model: torch.nn.Module, *, dtype: str, layout: str, fresh: dict[str, torch.Tensor]
) -> tuple[list[WriteEntry], list[str]]:
    """Map every key the model asks for to its source; raise once listing every key that cannot be fed."""
    expected = expected_tensors(model)
    aliases = tied_aliases(model)
    base_prefix = getattr(model, "base_model_prefix", "model") + "."
    entries: list[WriteEntry] = []
    missing, shape_errors, used = [], [], set()
    for key, spec in expected.items():
        out_key = LAYOUTS[layout] + key
        if key in fresh:
            value = fresh[key]
            entries.append(WriteEntry(out_key, TensorSpec(tuple(value.shape), dtype_name(value.dtype)), _fresh_reader(value)))
            continue
        src = hf_source(key, hf, aliases, base_prefix)
        if src is None:
            missing.append(key)
            continue
        if src.spec.shape != spec.shape:
            shape_errors.append(f"{key}: HF file has {src.spec.shape}, model asks for {spec.shape}")
            continue
        used.add(src.key)
        out_spec = replace_dtype(src.spec, None if dtype == "auto" else dtype)
        entries.append(WriteEntry(out_key, out_spec, _reader(src, out_spec.dtype)))
    if missing or shape_errors:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys the model asks for are not in the HF files: {', '.join(sorted(missing))}")
        if shape_errors:
            parts.append(f"{len(shape_errors)} shape mismatches: {'; '.join(shape_errors)}")
        raise CheckpointFormatError(f"{hf.source}: cannot convert: " + " | ".join(parts))
    notes = [f"HF tensor {k} is not asked for by {type(model).__name__}; not written" for k in sorted(set(hf.tensors) - used)]
    return entries, notes


def _fresh_tensors(model: torch.nn.Module, head_type: str | None, dtype: str) -> dict[str, torch.Tensor]:
    """Attach the future predictor on ``meta`` (for the keys) and initialise a real copy (for the values)."""
    if head_type is None:
        return {}
    attach_future_predictor(model, head_type)
    torch.manual_seed(0)  # fresh but reproducible: the same conversion writes the same bytes
    from .future_predictor import FuturePredictorHead

    head = FuturePredictorHead(model.config.hidden_size, head_type)  # type: ignore[arg-type]
    out_dtype = getattr(torch, "float32" if dtype == "auto" else dtype)
    return {f"{FP_ATTRIBUTE}.{k}": v.detach().to(out_dtype) for k, v in head.state_dict().items()}


def _reference_dtype(hf: HFCheckpoint, entries: list[WriteEntry]) -> str:
    floats = [e.spec.dtype for e in entries if getattr(torch, e.spec.dtype).is_floating_point]
    return max(set(floats), key=floats.count) if floats else "float32"


def convert_hf_to_dcp(opts: ConvertOptions) -> Summary:
    """Convert; returns the summary. Raises ``FlameExtError`` for anything the user can fix.

    The plan comes first, from the model class built on ``meta`` (so every missing key is reported before
    a byte is written). Building it while already streaming a guessed plan was tried and dropped: the
    import's Python work and the writer threads' Python work share one GIL, and on two cores the overlap
    made the conversion slower, not faster.
    """
    t0 = time.perf_counter()
    check_destination(opts.checkpoint, force=opts.force)
    hf = open_hf(opts.model)
    model = build_meta_model(hf, trust_remote_code=opts.trust_remote_code)
    fresh = _fresh_tensors(model, opts.future_predictor, opts.dtype)
    entries, notes = plan_hf_to_dcp(hf, model, dtype=opts.dtype, layout=opts.layout, fresh=fresh)
    parameters = _parameter_count(model, entries, LAYOUTS[opts.layout])
    summary = Summary(Path(opts.checkpoint).absolute(), notes=notes, parameters=parameters)
    total = sum(e.spec.nbytes for e in entries)
    with atomic_folder(opts.checkpoint, force=opts.force) as tmp:
        bar = _Progress(total, opts.progress, "convert")
        try:
            save_streaming(tmp, entries, buffer_bytes=opts.buffer_bytes, on_written=bar.update)
        finally:
            bar.close()
        reference = None
        if opts.reference:
            from .reference import compute_reference

            reference = compute_reference(
                hf,
                text_path=opts.reference_text,
                seq_len=opts.reference_seq_len,
                dtype=_reference_dtype(hf, entries),
                trust_remote_code=opts.trust_remote_code,
            )
        summary.manifest = _manifest(hf, opts, entries, fresh, reference, parameters)
        write_manifest(tmp, summary.manifest)
    summary.tensors = len(entries)
    summary.bytes = total
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_mb = _peak_rss_mb()
    return summary


def _parameter_count(model: torch.nn.Module, entries: list[WriteEntry], prefix: str) -> int:
    """Elements of the model's state, a tied pair counted once (as ``model.num_parameters()`` counts it).

    The checkpoint holds both names of a tied tensor (the load asks for both), but it is one parameter.
    """
    aliases = {prefix + k for k in tied_aliases(model)}
    return sum(e.spec.numel for e in entries if e.key not in aliases)


def _manifest(
    hf: HFCheckpoint, opts: ConvertOptions, entries: list[WriteEntry], fresh: dict, reference: dict | None, parameters: int
) -> dict:
    prefix = LAYOUTS[opts.layout]
    return {
        "format_version": FORMAT_VERSION,
        "kind": "checkpoint",
        "tool_version": __version__,
        "source": {
            "model": hf.source,
            "path": str(hf.path),
            "revision": hf.revision,
            "model_type": hf.model_type,
            "architectures": hf.config.get("architectures"),
            "config_sha256": config_hash(hf.config),
        },
        "layout": opts.layout,
        "dtype": opts.dtype,
        "tensors": {e.key: {"shape": list(e.spec.shape), "dtype": e.spec.dtype, "numel": e.spec.numel} for e in entries},
        "total_parameters": parameters,
        "fresh_keys": sorted(prefix + k for k in fresh),
        "future_predictor": opts.future_predictor,
        "reference": reference,
    }


# ---------------------------------------------------------------- DCP -> HF


def _config_folder(config: str | None) -> Path:
    path = Path(config) if config else None
    if path is None:
        raise InputError("--config: required (the HF model folder or a folder with its config.json)")
    if not path.is_dir():
        raise InputError(f"{config}: no such folder (expected an HF model folder or a folder with config.json)")
    if not (path / "config.json").is_file():
        raise InputError(f"{config}: no config.json")
    return path


def _meta_model_from_config(folder: Path, trust_remote_code: bool) -> torch.nn.Module:
    config = json.loads((folder / "config.json").read_text())
    stub = HFCheckpoint(str(folder), folder, None, config, {}, "none")
    return build_meta_model(stub, trust_remote_code=trust_remote_code)


def convert_dcp_to_hf(opts: ToHFOptions) -> Summary:
    """DCP (flat or nested, model-only or full training checkpoint) -> HF folder, one block of rows at a time."""
    from .dcp import DCPRowReader

    t0 = time.perf_counter()
    check_destination(opts.out, force=opts.force)
    ckpt = Path(opts.checkpoint)
    found = read_dcp_metadata(ckpt)
    config_dir = _config_folder(opts.config)
    tokenizer_dir = _tokenizer_folder(opts.tokenizer, config_dir)
    model = _meta_model_from_config(config_dir, opts.trust_remote_code)
    aliases = tied_aliases(model)
    wanted = {k: s for k, s in expected_tensors(model).items() if k not in aliases}  # HF files omit tied twins
    prefix = model_prefix(found, wanted)
    missing = [k for k in wanted if prefix + k not in found]
    shapes = [f"{k}: checkpoint {found[prefix + k].shape}, config asks {s.shape}"
              for k, s in wanted.items() if prefix + k in found and found[prefix + k] is not None and found[prefix + k].shape != s.shape]
    if missing or shapes:
        detail = (f"missing {len(missing)}: {', '.join(missing)}" if missing else "") + (" | " if missing and shapes else "") + "; ".join(shapes)
        raise CheckpointFormatError(f"{ckpt}: does not match the model of {config_dir}: {detail}")
    out_dtype = None if opts.dtype == "auto" else opts.dtype
    specs = {k: replace_dtype(found[prefix + k], out_dtype) for k in wanted}  # type: ignore[arg-type]
    model_keys = {prefix + k for k in wanted}
    skipped = sorted(k for k in found if k not in model_keys and not k.startswith(NON_MODEL_PREFIXES))
    summary = Summary(Path(opts.out).absolute(), notes=[f"{k}: not part of the HF model; not written" for k in skipped])
    total = sum(s.nbytes for s in specs.values())

    reader = DCPRowReader(ckpt)

    def read(key: str) -> Iterator[torch.Tensor]:
        # The block is sized at the stored dtype; a cast to a wider one at most doubles it.
        for block in reader.blocks(prefix + key, found[prefix + key], opts.buffer_bytes):  # type: ignore[arg-type]
            yield block.to(getattr(torch, specs[key].dtype))

    with atomic_folder(opts.out, force=opts.force) as tmp:
        bar = _Progress(total, opts.progress, "to-hf")
        shards = shard_plan(specs, opts.max_shard_bytes)
        names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        try:
            for name, keys in zip(names, shards):
                write_safetensors(tmp / name, {k: specs[k] for k in keys}, read, on_written=bar.update)
        finally:
            bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_config(config_dir, tmp, out_dtype)
        for folder, names in ((config_dir, _MODEL_FILES), (tokenizer_dir, _TOKENIZER_FILES)):
            for name in names:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, tmp / name)
    summary.tensors = len(specs)
    summary.parameters = sum(s.numel for s in specs.values())
    summary.bytes = total
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_mb = _peak_rss_mb()
    return summary


def _tokenizer_folder(tokenizer: str | None, config_dir: Path) -> Path:
    if tokenizer is None:
        return config_dir
    if not Path(tokenizer).is_dir():
        raise InputError(f"--tokenizer {tokenizer}: no such folder (give the local folder holding the tokenizer files)")
    return Path(tokenizer)


def _write_config(config_dir: Path, out: Path, dtype: str | None) -> None:
    """Copy config.json as is (so a round trip keeps it byte for byte), updating only a changed dtype."""
    if dtype is None:
        shutil.copy2(config_dir / "config.json", out / "config.json")
        return
    config = json.loads((config_dir / "config.json").read_text())
    for field_name in ("dtype", "torch_dtype"):
        if field_name in config:
            config[field_name] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
