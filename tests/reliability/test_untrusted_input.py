"""The untrusted inputs of the issue that asked for input validation, each as a real command run.

Every case ends the way ``test_bad_input`` requires of bad input: exit 2, one line on stderr naming the input and
what is wrong with it, no traceback, nothing created or changed under the test's folder. The cases reproduce the
issue's examples literally; ``tests/io/test_dcp_metadata.py``, ``tests/io/test_hf.py`` and the property test
cover the same classes with other values.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemReader

from tests.reliability._rel import diff_snapshots, snapshot
from tests.reliability.test_bad_input import Case, Inputs, _convert, _diagnose, _to_hf


def _metadata(io: Inputs, change: Callable) -> Path:
    c = io.dcp_copy()
    md = FileSystemReader(str(c)).read_metadata()  # our own file: safe to unpickle here
    change(md, c)
    with open(c / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return c


def _record(md, fqn: str):
    return next(ix for ix in md.storage_data if ix.fqn == fqn)


def _set_record(md, fqn: str, **changes) -> None:
    ix = _record(md, fqn)
    md.storage_data[ix] = dataclasses.replace(md.storage_data[ix], **changes)


def _header(io: Inputs, change: Callable) -> tuple[Path, Path]:
    m = io.model_copy()
    shard = io.shard(m, 0)
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    return m, shard


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def _config(io: Inputs, **changes) -> Path:
    m = io.model_copy()
    config = json.loads((m / "config.json").read_text())
    config.update(changes)
    (m / "config.json").write_text(json.dumps(config))
    return m


EMBED = "model.embed_tokens.weight"


def c_chunks_empty_to_hf(io: Inputs) -> Case:
    c = _metadata(io, lambda md, c: setattr(md.state_dict_metadata[EMBED], "chunks", []))
    return Case(_to_hf(c, io.small_model, io), [str(c)], ["cover 0 of"])


def c_chunks_empty_diagnose(io: Inputs) -> Case:
    c = _metadata(io, lambda md, c: setattr(md.state_dict_metadata[EMBED], "chunks", []))
    return Case(_diagnose(c, io.small_model), [str(c)], ["cover 0 of"])


def c_absolute_relative_path(io: Inputs) -> Case:
    outside = io.inp / "elsewhere.distcp"

    def change(md, c):
        info = md.storage_data[_record(md, EMBED)]
        shutil.copy(c / info.relative_path, outside)
        _set_record(md, EMBED, relative_path=str(outside))

    c = _metadata(io, change)
    return Case(_to_hf(c, io.small_model, io), [str(outside)], ["outside the checkpoint"])


def c_fifo_relative_path(io: Inputs) -> Case:
    def change(md, c):
        os.mkfifo(c / "pipe.distcp")
        _set_record(md, EMBED, relative_path="pipe.distcp")

    c = _metadata(io, change)
    return Case(_to_hf(c, io.small_model, io), ["pipe.distcp"], ["not a regular file"])


def c_negative_storage_offset(io: Inputs) -> Case:
    c = _metadata(io, lambda md, c: _set_record(md, EMBED, offset=-64))
    return Case(_to_hf(c, io.small_model, io), [str(c)], ["offset -64"])


def c_state_dict_metadata_a_list(io: Inputs) -> Case:
    c = _metadata(io, lambda md, c: setattr(md, "state_dict_metadata", list(md.state_dict_metadata.items())))
    return Case(_to_hf(c, io.small_model, io), [str(c)], ["state_dict_metadata is a list"])


def c_negative_data_offsets(io: Inputs) -> Case:
    m, shard = _header(
        io, lambda h: _first_tensor(h).update(data_offsets=[-64, _first_tensor(h)["data_offsets"][1] - 64])
    )
    return Case(_convert(m, io), [shard.name], ["data_offsets"])


def c_float_data_offsets(io: Inputs) -> Case:
    m, shard = _header(
        io, lambda h: _first_tensor(h).update(data_offsets=[float(x) for x in _first_tensor(h)["data_offsets"]])
    )
    return Case(_convert(m, io), [shard.name], ["data_offsets"])


def c_weight_map_a_list(io: Inputs) -> Case:
    m = io.model_copy()
    index = m / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = sorted(set(data["weight_map"].values()))
    index.write_text(json.dumps(data))
    return Case(_convert(m, io), [index.name], ["weight_map"])


def c_weight_map_of_ints(io: Inputs) -> Case:
    m = io.model_copy()
    index = m / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: i for i, k in enumerate(data["weight_map"])}
    index.write_text(json.dumps(data))
    return Case(_convert(m, io), [index.name], ["not a shard file name"])


def c_hidden_size_negative(io: Inputs) -> Case:
    m = _config(io, hidden_size=-96)
    return Case(_convert(m, io), ["config.json"], ["hidden_size is -96"])


def c_hidden_size_1e9(io: Inputs) -> Case:
    m = _config(io, hidden_size=10**9)
    return Case(_convert(m, io), ["config.json"], ["implies at least"])


def c_hidden_size_1e9_float(io: Inputs) -> Case:
    m = _config(io, hidden_size=1e9)
    return Case(_convert(m, io), ["config.json"], ["hidden_size is 1000000000.0"])


def c_two_million_layers_convert(io: Inputs) -> Case:
    m = _config(io, num_hidden_layers=2_000_000)
    return Case(_convert(m, io), ["config.json"], ["implies at least"])


def c_two_million_layers_to_hf(io: Inputs) -> Case:
    m = _config(io, num_hidden_layers=2_000_000)
    return Case(_to_hf(io.small_dcp, m, io), ["config.json"], ["implies at least"])


def c_to_hf_config_not_an_object(io: Inputs) -> Case:
    m = io.model_copy()
    (m / "config.json").write_text('[{"model_type": "olmo2"}]')
    return Case(_to_hf(io.small_dcp, m, io), ["config.json"], ["not an object"])


def c_reference_text_dev_zero(io: Inputs) -> Case:
    argv = [
        "convert",
        "--model",
        str(io.small_model),
        "--checkpoint",
        str(io.out / "step-0"),
        "--reference-text",
        "/dev/zero",
    ]
    return Case(argv, ["/dev/zero"], ["not a regular file"])


CASES: dict[str, Callable[[Inputs], Case]] = {
    name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_") and callable(fn)
}
# The two-million-layer config must be refused before any model is built: well under a second of work.
QUICK = {"two_million_layers_convert", "two_million_layers_to_hf"}


@pytest.mark.parametrize("name", list(CASES))
def test_untrusted_input_is_refused_cleanly(name, forkserver, small_model, small_dcp, tmp_path, figures):
    io = Inputs(tmp_path, small_model, small_dcp)
    case = CASES[name](io)
    before = snapshot(tmp_path)
    start = time.perf_counter()
    r = forkserver.run(*case.argv, module=case.module, env=case.env, timeout=60)
    seconds = time.perf_counter() - start
    changes = diff_snapshots(before, snapshot(tmp_path))
    figures.setdefault("untrusted_input_cases", []).append(name)
    assert r.returncode == 2, f"exit {r.returncode}, expected 2\nstdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and len(r.err_lines) == 1, r.stderr[-3000:]
    line = r.err_lines[0]
    assert any(n in line for n in case.names), f"the message does not name the input ({case.names}): {line}"
    assert any(w.lower() in line.lower() for w in case.what), f"the message does not say what is wrong: {line}"
    assert not changes, f"the failed run changed files: {changes}"
    if name in QUICK:
        assert seconds < 5, f"refused only after {seconds:.1f} s"  # a fork of a warm process: imports are paid
