"""``flame-ext reference``: the manifest's reference record on its own, for checkpoints made elsewhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flame_ext.command_options import ReferenceOptions
from flame_ext.convert.hf_to_dcp import source_reader
from flame_ext.errors import ForwardUnavailableError
from flame_ext.fingerprints.algorithm import Recorder
from flame_ext.fingerprints.record import FingerprintsSection, fingerprints_section
from flame_ext.io.dcp import DEFAULT_BUFFER_BYTES, replace_dtype, row_blocks
from flame_ext.io.destination import atomic_file, check_destination
from flame_ext.io.hf import HFCheckpoint, open_hf
from flame_ext.io.manifest import build_manifest
from flame_ext.model.reference_loss import compute_reference

__all__ = ["write_reference", "source_fingerprints"]


def source_fingerprints(
    hf: HFCheckpoint, dtype: str | None, buffer_bytes: int = DEFAULT_BUFFER_BYTES // 4
) -> FingerprintsSection:
    """The fingerprints section for every tensor of the HF files, as ``dtype`` would store them (None: as is),
    with those of the values rounded to the other training dtypes, so that a checkpoint stored or loaded at any
    of them verifies exactly.

    Streamed block by block through the converter's own reader, so the values are exactly what a
    `flame-ext convert --dtype` would write; keys are the HF files' (the guard maps them to a checkpoint's).
    """
    specs = {k: replace_dtype(t.spec, dtype) for k, t in hf.tensors.items()}
    recorder = Recorder({k: s.shape for k, s in specs.items()}, rounded=True)
    for key, spec in specs.items():
        read = source_reader(hf.tensors[key], spec.dtype)
        for start, end in row_blocks(spec, buffer_bytes):
            block = read(start, end)
            recorder.add_rows(key, start, block)
            del block
    return fingerprints_section(recorder.values, {k: s.dtype for k, s in specs.items()}, recorder.rounded)


def write_reference(opts: ReferenceOptions) -> dict[str, Any]:
    """Compute the HF reference and write a reference-only manifest to ``opts.out`` (atomically)."""
    out = Path(opts.out)
    check_destination(out, kind="reference", force=opts.force)  # checked by the options too: it may have appeared since
    hf = open_hf(opts.model)
    dtype = None if opts.dtype == "auto" else opts.dtype
    try:
        ref = compute_reference(
            hf,
            text_path=opts.reference_text,
            seq_len=opts.reference_seq_len,
            rows=opts.reference_rows,
            dtype=dtype or hf.torch_dtype,
            trust_remote_code=opts.trust_remote_code,
            device=opts.reference_device,
        )
    except ForwardUnavailableError as exc:
        raise ForwardUnavailableError(f"{exc}; run `flame-ext reference` on a machine with a GPU") from exc
    manifest = build_manifest("reference", hf, reference=ref, fingerprints=source_fingerprints(hf, dtype))
    with atomic_file(out, kind="reference", force=opts.force) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, allow_nan=False))
    return ref
