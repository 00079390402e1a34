"""Helpers shared by the reliability tests: the fork-server client, folder snapshots, and the checks a user
would make on an output folder ("does it load strictly, and is every byte the source's?").

The checks read with torch and safetensors directly, not with flame-ext's own readers, so a bug in those
readers cannot hide a bad output.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TEMP_MARK = ".flame-ext-tmp-"
LOCK_MARK = ".flame-ext-lock"


# ------------------------------------------------------------------ running commands


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    pid: int = 0

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


@dataclass
class Child:
    pid: int
    out: Path
    err: Path


class ForkServer:
    """Client of ``forkserver.py`` (see its docstring for why the tests fork instead of exec)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self._n = 0
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "forkserver.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(workdir / "forkserver.log", "w"),  # noqa: SIM115
            text=True,
            env=env,
        )
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"fork server did not start: {(workdir / 'forkserver.log').read_text()[-2000:]}")

    def _ask(self, msg: dict) -> dict:
        with self._lock:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died: {(self.workdir / 'forkserver.log').read_text()[-2000:]}")
        return json.loads(line)

    def spawn(
        self,
        *argv: str,
        module: str = "flame_ext.cli",
        script: str | None = None,
        env: dict | None = None,
        cwd: str | Path | None = None,
        fsize: int | None = None,
        audit: Path | None = None,
    ) -> Child:
        self._n += 1
        out, err = self.workdir / f"run{self._n}.out", self.workdir / f"run{self._n}.err"
        reply = self._ask(
            {
                "op": "spawn",
                "module": module,
                "script": script,
                "argv": [str(a) for a in argv],
                "stdout": str(out),
                "stderr": str(err),
                "cwd": str(cwd) if cwd else None,
                "env": env or {},
                "fsize": fsize,
                "audit": str(audit) if audit else None,
            }
        )
        return Child(reply["pid"], out, err)

    def wait(self, child: Child, timeout: float = 120) -> Result:
        rc = self._ask({"op": "wait", "pid": child.pid, "timeout": timeout})["returncode"]
        return Result(rc, child.out.read_text(errors="replace"), child.err.read_text(errors="replace"), child.pid)

    def run(self, *argv: str, timeout: float = 120, **kw) -> Result:
        return self.wait(self.spawn(*argv, **kw), timeout)

    def close(self) -> None:
        self.proc.kill()  # it holds no state; its children have all been waited for
        self.proc.wait(timeout=30)


def run_subprocess(
    *argv: str, module: str = "flame_ext.cli", env: dict | None = None, timeout: float = 120, **kw
) -> Result:
    """An ordinary ``python -m MODULE ARGS`` run, for the cases that must not go through the fork server."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run(
        [sys.executable, "-m", module, *map(str, argv)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        **kw,
    )
    return Result(p.returncode, p.stdout, p.stderr)


# ------------------------------------------------------------------ folder state


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, size, mtime and (for files up to 4 MB) a hash of the bytes."""
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath, name)
            state[str(p.relative_to(root))] = ("dir", p.stat().st_mode)
        for name in filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            digest = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() and st.st_size <= 4 << 20 else None
            state[str(p.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns, digest)
    return state


def diff_snapshots(before: dict, after: dict) -> list[str]:
    changes = [f"+ {k}" for k in sorted(after.keys() - before.keys())]
    changes += [f"- {k}" for k in sorted(before.keys() - after.keys())]
    changes += [f"~ {k}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    return changes


def siblings(dest: Path) -> list[str]:
    """Temporary folders and lock files flame-ext keeps next to ``dest`` while it works."""
    from flame_ext.io.destination import lock_path, temp_prefix

    if not dest.parent.is_dir():
        return []
    prefixes = (f".{dest.name}.", temp_prefix(dest), lock_path(dest).name)
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(prefixes))


# ------------------------------------------------------------------ what a user checks on an output


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors folder, following its index when there is one."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for name in files:
        part = load_file(str(folder / name))
        assert not (part.keys() & out.keys()), f"{folder}: a key appears in two shards"
        out.update(part)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(out), f"{folder}: index and shards disagree"
    return out


def dcp_keys(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(folder)).read_metadata()
    return {
        k: (tuple(v.size), v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


def dcp_load(folder: Path, keys: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Load ``keys`` strictly (every one must be present and whole), without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    sd = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in keys.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(folder), planner=DefaultLoadPlanner(allow_partial_load=False), no_dist=True)
    return sd


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (``torch.equal`` would call -0.0 and 0.0 equal, and NaN unequal to itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def assert_dcp_is(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    """``folder`` is a complete DCP checkpoint holding exactly ``expected``, bit for bit, plus its manifest."""
    keys = dcp_keys(folder)
    assert set(keys) == set(expected), (
        f"{folder}: keys differ: missing {sorted(set(expected) - set(keys))[:3]}, extra "
        f"{sorted(set(keys) - set(expected))[:3]}"
    )
    loaded = dcp_load(folder, {k: (tuple(v.shape), v.dtype) for k, v in expected.items()})
    bad = [k for k, v in expected.items() if not same_bits(loaded[k], v)]
    assert not bad, f"{folder}: {len(bad)} tensors differ from the source, e.g. {bad[:3]}"
    manifest = json.loads((folder / "flame_ext.json").read_text())
    assert set(manifest["tensors"]) == set(expected), f"{folder}: manifest does not describe the checkpoint"


def assert_hf_is(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    """``folder`` is a complete HF folder (config + shards) holding exactly ``expected``, bit for bit."""
    assert (folder / "config.json").is_file(), f"{folder}: no config.json"
    got = hf_tensors(folder)
    assert set(got) == set(expected), (
        f"{folder}: keys differ: missing {sorted(set(expected) - set(got))[:3]}, extra "
        f"{sorted(set(got) - set(expected))[:3]}"
    )
    bad = [k for k, v in expected.items() if not same_bits(got[k], v)]
    assert not bad, f"{folder}: {len(bad)} tensors differ from the source, e.g. {bad[:3]}"
