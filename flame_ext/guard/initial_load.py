"""The step-0 guard: check the first load of a training run before step 1 can hide what went wrong.

Host-independent: the torchtitan adapters in ``flame_ext.titan`` decide *when* a load is the initial one
and hand over what the load asks for; this module decides whether it is right. Four checks, in order:

1. before any tensor is read, the keys / global shapes / dtypes the load will request against the
   checkpoint's metadata (``parity``), every problem at once;
2. after loading, every loaded tensor against the fingerprint recorded when it was written (``values``);
3. the non-persistent buffers no checkpoint holds (``checks.nonpersistent_buffers.check_buffers``), repaired when asked;
4. one forward pass on the manifest's reference batch, against the HF model's loss on the same tokens
   (``step0_loss``).

Every check runs on every rank and the ranks pool their findings (collectives on the default process
group) before deciding, so all ranks raise ``InitialLoadValidationError`` together or none does: a
verdict taken on one rank alone would leave the others waiting in the next collective. For the same
reason the manifest the checks decide from (its reference, fingerprints and source config) is read by rank 0
alone and given to the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flame_ext.checks.native_keys import torchtitan_module
from flame_ext.errors import InitialLoadValidationError
from flame_ext.guard.metrics import record_metrics
from flame_ext.guard.options import GuardConfig
from flame_ext.guard.parity import parity_problems
from flame_ext.guard.probe import LossProbe, run_probe
from flame_ext.guard.ranks import RankFailure, agreed, pool, pool_counts, rank, rank_0s, stopping_as, world
from flame_ext.guard.reference_file import GuardReference, read_guard_reference, source_config_problems
from flame_ext.guard.state import RequestedLoad
from flame_ext.guard.step0_loss import (
    RankGaps,
    draw_loss_plot,
    log_loss,
    loss_gate_problems,
    measure_loss,
    missing_reference_problems,
)
from flame_ext.guard.value_check import verify_loaded_values
from flame_ext.io.specs import TensorSpec
from flame_ext.process import report_without_traceback
from flame_ext.report import LossComparison, Problem, Report

if TYPE_CHECKING:
    from flame_ext.fingerprints.record import Fingerprints

__all__ = ["InitialLoadGuard"]

logger = logging.getLogger("flame_ext.guard")  # the name users filter the guard's log lines by


class InitialLoadGuard:
    """One initial load, checked: ``before_load`` then (if the load ran) ``after_load``.

    ALL ranks must make the same calls in the same order: both hold collectives.
    """

    def __init__(self, config: GuardConfig, checkpoint: str, model_parts: list[nn.Module]) -> None:
        self.config = config
        self.checkpoint = str(checkpoint)
        self.parts = model_parts
        self.report = Report()
        self.worst_rank = RankGaps()  # the largest gaps of a single rank, set by the loss pass
        self.reference: dict[str, Any] = {}
        self.reference_unavailable: str | None = None  # why the conversion recorded no reference loss
        self.skipped_loss: str | None = None  # why the loss gate was skipped on this machine
        self.fresh: list[str] = []
        self.fingerprints: Fingerprints | None = None  # when values are verified
        self.found: dict[str, TensorSpec | None] = {}
        self.figures: dict[str, float] = {}  # step-0 figures for the metric logger beside the loss
        self.model_prefix = ""
        self.values_label = "values"  # in the final line: "values: N of M" when some had nothing to check

    # -- before

    def before_load(
        self,
        requested: RequestedLoad,
        read_found: Callable[[], Mapping[str, TensorSpec | None]],
        *,
        tied: dict[str, str] | None = None,
        extra: Iterable[Problem] = (),
    ) -> None:
        """Reference present and usable, then parity; raises on any error, before a tensor is read.

        ``read_found`` reads the checkpoint's metadata (``.metadata`` or safetensors headers, never data);
        ``extra`` are host-found problems (e.g. keys an adapter does not map) pooled with the rest.
        """
        start = time.perf_counter()
        self.report.checked = ["keys", "manifest"]
        notes = self.report.notes
        # The manifest: rank 0 reads, every rank decides from what it read. Ranks reading it each could see
        # different things (a shared file system that shows a file to some nodes later, a manifest being
        # replaced), and a rank that found fingerprints would wait in the value check's collectives while another
        # did not. The checkpoint's metadata is each rank's own: a rank given another checkpoint is found by the
        # key check, whose problems are pooled, so the ranks still decide alike.
        ref, config_problems, read_notes = self._rank_0s(self._read_manifest, "reading the manifest")
        notes += read_notes
        self.reference, self.fresh, self.fingerprints = ref.reference, ref.fresh, ref.fingerprints
        self.reference_unavailable = ref.unavailable
        found = self.found = dict(self._agreed(read_found, "reading the checkpoint metadata"))
        self.model_prefix = requested.model_prefix
        counts = self.report.counts

        module = next((m for m in map(torchtitan_module, self.parts) if m), None)

        def parity() -> list[Problem]:
            return list(extra) + parity_problems(
                requested,
                found,
                fresh=self.fresh,
                tied=tied or {},
                counts=counts,
                choices=ref.choices,
                notes=notes,
                native_module=module,
            )

        problems = self._agreed(parity, "the key/shape check")
        # What is wrong with the checkpoint itself first (a stock converter's nested keys), then the reference.
        self.report.extend(pool(problems + ref.problems + config_problems))
        self.report.counts = pool_counts(self.report.counts)
        logger.info(
            "flame-ext: checked %s before loading: %d model keys requested, %d keys in the checkpoint; %s "
            "(%.0f ms, no tensor read)",
            self.checkpoint,
            len(requested.model),
            len(found),
            _count_line(self.report),
            (time.perf_counter() - start) * 1e3,
        )
        self._raise_if_failed("before loading (nothing was read)")

    def _read_manifest(self) -> tuple[GuardReference, list[Problem], list[str]]:
        """What ``before_load`` decides from: the reference, the source config's problems, and the notes these
        reads leave for the report."""
        notes: list[str] = []
        ref = read_guard_reference(self.config, self.checkpoint, self.parts, notes)
        config_problems = source_config_problems(self.config, self.checkpoint, self.parts, notes)
        return ref, config_problems, notes

    # -- after

    def after_load(
        self,
        probe: LossProbe,
        *,
        position_multiple: int = 1,
        max_positions: int | None = None,
        metric_logger: Any = None,
        loaded: Mapping[str, Any] | None = None,
    ) -> Report:
        """Values, buffers, then the loss gate; logs the comparison and the JSON record; raises on any error.

        ``loaded`` is what the load filled, keyed as the checkpoint names it (the trainer's own parameters,
        DTensor shards included); its values are verified against the recorded fingerprints.

        The reference rows are cut to ``max_positions`` predicted positions (a native model's RoPE table
        ends at the training sequence length) and to a multiple of ``position_multiple`` (a chunked loss
        splits the sequence evenly): the model is causal, so a prefix's per-token reference is exact. When
        the model cannot run on this machine (fla's Triton kernels without a GPU), only the loss gate is
        skipped, with a warning.
        """
        start = time.perf_counter()
        if self.fingerprints is not None and loaded is not None:
            required = self.config.initial_load_verify_values is True
            values = verify_loaded_values(self.fingerprints, loaded, self.found, self._agreed, required=required)
            self.figures.update(values.figures)
            self.values_label = values.label
            self.report.notes.append(values.note)
            self.report.extend(pool(values.problems))
            self.report.checked += ["values"]
        repair = self.config.initial_load_repair_buffers
        problems = self._agreed(lambda: self._buffers(repair), "the buffer check")
        self.report.extend(pool(problems))
        self.report.checked += ["buffers"]
        comparison = self._agreed(
            lambda: self._loss(probe, position_multiple, max_positions), "the step-0 forward pass"
        )
        if comparison is not None:
            self._judge_loss(comparison)
        self._log_versions()
        if comparison is not None:
            record_metrics(metric_logger, comparison, self.figures)
        self._raise_if_failed("after loading")
        logger.info("flame-ext initial-load report: %s", self.report.to_json(indent=None))
        logger.info(
            "flame-ext: initial load of %s validated (%s%s: %.0f ms)",
            self.checkpoint,
            ", ".join(self.values_label if c == "values" else c for c in self.report.checked),
            "; step-0 loss not measured" if comparison is None else "",
            (time.perf_counter() - start) * 1e3,
        )
        return self.report

    def _buffers(self, repair: bool) -> list[Problem]:
        from flame_ext.checks.nonpersistent_buffers import check_buffers

        problems: list[Problem] = []
        for part in self.parts:
            found, repaired = check_buffers(part, repair=repair, after=self.checkpoint)  # logs each repair
            problems += found
            self.report.notes += [f"repaired non-persistent buffer {key} (wrong after loading)" for key in repaired]
        return problems

    def _loss(self, probe: LossProbe, multiple: int, max_positions: int | None) -> LossComparison | None:
        """The step-0 comparison; None (on every rank alike) when the forward pass cannot run on this machine."""

        def run(ids: torch.Tensor, ranges: list[tuple[int, ...]]) -> torch.Tensor | None:
            sums, self.skipped_loss = run_probe(probe, self.parts, ids, ranges)
            if self.skipped_loss is not None:
                self.report.notes.append(f"step-0 loss not measured: {self.skipped_loss}")
            return sums

        if not self.reference:
            self.report.problems += missing_reference_problems(run, multiple, self.reference_unavailable)
            return None
        comparison, self.worst_rank = measure_loss(
            self.reference,
            run,
            multiple=multiple,
            max_positions=max_positions,
            threshold=self.config.initial_load_max_loss_delta,
            token_threshold=self.config.initial_load_max_token_delta,
            per_position=bool(self.config.initial_load_plot),
        )
        return comparison

    def _judge_loss(self, comparison: LossComparison) -> None:
        """The loss gate's verdict into the report, with the log lines and the plot."""
        self.report.loss = comparison
        self.report.checked += ["loss"]
        log_loss(comparison)
        note = draw_loss_plot(comparison, self.config.initial_load_plot, self.checkpoint)
        self.report.notes += [note] if note else []
        values_differ = any(p.kind == "value_mismatch" and p.severity == "error" for p in self.report.problems)
        wrong_buffers = [p.key or "" for p in self.report.errors if p.kind == "buffer_mismatch"]
        self.report.problems += loss_gate_problems(
            comparison, self.worst_rank, values_differ=values_differ, wrong_buffers=wrong_buffers
        )

    def _log_versions(self) -> None:
        """The transformers that measured the reference and the one running: a different one can read the
        same config differently (see checks.config)."""
        import transformers

        then, now = self.reference.get("transformers_version"), transformers.__version__
        line = f"reference measured with transformers {then or 'unknown'}; running transformers {now}"
        logger.info("flame-ext: %s", line)
        if then != now:
            self.report.notes.append(line)

    # -- verdict

    def _agreed(self, step: Callable[[], Any], what: str) -> Any:
        """``ranks.agreed``: a step that failed on another rank ends this one too, as a validation error."""
        return stopping_as(self._stopped, agreed, step, what)

    def _rank_0s(self, step: Callable[[], Any], what: str) -> Any:
        """``ranks.rank_0s``: rank 0's result on every rank; its failure ends the others as a validation error."""
        return stopping_as(self._stopped, rank_0s, step, what)

    def _stopped(self, failure: RankFailure) -> InitialLoadValidationError:
        return InitialLoadValidationError(
            f"initial-load validation of {self.checkpoint} stopped: {failure}", self.report
        )

    def _raise_if_failed(self, when: str) -> None:
        if self.report.ok:
            return
        logger.error("flame-ext initial-load report: %s", self.report.to_json(indent=None))
        report_without_traceback()  # a trainer that does not catch the error shows the report, not a traceback
        summary = self.report.render_text(
            group_hints=True, more="all of them in the JSON record logged as 'flame-ext initial-load report'"
        )
        raise InitialLoadValidationError(
            f"initial load of {self.checkpoint} failed validation {when} on rank {rank()} of {world()} "
            f"({_count_line(self.report)}):\n{summary}",
            self.report,
        )


def _count_line(report: Report) -> str:
    kinds: dict[str, int] = {}
    for p in report.errors:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in kinds.items()) if kinds else "no errors"
