"""The DCP side, reading: metadata (unpickled only through a vetted unpickler), tensors by row blocks, and the
key layouts trainers ask for. The streaming writer is ``dcp_save``; the pieces both use (row blocks, the cause
of a DCP failure, the default buffer) live here.
"""

from __future__ import annotations

import dataclasses
import mmap
import pickle
import warnings
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from flame_ext.errors import (
    CheckpointFormatError,
    FlameExtError,
    InputError,
    first_line,
    refused_global,
)
from flame_ext.io.dcp_metadata import validate_metadata
from flame_ext.io.dcp_records import mapped_blocks, stored_rows
from flame_ext.io.specs import TensorSpec, dtype_name

__all__ = [
    "LAYOUTS",
    "DEFAULT_BUFFER_BYTES",
    "root_cause",
    "rank_failures",
    "data_file_names",
    "read_dcp_metadata",
    "load_tensor",
    "load_state",
    "DCPRowReader",
    "row_blocks",
    "model_prefix",
    "NON_MODEL_PREFIXES",
]

# flat: what torchtitan asks for on a model-only load; nested: flame's stock `{"model": sd}` keys,
# which torchtitan 0.1's full-checkpoint (non model-only) load expects.
LAYOUTS = {"flat": "", "nested": "model."}
# Entries of a full training checkpoint that are not model weights.
NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.")
DEFAULT_BUFFER_BYTES = 256 * 1024 * 1024


def row_blocks(spec: TensorSpec, buffer_bytes: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) of at most ``buffer_bytes`` each (at least one row); ``[(0, 1)]`` for a 0-d tensor."""
    if not spec.shape or spec.nbytes <= buffer_bytes:
        return [(0, spec.shape[0] if spec.shape else 1)]
    row_bytes = max(1, spec.nbytes // spec.shape[0])
    step = max(1, buffer_bytes // row_bytes)
    return [(s, min(s + step, spec.shape[0])) for s in range(0, spec.shape[0], step)]


def rank_failures(exc: CheckpointException) -> dict[int, BaseException]:
    """DCP's failures of a collective step, rank -> exception (it stores ``(exception, traceback summary)`` pairs)."""
    return {r: f[0] if isinstance(f, tuple) and f else f for r, f in (getattr(exc, "failures", None) or {}).items()}


def root_cause(exc: CheckpointException, rank: int | None = None) -> BaseException:
    """DCP wraps a failure of any rank in ``CheckpointException`` (a ``BaseException``); surface the cause.

    An ``OSError`` (disk full, file size limit), one of our own errors, or a Ctrl-C (``KeyboardInterrupt``,
    which DCP catches as a ``BaseException`` and wraps like any failure) is re-raised as itself, so callers
    handle it like any other; anything else stays a ``CheckpointException``. With ``rank``, only that rank's
    failure is looked at (a rank reports its own failure, not another's).
    """
    surfaced = (OSError, FlameExtError, KeyboardInterrupt)
    for r, failure in rank_failures(exc).items():
        if rank is not None and r != rank:
            continue
        if isinstance(failure, surfaced):
            return failure
        cause = getattr(failure, "__cause__", None) or getattr(failure, "__context__", None)
        if isinstance(cause, surfaced):
            return cause
    return exc


class _RefusedGlobal(pickle.UnpicklingError):
    """``.metadata`` names a Python object outside what DCP metadata is made of."""


# Everything a DCP ``.metadata`` pickle refers to (torch 2.x, any writer: flame-ext, torchtitan, FSDP saves),
# by exact name: allowing whole modules would allow their imports too (``...checkpoint.metadata.os``).
_METADATA_GLOBALS = (
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }
    | {
        (module, name)
        for module in ("pathlib", "pathlib._local")
        for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles ``.metadata`` allowing only the classes DCP metadata is made of.

    torch's own ``FileSystemReader.read_metadata`` uses plain ``pickle.load``, which runs whatever code a
    crafted file names. Every flame-ext path reads a checkpoint's metadata through ``read_dcp_metadata``
    first, so a hostile ``.metadata`` is refused here before torch (or torchtitan's load) unpickles it.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise _RefusedGlobal(f"{module}.{name}")


def _step_hint(folder: Path) -> str:
    """``; did you mean .../step-0?`` for a trainer's checkpoint folder that holds saved steps."""
    steps = sorted(
        (int(p.name[5:]), p) for p in folder.glob("step-*") if p.name[5:].isdigit() and (p / ".metadata").is_file()
    )
    if not steps:
        return ""
    more = f" (it holds {len(steps)} saved steps, {steps[0][1].name} to {steps[-1][1].name})" if len(steps) > 1 else ""
    return f"; did you mean {steps[0][1]}?{more}"


def _unpickle_metadata(folder: Path) -> Metadata:
    """``.metadata`` unpickled with the allow-list and validated as data (``validate_metadata``); every reader of
    a checkpoint comes through here, and every problem is one ``CheckpointFormatError``."""
    if not folder.exists():
        raise InputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: is a file; expected a DCP checkpoint folder")
    if not (folder / ".metadata").exists():
        raise CheckpointFormatError(f"{folder}: not a DCP checkpoint (no .metadata file){_step_hint(folder)}")
    if not (folder / ".metadata").is_file():  # a FIFO or device would block or never end
        raise CheckpointFormatError(f"{folder}/.metadata: not a regular file; the checkpoint is corrupt")
    try:
        with open(folder / ".metadata", "rb") as f:
            md = _MetadataUnpickler(f).load()
    except _RefusedGlobal as exc:
        raise CheckpointFormatError(
            f"{folder}/.metadata: refused: it names {exc}, which DCP metadata never holds, and unpickling it could run "
            "code; do not load this checkpoint with any tool unless you trust where it came from"
        ) from exc
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointFormatError(
            f"{folder}/.metadata: unreadable ({type(exc).__name__}); the checkpoint is corrupt"
        ) from exc
    if not isinstance(md, Metadata):
        raise CheckpointFormatError(
            f"{folder}/.metadata: unreadable (holds a {type(md).__name__}); the checkpoint is corrupt"
        )
    validate_metadata(folder, md)
    return md


def read_dcp_metadata(folder: str | Path) -> dict[str, TensorSpec | None]:
    """Every key of a DCP checkpoint with its global shape and dtype (``None`` for non-tensor entries).

    Reads only ``.metadata``: no tensor data, so it costs the same for a tiny model and a 70B one. The file
    is a pickle: it is unpickled with an allow-list (see ``_MetadataUnpickler``), never as is.
    """
    out: dict[str, TensorSpec | None] = {}
    for key, item in _unpickle_metadata(Path(folder)).state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            out[key] = TensorSpec(tuple(item.size), dtype_name(item.properties.dtype))
        else:
            out[key] = None
    return out


def data_file_names(folder: str | Path) -> set[str]:
    """The names of the data files a DCP checkpoint's ``.metadata`` records (each a regular file inside the
    folder: vetted like every read): exactly the files its writer wrote besides ``.metadata``."""
    return {info.relative_path for info in _unpickle_metadata(Path(folder)).storage_data.values()}


class _VettedReader(dcp.FileSystemReader):
    """torch's ``FileSystemReader``, but ``.metadata`` is unpickled with the allow-list, and once.

    torch's own reader unpickles it as is; one reader serves the many row loads of a pass.
    """

    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder))
        self._metadata: Metadata | None = None
        self.folder = folder

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None:
            metadata = _unpickle_metadata(self.folder)
            if getattr(metadata, "storage_meta", None) is None:  # as torch's reader does
                metadata.storage_meta = StorageMeta()
            assert metadata.storage_meta is not None
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


class _RowsPlanner(DefaultLoadPlanner):
    """Loads rows [start, start + len(buffer)) of one checkpoint tensor into ``buffer``.

    The plan asks for exactly that region, as an FSDP rank asks for its shard, so DCP reads only the
    stored chunks that overlap it.
    """

    def __init__(self, key: str, start: int) -> None:
        super().__init__(allow_partial_load=True)
        self._key, self._start = key, start

    def create_local_plan(self) -> LoadPlan:
        buffer = self.state_dict[self._key]
        assert self.metadata is not None  # set by torch before it asks for the plan
        md = self.metadata.state_dict_metadata[self._key]
        assert isinstance(md, TensorStorageMetadata)  # the rows of a tensor: never bytes
        offsets = torch.Size([self._start] + [0] * (buffer.dim() - 1)) if buffer.dim() else torch.Size([])
        chunk = ChunkStorageMetadata(offsets=offsets, sizes=buffer.size())
        self.plan = LoadPlan(create_read_items_for_chunk_list(self._key, md, [chunk]))
        return self.plan

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


class DCPRowReader:
    """Reads blocks of rows of DCP tensors without a process group; ``.metadata`` is read once, vetted."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._reader = _VettedReader(self.folder)

    def rows(self, key: str, spec: TensorSpec, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of tensor ``key`` (for a 0-d tensor, the tensor)."""
        if not isinstance(self._reader.read_metadata().state_dict_metadata.get(key), TensorStorageMetadata):
            raise CheckpointFormatError(f"{self.folder}: cannot read {key} (no such tensor in the checkpoint)")
        shape = (end - start, *spec.shape[1:]) if spec.shape else ()
        buffer = torch.empty(shape, dtype=getattr(torch, spec.dtype))
        _load(self._reader, {key: buffer}, _RowsPlanner(key, start), key)
        return buffer

    def blocks(self, key: str, spec: TensorSpec, buffer_bytes: int) -> Iterator[torch.Tensor]:
        """The whole tensor as consecutive blocks of rows, each at most ``buffer_bytes``: views of the data files'
        pages where its chunks are whole rows (``dcp_records``: no read and no copy), else read through DCP."""
        chunks = stored_rows(self.folder, self._reader.read_metadata(), key) if spec.shape else None
        if chunks is not None:
            yield from mapped_blocks(chunks, spec, buffer_bytes)
            return
        for start, end in row_blocks(spec, buffer_bytes):
            yield self.rows(key, spec, start, end)

    def stream(self, specs: Mapping[str, TensorSpec], buffer_bytes: int) -> Iterator[tuple[str, int, torch.Tensor]]:
        """Every tensor of ``specs`` in turn as consecutive blocks of rows (``blocks``): (key, first row, block).

        The next block is made ready in a thread while the caller works on this one, across tensors too (a 7B's
        projections are one or two blocks each): read through DCP, or, for a view of the files' pages, its pages
        brought in from the disk. Reading and summing overlap; two blocks are in memory at most.
        """
        blocks = (
            (key, start, block)
            for key, spec in specs.items()
            for start, block in self._numbered(key, spec, buffer_bytes)
        )
        with ThreadPoolExecutor(1, thread_name_prefix="flame-ext-read") as pool:
            ahead = pool.submit(_next_paged_in, blocks)
            while (item := ahead.result()) is not None:
                ahead = pool.submit(_next_paged_in, blocks)
                yield item
                del item

    def _numbered(self, key: str, spec: TensorSpec, buffer_bytes: int) -> Iterator[tuple[int, torch.Tensor]]:
        start = 0
        for block in self.blocks(key, spec, buffer_bytes):
            yield start, block
            start += block.shape[0] if block.dim() else 1

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Fill every tensor of ``state`` (checkpoint keys) whole, strictly, as ``load_state`` does, with this
        reader's ``.metadata`` (read once for the many loads of a block-by-block pass)."""
        _load(self._reader, state, DefaultLoadPlanner(allow_partial_load=False), f"{len(state)} tensors")


def _next_paged_in(blocks: Iterator[tuple[str, int, torch.Tensor]]) -> tuple[str, int, torch.Tensor] | None:
    """The next block, its pages touched (one byte each): a view of a file's pages faults them in here, in the
    reading thread, rather than in the caller's sums; for a block already read it costs next to nothing."""
    item = next(blocks, None)
    if item is not None and item[2].numel():
        item[2].reshape(-1).view(torch.uint8)[:: mmap.PAGESIZE].sum()
    return item


def _load(reader: _VettedReader, state: dict[str, torch.Tensor], planner: DefaultLoadPlanner, what: str) -> None:
    """One ``dcp.load`` without a process group; a failure becomes one error naming ``what`` was read."""
    reader.read_metadata()  # vetted and validated here, so its errors are not wrapped by DCP's
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=True)
        except CheckpointException as exc:
            raise _read_error(reader.folder, what, exc) from exc


def load_state(folder: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Fill every tensor of ``state`` (flat checkpoint keys) from the checkpoint, strictly: each must be there."""
    _load(_VettedReader(Path(folder)), state, DefaultLoadPlanner(allow_partial_load=False), f"{len(state)} tensors")


def _read_error(folder: Path, key: str, exc: CheckpointException) -> BaseException:
    cause = root_cause(exc)
    if cause is not exc:
        return cause
    failures = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
    # torch reads records weights_only: a record naming a Python global is refused (it could run code);
    # any other failure is bytes that are not a record at all.
    if any(isinstance(f, pickle.UnpicklingError) and refused_global(f) for f in failures):
        return CheckpointFormatError(
            f"{folder}: refused to read {key}: its record in the data files pickles Python objects other than "
            "tensors, and loading them could run code; the checkpoint is corrupt or was tampered with"
        )
    first = next((f"{type(f).__name__}: {first_line(f)}" for f in failures if str(f).strip()), "unknown error")
    return CheckpointFormatError(f"{folder}: cannot read {key} ({first}); the checkpoint's data files are damaged")


def load_tensor(folder: str | Path, key: str, spec: TensorSpec) -> torch.Tensor:
    """Read one whole tensor of a DCP checkpoint (all its chunks), without a process group."""
    return DCPRowReader(folder).rows(key, spec, 0, spec.shape[0] if spec.shape else 1)


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
