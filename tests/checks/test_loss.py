"""``flame_ext.checks.loss``: the loss gap judged by the mean and token by token, the rule ``diagnose --loss``
and the guard share, and the issue's case through the real CLI: a tiny trained Mistral with one layer's square
q_proj transposed, in a checkpoint without a manifest, where the mean loss passes and the tokens do not."""

from __future__ import annotations

import pytest
import torch
from support.cli import report_json, run_cli

from flame_ext.checks.loss import (
    compare_loss,
    first_position_right,
    growing_with_position,
    loss_gap_problem,
    positional_hint,
    token_delta,
)
from flame_ext.errors import InputError
from flame_ext.guard.options import GuardConfig

REFERENCE = torch.full((2, 8), 2.0)


def _record(per_token: torch.Tensor) -> dict:
    return {"loss_per_token": per_token.tolist(), "loss_mean": per_token.mean().item()}


def test_errors_of_opposite_sign_cancel_in_the_mean_and_not_token_by_token():
    shift = torch.tensor([0.3, -0.3]).repeat(8).view(2, 8)  # every token 0.3 off, the mean not at all
    cmp = compare_loss(REFERENCE + shift, _record(REFERENCE), threshold=0.1, token_threshold=0.1)
    assert abs(cmp.delta) < 1e-6 and cmp.mean_ok
    assert cmp.token_delta == pytest.approx(0.3, abs=1e-6) and not cmp.tokens_ok and not cmp.ok
    assert token_delta(REFERENCE, REFERENCE) == 0.0
    assert compare_loss(REFERENCE + shift / 10, _record(REFERENCE), threshold=0.1, token_threshold=0.1).ok


def test_a_nonfinite_token_never_passes():
    observed = REFERENCE.clone()
    observed[1, 3] = float("nan")
    cmp = compare_loss(observed, _record(REFERENCE), threshold=0.1, token_threshold=1e9)
    assert not cmp.tokens_ok and not cmp.ok


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_a_bad_token_threshold_is_refused(bad):
    with pytest.raises(InputError, match="per-token loss threshold"):
        compare_loss(REFERENCE, _record(REFERENCE), threshold=0.1, token_threshold=bad)


@pytest.mark.parametrize(
    "value, message",
    [
        ("-1", "--token-threshold -1.0: must be a finite number of nats >= 0"),
        ("x", "--token-threshold: 'x' is not a number"),
    ],
)
def test_a_bad_token_threshold_on_the_command_line_is_one_line(value, message, tmp_path, capsys):
    from flame_ext.cli import main

    code = main(["diagnose", "--checkpoint", str(tmp_path), "--loss", "--token-threshold", value, "--json"])
    assert code == 2 and report_json(capsys.readouterr().out)["error"] == message


def test_the_problem_says_which_statistic_failed_and_by_how_much():
    shift = torch.cat([torch.full((2, 4), 0.3), torch.full((2, 4), -0.3)], dim=1)
    tokens = compare_loss(REFERENCE + shift, _record(REFERENCE), threshold=0.1, token_threshold=0.1)
    problem = loss_gap_problem(tokens, what="loss", next_step="run with --values")
    assert problem.kind == "loss_gap" and problem.severity == "error"
    assert "within the threshold 0.1" in problem.detail and "per-token" in problem.detail
    assert "0.3000 nats exceeds the per-token threshold 0.1" in problem.detail
    assert "[0, 2) +0.3000" in problem.detail and "[6, 8) -0.3000" in problem.detail  # the bucket figures
    mean = compare_loss(REFERENCE + 0.5, _record(REFERENCE), threshold=0.1, token_threshold=0.1)
    detail = loss_gap_problem(mean, what="loss", next_step="x").detail
    assert "delta +0.5000 nats exceeds the threshold 0.1" in detail and "per-token" not in detail


def test_the_shape_of_the_gap_names_its_cause_and_known_value_errors_come_first():
    """A gap growing with position, or absent at the first position alone: attention (positional encoding,
    q/k); the same gap everywhere: no positional clue; tensors known to differ: they are the cause."""
    ramp = torch.linspace(0.0, 1.0, 8).repeat(2, 1)  # 0 at the first position, 1 at the last
    growing = compare_loss(REFERENCE + ramp, _record(REFERENCE), threshold=0.1, token_threshold=1.0)
    assert growing_with_position(growing.by_position) and first_position_right(growing)
    assert positional_hint(growing).startswith("the gap grows with position")
    long = torch.full((2, 128), 2.0)  # buckets of 32 positions: the first position alone barely moves its bucket
    jump = torch.cat([torch.zeros(2, 1), torch.full((2, 127), 0.8)], dim=1)  # complete a position in, then flat
    first_only = compare_loss(long + jump, _record(long), threshold=0.1, token_threshold=1.0)
    assert not growing_with_position(first_only.by_position) and first_position_right(first_only)
    assert positional_hint(first_only).startswith("the first position (its token attends only to itself)")
    flat = compare_loss(REFERENCE + 0.5, _record(REFERENCE), threshold=0.1, token_threshold=1.0)
    assert positional_hint(flat) is None and not first_position_right(flat)
    assert loss_gap_problem(flat, what="loss", next_step="N").hint == (
        "the weights compute something else than the HF model; N"
    )
    assert loss_gap_problem(growing, what="loss", next_step="N", values_differ=True).hint == (
        "the loaded weights differ from the expected ones (see the value problems); N"
    )


def _diagnose(capsys, checkpoint, model, *extra: str) -> tuple[int, dict]:
    """``flame-ext diagnose --checkpoint C --model M --loss ... --json`` through the real CLI, in this process."""
    from flame_ext.cli import main

    capsys.readouterr()
    code = main(["diagnose", "--checkpoint", str(checkpoint), "--model", str(model), "--loss", *extra, "--json"])
    return code, report_json(capsys.readouterr().out)


@pytest.mark.slow  # trains the tiny Mistral on a cold cache; make test-fast leaves it out
def test_diagnose_stops_the_transposed_q_proj_the_mean_lets_through(
    mistral_model, mistral_dcp, mistral_reference, capsys
):
    reference = ("--reference", str(mistral_reference))
    code, report = _diagnose(capsys, mistral_dcp["q_transposed"], mistral_model, *reference)
    assert code == 1 and report["verdict"] == "FAILED"
    loss = report["loss"]
    default = GuardConfig.initial_load_max_token_delta
    assert loss["token_threshold"] == default and loss["threshold"] == 0.1
    # The mean alone passes: this is the case the per-token figure exists for.
    assert abs(loss["delta"]) <= loss["threshold"]
    assert loss["token_delta"] > 1.5 * default
    (gap,) = [p for p in report["problems"] if p["kind"] == "loss_gap"]
    assert "per-token" in gap["detail"] and f"{loss['token_delta']:.4f} nats exceeds" in gap["detail"]
    # q/k damage leaves the first position exact (its token attends only to itself), and the hint says so.
    assert abs(loss["first_position_delta"]) < 1e-4 and "query/key projections" in gap["hint"]
    # Judged by the mean alone, the same checkpoint would be OK.
    code, mean_only = _diagnose(
        capsys, mistral_dcp["q_transposed"], mistral_model, *reference, "--token-threshold", "1000"
    )
    assert code == 0 and mean_only["verdict"] == "OK" and mean_only["loss"]["token_threshold"] == 1000


@pytest.mark.slow  # the tiny Mistral, converted and diagnosed
def test_a_healthy_mistral_passes_token_by_token(mistral_model, mistral_dcp, mistral_reference, capsys):
    code, report = _diagnose(capsys, mistral_dcp["healthy"], mistral_model, "--reference", str(mistral_reference))
    assert code == 0, report["problems"]
    assert report["loss"]["token_delta"] < 1e-4  # the same computation: rounding noise only


@pytest.mark.slow  # the tiny Mistral, converted and diagnosed
def test_a_healthy_bf16_mistral_passes_token_by_token(mistral_model, capsys, tmp_path):
    """Converted to bf16 with its reference measured in bf16 (what `convert --dtype bfloat16` records)."""
    checkpoint = tmp_path / "bf16"
    convert = run_cli("convert", "--model", str(mistral_model), "--checkpoint", str(checkpoint), "--dtype", "bfloat16")
    assert convert.returncode == 0, convert.stderr
    code, report = _diagnose(capsys, checkpoint, mistral_model)
    assert code == 0, report["problems"]
    assert report["loss"]["token_delta"] < GuardConfig.initial_load_max_token_delta / 5
