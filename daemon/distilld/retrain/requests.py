"""Retraining requests by hand: ``distilld retrain TASK`` leaves a file, the running
daemon's retrain manager takes it within a tick.

Light on purpose (the standard library only): the command imports it, and must not
import torch, transformers or evidently.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

__all__ = ["request_retraining", "take_request"]


def _request_path(requests_dir: Path, task: str) -> Path:
    return requests_dir / f"{task}.retrain"


def request_retraining(requests_dir: Path, task: str) -> Path:
    """Leave a retraining request for the running daemon (``distilld retrain TASK``)."""
    requests_dir.mkdir(parents=True, exist_ok=True)
    path = _request_path(requests_dir, task)
    tmp = requests_dir / f".{task}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(f"{time.time()}\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def take_request(requests_dir: Path, task: str) -> bool:
    """Remove ``task``'s request, if one is there; True when there was one."""
    try:
        _request_path(requests_dir, task).unlink()
    except FileNotFoundError:
        return False
    return True
