"""The embedded Tansu broker is started without the daemon's secrets in its environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distilld.traffic.broker import EmbeddedBroker

SECRETS = {
    "DISTILLD_ADMIN_TOKEN": "admin-secret",
    "DISTILLD_KAFKA_SASL_PASSWORD": "sasl-secret",
    "TEACHER_API_KEY": "teacher-secret",
}


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_the_broker_gets_no_secret_of_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RUST_LOG", "warn")
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        process = broker._process
        assert process is not None
        env = _environment(process.pid)
    for name in SECRETS:
        assert name not in env
    assert not any(value in SECRETS.values() for value in env.values())
    assert env["RUST_LOG"] == "warn"
    assert env["PATH"] == os.environ["PATH"]
