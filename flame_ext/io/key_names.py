"""Checkpoint key names: the infixes module wrappers add to them, and where an expected key sits among the
keys a checkpoint holds. Names only, no tensors: the key parity check (``checks.keys``) and the fingerprint
comparison (``fingerprints.compare``) both map keys through here.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["WRAPPER_INFIXES", "strip_wrappers", "locate_keys"]

# Module wrappers whose names leak into state-dict keys: torch.compile, activation checkpointing, DDP/DP.
WRAPPER_INFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "module.")


def strip_wrappers(key: str) -> str:
    """``key`` without the module-wrapper infixes (``WRAPPER_INFIXES``) a wrapped model adds to its names."""
    for infix in WRAPPER_INFIXES:
        key = key.replace(infix, "") if infix != "module." else (key[len(infix) :] if key.startswith(infix) else key)
    return key


def locate_keys(expected: Iterable[str], found: Iterable[str]) -> dict[str, str]:
    """For each expected key, the checkpoint key that holds it: the same name, the name under an extra
    ``model.`` prefix, or the name with module-wrapper infixes. Keys found nowhere are left out.

    The value checks read tensors through this map, so a checkpoint whose only fault is its key layout is
    still judged on its values (the layout is reported once, as its own problem).
    """
    found = set(found)
    unwrapped: dict[str, str] = {}
    for k in sorted(found):
        bare = strip_wrappers(k)
        if bare != k:
            unwrapped.setdefault(bare, k)
    out: dict[str, str] = {}
    for k in expected:
        for candidate in (k, "model." + k):
            if candidate in found:
                out[k] = candidate
                break
        else:
            if k in unwrapped:
                out[k] = unwrapped[k]
    return out
