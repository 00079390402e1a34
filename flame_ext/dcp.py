"""The DCP side: a streaming writer, a metadata reader, and the key layouts trainers ask for.

The writer plans a checkpoint from shapes and dtypes alone and reads each tensor only when torch's
``FileSystemWriter`` asks for it. Tensors larger than the buffer are planned as row blocks (the way an
FSDP-sharded save stores a tensor in chunks), so the largest thing in memory is one block, whatever the
model size. ``single_file_per_rank=False`` matters: with one file per rank torch keeps every tensor of
the file alive until it is closed, i.e. the whole checkpoint.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from .errors import CheckpointFormatError, FlameExtError, InputError
from .hf import TensorSpec, dtype_name

__all__ = [
    "LAYOUTS",
    "DEFAULT_BUFFER_BYTES",
    "WriteEntry",
    "save_streaming",
    "read_dcp_metadata",
    "load_tensor",
    "model_prefix",
    "NON_MODEL_PREFIXES",
]

# flat: what torchtitan asks for on a model-only load; nested: flame's stock `{"model": sd}` keys,
# which torchtitan 0.1's full-checkpoint (non model-only) load expects.
LAYOUTS = {"flat": "", "nested": "model."}
# Entries of a full training checkpoint that are not model weights.
NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.")
DEFAULT_BUFFER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class WriteEntry:
    """One tensor to write: its key, spec as written, and a reader for rows [start, end) of it."""

    key: str
    spec: TensorSpec
    read_rows: Callable[[int, int], torch.Tensor]


def _row_blocks(spec: TensorSpec, buffer_bytes: int) -> list[tuple[int, int]]:
    if not spec.shape or spec.nbytes <= buffer_bytes:
        return [(0, spec.shape[0] if spec.shape else 1)]
    row_bytes = max(1, spec.nbytes // spec.shape[0])
    step = max(1, buffer_bytes // row_bytes)
    return [(s, min(s + step, spec.shape[0])) for s in range(0, spec.shape[0], step)]


class _StreamingPlanner(DefaultSavePlanner):
    """A save planner whose plan comes from specs and whose data is read at ``resolve_data`` time."""

    def __init__(self, entries: list[WriteEntry], buffer_bytes: int, on_written: Callable[[int], None]):
        super().__init__()
        self._entries = {e.key: e for e in entries}
        self._buffer_bytes = buffer_bytes
        self._on_written = on_written

    def create_local_plan(self) -> SavePlan:
        items = []
        for e in self._entries.values():
            props = TensorProperties(dtype=getattr(torch, e.spec.dtype))
            size = torch.Size(e.spec.shape)
            for start, end in _row_blocks(e.spec, self._buffer_bytes):
                offsets = torch.Size([start] + [0] * (len(size) - 1)) if size else torch.Size([])
                sizes = torch.Size([end - start, *size[1:]]) if size else torch.Size([])
                items.append(
                    WriteItem(
                        index=MetadataIndex(e.key, offsets),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes), properties=props, size=size
                        ),
                    )
                )
        self.plan = SavePlan(items, planner_data=self.mappings)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        e = self._entries[write_item.index.fqn]
        if not e.spec.shape:
            data = e.read_rows(0, 1)
        else:
            start = write_item.index.offset[0]
            data = e.read_rows(start, start + write_item.tensor_data.chunk.sizes[0])
        expected = tuple(write_item.tensor_data.chunk.sizes)
        if tuple(data.shape) != expected or dtype_name(data.dtype) != e.spec.dtype:
            raise CheckpointFormatError(
                f"{e.key}: source gave {tuple(data.shape)} {dtype_name(data.dtype)}, planned {expected} {e.spec.dtype}"
            )
        self._on_written(data.numel() * data.element_size())
        return data.contiguous()


def save_streaming(
    folder: Path,
    entries: Iterable[WriteEntry],
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    on_written: Callable[[int], None] = lambda n: None,
    threads: int = 1,
) -> None:
    """Write ``entries`` as a DCP checkpoint into ``folder``; peak memory ~ ``threads * buffer_bytes``."""
    entries = list(entries)
    meta_sd = {e.key: torch.empty(e.spec.shape, dtype=getattr(torch, e.spec.dtype), device="meta") for e in entries}
    writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=False, thread_count=threads, sync_files=True)
    with warnings.catch_warnings():
        # "assuming the intent is to save in a single process": yes, that is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.save(meta_sd, storage_writer=writer, planner=_StreamingPlanner(entries, buffer_bytes, on_written), no_dist=True)
        except CheckpointException as exc:
            raise _root_cause(exc) from exc


def _root_cause(exc: CheckpointException) -> BaseException:
    """DCP wraps a failure of any rank in ``CheckpointException`` (a ``BaseException``); surface the cause.

    An ``OSError`` (disk full, file size limit) or one of our own errors is re-raised as itself, so callers
    handle it like any other; anything else stays a ``CheckpointException``.
    """
    for failure in getattr(exc, "failures", {}).values():
        if isinstance(failure, (OSError, FlameExtError)):
            return failure
        cause = getattr(failure, "__cause__", None) or getattr(failure, "__context__", None)
        if isinstance(cause, (OSError, FlameExtError)):
            return cause
    return exc


def read_dcp_metadata(folder: str | Path) -> dict[str, TensorSpec | None]:
    """Every key of a DCP checkpoint with its global shape and dtype (``None`` for non-tensor entries).

    Reads only ``.metadata``: no tensor data, so it costs the same for a tiny model and a 70B one.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: is a file; expected a DCP checkpoint folder")
    if not (folder / ".metadata").is_file():
        raise CheckpointFormatError(f"{folder}: not a DCP checkpoint (no .metadata file)")
    try:
        md = dcp.FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointFormatError(f"{folder}/.metadata: unreadable ({type(exc).__name__}); the checkpoint is corrupt") from exc
    out: dict[str, TensorSpec | None] = {}
    for key, item in md.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            out[key] = TensorSpec(tuple(item.size), dtype_name(item.properties.dtype))
        else:
            out[key] = None
    return out


def load_tensor(folder: str | Path, key: str, spec: TensorSpec) -> torch.Tensor:
    """Read one tensor of a DCP checkpoint (all its chunks), without a process group."""
    t = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load({key: t}, checkpoint_id=str(folder), planner=DefaultLoadPlanner(allow_partial_load=False), no_dist=True)
        except CheckpointException as exc:
            cause = _root_cause(exc)
            if cause is not exc:
                raise cause from exc
            lines = str(exc).strip().splitlines()
            raise CheckpointFormatError(f"{folder}: cannot read {key} ({lines[-1][:200] if lines else 'unknown error'})") from exc
    return t


def model_prefix(keys: Iterable[str], expected: Iterable[str]) -> str:
    """The prefix ("" or "model.") under which the expected model keys sit in a DCP checkpoint."""
    keys = set(keys)
    expected = list(expected)
    best, best_hits = "", -1
    for prefix in LAYOUTS.values():
        hits = sum(1 for k in expected if prefix + k in keys)
        if hits > best_hits:
            best, best_hits = prefix, hits
    return best


def replace_dtype(spec: TensorSpec, dtype: str | None) -> TensorSpec:
    """The spec at a requested dtype; only floating tensors change (integer tensors keep theirs)."""
    if dtype is None or not getattr(torch, spec.dtype).is_floating_point:
        return spec
    return dataclasses.replace(spec, dtype=dtype)
