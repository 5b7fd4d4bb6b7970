"""The operations HTTP server: health, readiness, Prometheus metrics and an admin API.

The routes and what answers them; the server (:mod:`.server`, standard library
only) runs on a daemon thread. Endpoints:

=========================================== =================================================
``GET  /healthz``                           200 ``{"status": "alive"}`` while the process runs
``GET  /readyz``                            200 when every readiness probe passes, else 503
                                            naming each failing probe and why
``GET  /metrics``                           Prometheus text format 0.0.4 (:mod:`.metrics`)
``GET  /admin/status``                      JSON from :meth:`AdminActions.status` (token
                                            unless ``public_status``)
``POST /admin/retrain/{task}``              :meth:`AdminActions.retrain`
``POST /admin/promote/{task}/{version}``    :meth:`AdminActions.promote`
``POST /admin/rollback/{task}``             :meth:`AdminActions.rollback`
=========================================== =================================================

Every POST, and ``GET /admin/status`` unless :attr:`OpsConfig.public_status`,
needs the admin token (:mod:`.auth`: how it is checked and kept out of replies
and logs). Health, readiness and metrics are open (container health checks and
Prometheus scrape them). The connection cap, the request deadline and the body
limit are the server's mechanics (:mod:`.server`).

Errors are JSON ``{"error": ...}``: the admin actions' :class:`NotFoundError` is
404, ``ConfigError`` / ``PolicyError`` 400, ``RegistryError`` 409, any other
failure 500 (logged with its traceback, never sent to the client). Every request
is logged at debug level (component ``ops``).

Wiring (``app.py``)
-------------------
Settings (``DISTILLD_`` prefix, in ``settings.py``): ``http_enabled``, ``http_host``
(default 127.0.0.1), ``http_port`` (default 8080; 0: any free port),
``http_public_status``, ``http_max_connections``, ``http_request_timeout_s``,
``admin_token`` (``SecretStr``) and ``admin_token_file`` (e.g. a mounted container
secret; :meth:`Settings.admin_secret` reads either and refuses a short token);
then, in ``running_daemon`` once the loops are started (when ``http_enabled``)::

    config = OpsConfig(
        host=settings.http_host,
        port=settings.http_port,
        admin_token=settings.admin_secret(),
        public_status=settings.http_public_status,
        max_connections=settings.http_max_connections,
        request_timeout_s=settings.http_request_timeout_s,
    )
    probes = {"broker": lambda: ProbeResult(all(l.assigned.is_set() for l in loops),
                                            "consumer groups not joined yet")}
    probes |= {f"student:{task}": <backend answers / managed server healthy> for task in ...}
    server = stack.enter_context(OpsServer(config, probes, DaemonTelemetry(collect), admin))
    log.info("ops.listening", url=server.url)

``collect`` builds a :class:`~distilld.telemetry.metrics.MetricsSnapshot` from the
loops' stats, the teachers' ``status().calls_left``, the store (agreement,
drift share: see :func:`distilld.status.task_status`) and the registries; it
runs on every scrape, so it should read counters rather than compute.
``admin`` implements :class:`AdminActions`: ``retrain`` can call
``RetrainManager.request(task, "manual")``, ``promote`` / ``rollback`` the
task's ``ModelRegistry`` (the manager follows the LIVE pointer at its next
tick), ``status`` can return :func:`distilld.status.task_status` as dicts. It
raises :class:`NotFoundError` for a task (or version) it does not know.
Probes and actions run on the server's threads: they must be thread-safe.
A probe should be quick; one that takes longer than ``probe_timeout_s``
counts as failing.
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, Protocol
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from distilld.errors import ConfigError, DistilldError, PolicyError, RegistryError
from distilld.log import get_logger
from distilld.ops.auth import TOKEN_SETTINGS, Scrubbed, authorize, mask, mask_body, needs_token
from distilld.ops.server import BoundedServer, HttpError, Reply, json_reply, listen
from distilld.policy.model import NAME_PATTERN
from distilld.registry import VERSION_PATTERN
from distilld.telemetry.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from distilld.telemetry.metrics import DaemonTelemetry

__all__ = [
    "AdminActions",
    "NotFoundError",
    "OpsConfig",
    "OpsServer",
    "Probe",
    "ProbeResult",
]


class NotFoundError(DistilldError):
    """An admin action names a task or a version that does not exist (HTTP 404)."""


class ProbeResult(NamedTuple):
    """A readiness probe's answer; ``reason`` says why it is not ready."""

    ok: bool
    reason: str = ""


#: A readiness probe: True / ProbeResult(True) when ready. Raising counts as not ready.
Probe = Callable[[], bool | ProbeResult]


class AdminActions(Protocol):
    """What the admin API does; implemented by the app. Each returns a JSON object.

    Raise :class:`NotFoundError` for an unknown task or version, ``ConfigError``
    for a request the task's configuration refuses (e.g. retraining a task that
    does not retrain), ``RegistryError`` for a change the registry refuses.
    """

    def status(self) -> Mapping[str, Any]: ...

    def retrain(self, task: str) -> Mapping[str, Any]: ...

    def promote(self, task: str, version: str) -> Mapping[str, Any]: ...

    def rollback(self, task: str) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class OpsConfig:
    """Where the ops server listens, the admin token (None: the admin API is refused)
    and the limits on clients (see the module docstring).

    ``port`` 0 picks a free port (see :attr:`OpsServer.port`). A plain ``str``
    token is wrapped in a ``SecretStr``. ``public_status``: ``GET /admin/status``
    without the token.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    admin_token: SecretStr | str | None = field(default=None, repr=False)
    probe_timeout_s: float = 2.0
    public_status: bool = False
    max_connections: int = 32
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(
                f"DISTILLD_HTTP_PORT: expected a port between 0 and 65535 (received {self.port})"
            )
        if self.probe_timeout_s <= 0:
            raise ConfigError(f"probe_timeout_s must be positive (received {self.probe_timeout_s})")
        if self.max_connections < 1:
            raise ConfigError(
                "DISTILLD_HTTP_MAX_CONNECTIONS: expected at least 1 "
                f"(received {self.max_connections})"
            )
        if self.request_timeout_s <= 0:
            raise ConfigError(
                "DISTILLD_HTTP_REQUEST_TIMEOUT_S: expected a positive number of seconds "
                f"(received {self.request_timeout_s})"
            )
        token = self.admin_token
        if isinstance(token, str):
            token = SecretStr(token)
            object.__setattr__(self, "admin_token", token)
        if token is not None and not token.get_secret_value().strip():
            raise ConfigError(
                f"the admin token is empty: set {TOKEN_SETTINGS} to a long random string, "
                "or unset both to refuse the admin API"
            )

    @property
    def token(self) -> SecretStr | None:
        """The admin token (always a SecretStr after construction)."""
        token = self.admin_token
        return SecretStr(token) if isinstance(token, str) else token


_GET = ("GET", "HEAD")
_ROUTES: tuple[tuple[re.Pattern[str], tuple[str, ...], str], ...] = (
    (re.compile(r"/healthz"), _GET, "healthz"),
    (re.compile(r"/readyz"), _GET, "readyz"),
    (re.compile(r"/metrics"), _GET, "metrics"),
    (re.compile(r"/admin/status"), _GET, "status"),
    (re.compile(r"/admin/retrain/(?P<task>[^/]+)"), ("POST",), "retrain"),
    (re.compile(r"/admin/promote/(?P<task>[^/]+)/(?P<version>[^/]+)"), ("POST",), "promote"),
    (re.compile(r"/admin/rollback/(?P<task>[^/]+)"), ("POST",), "rollback"),
)


class OpsServer:
    """The ops HTTP server on a daemon thread; a context manager (see the module docstring).

    ``with OpsServer(config, probes, metrics, admin) as server: server.port``
    (``metrics``: the daemon's :class:`DaemonTelemetry`; ``/metrics`` serves its exposition)
    """

    def __init__(
        self,
        config: OpsConfig,
        probes: Mapping[str, Probe] | None = None,
        metrics: DaemonTelemetry | None = None,
        admin: AdminActions | None = None,
    ) -> None:
        self.config = config
        self._token = config.token
        self._probes = dict(probes or {})
        self._metrics = metrics or DaemonTelemetry()
        self._admin = admin
        self.log = get_logger("ops")
        self._httpd: BoundedServer | None = None
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        where = f"{self.config.host}:{self.port}" if self._httpd else "stopped"
        return f"OpsServer({where}, admin_token={'set' if self._token else 'unset'})"

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port (the chosen one when the config says 0)."""
        if self._httpd is None:
            raise RuntimeError("the ops server is not running")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    def start(self) -> OpsServer:
        if self._httpd is not None:
            raise RuntimeError("the ops server is already running")
        try:
            httpd = listen(
                self.config.host,
                self.config.port,
                self,
                max_connections=self.config.max_connections,
                request_timeout_s=self.config.request_timeout_s,
            )
        except OSError as exc:
            raise ConfigError(
                f"the ops HTTP server cannot listen on {self.config.host}:{self.config.port} "
                f"({exc.strerror or exc}); set DISTILLD_HTTP_HOST / DISTILLD_HTTP_PORT "
                "(port 0 picks a free one)"
            ) from None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(4, min(16, len(self._probes))), thread_name_prefix="ops-probe"
        )
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="ops-http", daemon=True
        )
        self._thread.start()
        self.log.info(
            "ops.started",
            host=self.config.host,
            port=self.port,
            admin_api="enabled" if self._token is not None else f"disabled (set {TOKEN_SETTINGS})",
            public_status=self.config.public_status,
            max_connections=self.config.max_connections,
            request_timeout_s=self.config.request_timeout_s,
            probes=sorted(self._probes),
        )
        return self

    def stop(self) -> None:
        """Stop accepting, close the socket; requests in progress are abandoned. Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.log.info("ops.stopped")

    def __enter__(self) -> OpsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ handling

    def handle(self, method: str, raw_path: str, authorization: str | None) -> Reply:
        """Answer one request, with the admin token masked wherever it would appear in the
        body (an action or an error echoing it); never raises."""
        reply = self._answer(method, raw_path, authorization)
        return reply._replace(body=mask_body(self._token, reply.body))

    def _answer(self, method: str, raw_path: str, authorization: str | None) -> Reply:
        try:
            return self._route(method, raw_path, authorization)
        except HttpError as exc:
            return json_reply(exc.status, {"error": self.scrub(exc.message)}, exc.headers)
        except NotFoundError as exc:
            return json_reply(404, {"error": self.scrub(str(exc))})
        except (ConfigError, PolicyError) as exc:
            return json_reply(400, {"error": self.scrub(str(exc))})
        except RegistryError as exc:
            return json_reply(409, {"error": self.scrub(str(exc))})
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            self.log.error(
                "ops.request_failed",
                method=method,
                path=self.scrub(urlsplit(raw_path).path),
                error_id=error_id,
                error=self.scrub(f"{type(exc).__name__}: {exc}"),
                exc_info=Scrubbed(exc, self.scrub),
            )
            return json_reply(
                500,
                {"error": "internal error; see the daemon log", "error_id": error_id},
            )

    def _route(self, method: str, raw_path: str, authorization: str | None) -> Reply:
        path = urlsplit(raw_path).path
        for pattern, methods, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method not in methods:
                allowed = ", ".join(methods)
                raise HttpError(
                    405, f"{method} is not allowed on {path}; use {allowed}", (("Allow", allowed),)
                )
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            if needs_token(name, public_status=self.config.public_status):
                authorize(self._token, authorization, status=name == "status", log=self.log)
            return self._dispatch(name, params)
        raise HttpError(404, f"no such endpoint: {path}")

    def _dispatch(self, name: str, params: dict[str, str]) -> Reply:
        if name == "healthz":
            return json_reply(200, {"status": "alive"})
        if name == "readyz":
            return self._readiness()
        if name == "metrics":
            return Reply(200, self._metrics.exposition(), METRICS_CONTENT_TYPE)
        admin = self._admin
        if admin is None:
            raise HttpError(404, "the admin API is not available in this process")
        if name == "status":
            return json_reply(200, admin.status())
        task = params["task"]
        if not re.fullmatch(NAME_PATTERN, task):
            raise NotFoundError(f"no task named {task!r} (task names match {NAME_PATTERN})")
        if name == "retrain":
            result = admin.retrain(task)
        elif name == "rollback":
            result = admin.rollback(task)
        else:
            version = params["version"]
            if not re.fullmatch(VERSION_PATTERN, version):
                raise HttpError(
                    400,
                    f"invalid version name {version!r}: letters, digits, '.', '_' and '-', "
                    "starting with a letter or digit, at most 64 characters",
                )
            result = admin.promote(task, version)
        self.log.info(
            "ops.admin_action", action=name, **{k: self.scrub(v) for k, v in params.items()}
        )
        return json_reply(200, result)

    def _readiness(self) -> Reply:
        executor = self._executor
        assert executor is not None
        futures = {name: executor.submit(probe) for name, probe in self._probes.items()}
        deadline = time.monotonic() + self.config.probe_timeout_s
        results: dict[str, dict[str, Any]] = {}
        for name in sorted(futures):
            results[name] = self._probe_result(name, futures[name], deadline)
        failing = {name: r["reason"] for name, r in results.items() if not r["ok"]}
        if failing:
            self.log.debug("ops.not_ready", failing=failing)
            return json_reply(503, {"status": "not ready", "failing": failing, "probes": results})
        return json_reply(200, {"status": "ready", "probes": results})

    def _probe_result(
        self, name: str, future: concurrent.futures.Future[bool | ProbeResult], deadline: float
    ) -> dict[str, Any]:
        try:
            outcome = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            return {
                "ok": False,
                "reason": f"no answer within {self.config.probe_timeout_s:g} s",
            }
        except DistilldError as exc:
            return {"ok": False, "reason": self.scrub(str(exc))}
        except Exception as exc:
            self.log.warning(
                "ops.probe_failed",
                probe=name,
                error=self.scrub(f"{type(exc).__name__}: {exc}"),
                exc_info=Scrubbed(exc, self.scrub),
            )
            return {"ok": False, "reason": f"the probe raised {type(exc).__name__} (see the log)"}
        if isinstance(outcome, ProbeResult):
            ok, reason = bool(outcome.ok), outcome.reason
        else:
            ok, reason = bool(outcome), ""
        if ok:
            return {"ok": True}
        return {"ok": False, "reason": self.scrub(reason) or "not ready"}

    def scrub(self, text: str) -> str:
        """``text`` with the admin token masked, in case anything ever echoes it."""
        return mask(self._token, text)
