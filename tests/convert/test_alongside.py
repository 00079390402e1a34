"""The reference forward beside the writer: the same record as the forward run alone, and a failure on either
side stops both and leaves nothing at the destination.

Real conversions of the embedded model (it has a tokenizer, so the default conversion records a reference).
The writer failing (a file size limit) and Ctrl-C / SIGTERM at random moments of a default conversion are
in ``tests/reliability/test_interrupts.py``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from flame_ext.convert import alongside
from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.io.hf import open_hf
from flame_ext.model.reference_loss import compute_reference
from flame_ext.model.streamed import StreamedModel

SMALL_BUFFER = 1024  # bytes: hundreds of blocks, so the writer is still writing while the forward runs


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


def _threads_left() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("flame-ext-")]


@pytest.mark.slow  # a conversion with the reference beside it and the reference alone, per dtype
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_reference_beside_the_writer_is_the_reference_run_alone(tiny_model, tmp_path, dtype):
    """Bit for bit: the token ids, every per-token loss and the mean, the dtype, the notes."""
    dest = tmp_path / "step-0"
    summary = convert_hf_to_dcp(
        ConvertOptions(
            model=str(tiny_model), checkpoint=str(dest), dtype=dtype, buffer_bytes=SMALL_BUFFER, progress=False
        )
    )
    alone = compute_reference(open_hf(str(tiny_model)), dtype=dtype)
    assert summary.manifest["reference"] == alone
    assert summary.manifest["reference"]["dtype"] == dtype
    assert _threads_left() == []


def test_a_failing_forward_stops_the_writer_and_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    """The forward's own error is what is raised, the writer stopped long before its last block, and neither
    the destination nor a temporary folder or lock is left."""

    def read_fails(self, block, args):
        raise OSError(5, "Input/output error (the source disk, say)")

    monkeypatch.setattr(StreamedModel, "_load_block", read_fails)
    blocks: list[int] = []
    guard = alongside.ForwardBeside.guard

    def counting_guard(self, on_block):
        checked = guard(self, on_block)

        def count(*args):
            blocks.append(1)
            return checked(*args)

        return count

    monkeypatch.setattr(alongside.ForwardBeside, "guard", counting_guard)
    dest = tmp_path / "out" / "step-0"
    with pytest.raises(OSError, match="Input/output error"):
        convert_hf_to_dcp(
            ConvertOptions(model=str(tiny_model), checkpoint=str(dest), buffer_bytes=SMALL_BUFFER, progress=False)
        )
    assert not dest.exists()
    assert not dest.parent.exists(), _leftovers(dest)  # the parent it created goes too
    assert _threads_left() == []

    # The same conversion without the reference: how many blocks a whole write takes.
    monkeypatch.undo()
    whole: list[int] = []
    monkeypatch.setattr("flame_ext.convert.hf_to_dcp.Recorder.add_rows", lambda self, *a: whole.append(1), raising=True)
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(tiny_model),
            checkpoint=str(tmp_path / "b"),
            reference=False,
            buffer_bytes=SMALL_BUFFER,
            progress=False,
        )
    )
    assert len(whole) > 100
    assert len(blocks) < len(whole) / 2, f"the writer went on for {len(blocks)} of {len(whole)} blocks"
