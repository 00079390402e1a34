"""Randomly corrupted checkpoints: never a wrong result, never a traceback, never litter.

Seeded and bounded. Each case copies a real small checkpoint, corrupts one field of its metadata (a safetensors
header, or DCP's ``.metadata`` through the same torch classes, pickled back), runs the real command, and requires
one of two endings:

* refused: exit 2, exactly one line on stderr naming the input, no destination, nothing else in the output
  folder; this ending is *required* whenever the file is not a valid checkpoint of the model (for safetensors:
  the safetensors library refuses it, or what it reads differs from the original; for ``.metadata``: the
  mutation breaks a rule of the format, e.g. a gap, an overlap, a path out of the folder, a wrong type);
* converted: exit 0 and every tensor bit-exact; *required* for the mutations that leave a valid checkpoint
  (reordered entries, added metadata strings, header padding).

A mutation of neither kind (a record's length grown inside its file) may end either way, never otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

from tests.reliability._rel import assert_dcp_is, assert_hf_is, hf_tensors, same_bits

CASES = int(os.environ.get("FLAME_EXT_PROPERTY_CASES", "150"))
REFUSE, ACCEPT, EITHER = "refuse", "accept", "either"


def _check_ending(r, expected: str, dest: Path, names: list[str], what: str) -> str:
    leftovers = sorted(p.name for p in dest.parent.iterdir())
    if r.returncode == 2:
        assert expected != ACCEPT, f"{what}: a valid checkpoint was refused: {r.stderr[-800:]}"
        assert "Traceback" not in r.stderr and len(r.err_lines) == 1, f"{what}: {r.stderr[-2000:]}"
        assert any(n in r.err_lines[0] for n in names), f"{what}: the line names no input: {r.err_lines[0]}"
        assert leftovers == [], f"{what}: refused but left {leftovers}"
        return REFUSE
    assert r.returncode == 0, f"{what}: exit {r.returncode}\n{r.stderr[-2000:]}"
    assert expected != REFUSE, f"{what}: an invalid checkpoint was converted (exit 0)"
    assert leftovers == [dest.name], f"{what}: litter {leftovers}"
    return ACCEPT


# ---------------------------------------------------------------- safetensors headers


def _split(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(file: Path, header: dict | str, data: bytes, pad: int = 0, length_delta: int = 0) -> None:
    text = (header if isinstance(header, str) else json.dumps(header)).encode() + b" " * pad
    file.write_bytes((len(text) + length_delta).to_bytes(8, "little") + text + data)


_OTHER_SIZE_DTYPE = {"F32": ["F16", "BF16", "F64", "I8", "U8"], "BF16": ["F32", "F64", "I64", "BOOL"]}
_BAD_VALUES = [-1, -8, 1.5, "16", None, True, [], {}, 2**64]


def _mutate_header(rng: random.Random, header: dict, data: bytes) -> tuple[dict | str, bytes, dict, str]:
    """One random change: (header, data, file-level extras, kind) where kind says what the format makes of it."""
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    op = rng.randrange(14)
    if op == 0:  # move one end of a span
        entry["data_offsets"][rng.randrange(2)] += rng.choice([-1, 1]) * rng.randint(1, 64)
    elif op == 1:
        entry["data_offsets"][rng.randrange(2)] = rng.choice(_BAD_VALUES)
    elif op == 2:
        entry["data_offsets"] = rng.choice([[0], [0, 4, 8], "0-4", None, entry["data_offsets"][::-1]])
    elif op == 3:
        entry["dtype"] = rng.choice(_OTHER_SIZE_DTYPE.get(entry["dtype"], ["F64"]) + ["f32", "F12", "", 7, None])
    elif op == 4:
        shape = entry["shape"]
        shape.insert(rng.randrange(len(shape) + 1), rng.choice([2, 3, 0]))
    elif op == 5 and entry["shape"]:
        i = rng.randrange(len(entry["shape"]))
        entry["shape"][i] = rng.choice([entry["shape"][i] + rng.choice([-1, 1, 7]), -entry["shape"][i], 2.0, "4"])
    elif op == 6:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 7:
        header[key] = rng.choice([[1, 2], "tensor", 3, None])
    elif op == 8:  # a key named twice (the second copy a span elsewhere)
        text = json.dumps(header)
        return text[:-1] + f", {json.dumps(key)}: {json.dumps(entry)}}}", data, {}, "duplicate"
    elif op == 9:
        header["__metadata__"] = rng.choice([{"format": 1}, ["pt"], "pt", {"a": None}])
    elif op == 10:
        return rng.choice([[], "header", 3]), data, {}, "invalid"
    elif op == 11:  # the length prefix off, or the data cut or grown
        choice = rng.randrange(3)
        if choice == 0:
            return header, data, {"length_delta": rng.choice([-3, -1, 1, 5])}, "invalid"
        if choice == 1:
            return header, data[: -rng.randint(1, 32)], {}, "invalid"
        return header, data + b"\0" * rng.randint(1, 32), {}, "invalid"
    elif op == 12:  # valid: entries reordered, metadata strings added, unknown entry fields, header padding
        items = list(header.items())
        rng.shuffle(items)
        out = dict(items)
        out["__metadata__"] = {"format": "pt", "note": "reordered"}
        out[key] = {**out[key], "comment": "ignored by the format"}
        return out, data, {"pad": rng.randint(0, 12)}, "valid"
    else:  # rename a key: a valid file, but not of this model
        header[key + ".renamed"] = header.pop(key)
    return header, data, {}, "mutated"


def _library_reads_the_original(files: list[Path], original: dict[str, torch.Tensor]) -> bool:
    """The oracle: the safetensors library opens every shard and reads exactly the original tensors."""
    from safetensors.torch import load_file

    got: dict[str, torch.Tensor] = {}
    try:
        for f in files:
            got.update(load_file(str(f)))
    except Exception:
        return False
    return got.keys() == original.keys() and all(same_bits(got[k], v) for k, v in original.items())


@pytest.mark.slow  # 150 corrupted files, each a command run (a minute); make test-fast leaves it out
@pytest.mark.once("0.3")  # safetensors' and DCP's bytes read by flame-ext's own readers: alike in both environments
def test_corrupted_safetensors_headers(forkserver, small_model, tmp_path, figures):
    rng = random.Random(20261130)
    original = hf_tensors(small_model)
    tally: dict[str, int] = {}
    start = time.perf_counter()
    for case in range(CASES):
        root = tmp_path / f"c{case}"
        model = Path(shutil.copytree(small_model, root / "model"))
        shard = rng.choice(sorted(model.glob("*.safetensors")))
        header, data = _split(shard)
        new_header, new_data, extra, kind = _mutate_header(rng, copy.deepcopy(header), data)
        _join(shard, new_header, new_data, **extra)
        expected = ACCEPT if _library_reads_the_original(sorted(model.glob("*.safetensors")), original) else REFUSE
        if kind == "duplicate":  # the library keeps the last of two same keys; flame-ext refuses the ambiguity
            expected = REFUSE
        if kind == "valid":
            assert expected == ACCEPT, f"case {case}: the test's valid mutation is refused by the library"
        out = root / "out"
        out.mkdir()
        dest = out / "step-0"
        r = forkserver.run("convert", "--model", model, "--checkpoint", dest, "--no-reference")
        ending = _check_ending(r, expected, dest, [shard.name, str(model)], f"case {case} ({kind})")
        if ending == ACCEPT:
            assert_dcp_is(dest, original)
        tally[f"{kind}:{ending}"] = tally.get(f"{kind}:{ending}", 0) + 1
        shutil.rmtree(root)
    figures["property_safetensors"] = {"cases": CASES, "endings": tally, "seconds": round(time.perf_counter() - start)}
    assert any(k.endswith(ACCEPT) for k in tally) and any(k.endswith(REFUSE) for k in tally), tally


# ---------------------------------------------------------------- DCP .metadata


def _tensor_keys(md) -> list[str]:
    return sorted(k for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata))


def _mutate_metadata(rng: random.Random, md, folder: Path) -> str:
    """One random change to ``md`` in place; returns what the format makes of it."""
    key = rng.choice(_tensor_keys(md))
    item = md.state_dict_metadata[key]
    chunks = item.chunks
    records = [ix for ix in md.storage_data if ix.fqn == key]
    op = rng.randrange(12)
    if op == 0:  # move a chunk (a 0-d tensor's only chunk: stored twice)
        i = rng.randrange(len(chunks))
        if not item.size:
            chunks.append(chunks[0])
            return "invalid"
        offsets = list(chunks[i].offsets)
        offsets[rng.randrange(len(offsets))] += rng.choice([-1, 1]) * rng.randint(1, 3)
        chunks[i] = ChunkStorageMetadata(torch.Size(offsets), chunks[i].sizes)
        return "invalid"
    if op == 1 and item.size:  # grow or shrink a chunk
        i = rng.randrange(len(chunks))
        sizes = list(chunks[i].sizes)
        d = rng.randrange(len(sizes))
        sizes[d] = sizes[d] + rng.choice([-2, -1, 1, 2]) if sizes[d] > 2 else sizes[d] + 1
        chunks[i] = ChunkStorageMetadata(chunks[i].offsets, torch.Size(sizes))
        return "invalid"
    if op == 2:  # lose or duplicate a chunk
        if rng.random() < 0.5:
            chunks.pop(rng.randrange(len(chunks)))
        else:
            chunks.append(rng.choice(chunks))
        return "invalid"
    if op == 3 and item.size:  # the tensor's own shape
        size = list(item.size)
        d = rng.randrange(len(size))
        size[d] = rng.choice([size[d] + 1, size[d] - 1, -size[d], 0]) if size[d] else 1
        item.size = torch.Size(size)
        return "invalid"
    if op == 4:
        item.properties.dtype = rng.choice([torch.qint8, torch.quint8, "float32", None, 3])
        return "invalid"
    if op == 5:  # a record's path
        ix = rng.choice(records)
        info = md.storage_data[ix]
        path = rng.choice(
            [
                str(folder / info.relative_path),  # absolute, to the very same file
                f"../{folder.name}/{info.relative_path}",
                f"./../{info.relative_path}",
                "missing.distcp",
                ".",
                "",
                None,
                7,
            ]
        )
        md.storage_data[ix] = dataclasses.replace(info, relative_path=path)
        return "invalid"
    if op == 6:  # a record's offset
        ix = rng.choice(records)
        info = md.storage_data[ix]
        value = rng.choice([info.offset + rng.randint(1, 4096), -rng.randint(1, 64), float(info.offset), "0", None])
        md.storage_data[ix] = dataclasses.replace(info, offset=value)
        return "invalid"
    if op == 7:  # a record's length
        ix = rng.choice(records)
        info = md.storage_data[ix]
        grow = rng.random() < 0.4
        value = info.length + rng.randint(1, 64) if grow else rng.choice([info.length // 2, 0, -1, 1.0 * info.length])
        md.storage_data[ix] = dataclasses.replace(info, length=value)
        return "either" if grow else "invalid"
    if op == 8:  # a record lost
        del md.storage_data[rng.choice(records)]
        return "invalid"
    if op == 9:  # the maps of the wrong kind
        which = rng.choice(["state_dict_metadata", "storage_data"])
        setattr(md, which, rng.choice([list(getattr(md, which).items()), None, "x"]))
        return "invalid"
    if op == 10:  # valid: everything reordered
        for k in _tensor_keys(md):
            rng.shuffle(md.state_dict_metadata[k].chunks)
        items = list(md.state_dict_metadata.items())
        rng.shuffle(items)
        md.state_dict_metadata = dict(items)
        records_all = list(md.storage_data.items())
        rng.shuffle(records_all)
        md.storage_data = dict(records_all)
        return "valid"
    return "valid"  # pickled back unchanged


@pytest.mark.slow  # 150 corrupted files, each a command run (a minute); make test-fast leaves it out
@pytest.mark.once("0.3")  # safetensors' and DCP's bytes read by flame-ext's own readers: alike in both environments
def test_corrupted_dcp_metadata(forkserver, small_dcp, small_model, tmp_path, figures):
    rng = random.Random(20261201)
    original = hf_tensors(small_model)
    tally: dict[str, int] = {}
    start = time.perf_counter()
    for case in range(CASES):
        root = tmp_path / f"c{case}"
        ckpt = Path(shutil.copytree(small_dcp, root / "ckpt"))
        md = FileSystemReader(str(ckpt)).read_metadata()  # our own file: safe to unpickle here
        before = pickle.dumps(md)
        kind = _mutate_metadata(rng, md, ckpt)
        if kind == "valid" and pickle.dumps(md) != before:
            kind = "reordered"
        with open(ckpt / ".metadata", "wb") as f:
            pickle.dump(md, f)
        expected = {"invalid": REFUSE, "either": EITHER}.get(kind, ACCEPT)
        out = root / "out"
        out.mkdir()
        if case % 4 == 3:  # diagnose reads the same metadata; it writes nothing
            r = forkserver.run("diagnose", "--checkpoint", ckpt, "--model", small_model, "--values")
            if expected != REFUSE and r.returncode == 0:
                ending = ACCEPT  # --values compared every tensor with the HF source: all equal
            else:
                ending = _check_ending(r, REFUSE, out / "x", [str(ckpt)], f"case {case} ({kind}, diagnose)")
        else:
            dest = out / "hf"
            r = forkserver.run("to-hf", "--checkpoint", ckpt, "--config", small_model, "--out", dest)
            ending = _check_ending(r, expected, dest, [str(ckpt)], f"case {case} ({kind})")
            if ending == ACCEPT:
                assert_hf_is(dest, original)
        tally[f"{kind}:{ending}"] = tally.get(f"{kind}:{ending}", 0) + 1
        shutil.rmtree(root)
    figures["property_dcp_metadata"] = {"cases": CASES, "endings": tally, "seconds": round(time.perf_counter() - start)}
    assert any(k.endswith(ACCEPT) for k in tally) and any(k.endswith(REFUSE) for k in tally), tally


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
