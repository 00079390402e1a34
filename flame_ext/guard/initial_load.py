"""The step-0 guard: check the first load of a training run before step 1 can hide what went wrong.

Host-independent: the torchtitan adapters in ``flame_ext.titan`` decide *when* a load is the initial one
and hand over what the load asks for; this module decides whether it is right. Four checks, in order:

1. before any tensor is read, the keys / global shapes / dtypes the load will request against the
   checkpoint's metadata (``checks.keys.compare_specs``), every problem at once;
2. after loading, every loaded tensor against the fingerprint recorded when it was written
   (``checks.fingerprints``): each rank sums its shards, one all-reduce gives the whole; exact, no threshold;
3. the non-persistent buffers no checkpoint holds (``checks.buffers.check_buffers``), repaired when asked;
4. one forward pass on the manifest's reference batch, against the HF model's loss on the same tokens.

Every check runs on every rank and the ranks pool their findings (collectives on the default process
group) before deciding, so all ranks raise ``InitialLoadValidationError`` together or none does: a
verdict taken on one rank alone would leave the others waiting in the next collective.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flame_ext.errors import FlameExtError, GuardConfigError, InitialLoadValidationError, report_without_traceback
from flame_ext.guard.options import GuardConfig
from flame_ext.guard.ranks import RankFailure, agreed, max_over_ranks, pool, pool_counts, rank, sum_over_ranks, world
from flame_ext.io.specs import TensorSpec, dtype_name
from flame_ext.report import LossComparison, Problem, Report, bucket_label

__all__ = [
    "InitialLoadGuard",
    "RequestedLoad",
    "split_request",
    "meta_copy",
    "hf_loss_probe",
    "LossProbe",
    "IGNORE_INDEX",
    "tied_keys",
    "record_metrics",
    "model_state",
]

logger = logging.getLogger("flame_ext.guard")  # the name users filter the guard's log lines by

IGNORE_INDEX = -100  # the label value torch's cross entropy (and torchtitan's loss) skips
_REFERENCE_HINT = (
    "write one with `flame-ext reference --model HF --out FILE` and set checkpoint.initial_load_reference = FILE "
    "(`flame-ext convert` writes it into the checkpoint folder as flame_ext.json), or set "
    "checkpoint.validate_initial_load = false"
)
_NEXT_STEP = "run `flame-ext diagnose --checkpoint C --model HF --values --loss` to find the tensors that differ"

# probe(token_ids [B, n+1], ranges) -> float64 [len(ranges), 2]: (sum of per-token loss, token count) per
# position range [start, end) of the n predicted positions. Sums and counts, not means, so ranks add them up.
LossProbe = Callable[[torch.Tensor, list[tuple[int, int]]], torch.Tensor]


@dataclass
class RequestedLoad:
    """What a load will ask DCP for: model tensors by key (global shapes), and other states by name."""

    model: dict[str, TensorSpec]
    other_states: list[str]
    model_prefix: str = ""  # "model." when the model sits nested in a full training-state load


def split_request(state: Mapping[str, Any]) -> RequestedLoad:
    """The specs of the exact state dict a host passes to ``dcp.load``, without reading or moving data.

    Tensors at the top level are model keys (torchtitan's model-only and 0.3 full loads are flat); a
    ``model`` entry that is a Stateful or dict is the model nested under ``model.`` (torchtitan 0.1 full
    loads); anything else (optimizer, lr_scheduler, dataloader, train_state) is another state, checked by
    name only, because building an optimizer's state dict can cost collectives.
    DTensor ``shape`` is the global shape, which is what the checkpoint metadata records.
    """
    model: dict[str, TensorSpec] = {}
    other: list[str] = []
    prefix = ""
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            model[key] = TensorSpec(tuple(value.shape), dtype_name(value.dtype))
        elif key == "model" and value is not None:
            prefix = "model."
            inner = value.state_dict() if hasattr(value, "state_dict") else value
            for k, v in inner.items():
                if isinstance(v, torch.Tensor):
                    model[prefix + k] = TensorSpec(tuple(v.shape), dtype_name(v.dtype))
        elif value is not None:
            other.append(key)
    return RequestedLoad(model, other, prefix)


def meta_copy(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Meta tensors with the global shape and dtype of each tensor: feed a key-mapping adapter (``to_hf``)
    without computing anything or running a collective on sharded tensors."""
    return {
        k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v
        for k, v in state_dict.items()
    }


# ----------------------------------------------------------------------------------------- loss


def _logits_of(output: Any) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None:
        raise GuardConfigError(
            "the model's forward returned no logits; the step-0 loss check needs them (for a model with a fused "
            "loss, compute logits when no labels are given)"
        )
    full = getattr(logits, "full_tensor", None)  # a DTensor (loss parallel): gather the vocab shards
    return full() if callable(full) else logits


def hf_loss_probe(model: nn.Module) -> LossProbe:
    """Loss the way HF causal LMs compute it with ``labels=``: logits, shift by one, cross entropy."""
    from flame_ext.model.reference import per_token_loss

    def probe(token_ids: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
        device = next(model.parameters()).device
        per_token = per_token_loss(_logits_of(model(token_ids.to(device))), token_ids).double().cpu()
        return torch.tensor(
            [[per_token[:, s:e].sum().item(), per_token[:, s:e].numel()] for s, e in ranges], dtype=torch.float64
        )

    return probe


class _EvalMode:
    """Eval mode and no_grad for the probe, then each module's own training flag back (not ``train()``)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        self.parts = parts

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for part in self.parts for m in part.modules()]
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        for part in self.parts:
            part.eval()

    def __exit__(self, *exc: Any) -> None:
        for module, flag in self.flags:
            module.training = flag
        self.no_grad.__exit__(*exc)


# ----------------------------------------------------------------------------------------- the guard


class InitialLoadGuard:
    """One initial load, checked: ``before_load`` then (if the load ran) ``after_load``.

    ALL ranks must make the same calls in the same order: both hold collectives.
    """

    def __init__(self, config: GuardConfig, checkpoint: str, model_parts: list[nn.Module]) -> None:
        self.config = config
        self.checkpoint = str(checkpoint)
        self.parts = model_parts
        self.report = Report()
        self.worst_rank_gap = 0.0  # largest |loss - reference| of a single rank, set by the loss pass
        self.reference: dict[str, Any] = {}
        self.reference_unavailable: str | None = None  # why the conversion recorded no reference loss
        self.skipped_loss: str | None = None  # why the loss gate was skipped on this machine
        self.fresh: list[str] = []
        self.fingerprints: Any = None  # io.manifest.Fingerprints when values are verified
        self.found: dict[str, TensorSpec | None] = {}
        self.figures: dict[str, float] = {}  # step-0 figures for the metric logger beside the loss
        self.model_prefix = ""

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
        self.reference, self.fresh, self.fingerprints, reference_problems = self._agreed(
            self._read_reference, "reading the reference"
        )
        config_problems = self._agreed(self._config_reading, "the config check")
        found = self.found = dict(self._agreed(read_found, "reading the checkpoint metadata"))
        self.model_prefix = requested.model_prefix
        problems = self._agreed(lambda: list(extra) + self._parity(requested, found, tied or {}), "the key/shape check")
        # What is wrong with the checkpoint itself first (a stock converter's nested keys), then the reference.
        self.report.extend(pool(problems + reference_problems + config_problems))
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

    def _read_reference(self) -> tuple[dict[str, Any], list[str], Any, list[Problem]]:
        """(reference, fresh keys, fingerprints, problems): a missing or unusable reference is a problem reported
        beside the key/shape check's, not instead of it."""
        from flame_ext.io.manifest import MANIFEST_NAME, read_fingerprints, read_manifest, read_reference

        own = Path(self.checkpoint) / MANIFEST_NAME
        path = Path(self.config.initial_load_reference) if self.config.initial_load_reference else own
        if not path.is_file():
            return {}, [], None, [_manifest_problem(f"no reference for the step-0 loss check: {path} does not exist")]
        try:
            fresh = read_manifest(own).get("fresh_keys", []) if own.is_file() else []
            manifest = read_manifest(path)
            fingerprints = self._fingerprints(read_fingerprints(manifest), path)
            if manifest.get("reference") is None and manifest.get("reference_unavailable"):
                # The conversion could not run the model (e.g. Triton without a GPU): after loading, the loss
                # gate is skipped if this machine cannot run it either, and the missing reference is an error if
                # it can. Every other check (keys, buffers, values) runs.
                self.reference_unavailable = str(manifest["reference_unavailable"])
                return {}, list(fresh), fingerprints, []
            reference = read_reference(path)
        except FlameExtError as exc:
            return {}, [], None, [_manifest_problem(str(exc))]
        ids = reference["token_ids"]  # a rectangle of ids >= 0 (io.manifest.check_reference); bounded here
        from flame_ext.checks.loss import embedding_rows, reference_vocabulary_problem

        foreign = reference_vocabulary_problem(ids, embedding_rows(self.parts), str(path), _REFERENCE_HINT)
        if foreign is not None:
            return {}, [], None, [foreign]
        return reference, list(fresh), fingerprints, []

    def _config_reading(self) -> list[Problem]:
        """The source config as the trainer's model (or the installed transformers) reads it: checks.config."""
        from flame_ext.checks.config import recorded_source_problems
        from flame_ext.io.manifest import MANIFEST_NAME

        path = Path(self.config.initial_load_reference or Path(self.checkpoint) / MANIFEST_NAME)
        if not path.is_file():
            return []  # reported by the reference check
        problems, note = recorded_source_problems(path, getattr(self.parts[0], "config", None))
        self.report.notes.extend([note] if note else [])
        return problems

    def _fingerprints(self, found: tuple[Any, str | None], path: Path) -> Any:
        """The recorded fingerprints when values are to be verified; None (with a note) when not."""
        fingerprints, note = found
        wanted = self.config.initial_load_verify_values
        if wanted is False:
            self.report.notes.append("value verification switched off (checkpoint.initial_load_verify_values = false)")
            return None
        if fingerprints is None and wanted:
            raise FlameExtError(
                f"{path}: checkpoint.initial_load_verify_values = true, but {note}; or unset the option"
            )
        if note:
            self.report.notes.append(note)
        return fingerprints

    def _parity(
        self, requested: RequestedLoad, found: dict[str, TensorSpec | None], tied: dict[str, str]
    ) -> list[Problem]:
        from flame_ext.checks.keys import compare_specs

        result = compare_specs(requested.model, found, fresh=self.fresh, tied=tied)
        self.report.counts.update(result.counts)
        problems = list(result.problems)
        if requested.model_prefix:
            problems += _flat_into_nested(requested, found)
        for name in requested.other_states:
            if not any(k == name or k.startswith(name + ".") for k in found):
                self.report.counts["missing"] = self.report.counts.get("missing", 0) + 1
                problems.append(
                    Problem(
                        "missing_key",
                        "error",
                        f"{name}.*",
                        f"the load asks for the {name} state (a full training-state load); the checkpoint holds none",
                        "a converted checkpoint holds weights only: load model weights only (torchtitan 0.1: "
                        "checkpoint.initial_load_model_weights_only = true; 0.3: initial_load_model_only = true), "
                        f"or add '{name}' to checkpoint.exclude_from_loading",
                    )
                )
        return problems

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
            self.report.extend(pool(self._verify_values(loaded)))
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
            "flame-ext: initial load of %s validated (buffers%s: %.0f ms)",
            self.checkpoint,
            "; step-0 loss not measured" if comparison is None else " and step-0 forward pass",
            (time.perf_counter() - start) * 1e3,
        )
        return self.report

    def _judge_loss(self, comparison: LossComparison) -> None:
        """The loss gate: a non-finite loss, a mean gap or one rank's gap above the threshold is an error."""
        self.report.loss = comparison
        self.report.checked += ["loss"]
        self._log_loss(comparison)
        self._plot(comparison)
        if not math.isfinite(comparison.observed):
            self.report.problems.append(
                Problem(
                    "nonfinite",
                    "error",
                    None,
                    f"step-0 loss is {comparison.observed}",
                    "a weight or buffer holds inf/NaN after loading: run `flame-ext diagnose --values`",
                )
            )
        elif not comparison.ok:
            from flame_ext.checks.loss import loss_gap_problem

            values_differ = any(p.kind == "value_mismatch" and p.severity == "error" for p in self.report.problems)
            self.report.problems.append(
                loss_gap_problem(comparison, what="step-0 loss", next_step=_NEXT_STEP, values_differ=values_differ)
            )
        elif self.worst_rank_gap > comparison.threshold:
            self.report.problems.append(
                Problem(
                    "loss_gap",
                    "error",
                    None,
                    "the mean step-0 loss passes, but one rank's differs from the HF reference by "
                    f"{self.worst_rank_gap:.4f} (threshold {comparison.threshold})",
                    "ranks loaded different weights: check that every rank reads the same checkpoint; run `flame-ext "
                    "diagnose --checkpoint C --model HF --values --loss` on it",
                )
            )

    def _verify_values(self, loaded: Mapping[str, Any]) -> list[Problem]:
        """Every rank's share of each fingerprint, one all-reduce, then the same comparison on every rank."""
        from flame_ext.checks.fingerprints import fingerprint_problems, plan_verification
        from flame_ext.io.fingerprint import TERMS, local_fingerprint

        start = time.perf_counter()
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        plan = plan_verification(self.fingerprints, tensors)
        keys = list(plan.keys)

        def shares() -> torch.Tensor:
            dtypes = [getattr(torch, self.fingerprints[plan.keys[k]][0]) for k in keys]
            parts = [local_fingerprint(tensors[k], d) for k, d in zip(keys, dtypes)]
            return torch.stack(parts) if parts else torch.zeros(0, len(TERMS), dtype=torch.float64)

        total = sum_over_ranks(self._agreed(shares, "the value check"))
        observed = dict(zip(keys, total))
        stored = {k: s.dtype for k, s in self.found.items() if s is not None}
        shapes = {k: tuple(tensors[k].shape) for k in keys}
        problems = self._agreed(
            lambda: fingerprint_problems(observed, self.fingerprints, plan, shapes, stored_dtypes=stored),
            "the value check",
        )
        mismatched = sum(1 for p in problems if p.severity == "error")
        self.figures.update({"initial_load/tensors_verified": len(keys), "initial_load/value_mismatches": mismatched})
        self.report.notes.append(
            f"values: {len(keys)} tensors verified against the fingerprints recorded at conversion, "
            f"{mismatched} differ" + (f"; {len(plan.unrecorded)} loaded tensors have none" if plan.unrecorded else "")
        )
        logger.info(
            "flame-ext: verified the values of %d loaded tensors against their recorded fingerprints on %d rank(s): "
            "%d differ (%.0f ms)",
            len(keys),
            world(),
            mismatched,
            (time.perf_counter() - start) * 1e3,
        )
        return problems

    def _log_versions(self) -> None:
        """The transformers that measured the reference and the one running: a different one can read the
        same config differently (see checks.config)."""
        import transformers

        then, now = self.reference.get("transformers_version"), transformers.__version__
        line = f"reference measured with transformers {then or 'unknown'}; running transformers {now}"
        logger.info("flame-ext: %s", line)
        if then != now:
            self.report.notes.append(line)

    def _buffers(self, repair: bool) -> list[Problem]:
        from flame_ext.checks.buffers import check_buffers

        problems: list[Problem] = []
        for part in self.parts:
            found, repaired = check_buffers(part, repair=repair)  # logs each repair
            problems += found
            self.report.notes += [f"repaired non-persistent buffer {key} (wrong after loading)" for key in repaired]
        return problems

    def _loss(self, probe: LossProbe, multiple: int, max_positions: int | None) -> LossComparison | None:
        """The step-0 comparison; None (on every rank alike) when the forward pass cannot run on this machine."""
        if not self.reference:
            return self._without_reference(probe, multiple)
        from flame_ext.checks.loss import loss_by_position

        ids = torch.tensor(self.reference["token_ids"], dtype=torch.long)
        ref = torch.tensor(self.reference["loss_per_token"], dtype=torch.float64)
        n = min(ids.shape[1] - 1, max_positions or ids.shape[1])
        n = (n // multiple) * multiple  # predicted positions the host's model and loss can take
        if n < 1:
            raise GuardConfigError(
                f"reference rows of {ids.shape[1]} tokens are too short for a loss in chunks of {multiple}"
            )
        ref = ref[:, :n]
        buckets = loss_by_position(ref, ref)
        ranges = [(0, n), (0, 1)] + [(b["start"], b["end"]) for b in buckets]  # all, the first position, buckets
        if self.config.initial_load_plot:
            ranges += [(i, i + 1) for i in range(n)]  # every position, for the plot
        sums = self._run_probe(probe, ids[:, : n + 1], ranges)
        if sums is None:
            return None
        reference_mean = float(self.reference["loss_mean"]) if n == ids.shape[1] - 1 else ref.mean().item()
        # The mean over ranks is what is logged; the gate also looks at the worst single rank, because one
        # rank with wrong weights among 256 would move the mean by only 1/256 of its gap.
        own_gap = abs((sums[0, 0] / sums[0, 1]).item() - reference_mean)
        self.worst_rank_gap = max_over_ranks(own_gap if math.isfinite(own_gap) else math.inf)
        sums = sum_over_ranks(sums)
        means = (sums[:, 0] / sums[:, 1]).tolist()
        by_position = [{**b, "observed": m} for b, m in zip(buckets, means[2:])]
        first = means[1] - ref[:, 0].mean().item()
        cmp = LossComparison(reference_mean, means[0], self.config.initial_load_max_loss_delta, by_position, first)
        if self.config.initial_load_plot:
            cmp.curve = {"observed": means[2 + len(buckets) :], "reference": ref.mean(0).tolist()}
        return cmp

    def _plot(self, cmp: LossComparison) -> None:
        """Rank 0 draws ``initial_load_plot``; a plot that cannot be written is a warning, never a stop."""
        path = self.config.initial_load_plot
        if not path or rank() != 0 or cmp.curve is None:
            return
        from flame_ext.io.plot import plot_loss

        try:
            plot_loss(cmp, path, title=f"step-0 loss of {self.checkpoint} against the HF reference")
        except (FlameExtError, OSError) as exc:
            logger.warning("flame-ext: could not write checkpoint.initial_load_plot %s: %s", path, exc)
            return
        self.report.notes.append(f"per-position step-0 loss drawn in {path}")
        logger.info("flame-ext: per-position step-0 loss drawn in %s", path)

    def _run_probe(self, probe: LossProbe, ids: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor | None:
        """The probe's sums, or None on every rank when any rank's device cannot run the model's forward pass.

        Only that one failure (``model.reference.forward_unavailable``) skips the gate; any other is raised.
        """
        from flame_ext.model.reference import forward_unavailable

        reason, failure = None, None
        try:
            with _EvalMode(self.parts):
                sums = probe(ids, ranges).to(torch.float64).cpu()
        except Exception as exc:
            reason = forward_unavailable(exc)
            failure = exc if reason is None else None
        # One collective, so that every rank takes the same branch: fail, skip, or go on to the comparison.
        state = max_over_ranks(2.0 if failure is not None else 1.0 if reason is not None else 0.0)
        if failure is not None:
            raise failure
        if state == 2.0:
            raise RankFailure("the step-0 forward pass failed on another rank")
        if state == 1.0:
            self.skipped_loss = reason or "another rank cannot run the model's forward pass"
            logger.warning(
                "flame-ext: step-0 loss gate skipped: the model's forward pass cannot run here (%s); every other "
                "check ran. Run the first steps on a machine that can run it to have the loss checked",
                self.skipped_loss,
            )
            self.report.notes.append(f"step-0 loss not measured: {self.skipped_loss}")
            return None
        return sums

    def _without_reference(self, probe: LossProbe, multiple: int) -> LossComparison | None:
        """No reference loss (convert could not run the model): skip if this machine cannot either, else stop."""
        ids = torch.zeros((1, max(multiple, 1) + 1), dtype=torch.long)  # token 0 exists in every vocabulary
        if self._run_probe(probe, ids, [(0, ids.shape[1] - 1)]) is None:
            return None
        self.report.problems.append(
            Problem(
                "manifest",
                "error",
                None,
                f"no reference loss for the step-0 check: the conversion could not run the model "
                f"({self.reference_unavailable}), and this machine can",
                "on this machine run `flame-ext reference --model HF --out REF.json` and set "
                "checkpoint.initial_load_reference = REF.json, or set checkpoint.validate_initial_load = false",
            )
        )
        return None

    def _log_loss(self, lo: LossComparison) -> None:
        logger.info(
            "step-0 loss %.4f vs HF reference %.4f (delta %+.4f, threshold %g)",
            lo.observed,
            lo.reference,
            lo.delta,
            lo.threshold,
        )
        logger.info(
            "step-0 loss by position: %s",
            "  ".join(f"{bucket_label(b)}: {b['observed']:.4f} (ref {b['reference']:.4f})" for b in lo.by_position),
        )

    # -- verdict

    def _agreed(self, step: Callable[[], Any], what: str) -> Any:
        """``ranks.agreed``: a step that failed on another rank ends this one too, as a validation error."""
        try:
            return agreed(step, what)
        except RankFailure as exc:
            raise InitialLoadValidationError(
                f"initial-load validation of {self.checkpoint} stopped: {exc}", self.report
            ) from exc

    def _raise_if_failed(self, when: str) -> None:
        if self.report.ok:
            return
        logger.error("flame-ext initial-load report: %s", self.report.to_json(indent=None))
        report_without_traceback()  # a trainer that does not catch the error shows the report, not a traceback
        summary = self.report.render_text(
            more="all of them in the JSON record logged as 'flame-ext initial-load report'"
        )
        raise InitialLoadValidationError(
            f"initial load of {self.checkpoint} failed validation {when} on rank {rank()} of {world()} "
            f"({_count_line(self.report)}):\n{summary}",
            self.report,
        )


def _manifest_problem(detail: str) -> Problem:
    return Problem("manifest", "error", None, detail, _REFERENCE_HINT)


def _count_line(report: Report) -> str:
    kinds: dict[str, int] = {}
    for p in report.errors:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in kinds.items()) if kinds else "no errors"


def _flat_into_nested(requested: RequestedLoad, found: Mapping[str, Any]) -> list[Problem]:
    """The reverse of parity's nested-checkpoint hint: a flat checkpoint under a full (nested) load."""
    plain = [k for k in requested.model if k not in found and k[len(requested.model_prefix) :] in found]
    if not plain or len(plain) < len(requested.model) // 2:
        return []
    return [
        Problem(
            "layout",
            "error",
            None,
            f"{len(plain)} of {len(requested.model)} keys are asked for under '{requested.model_prefix}' (a full "
            "training-state "
            f"load) but the checkpoint holds them flat (e.g. {plain[0][len(requested.model_prefix) :]})",
            "load the converted checkpoint model-only (torchtitan 0.1: checkpoint.initial_load_model_weights_only = "
            "true, "
            "or put it in the step-0 folder), or convert with `flame-ext convert --layout nested`",
        )
    ]


def record_metrics(metric_logger: Any, lo: LossComparison, extra: Mapping[str, float] | None = None) -> None:
    """Step-0 figures to the host's metric logger (torchtitan MetricsProcessor or its logger), if any:
    the loss comparison and ``extra`` (tensors verified, value mismatches)."""
    target = getattr(metric_logger, "logger", metric_logger)
    if target is None or not callable(getattr(target, "log", None)):
        return
    figures = {
        "initial_load/loss": lo.observed,
        "initial_load/reference_loss": lo.reference,
        "initial_load/loss_delta": lo.delta,
    }
    figures.update({f"initial_load/loss_pos_{b['start']}_{b['end']}": b["observed"] for b in lo.by_position})
    figures.update(extra or {})
    try:
        target.log(figures, 0)
    except Exception as exc:  # a metrics backend failing must not stop training over a log line
        logger.warning("flame-ext: could not record the step-0 figures with %s: %s", type(target).__name__, exc)


def tied_keys(parts: Iterable[nn.Module], prefix: str = "") -> dict[str, str]:
    """Tied aliases of all parts, keyed the way the load names them."""
    from flame_ext.io.hf import tied_aliases

    return {prefix + a: prefix + s for part in parts for a, s in tied_aliases(part).items()}


def model_state(wrapper: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The trainer's own parameters after the load, keyed as the checkpoint names them.

    ``wrapper`` is the host's ``ModelWrapper`` (``states["model"]``): its ``state_dict()`` is what the host
    loads into, with the host's key hooks applied, FSDP/TP parameters as DTensors (each rank its shards),
    and no collective.
    """
    return {prefix + k: v for k, v in wrapper.state_dict().items()}
