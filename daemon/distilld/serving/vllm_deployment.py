"""A task's vLLM student as a deployment: the client, and the server when the daemon runs it.

This is where model versions change while traffic flows:

* LoRA students: :meth:`VllmDeployment.load_adapter` loads the new adapter
  into the running server under a new name and switches later batches to it.
  Works with external and managed servers.
* Full-weight students: :meth:`VllmDeployment.switch_model` restarts the
  managed server on the new model directory. The client is held meanwhile
  (its ``predict`` raises BackendUnavailable), so the serving loop keeps the
  requests and answers them once the new version is up; batches already sent
  finish on the old server first. If the new version does not start, the old
  one is started again and the error is raised.

The watchdog (:meth:`VllmDeployment.watch`) restarts a managed server that
died. Restarts and switches take one lock, so they never overlap.
"""

from __future__ import annotations

import threading
from pathlib import Path

from distilld.errors import BackendError, ConfigError, DistilldError
from distilld.log import get_logger
from distilld.serving.vllm import VllmStudent
from distilld.serving.vllm_server import ManagedVllmServer
from distilld.telemetry.alerts import alert

#: How often the watchdog looks at the managed server.
WATCH_INTERVAL_S = 2.0


class VllmDeployment:
    """The vLLM student of one task, with its managed server (None when external)."""

    def __init__(
        self, task: str, student: VllmStudent, server: ManagedVllmServer | None = None
    ) -> None:
        self.task = task
        self.student = student
        self.server = server
        self._lock = threading.Lock()
        self._log = get_logger("vllm")

    @property
    def model_version(self) -> str:
        return self.student.model_version

    def load_adapter(self, name: str, path: Path, model_version: str | None = None) -> None:
        """Serve a LoRA adapter (a new ``name`` per version) from the next batch on."""
        with self._lock:
            self.student.load_adapter(name, str(path), model_version)
        self._log.info(
            "student.switched",
            task=self.task,
            method="lora",
            adapter=name,
            model_version=self.student.model_version,
        )

    def switch_model(self, model_dir: Path, model_version: str) -> None:
        """Restart the managed server on ``model_dir``; requests are held, not lost.

        Raises ConfigError for an external server (the daemon cannot restart it)
        and BackendError when the new version does not start (the previous one
        is then serving again)."""
        server = self.server
        if server is None:
            raise ConfigError(
                f"task {self.task!r} uses an external vLLM server ({self.student.served_model!r}); "
                "the daemon cannot restart it with new weights. Serve LoRA students there "
                "(load_adapter), or let the daemon manage the server (unset student.vllm.base_url)"
            )
        with self._lock:
            previous_dir = server.config.model_dir
            previous_version = self.student.model_version
            self.student.hold(f"switching {self.task!r} to model version {model_version!r}")
            try:
                server.stop()
                server.use_model(model_dir)
                server.start(wait=True)
            except DistilldError as exc:
                self._restore(server, previous_dir, previous_version, model_version, exc)
                raise BackendError(
                    f"model version {model_version!r} ({model_dir}) did not start in vLLM; "
                    f"version {previous_version!r} serves again. Cause: {exc}"
                ) from exc
            self.student.switch(self.student.served_model, model_version)
        self._log.info(
            "student.switched",
            task=self.task,
            method="restart",
            model_dir=str(model_dir),
            model_version=model_version,
            previous_version=previous_version,
        )

    def _restore(
        self,
        server: ManagedVllmServer,
        previous_dir: Path,
        previous_version: str,
        failed_version: str,
        cause: DistilldError,
    ) -> None:
        alert(
            self._log,
            "student.switch_failed",
            severity="error",
            task=self.task,
            model_version=failed_version,
            error=str(cause),
            action=f"starting version {previous_version!r} again; requests are held meanwhile",
        )
        server.stop()
        server.use_model(previous_dir)
        try:
            server.start(wait=True)
        except DistilldError as exc:  # the watchdog keeps trying; requests stay held
            self._restart_failed(exc)
        self.student.release()

    def watch(self, stop: threading.Event) -> None:
        """Watchdog thread body: restart the managed server when it dies, until ``stop``.

        Meanwhile the serving loop holds the task's requests (the client raises
        BackendUnavailable), so none is lost."""
        server = self.server
        if server is None:
            return
        while not stop.wait(WATCH_INTERVAL_S):
            with self._lock:
                if server.is_alive() or stop.is_set():
                    continue
                alert(
                    self._log,
                    "vllm.server_died",
                    severity="error",
                    task=self.task,
                    log_file=str(server.log_path),
                    action="restarting it; requests are held meanwhile",
                )
                try:
                    server.restart(wait=True)
                except DistilldError as exc:
                    self._restart_failed(exc)
                    continue
            self._log.info("vllm.server_restarted", task=self.task, base_url=server.base_url)

    def _restart_failed(self, exc: DistilldError) -> None:
        alert(
            self._log,
            "vllm.restart_failed",
            severity="critical",
            task=self.task,
            error=str(exc),
            action="the watchdog tries again; requests are held meanwhile",
        )

    def close(self) -> None:
        """Close the client and stop the managed server (if any)."""
        self.student.close()
        if self.server is not None:
            self.server.stop()
