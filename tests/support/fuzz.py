"""Malformed request records of every kind, for the fuzz test and bench/faults.py."""

from __future__ import annotations

import json
import random
from typing import Any


def fuzzed_records(task: str, max_input_chars: int, count: int, seed: int = 5) -> list[bytes]:
    """``count`` malformed records of every kind: random bytes, broken JSON, wrong types,
    inputs over the limit, unknown tasks. None of them is a valid request."""
    rng = random.Random(seed)
    valid = {"id": "fz", "task": task, "input": "a fine film"}
    # Not strings, for fields that must be strings ("" is a valid input).
    wrong_values: list[Any] = [None, 7, 2.5, True, ["a"], {"k": "v"}]
    makers = [
        lambda i: bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))),
        lambda i: json.dumps({**valid, "id": f"fz-{i}"}).encode()[: rng.randint(1, 40)],
        lambda i: json.dumps(
            {**valid, "id": f"fz-{i}", "input": rng.choice(wrong_values)}
        ).encode(),
        lambda i: json.dumps({**valid, "id": rng.choice(wrong_values)}).encode(),
        lambda i: json.dumps({**valid, "id": f"fz-{i}", "task": rng.choice(wrong_values)}).encode(),
        lambda i: json.dumps(
            {**valid, "id": f"fz-{i}", "input": "z" * (max_input_chars + rng.randint(1, 60_000))}
        ).encode(),
        lambda i: json.dumps({**valid, "id": f"fz-{i}", "task": f"no-such-task-{i}"}).encode(),
        lambda i: json.dumps({"id": f"fz-{i}", "task": task}).encode(),
        lambda i: json.dumps(rng.choice([[1, 2], "text", 3, None])).encode(),
        lambda i: json.dumps({**valid, "id": f"fz-{i}", "metadata": "not an object"}).encode(),
    ]
    return [makers[i % len(makers)](i) for i in range(count)]
