"""Closed-loop benchmark: the quick-start demo's loop, measured.

Runs ``distilld demo``'s loop once on this machine (embedded Tansu broker, the
in-process MiniLM teacher and first student, real Rotten Tomatoes reviews at
a steady rate, the population shift from mostly fresh to mostly rotten
reviews, the daemon retraining by itself) in a state directory of its own,
and prints from that one run:

  * detection delay: seconds from the first request after the shift to the
    first breach alert;
  * alert to promotion: seconds from that alert to the ``retrain.promoted``
    alert (selection, teacher labelling, training, gate, shadow run);
  * agreement with the teacher before the shift, after it (first student),
    and after the promotion; the same split for accuracy on gold labels;
  * requests lost (sent and never answered; must be 0) and duplicates (answers
    beyond the first per request id);
  * peak RSS of the process (the daemon runs in it, with the broker as a
    child process not counted) and RSS sampled every second: the slope over
    the run's second half, in MiB per minute.

Usage:  .venv/bin/python bench/loop.py [--rate 10] [--shift-after 600] [--timeout 1200]
The first run also trains the demo's teacher and first student (cached under
models/ like the demo's); read "seconds" as loop time only from a second run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from distilld.demo.run import run_demo
from distilld.log import configure_logging
from distilld.settings import Settings
from soak import slope, status_mib

ROOT = Path(__file__).resolve().parents[1]


class RssSampler:
    """RSS of this process every ``every_s`` seconds, in a daemon thread."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.samples: list[tuple[float, float]] = []
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self._every_s):
            self.samples.append((time.monotonic() - start, status_mib(os.getpid(), "VmRSS") or 0.0))

    def slope_mib_per_min(self) -> float | None:
        """Least-squares slope over the second half of the samples (after warm-up)."""
        return slope([(t / 60, r) for t, r in self.samples[len(self.samples) // 2 :]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--shift-after", type=int, default=600)
    parser.add_argument("--timeout", type=float, default=1200.0)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="distilld-loop-bench-"))
    settings = Settings(
        policies_dir=ROOT / "policies",
        models_dir=ROOT / "models",
        state_dir=state,
    )
    configure_logging("INFO", "console")
    print(
        f"closed-loop benchmark, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f} at start, rate {args.rate}/s, shift after "
        f"{args.shift_after} requests, state {state}",
        flush=True,
    )
    with RssSampler() as sampler:
        code = run_demo(
            settings, rate=args.rate, shift_after=args.shift_after, timeout_s=args.timeout
        )
    summary = json.loads((state / "demo" / "summary.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    detected = summary["detected"]["seconds_after_shift"]
    promoted = summary["retraining"]["promoted_s_after_shift"]
    slope = sampler.slope_mib_per_min()
    figures = {
        "outcome": summary["outcome"],
        "seconds": summary["seconds"],
        "detection_delay_s": detected,
        "alert_to_promotion_s": (
            round(promoted - detected, 1) if promoted is not None and detected is not None else None
        ),
        "agreement": {k: v["value"] for k, v in summary["agreement"].items()},
        "gold_accuracy": {k: v["value"] for k, v in summary["gold_accuracy"].items()},
        "requests_sent": summary["requests"]["sent"],
        "requests_lost": summary["requests"]["unanswered"],
        "duplicates": summary["requests"]["duplicates"],
        "train_examples": summary["retraining"]["train_examples"],
        "peak_rss_mib": round(peak, 1),
        "rss_slope_mib_per_min_second_half": round(slope, 2) if slope is not None else None,
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    print()
    for key, value in figures.items():
        print(f"  {key:36} {value}")
    print(json.dumps(figures))
    return code


if __name__ == "__main__":
    sys.exit(main())
