"""Files written around the page cache: the same bytes as a plain write, whatever the sizes, on any file system."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from flame_ext.io import direct_file
from flame_ext.io.direct_file import DirectFile


def pieces(seed: int) -> list[bytes]:
    """Writes of awkward sizes: an 8-byte length, an unaligned header, pieces across buffer boundaries, one
    larger than the buffer, and a tail that ends mid-block."""
    rng = random.Random(seed)
    buffer = direct_file._BUFFER
    sizes = [8, 1001, 4096, buffer - 5000, 3, 2 * buffer + 17, 123_457]
    return [rng.randbytes(n) for n in sizes]


def write_all(path: Path, parts: list[bytes]) -> DirectFile:
    with DirectFile(path) as f:
        for i, part in enumerate(parts):
            assert f.tell() == sum(map(len, parts[:i]))
            assert f.write(memoryview(part)) == len(part)
    return f


def test_the_file_holds_exactly_what_was_written(tmp_path):
    parts = pieces(0)
    f = write_all(tmp_path / "out.bin", parts)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)
    assert os.stat(tmp_path / "out.bin").st_size == sum(map(len, parts))  # the padding cut back
    if os.uname().sysname == "Linux" and os.stat(tmp_path).st_dev == os.stat("/").st_dev:
        assert f.direct  # this project's machines: the disk takes O_DIRECT


@pytest.mark.parametrize("size", [0, 1, direct_file._TAIL_ALIGN, direct_file._BUFFER])
def test_sizes_at_the_edges(tmp_path, size):
    data = os.urandom(size)
    write_all(tmp_path / "edge.bin", [data])
    assert (tmp_path / "edge.bin").read_bytes() == data


def test_a_file_system_without_o_direct_gets_the_same_bytes(tmp_path):
    """/dev/shm is tmpfs: it refuses O_DIRECT on older kernels and takes it on newer ones; the bytes are the
    same either way."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    path = shm / f"flame-ext-test-{os.getpid()}.bin"
    try:
        parts = pieces(1)
        write_all(path, parts)
        assert path.read_bytes() == b"".join(parts)
    finally:
        path.unlink(missing_ok=True)


def test_an_error_while_writing_is_the_one_raised(tmp_path):
    """A failure inside the block is raised as it is: closing writes nothing more and raises nothing else."""
    path = tmp_path / "failed.bin"
    with pytest.raises(ValueError, match="the reader failed"):
        with DirectFile(path) as f:
            f.write(b"x" * 100)
            raise ValueError("the reader failed")
    assert path.stat().st_size == 0  # the buffered 100 bytes were dropped, not padded out


def test_a_refusal_at_the_first_write_continues_through_the_cache(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at the open and refuse the write (EINVAL): the file is then written
    through the cache from where it stood, to the same bytes. The refusal is injected at the kernel boundary
    (``os.write`` raising as the kernel does); everything else is the real file."""
    real_write, refused = os.write, []

    def refusing_once(fd, data):
        if not refused and os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):  # only this file's
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_file.os, "write", refusing_once)
    parts = pieces(2)
    f = write_all(tmp_path / "refused.bin", parts)
    assert refused and not f.direct
    assert (tmp_path / "refused.bin").read_bytes() == b"".join(parts)


def test_a_failed_disk_write_is_raised_by_the_writer(tmp_path):
    """A write the disk refuses (here the file size limit, EFBIG) happens in the file's writer thread: it is
    raised to the caller, by a later ``write`` or by ``close``, never lost. In a child process: the limit is
    process-wide."""
    code = (
        "import errno, resource, signal, sys\n"
        "from flame_ext.io.direct_file import DirectFile\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))\n"
        "try:\n"
        "    with DirectFile(sys.argv[1]) as f:\n"
        "        for _ in range(8):\n"
        "            f.write(bytes(8 << 20))\n"
        "except OSError as exc:\n"
        "    print('raised', errno.errorcode[exc.errno])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "big.bin")], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "raised EFBIG", out.stderr
