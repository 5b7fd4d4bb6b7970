"""``distilld report``: one self-contained HTML page per deployment, from the daemon's
own records.

Per task: agreement with the teacher over time (per model version, with the
alerts, promotions and rollbacks marked), drift share per check, agreement
per segment for the live version, the version timeline from the registry,
the gate table of the live version, and links to the latest Evidently
reports. Plots are inline SVG drawn here (no script, no external file), so
the page opens anywhere, e.g. attached to a ticket.

The gathering (:func:`task_report`) and the drawing (:func:`render`) are
separate: the first reads the store and the registry, the second is pure.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distilld.monitoring.accuracy import pool_rare_values
from distilld.policy.model import Policy
from distilld.registry import ModelRegistry
from distilld.store.base import COMPARISONS_READ, SampleStore
from distilld.vocabulary import segment_label

__all__ = ["TaskReport", "render", "task_report", "write_report"]

BUCKETS = 40  # points of the agreement curve
MARKED_ALERTS = {
    "breach": "#c0392b",
    "recovered": "#27ae60",
    "retrain.started": "#8e44ad",
    "retrain.promoted": "#2980b9",
    "retrain.rolled_back": "#d35400",
    "retrain.gate_failed": "#7f8c8d",
}
PALETTE = ("#2980b9", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#c0392b", "#2c3e50")


@dataclass(frozen=True)
class Point:
    at: float
    value: float
    n: int = 0


@dataclass(frozen=True)
class Mark:
    at: float
    kind: str
    label: str


@dataclass
class TaskReport:
    """What the page shows for one task."""

    task: str
    metric: str
    agreement: dict[str, list[Point]] = field(default_factory=dict)  # version -> curve
    drift: list[Point] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    segments: list[tuple[str, float, int]] = field(default_factory=list)  # label, value, n
    live_version: str | None = None
    versions: list[dict[str, Any]] = field(default_factory=list)
    gate: dict[str, Any] | None = None
    evidently: list[tuple[str, str]] = field(default_factory=list)  # (time, relative link)


def task_report(
    policy: Policy,
    store: SampleStore,
    registry: ModelRegistry | None,
    reports_dir: Path,
    out_dir: Path,
) -> TaskReport:
    """Read one task's records (comparisons, checks, alerts, registry, reports)."""
    task = policy.task
    metric = "agreement" if policy.kind.value == "classification" else "field F1"
    report = TaskReport(task=task, metric=metric)
    comparisons = store.last_comparisons(task, COMPARISONS_READ)
    by_version: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for c in comparisons:
        if c.score is not None:
            by_version[c.model_version].append((c.created_at, c.score))
    if comparisons:
        start = min(c.created_at for c in comparisons)
        end = max(c.created_at for c in comparisons)
        for version, scores in by_version.items():
            report.agreement[version] = _bucketed(scores, start, end)
    for check in store.checks(task):
        share = (check.summary.get("drift") or {}).get("drift_share")
        if isinstance(share, int | float):
            report.drift.append(Point(check.created_at, float(share)))
    for event in store.last_alerts(task, limit=500):
        label = event.kind if event.kind in MARKED_ALERTS else ""
        if not label:
            continue
        detail = event.payload.get("version") or event.metric
        report.marks.append(Mark(event.created_at, event.kind, f"{event.kind} {detail}"))
    live = comparisons[-1].model_version if comparisons else None
    if registry is not None:
        live = registry.live_version() or live
        for manifest in registry.list():
            report.versions.append(
                {
                    "version": manifest.version,
                    "state": manifest.state,
                    "parent": manifest.parent,
                    "created": _when(manifest.created_at),
                    "changed": _when(manifest.state_changed_at),
                    "gate": manifest.metrics.get("gate_summary", ""),
                    "reason": manifest.extra.get("reason", ""),
                }
            )
        if live is not None and registry.path(live).is_dir():
            gate_file = registry.path(live) / "gate.json"
            if gate_file.is_file():
                report.gate = json.loads(gate_file.read_text(encoding="utf-8"))
    report.live_version = live
    report.segments = _segments(
        [c for c in comparisons if c.model_version == live], policy.sampling.max_values_per_key
    )
    task_reports = reports_dir / task
    if task_reports.is_dir():
        latest = sorted(p for p in task_reports.iterdir() if (p / "drift.html").is_file())[-5:]
        for folder in reversed(latest):
            link = os.path.relpath(folder / "drift.html", out_dir)
            report.evidently.append((folder.name, link))
    return report


def write_report(
    policies: Mapping[str, Policy],
    store: SampleStore,
    registries: Mapping[str, ModelRegistry | None],
    reports_dir: Path,
    out: Path,
) -> Path:
    """Write the page for ``policies`` to ``out`` (written whole, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    reports = [
        task_report(policy, store, registries.get(task), reports_dir, out.parent)
        for task, policy in sorted(policies.items())
    ]
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(reports, generated_at=time.time()), encoding="utf-8")
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- data


def _bucketed(scores: list[tuple[float, float]], start: float, end: float) -> list[Point]:
    width = max((end - start) / BUCKETS, 1e-9)
    sums: dict[int, list[float]] = defaultdict(list)
    for at, score in scores:
        sums[min(BUCKETS - 1, int((at - start) / width))].append(score)
    return [
        Point(start + (i + 0.5) * width, sum(v) / len(v), len(v)) for i, v in sorted(sums.items())
    ]


def _segments(comparisons: Sequence[Any], max_values: int) -> list[tuple[str, float, int]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for c in comparisons:
        if c.score is None:
            continue
        for key, value in sorted(c.segment.items()):
            groups[segment_label(key, value)].append(c.score)
    # At most max_values per key, as the accuracy monitor reports them.
    pooled = pool_rare_values(groups, max_values)
    return sorted((label, sum(v) / len(v), len(v)) for label, v in pooled.items() if v)


def _when(at: float) -> str:
    if not at:
        return ""
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


# --------------------------------------------------------------------------- drawing


def render(reports: Sequence[TaskReport], generated_at: float) -> str:
    """The whole page (pure)."""
    body = "".join(_task_section(r) for r in reports) or "<p>No tasks.</p>"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8"><title>distilld report</title>'
        f"<style>{_CSS}</style></head><body>"
        f"<h1>distilld report</h1><p class=muted>generated {_when(generated_at)} UTC from the "
        "daemon's records (comparisons with the teacher, checks, alerts, model registry)</p>"
        f"{body}</body></html>\n"
    )


def _task_section(r: TaskReport) -> str:
    e = html.escape
    parts = [f"<section><h2>{e(r.task)}</h2>"]
    parts.append(f"<p>live version: <b>{e(r.live_version or 'none yet')}</b></p>")
    parts.append(f"<h3>{e(r.metric.capitalize())} with the teacher over time</h3>")
    parts.append(_line_chart(r.agreement, r.marks, y_label=r.metric))
    parts.append("<h3>Drift share per check</h3>")
    parts.append(_line_chart({"drift share": r.drift}, r.marks, y_label="drift share"))
    parts.append(f"<h3>{e(r.metric.capitalize())} per segment (live version)</h3>")
    parts.append(_bars(r.segments))
    parts.append("<h3>Versions</h3>")
    parts.append(_table(r.versions, ["version", "state", "parent", "created", "changed", "gate"]))
    parts.append("<h3>Gate of the live version</h3>")
    parts.append(_gate_table(r.gate))
    parts.append("<h3>Latest Evidently drift reports</h3>")
    if r.evidently:
        items = "".join(f'<li><a href="{e(link)}">{e(name)}</a></li>' for name, link in r.evidently)
        parts.append(f"<ul>{items}</ul>")
    else:
        parts.append("<p class=muted>no drift report yet</p>")
    parts.append("</section>")
    return "".join(parts)


def _line_chart(
    series: Mapping[str, Sequence[Point]], marks: Sequence[Mark], *, y_label: str
) -> str:
    points = [p for s in series.values() for p in s]
    if not points:
        return "<p class=muted>no data yet</p>"
    width, height, pad = 760, 220, 40
    times = [p.at for p in points] + [m.at for m in marks]
    t0, t1 = min(times), max(times)
    span = max(t1 - t0, 1e-9)

    def x(at: float) -> float:
        return pad + (at - t0) / span * (width - 2 * pad)

    def y(value: float) -> float:
        return height - pad - min(1.0, max(0.0, value)) * (height - 2 * pad)

    svg = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(y_label)} over time">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#999"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>',
    ]
    for tick in (0.0, 0.5, 1.0):
        svg.append(
            f'<text x="{pad - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" '
            f'class="tick">{tick:.1f}</text>'
        )
    for mark in marks:
        color = MARKED_ALERTS.get(mark.kind, "#999")
        svg.append(
            f'<line x1="{x(mark.at):.1f}" y1="{pad}" x2="{x(mark.at):.1f}" y2="{height - pad}" '
            f'stroke="{color}" stroke-dasharray="4 3"><title>{html.escape(mark.label)} '
            f"{_when(mark.at)}</title></line>"
        )
    legend = []
    for i, (name, curve) in enumerate(sorted(series.items())):
        if not curve:
            continue
        color = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{x(p.at):.1f},{y(p.value):.1f}" for p in curve)
        svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        for p in curve:
            svg.append(
                f'<circle cx="{x(p.at):.1f}" cy="{y(p.value):.1f}" r="2.5" fill="{color}">'
                f"<title>{html.escape(name)} {p.value:.3f} (n={p.n}) {_when(p.at)}</title>"
                "</circle>"
            )
        legend.append(f'<span style="color:{color}">&#9632; {html.escape(name)}</span>')
    svg.append(
        f'<text x="{pad}" y="{height - 8}" class="tick">{_when(t0)}</text>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end" class="tick">'
        f"{_when(t1)}</text></svg>"
    )
    mark_legend = " ".join(
        f'<span style="color:{c}">&#9474; {html.escape(k)}</span>'
        for k, c in MARKED_ALERTS.items()
        if any(m.kind == k for m in marks)
    )
    return f"<div>{''.join(svg)}<p class=legend>{' '.join(legend)} {mark_legend}</p></div>"


def _bars(rows: Sequence[tuple[str, float, int]]) -> str:
    if not rows:
        return "<p class=muted>no comparisons of the live version yet</p>"
    cells = []
    for label, value, n in rows:
        pct = max(0.0, min(1.0, value)) * 100
        cells.append(
            f'<tr><td>{html.escape(label)}</td><td class=bar><div style="width:{pct:.1f}%">'
            f"</div></td><td>{value:.3f}</td><td>{n}</td></tr>"
        )
    return (
        f"<table><tr><th>segment</th><th></th><th>value</th><th>n</th></tr>{''.join(cells)}</table>"
    )


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "<p class=muted>no registry for this task (retraining not enabled)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(str(row.get(c) or ''))}</td>" for c in columns)
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _gate_table(gate: Mapping[str, Any] | None) -> str:
    if not gate:
        return "<p class=muted>the live version has no gate report (not trained by distilld)</p>"
    rows = []
    for check in gate.get("checks", []):
        passed = check.get("passed")
        verdict = "pass" if passed else ("not judged" if passed is None else "FAIL")
        value = check.get("value")
        threshold = check.get("threshold")
        rows.append(
            f"<tr class={'ok' if passed is not False else 'fail'}>"
            f"<td>{html.escape(str(check.get('name')))}</td><td>{verdict}</td>"
            f"<td>{_num(value)}</td><td>{_num(threshold)}</td>"
            f"<td>{html.escape(str(check.get('why', '')))}</td></tr>"
        )
    summary = html.escape(str(gate.get("summary", "")))
    return (
        f"<p>{summary}</p><table><tr><th>check</th><th>verdict</th><th>value</th>"
        f"<th>threshold</th><th>why</th></tr>{''.join(rows)}</table>"
    )


def _num(value: Any) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.4f}"
    return ""


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:900px}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;
font-size:13px;text-align:left}.muted{color:#888}.tick{font-size:10px;fill:#666}
.legend{font-size:12px}td.bar{width:240px}td.bar div{background:#2980b9;height:10px}
tr.fail td{background:#fdecea}
"""
