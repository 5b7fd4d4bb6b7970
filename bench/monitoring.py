"""Monitoring benchmark: drift and accuracy detection, false alarms, check cost, serving cost.

Prints, from one run on this machine (every figure below comes from the same
run; the serving ratio is measured side by side, off and on interleaved, so
machine noise affects both sides alike), a table and a final JSON line:

  1. drift detection delay: stationary short Rotten Tomatoes reviews, then a
     switch to plot summaries (``distilld.demo.data.load_rows()``, category
     ``plot``); the traffic reservoir is filled the way the shadow worker
     fills it (SqliteStore, rows with the student's real answer and
     confidence) and :func:`distilld.monitoring.measure.run_check` runs every
     K messages with the policy's drift settings (window W); the delay is the
     number of messages after the switch until a check reports a drift breach.
     The drift reference is fitted on training-like reviews that never appear
     in the traffic;
  2. false alarms of the drift monitor over at least 20,000 stationary
     messages (target 0), one check per W messages (non-overlapping windows).
     The corpus holds 12,808 reviews; the stationary traffic is reshuffled
     passes over held-out reviews (the output says how many passes);
  3. accuracy detection delay: comparisons sampled at the policy's base rate
     from a message stream whose student agrees with the teacher at 0.95
     and then at 0.60; messages (and comparisons) after the change until the
     overall accuracy breach. The comparison scores are SIMULATED (Bernoulli
     agreement; no trained student/teacher pair is cached here) and the
     output labels them so; storage, windowing, Wilson interval and
     evaluation are the daemon's own (SqliteStore + run_check);
  4. Evidently time per drift check for current windows of 1k, 5k and 20k rows
     (reference 5k rows): Evidently alone and the whole run_check (store read,
     featurization, Evidently, evaluation);
  5. serving throughput of the daemon through Kafka (embedded Tansu, the
     in-process MiniLM student of bench/serving.py) with monitoring off (no
     teacher, monitors disabled) next to monitoring on (an in-process
     teacher sampling at base rate 0.05, drift and accuracy checks on a short
     interval) -> ratio (target >= 0.95). The teacher and the checks run off
     the serving path but share this machine's cores with it. Runs alternate
     off/on/on/off...; besides answers/s (wall clock, at the mercy of other work
     on the machine) it prints the CPU time of the daemon's process per answer
     in both modes (all its threads). On a machine shared with other work both
     figures swing from run to run; the per-run figures show by how much.

Usage:  cd bench && ../.venv/bin/python monitoring.py [--quick] [options]
        .venv/bin/python bench/monitoring.py --quick        (small sizes)
        .venv/bin/python bench/monitoring.py                (full sizes)
        .venv/bin/python bench/monitoring.py --parts drift,evidently   (a subset)
Parts: drift, false_alarms, accuracy, evidently, serving (evidently times checks
over the false_alarms store, so it runs that part too). On 2 cores shared with
other work, --quick took about 5 min and the full run about 26 min, 15 of them
computing the student's answers for the first time (cached afterwards).
Options: --window W (drift window, policy default 1000), --step K (check every K
messages, 100), --stationary N (false-alarm messages, 20000), --requests R
(serving, 1000 per run), --rounds (serving off/on rounds, 3, ABBA order),
--check-interval S (monitors.interval_s while serving, 10), --base-rate (0.05),
--agreement-before / --agreement-after (0.95 / 0.60), --seed.
Student: all-MiniLM-L6-v2 with an untrained classification head (bench/serving.py's,
cached under .cache/bench-models); its answers feed the predicted-label and
confidence drift features and are computed once per distinct text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from daemon_rate import backlogged, wait_answered
from distilld.demo.data import Row, load_rows
from distilld.log import configure_logging
from distilld.monitoring.config import (
    AccuracyMonitorConfig,
    DriftMonitorConfig,
    MonitorsConfig,
    SamplingConfig,
)
from distilld.monitoring.evaluate import DRIFT_METRIC, Status, Verdict
from distilld.monitoring.features import (
    REFERENCE_FILE,
    Reference,
    fit_reference,
    save_reference,
)
from distilld.monitoring.measure import CheckOutcome, run_check
from distilld.policy.load import load_policy
from distilld.policy.model import Policy
from distilld.serving.local import load_local_student
from distilld.settings import Settings
from distilld.shadow.sampler import segment_of
from distilld.store.base import StoredComparison, TrafficSample
from distilld.store.sqlite import SqliteStore
from distilld.traffic.broker import EmbeddedBroker
from serving import LABELS, student_dir, write_policy

PARTS = ("drift", "false_alarms", "accuracy", "evidently", "serving")
# The shadow worker writes the reservoir in groups of this many rows (write_batch).
WRITE_BATCH = 256
# Synthetic timestamps: message i was seen at T0 + i * TICK seconds.
T0 = 1_700_000_000.0
TICK = 0.01


@dataclass(frozen=True)
class Sizes:
    reference: int  # training-like reviews the drift reference is fitted on
    pool: int  # held-out reviews the stationary traffic is drawn from
    window: int  # drift window W
    step: int  # a check every K messages
    stationary: int  # false-alarm messages
    eval_windows: tuple[int, ...]  # Evidently timing: current window sizes
    repeats: int  # Evidently timing: runs per size (median)
    accuracy_window: int
    requests: int  # serving: requests per daemon run
    rounds: int  # serving: off/on rounds
    interval_s: float  # serving: monitors.interval_s of the monitored policy


FULL = Sizes(
    reference=5000,
    pool=4000,
    window=1000,
    step=100,
    stationary=20_000,
    eval_windows=(1000, 5000, 20_000),
    repeats=3,
    accuracy_window=1000,
    requests=1000,
    rounds=3,
    interval_s=10.0,
)
QUICK = Sizes(
    reference=1000,
    pool=1000,
    window=500,
    step=100,
    stationary=3000,
    eval_windows=(500, 1000, 3000),
    repeats=1,
    accuracy_window=500,
    requests=300,
    rounds=1,
    interval_s=3.0,
)


# --------------------------------------------------------------------------- helpers


class StudentAnswers:
    """The bench student's real answers (label, confidence), computed once per distinct text.

    Answers are deterministic, so they are also kept in a cache file next to the
    model (``<model>-answers.json``), tied to the model file's size and time:
    a later run computes only the texts it has not seen. Figures do not
    depend on it (the same answers either way); only the run time does.
    """

    def __init__(self, policy: Policy, model: Path, batch: int = 32) -> None:
        self._backend = load_local_student(policy, model, model_version="bench")
        self._batch = batch
        weights = (model / "model.safetensors").stat()
        self._stamp = f"{weights.st_size}:{weights.st_mtime_ns}"
        self._path = model.with_name(model.name + "-answers.json")
        self._cache: dict[str, tuple[str, float]] = {}
        try:
            doc = json.loads(self._path.read_text(encoding="utf-8"))
            if doc.get("model") == self._stamp:
                self._cache = {k: (str(v[0]), float(v[1])) for k, v in doc["answers"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            self._cache = {}
        self.cached = len(self._cache)
        self.computed = 0
        self.seconds = 0.0

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]

    def __call__(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        keys = [self._key(t) for t in texts]
        missing = list({k: t for k, t in zip(keys, texts, strict=True) if k not in self._cache})
        by_key = dict(zip(keys, texts, strict=True))
        started = time.perf_counter()
        for i in range(0, len(missing), self._batch):
            chunk = missing[i : i + self._batch]
            predictions = self._backend.predict([by_key[k] for k in chunk])
            for key, p in zip(chunk, predictions, strict=True):
                self._cache[key] = (str(p.output), float(p.confidence))
        self.computed += len(missing)
        self.seconds += time.perf_counter() - started
        return [self._cache[k] for k in keys]

    def close(self) -> None:
        self._backend.close()
        if self.computed:
            doc = {"model": self._stamp, "answers": self._cache}
            partial = self._path.with_name(self._path.name + ".partial")
            partial.write_text(json.dumps(doc), encoding="utf-8")
            partial.replace(self._path)


def kind_of(row: Row) -> str:
    return "plot" if row.category == "plot" else "review"


def feed(
    store: SqliteStore,
    task: str,
    rows: Sequence[Row],
    answers: StudentAnswers,
    first_index: int,
) -> None:
    """Add ``rows`` to ``task``'s reservoir as the shadow worker does (grouped writes)."""
    labelled = answers([r.text for r in rows])
    samples = [
        TrafficSample(
            task=task,
            input_text=row.text,
            metadata={"kind": kind_of(row)},
            student_output=label,
            student_confidence=confidence,
            request_id=f"m-{first_index + i}",
            model_version="bench",
            created_at=T0 + (first_index + i) * TICK,
        )
        for i, (row, (label, confidence)) in enumerate(zip(rows, labelled, strict=True))
    ]
    for i in range(0, len(samples), WRITE_BATCH):
        store.add_traffic(samples[i : i + WRITE_BATCH])


def drift_monitors(window: int, reference_size: int = 5000) -> MonitorsConfig:
    """The policy's drift defaults with window ``window``; accuracy off (drift-only check)."""
    return MonitorsConfig(
        save_reports=False,
        accuracy=AccuracyMonitorConfig(enabled=False),
        drift=DriftMonitorConfig(
            window=window, min_samples=min(200, window), reference_size=reference_size
        ),
    )


def check(
    store: SqliteStore, task: str, monitors: MonitorsConfig, reference: Reference | None
) -> CheckOutcome:
    return run_check(
        task,
        kind="classification",
        monitors=monitors,
        store=store,
        reference=reference,
        reports_dir=None,
    )


def drift_verdict(outcome: CheckOutcome) -> Verdict:
    return next(v for v in outcome.verdicts if v.metric == DRIFT_METRIC)


def drifted_features(outcome: CheckOutcome) -> list[str]:
    return [] if outcome.drift is None else [f.column for f in outcome.drift.features if f.drifted]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# --------------------------------------------------------------------------- 1. drift delay


def drift_delay(
    sizes: Sizes,
    pool: list[Row],
    plots: list[Row],
    answers: StudentAnswers,
    reference: Reference,
    root: Path,
    seed: int,
) -> dict[str, Any]:
    task = "drift-delay"
    monitors = drift_monitors(sizes.window, sizes.reference)
    store = SqliteStore(root / "drift-delay.sqlite")
    try:
        rng = random.Random(seed)
        before = rng.sample(pool, min(sizes.window, len(pool)))
        feed(store, task, before, answers, 0)
        at_shift = check(store, task, monitors, reference)  # a full stationary window
        shifted = list(plots)
        rng.shuffle(shifted)
        limit = min(len(shifted), sizes.window)
        trajectory: list[tuple[int, float | None]] = []
        delay = None
        detected: CheckOutcome | None = None
        sent = 0
        while sent < limit:
            chunk = shifted[sent : min(sent + sizes.step, limit)]
            feed(store, task, chunk, answers, len(before) + sent)
            sent += len(chunk)
            outcome = check(store, task, monitors, reference)
            verdict = drift_verdict(outcome)
            trajectory.append((sent, verdict.value))
            if verdict.status is Status.breach:
                delay, detected = sent, outcome
                break
    finally:
        store.close()
    pre = drift_verdict(at_shift)
    return {
        "window": sizes.window,
        "step": sizes.step,
        "drift_share_threshold": monitors.drift.drift_share,
        "pre_shift_share": pre.value,
        "pre_shift_status": pre.status.value,
        "delay_messages": delay,
        "checks_after_shift": len(trajectory),
        "trajectory": trajectory,
        "tested_features": detected.drift.tested_columns if detected and detected.drift else None,
        "drifted_at_detection": drifted_features(detected) if detected else [],
    }


# --------------------------------------------------------------------------- 2. false alarms


def stationary_stream(pool: list[Row], count: int, seed: int) -> tuple[list[Row], int]:
    """``count`` messages: reshuffled passes over ``pool``; returns them and the pass count."""
    passes = math.ceil(count / len(pool))
    stream: list[Row] = []
    for p in range(passes):
        order = list(pool)
        random.Random(seed + 1 + p).shuffle(order)
        stream.extend(order)
    return stream[:count], passes


def false_alarms(
    sizes: Sizes,
    pool: list[Row],
    answers: StudentAnswers,
    reference: Reference,
    store: SqliteStore,
    seed: int,
) -> dict[str, Any]:
    task = "stationary"
    monitors = drift_monitors(sizes.window, sizes.reference)
    stream, passes = stationary_stream(pool, sizes.stationary, seed)
    shares: list[float] = []
    breaches = 0
    drifted_counts: list[int] = []
    for start in range(0, len(stream), sizes.window):
        feed(store, task, stream[start : start + sizes.window], answers, start)
        outcome = check(store, task, monitors, reference)
        verdict = drift_verdict(outcome)
        shares.append(verdict.value if verdict.value is not None else float("nan"))
        drifted_counts.append(len(drifted_features(outcome)))
        breaches += verdict.status is Status.breach
    return {
        "messages": len(stream),
        "pool": len(pool),
        "passes": passes,
        "checks": len(shares),
        "breaches": breaches,
        "max_share": max(shares),
        "mean_share": statistics.fmean(shares),
        "max_drifted_features": max(drifted_counts),
    }


# --------------------------------------------------------------------------- 3. accuracy delay


def accuracy_delay(
    sizes: Sizes,
    pool: list[Row],
    root: Path,
    *,
    base_rate: float,
    before: float,
    after: float,
    seed: int,
) -> dict[str, Any]:
    """Simulated comparison scores, stored and checked with the daemon's own code."""
    task = "accuracy"
    config = AccuracyMonitorConfig(window=sizes.accuracy_window, min_samples=200)
    monitors = MonitorsConfig(
        save_reports=False, accuracy=config, drift=DriftMonitorConfig(enabled=False)
    )
    sampling = SamplingConfig(base_rate=base_rate)
    rng = random.Random(seed + 100)
    # Enough stationary messages to fill the comparison window twice over.
    pre_messages = math.ceil(2 * config.window / base_rate)
    post_limit = math.ceil(2 * config.window / base_rate)
    store = SqliteStore(root / "accuracy.sqlite")
    pre_checks = pre_breaches = 0
    delay_messages = delay_comparisons = None
    segment_delay = None
    compared_after = 0
    value_at_detection = interval_at_detection = None
    message = 0
    try:
        while message < pre_messages + post_limit:
            records: list[StoredComparison] = []
            for _ in range(sizes.step):
                changed = message >= pre_messages
                if rng.random() < base_rate:
                    row = pool[rng.randrange(len(pool))]
                    teacher = row.label or LABELS[0]
                    agree = rng.random() < (after if changed else before)
                    student = teacher if agree else next(x for x in LABELS if x != teacher)
                    records.append(
                        StoredComparison(
                            task=task,
                            request_id=f"a-{message}",
                            segment=segment_of(row.text, {"kind": "review"}, sampling),
                            input_text=row.text,
                            student_output=student,
                            student_confidence=0.9,
                            model_version="bench",
                            teacher_output=teacher,
                            teacher_confidence=0.9,
                            teacher_probabilities=None,
                            score=1.0 if agree else 0.0,
                            schema_valid=True,
                            created_at=T0 + message * TICK,
                        )
                    )
                    compared_after += changed
                message += 1
            store.add_comparisons(records)
            outcome = check(store, task, monitors, None)
            overall = next(v for v in outcome.verdicts if v.segment == "all")
            segment_breach = any(
                v.status is Status.breach for v in outcome.verdicts if v.segment != "all"
            )
            if message <= pre_messages:
                pre_checks += 1
                pre_breaches += overall.status is Status.breach or segment_breach
                continue
            if segment_breach and segment_delay is None:
                segment_delay = message - pre_messages
            if overall.status is Status.breach:
                delay_messages = message - pre_messages
                delay_comparisons = compared_after
                value_at_detection = overall.value
                interval_at_detection = overall.interval
                break
    finally:
        store.close()
    return {
        "simulated_scores": True,
        "agreement_before": before,
        "agreement_after": after,
        "base_rate": base_rate,
        "window": config.window,
        "min_samples": config.min_samples,
        "threshold": config.threshold,
        "breach_when": config.breach_when,
        "step": sizes.step,
        "pre_change_messages": pre_messages,
        "pre_change_checks": pre_checks,
        "pre_change_breaches": pre_breaches,
        "delay_messages": delay_messages,
        "delay_comparisons": delay_comparisons,
        "segment_delay_messages": segment_delay,
        "value_at_detection": value_at_detection,
        "interval_at_detection": interval_at_detection,
    }


# --------------------------------------------------------------------------- 4. Evidently time


def check_times(
    sizes: Sizes, store: SqliteStore, reference: Reference, available: int
) -> dict[int, dict[str, Any]]:
    """Drift checks of the stationary store's last n rows, for each n of eval_windows."""
    results: dict[int, dict[str, Any]] = {}
    for n in sizes.eval_windows:
        if n > available:
            continue
        monitors = drift_monitors(n, sizes.reference)
        evidently_s: list[float] = []
        total_s: list[float] = []
        outcome = None
        for _ in range(sizes.repeats):
            started = time.perf_counter()
            outcome = check(store, "stationary", monitors, reference)
            total_s.append(time.perf_counter() - started)
            assert outcome.drift is not None
            evidently_s.append(outcome.drift.elapsed_s)
        assert outcome is not None and outcome.drift is not None
        results[n] = {
            "current_rows": outcome.drift.current_rows,
            "reference_rows": outcome.drift.reference_rows,
            "features": outcome.drift.tested_columns,
            "tests": sorted({f.stattest for f in outcome.drift.features}),
            "evidently_s": median(evidently_s),
            "check_s": median(total_s),
        }
    return results


# --------------------------------------------------------------------------- 5. serving


def serving_policy(
    directory: Path,
    name: str,
    *,
    monitored: bool,
    teacher: Path,
    interval_s: float,
    base_rate: float,
) -> Policy:
    if monitored:
        extra = f"""\
            teacher:
              backend: transformers
              model: {teacher}
              architecture: sequence-classification
              max_input_tokens: 128
            sampling:
              base_rate: {base_rate}
              min_per_segment: 0
              low_confidence_boost: 1.0
              edge_case_boost: 1.0
            monitors:
              interval_s: {interval_s}
              drift: {{window: 1000, min_samples: 200}}
            """
    else:
        extra = """\
            monitors:
              accuracy: {enabled: false}
              drift: {enabled: false}
            """
    path = directory / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            task: {name}
            kind: classification
            labels: [fresh, rotten]
            traffic:
              requests_topic: {name}.requests
              responses_topic: {name}.responses
              dead_letter_topic: {name}.dead-letter
              consumer_group: {name}
            student:
              model: student
              max_input_tokens: 128
              batch: {{max_size: 8, max_wait_ms: 10}}
            """
        )
        + textwrap.dedent(extra)
    )
    return load_policy(path)


def serve(policy: Policy, settings: Settings, texts: list[str]) -> dict[str, Any]:
    """daemon_rate.daemon_rate's measurement (backlog first, group join to the last answer),
    plus what monitoring did meanwhile."""
    with backlogged(policy, settings, texts) as daemon:
        monitoring = daemon.monitoring

        def runs() -> int:
            return int(monitoring.scheduler.stats().get(policy.task, {}).get("runs", 0))

        runs_before = runs()
        started = time.perf_counter()
        cpu_started = time.process_time()  # this process, every thread
        wait_answered(daemon, len(texts))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        runs_during = runs() - runs_before
        monitoring.shadow.wait_idle(60)
        shadow = monitoring.shadow.stats.snapshot()
        last = monitoring.store.last_check(policy.task)
    drift = None
    if last is not None:
        drift = next(
            (v["status"] for v in last.summary["verdicts"] if v["metric"] == DRIFT_METRIC), None
        )
    return {
        "answered": len(texts),
        "seconds": elapsed,
        "cpu_s": cpu,
        "rate": len(texts) / elapsed,
        "checks_during": runs_during,
        "offered": shadow["offered"],
        "sampled": shadow["sampled"],
        "compared": shadow["compared"],
        "dropped": shadow["dropped_queue_full"] + shadow["dropped_backlog"] + shadow["paused"],
        "last_drift_status": drift,
    }


def serving_ratio(
    sizes: Sizes,
    pool: list[Row],
    reference: Reference,
    root: Path,
    *,
    base_rate: float,
    seed: int,
) -> dict[str, Any]:
    model = student_dir()
    # The live student as the daemon expects it: the model with its drift reference.
    models = root / "models"
    live = models / "student"
    live.mkdir(parents=True)
    for item in model.iterdir():
        (live / item.name).symlink_to(item.resolve())
    save_reference(reference, live / REFERENCE_FILE)
    rng = random.Random(seed + 200)
    texts = [pool[rng.randrange(len(pool))].text for _ in range(sizes.requests)]
    order = ["off", "on", "on", "off"] * (sizes.rounds // 2) + ["off", "on"] * (sizes.rounds % 2)
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with EmbeddedBroker() as broker:
        for i, mode in enumerate(order):
            name = f"bench-{mode}-{i}"
            settings = Settings(
                kafka_bootstrap_servers=broker.bootstrap_servers,
                kafka_session_timeout_ms=6000,
                models_dir=models,
                state_dir=root / f"state-{name}",
            )
            policy = serving_policy(
                root,
                name,
                monitored=mode == "on",
                teacher=model.resolve(),
                interval_s=sizes.interval_s,
                base_rate=base_rate,
            )
            runs[mode].append(serve(policy, settings, texts))
    total = {
        mode: sum(r["answered"] for r in rs) / sum(r["seconds"] for r in rs)
        for mode, rs in runs.items()
    }
    # CPU time of the daemon's process (serving, shadow worker, teacher, checks) per
    # answer: what monitoring costs the daemon itself, whatever else runs on the machine.
    cpu_ms = {
        mode: 1000 * sum(r["cpu_s"] for r in rs) / sum(r["answered"] for r in rs)
        for mode, rs in runs.items()
    }
    on = runs["on"]
    return {
        "order": order,
        "requests_per_run": sizes.requests,
        "off_rate": total["off"],
        "on_rate": total["on"],
        "ratio": total["on"] / total["off"],
        "off_cpu_ms": cpu_ms["off"],
        "on_cpu_ms": cpu_ms["on"],
        "cpu_ratio": cpu_ms["off"] / cpu_ms["on"],
        "off_runs": [round(r["rate"], 1) for r in runs["off"]],
        "on_runs": [round(r["rate"], 1) for r in on],
        "off_runs_cpu_ms": [round(1000 * r["cpu_s"] / r["answered"], 1) for r in runs["off"]],
        "on_runs_cpu_ms": [round(1000 * r["cpu_s"] / r["answered"], 1) for r in on],
        "interval_s": sizes.interval_s,
        "base_rate": base_rate,
        "checks_during": sum(r["checks_during"] for r in on),
        "offered": sum(r["offered"] for r in on),
        "sampled": sum(r["sampled"] for r in on),
        "compared": sum(r["compared"] for r in on),
        "dropped": sum(r["dropped"] for r in on),
        "last_drift_status": [r["last_drift_status"] for r in on],
    }


# --------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def report(
    sizes: Sizes, results: dict[str, Any], meta: dict[str, Any], say: Callable[[str], None]
) -> None:
    say(
        f"monitoring benchmark ({meta['mode']} sizes), {os.cpu_count()} cores shared with other"
        f" work, Evidently {meta['evidently']}; every figure below is from this one run"
    )
    say(
        f"  student answers: {meta['answered_texts']} distinct texts through the bench MiniLM"
        f" (untrained head) in {meta['answer_s']:.1f} s (answer cache held"
        f" {meta['cached_texts']} at start); drift reference: {sizes.reference}"
        " training-like reviews never replayed as traffic"
    )
    d = results.get("drift")
    if d:
        steps = " ".join(f"{n}:{fmt(v, '.2f')}" for n, v in d["trajectory"])
        say(
            f"1. drift detection delay (window W={d['window']}, check every K={d['step']}"
            f" messages, breach at drift share >= {d['drift_share_threshold']})"
        )
        say(
            f"     full stationary window at the shift: drift share {fmt(d['pre_shift_share'])}"
            f" ({d['pre_shift_status']})"
        )
        delay = d["delay_messages"]
        say(
            "     reviews -> plot summaries: "
            + (
                f"breach {delay} messages after the shift"
                if delay is not None
                else f"NO breach within {d['checks_after_shift'] * d['step']} messages"
            )
            + f" (resolution {d['step']})"
        )
        say(f"     drift share after each K (messages:share): {steps}")
        if d["drifted_at_detection"]:
            say(
                f"     drifted at detection ({len(d['drifted_at_detection'])} of"
                f" {d['tested_features']}): {', '.join(d['drifted_at_detection'])}"
            )
    f = results.get("false_alarms")
    if f:
        say(
            f"2. false alarms: {f['messages']} stationary messages ({f['passes']} reshuffled"
            f" pass(es) over {f['pool']} held-out reviews), {f['checks']} checks, one per"
            f" non-overlapping window of {sizes.window}"
        )
        say(
            f"     drift breaches: {f['breaches']} (target 0); drift share max"
            f" {f['max_share']:.3f}, mean {f['mean_share']:.3f}; at most"
            f" {f['max_drifted_features']} features drifted in one check"
        )
    a = results.get("accuracy")
    if a:
        say(
            "3. accuracy detection delay [SIMULATED comparison scores: Bernoulli agreement"
            f" {a['agreement_before']} -> {a['agreement_after']}, comparisons sampled at"
            f" {a['base_rate']} of messages]"
        )
        say(
            f"     window {a['window']} comparisons, min {a['min_samples']}, threshold"
            f" {a['threshold']} ({a['breach_when']}), check every {a['step']} messages"
        )
        say(
            f"     before the change: {a['pre_change_messages']} messages,"
            f" {a['pre_change_checks']} checks, {a['pre_change_breaches']} breaches"
        )
        if a["delay_messages"] is None:
            say("     after the change: NO overall breach")
        else:
            low, high = a["interval_at_detection"]
            say(
                f"     after the change: overall breach after {a['delay_messages']} messages"
                f" ({a['delay_comparisons']} comparisons); agreement then"
                f" {a['value_at_detection']:.3f} [{low:.3f}, {high:.3f}]; first segment breach"
                f" after {fmt(a['segment_delay_messages'], 'd')} messages"
            )
    e = results.get("evidently")
    if e:
        say(f"4. drift check time (median of {sizes.repeats}; Evidently alone / whole run_check)")
        for n, r in e.items():
            say(
                f"     window {n:>6} rows vs reference {r['reference_rows']} rows,"
                f" {r['features']} features ({'/'.join(r['tests'])}):"
                f" {r['evidently_s']:6.2f} s / {r['check_s']:6.2f} s"
            )
    s = results.get("serving")
    if s:
        say(
            f"5. serving throughput, daemon via Kafka, MiniLM in-process, batch 8,"
            f" {s['requests_per_run']} short reviews per run, order {'/'.join(s['order'])}"
        )
        say(
            f"     monitoring off (no teacher, monitors disabled; reservoir still written):"
            f" {s['off_rate']:7.1f} answers/s  runs {s['off_runs']}"
        )
        say(
            f"     monitoring on (in-process MiniLM teacher at base rate {s['base_rate']},"
            f" checks every {s['interval_s']:g} s): {s['on_rate']:7.1f} answers/s"
            f"  runs {s['on_runs']}"
        )
        say(
            "       (teacher: the student's own MiniLM, loaded a second time; sampling at the"
            " base rate only: boosts off, since this untrained student's confidences are all"
            " about 0.5 and would boost every request, and min_per_segment 0, the steady state"
            " of a daemon that has its per-segment minimum already)"
        )
        say(
            f"     on / off: {s['ratio']:.3f}  (target >= 0.95); the teacher and the checks run"
            " off the serving path but on the same CPU cores"
        )
        say(
            f"     CPU time of the daemon's process per answer (every thread): off"
            f" {s['off_cpu_ms']:.1f} ms {s['off_runs_cpu_ms']}, on {s['on_cpu_ms']:.1f} ms"
            f" {s['on_runs_cpu_ms']} -> off / on {s['cpu_ratio']:.3f}"
        )
        say(
            "     both ratios move with other work on the machine (torch's threads also burn"
            " CPU while they wait for a core): judge them by the spread between runs of one mode"
        )
        say(
            f"     while monitored: {s['sampled']} of {s['offered']} requests sampled,"
            f" {s['compared']} compared with the teacher, {s['dropped']} dropped;"
            f" {s['checks_during']} scheduled checks ran during the measured spans;"
            f" last drift verdicts {s['last_drift_status']}"
        )
    say(
        f"total {meta['total_s']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in meta["part_s"].items())
        + ")"
    )


def summary_json(results: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": meta["mode"], "total_s": round(meta["total_s"], 1)}
    if d := results.get("drift"):
        out |= {
            "drift_window": d["window"],
            "drift_step": d["step"],
            "drift_pre_shift_share": None
            if d["pre_shift_share"] is None
            else round(d["pre_shift_share"], 4),
            "drift_delay_messages": d["delay_messages"],
        }
    if f := results.get("false_alarms"):
        out |= {
            "false_alarm_messages": f["messages"],
            "false_alarm_checks": f["checks"],
            "false_alarms": f["breaches"],
            "false_alarm_max_share": round(f["max_share"], 4),
        }
    if a := results.get("accuracy"):
        out |= {
            "accuracy_simulated": True,
            "accuracy_pre_change_breaches": a["pre_change_breaches"],
            "accuracy_delay_messages": a["delay_messages"],
            "accuracy_delay_comparisons": a["delay_comparisons"],
            "accuracy_segment_delay_messages": a["segment_delay_messages"],
        }
    if e := results.get("evidently"):
        for n, r in e.items():
            out[f"evidently_s_{n}"] = round(r["evidently_s"], 3)
            out[f"check_s_{n}"] = round(r["check_s"], 3)
    if s := results.get("serving"):
        out |= {
            "serving_off_rate": round(s["off_rate"], 1),
            "serving_on_rate": round(s["on_rate"], 1),
            "serving_ratio": round(s["ratio"], 3),
            "serving_off_runs": s["off_runs"],
            "serving_on_runs": s["on_runs"],
            "serving_off_cpu_ms": round(s["off_cpu_ms"], 2),
            "serving_on_cpu_ms": round(s["on_cpu_ms"], 2),
            "serving_cpu_ratio": round(s["cpu_ratio"], 3),
            "serving_compared": s["compared"],
            "serving_checks_during": s["checks_during"],
        }
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    parser.add_argument("--window", type=int, help="drift window W (policy default 1000)")
    parser.add_argument("--step", type=int, help="check every K messages (100)")
    parser.add_argument("--stationary", type=int, help="false-alarm messages (20000)")
    parser.add_argument("--requests", type=int, help="serving requests per daemon run (2000)")
    parser.add_argument("--rounds", type=int, help="serving off/on rounds (2)")
    parser.add_argument("--check-interval", type=float, help="monitors.interval_s (10)")
    parser.add_argument("--base-rate", type=float, default=0.05)
    parser.add_argument("--agreement-before", type=float, default=0.95)
    parser.add_argument("--agreement-after", type=float, default=0.60)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    sizes = QUICK if args.quick else FULL
    overrides = {
        "window": args.window,
        "step": args.step,
        "stationary": args.stationary,
        "requests": args.requests,
        "rounds": args.rounds,
        "interval_s": args.check_interval,
    }
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    configure_logging("WARNING")
    began = time.perf_counter()
    part_s: dict[str, float] = {}

    rows = [r for r in load_rows() if r.text.strip()]
    reviews = [r for r in rows if r.label is not None]
    plots = [r for r in rows if r.category == "plot"]
    random.Random(args.seed).shuffle(reviews)
    train = reviews[: sizes.reference]  # the reference: training-like reviews
    pool = reviews[sizes.reference : sizes.reference + sizes.pool]  # held out: traffic
    results: dict[str, Any] = {}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = student_dir()
        answers = StudentAnswers(write_policy(root, "bench-answers", model, 32, 10), model)
        fitted: list[Reference] = []

        def reference() -> Reference:
            """The drift reference, fitted on first use (the accuracy part needs none)."""
            if not fitted:
                started = time.perf_counter()
                labelled = answers([r.text for r in train])
                fitted.append(
                    fit_reference(
                        [r.text for r in train],
                        predicted_labels=[label for label, _ in labelled],
                        confidences=[c for _, c in labelled],
                        embedding_dims=DriftMonitorConfig().embedding_dims,
                    )
                )
                part_s["reference"] = time.perf_counter() - started
            return fitted[0]

        def timed(name: str, run: Callable[[], Any]) -> None:
            started = time.perf_counter()
            results[name] = run()
            part_s[name] = time.perf_counter() - started

        if set(parts) - {"accuracy"}:
            reference()  # timed on its own, not inside the first part that needs it
        if "drift" in parts:
            timed(
                "drift",
                lambda: drift_delay(sizes, pool, plots, answers, reference(), root, args.seed),
            )
        stationary_store = SqliteStore(
            root / "stationary.sqlite",
            reservoir_per_task=max(20_000, sizes.stationary, *sizes.eval_windows),
        )
        try:
            if "false_alarms" in parts or "evidently" in parts:
                timed(
                    "false_alarms",
                    lambda: false_alarms(
                        sizes, pool, answers, reference(), stationary_store, args.seed
                    ),
                )
            if "evidently" in parts:
                available = results["false_alarms"]["messages"]
                timed(
                    "evidently",
                    lambda: check_times(sizes, stationary_store, reference(), available),
                )
        finally:
            stationary_store.close()
        if "accuracy" in parts:
            timed(
                "accuracy",
                lambda: accuracy_delay(
                    sizes,
                    pool,
                    root,
                    base_rate=args.base_rate,
                    before=args.agreement_before,
                    after=args.agreement_after,
                    seed=args.seed,
                ),
            )
        answered_texts, answer_s = answers.computed, answers.seconds
        cached_texts = answers.cached
        answers.close()  # the daemon loads its own copy of the student
        if "serving" in parts:
            timed(
                "serving",
                lambda: serving_ratio(
                    sizes, pool, reference(), root, base_rate=args.base_rate, seed=args.seed
                ),
            )

    meta = {
        "mode": "quick" if args.quick else "full",
        "evidently": version("evidently"),
        "answered_texts": answered_texts,
        "answer_s": answer_s,
        "cached_texts": cached_texts,
        "total_s": time.perf_counter() - began,
        "part_s": part_s,
    }
    report(sizes, results, meta, print)
    print(json.dumps(summary_json(results, meta)))


if __name__ == "__main__":
    main()
