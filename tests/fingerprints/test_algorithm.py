"""Fingerprints: equal over any tiling into blocks, different under every damage the guard must see."""

from __future__ import annotations

import json

import pytest
import torch
from support.tensors import trained_like

from flame_ext.fingerprints.algorithm import (
    TERMS,
    TOLERANCE,
    Recorder,
    block_fingerprint,
    fingerprint,
    matches,
    transposed,
)
from flame_ext.fingerprints.forensics import what_happened


@pytest.fixture
def two_torch_threads():
    """Two intra-op threads (the suite runs with one, tests/conftest.py): what a caller's count is, put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def tiles(t: torch.Tensor, row_cuts: list[int], col_cuts: list[int]) -> torch.Tensor:
    """The sum of the fingerprints of a grid of blocks of ``t`` (2-D and more: rows and dim 1 cut)."""
    total = torch.zeros(len(TERMS), dtype=torch.float64)
    rows = [0, *row_cuts, t.shape[0]]
    cols = [0, *col_cuts, t.shape[1]] if t.dim() >= 2 else [None, None]
    for r0, r1 in zip(rows, rows[1:]):
        if t.dim() == 1:
            total += block_fingerprint(t[r0:r1], [r0], tuple(t.shape))
            continue
        for c0, c1 in zip(cols, cols[1:]):
            block = t[r0:r1, c0:c1]
            total += block_fingerprint(block, [r0, c0] + [0] * (t.dim() - 2), tuple(t.shape))
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,row_cuts,col_cuts",
    [((96, 64), [1, 50], [7, 32]), ((300,), [128, 129], []), ((6, 10, 4), [3], [5]), ((1, 5), [], [2])],
)
def test_blocks_with_global_offsets_add_up_to_the_whole(shape, row_cuts, col_cuts, dtype):
    t = trained_like(shape, dtype)
    whole = fingerprint(t)
    assert matches(tiles(t, row_cuts, col_cuts), whole)
    assert not matches(tiles(t, row_cuts, col_cuts), fingerprint(t.flip(-1)))  # the comparison can fail


def test_streamed_rows_equal_the_whole_and_the_summation_error_is_far_below_the_tolerance(two_torch_threads):
    t = trained_like((1000, 300))
    threads = torch.get_num_threads()
    assert threads == two_torch_threads
    acc = Recorder({"w": t.shape})
    for s in range(0, 1000, 333):
        acc.add_rows("w", s, t[s : s + 333])
    assert torch.get_num_threads() == threads  # one thread per block, the caller's count put back
    whole = fingerprint(t)
    scale = torch.tensor([1.0] + [float(whole[3])] * (len(TERMS) - 1))
    scale[2] = whole[2]
    assert ((acc.values["w"] - whole).abs() / scale).max() < TOLERANCE / 100


def test_zero_dim_and_empty_tensors():
    assert matches(fingerprint(torch.tensor(3.0)), fingerprint(torch.tensor(3.0)))
    assert not matches(fingerprint(torch.tensor(3.0)), fingerprint(torch.tensor(-3.0)))
    assert fingerprint(torch.zeros(0, 4)).abs().sum() == 0


def test_nonfinite_values_are_counted_and_the_fingerprint_stays_json_finite():
    t = trained_like((8, 8))
    t[1, 2], t[3, 3] = float("nan"), float("inf")
    fp = fingerprint(t)
    assert fp[0] == 2 and torch.isfinite(fp).all()
    json.dumps(fp.tolist(), allow_nan=False)
    assert what_happened("w", fp, fingerprint(trained_like((8, 8))), shape=(8, 8), dtype="float32").code == "nonfinite"


def test_transpose_of_the_fingerprint_is_the_fingerprint_of_the_transpose():
    t = trained_like((40, 40))
    assert matches(transposed(fingerprint(t)), fingerprint(t.t()))
    assert not matches(fingerprint(t), fingerprint(t.t()))


def test_a_one_value_change_is_seen_in_a_large_tensor():
    """One value moved by 2% of the mean |x| in a 2048 x 2048 matrix: above the tolerance's reach."""
    t = trained_like((2048, 2048))
    changed = t.clone()
    changed[1000, 7] += 0.02 * t.abs().mean() * 2048 * 2048 / 2048**2 * 100
    assert not matches(fingerprint(changed), fingerprint(t))


def _by_definition(t: torch.Tensor) -> torch.Tensor:
    """The ten terms written out as the module docstring and docs/fingerprints.md define them, whole-tensor."""
    x = t.double().reshape(t.shape[0] if t.dim() else 1, -1)

    def weyl(n: int, a: float) -> torch.Tensor:
        return 2 * torch.frac((torch.arange(n, dtype=torch.float64) + 1) * a) - 1

    a_p, a_q = (5**0.5 - 1) / 2, 2**0.5 - 1
    pi, qi = weyl(x.shape[0], a_p)[:, None], weyl(x.shape[0], a_q)[:, None]
    pj, qj = weyl(x.shape[1], a_p)[None, :], weyl(x.shape[1], a_q)[None, :]
    if t.dim() <= 1:
        pj, qj = torch.full_like(pj, 2 * a_p - 1), torch.full_like(qj, 2 * a_q - 1)
    sums = [x, x * x, x.abs(), x * pi, x * qi, x * pj, x * qj, x * pi * qj, x * qi * pj]
    return torch.tensor([0.0] + [float(s.sum()) for s in sums], dtype=torch.float64)


@pytest.mark.parametrize("shape", [(1100, 513), (300_000,), (30, 20, 1000)])
def test_the_chunked_computation_is_the_defined_one(shape):
    """Several chunks per block (the values are cast and widened chunk by chunk): still the defined sums,
    so manifests recorded by earlier releases of the same algorithm verify without a version change."""
    t = trained_like(shape) + 1e-3
    assert matches(fingerprint(t), _by_definition(t), TOLERANCE / 100)
    stored = t.to(torch.bfloat16)
    assert matches(block_fingerprint(t, [0] * t.dim(), shape, torch.bfloat16), _by_definition(stored), TOLERANCE / 100)


def test_workers_share_the_rows_and_give_the_same_fingerprint(two_torch_threads):
    t = trained_like((1100, 1024))  # ~1.1 M values: split between the workers
    threads = torch.get_num_threads()
    assert threads == two_torch_threads
    one = block_fingerprint(t, [0, 0], t.shape, torch.bfloat16)
    two = block_fingerprint(t, [0, 0], t.shape, torch.bfloat16, workers=2)
    assert matches(two, one, TOLERANCE / 100) and torch.get_num_threads() == threads
    t[1000, 3] = float("nan")  # in the second worker's rows
    damaged = block_fingerprint(t, [0, 0], t.shape, torch.bfloat16, workers=2)
    assert damaged[0] == 1 and torch.isfinite(damaged).all() and not matches(damaged, one)


@pytest.mark.parametrize(
    "stored,targets",
    [("float32", ("bfloat16", "float16")), ("bfloat16", ("float16",)), ("float16", ("bfloat16",)), ("int64", ())],
)
def test_rounded_fingerprints_are_those_of_the_values_cast_from_the_same_pass(stored, targets):
    """Recorded per block beside the plain one: each equals the fingerprint of the whole tensor cast to that
    dtype; exact widenings (bf16 -> fp32) are not recorded, they are the plain numbers."""
    from flame_ext.fingerprints.algorithm import rounding_dtypes

    dtype = getattr(torch, stored)
    t = trained_like((300, 70)).mul(1000).to(dtype) if not dtype.is_floating_point else trained_like((300, 70), dtype)
    assert rounding_dtypes(stored) == targets
    acc = Recorder({"w": t.shape}, rounded=True)
    for s in range(0, 300, 128):
        acc.add_rows("w", s, t[s : s + 128])
    assert matches(acc.values["w"], fingerprint(t))
    assert sorted(acc.rounded["w"]) == sorted(targets)
    for name in targets:
        cast = t.to(getattr(torch, name))
        assert matches(acc.rounded["w"][name], fingerprint(cast), TOLERANCE / 100)
        lossless = torch.equal(cast.to(dtype), t)  # bf16 -> fp16 of these values is: then the same numbers
        assert matches(acc.rounded["w"][name], acc.values["w"]) is lossless
    assert Recorder({"w": t.shape}).rounded == {}  # off unless asked for: to-hf records no roundings


def test_a_rounding_that_overflows_counts_the_infinities():
    """fp32 values beyond fp16's range become inf when rounded to fp16: counted, the sums stay finite."""
    t = trained_like((20, 20))
    t[3, 4] = 1e6
    (plain, half) = block_fingerprints_of(t, (None, torch.float16))
    assert plain[0] == 0 and half[0] == 1 and torch.isfinite(half).all()


def block_fingerprints_of(t: torch.Tensor, dtypes, workers: int = 1) -> torch.Tensor:
    from flame_ext.fingerprints.algorithm import block_fingerprints

    return block_fingerprints(t, [0] * t.dim(), tuple(t.shape), dtypes, workers=workers)


def test_exact_widening_is_decided_from_the_formats():
    from flame_ext.fingerprints.algorithm import exact_widening

    assert exact_widening("bfloat16", "float32") and exact_widening("float16", "float32")
    assert exact_widening("float32", "float32") and exact_widening("int32", "int64")
    assert not exact_widening("float32", "bfloat16") and not exact_widening("bfloat16", "float16")
    assert not exact_widening("float16", "bfloat16") and not exact_widening("int64", "float64")
    assert not exact_widening("float32", "nosuchdtype")


@pytest.mark.parametrize("shape", [(700, 1100), (300_001,), (3, 5)])
def test_bf16_rounded_to_fp16_is_the_fingerprint_of_the_cast_values(shape):
    """bf16 -> fp16 is summed from the plain pass plus the few values below fp16's exact range (those that
    round): it must equal the fingerprint of the cast values whatever the magnitudes, tiny ones included."""
    t = trained_like(shape).to(torch.bfloat16)
    flat = t.view(-1)
    tiny = torch.tensor([3e-6, -5e-7, 2.0**-24, 1.5 * 2.0**-24, 1e-9, -(2.0**-18), 7e-5], dtype=torch.bfloat16)
    flat[: len(tiny)] = tiny[: len(flat)]
    flat[-1] = 0.0
    cast = t.to(torch.float16)
    assert not torch.equal(cast.to(torch.bfloat16), t)  # some values do round
    for workers in (1, 2):
        plain, half = block_fingerprints_of(t, (None, torch.float16), workers)
        assert matches(plain, fingerprint(t), TOLERANCE / 100)
        assert matches(half, fingerprint(cast), TOLERANCE / 100) and not matches(half, plain, TOLERANCE / 100)
    flat[1] = 70000.0  # beyond fp16's range: counted as inf, as the cast does
    (half,) = block_fingerprints_of(t, (torch.float16,))
    assert half[0] == 1 and matches(half, fingerprint(t.to(torch.float16)))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_gpu_tensor_is_summed_on_its_device_to_the_cpu_fingerprint(dtype):
    """A shard on the GPU is summed where it lives (the guard and the save record hand it over as it is): the
    fingerprint, plain and rounded, NaN and the values fp16 cannot hold included, is the CPU one, on the CPU."""
    from flame_ext.fingerprints.algorithm import block_fingerprints

    t = trained_like((3000, 1100), dtype)
    t.view(-1)[:3] = torch.tensor([float("nan"), 3e-7, 2.0**-20], dtype=dtype)
    targets = (None, torch.float16, torch.bfloat16, torch.float32)
    on_cpu = block_fingerprints(t, [0, 0], tuple(t.shape), targets)
    torch.cuda.reset_peak_memory_stats()
    on_gpu = block_fingerprints(t.cuda(), [0, 0], tuple(t.shape), targets)
    assert on_gpu.device.type == "cpu"
    assert torch.cuda.max_memory_allocated() > t.numel() * t.element_size()  # the sums' chunks were on the GPU
    for a, b in zip(on_gpu, on_cpu):
        assert matches(a, b)
