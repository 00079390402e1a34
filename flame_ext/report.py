"""Problems and how they are shown.

A check never raises on the first thing it finds: it returns ``Problem`` records, and a ``Report`` gathers
all of them so a user sees every fault at once, each with a hint saying what to do. The JSON form is a
contract (see the README): tools and the training guard's log record use it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Problem", "Report", "LossComparison", "KINDS"]

KINDS = (
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
)

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong (error) or risky (warning), with the key it concerns and a hint for the fix."""

    kind: str
    severity: Severity
    key: str | None
    detail: str
    hint: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown problem kind {self.kind!r}")
        if self.severity not in ("error", "warning"):
            raise ValueError(f"unknown severity {self.severity!r}")


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

    @property
    def delta(self) -> float:
        return self.observed - self.reference

    @property
    def ok(self) -> bool:
        # NaN compares false, so a non-finite loss never passes.
        return abs(self.delta) <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "observed": self.observed,
            "delta": self.delta,
            "threshold": self.threshold,
            "by_position": self.by_position,
            "first_position_delta": self.first_position_delta,
        }


@dataclass
class Report:
    """Everything a check found; ``ok`` is true when no problem is an error."""

    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    loss: LossComparison | None = None
    # Facts worth stating that are not problems (what kind of checkpoint it is, what was compared or repaired).
    # Shown in the text report; not part of the JSON contract's problem list.
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def extend(self, problems: list[Problem]) -> None:
        self.problems.extend(problems)

    def to_dict(self) -> dict[str, Any]:
        counts = {k: 0 for k in ("hf_params", "dcp_params", "missing", "unexpected", "shape", "dtype")}
        counts.update(self.counts)
        return {
            "ok": self.ok,
            "problems": [asdict(p) for p in self.problems],
            "counts": counts,
            "loss": self.loss.to_dict() if self.loss else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)

    def render_text(self, max_per_kind: int = 20, *, group_hints: bool = False) -> str:
        """Readable report: counts, one line per problem with its hint, loss table, verdict line.

        ``group_hints``: consecutive problems of one kind with the same hint (18 tensors of two swapped
        layers) show that hint once, after the last of them, instead of once per line.
        """
        lines: list[str] = []
        d = self.to_dict()
        c = d["counts"]
        lines.append(
            f"parameters: HF {c['hf_params']:,}  checkpoint {c['dcp_params']:,}   "
            f"missing {c['missing']}  unexpected {c['unexpected']}  shape {c['shape']}  dtype {c['dtype']}"
        )
        lines.extend(f"note: {n}" for n in self.notes)
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
                lines.append(f"  ... and {n - max_per_kind} more {kind} problems (see --json)")
        if self.loss is not None:
            lo = self.loss
            lines.append(
                f"loss on reference batch: observed {lo.observed:.4f} vs HF reference {lo.reference:.4f} "
                f"(delta {lo.delta:+.4f}, threshold {lo.threshold})"
            )
            if lo.by_position:
                lines.append("  positions        observed   reference   delta")
                for b in lo.by_position:
                    lines.append(
                        f"  {b['start']:>5}-{b['end']:<7}  {b['observed']:9.4f}   {b['reference']:9.4f}   "
                        f"{b['observed'] - b['reference']:+.4f}"
                    )
        n_err, n_warn = len(self.errors), len(self.problems) - len(self.errors)
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"verdict: {verdict} ({n_err} errors, {n_warn} warnings)")
        return "\n".join(lines)
