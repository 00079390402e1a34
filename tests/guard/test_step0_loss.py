"""``flame_ext.guard.step0_loss``: the guard's loss gate measures every token from its one forward pass, pools
the per-token sums over ranks, and stops a load whose tokens disagree with the reference while the mean agrees:
the issue's transposed q_proj, through the installed torchtitan's real CheckpointManager."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from flame_ext.checks.loss import token_delta
from flame_ext.errors import GuardConfigError, InitialLoadValidationError
from flame_ext.guard.options import GuardConfig
from flame_ext.guard.probe import rows_of
from flame_ext.guard.step0_loss import RankGaps, loss_gate_problems, measure_loss

sys.path.insert(0, str(Path(__file__).parents[1] / "titan"))
from _models import hf_like_trainer  # noqa: E402
from support.titan_hosts import build_manager, titan_generation  # noqa: E402

ROWS, N = 2, 12


def _reference(per_token: torch.Tensor) -> dict:
    return {
        "token_ids": torch.zeros(ROWS, N + 1, dtype=torch.long).tolist(),
        "loss_per_token": per_token.tolist(),
        "loss_mean": per_token.mean().item(),
    }


def _table_probe(observed: torch.Tensor, asked: list):
    """A host's probe over a fixed per-token loss table: (sum, count) of each range, as ``probe.LossProbe``."""

    def run(ids: torch.Tensor, ranges: list) -> torch.Tensor:
        asked.extend(ranges)
        cells = [observed[rows_of(r), r[0] : r[1]] for r in ranges]
        return torch.tensor([[c.sum().item(), c.numel()] for c in cells], dtype=torch.float64)

    return run


def _measure(observed: torch.Tensor, reference: torch.Tensor, asked: list | None = None, **kw):
    return measure_loss(
        _reference(reference),
        _table_probe(observed, [] if asked is None else asked),
        multiple=1,
        max_positions=None,
        threshold=0.1,
        token_threshold=0.1,
        per_position=kw.get("per_position", False),
    )


def test_one_forward_pass_scores_every_token_and_the_gate_sees_what_the_mean_hides():
    reference = torch.linspace(1.0, 3.0, ROWS * N, dtype=torch.float64).view(ROWS, N)
    shift = torch.tensor([0.4, -0.4], dtype=torch.float64).repeat(ROWS * N // 2).view(ROWS, N)
    asked: list = []
    cmp, worst = _measure(reference + shift, reference, asked, per_position=True)
    assert sum(len(r) == 3 for r in asked) == ROWS * N  # every token once, in one call of the probe
    assert abs(cmp.delta) < 1e-9 and cmp.mean_ok  # the mean sees nothing
    assert cmp.token_delta == pytest.approx(0.4) == pytest.approx(token_delta(reference + shift, reference))
    assert worst == RankGaps(pytest.approx(0.0, abs=1e-9), pytest.approx(0.4))
    assert cmp.curve["observed"] == pytest.approx((reference + shift).mean(0).tolist())
    (problem,) = loss_gate_problems(cmp, worst, values_differ=False)
    assert problem.kind == "loss_gap" and "per-token" in problem.detail and "0.4000 nats exceeds" in problem.detail


def test_a_healthy_table_passes_and_one_rank_alone_is_judged_too():
    reference = torch.full((ROWS, N), 2.0, dtype=torch.float64)
    cmp, worst = _measure(reference + 0.01, reference)
    assert cmp.ok and cmp.token_delta == pytest.approx(0.01)
    assert loss_gate_problems(cmp, worst, values_differ=False) == []
    # A rank whose tokens disagree among many healthy ones moves the pooled figures by little: stopped all the same.
    (problem,) = loss_gate_problems(cmp, RankGaps(0.0, 0.3), values_differ=False)
    assert "one rank's differs" in problem.detail and "0.3000" in problem.detail


def test_a_nonfinite_token_stops_the_load():
    reference = torch.full((ROWS, N), 2.0, dtype=torch.float64)
    observed = reference.clone()
    observed[0, 5] = math.inf
    cmp, worst = _measure(observed, reference)
    assert [p.kind for p in loss_gate_problems(cmp, worst, values_differ=False)] == ["nonfinite"]


def test_after_a_buffer_mismatch_the_loss_problems_point_at_the_buffers_not_at_diagnose_values():
    reference = torch.full((ROWS, N), 2.0, dtype=torch.float64)
    observed = reference.clone()
    observed[0, 5] = math.nan
    cmp, worst = _measure(observed, reference)
    (plain,) = loss_gate_problems(cmp, worst, values_differ=False)
    assert "diagnose --checkpoint C --values" in plain.hint  # no other cause known: the checkpoint's weights
    wrong = ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    (nonfinite,) = loss_gate_problems(cmp, worst, values_differ=False, wrong_buffers=wrong)
    assert nonfinite.kind == "nonfinite" and "--values" not in nonfinite.hint
    assert nonfinite.hint.startswith("caused by the buffer_mismatch above (model.rotary_emb.inv_freq and 1 more")
    assert "initial_load_repair_buffers = true" in nonfinite.hint
    (gap,) = loss_gate_problems(*_measure(reference + 1.0, reference), values_differ=False, wrong_buffers=wrong[:1])
    assert gap.kind == "loss_gap" and "--values" not in gap.hint
    assert gap.hint.startswith("caused by the buffer_mismatch above (model.rotary_emb.inv_freq: what to_empty() left")


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, True, "0.1"])
def test_a_bad_per_token_threshold_is_refused_with_the_setting_named(bad):
    with pytest.raises(GuardConfigError, match=r"initial_load_max_token_delta = .*finite number of nats >= 0"):
        GuardConfig(initial_load_max_token_delta=bad)
    assert GuardConfig(initial_load_max_token_delta=0).initial_load_max_token_delta == 0.0


needs_titan = pytest.mark.skipif(
    titan_generation() not in ("0.1", "0.3"), reason="needs torchtitan 0.1.x or 0.3.x installed"
)


@pytest.mark.slow  # trains the tiny Mistral on a cold cache; make test-fast leaves it out
@needs_titan
def test_the_real_manager_stops_the_transposed_q_proj_the_mean_lets_through(
    mistral_model, mistral_dcp, mistral_reference, tmp_path, caplog
):
    """The values check off, so that the loss gate alone is judged (with it on, the reference file's source
    fingerprints name the transposed tensor too)."""
    caplog.set_level(logging.INFO, logger="flame_ext")
    manager = build_manager(
        hf_like_trainer(mistral_model),
        tmp_path,
        initial_load_path=str(mistral_dcp["q_transposed"]),
        validate_initial_load=True,
        initial_load_reference=str(mistral_reference),
        initial_load_verify_values=False,
    )
    with pytest.raises(InitialLoadValidationError) as info:
        manager.load()
    report = info.value.report
    assert [p.kind for p in report.errors] == ["loss_gap"]
    loss = report.loss
    assert loss.mean_ok and abs(loss.delta) <= 0.1  # the mean alone would have let this load through
    assert loss.token_delta > 1.5 * GuardConfig.initial_load_max_token_delta and not loss.tokens_ok
    assert "per-token" in report.errors[0].detail
    assert any("per token: mean |difference|" in m for m in caplog.messages)


@pytest.mark.slow  # trains the tiny Mistral on a cold cache; make test-fast leaves it out
@needs_titan
def test_the_real_manager_passes_the_healthy_mistral(mistral_model, mistral_dcp, mistral_reference, tmp_path):
    manager = build_manager(
        hf_like_trainer(mistral_model),
        tmp_path,
        initial_load_path=str(mistral_dcp["healthy"]),
        validate_initial_load=True,
        initial_load_reference=str(mistral_reference),
    )
    assert manager.load() is True
    loss = manager.initial_load_report.loss
    assert loss.ok and loss.token_delta < 1e-4
