"""``flame-ext reference``: the manifest's reference record on its own, for checkpoints made elsewhere."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from flame_ext import __version__
from flame_ext.errors import DestinationError, ForwardUnavailableError, InputError
from flame_ext.io.hf import open_hf
from flame_ext.io.manifest import FORMAT_VERSION, config_hash
from flame_ext.model.reference import compute_reference

__all__ = ["write_reference"]


def write_reference(args: argparse.Namespace) -> dict[str, Any]:
    """Compute the HF reference and write a reference-only manifest to ``args.out`` (atomically)."""
    out = Path(args.out)
    if out.exists() and not args.force:
        raise DestinationError(f"{out}: already exists; choose another path or pass --force to replace it")
    if not out.parent.is_dir():
        raise DestinationError(f"{out.parent}: no such folder")
    if args.dtype not in ("auto", "bfloat16", "float32"):
        raise InputError(f"--dtype {args.dtype!r}: choose one of auto, bfloat16, float32")
    hf = open_hf(args.model)
    dtype = None if args.dtype == "auto" else args.dtype
    try:
        ref = compute_reference(
            hf,
            text_path=args.reference_text,
            seq_len=args.reference_seq_len,
            dtype=dtype or hf.torch_dtype,
            trust_remote_code=args.trust_remote_code,
        )
    except ForwardUnavailableError as exc:
        raise ForwardUnavailableError(f"{exc}; run `flame-ext reference` on a machine with a GPU") from exc
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "reference",
        "tool_version": __version__,
        "source": {
            "model": hf.source,
            "path": str(hf.path),
            "revision": hf.revision,
            "model_type": hf.model_type,
            "config_sha256": config_hash(hf.config),
        },
        "reference": ref,
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    return ref
