"""Which outputs of a ``from_hf`` call are streamed a row block at a time (``native_stacks``): only a stack of the
HF tensors as given, along the first dimension, that the adapter returns unchanged. Anything else the adapter
does to the stacked tensor is left to the adapter (the output is computed whole)."""

from __future__ import annotations

import torch

from flame_ext.convert.native_stacks import apply_watching_stacks


def hf_state() -> dict[str, torch.Tensor]:
    return {f"model.layers.0.mlp.experts.{i}.up_proj.weight": torch.full((2, 3), float(i)) for i in range(3)}


def by_expert(hf: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [hf[f"model.layers.0.mlp.experts.{i}.up_proj.weight"] for i in (2, 0, 1)]


def test_a_first_dimension_stack_of_the_given_tensors_is_named_with_its_keys_in_the_adapters_order():
    hf = hf_state()
    out, stacked = apply_watching_stacks(lambda sd: {"w": torch.stack(by_expert(sd)), "n": sd[next(iter(sd))]}, hf)
    assert stacked == {"w": [f"model.layers.0.mlp.experts.{i}.up_proj.weight" for i in (2, 0, 1)]}
    assert torch.equal(out["w"], torch.stack(by_expert(hf)))  # the adapter's own result, unchanged


def test_other_stacks_are_left_to_the_adapter():
    def adapter(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "other_dim": torch.stack(by_expert(sd), dim=1),
            "transposed_after": torch.stack(by_expert(sd)).transpose(1, 2),
            "of_copies": torch.stack([t.clone() for t in by_expert(sd)]),
            "cast_after": torch.stack(by_expert(sd)).to(torch.bfloat16),
        }

    out, stacked = apply_watching_stacks(adapter, hf_state())
    assert set(out) == {"other_dim", "transposed_after", "of_copies", "cast_after"} and stacked == {}
