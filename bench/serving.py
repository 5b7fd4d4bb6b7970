"""Serving throughput: the daemon through Kafka next to the same student called directly.

Prints, from one run on this machine (ratios are measured side by side, so
machine noise affects both sides alike):

  (a) daemon end-to-end answers/s through a real broker (embedded Tansu) with
      the in-process transformers backend, next to a direct loop over the
      same backend at the same batch size -> ratio (target >= 0.8);
  (b) the daemon's dynamic batching (max_size 8) over its own batch-1 mode
      -> gain (target >= 1.7x).

Usage:  .venv/bin/python bench/serving.py [--requests 2000] [--batch 8]
        .venv/bin/python bench/serving.py --vllm [--requests 200] [--concurrency 32]
        (the vLLM mode: daemon through Kafka and vLLM next to a direct client of
        the same server; see bench/serving_vllm.py)
Student: all-MiniLM-L6-v2 with a classification head (built once, cached
under .cache/bench-models); inputs: short Rotten Tomatoes reviews, 128 tokens max.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from daemon_rate import daemon_rate  # noqa: E402
from distilld.demo.data import load_rows  # noqa: E402
from distilld.log import configure_logging  # noqa: E402
from distilld.modelfiles import minilm_classifier_from_asset  # noqa: E402
from distilld.policy.load import load_policy  # noqa: E402
from distilld.policy.model import Policy  # noqa: E402
from distilld.serving.local import load_local_student  # noqa: E402
from distilld.settings import Settings  # noqa: E402
from distilld.traffic.broker import EmbeddedBroker  # noqa: E402

LABELS = ["fresh", "rotten"]


def student_dir() -> Path:
    cache = Path(os.environ.get("DISTILLD_BENCH_CACHE", REPO / ".cache" / "bench-models"))
    dest = cache / "minilm-fresh-rotten"
    if not dest.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        minilm_classifier_from_asset(dest, LABELS)
    return dest


def bench_settings(broker: EmbeddedBroker, model: Path, root: Path) -> Settings:
    """A daemon on ``broker`` serving from ``model``'s directory, its state under ``root``."""
    return Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        kafka_session_timeout_ms=6000,
        models_dir=model.parent,
        state_dir=root / "state",
        http_port=0,  # a free port: a busy 8080 must not fail a benchmark
    )


def write_policy(directory: Path, name: str, model: Path, batch: int, wait_ms: int) -> Policy:
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
              model: {model}
              max_input_tokens: 128
              batch: {{max_size: {batch}, max_wait_ms: {wait_ms}}}
            """
        )
    )
    return load_policy(path)


def direct_rate(policy: Policy, model: Path, texts: list[str], batch: int) -> float:
    backend = load_local_student(policy, model, model_version="bench")
    backend.predict(texts[:batch])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        backend.predict(texts[i : i + batch])
    elapsed = time.perf_counter() - started
    backend.close()
    return len(texts) / elapsed


def main() -> None:
    if "--vllm" in sys.argv[1:]:
        from serving_vllm import main as vllm_main  # needs vLLM's setup: load it only here

        vllm_main([a for a in sys.argv[1:] if a != "--vllm"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    configure_logging("WARNING")

    texts = [r.text for r in load_rows() if r.label is not None and r.text.strip()]
    texts = texts[: args.requests]
    model = student_dir()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        root = Path(tmp)
        settings = bench_settings(broker, model, root)
        batched = write_policy(root, "bench-batched", model, args.batch, 10)
        single = write_policy(root, "bench-single", model, 1, 0)
        results = {
            "direct_batch_n": direct_rate(batched, model, texts, args.batch),
            "daemon_batch_n": daemon_rate(batched, settings, texts),
            "direct_batch_1": direct_rate(single, model, texts, 1),
            "daemon_batch_1": daemon_rate(single, settings, texts),
        }
    ratio = results["daemon_batch_n"] / results["direct_batch_n"]
    gain = results["daemon_batch_n"] / results["daemon_batch_1"]
    print(
        f"serving benchmark: {len(texts)} short reviews, MiniLM-L6 classifier, 128 tokens max,"
        f" {os.cpu_count()} cores"
    )
    print(f"  direct loop, batch {args.batch:<3}      {results['direct_batch_n']:8.1f} texts/s")
    print(f"  daemon via Kafka, batch {args.batch:<3} {results['daemon_batch_n']:8.1f} texts/s")
    print(f"  direct loop, batch 1        {results['direct_batch_1']:8.1f} texts/s")
    print(f"  daemon via Kafka, batch 1   {results['daemon_batch_1']:8.1f} texts/s")
    print(f"  (a) daemon / direct at batch {args.batch}: {ratio:.2f}  (target >= 0.8)")
    print(
        f"  (b) dynamic batching gain (daemon batch {args.batch} / batch 1): {gain:.2f}x"
        "  (target >= 1.7x)"
    )
    print(
        json.dumps(
            {
                **{k: round(v, 1) for k, v in results.items()},
                "ratio_daemon_direct": round(ratio, 3),
                "batching_gain": round(gain, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
