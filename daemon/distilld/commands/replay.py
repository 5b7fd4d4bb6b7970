"""``distilld replay``: produce recorded requests (JSONL) into Kafka."""

from __future__ import annotations

import json
from pathlib import Path

from distilld.errors import DistilldError
from distilld.settings import Settings
from distilld.traffic.replay import iter_jsonl_lines, replay


def replay_file(
    settings: Settings,
    file: Path,
    topic: str,
    rate: float,
    limit: int | None,
    bootstrap_servers: str | None,
) -> int:
    """Send each line of ``file`` as-is to ``topic``; print what was sent as JSON."""
    if not file.is_file():
        raise DistilldError(f"replay file {file} does not exist or is not a file")
    kafka = settings.kafka(bootstrap_servers)
    result = replay(kafka, iter_jsonl_lines(file), topic, rate, limit)
    print(
        json.dumps(
            {
                "sent": result.sent,
                "seconds": round(result.seconds, 3),
                "rate": round(result.rate, 1),
                "topic": topic,
            }
        )
    )
    return 0
