"""The HTTP mechanics of the ops server: a bounded threading server, one deadline per
request, a body limit, JSON errors. Standard library only; what a request means is
the :class:`Responder`'s business (:class:`distilld.ops.http.OpsServer`).

Slow or many clients cannot hold the server: at most ``max_connections``
connections are served at once (one more is answered 503 and closed at once,
never queued), and a client has ``request_timeout_s`` from the moment its
connection is accepted to send its whole request (a client sending one byte at a
time is cut off then, not after a timeout per read); writing the reply gets what
is left of that time, at least one second. A request body over
:data:`MAX_BODY_BYTES` is refused (413).
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

MAX_BODY_BYTES = 64 * 1024
#: Writing a reply gets what is left of the request deadline, at least this long.
_MIN_WRITE_S = 1.0
#: Refused connections are logged at most this often (with their count).
_REFUSALS_LOG_EVERY_S = 10.0


class Reply(NamedTuple):
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class HttpError(Exception):
    """A request answered with ``status`` and ``{"error": message}``."""

    def __init__(
        self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def json_reply(
    status: int, payload: Mapping[str, Any], headers: tuple[tuple[str, str], ...] = ()
) -> Reply:
    body = json.dumps(dict(payload), default=str, ensure_ascii=False).encode("utf-8") + b"\n"
    return Reply(status, body, "application/json", headers)


class Responder(Protocol):
    """What answers the requests the server reads."""

    log: Any

    def handle(self, method: str, raw_path: str, authorization: str | None) -> Reply:
        """Answer one request; never raises."""
        ...

    def scrub(self, text: str) -> str:
        """``text`` with any secret masked, before it reaches a log line."""
        ...


def listen(
    host: str,
    port: int,
    responder: Responder,
    *,
    max_connections: int,
    request_timeout_s: float,
) -> BoundedServer:
    """A bound server whose requests ``responder`` answers (not serving yet: call
    ``serve_forever``). Raises OSError when the address cannot be bound."""
    handler = type(
        "_BoundHandler",
        (RequestHandler,),
        {"responder": responder, "request_timeout_s": request_timeout_s},
    )
    server_class = _IPv6Server if ":" in host else BoundedServer
    return server_class((host, port), handler, max_connections, responder.log)


def _busy_reply(max_connections: int) -> bytes:
    """The whole HTTP answer to a connection over the cap."""
    body = json_reply(
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


class BoundedServer(ThreadingHTTPServer):
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
            request.recv(MAX_BODY_BYTES)
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


class _IPv6Server(BoundedServer):
    address_family = socket.AF_INET6


class RequestHandler(BaseHTTPRequestHandler):
    """Hands every request to its :class:`Responder`; writes JSON errors itself."""

    responder: Responder  # set on the subclass made by listen()
    request_timeout_s: float
    server_version = "distilld"
    sys_version = ""

    def setup(self) -> None:
        """The request deadline counts from now: the thread starts as the connection is
        accepted (see :class:`_DeadlineSocket`)."""
        self.connection = self.request
        deadline = time.monotonic() + self.request_timeout_s
        connection = _DeadlineSocket(self.connection, deadline)
        self.rfile = io.BufferedReader(connection)
        self.wfile = io.BufferedWriter(connection)  # flushed by the base class

    def _serve(self) -> None:
        started = time.monotonic()
        try:
            self._drain_body()
            reply = self.responder.handle(
                self.command, self.path, self.headers.get("Authorization")
            )
        except HttpError as exc:
            reply = json_reply(exc.status, {"error": exc.message})
        self._write(reply)
        self.responder.log.debug(
            "ops.request",
            method=self.command,
            path=self.responder.scrub(urlsplit(self.path).path),
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
            raise HttpError(400, "Content-Length is not a number") from None
        if size < 0:
            raise HttpError(400, "Content-Length is negative")
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            raise HttpError(413, f"request bodies are limited to {MAX_BODY_BYTES} bytes")
        self.rfile.read(size)

    def _write(self, reply: Reply) -> None:
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
        self.responder.log.debug(
            "ops.request_rejected", status=code, reason=self.responder.scrub(message or "")
        )
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        body = json_reply(code, {"error": message or phrase}).body
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
        self.responder.log.debug("ops.http_message", message=self.responder.scrub(format % args))
