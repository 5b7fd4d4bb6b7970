"""Prometheus text exposition (format 0.0.4) of the metrics snapshot.

The output is parsed back with a small parser written from the format's
description (HELP / TYPE lines, samples with escaped label values), so the
tests check the format rather than our own string building.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field

import pytest

from distilld.ops.metrics import (
    CONTENT_TYPE,
    DEFAULT_LATENCY_BUCKETS,
    HistogramSnapshot,
    LatencyHistogram,
    MetricsSnapshot,
    TaskMetrics,
    escape_label_value,
    format_value,
    render,
)

FAMILIES = {
    "distilld_requests_total": "counter",
    "distilld_request_latency_seconds": "histogram",
    "distilld_dead_letters_total": "counter",
    "distilld_teacher_calls_total": "counter",
    "distilld_teacher_budget_left": "gauge",
    "distilld_agreement": "gauge",
    "distilld_drift_share": "gauge",
    "distilld_retrainings_total": "counter",
    "distilld_live_version_info": "gauge",
}

# --------------------------------------------------------------------- a small parser

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^(?P<name>{_NAME})(?:\{{(?P<labels>.*)\}})? (?P<value>\S+)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


@dataclass
class Family:
    help: str | None = None
    type: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def _unescape(value: str, allowed: str) -> str:
    out, i = [], 0
    while i < len(value):
        char = value[i]
        if char == "\\":
            nxt = value[i + 1]
            assert nxt in allowed, f"invalid escape \\{nxt} in {value!r}"
            out.append({"n": "\n", "\\": "\\", '"': '"'}[nxt])
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        assert match is not None, f"malformed labels {text!r} at {pos}"
        name, raw, _ = match.groups()
        assert name not in labels, f"label {name} twice in {text!r}"
        labels[name] = _unescape(raw, 'n\\"')
        pos = match.end()
    return labels


def _family_of(sample: str, families: dict[str, Family]) -> str:
    if sample in families:
        return sample
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample.removesuffix(suffix)
        if base != sample and families.get(base, Family()).type == "histogram":
            return base
    raise AssertionError(f"sample {sample} has no TYPE line before it")


def parse(text: str) -> dict[str, Family]:
    """Parse the text format strictly enough to catch format mistakes."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    families: dict[str, Family] = {}
    seen_samples: set[str] = set()
    for line in text[:-1].split("\n"):
        assert line, "no blank lines"
        if line.startswith("# HELP "):
            name, _, doc = line[len("# HELP ") :].partition(" ")
            family = families.setdefault(name, Family())
            assert family.help is None, f"second HELP for {name}"
            assert name not in seen_samples, f"HELP for {name} after its samples"
            family.help = _unescape(doc, "n\\")
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE ") :].split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            family = families.setdefault(name, Family())
            assert family.type is None, f"second TYPE for {name}"
            assert not family.samples, f"TYPE for {name} after its samples"
            family.type = kind
        else:
            assert not line.startswith("#"), line
            match = _SAMPLE.match(line)
            assert match is not None, f"malformed sample line {line!r}"
            name = match["name"]
            base = _family_of(name, families)
            seen_samples.add(base)
            value = float(match["value"])  # accepts +Inf, -Inf, NaN, exponents
            families[base].samples.append((name, _labels(match["labels"] or ""), value))
    return families


def _sample(families: dict[str, Family], name: str, **labels: str) -> float:
    base = _family_of(name, families)
    found = [v for n, lab, v in families[base].samples if n == name and lab == labels]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


# --------------------------------------------------------------------- fixtures


def _histogram() -> HistogramSnapshot:
    # 3 at or under 0.05, 2 in (0.05, 0.5], 1 above 1.0
    return HistogramSnapshot(bounds=(0.05, 0.5, 1.0), counts=(3, 2, 0, 1), sum=2.75)


def _snapshot() -> MetricsSnapshot:
    return MetricsSnapshot(
        tasks={
            "sentiment": TaskMetrics(
                requests=1200,
                latency=_histogram(),
                dead_letters={"invalid_json": 4, "too_large": 1},
                teacher_calls=57,
                teacher_budget_left=943,
                agreement=0.925,
                drift_share=0.125,
                retrainings={"promoted": 2, "gate_failed": 1},
                live_version="v0003",
            ),
            "address": TaskMetrics(requests=7),  # nothing measured yet
        }
    )


# --------------------------------------------------------------------- tests


def test_every_family_has_help_and_type_and_the_samples_parse_back() -> None:
    families = parse(render(_snapshot()))
    assert {name: f.type for name, f in families.items()} == FAMILIES
    assert all(f.help for f in families.values())
    assert _sample(families, "distilld_requests_total", task="sentiment") == 1200
    assert _sample(families, "distilld_requests_total", task="address") == 7
    assert (
        _sample(families, "distilld_dead_letters_total", task="sentiment", reason="too_large") == 1
    )
    assert (
        _sample(families, "distilld_dead_letters_total", task="sentiment", reason="invalid_json")
        == 4
    )
    assert _sample(families, "distilld_teacher_calls_total", task="sentiment") == 57
    assert _sample(families, "distilld_teacher_budget_left", task="sentiment") == 943
    assert _sample(families, "distilld_agreement", task="sentiment") == 0.925
    assert _sample(families, "distilld_drift_share", task="sentiment") == 0.125
    assert (
        _sample(families, "distilld_retrainings_total", task="sentiment", outcome="promoted") == 2
    )
    assert _sample(families, "distilld_live_version_info", task="sentiment", version="v0003") == 1


def test_unknown_gauges_are_left_out_not_reported_as_zero() -> None:
    families = parse(render(_snapshot()))
    for name in (
        "distilld_teacher_budget_left",
        "distilld_agreement",
        "distilld_drift_share",
        "distilld_live_version_info",
    ):
        tasks = {labels["task"] for _, labels, _ in families[name].samples}
        assert tasks == {"sentiment"}, name
    # counters are always there, at 0 when nothing happened
    assert _sample(families, "distilld_teacher_calls_total", task="address") == 0


def test_histogram_buckets_are_cumulative_and_end_with_inf() -> None:
    text = render(_snapshot())
    lines = [
        line
        for line in text.splitlines()
        if line.startswith("distilld_request_latency_seconds") and 'task="sentiment"' in line
    ]
    assert lines == [
        'distilld_request_latency_seconds_bucket{task="sentiment",le="0.05"} 3',
        'distilld_request_latency_seconds_bucket{task="sentiment",le="0.5"} 5',
        'distilld_request_latency_seconds_bucket{task="sentiment",le="1.0"} 5',
        'distilld_request_latency_seconds_bucket{task="sentiment",le="+Inf"} 6',
        'distilld_request_latency_seconds_sum{task="sentiment"} 2.75',
        'distilld_request_latency_seconds_count{task="sentiment"} 6',
    ]
    families = parse(text)
    # the task without observations still has every default bucket, at 0
    empty = [
        (lab["le"], v)
        for n, lab, v in families["distilld_request_latency_seconds"].samples
        if n.endswith("_bucket") and lab["task"] == "address"
    ]
    assert [float(le) for le, _ in empty] == [*DEFAULT_LATENCY_BUCKETS, math.inf]
    assert all(v == 0 for _, v in empty)


def test_buckets_never_decrease_and_inf_equals_count() -> None:
    families = parse(render(_snapshot()))
    samples = families["distilld_request_latency_seconds"].samples
    for task in ("sentiment", "address"):
        buckets = [v for n, lab, v in samples if n.endswith("_bucket") and lab["task"] == task]
        assert buckets == sorted(buckets)
        count = _sample(families, "distilld_request_latency_seconds_count", task=task)
        assert buckets[-1] == count


def test_label_values_are_escaped_per_the_spec() -> None:
    reason = 'bad "json"\\ here\nand a line'
    snapshot = MetricsSnapshot({'t"1': TaskMetrics(dead_letters={reason: 2}, live_version="v\\1")})
    text = render(snapshot)
    assert (
        'distilld_dead_letters_total{task="t\\"1",reason="bad \\"json\\"\\\\ here\\nand a line"} 2'
        in text.splitlines()
    )
    families = parse(text)
    assert _sample(families, "distilld_dead_letters_total", task='t"1', reason=reason) == 2
    assert _sample(families, "distilld_live_version_info", task='t"1', version="v\\1") == 1


def test_exact_lines_for_one_counter_family() -> None:
    text = render(MetricsSnapshot({"b": TaskMetrics(requests=2), "a": TaskMetrics(requests=1)}))
    lines = text.splitlines()
    start = lines.index("# HELP distilld_requests_total Requests answered by the student.")
    assert lines[start : start + 4] == [
        "# HELP distilld_requests_total Requests answered by the student.",
        "# TYPE distilld_requests_total counter",
        'distilld_requests_total{task="a"} 1',  # tasks sorted
        'distilld_requests_total{task="b"} 2',
    ]


def test_an_empty_snapshot_renders_only_help_and_type() -> None:
    text = render(MetricsSnapshot())
    families = parse(text)
    assert {name: f.type for name, f in families.items()} == FAMILIES
    assert all(not f.samples for f in families.values())
    assert len(text.splitlines()) == 2 * len(FAMILIES)


def test_rendering_is_deterministic() -> None:
    assert render(_snapshot()) == render(_snapshot())
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (12, "12"),
        (True, "1"),
        (0.5, "0.5"),
        (1.0, "1.0"),
        (1e-05, "1e-05"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_values_use_the_go_float_spellings(value: float, text: str) -> None:
    assert format_value(value) == text
    assert float(text) == value or (math.isnan(value) and math.isnan(float(text)))


def test_escape_label_value() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


@pytest.mark.parametrize(
    ("bounds", "counts", "message"),
    [
        ((0.1, 0.1), (0, 0, 0), "strictly increasing"),
        ((0.5, 0.1), (0, 0, 0), "strictly increasing"),
        ((0.1, math.inf), (0, 0, 0), "finite"),
        ((0.1,), (0,), "needs 2 bucket counts"),
        ((0.1,), (1, -1), "negative"),
    ],
)
def test_histogram_snapshot_refuses_inconsistent_buckets(
    bounds: tuple[float, ...], counts: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        HistogramSnapshot(bounds, counts, 0.0)


def test_latency_histogram_counts_each_observation_in_its_bucket() -> None:
    histogram = LatencyHistogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.2, 1.0, 3.0, math.nan):
        histogram.observe(value)
    snap = histogram.snapshot()
    assert snap.counts == (2, 2, 1)  # a value equal to a bound falls in that bucket
    assert snap.count == 5  # NaN ignored
    assert snap.sum == pytest.approx(4.35)
    assert snap.cumulative() == [(0.1, 2), (1.0, 4), (math.inf, 5)]


def test_latency_histogram_is_thread_safe() -> None:
    histogram = LatencyHistogram()

    def observe() -> None:
        for _ in range(2000):
            histogram.observe(0.02)

    threads = [threading.Thread(target=observe) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = histogram.snapshot()
    assert snap.count == 16000
    assert snap.sum == pytest.approx(320.0)
