"""``fresh_buffers``: a module's non-persistent buffers recomputed the way the module computes them, on a
stand-in, never touching the module's own parameters or buffers.

Tiny real modules, one per way a module can build (or not build) its buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from flame_ext.checks.nonpersistent_buffers import check_buffers, fresh_buffers


class Rotary(nn.Module):
    """Like fla's RotaryEmbedding: no config; ``reset_parameters`` fills the buffer from plain attributes."""

    def __init__(self, dim: int = 8, base: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.inv_freq.copy_(1.0 / self.base ** (torch.arange(0, self.dim, 2).float() / self.dim))


class LayerWithBuffer(nn.Module):
    """``reset_parameters`` re-initialises a child's weights and computes a buffer from a parameter's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("mask", torch.empty(4, 4, dtype=torch.bool), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        self.mask = torch.ones(self.proj.weight.shape, dtype=torch.bool, device=self.mask.device).tril()


class LeavesItAlone(nn.Module):
    """A buffer set only in ``__init__``; ``reset_parameters`` does not touch it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.register_buffer("ones", torch.ones(3), persistent=False)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class RandomBuffer(nn.Module):
    """A buffer drawn at random (a per-rank seed): no value to check it against."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seed", torch.empty(2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.seed = torch.rand(2)


def test_reset_parameters_gives_the_buffer_and_repair_restores_it():
    module = Rotary()
    right = module.inv_freq.clone()
    module.inv_freq.fill_(float("nan"))  # what to_empty() may leave
    assert torch.equal(fresh_buffers(module)["inv_freq"], right)
    problems, repaired = check_buffers(module, repair=True)
    assert problems == [] and repaired == ["inv_freq"]
    assert torch.equal(module.inv_freq, right)


def test_trained_parameters_are_never_touched():
    torch.manual_seed(0)
    module = LayerWithBuffer()
    with torch.no_grad():
        module.proj.weight.fill_(3.0)  # "trained" values that reset_parameters would overwrite
    weight = module.proj.weight
    expected_mask = module.mask.clone()
    module.mask.fill_(False)
    problems, repaired = check_buffers(module, repair=True)
    assert problems == [] and repaired == ["mask"]
    assert torch.equal(module.mask, expected_mask)
    assert module.proj.weight is weight and torch.equal(weight, torch.full((4, 4), 3.0))


def test_a_buffer_the_method_leaves_alone_is_not_claimed():
    module = LeavesItAlone()
    assert fresh_buffers(module) is None
    problems, repaired = check_buffers(module, repair=True)
    assert repaired == [] and [(p.kind, p.severity, p.key) for p in problems] == [
        ("buffer_mismatch", "warning", "ones")
    ]
    assert torch.equal(module.weight, torch.ones(3))


def test_a_random_buffer_is_not_claimed():
    assert fresh_buffers(RandomBuffer()) is None


def test_buffers_on_meta_are_recomputed_on_the_cpu():
    with torch.device("meta"):
        module = Rotary()
    expected = Rotary().inv_freq
    assert torch.equal(fresh_buffers(module)["inv_freq"], expected)
