"""Size-capped child-process logs: rotation, the cap, the pump from a pipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distilld.logfiles import LogPump, LogRotation, RotatingLog, backup_path, rotate_files


def files_of(path: Path) -> dict[str, int]:
    """Each file of the log (current and rotated) with its size."""
    return {p.name: p.stat().st_size for p in sorted(path.parent.glob(path.name + "*"))}


def test_rotate_files_shifts_backups_and_drops_the_oldest(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    for name, text in (("x.log", "0"), ("x.log.1", "1"), ("x.log.2", "2")):
        (tmp_path / name).write_text(text)
    rotate_files(log, backups=2)
    assert not log.exists()
    assert backup_path(log, 1).read_text() == "0"
    assert backup_path(log, 2).read_text() == "1"
    assert not backup_path(log, 3).exists()
    rotate_files(backup_path(log, 9), backups=0)  # nothing there: nothing happens
    log.write_text("new")
    rotate_files(log, backups=0)
    assert not log.exists()


def test_the_log_never_holds_more_than_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "child.log"
    log = RotatingLog(path, LogRotation(max_bytes=1000, backups=2))
    lines = [f"line {i:05d} {'x' * 40}\n".encode() for i in range(2000)]  # about 100 KB
    for start in range(0, len(lines), 7):
        log.write(b"".join(lines[start : start + 7]))
    log.close()

    sizes = files_of(path)
    assert set(sizes) == {"child.log", "child.log.1", "child.log.2"}
    assert all(size <= 1000 for size in sizes.values())
    # Lines stay whole, and the newest ones are kept in order.
    kept = b"".join(p.read_bytes() for p in (backup_path(path, 2), backup_path(path, 1), path))
    assert kept.endswith(lines[-1])
    assert kept.splitlines(keepends=True) == lines[-len(kept.splitlines()) :]


def test_a_line_longer_than_the_cap_is_cut_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "child.log"
    log = RotatingLog(path, LogRotation(max_bytes=100, backups=5))
    log.write(b"a" * 250)
    log.close()
    assert files_of(path) == {"child.log": 50, "child.log.1": 100, "child.log.2": 100}


def test_an_existing_log_is_appended_to_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "child.log"
    path.write_bytes(b"x" * 90 + b"\n")
    log = RotatingLog(path, LogRotation(max_bytes=100, backups=1))
    assert log.start_offset == 91
    log.write(b"0123456789\n")  # does not fit: rotates first
    log.close()
    assert backup_path(path, 1).read_bytes() == b"x" * 90 + b"\n"
    assert path.read_bytes() == b"0123456789\n"
    assert log.rotations == 1 and log.start_offset == 0


def test_a_pump_copies_a_childs_output_within_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "child.log"
    script = "import sys\nfor i in range(20000): print(f'line {i:06d}', file=sys.stderr)\n"
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert child.stdout is not None
    pump = LogPump(child.stdout, RotatingLog(path, LogRotation(10_000, 3)), name="test-pump")
    assert child.wait(timeout=60) == 0
    assert pump.join(timeout_s=30)

    sizes = files_of(path)
    assert len(sizes) == 4 and all(size <= 10_000 for size in sizes.values())
    assert path.read_text().splitlines()[-1] == "line 019999"


def test_rotation_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_bytes >= 1 and backups >= 0"):
        LogRotation(max_bytes=0)
