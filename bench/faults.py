"""Serving throughput before and after a flood of malformed records, in one daemon.

One daemon (embedded Tansu broker, the in-process MiniLM classifier of
bench/serving.py, batch 8) answers rounds of good requests, each replayed as a
backlog and timed until the last one is answered. Between the "before" and
the "after" rounds, ``--flood`` malformed records (the fuzz test's generator:
random bytes, cut JSON, wrong types, inputs over the limit, unknown tasks)
are replayed and timed until all of them are dead-lettered. Prints, from that
one run:

  * answers/s of each round, the median before and after, and after / before
    (1.0: the flood left serving as fast as it was);
  * dead letters/s during the flood, and how many of the malformed records
    were dead-lettered (must be all) and how many answered (must be 0).

Usage:  .venv/bin/python bench/faults.py [--rounds 3] [--requests 600] [--flood 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fuzz generator lives with the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distilld.demo.data import load_rows  # noqa: E402
from distilld.lifecycle import RunningDaemon, running_daemon  # noqa: E402
from distilld.log import configure_logging  # noqa: E402
from distilld.traffic.broker import EmbeddedBroker  # noqa: E402
from distilld.traffic.replay import read_topic, replay  # noqa: E402
from serving import bench_settings, student_dir, write_policy  # noqa: E402
from support.fuzz import fuzzed_records  # noqa: E402


def timed_round(daemon: RunningDaemon, topic: str, lines: list[bytes], count: str) -> float:
    """Replay ``lines`` as one backlog; seconds until the loop's ``count`` counter
    (answered or dead_lettered) went up by ``len(lines)``."""
    stats = daemon.loops[0].stats

    def counted() -> int:  # snapshot() sums the dead letters' per-reason counter
        return int(stats.snapshot()[count])

    target = counted() + len(lines)
    started = time.perf_counter()
    replay(daemon.kafka, lines, topic)
    deadline = started + 900
    while counted() < target:
        if time.perf_counter() > deadline:
            raise SystemExit(f"{count} stayed at {counted()} of {target}")
        time.sleep(0.005)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=600, help="good requests per round")
    parser.add_argument("--flood", type=int, default=1000, help="malformed records")
    args = parser.parse_args()
    configure_logging("WARNING")

    texts = [r.text for r in load_rows() if r.label is not None and r.text.strip()]
    model = student_dir()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        root = Path(tmp)
        settings = bench_settings(broker, model, root)
        policy = write_policy(root, "bench-faults", model, 8, 10)
        # write_policy keeps the default input limit; the fuzz generator's
        # oversized inputs are sized against the policy's own limit.
        limit = policy.traffic.max_input_chars
        task, topic = policy.task, policy.traffic.requests_topic
        counter = iter(range(10**9))

        def good(n: int) -> list[bytes]:
            return [
                json.dumps({"id": f"g-{i}", "task": task, "input": texts[i % len(texts)]}).encode()
                for i in (next(counter) for _ in range(n))
            ]

        with running_daemon(settings, {task: policy}) as daemon:
            if not daemon.wait_ready(60):
                raise SystemExit("the daemon did not join its consumer group")
            timed_round(daemon, topic, good(200), "answered")  # warm-up
            before = [
                args.requests / timed_round(daemon, topic, good(args.requests), "answered")
                for _ in range(args.rounds)
            ]
            bad = fuzzed_records(task, limit, args.flood)
            flood_s = timed_round(daemon, topic, bad, "dead_lettered")
            after = [
                args.requests / timed_round(daemon, topic, good(args.requests), "answered")
                for _ in range(args.rounds)
            ]
            snapshot = daemon.loops[0].stats.snapshot()
            answered_ids = {
                str(r.get("id"))
                for r in read_topic(
                    daemon.kafka,
                    policy.traffic.responses_topic,
                    until=lambda recs: len(recs) >= snapshot["answered"],
                    timeout_s=120,
                )
            }
    fuzz_ids_answered = sum(i.startswith("fz") for i in answered_ids)
    ratio = statistics.median(after) / statistics.median(before)
    print(
        f"malformed-flood benchmark: {args.rounds} x {args.requests} good requests before and "
        f"after {args.flood} malformed records, MiniLM-L6 batch 8, {os.cpu_count()} cores"
    )
    print(f"  before the flood   {' '.join(f'{r:6.1f}' for r in before)} answers/s")
    print(f"  flood              {args.flood / flood_s:6.1f} dead letters/s ({flood_s:.1f} s)")
    print(f"  after the flood    {' '.join(f'{r:6.1f}' for r in after)} answers/s")
    print(f"  median after / before: {ratio:.2f}  (1.0: unchanged)")
    print(
        f"  dead-lettered {snapshot['dead_lettered']} of {args.flood} malformed; "
        f"malformed answered: {fuzz_ids_answered}"
    )
    print(
        json.dumps(
            {
                "before_answers_per_s": [round(r, 1) for r in before],
                "after_answers_per_s": [round(r, 1) for r in after],
                "flood_dead_letters_per_s": round(args.flood / flood_s, 1),
                "ratio_after_before": round(ratio, 3),
                "dead_lettered": snapshot["dead_lettered"],
                "malformed_answered": fuzz_ids_answered,
            }
        )
    )
    return 0 if snapshot["dead_lettered"] == args.flood and fuzz_ids_answered == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
