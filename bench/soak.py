"""Memory soak: the daemon's RSS over a long run of steady traffic.

Starts an embedded Tansu broker and ``distilld run`` as a process of its own
(so that only the daemon's memory is measured, not this script's producer),
with the quick-start policy ``policies/rotten-tomatoes.yaml``: the in-process
MiniLM student and teacher, 10 % of the requests compared with the teacher,
drift and accuracy checked every ``--interval`` seconds (60 here, not the
policy's 300, so that a soak sees a few dozen Evidently checks). The policy's
retraining section is left out: a retraining loads a second model and trains
for minutes, a step in memory that is not a leak and would hide one.

Then it sends ``--requests`` real Rotten Tomatoes reviews (cycled) at
``--rate`` requests/s, samples the daemon's RSS every ``--every`` seconds, and
prints from that one run:

  * RSS when traffic starts, at each tenth of the requests sent, at the end,
    and the peak (VmHWM);
  * the least-squares slope of RSS over the second half of the run, its last
    third, and the whole run after the first tenth (warm-up: models,
    Evidently, caches), in MiB per minute, and per 10,000 requests sent;
  * requests answered, lost (never answered, must be 0), duplicated, the
    checks run and the alerts they raised, and the daemon's exit code on
    SIGTERM at the end (0: drained and stopped cleanly).

Usage:  .venv/bin/python bench/soak.py [--requests 50000] [--rate 40] [--interval 60]
The models are the demo's (built on first use, cached under models/).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import yaml

from distilld.demo.data import load_rows
from distilld.demo.run import demo_data, merged
from distilld.demo.student import ensure_demo_models
from distilld.log import configure_logging
from distilld.policy.load import load_policy
from distilld.settings import Settings
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.replay import read_topic, replay

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "policies" / "rotten-tomatoes.yaml"


def status_mib(pid: int, field: str) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return None


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None for fewer than 3."""
    n = len(points)
    if n < 3:
        return None
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return cov / var if var else None


class Paced:
    """Yields lines at ``rate`` per second and counts what was handed out."""

    def __init__(self, lines: list[bytes], rate: float) -> None:
        self.lines = lines
        self.rate = rate
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        start = time.monotonic()
        for i, line in enumerate(self.lines):
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield line
            self.sent = i + 1


def soak_policy(dest_dir: Path, interval_s: int) -> Path:
    document = yaml.safe_load(POLICY.read_text(encoding="utf-8"))
    document.pop("retraining", None)
    document = merged(document, {"monitors": {"interval_s": interval_s}})
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / POLICY.name
    path.write_text(
        f"# {POLICY} without retraining, checks every {interval_s} s (bench/soak.py)\n"
        + yaml.safe_dump(document, sort_keys=False)
    )
    return path


def log_events(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    out = []
    for line in lines:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--interval", type=int, default=60, help="monitor interval_s")
    parser.add_argument("--every", type=float, default=2.0, help="RSS sampling period, s")
    args = parser.parse_args()
    configure_logging("INFO", "console")

    models_dir = ROOT / "models"
    state = Path(tempfile.mkdtemp(prefix="distilld-soak-"))
    policies = state / "policies"
    policy = load_policy(soak_policy(policies, args.interval))
    # The demo's models, built once (the shift point does not change them).
    ensure_demo_models(models_dir, policy, demo_data(shift_after=300))

    texts = [r.text for r in load_rows() if r.text.strip()]
    task = policy.task
    lines = [
        json.dumps({"id": f"soak-{i}", "task": task, "input": texts[i % len(texts)]}).encode()
        for i in range(args.requests)
    ]
    print(
        f"memory soak: {args.requests} requests at {args.rate}/s, checks every "
        f"{args.interval} s, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f} at start, state {state}",
        flush=True,
    )
    log = state / "daemon.log"
    with EmbeddedBroker(log_path=state / "broker.log") as broker:
        kafka = Settings(kafka_bootstrap_servers=broker.bootstrap_servers).kafka()
        env = {
            **os.environ,
            "DISTILLD_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "DISTILLD_POLICIES_DIR": str(policies),
            "DISTILLD_MODELS_DIR": str(models_dir),
            "DISTILLD_STATE_DIR": str(state / "state"),
            "DISTILLD_HTTP_PORT": "0",
            "DISTILLD_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
        with log.open("ab") as out:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "distilld", "run"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 300
            while not any(e.get("event") == "daemon.started" for e in log_events(log)):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text()[-3000:])
                    return 1
                time.sleep(0.5)
            paced = Paced(lines, args.rate)
            producer = threading.Thread(
                target=replay, args=(kafka, paced, policy.traffic.requests_topic), daemon=True
            )
            samples: list[tuple[float, int, float]] = []  # (seconds, sent, RSS MiB)
            done = threading.Event()
            start = time.monotonic()

            def sample() -> None:  # until every request is answered, backlog included
                while not done.wait(args.every):
                    rss = status_mib(daemon.pid, "VmRSS")
                    if rss is not None:
                        samples.append((time.monotonic() - start, paced.sent, rss))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            producer.start()
            ids = {f"soak-{i}" for i in range(args.requests)}
            responses = read_topic(
                kafka,
                policy.traffic.responses_topic,
                until=lambda recs: ids <= {r.get("id") for r in recs} or daemon.poll() is not None,
                timeout_s=args.requests / args.rate + 1800,
            )
            done.set()
            sampler.join()
            if daemon.poll() is not None:
                print("the daemon exited during the soak:\n" + log.read_text()[-3000:])
                return 1
            drained_s = time.monotonic() - start
            final_rss = status_mib(daemon.pid, "VmRSS")
            peak = status_mib(daemon.pid, "VmHWM")
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=120)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = -9

    answered = Counter(str(r.get("id")) for r in responses)
    events = log_events(log)
    checks = sum(e.get("event") == "monitor.checked" for e in events)
    alerts = Counter(e["event"] for e in events if e.get("alert"))
    seconds = samples[-1][0]
    warm = [(t / 60, r) for t, _, r in samples if t >= seconds / 10]
    second_half = [(t / 60, r) for t, _, r in samples if t >= seconds / 2]
    last_third = [(t / 60, r) for t, _, r in samples if t >= seconds * 2 / 3]
    # Per request: only while requests were still being sent (the count stands
    # still while the backlog drains).
    traffic_s = next((t for t, s, _ in samples if s >= args.requests), seconds)
    per_request = [(s / 10_000, r) for t, s, r in samples if seconds / 10 <= t <= traffic_s]
    tenths = []
    for k in range(11):
        target = args.requests * k / 10
        sample = next((s for s in samples if s[1] >= target), samples[-1])
        tenths.append(f"{sample[1]}:{sample[2]:.0f}")

    def rounded(value: float | None) -> float | None:
        return round(value, 2) if value is not None else None

    figures = {
        "requests_sent": paced.sent,
        "requests_answered": len(ids & set(answered)),
        "requests_lost": len(ids - set(answered)),
        "duplicates": sum(n - 1 for n in answered.values() if n > 1),
        "traffic_s": round(traffic_s, 1),
        "all_answered_after_s": round(drained_s, 1),
        "checks": checks,
        "alerts": dict(alerts),
        "rss_mib_start": round(samples[0][2], 1),
        "rss_mib_at_sent": " ".join(tenths),
        "rss_mib_end": rounded(final_rss),
        "peak_rss_mib": rounded(peak),
        "slope_mib_per_min_second_half": rounded(slope(second_half)),
        "slope_mib_per_min_last_third": rounded(slope(last_third)),
        "slope_mib_per_min_after_warmup": rounded(slope(warm)),
        "slope_mib_per_10k_requests_after_warmup": rounded(slope(per_request)),
        "exit_code_on_sigterm": code,
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    print()
    for key, value in figures.items():
        print(f"  {key:42} {value}")
    print(json.dumps(figures))
    (state / "rss.csv").write_text(
        "seconds,sent,rss_mib\n" + "".join(f"{t:.1f},{s},{r:.1f}\n" for t, s, r in samples)
    )
    print(f"samples: {state / 'rss.csv'}")
    return 0 if figures["requests_lost"] == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
