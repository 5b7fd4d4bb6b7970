"""``distilld demo``: the quick-start main job, the whole loop on real data.

Embedded broker, the example Rotten Tomatoes policy, a teacher and a first
student built once and cached, and real reviews replayed through the daemon
at a steady rate. Midway the input population shifts (mostly fresh reviews,
then mostly rotten ones); the daemon detects it, has the teacher label recent
traffic, retrains, gates, shadows and promotes a new student by itself, and
agreement with the teacher recovers. The demo only watches: it produces the
traffic, reads what the daemon recorded (alerts, comparisons, registry,
responses) and prints a summary. Nothing in the daemon knows it is a demo.

The demo compresses time: the overrides in :data:`DEMO_OVERRIDES` shorten the
example policy's production intervals and sizes (checks every 15 s instead of
5 min, 800 retraining examples instead of 1,000...). The policy the daemon
ran is written beside the summary.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distilld.demo.data import (
    LABELS,
    LoopData,
    load_rows,
    loop_data,
    malformed_lines,
    request_line,
)
from distilld.demo.student import ensure_demo_models
from distilld.errors import ConfigError, DistilldError
from distilld.lifecycle import RunningDaemon, running_daemon
from distilld.log import get_logger
from distilld.monitoring.evaluate import EventKind
from distilld.policy.load import load_policy
from distilld.registry import ModelRegistry
from distilld.report import write_report
from distilld.settings import KafkaConfig, Settings
from distilld.store.base import AlertEvent, StoredComparison
from distilld.traffic.replay import read_topic, replay

DEMO_POLICY_FILE = "rotten-tomatoes.yaml"

# The sizes of the demo's data (disjoint parts of the 12,808 reviews).
TEACHER_EXAMPLES = 2000  # gold reviews the teacher learns from
FIRST_STUDENT_EXAMPLES = 800  # teacher-labelled reviews of the first population
AFTER_SHIFT_POOL = 5000  # at most this many requests after the shift
BEFORE_FRESH_SHARE = 0.95  # the first population: nearly all fresh reviews
AFTER_FRESH_SHARE = 0.05  # after the shift: nearly all rotten reviews

# Compared requests the promoted student must answer before the demo ends:
# enough for a stable "agreement after" figure.
AFTER_PROMOTION_COMPARISONS = 150

# The demo compresses time; everything else comes from the example policy.
DEMO_OVERRIDES: dict[str, Any] = {
    # The demo's requests carry metadata kind (review / plot): a declared segment.
    "sampling": {"base_rate": 0.5, "segment_keys": ["kind"]},
    "monitors": {
        "interval_s": 15,
        # The first student agrees with the teacher on about 76 % of the first
        # population and on about 24 % after the shift (measured in a demo
        # run): a threshold well between.
        # Per-segment verdicts stay off: on windows this short a segment holds
        # a few dozen comparisons, too few for a verdict worth acting on.
        "accuracy": {
            "window": 200,
            "min_samples": 100,
            "threshold": 0.65,
            "segments": {"enabled": False},
        },
        "drift": {"window": 300, "min_samples": 150},
    },
    "retraining": {
        "size": {"min_examples": 800, "max_examples": 1600},
        # Few examples, few steps: a higher rate than the default 5e-5.
        "training": {"learning_rate": 2e-4, "batch_size": 16},
        # The candidate must agree with the teacher on 75 % of the held-out set.
        # The first retraining starts about 30 s after the shift, with some
        # 500 inputs to choose from: a held-out fifth of them is under the
        # gate's default minimum of 100 test examples.
        "gate": {"margin": 0.25, "segment_margin": 0.3, "min_test_examples": 60},
        # A fifth held out, not a tenth: the gate wants 100 test examples
        # (its default) and the demo trains on hundreds, not thousands.
        "split": {"train": 0.7, "validation": 0.1, "test": 0.2},
        "shadow": {"share": 1.0, "min_comparisons": 100},
        # A retraining that fails (too little traffic yet since the shift, a
        # candidate short of the gate) is tried again 2 minutes later, on more.
        "triggers": {"on_breach": {"cooldown_s": 120}, "schedule": {"enabled": False}},
        "rollback": {"watch_window_s": 900},
    },
}


def merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, nested mappings merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def write_demo_policy(source: Path, dest_dir: Path) -> Path:
    """The example policy with :data:`DEMO_OVERRIDES` applied, written to ``dest_dir``."""
    try:
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the demo policy {source}: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"the demo policy {source} is not a YAML mapping")
    missing = [key for key in ("teacher", "retraining") if key not in document]
    if missing:
        raise ConfigError(
            f"the demo policy {source} has no {' and no '.join(missing)} section; the demo "
            "needs both (restore the file from the repository)"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / source.name
    header = (
        f"# {source} with the demo's shorter intervals and sizes "
        "(distilld.demo.run.DEMO_OVERRIDES)\n"
    )
    path.write_text(header + yaml.safe_dump(merged(document, DEMO_OVERRIDES), sort_keys=False))
    return path


# --------------------------------------------------------------------------- traffic


class SteadyTraffic:
    """Produces the demo's requests at a steady rate in a background thread.

    The first ``shift_at`` records are the first population, the rest the
    second; :attr:`shifted_at` is the wall time of the first record after the
    shift. :meth:`stop` ends the traffic early (what was sent stays sent).
    """

    def __init__(
        self, kafka: KafkaConfig, topic: str, lines: Sequence[bytes], shift_at: int, rate: float
    ) -> None:
        self._kafka = kafka
        self._topic = topic
        self._lines = lines
        self._shift_at = shift_at
        self._rate = rate
        self._stop = threading.Event()
        self.sent = 0
        self.shifted_at: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def _records(self) -> Iterator[bytes]:
        for i, line in enumerate(self._lines):
            if self._stop.is_set():
                return
            if i == self._shift_at:
                self.shifted_at = time.time()
            yield line
            self.sent = i + 1

    def _run(self) -> None:
        try:
            replay(self._kafka, self._records(), self._topic, rate=self._rate)
        except BaseException as exc:  # reported by the demo, which then stops
            self.error = exc


# --------------------------------------------------------------------------- milestones


FAILURE_KINDS = frozenset(
    {"retrain.failed", "retrain.gate_failed", "retrain.shadow_rejected", "retrain.rolled_back"}
)


@dataclass
class Milestones:
    """When the daemon did what, read from its alert records (Unix times)."""

    shifted_at: float | None = None
    breaches: list[AlertEvent] = field(default_factory=list)
    started: AlertEvent | None = None
    candidate: AlertEvent | None = None
    shadow: AlertEvent | None = None
    promoted: AlertEvent | None = None
    failures: list[AlertEvent] = field(default_factory=list)

    def update(self, alerts: Sequence[AlertEvent]) -> None:
        shift = self.shifted_at
        after = [a for a in alerts if shift is not None and a.created_at >= shift]
        self.breaches = [a for a in after if a.kind == EventKind.breach]
        self.started = _first(after, "retrain.started")
        self.candidate = _first(after, "retrain.candidate_ready")
        self.shadow = _first(after, "retrain.shadow_started")
        self.promoted = _first(after, "retrain.promoted")
        self.failures = [a for a in after if a.kind in FAILURE_KINDS]


def _first(alerts: Sequence[AlertEvent], kind: str) -> AlertEvent | None:
    return next((a for a in alerts if a.kind == kind), None)


def _alerts(daemon: RunningDaemon, task: str) -> list[AlertEvent]:
    return sorted(daemon.monitoring.store.last_alerts(task, limit=1000), key=lambda a: a.created_at)


# --------------------------------------------------------------------------- the run


def demo_data(shift_after: int) -> LoopData:
    """The demo's parts of the Rotten Tomatoes reviews, ``shift_after`` requests before
    the shift (the teacher's and the first student's training rows do not depend on it)."""
    return loop_data(
        load_rows(),
        teacher_size=TEACHER_EXAMPLES,
        student_size=FIRST_STUDENT_EXAMPLES,
        before_size=shift_after,
        after_size=AFTER_SHIFT_POOL,
        before_fresh_share=BEFORE_FRESH_SHARE,
        after_fresh_share=AFTER_FRESH_SHARE,
    )


def run_demo(settings: Settings, *, rate: float, shift_after: int, timeout_s: float) -> int:
    log = get_logger("demo")
    source = settings.policies_dir / DEMO_POLICY_FILE
    if not source.is_file():
        raise ConfigError(
            f"the demo policy {source} is missing; run from the repository root "
            "or set DISTILLD_POLICIES_DIR to the directory that holds it"
        )
    if rate <= 0:
        raise ConfigError(f"--rate must be above 0 requests/s (received {rate})")
    out_dir = settings.state_dir / "demo"
    run_dir = out_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # every demo starts from the first student
    policy = load_policy(write_demo_policy(source, run_dir / "policies"))
    if policy.labels is None or sorted(policy.labels) != sorted(LABELS):
        raise ConfigError(f"{source} must be the Rotten Tomatoes policy (labels {LABELS})")

    data = demo_data(shift_after)
    ensure_demo_models(settings.models_dir, policy, data)

    bad = malformed_lines(policy.task, policy.traffic.max_input_chars)
    lines = [request_line(row, policy.task) for row in data.before]
    step = max(1, len(lines) // (len(bad) + 1))
    for i, line in enumerate(bad):  # spread through the first population
        lines.insert((i + 1) * step + i, line)
    shift_index = len(lines)
    lines += [request_line(row, policy.task) for row in data.after]

    run_settings = settings.model_copy(
        update={
            "http_port": 0,  # a free port: the demo must not fail on a busy 8080
            "state_dir": run_dir / "state",
            "registry_dir": None,
            "policies_dir": run_dir / "policies",
            "retrain_tick_s": 1.0,
        }
    )
    task = policy.task
    milestones = Milestones()
    started = time.monotonic()
    log.info(
        "demo.started",
        rate=rate,
        shift_after=shift_after,
        timeout_s=timeout_s,
        policy=str(run_dir / "policies" / source.name),
        note="traffic: mostly fresh reviews, then mostly rotten ones; the daemon is on its own",
    )
    with running_daemon(run_settings, {task: policy}) as daemon:
        if not daemon.wait_ready(timeout_s=60):
            raise DistilldError("the daemon did not join its consumer group within 60 s")
        registry = ModelRegistry(run_settings.registry_root / task)
        first_version = registry.live_version()
        topic = policy.traffic.requests_topic
        traffic = SteadyTraffic(daemon.kafka, topic, lines, shift_index, rate)
        traffic.start()
        outcome = "timeout"
        reported: set[str] = set()
        while time.monotonic() - started < timeout_s:
            time.sleep(1.0)
            milestones.shifted_at = traffic.shifted_at
            milestones.update(_alerts(daemon, task))
            _log_progress(log, milestones, reported)
            if traffic.error is not None:
                raise DistilldError(f"producing the demo traffic failed: {traffic.error}")
            if milestones.promoted is not None:
                version = str(milestones.promoted.payload.get("version"))
                served = _comparisons(daemon, task, version, milestones.promoted.created_at)
                if len(served) >= AFTER_PROMOTION_COMPARISONS:
                    outcome = "recovered"
                    break
            if traffic.finished:
                outcome = "traffic_exhausted"
                break
        traffic.stop()
        sent_ids = _ids(lines[: traffic.sent])
        responses = read_topic(
            daemon.kafka,
            policy.traffic.responses_topic,
            until=lambda records: sent_ids <= {str(r.get("id")) for r in records},
            timeout_s=300,
        )
        dead = read_topic(
            daemon.kafka,
            policy.traffic.dead_letter_topic,
            until=lambda records: len(records) >= len(bad),
            timeout_s=30,
        )
        milestones.update(_alerts(daemon, task))
        comparisons = daemon.monitoring.store.last_comparisons(task, 100_000)
        stats = daemon.stats()[0].snapshot()
        report = write_report(
            {task: policy},
            daemon.monitoring.store,
            {task: registry},
            run_settings.reports_dir,
            out_dir / "report.html",
        )
        gate = _gate_of(registry, milestones)
    summary = loop_summary(
        data=data,
        sent_ids=sent_ids,
        responses=responses,
        dead=dead,
        comparisons=comparisons,
        milestones=milestones,
        first_version=first_version,
        seconds=time.monotonic() - started,
        outcome=outcome,
        gate=gate,
    )
    after = summary["agreement"]["after"]["value"]
    threshold = policy.monitors.accuracy.threshold
    if outcome == "recovered" and (after is None or after < threshold):
        # Promoted, but the new student does not meet the monitor's bar either.
        summary["outcome"] = "promoted_without_recovery"
    summary["mean_batch_size"] = stats.get("mean_batch_size")
    summary["report"] = str(report)
    summary["policy"] = str(run_dir / "policies" / source.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(render_summary(summary, out_dir / "summary.json"))
    ok = summary["outcome"] == "recovered" and summary["requests"]["unanswered"] == 0
    return 0 if ok else 1


def _log_progress(log: Any, milestones: Milestones, reported: set[str]) -> None:
    """One log line per milestone, as the daemon reaches it."""
    for name, event in (
        ("shift", milestones.shifted_at),
        ("breach", milestones.breaches[0] if milestones.breaches else None),
        ("retraining", milestones.started),
        ("candidate", milestones.candidate),
        ("shadow", milestones.shadow),
        ("promoted", milestones.promoted),
    ):
        if event is not None and name not in reported:
            reported.add(name)
            log.info("demo.milestone", milestone=name)
    for failure in milestones.failures:
        key = f"{failure.kind}@{failure.created_at}"
        if key not in reported:
            reported.add(key)
            log.warning("demo.daemon_reported", kind=failure.kind, payload=failure.payload)


def _comparisons(
    daemon: RunningDaemon, task: str, version: str, since: float
) -> list[StoredComparison]:
    return [
        c
        for c in daemon.monitoring.store.last_comparisons(task, 5000)
        if c.model_version == version and c.created_at >= since
    ]


def _ids(lines: Sequence[bytes]) -> set[str]:
    ids: set[str] = set()
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        # The demo's own malformed records (ids "bad-...") are meant for the dead letters.
        if (
            isinstance(doc, dict)
            and isinstance(doc.get("id"), str)
            and isinstance(doc.get("input"), str)
            and not doc["id"].startswith("bad-")
        ):
            ids.add(doc["id"])
    return ids


def _gate_of(registry: ModelRegistry, milestones: Milestones) -> dict[str, Any] | None:
    if milestones.promoted is None:
        return None
    path = registry.path(str(milestones.promoted.payload.get("version"))) / "gate.json"
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


# --------------------------------------------------------------------------- summary


def _rate(values: Sequence[float]) -> dict[str, Any]:
    return {"value": round(sum(values) / len(values), 4) if values else None, "n": len(values)}


def loop_summary(
    *,
    data: LoopData,
    sent_ids: set[str],
    responses: Sequence[Mapping[str, Any]],
    dead: Sequence[Mapping[str, Any]],
    comparisons: Sequence[StoredComparison],
    milestones: Milestones,
    first_version: str | None,
    seconds: float,
    outcome: str,
    gate: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What happened, from the daemon's own records (pure: tested on its own).

    Agreement "before" is the first student on the first population; "during"
    the first student after the shift, until the promotion; "after" the
    promoted student. Accuracy against the data set's gold labels comes from
    the responses, split the same way by the version that answered.
    """
    shift = milestones.shifted_at
    promoted = milestones.promoted
    new_version = str(promoted.payload.get("version")) if promoted else None
    promoted_at = promoted.created_at if promoted else None

    def phase(version: str | None, at: float) -> str | None:
        if version == first_version:
            return "before" if shift is None or at < shift else "during"
        if version == new_version and promoted_at is not None and at >= promoted_at:
            return "after"
        return None  # the candidate's answers in shadow, or another version

    agreement: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    for c in comparisons:
        name = phase(c.model_version, c.created_at)
        if name is not None and c.score is not None:
            agreement[name].append(float(c.score))

    gold = {r.id: r.label for r in (*data.before, *data.after)}
    after_ids = {r.id for r in data.after}
    accuracy: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    by_id: dict[str, Mapping[str, Any]] = {}
    for response in responses:
        by_id.setdefault(str(response.get("id")), response)
    for request_id, response in by_id.items():
        label = gold.get(request_id)
        if label is None:
            continue
        version = str(response.get("model_version"))
        if version == first_version:
            name = "during" if request_id in after_ids else "before"
        elif version == new_version:
            name = "after"
        else:
            continue
        accuracy[name].append(1.0 if response.get("output") == label else 0.0)

    def since_shift(at: float | None) -> float | None:
        return round(at - shift, 1) if at is not None and shift is not None else None

    breach = milestones.breaches[0] if milestones.breaches else None
    candidate = milestones.candidate.payload if milestones.candidate else {}
    return {
        "outcome": outcome,
        "seconds": round(seconds, 1),
        "requests": {
            "sent": len(sent_ids),
            "answered": len(sent_ids & set(by_id)),
            "unanswered": len(sent_ids - set(by_id)),
            "duplicates": len(responses) - len(by_id),
            "dead_lettered": len(dead),
            "dead_letter_reasons": sorted({str(d.get("reason")) for d in dead}),
        },
        "detected": {
            "seconds_after_shift": since_shift(breach.created_at if breach else None),
            "metrics": sorted({a.metric for a in milestones.breaches}),
            "first": {
                "metric": breach.metric,
                "segment": breach.segment,
                "value": breach.value,
                "threshold": breach.threshold,
            }
            if breach
            else None,
        },
        "retraining": {
            "started_s_after_shift": since_shift(
                milestones.started.created_at if milestones.started else None
            ),
            "trigger": milestones.started.payload.get("trigger") if milestones.started else None,
            "train_examples": candidate.get("train_examples"),
            "dropped_by_filter": candidate.get("filtering"),
            "attempts": candidate.get("attempts"),
            "job_seconds": candidate.get("seconds"),
            "gate": gate.get("summary") if gate else candidate.get("gate"),
            "gate_checks": [
                {k: check.get(k) for k in ("name", "passed", "value", "threshold")}
                for check in (gate or {}).get("checks", [])
            ],
            "shadow_s_after_shift": since_shift(
                milestones.shadow.created_at if milestones.shadow else None
            ),
            "promoted_s_after_shift": since_shift(promoted_at),
            "promoted_version": new_version,
            "previous_version": first_version,
            "failures": [{"kind": f.kind, "payload": f.payload} for f in milestones.failures],
        },
        "agreement": {name: _rate(values) for name, values in agreement.items()},
        "gold_accuracy": {name: _rate(values) for name, values in accuracy.items()},
    }


def _pct(entry: Mapping[str, Any]) -> str:
    value = entry.get("value")
    return f"{value * 100:5.1f} % (n={entry['n']})" if value is not None else "   n/a"


def _phases(by_phase: Mapping[str, Mapping[str, Any]]) -> str:
    return " | ".join(f"{name} {_pct(by_phase[name])}" for name in ("before", "during", "after"))


def render_summary(summary: Mapping[str, Any], path: Path) -> str:
    requests = summary["requests"]
    detected = summary["detected"]
    retraining = summary["retraining"]
    first = detected["first"]
    lines = [
        "",
        "distilld demo: the closed loop on Rotten Tomatoes reviews "
        f"({summary['outcome']}, {summary['seconds']} s)",
        f"  requests                {requests['sent']} sent, {requests['answered']} answered, "
        f"{requests['unanswered']} unanswered, {requests['duplicates']} duplicates, "
        f"{requests['dead_lettered']} malformed dead-lettered",
        "  population shift        mostly fresh -> mostly rotten reviews",
        "  detected                "
        + (
            f"{detected['seconds_after_shift']} s after the shift: {first['metric']} "
            f"{first['value']:.3f} < {first['threshold']} ({', '.join(detected['metrics'])})"
            if first and first["value"] is not None and first["threshold"] is not None
            else "not detected"
        ),
        "  retraining              "
        + (
            (
                f"started {retraining['started_s_after_shift']} s after the shift "
                f"({retraining['trigger']}), "
                + (
                    f"{retraining['train_examples']} teacher-labelled training examples, "
                    f"job {retraining['job_seconds']} s"
                    if retraining["train_examples"] is not None
                    else "no candidate passed the gate (below)"
                )
            )
            if retraining["started_s_after_shift"] is not None
            else "not started"
        ),
        f"  gate                    {retraining['gate'] or 'n/a'}",
        "  promoted                "
        + (
            f"{retraining['promoted_version']} (was {retraining['previous_version']}) "
            f"{retraining['promoted_s_after_shift']} s after the shift, after a shadow run"
            if retraining["promoted_version"]
            else "nothing promoted"
        ),
        "  agreement with teacher  " + _phases(summary["agreement"]),
        "  accuracy (gold labels)  " + _phases(summary["gold_accuracy"]),
    ]
    for failure in retraining["failures"]:
        lines.append(f"  daemon reported         {failure['kind']}: {failure['payload']}")
    lines += [
        f"  report                  {summary.get('report')}",
        f"  summary file            {path}",
    ]
    return "\n".join(lines)


__all__ = ["DEMO_OVERRIDES", "Milestones", "loop_summary", "merged", "render_summary", "run_demo"]
