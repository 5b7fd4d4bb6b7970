"""The report of a validation gate: every check with its value, threshold, verdict
and reason (:class:`GateCheck`), the verdict (:class:`GateReport`), and its JSON and
self-contained HTML renderings (inline CSS, no script).

The gate that fills it is :func:`distilld.retrain.gates.evaluate_gate`; the reports
of failed retrainings are kept under :data:`FAILED_GATES_DIR`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["FAILED_GATES_DIR", "GateCheck", "GateReport"]

#: Folder (under the retraining work dir, per task) keeping the gate reports of failed
#: retrainings, named gate-TIME.json / .html; retention keeps the newest of them.
FAILED_GATES_DIR = "failed-gates"


@dataclass(frozen=True)
class GateCheck:
    """One check: ``passed`` is None when it was not judged (too few examples)."""

    name: str
    metric: str
    value: float | None
    threshold: float | None
    passed: bool | None
    why: str
    n: int
    reference: float | None = None  # what the threshold derives from (teacher, live)
    interval: tuple[float, float] | None = None  # Wilson interval of value

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "value": self.value,
            "threshold": self.threshold,
            "passed": self.passed,
            "why": self.why,
            "n": self.n,
            "reference": self.reference,
            "interval": list(self.interval) if self.interval is not None else None,
        }


@dataclass(frozen=True)
class GateReport:
    """Every check of one gate evaluation, and the verdict."""

    kind: str
    primary_metric: str
    reference: Literal["teacher", "gold"]  # teacher: gold is the teacher's answers
    margin: float
    n: int
    metrics: Mapping[str, Mapping[str, float]]  # model (candidate, teacher, live) -> metric
    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def failed(self) -> tuple[GateCheck, ...]:
        return tuple(c for c in self.checks if c.passed is False)

    @property
    def needs_more_data(self) -> bool:
        """Failed for lack of data: the test set is too small, or the candidate trails the
        teacher overall or on a segment (a larger training set may close the gap)."""
        return any(
            c.name == "test_set_size"
            or c.name == "primary_vs_teacher"
            or c.name.startswith("segment:")
            for c in self.failed
        )

    @property
    def summary(self) -> str:
        """One line for the alert log."""
        candidate = self.metrics.get("candidate", {}).get(self.primary_metric)
        value = "n/a" if candidate is None else f"{candidate:.4f}"
        if self.passed:
            return f"passed: {self.primary_metric} {value} on {self.n} held-out examples"
        reasons = "; ".join(f"{c.name}: {c.why}" for c in self.failed)
        return f"failed: {reasons}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "summary": self.summary,
            "needs_more_data": self.needs_more_data,
            "kind": self.kind,
            "primary_metric": self.primary_metric,
            "reference": self.reference,
            "margin": self.margin,
            "n": self.n,
            "metrics": {k: dict(v) for k, v in self.metrics.items()},
            "checks": [c.to_dict() for c in self.checks],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def to_html(self, title: str = "Validation gate") -> str:
        """A self-contained HTML page (inline CSS, no script) with the checks and metrics."""
        return _render_html(self, title)


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.pass td.verdict { color: #176b1a; font-weight: bold; }
tr.fail td.verdict { color: #b00020; font-weight: bold; }
tr.skip td { color: #777; }
.verdict-pass { color: #176b1a; } .verdict-fail { color: #b00020; }
"""


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _render_html(report: GateReport, title: str) -> str:
    e = html.escape
    verdict = "PASSED" if report.passed else "FAILED"
    rows = []
    for c in report.checks:
        css = "skip" if c.passed is None else "pass" if c.passed else "fail"
        mark = "not judged" if c.passed is None else "pass" if c.passed else "FAIL"
        interval = "" if c.interval is None else f"{c.interval[0]:.4f}-{c.interval[1]:.4f}"
        rows.append(
            f'<tr class="{css}"><td>{e(c.name)}</td><td>{e(c.metric)}</td>'
            f'<td class="num">{_cell(c.value)}</td><td class="num">{e(interval)}</td>'
            f'<td class="num">{_cell(c.threshold)}</td><td class="num">{c.n}</td>'
            f'<td class="verdict">{mark}</td><td>{e(c.why)}</td></tr>'
        )
    names = sorted({m for values in report.metrics.values() for m in values})
    metric_rows = []
    for model, values in report.metrics.items():
        cells = "".join(f'<td class="num">{_cell(values.get(m))}</td>' for m in names)
        metric_rows.append(f"<tr><td>{e(model)}</td>{cells}</tr>")
    metric_head = "".join(f"<th>{e(m)}</th>" for m in names)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n"
        f"<h1>{e(title)}</h1>\n"
        f'<p class="verdict-{"pass" if report.passed else "fail"}"><strong>{verdict}</strong>: '
        f"{e(report.summary)}</p>\n"
        f"<p>Task kind {e(report.kind)}; primary metric {e(report.primary_metric)}; "
        f"margin {report.margin}; reference: {e(report.reference)}; "
        f"{report.n} held-out examples.</p>\n"
        "<h2>Checks</h2>\n<table><thead><tr><th>check</th><th>metric</th><th>value</th>"
        "<th>95% interval</th><th>threshold</th><th>n</th><th>verdict</th><th>why</th>"
        "</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n"
        "<h2>Metrics</h2>\n<table><thead><tr><th>model</th>" + metric_head + "</tr></thead>"
        "<tbody>\n" + "\n".join(metric_rows) + "\n</tbody></table>\n</body></html>\n"
    )
