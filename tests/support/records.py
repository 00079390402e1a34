"""Comparing fingerprint records the way the guard does: keys and dtypes exactly, sums within the tolerance."""

from __future__ import annotations

from flame_ext.fingerprints.algorithm import matches

__all__ = ["assert_same_fingerprints"]


def assert_same_fingerprints(ours: dict, theirs: dict) -> None:
    """Two records of the same values written in a different order (ranks, writer threads) agree up to float64
    summation order, which the record's own tolerance covers; everything else must be identical."""
    header = {k: v for k, v in ours.items() if k != "tensors"}
    assert header == {k: v for k, v in theirs.items() if k != "tensors"}
    a, b = ours["tensors"], theirs["tensors"]
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key]["dtype"] == b[key]["dtype"], key
        assert matches(a[key]["fingerprint"], b[key]["fingerprint"], ours["tolerance"]), key
        assert sorted(a[key].get("rounded", {})) == sorted(b[key].get("rounded", {})), key
        for dtype, fp in a[key].get("rounded", {}).items():
            assert matches(fp, b[key]["rounded"][dtype], ours["tolerance"]), (key, dtype)
