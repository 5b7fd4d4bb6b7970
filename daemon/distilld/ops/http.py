"""The operations HTTP server: health, readiness, Prometheus metrics and an admin API.

Standard library only (:class:`http.server.ThreadingHTTPServer` on a daemon
thread). Endpoints:

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
needs ``Authorization: Bearer <token>`` (compared in constant time). Without a
configured token these are refused (403) with a message saying how to set one;
a missing or wrong token gets 401 with ``WWW-Authenticate: Bearer``. The token
never appears in a log line, a response or a repr. Health, readiness and metrics
are open (container health checks and Prometheus scrape them).

Slow or many clients cannot hold the server: at most ``max_connections``
connections are served at once (one more is answered 503 and closed at once,
never queued), and a client has ``request_timeout_s`` from the moment its
connection is accepted to send its whole request (a client sending one byte at a
time is cut off then, not after a timeout per read); writing the reply gets what
is left of that time, at least one second.

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
import hmac
import io
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from distilld.errors import ConfigError, DistilldError, PolicyError, RegistryError
from distilld.log import get_logger
from distilld.policy.model import NAME_PATTERN
from distilld.registry import VERSION_PATTERN
from distilld.telemetry.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from distilld.telemetry.metrics import DaemonTelemetry

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "AdminActions",
    "NotFoundError",
    "OpsConfig",
    "OpsServer",
    "Probe",
    "ProbeResult",
]

TOKEN_SETTINGS = "DISTILLD_ADMIN_TOKEN or DISTILLD_ADMIN_TOKEN_FILE"
PUBLIC_STATUS_SETTING = "DISTILLD_HTTP_PUBLIC_STATUS"
_REDACTED = "**********"
_MAX_BODY_BYTES = 64 * 1024
#: Writing a reply gets what is left of the request deadline, at least this long.
_MIN_WRITE_S = 1.0
#: Refused connections are logged at most this often (with their count).
_REFUSALS_LOG_EVERY_S = 10.0


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


class _Reply(NamedTuple):
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class _HttpError(Exception):
    def __init__(
        self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


_GET = ("GET", "HEAD")
#: Routes that always need the admin token; ``status`` needs it unless public_status.
_ADMIN_ACTIONS = frozenset({"retrain", "promote", "rollback"})
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
        self._log = get_logger("ops")
        self._httpd: ThreadingHTTPServer | None = None
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
        handler = type("_BoundHandler", (_Handler,), {"ops": self})
        server_class = _IPv6Server if ":" in self.config.host else _Server
        try:
            httpd = server_class(
                (self.config.host, self.config.port),
                handler,
                self.config.max_connections,
                self._log,
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
        self._log.info(
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
        self._log.info("ops.stopped")

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

    def handle(self, method: str, raw_path: str, authorization: str | None) -> _Reply:
        """Answer one request, with the admin token masked wherever it would appear in the
        body (an action or an error echoing it); never raises."""
        reply = self._answer(method, raw_path, authorization)
        if self._token is None:
            return reply
        body = reply.body
        secret = self._token.get_secret_value()
        for form in {secret, json.dumps(secret, ensure_ascii=False)[1:-1]}:
            body = body.replace(form.encode("utf-8"), _REDACTED.encode("ascii"))
        return reply._replace(body=body)

    def _answer(self, method: str, raw_path: str, authorization: str | None) -> _Reply:
        try:
            return self._route(method, raw_path, authorization)
        except _HttpError as exc:
            return _json(exc.status, {"error": self._scrub(exc.message)}, exc.headers)
        except NotFoundError as exc:
            return _json(404, {"error": self._scrub(str(exc))})
        except (ConfigError, PolicyError) as exc:
            return _json(400, {"error": self._scrub(str(exc))})
        except RegistryError as exc:
            return _json(409, {"error": self._scrub(str(exc))})
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            self._log.error(
                "ops.request_failed",
                method=method,
                path=self._scrub(urlsplit(raw_path).path),
                error_id=error_id,
                error=self._scrub(f"{type(exc).__name__}: {exc}"),
                exc_info=_Scrubbed(exc, self._scrub),
            )
            return _json(
                500,
                {"error": "internal error; see the daemon log", "error_id": error_id},
            )

    def _route(self, method: str, raw_path: str, authorization: str | None) -> _Reply:
        path = urlsplit(raw_path).path
        for pattern, methods, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method not in methods:
                allowed = ", ".join(methods)
                raise _HttpError(
                    405, f"{method} is not allowed on {path}; use {allowed}", (("Allow", allowed),)
                )
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            if needs_token(name, public_status=self.config.public_status):
                self._authorize(authorization, status=name == "status")
            return self._dispatch(name, params)
        raise _HttpError(404, f"no such endpoint: {path}")

    def _dispatch(self, name: str, params: dict[str, str]) -> _Reply:
        if name == "healthz":
            return _json(200, {"status": "alive"})
        if name == "readyz":
            return self._readiness()
        if name == "metrics":
            return _Reply(200, self._metrics.exposition(), METRICS_CONTENT_TYPE)
        admin = self._admin
        if admin is None:
            raise _HttpError(404, "the admin API is not available in this process")
        if name == "status":
            return _json(200, admin.status())
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
                raise _HttpError(
                    400,
                    f"invalid version name {version!r}: letters, digits, '.', '_' and '-', "
                    "starting with a letter or digit, at most 64 characters",
                )
            result = admin.promote(task, version)
        self._log.info(
            "ops.admin_action", action=name, **{k: self._scrub(v) for k, v in params.items()}
        )
        return _json(200, result)

    def _authorize(self, authorization: str | None, *, status: bool = False) -> None:
        if self._token is None:
            raise _HttpError(
                403,
                f"the admin API is disabled: no admin token is configured; set {TOKEN_SETTINGS} "
                "and send it as 'Authorization: Bearer <token>'"
                + (
                    f" (or set {PUBLIC_STATUS_SETTING}=true to read the status without a token)"
                    if status
                    else ""
                ),
            )
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if not authorization or scheme.lower() != "bearer" or not credentials.strip():
            self._log.warning("ops.admin_unauthorized", why="no bearer token")
            raise _HttpError(
                401,
                "this endpoint needs 'Authorization: Bearer <token>' (the admin token)",
                (("WWW-Authenticate", 'Bearer realm="distilld"'),),
            )
        # Headers arrive decoded as latin-1: encoding back gives the bytes sent.
        sent = credentials.strip().encode("latin-1", errors="replace")
        expected = self._token.get_secret_value().encode("utf-8")
        if not hmac.compare_digest(sent, expected):
            self._log.warning("ops.admin_unauthorized", why="wrong token")
            raise _HttpError(
                401,
                "the admin token is wrong",
                (("WWW-Authenticate", 'Bearer realm="distilld", error="invalid_token"'),),
            )

    def _readiness(self) -> _Reply:
        executor = self._executor
        assert executor is not None
        futures = {name: executor.submit(probe) for name, probe in self._probes.items()}
        deadline = time.monotonic() + self.config.probe_timeout_s
        results: dict[str, dict[str, Any]] = {}
        for name in sorted(futures):
            results[name] = self._probe_result(name, futures[name], deadline)
        failing = {name: r["reason"] for name, r in results.items() if not r["ok"]}
        if failing:
            self._log.debug("ops.not_ready", failing=failing)
            return _json(503, {"status": "not ready", "failing": failing, "probes": results})
        return _json(200, {"status": "ready", "probes": results})

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
            return {"ok": False, "reason": self._scrub(str(exc))}
        except Exception as exc:
            self._log.warning(
                "ops.probe_failed",
                probe=name,
                error=self._scrub(f"{type(exc).__name__}: {exc}"),
                exc_info=_Scrubbed(exc, self._scrub),
            )
            return {"ok": False, "reason": f"the probe raised {type(exc).__name__} (see the log)"}
        if isinstance(outcome, ProbeResult):
            ok, reason = bool(outcome.ok), outcome.reason
        else:
            ok, reason = bool(outcome), ""
        if ok:
            return {"ok": True}
        return {"ok": False, "reason": self._scrub(reason) or "not ready"}

    def _scrub(self, text: str) -> str:
        """``text`` with the admin token masked, in case anything ever echoes it."""
        if self._token is None:
            return text
        secret = self._token.get_secret_value()
        return text.replace(secret, _REDACTED) if secret else text


def needs_token(route: str, *, public_status: bool) -> bool:
    """Whether a route needs the admin token: the admin actions always, the admin
    status unless it was made public; health, readiness and metrics never."""
    return route in _ADMIN_ACTIONS or (route == "status" and not public_status)


class _Scrubbed(Exception):
    """Carries an exception's traceback into the log with the token masked in messages.

    structlog's ``format_exc_info`` renders ``exc_info`` given as an exception
    instance; passing this wrapper keeps the frames but not the raw message."""

    def __init__(self, original: BaseException, scrub: Callable[[str], str]) -> None:
        super().__init__(scrub(f"{type(original).__name__}: {original}"))
        self.__traceback__ = original.__traceback__


def _busy_reply(max_connections: int) -> bytes:
    """The whole HTTP answer to a connection over the cap."""
    body = _json(
        503,
        {
            "error": f"the server is busy: it serves at most {max_connections} connections "
            "at once (DISTILLD_HTTP_MAX_CONNECTIONS); retry later"
        },
    ).body
    head = (
        "HTTP/1.0 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _DeadlineSocket(io.RawIOBase):
    """A connection's socket, read and written against one deadline (``time.monotonic``).

    Each read waits at most until the deadline, so a client that sends one byte at a
    time is cut off at the deadline (TimeoutError), not after a timeout per read.
    A write waits what is left, at least ``_MIN_WRITE_S``."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)

    def write(self, data: ReadableBuffer, /) -> int:
        self._sock.settimeout(max(self._deadline - time.monotonic(), _MIN_WRITE_S))
        self._sock.sendall(data)
        return memoryview(data).nbytes


def _json(
    status: int, payload: Mapping[str, Any], headers: tuple[tuple[str, str], ...] = ()
) -> _Reply:
    body = json.dumps(dict(payload), default=str, ensure_ascii=False).encode("utf-8") + b"\n"
    return _Reply(status, body, "application/json", headers)


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once: one more is
    answered 503 and closed by the accepting thread, never queued."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        log: Any,
    ) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        self._log = log
        self._refused = 0
        self._refused_logged_at = -_REFUSALS_LOG_EVERY_S
        self._busy_reply = _busy_reply(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """503 and close, without waiting on the client (the socket is non-blocking)."""
        try:
            request.setblocking(False)
            request.send(self._busy_reply)
            request.shutdown(socket.SHUT_WR)
            # Read what the client already sent: closing with unread data would reset
            # the connection before the client reads the 503.
            request.recv(_MAX_BODY_BYTES)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= _REFUSALS_LOG_EVERY_S:
            self._log.warning(
                "ops.connections_full",
                refused=self._refused,
                max_connections=self._max_connections,
                setting="DISTILLD_HTTP_MAX_CONNECTIONS",
            )
            self._refused, self._refused_logged_at = 0, now


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to :meth:`OpsServer.handle`; writes JSON errors itself."""

    ops: OpsServer  # set on the subclass made by OpsServer.start
    server_version = "distilld"
    sys_version = ""

    def setup(self) -> None:
        """The request deadline counts from now: the thread starts as the connection is
        accepted (see :class:`_DeadlineSocket`)."""
        self.connection = self.request
        deadline = time.monotonic() + self.ops.config.request_timeout_s
        connection = _DeadlineSocket(self.connection, deadline)
        self.rfile = io.BufferedReader(connection)
        self.wfile = io.BufferedWriter(connection)  # flushed by the base class

    def _serve(self) -> None:
        started = time.monotonic()
        try:
            self._drain_body()
            reply = self.ops.handle(self.command, self.path, self.headers.get("Authorization"))
        except _HttpError as exc:
            reply = _json(exc.status, {"error": exc.message})
        self._write(reply)
        self.ops._log.debug(
            "ops.request",
            method=self.command,
            path=self.ops._scrub(urlsplit(self.path).path),
            status=reply.status,
            ms=round((time.monotonic() - started) * 1000, 2),
            client=self.client_address[0],
        )

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def _drain_body(self) -> None:
        length = self.headers.get("Content-Length")
        if not length:
            return
        try:
            size = int(length)
        except ValueError:
            raise _HttpError(400, "Content-Length is not a number") from None
        if size < 0:
            raise _HttpError(400, "Content-Length is negative")
        if size > _MAX_BODY_BYTES:
            self.close_connection = True
            raise _HttpError(413, f"request bodies are limited to {_MAX_BODY_BYTES} bytes")
        self.rfile.read(size)

    def _write(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests and unknown methods: a JSON error instead of an HTML page."""
        self.close_connection = True
        self.ops._log.debug(
            "ops.request_rejected", status=code, reason=self.ops._scrub(message or "")
        )
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        body = _json(code, {"error": message or phrase}).body
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # logged by _serve, with the fields we choose

    def log_message(self, format: str, *args: Any) -> None:
        self.ops._log.debug("ops.http_message", message=self.ops._scrub(format % args))
