"""The embedded broker's log is capped by size, and a failed start still leaves its output."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from distilld.errors import EmbeddedBrokerError
from distilld.logfiles import LogRotation
from distilld.traffic.broker import EmbeddedBroker


def test_a_chatty_broker_that_dies_leaves_a_capped_log(tmp_path: Path) -> None:
    binary = tmp_path / "fake-tansu"
    binary.write_text(
        "#!/usr/bin/env bash\n"
        'for i in $(seq 1 3000); do echo "noise line $i of a chatty broker"; done\n'
        "echo 'error: last words' >&2; exit 4\n"
    )
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    log_path = tmp_path / "tansu.log"
    broker = EmbeddedBroker(
        binary=binary, log_path=log_path, log_rotation=LogRotation(max_bytes=10_000, backups=2)
    )
    with pytest.raises(EmbeddedBrokerError, match=f"exited with code 4.*see {log_path}"):
        broker.start()
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("tansu.log*")}
    assert set(sizes) == {"tansu.log", "tansu.log.1", "tansu.log.2"}  # about 100 KB written
    assert all(size <= 10_000 for size in sizes.values())
    assert log_path.read_text().splitlines()[-1] == "error: last words"


def test_the_real_broker_writes_its_log_through_the_pump(tmp_path: Path) -> None:
    log_path = tmp_path / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        assert broker.bootstrap_servers.startswith("127.0.0.1:")
    assert log_path.is_file()  # the pump ended with the broker and closed the file
