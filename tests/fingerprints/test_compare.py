"""The one comparison rule (``fingerprints.compare``): which recorded fingerprint values of a given dtype must
match, exactness across every cast a trainer makes, and the coverage stated when something has none."""

from __future__ import annotations

import itertools

import pytest
import torch

from flame_ext.fingerprints.algorithm import TRAINING_DTYPES, Recorder, fingerprint, matches
from flame_ext.fingerprints.compare import (
    coverage_problems,
    expected_fingerprint,
    fingerprint_problems,
    plan_verification,
    values_dtype,
)
from flame_ext.fingerprints.record import fingerprints_section, read_fingerprints

DTYPES = {name: getattr(torch, name) for name in TRAINING_DTYPES}


def weights(shape=(64, 48), seed=0) -> torch.Tensor:
    """fp32 weights with the spread of a trained projection, a few of them tiny (fp16 keeps those only as
    subnormals, so a cast through fp16 is lossy there) and one large (beyond bf16's 8 significant bits)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.02
    x[0, :4] = torch.tensor([3e-7, -2e-6, 5e-8, 1.234567])
    return x


def record(state: dict[str, torch.Tensor], rounded: bool = True):
    """The fingerprints a conversion writing ``state`` records, read back from its manifest section."""
    recorder = Recorder({k: t.shape for k, t in state.items()}, rounded=rounded)
    for k, t in state.items():
        recorder.add_rows(k, 0, t[:10])
        recorder.add_rows(k, 10, t[10:])
    section = fingerprints_section(recorder.values, {k: str(t.dtype)[6:] for k, t in state.items()}, recorder.rounded)
    recorded, note = read_fingerprints({"fingerprints": section})
    assert note is None
    return recorded


def verdict(recorded, key: str, held: torch.Tensor, stored: str | None = None):
    """None when the record cannot verify ``held`` (read from a checkpoint stored as ``stored``); else match."""
    found = expected_fingerprint(recorded, key, values_dtype(str(held.dtype)[6:], stored))
    return None if found is None else matches(fingerprint(held), found[0], recorded.tolerance)


@pytest.mark.parametrize("recorded_at", TRAINING_DTYPES)
def test_every_cast_chain_is_verified_exactly_and_only_a_lossy_one_is_named(recorded_at):
    """Recorded at S, re-saved at C, loaded into parameters of L: the verdict is the truth. It passes when what
    the trainer holds is exactly the recorded values cast to the dtype they are held at, and fails otherwise
    (a double rounding through fp16 that lost the tiny values, for instance). Never 'not verified'."""
    stored = weights().to(DTYPES[recorded_at])
    recorded = record({"w": stored})
    outcomes = set()
    for saved_at, held_at in itertools.product(TRAINING_DTYPES, TRAINING_DTYPES):
        held = stored.to(DTYPES[saved_at]).to(DTYPES[held_at])
        eff = values_dtype(held_at, saved_at)
        faithful = torch.equal(held.to(torch.float64), stored.to(DTYPES[eff]).to(torch.float64))
        assert verdict(recorded, "w", held, saved_at) is faithful, (saved_at, held_at)
        outcomes.add(faithful)
    assert outcomes == {True, False}  # both verdicts occur: the check can fail


def test_a_bf16_record_verifies_fp32_values_as_they_are_not_rounded():
    """fp32 values within half a bf16 step of a bf16-recorded original round back to it; they are not it."""
    original = weights().to(torch.bfloat16)
    recorded = record({"w": original})
    moved = original.float()
    moved[3, 5] += float(original[3, 5].float().abs()) * 2**-10  # a quarter of a bf16 step: rounds back
    assert torch.equal(moved.to(torch.bfloat16), original)
    assert verdict(recorded, "w", moved, "float32") is False  # an fp32 checkpoint holding the moved values
    assert verdict(recorded, "w", original.float(), "bfloat16") is True  # the bf16 checkpoint in fp32 parameters


def test_one_fp32_ulp_in_bf16_parameters_is_named_exactly_when_it_survives_the_rounding():
    """An fp32 record loaded into bf16 parameters is checked against its bf16 rounding: what the trainer holds.
    A nudge the rounding erases leaves the parameters exactly right (and passes); one that crosses a rounding
    boundary changes a parameter by a bf16 step (and is named). In the fp32 checkpoint itself (what diagnose
    reads) one ulp of one value is seen when it exceeds the tolerance, 1e-11 of the tensor's sum |x|: on a
    value of 1.23 here it does; on a value of 0.02 it may not, and no claim is made."""
    original = weights()
    b = original[2, 2].to(torch.bfloat16)  # an even bf16 mantissa, so that the midpoint rounds down to it
    if b.view(torch.int16) & 1:
        b = (b.view(torch.int16) + 1).view(torch.bfloat16)
    step = (b.view(torch.int16) + 1).view(torch.bfloat16).float() - b.float()
    original[2, 2] = b.float() + step / 2  # exactly halfway: round-to-nearest-even gives b
    recorded = record({"w": original})

    def nudged(i: int, j: int) -> torch.Tensor:
        t = original.clone()
        t[i, j] = torch.nextafter(t[i, j], torch.tensor(float("inf")))
        return t

    for damaged, survives in ((nudged(5, 7), False), (nudged(2, 2), True)):
        assert torch.equal(damaged.to(torch.bfloat16), original.to(torch.bfloat16)) is not survives
        assert verdict(recorded, "w", damaged.to(torch.bfloat16), "float32") is not survives
    assert verdict(recorded, "w", nudged(0, 3), "float32") is False  # the value 1.234567, one fp32 ulp up
    assert verdict(recorded, "w", original, "float32") is True


def test_a_record_without_the_dtype_is_not_verified_never_a_mismatch():
    """A manifest from before the rounded fingerprints (fp32 only), loaded into bf16 parameters: the values are
    not verified, said once with the count and the dtype; a warning, an error when verification is required."""
    state = {f"layer{i}.w": weights(seed=i) for i in range(3)}
    recorded = record(state, rounded=False)
    held = {k: t.to(torch.bfloat16) for k, t in state.items()}
    plan = plan_verification(recorded, held, {k: "bfloat16" for k in held})
    assert plan.keys == {} and plan.coverage() == "0 of 3"
    assert fingerprint_problems({}, recorded, plan, {k: t.shape for k, t in held.items()}) == []
    (warning,) = coverage_problems(plan, required=False)
    assert (warning.kind, warning.severity) == ("manifest", "warning")
    assert "values of 3 tensors loaded as bfloat16 are not verified" in warning.detail
    assert "no bfloat16 fingerprints (recorded as float32" in warning.detail and "at bfloat16" in warning.hint
    assert coverage_problems(plan, required=True)[0].severity == "error"


def test_coverage_names_the_count_and_the_first_keys_without_a_fingerprint():
    recorded = record({"a.weight": weights(seed=1)})
    plan = plan_verification(recorded, ["a.weight", "b.weight", "c.weight"], {"a.weight": "float32"})
    assert plan.coverage() == "1 of 3" and not plan.complete
    (problem,) = coverage_problems(plan, required=False)
    assert problem.severity == "warning"
    assert problem.detail.startswith("values: 1 of 3 tensors verified: no fingerprint recorded for 2 loaded")
    assert "(e.g. b.weight, c.weight)" in problem.detail
    none = plan_verification(recorded, ["x", "y"])
    assert none.coverage() == "0 of 2" and coverage_problems(none, required=True)[0].severity == "error"
    full = plan_verification(recorded, ["a.weight"], {"a.weight": "float32"})
    assert full.complete and coverage_problems(full, required=True) == []


def test_a_mismatch_tells_what_happened_at_the_dtype_compared():
    """Two bf16 tensors swapped in bf16 parameters of an fp32 record: told as a swap, from the bf16 records."""
    state = {"a": weights(seed=1), "b": weights(seed=2)}
    recorded = record(state)
    held = {"a": state["b"].to(torch.bfloat16), "b": state["a"].to(torch.bfloat16)}
    plan = plan_verification(recorded, held, {k: "bfloat16" for k in held})
    observed = {k: fingerprint(t) for k, t in held.items()}
    problems = fingerprint_problems(observed, recorded, plan, {k: t.shape for k, t in held.items()})
    assert sorted(p.key for p in problems) == ["a", "b"]
    assert all(p.severity == "error" and "values expected for" in p.detail for p in problems)
    assert "(values of bfloat16, recorded as float32)" in problems[0].detail


def test_every_reason_is_in_one_problem_so_that_pooling_over_ranks_keeps_them_all():
    """The ranks pool problems by (kind, severity, key): the reasons share one ``manifest`` problem."""
    recorded = record({"a": weights(seed=1), "b": weights(seed=2).to(torch.bfloat16)}, rounded=False)
    plan = plan_verification(recorded, ["a", "b", "c"], {"a": "bfloat16", "b": "float16", "c": "float32"})
    (problem,) = coverage_problems(plan, required=False)
    assert problem.detail.startswith("values: 0 of 3 tensors verified: no fingerprint recorded for 1 loaded")
    assert "1 tensors loaded as bfloat16 are not verified" in problem.detail
    assert "1 tensors loaded as float16 are not verified" in problem.detail
