"""Fingerprint forensics: every damage the guard must see changes the fingerprint, and the two fingerprints
alone say which damage it most likely was."""

from __future__ import annotations

import pytest
import torch
from support.tensors import trained_like

from flame_ext.fingerprints.algorithm import fingerprint, matches
from flame_ext.fingerprints.forensics import what_happened

SHAPE = (64, 64)


def _swap_rows(t: torch.Tensor, a: int = 3, b: int = 40) -> torch.Tensor:
    out = t.clone()
    out[[a, b]] = t[[b, a]]
    return out


def _bf16_ulp_noise(t: torch.Tensor) -> torch.Tensor:
    """Every value moved by one bf16 step up or down: noise exactly at the stored dtype's resolution."""
    bits = t.view(torch.int16)
    sign = torch.randint(0, 2, t.shape, generator=torch.Generator().manual_seed(1), dtype=torch.int16) * 2 - 1
    return (bits + sign).view(torch.bfloat16)


DAMAGES = {
    "zeros": (lambda t: torch.zeros_like(t), "zeros"),
    "scaled": (lambda t: (t.float() * 0.9).to(t.dtype), "scaled"),
    "negated": (lambda t: -t, "scaled"),
    "transposed": (lambda t: t.t().contiguous(), "transposed"),
    "two rows swapped": (_swap_rows, "rows_permuted"),
    "rows permuted": (lambda t: t[torch.randperm(64, generator=torch.Generator().manual_seed(3))], "rows_permuted"),
    "one row's values permuted": (lambda t: torch.cat([t[:5], t[5:6].roll(1, dims=1), t[6:]]), "columns_permuted"),
    "rows and columns permuted": (lambda t: t.flip(0).flip(1), "rearranged"),
    "columns permuted": (
        lambda t: t[:, torch.randperm(64, generator=torch.Generator().manual_seed(4))],
        "columns_permuted",
    ),
    "noise 1e-3 std": (
        lambda t: (
            t.float() + 1e-3 * t.float().std() * torch.randn(t.shape, generator=torch.Generator().manual_seed(5))
        ).to(t.dtype),
        "noise",
    ),
    "random values": (lambda t: trained_like(tuple(t.shape), t.dtype, seed=9), "different"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_each_damage_changes_the_fingerprint_and_is_named(damage):
    edit, code = DAMAGES[damage]
    # bf16, except for noise below bf16's resolution (that is the rounding case, tested on its own)
    t = trained_like(SHAPE, torch.float32 if damage.startswith("noise") else torch.bfloat16)
    written = fingerprint(t)
    seen = fingerprint(edit(t))
    assert not matches(seen, written)
    finding = what_happened("w", seen, written, shape=SHAPE, dtype=str(t.dtype).removeprefix("torch."))
    assert finding.code == code, finding.text
    if code == "scaled":
        factor = -1.0 if damage == "negated" else 0.9
        assert f"{factor:.4g}" in finding.text


def test_noise_at_bf16_resolution_is_seen_and_called_rounding_not_a_swap():
    t = trained_like((256, 256), torch.bfloat16)
    finding = what_happened("w", fingerprint(_bf16_ulp_noise(t)), fingerprint(t), shape=(256, 256), dtype="bfloat16")
    assert finding.code == "rounding", finding.text
    assert "swap" not in finding.text and "transpos" not in finding.text


def test_fp32_values_rounded_to_bf16_differ_from_the_fp32_fingerprint_at_rounding_level():
    t = trained_like((128, 96))
    rounded = t.to(torch.bfloat16).float()
    finding = what_happened("w", fingerprint(rounded), fingerprint(t), shape=(128, 96), dtype="bfloat16")
    assert finding.code == "rounding", finding.text


def test_a_tensor_holding_another_keys_values_is_named_as_swapped():
    a, b = trained_like(SHAPE, seed=1), trained_like(SHAPE, seed=2)
    others = {"layers.0.w": fingerprint(a).tolist(), "layers.1.w": fingerprint(b).tolist()}
    finding = what_happened("layers.0.w", fingerprint(b), fingerprint(a), shape=SHAPE, dtype="float32", others=others)
    assert finding.code == "swapped" and "layers.1.w" in finding.text
