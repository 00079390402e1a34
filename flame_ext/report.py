"""Problems and how they are shown.

A check never raises on the first thing it finds: it returns ``Problem`` records, and a ``Report`` gathers
all of them so a user sees every fault at once, each with a hint saying what to do. The JSON form
(``Report.to_dict``, the one implementation: ``diagnose --json`` prints it, the training guard logs it) is a
versioned contract: ``schemas/report.schema.json`` describes it, docs/report-format.md explains it. It holds
no NaN or Infinity literal (strict JSON parsers reject them): a non-finite number is ``null`` plus a note.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = [
    "Problem",
    "Report",
    "LossComparison",
    "KINDS",
    "ProblemKind",
    "Severity",
    "SCHEMA_VERSION",
    "SCHEMA_PATH",
    "bucket_label",
    "error_record",
    "plural",
]

# Raised when a field changes meaning or is removed; new optional fields keep the version.
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schemas" / "report.schema.json"

ProblemKind = Literal[
    "missing_key",
    "unexpected_key",
    "shape_mismatch",
    "dtype_mismatch",
    "value_mismatch",
    "nonfinite",
    "buffer_mismatch",
    "loss_gap",
    "layout",
    "manifest",
    "config_mismatch",
    "tokenizer_mismatch",
]
KINDS: tuple[ProblemKind, ...] = get_args(ProblemKind)

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong (error) or risky (warning), with the key it concerns and a hint for the fix."""

    kind: ProblemKind
    severity: Severity
    key: str | None
    detail: str
    hint: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown problem kind {self.kind!r}")
        if self.severity not in ("error", "warning"):
            raise ValueError(f"unknown severity {self.severity!r}")


def plural(n: int, word: str) -> str:
    """``1 error``, ``2 errors``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def bucket_label(bucket: dict[str, Any]) -> str:
    """A position bucket as the half-open range it is: ``[128, 256)`` (positions 128 to 255)."""
    return f"[{bucket['start']}, {bucket['end']})"


def error_record(message: str) -> dict[str, Any]:
    """The JSON a command prints on stdout with ``--json`` when it fails at exit 2 (bad input)."""
    return {"schema_version": SCHEMA_VERSION, "ok": False, "verdict": "ERROR", "error": message}


def _finite_or_none(value: Any, where: str, nulled: list[tuple[str, float]]) -> Any:
    """``value`` itself, or None (the field and its value added to ``nulled``) when it is a non-finite float."""
    if isinstance(value, float) and not math.isfinite(value):
        nulled.append((where, value))
        return None
    return value


def _nulled_note(nulled: list[tuple[str, float]]) -> str | None:
    """One note for every number written as null (a NaN loss makes seven of them: one cause, one line):
    ``loss.observed, loss.delta and 2 more are nan (not finite); written as null``, fields in report order."""
    if not nulled:
        return None
    parts = []
    for value in dict.fromkeys(str(v) for _, v in nulled):
        fields = _bucket_fields([w for w, v in nulled if str(v) == value])
        named = ", ".join(fields[:-1]) + " and " + fields[-1] if len(fields) > 1 else fields[0]
        parts.append(f"{named} {'are' if len(fields) > 1 else 'is'} {value}")
    return "; ".join(parts) + " (not finite); written as null"


def _bucket_fields(fields: list[str]) -> list[str]:
    """``loss.by_position [0, 64) observed`` in four buckets is named once: ``loss.by_position observed (4
    buckets)``."""
    out: list[str] = []
    for f in fields:
        if f.startswith("loss.by_position "):
            side = f.rsplit(" ", 1)[1]
            n = sum(1 for g in fields if g.startswith("loss.by_position ") and g.endswith(" " + side))
            f = f if n == 1 else f"loss.by_position {side} ({n} buckets)"
        if f not in out:
            out.append(f)
    return out


@dataclass
class LossComparison:
    """Observed loss on the reference batch against the HF reference, mean and by position bucket."""

    reference: float
    observed: float
    threshold: float
    by_position: list[dict[str, Any]] = field(default_factory=list)
    # Gap at the first predicted position alone: its token attends only to itself, so positional encoding
    # and the query/key projections cannot change it (see ``flame_ext.checks.loss.first_position_right``).
    first_position_delta: float | None = None
    # Mean loss at every predicted position (over the rows), observed and reference: what ``--plot`` draws.
    # Not part of the JSON (thousands of numbers); ``by_position`` summarises it.
    curve: dict[str, list[float]] | None = field(default=None, repr=False, compare=False)
    # Mean |observed - reference| over every predicted token, and the largest that passes: errors of opposite
    # sign cancel in the mean, never here (``flame_ext.checks.loss.token_delta``). None: not measured.
    token_delta: float | None = None
    token_threshold: float | None = None

    @property
    def delta(self) -> float:
        return self.observed - self.reference

    @property
    def mean_ok(self) -> bool:
        # NaN compares false, so a non-finite loss never passes.
        return abs(self.delta) <= self.threshold

    @property
    def tokens_ok(self) -> bool:
        if self.token_delta is None or self.token_threshold is None:
            return True
        return self.token_delta <= self.token_threshold

    @property
    def ok(self) -> bool:
        return self.mean_ok and self.tokens_ok

    def to_dict(self, nulled: list[tuple[str, float]] | None = None) -> dict[str, Any]:
        """JSON-ready; a non-finite number becomes None, its field and value added to ``nulled`` when given."""
        notes = [] if nulled is None else nulled
        return {
            "reference": _finite_or_none(self.reference, "loss.reference", notes),
            "observed": _finite_or_none(self.observed, "loss.observed", notes),
            "delta": _finite_or_none(self.delta, "loss.delta", notes),
            "threshold": self.threshold,
            "by_position": [
                {
                    **b,
                    "label": bucket_label(b),
                    "observed": _finite_or_none(b["observed"], f"loss.by_position {bucket_label(b)} observed", notes),
                    "reference": _finite_or_none(
                        b["reference"], f"loss.by_position {bucket_label(b)} reference", notes
                    ),
                }
                for b in self.by_position
            ],
            "first_position_delta": _finite_or_none(self.first_position_delta, "loss.first_position_delta", notes),
            "token_delta": _finite_or_none(self.token_delta, "loss.token_delta", notes),
            "token_threshold": self.token_threshold,
        }


@dataclass
class Report:
    """Everything a check found; ``ok`` is true when no problem is an error."""

    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    loss: LossComparison | None = None
    # Facts worth stating that are not problems (what kind of checkpoint it is, what was compared or repaired).
    notes: list[str] = field(default_factory=list)
    # The passes that ran ("metadata", "tokenizer", "values", "loss"; the guard: "keys", "buffers", "loss"):
    # an OK says only what was checked.
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def extend(self, problems: list[Problem]) -> None:
        self.problems.extend(problems)

    def unchecked(self) -> list[str]:
        """Which of the costly passes (values, loss) did not run: a diagnose OK says so."""
        if "keys" in self.checked:  # the guard: its loss pass is the value check
            return []
        return [p for p in ("values", "loss") if self.checked and p not in self.checked]

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (schema ``schemas/report.schema.json``, version ``SCHEMA_VERSION``)."""
        counts = {k: 0 for k in ("hf_params", "dcp_params", "missing", "unexpected", "shape", "dtype")}
        counts.update(self.counts)
        nulled: list[tuple[str, float]] = []
        loss = self.loss.to_dict(nulled) if self.loss else None
        # A note said twice (two passes finding the same fact) is shown once; the nulled numbers are one note.
        notes = list(dict.fromkeys([*self.notes, *filter(None, [_nulled_note(nulled)])]))
        by_kind = {k: 0 for k in KINDS}
        for p in self.problems:
            by_kind[p.kind] += 1
        return {
            "schema_version": SCHEMA_VERSION,
            "ok": self.ok,
            "verdict": "OK" if self.ok else "FAILED",
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "checked": list(self.checked),
            "not_checked": self.unchecked(),
            "problem_kinds": by_kind,
            "problems": [asdict(p) for p in self.problems],
            "counts": counts,
            "loss": loss,
            "notes": notes,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def render_text(self, max_per_kind: int = 20, *, group_hints: bool = False, more: str = "see --json") -> str:
        """Readable report: counts, one line per problem with its hint, loss table, verdict line.

        ``group_hints``: consecutive problems of one kind with the same hint (18 tensors of two swapped
        layers) show that hint once, after the last of them, instead of once per line. ``more``: where the
        problems beyond ``max_per_kind`` can be read. The parameter line is left out when no parameters were
        counted (the key comparison did not run).
        """
        lines: list[str] = []
        d = self.to_dict()
        c = d["counts"]
        if c["hf_params"] or c["dcp_params"]:
            lines.append(
                f"parameters: HF {c['hf_params']:,}  checkpoint {c['dcp_params']:,}   "
                f"missing {c['missing']}  unexpected {c['unexpected']}  shape {c['shape']}  dtype {c['dtype']}"
            )
        lines.extend(f"note: {n}" for n in d["notes"])
        shown: dict[str, int] = {}
        visible = []
        for p in self.problems:
            shown[p.kind] = shown.get(p.kind, 0) + 1
            if shown[p.kind] <= max_per_kind:
                visible.append(p)
        for i, p in enumerate(visible):
            where = f" {p.key}" if p.key else ""
            lines.append(f"  {p.severity.upper():7} {p.kind}{where}: {p.detail}")
            nxt = visible[i + 1] if i + 1 < len(visible) else None
            if not (group_hints and nxt is not None and (nxt.kind, nxt.hint) == (p.kind, p.hint)):
                lines.append(f"          hint: {p.hint}")
        for kind, n in shown.items():
            if n > max_per_kind:
                lines.append(f"  ... and {n - max_per_kind} more {kind} problems ({more})")
        if self.loss is not None:
            lo = self.loss
            lines.append(
                f"loss on reference batch: observed {lo.observed:.4f} vs HF reference {lo.reference:.4f} "
                f"(delta {lo.delta:+.4f}, threshold {lo.threshold})"
            )
            if lo.token_delta is not None:
                lines.append(
                    f"per-token agreement: mean |observed - reference| {lo.token_delta:.4f} nats "
                    f"(threshold {lo.token_threshold})"
                )
            if lo.by_position:
                lines.append("  positions          observed   reference   delta")
                for b in lo.by_position:
                    lines.append(
                        f"  {bucket_label(b):<15}  {b['observed']:9.4f}   {b['reference']:9.4f}   "
                        f"{b['observed'] - b['reference']:+.4f}"
                    )
        counted = f"{plural(len(self.errors), 'error')}, {plural(len(self.warnings), 'warning')}"
        skipped = self.unchecked()
        if self.ok and skipped:
            counted += f"; {' and '.join(skipped)} not checked (add " + " ".join(f"--{p}" for p in skipped) + ")"
        lines.append(f"verdict: {d['verdict']} ({counted})")
        return "\n".join(lines)
