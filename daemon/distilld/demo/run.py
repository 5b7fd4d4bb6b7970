"""``distilld demo``: the quick-start main job.

Embedded broker, the example Rotten Tomatoes policy, a student trained once
and cached, real reviews replayed through the daemon, and a summary once every
replayed request is answered or dead-lettered.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from distilld.app import running_daemon
from distilld.demo.data import LABELS, load_rows, malformed_lines, request_line, split_rows
from distilld.demo.student import save_drift_reference, train_quickstart_student
from distilld.errors import ConfigError, DistilldError
from distilld.log import get_logger
from distilld.modelpaths import resolve_model_dir
from distilld.monitoring.features import REFERENCE_FILE
from distilld.monitoring.measure import CheckOutcome
from distilld.policy.evaluate import DRIFT_METRIC
from distilld.policy.load import load_policy
from distilld.settings import Settings
from distilld.traffic.replay import read_topic, replay

DEMO_POLICY_FILE = "rotten-tomatoes.yaml"
TRAIN_SIZE = 2000


def run_demo(settings: Settings, *, limit: int, rate: float, timeout_s: float) -> int:
    log = get_logger("demo")
    policy_path = settings.policies_dir / DEMO_POLICY_FILE
    if not policy_path.is_file():
        raise ConfigError(
            f"the demo policy {policy_path} is missing; run from the repository root "
            "or set DISTILLD_POLICIES_DIR to the directory that holds it"
        )
    policy = load_policy(policy_path)
    if policy.labels is None or sorted(policy.labels) != sorted(LABELS):
        raise ConfigError(f"{policy_path} must be the Rotten Tomatoes policy (labels {LABELS})")
    rows = load_rows()
    split = split_rows(rows, train_size=TRAIN_SIZE, traffic_size=limit)

    if policy.student.model is None:
        raise ConfigError(f"{policy_path} must name the quick-start student (student.model)")
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    model_dir = settings.models_dir / policy.student.model
    if not model_dir.is_dir():
        log.info(
            "demo.training_student",
            model_dir=str(model_dir),
            examples=len(split.train),
            note="once; cached for later runs (delete the directory to retrain)",
        )
        train_quickstart_student(model_dir, split.train, policy.labels)
    resolve_model_dir(settings.models_dir, policy.student.model)
    if not (model_dir / REFERENCE_FILE).is_file():  # a student cached by an older version
        save_drift_reference(model_dir, [row.text for row in split.train])

    bad = malformed_lines(policy.task, policy.traffic.max_input_chars)
    lines = [request_line(row, policy.task) for row in split.traffic]
    # Spread the broken records through the traffic rather than at the end.
    step = max(1, len(lines) // (len(bad) + 1))
    for i, line in enumerate(bad):
        lines.insert((i + 1) * step + i, line)
    expected_ids = {row.id for row in split.traffic}

    # A free port for the HTTP endpoints: the demo must not fail on a busy 8080.
    settings = settings.model_copy(update={"http_port": 0})
    with running_daemon(settings, {policy.task: policy}) as daemon:
        if not daemon.wait_ready(timeout_s=60):
            raise DistilldError("the daemon did not join its consumer group within 60 s")
        started = time.monotonic()
        sent = replay(daemon.kafka, lines, policy.traffic.requests_topic, rate=rate)

        def all_answered(records: list[dict[str, Any]]) -> bool:
            return expected_ids <= {r.get("id") for r in records}

        responses = read_topic(
            daemon.kafka, policy.traffic.responses_topic, until=all_answered, timeout_s=timeout_s
        )
        elapsed = time.monotonic() - started
        dead = read_topic(
            daemon.kafka,
            policy.traffic.dead_letter_topic,
            until=lambda r: len(r) >= len(bad),
            timeout_s=30,
        )
        loop_stats = daemon.stats()[0].snapshot()
        # One monitoring check on what was served (it also runs every interval_s).
        daemon.monitoring.shadow.wait_idle(30)
        check = daemon.monitoring.scheduler.run_now(policy.task)
        assert isinstance(check, CheckOutcome)  # the app's jobs return their outcome

    drift = next((v for v in check.verdicts if v.metric == DRIFT_METRIC), None)

    summary = summarize(split.traffic, responses, dead, sent.sent, elapsed, loop_stats)
    summary["drift_check"] = {
        "status": drift.status.value if drift else "disabled",
        "drift_share": drift.value if drift else None,
        "threshold": drift.threshold if drift else None,
        "report_dir": str(check.report_dir) if check.report_dir else None,
    }
    out_dir = settings.state_dir / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(render_summary(summary, out_dir / "summary.json"))
    return 0 if summary["unanswered"] == 0 else 1


def summarize(
    traffic: list[Any],
    responses: list[dict[str, Any]],
    dead: list[dict[str, Any]],
    sent: int,
    elapsed_s: float,
    loop_stats: dict[str, Any],
) -> dict[str, Any]:
    by_id: dict[str, dict[str, Any]] = {}
    for response in responses:
        by_id.setdefault(str(response.get("id")), response)
    reviews = [row for row in traffic if row.label is not None]
    correct = sum(1 for row in reviews if by_id.get(row.id, {}).get("output") == row.label)
    answered_reviews = sum(1 for row in reviews if row.id in by_id)
    unanswered = [row.id for row in traffic if row.id not in by_id]
    return {
        "sent": sent,
        "answered": len(by_id),
        "duplicates": len(responses) - len(by_id),
        "unanswered": len(unanswered),
        "dead_lettered": len(dead),
        "dead_letter_reasons": dict(Counter(str(d.get("reason")) for d in dead)),
        "seconds": round(elapsed_s, 2),
        "throughput_per_s": round(len(by_id) / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "reviews": len(reviews),
        "review_accuracy": round(correct / answered_reviews, 4) if answered_reviews else None,
        "plot_summaries_answered": sum(
            1 for row in traffic if row.label is None and row.id in by_id
        ),
        "mean_batch_size": loop_stats.get("mean_batch_size"),
    }


def _drift_line(drift: dict[str, Any]) -> str:
    if drift["drift_share"] is None:
        return str(drift["status"])
    line = (
        f"{drift['status']} (share of drifted features {drift['drift_share']:.2f}, "
        f"alert at {drift['threshold']:.2f})"
    )
    return line + (f", report {drift['report_dir']}" if drift["report_dir"] else "")


def render_summary(summary: dict[str, Any], path: Path) -> str:
    accuracy = summary["review_accuracy"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["dead_letter_reasons"].items()))
    lines = [
        "",
        "distilld demo: Rotten Tomatoes replayed through the daemon",
        f"  requests sent           {summary['sent']}",
        f"  answered                {summary['answered']} (duplicates {summary['duplicates']}, "
        f"unanswered {summary['unanswered']})",
        f"  dead-lettered           {summary['dead_lettered']} ({reasons or 'none'})",
        f"  throughput              {summary['throughput_per_s']} answers/s "
        f"over {summary['seconds']} s (mean batch {summary['mean_batch_size']})",
        "  accuracy on reviews     "
        + (f"{accuracy * 100:.1f} % of {summary['reviews']}" if accuracy is not None else "n/a"),
        f"  plot summaries answered {summary['plot_summaries_answered']} (no gold label)",
        f"  drift check             {_drift_line(summary['drift_check'])}",
        f"  summary file            {path}",
    ]
    return "\n".join(lines)
