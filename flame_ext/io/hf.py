"""The Hugging Face side: where a model's files are, what tensors they hold, what the model class asks for.

Nothing here reads tensor data except ``read_tensor`` (a copy of one tensor, or a block of its rows) and
``map_tensor`` (the same block as a view of the file's pages, for passing bytes on without copying). Both
let go of the file with the tensor: a file handle or mapping kept open for a whole shard keeps every
page it touched resident, which is how a streaming converter quietly turns back into a whole-model-in-RAM one.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, cast

import torch

from flame_ext.errors import CheckpointFormatError, InputError, first_line, refused_global
from flame_ext.io.file_pages import map_file_bytes
from flame_ext.io.hf_config import check_config, read_json_object, read_model_config
from flame_ext.io.registry import register_model_type
from flame_ext.io.specs import SAFETENSORS_DTYPES, TensorSpec, dtype_name

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

__all__ = [
    "hf_model",
    "HFTensor",
    "HFCheckpoint",
    "DEFAULT_MODEL",
    "open_hf",
    "resolve_folder",
    "read_safetensors_header",
    "read_tensor",
    "map_tensor",
    "build_meta_model",
    "refuse_remote_code",
    "expected_tensors",
    "tied_aliases",
    "hf_source",
]

DEFAULT_MODEL = Path(__file__).parents[1] / "assets" / "tiny-olmo2"

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class HFTensor:
    """Where one tensor lives in an HF checkpoint: file, dtype, shape (from the file's header).

    ``offset`` is the absolute byte position of a safetensors tensor's data in ``file`` (None for ``.bin``).
    """

    key: str
    file: Path
    spec: TensorSpec
    offset: int | None = None


@dataclass
class HFCheckpoint:
    """An HF model folder: its config and an index of its tensors, built from file headers only."""

    source: str  # what the user named: a folder or a hub id
    path: Path  # the local folder
    revision: str | None
    config: dict
    tensors: dict[str, HFTensor]
    weight_format: str  # "safetensors" or "bin"

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))

    @property
    def torch_dtype(self) -> str | None:
        """The dtype the config declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
        value = self.config.get("dtype") or self.config.get("torch_dtype")
        return str(value).removeprefix("torch.") if value else None


def resolve_folder(model: str, *, weights: bool = True) -> tuple[Path, str | None]:
    """(folder, revision): a local folder as is; anything else is a hub id, fetched only where the user has network
    (without the weights when ``weights`` is false: config and tokenizer files only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if path.exists():
        raise InputError(f"{model}: is a file; expected an HF model folder (config.json + weights) or a hub id")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep + os.sep in model
    if looks_local:
        raise InputError(f"{model}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            model,
            allow_patterns=["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
            + ["*.safetensors"] * weights,
        )
    except Exception as exc:  # hub errors are many types; all mean "could not get it"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"{model}: not a local folder, and fetching it from the Hugging Face hub failed ({reason}); "
            "pass a local folder, or check the id and your network/HF_TOKEN"
        ) from exc
    revision = Path(folder).name  # snapshot folders are named by commit hash
    return Path(folder), revision


def read_safetensors_header(file: Path) -> dict[str, dict]:
    """Parse a safetensors header (8-byte little-endian length + JSON) and check the file holds its data."""
    return _read_header(file)[0]


def _read_header(file: Path) -> tuple[dict[str, dict], int]:
    """The header and the absolute position where the data section starts (8 + header length).

    Checked as the safetensors library checks it (``_check_header``), so no header byte or stray byte is
    ever read as a weight, and stricter in one way: a key named twice is refused (JSON would keep the last).
    """
    try:
        st = os.stat(file)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise CheckpointFormatError(f"{file}: not a regular file; expected safetensors weights")
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointFormatError(f"{file}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER or 8 + n > st.st_size:
                raise CheckpointFormatError(f"{file}: bad safetensors header (declared length {n} bytes)")
            header = json.loads(f.read(n), object_pairs_hook=_unique_keys(file))
    except OSError as exc:
        raise InputError(f"{file}: cannot read ({exc.strerror})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointFormatError(f"{file}: bad safetensors header (not JSON)") from exc
    return _check_header(file, header, st.st_size - 8 - n), 8 + n


def _unique_keys(file: Path):
    def pairs(items: list[tuple[str, object]]) -> dict:
        out = dict(items)
        if len(out) != len(items):
            twice = sorted({k for k, _ in items if sum(1 for k2, _ in items if k2 == k) > 1})
            raise CheckpointFormatError(f"{file}: bad safetensors header ({twice[0]!r} appears twice)")
        return out

    return pairs


def _check_header(file: Path, header: object, data_len: int) -> dict[str, dict]:
    """Every entry typed and sized; the spans, in offset order, tile the data section exactly."""
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{file}: bad safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise CheckpointFormatError(f"{file}: bad safetensors header (__metadata__ is not a map of strings)")
    spans = []
    for key, info in header.items():
        bad = _entry_problem(info)
        if bad:
            raise CheckpointFormatError(f"{file}: bad safetensors header entry for {key!r} ({bad})")
        start, end = info["data_offsets"]
        nbytes = TensorSpec(tuple(info["shape"]), dtype_name(SAFETENSORS_DTYPES[info["dtype"]])).nbytes
        if end - start != nbytes:
            raise CheckpointFormatError(
                f"{file}: header of {key!r} declares {end - start} bytes for shape {info['shape']} {info['dtype']} "
                f"({nbytes} bytes)"
            )
        spans.append((start, end, key))
    at = 0
    for start, end, key in sorted(spans):
        if start != at:
            what = f"bytes {at}-{start} belong to no tensor" if start > at else "it overlaps the tensor before it"
            raise CheckpointFormatError(f"{file}: bad safetensors header: {key!r} starts at byte {start}: {what}")
        at = end
    if at > data_len:
        raise CheckpointFormatError(
            f"{file}: truncated (its data section holds {data_len} bytes, the header promises {at}); "
            "re-download or re-export it"
        )
    if at < data_len:
        raise CheckpointFormatError(f"{file}: bad safetensors file: {data_len - at} bytes after its last tensor")
    return header


def _entry_problem(info: object) -> str | None:
    """What is wrong with one header entry, or None."""
    if not isinstance(info, dict):
        return "not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        return f"dtype {dtype!r} is not one of {', '.join(SAFETENSORS_DTYPES)}"
    if not isinstance(shape, list) or not all(_natural(s) for s in shape):
        return f"shape {shape!r} is not a list of integers >= 0"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
        return f"data_offsets {offsets!r} is not two integers >= 0"
    if offsets[0] > offsets[1]:
        return f"data_offsets {offsets!r} end before they start"
    return None


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _index_safetensors(folder: Path) -> dict[str, HFTensor] | None:
    index_file = folder / "model.safetensors.index.json"
    weight_map: dict[str, str] | None = None
    if index_file.is_file():
        weight_map = read_weight_map(index_file)
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    tensors: dict[str, HFTensor] = {}
    for name in files:
        header, data_start = _read_header(folder / name)
        for key, info in header.items():
            if key in tensors:
                raise CheckpointFormatError(f"{folder / name}: holds {key!r}, which {tensors[key].file.name} holds too")
            spec = TensorSpec(tuple(info["shape"]), dtype_name(SAFETENSORS_DTYPES[info["dtype"]]))
            tensors[key] = HFTensor(key, folder / name, spec, data_start + info["data_offsets"][0])
    for key, name in (weight_map or {}).items():
        if key not in tensors or tensors[key].file.name != PurePosixPath(name).name:
            raise CheckpointFormatError(f"{index_file}: says shard {name} holds {key!r}; its header does not")
    return tensors


def read_weight_map(index_file: Path) -> dict[str, str]:
    """An index's ``weight_map``: tensor name -> shard file inside the model folder, every shard present.

    A shard may be a symlink (the hub cache links snapshot files to its blob store); its name may not lead
    out of the folder.
    """
    data = read_json_object(index_file, what="weights index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f"{index_file}: not a weights index (no weight_map object)")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointFormatError(f"{index_file}: weight_map maps {key!r} to {name!r}, not a shard file name")
        if name.startswith(("/", "\\")) or ".." in PurePosixPath(name).parts or "\\" in name or "\0" in name:
            raise CheckpointFormatError(f"{index_file}: weight_map names {name!r}, outside the model folder; refused")
    for name in sorted(set(weight_map.values())):
        shard = index_file.parent / name
        if not shard.exists():
            raise CheckpointFormatError(f"{index_file}: names shard {name}, which is missing from {index_file.parent}")
        if not shard.is_file():
            raise CheckpointFormatError(f"{shard}: not a regular file; expected a weights shard")
    return weight_map


def _index_bin(folder: Path) -> dict[str, HFTensor] | None:
    """Pickled weights, opened with ``weights_only=True`` (never arbitrary unpickling) and memory-mapped."""
    index_file = folder / "pytorch_model.bin.index.json"
    if index_file.is_file():
        files = sorted(set(read_weight_map(index_file).values()))
    elif (folder / "pytorch_model.bin").is_file():
        files = ["pytorch_model.bin"]
    else:
        return None
    tensors: dict[str, HFTensor] = {}
    for name in files:
        for key, t in _load_bin(folder / name).items():
            tensors[key] = HFTensor(key, folder / name, TensorSpec(tuple(t.shape), dtype_name(t.dtype)))
    return tensors


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointFormatError(f"{file}: missing (named by the weights index)")
    import pickle

    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # A legacy (pre-zip) torch.save file: still weights_only, just not memory-mapped.
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointFormatError(
            f"{file}: refused: it pickles Python objects other than tensors "
            f"({refused_global(exc) or first_line(exc)}), and loading "
            "them could run code; .bin weights are read only with weights_only=True. "
            "Use the model's safetensors files, or convert this one with a tool you trust"
        ) from exc
    except Exception as exc:  # RuntimeError for corrupt zips, legacy formats, ...
        raise CheckpointFormatError(
            f"{file}: unreadable with weights_only=True ({first_line(exc)}); re-download it or use safetensors files"
        ) from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointFormatError(f"{file}: not a state dict of tensors")
    return sd


def open_hf(model: str | os.PathLike | None = None) -> HFCheckpoint:
    """Index an HF model folder (or hub id; default: the embedded tiny model) without reading tensor data."""
    source = str(model) if model is not None else str(DEFAULT_MODEL)
    folder, revision = resolve_folder(source)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise InputError(f"{source}: no config.json; expected an HF model folder")
    tensors = _index_safetensors(folder)
    weight_format = "safetensors"
    if tensors is None:
        tensors, weight_format = _index_bin(folder), "bin"
    if tensors is None:
        raise InputError(f"{source}: no weights (model.safetensors, an index, or pytorch_model.bin)")
    config = read_model_config(config_file)  # sizes checked here; against the weights in build_meta_model
    return HFCheckpoint(source, folder, revision, config, tensors, weight_format)


def read_tensor(t: HFTensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor, or rows [start, end) of it, opening and closing the file around the read.

    safetensors data is row-major and uncompressed, so rows [start, end) are one contiguous byte range:
    it is read with a positioned read straight into a fresh tensor. That costs the block's size in memory
    once. Going through ``safe_open`` maps the file instead, and a copy out of the mapping costs it twice
    (the touched pages stay resident in this process until the mapping goes) - measured 2x on a 400 MB
    embedding. Offsets and sizes come from the header ``open_hf`` already validated against the file size.
    """
    if t.file.suffix == ".bin" or t.offset is None:
        return _read_with_safetensors(t, rows)
    start, end = rows if rows is not None else (0, t.spec.shape[0] if t.spec.shape else 1)
    shape = (end - start, *t.spec.shape[1:]) if t.spec.shape else ()
    out = torch.empty(shape, dtype=getattr(torch, t.spec.dtype))
    row_bytes = t.spec.nbytes // t.spec.shape[0] if t.spec.shape and t.spec.shape[0] else t.spec.nbytes
    if out.numel() == 0:
        return out
    view = out.reshape(-1).view(torch.uint8).numpy().data
    with open(t.file, "rb", buffering=0) as f:  # an OSError here is the environment's, and stays one
        f.seek(t.offset + start * row_bytes)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise CheckpointFormatError(f"{t.file}: ends inside tensor {t.key}; the file changed or is truncated")
            got += n
    return out


def map_tensor(t: HFTensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows [start, end) of a safetensors tensor as a view of the file's pages, copying nothing
    (``file_pages.map_file_bytes``: unmapped when the tensor goes). ``.bin`` tensors are read as by ``read_tensor``.
    """
    if t.file.suffix == ".bin" or t.offset is None:
        return read_tensor(t, rows)
    start, end = rows if rows is not None else (0, t.spec.shape[0] if t.spec.shape else 1)
    shape = (end - start, *t.spec.shape[1:]) if t.spec.shape else ()
    row_bytes = t.spec.nbytes // t.spec.shape[0] if t.spec.shape and t.spec.shape[0] else t.spec.nbytes
    begin = t.offset + (start * row_bytes if t.spec.shape else 0)
    return map_file_bytes(t.file, begin, shape, getattr(torch, t.spec.dtype), f"tensor {t.key}")


def _read_with_safetensors(t: HFTensor, rows: tuple[int, int] | None) -> torch.Tensor:
    if t.file.suffix == ".bin":
        full = _load_bin(t.file)[t.key]
        part = full if rows is None else full[rows[0] : rows[1]]
        return part.clone()
    from safetensors import safe_open

    with safe_open(str(t.file), framework="pt") as f:
        out = f.get_tensor(t.key) if rows is None else f.get_slice(t.key)[rows[0] : rows[1]]
    return out.clone()  # out of the mapping, so its pages go when the handle does


def refuse_remote_code(checkpoint: HFCheckpoint, *, trust_remote_code: bool) -> None:
    """Stop before transformers sees a config or tokenizer that maps classes to the repository's own code."""
    if trust_remote_code:
        return
    tokenizer_config = checkpoint.path / "tokenizer_config.json"
    asks = bool(checkpoint.config.get("auto_map"))
    if not asks and tokenizer_config.is_file():
        try:
            asks = bool(json.loads(tokenizer_config.read_text()).get("auto_map"))
        except (ValueError, AttributeError):
            asks = False  # a broken tokenizer config is reported when the tokenizer is loaded
    if asks:
        raise InputError(
            f"{checkpoint.source}: its config asks for custom code (auto_map); "
            "re-run with --trust-remote-code if you trust this repository"
        )


def hf_model(model: nn.Module) -> PreTrainedModel:
    """``model`` as the HF causal LM it is (``build_meta_model``'s result, a loaded HF model): typed so, for the
    methods transformers adds (``get_input_embeddings``, ``config``). No check: a cast."""
    return cast("PreTrainedModel", model)


def build_meta_model(
    checkpoint: HFCheckpoint,
    *,
    trust_remote_code: bool = False,
    weight_bytes: int | None = None,
    dtype: str | None = None,
) -> "nn.Module":
    """The model class the trainer will build, on ``meta``: exact keys, shapes, ties and buffers, no memory.

    First the config must fit the weights (``weight_bytes``, default the checkpoint's own tensors): building
    costs Python work per layer, which an absurd config turns into minutes. With ``dtype`` the model is
    built as ``from_pretrained(dtype=...)`` builds it: parameters at ``dtype``, buffers at what the class
    gives them. That sets torch's process-wide default dtype for the build, so call it on the thread that
    owns the process, before other threads create tensors.
    """
    if dtype is not None:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            return build_meta_model(checkpoint, trust_remote_code=trust_remote_code, weight_bytes=weight_bytes)
        finally:
            torch.set_default_dtype(previous)

    from transformers import AutoConfig, AutoModelForCausalLM

    if weight_bytes is None:
        weight_bytes = sum(t.spec.nbytes for t in checkpoint.tensors.values())
    check_config(checkpoint.config, what=str(checkpoint.path / "config.json"), weight_bytes=weight_bytes)
    refuse_remote_code(checkpoint, trust_remote_code=trust_remote_code)
    register_model_type(checkpoint.model_type, checkpoint.source)
    try:
        config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, ImportError) as exc:  # ImportError: e.g. fla's Transformer wants flash-attn
        raise InputError(
            f"{checkpoint.source}: transformers cannot build a causal LM from this config "
            f"(model_type {checkpoint.model_type!r}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    return model


def expected_tensors(model: "nn.Module") -> dict[str, TensorSpec]:
    """What a load of this model asks for: its state dict (non-persistent buffers excluded), as specs."""
    return {k: TensorSpec(tuple(v.shape), dtype_name(v.dtype)) for k, v in model.state_dict().items()}


def tied_aliases(model: "nn.Module") -> dict[str, str]:
    """Keys that share a parameter with an earlier key (e.g. ``lm_head.weight`` -> embeddings) when tied."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def hf_source(key: str, hf: HFCheckpoint, tied: dict[str, str], base_prefix: str) -> HFTensor | None:
    """The HF tensor that holds ``key``: the same name, its tied twin, or the name without the base prefix."""
    group = [key] + ([tied[key]] if key in tied else []) + [k for k, v in tied.items() if v == key]
    for k in group:
        for candidate in (k, k.removeprefix(base_prefix)):
            if candidate in hf.tensors:
                return hf.tensors[candidate]
    return None


def nonpersistent_buffers(model: "nn.Module") -> list[str]:
    """Buffers no checkpoint holds: a load never restores them, so whoever builds the model must."""
    names = []
    for mod_name, mod in model.named_modules():
        for b in sorted(mod._non_persistent_buffers_set):
            if mod._buffers.get(b) is None:  # registered as None (e.g. fla's rotary ``scale`` without xPos)
                continue
            names.append(f"{mod_name}.{b}" if mod_name else b)
    return names
