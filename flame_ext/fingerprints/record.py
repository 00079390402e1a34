"""The fingerprints a manifest records, as typed records: the ``fingerprints`` section written beside the
checkpoint (``fingerprints_section``) and what a reader gets back from it (``read_fingerprints``).

The section's layout is declared by ``schemas/manifest.schema.json``; ``io.manifest`` reads and checks the file,
this module turns its ``fingerprints`` part into values the comparison (``fingerprints.compare``) uses.
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch

from flame_ext.fingerprints.algorithm import ALGORITHM, TERMS, TOLERANCE, as_record

__all__ = [
    "FINGERPRINTS_VERSION",
    "TensorRecord",
    "FingerprintsSection",
    "Fingerprints",
    "fingerprints_section",
    "read_fingerprints",
]

FINGERPRINTS_VERSION = 1


class _TensorRecordBase(TypedDict):
    dtype: str  # the dtype the values were stored at
    fingerprint: list[float | int]  # one number per ``TERMS``


class TensorRecord(_TensorRecordBase, total=False):
    """One tensor's entry: its stored dtype and fingerprint and, where recorded, those of its values rounded
    to each training dtype they reach only by rounding (``rounded: {dtype: fingerprint}``)."""

    rounded: dict[str, list[float | int]]
    group: str  # a saved training step's record: the state the tensor belongs to (model, optimizer, ...)


class FingerprintsSection(TypedDict):
    """The manifest's ``fingerprints`` section as written."""

    version: int
    algorithm: str
    terms: list[str]
    tolerance: float
    tensors: dict[str, TensorRecord]


def fingerprints_section(
    values: dict[str, torch.Tensor],
    dtypes: dict[str, str],
    rounded: dict[str, dict[str, torch.Tensor]] | None = None,
) -> FingerprintsSection:
    """The manifest's ``fingerprints`` section: per key, the fingerprint of the values as stored (``dtype``,
    ``fingerprint``) and, when ``rounded`` has the key, those of the values rounded to each training dtype they
    reach only by rounding (``rounded: {dtype: fingerprint}``; ``fingerprints.algorithm.rounding_dtypes``)."""
    rounded = rounded or {}

    def entry(key: str, fp: torch.Tensor) -> TensorRecord:
        item: TensorRecord = {"dtype": dtypes[key], "fingerprint": as_record(fp)}
        if rounded.get(key):
            item["rounded"] = {d: as_record(v) for d, v in sorted(rounded[key].items())}
        return item

    return {
        "version": FINGERPRINTS_VERSION,
        "algorithm": ALGORITHM,
        "terms": list(TERMS),
        "tolerance": TOLERANCE,
        "tensors": {k: entry(k, v) for k, v in sorted(values.items())},
    }


class Fingerprints(dict[str, tuple[str, list[float]]]):
    """key -> (stored dtype, fingerprint) from a manifest, with the tolerance it was written for, and
    ``rounded``: key -> {dtype: fingerprint of the stored values rounded to it} (empty for manifests written
    before flame-ext recorded them)."""

    tolerance: float = TOLERANCE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounded: dict[str, dict[str, list[float]]] = {}


def read_fingerprints(manifest: dict[str, Any]) -> tuple[Fingerprints | None, str | None]:
    """The fingerprints of a (checked) manifest, or None with a note saying why values cannot be verified."""
    section = manifest.get("fingerprints")
    if section is None:
        return None, (
            "the manifest has no fingerprints (written before flame-ext recorded them): values are not verified "
            "exactly; re-convert, or write them with `flame-ext reference --model HF --out FILE`"
        )
    if section.get("version") != FINGERPRINTS_VERSION or section.get("algorithm") != ALGORITHM:
        return None, (
            f"the manifest's fingerprints are version {section.get('version')!r} ({section.get('algorithm')!r}); this "
            f"flame-ext reads version {FINGERPRINTS_VERSION} ({ALGORITHM}): values are not verified exactly"
        )
    out = Fingerprints({k: (v["dtype"], v["fingerprint"]) for k, v in section["tensors"].items()})
    out.tolerance = float(section["tolerance"])
    out.rounded = {k: dict(v["rounded"]) for k, v in section["tensors"].items() if isinstance(v.get("rounded"), dict)}
    return out, None
