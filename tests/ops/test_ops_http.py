"""The ops HTTP server, called over real HTTP on a free loopback port.

Probes, the metrics snapshot and the admin actions are stand-ins (``Fake*``,
``fake_*``): they record calls or raise the errors the real ones raise.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from distilld.errors import ConfigError, RegistryError, StoreError
from distilld.ops import (
    AdminActions,
    NotFoundError,
    OpsConfig,
    OpsServer,
    Probe,
    ProbeResult,
)
from distilld.telemetry.metrics import DaemonTelemetry, MetricsSnapshot, TaskMetrics
from support.logs import Event, named, rendered
from support.metrics import samples, value

TOKEN = "tok-3f9a1c-planted-secret-7d2e"


class FakeAdmin:
    """Stand-in for the app's admin actions: records calls; task ``broken`` and a few
    versions raise the errors the real registry and manager raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def status(self) -> Mapping[str, Any]:
        self.calls.append(("status",))
        return {"tasks": {"sentiment": {"live_version": "v0002"}}}

    def retrain(self, task: str) -> Mapping[str, Any]:
        self.calls.append(("retrain", task))
        self._check(task)
        if task == "no-retraining":
            raise ConfigError(f"task {task!r} does not retrain: its policy has no retraining")
        return {"task": task, "started": True}

    def promote(self, task: str, version: str) -> Mapping[str, Any]:
        self.calls.append(("promote", task, version))
        self._check(task)
        if version == "v0404":
            raise NotFoundError(f"version {version!r} is not in the registry of {task}")
        if version == "v0409":
            raise RegistryError("the registry stayed locked by another process for 60 s")
        if version == "v0500":
            raise RuntimeError("disk on fire at /secret/internal/path")
        return {"task": task, "live": version}

    def rollback(self, task: str) -> Mapping[str, Any]:
        self.calls.append(("rollback", task))
        self._check(task)
        return {"task": task, "live": "v0001"}

    @staticmethod
    def _check(task: str) -> None:
        if task not in ("sentiment", "no-retraining"):
            raise NotFoundError(f"no task named {task!r}")


def fake_collect() -> MetricsSnapshot:
    """Stand-in for the app's collector."""
    return MetricsSnapshot({"sentiment": TaskMetrics(requests=5, live_version="v0002")})


StartServer = Callable[..., OpsServer]


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10, trust_env=False) as client:
        yield client


@pytest.fixture
def start() -> Iterator[StartServer]:
    """Starts servers on port 0 and stops them after the test."""
    servers: list[OpsServer] = []

    def _start(
        token: str | SecretStr | None = TOKEN,
        probes: Mapping[str, Probe] | None = None,
        collect: Callable[[], MetricsSnapshot] = fake_collect,
        admin: AdminActions | None = None,
        **config: Any,
    ) -> OpsServer:
        server = OpsServer(
            OpsConfig(port=0, admin_token=token, **config),
            probes,
            DaemonTelemetry(collect),
            FakeAdmin() if admin is None else admin,
        )
        servers.append(server.start())
        return server

    yield _start
    for server in servers:
        server.stop()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------ health and readiness


def test_healthz_answers_alive(start: StartServer, http: httpx.Client) -> None:
    server = start()
    reply = http.get(f"{server.url}/healthz")
    assert reply.status_code == 200
    assert reply.json() == {"status": "alive"}
    assert reply.headers["content-type"] == "application/json"
    head = http.head(f"{server.url}/healthz")
    assert head.status_code == 200
    assert head.content == b""


def test_readyz_passes_when_every_probe_passes(start: StartServer, http: httpx.Client) -> None:
    server = start(probes={"broker": lambda: True, "student:sentiment": lambda: ProbeResult(True)})
    reply = http.get(f"{server.url}/readyz")
    assert reply.status_code == 200
    assert reply.json() == {
        "status": "ready",
        "probes": {"broker": {"ok": True}, "student:sentiment": {"ok": True}},
    }


def test_readyz_without_probes_is_ready(start: StartServer, http: httpx.Client) -> None:
    assert http.get(f"{start().url}/readyz").status_code == 200


def test_readyz_names_each_failing_probe_and_why(start: StartServer, http: httpx.Client) -> None:
    def fake_broker() -> ProbeResult:
        return ProbeResult(False, "consumer group distilld-sentiment has not joined yet")

    def fake_student_down() -> bool:
        raise StoreError("the vLLM server at http://127.0.0.1:9/ refused the connection")

    def fake_student_bug() -> bool:
        raise ZeroDivisionError("internal detail")

    server = start(
        probes={
            "broker": fake_broker,
            "student:sentiment": fake_student_down,
            "student:address": fake_student_bug,
            "student:other": lambda: False,
            "store": lambda: True,
        }
    )
    reply = http.get(f"{server.url}/readyz")
    assert reply.status_code == 503
    body = reply.json()
    assert body["status"] == "not ready"
    assert body["failing"] == {
        "broker": "consumer group distilld-sentiment has not joined yet",
        "student:sentiment": "the vLLM server at http://127.0.0.1:9/ refused the connection",
        "student:address": "the probe raised ZeroDivisionError (see the log)",
        "student:other": "not ready",
    }
    assert body["probes"]["store"] == {"ok": True}
    assert "internal detail" not in reply.text
    assert "Traceback" not in reply.text


def test_a_hanging_probe_fails_after_the_timeout(start: StartServer, http: httpx.Client) -> None:
    release = threading.Event()

    def fake_stuck_backend() -> bool:
        release.wait(10)
        return True

    server = start(probes={"student:slow": fake_stuck_backend}, probe_timeout_s=0.2)
    try:
        began = time.monotonic()
        reply = http.get(f"{server.url}/readyz")
        assert time.monotonic() - began < 3
        assert reply.status_code == 503
        assert reply.json()["failing"] == {"student:slow": "no answer within 0.2 s"}
        # the server keeps answering other requests meanwhile
        assert http.get(f"{server.url}/healthz").status_code == 200
    finally:
        release.set()


def test_readiness_follows_the_probes(start: StartServer, http: httpx.Client) -> None:
    joined = threading.Event()
    server = start(probes={"broker": joined.is_set})
    assert http.get(f"{server.url}/readyz").status_code == 503
    joined.set()
    assert http.get(f"{server.url}/readyz").status_code == 200


# ------------------------------------------------------------------ metrics


def test_metrics_are_the_registry_exposition_collected_at_each_scrape(
    start: StartServer, http: httpx.Client
) -> None:
    counter = {"n": 0}

    def fake_counting_collect() -> MetricsSnapshot:
        counter["n"] += 1
        return MetricsSnapshot({"sentiment": TaskMetrics(requests=counter["n"])})

    server = start(collect=fake_counting_collect)
    first = http.get(f"{server.url}/metrics")
    assert first.status_code == 200
    assert first.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert value(samples(first.text), "distilld_requests_total", task="sentiment") == 1
    second = http.get(f"{server.url}/metrics")
    assert value(samples(second.text), "distilld_requests_total", task="sentiment") == 2


def test_a_failing_collector_gives_a_json_500_without_traceback(
    start: StartServer, http: httpx.Client, debug_logs: list[Event]
) -> None:
    def fake_broken_collect() -> MetricsSnapshot:
        raise KeyError("stats of a loop that is gone")

    server = start(collect=fake_broken_collect)
    reply = http.get(f"{server.url}/metrics")
    assert reply.status_code == 500
    body = reply.json()
    assert body["error"] == "internal error; see the daemon log"
    assert "loop that is gone" not in reply.text
    assert "Traceback" not in reply.text
    (failed,) = named(debug_logs, "ops.request_failed")
    assert failed["error_id"] == body["error_id"]
    assert "Traceback" in failed["exception"]  # the log has it


# ------------------------------------------------------------------ admin API


def test_admin_status_is_the_actions_status_behind_the_token(
    start: StartServer, http: httpx.Client
) -> None:
    admin = FakeAdmin()
    server = start(admin=admin)
    for headers in ({}, bearer("wrong-token-of-some-length")):
        refused = http.get(f"{server.url}/admin/status", headers=headers)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert admin.calls == []  # nothing read for a client without the token
    reply = http.get(f"{server.url}/admin/status", headers=bearer())
    assert reply.status_code == 200
    assert reply.json() == {"tasks": {"sentiment": {"live_version": "v0002"}}}
    assert admin.calls == [("status",)]


def test_admin_status_is_open_only_when_made_public(start: StartServer, http: httpx.Client) -> None:
    public = start(public_status=True)
    assert http.get(f"{public.url}/admin/status").status_code == 200
    assert http.get(f"{public.url}/admin/status", headers=bearer()).status_code == 200
    # public status opens nothing else
    assert http.post(f"{public.url}/admin/rollback/sentiment").status_code == 401

    no_token = start(token=None)
    refused = http.get(f"{no_token.url}/admin/status")
    assert refused.status_code == 403
    assert "DISTILLD_ADMIN_TOKEN" in refused.json()["error"]
    assert "DISTILLD_HTTP_PUBLIC_STATUS=true" in refused.json()["error"]
    assert http.get(f"{start(token=None, public_status=True).url}/admin/status").status_code == 200


def test_health_readiness_and_metrics_stay_open(start: StartServer, http: httpx.Client) -> None:
    server = start()
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http.get(f"{server.url}{path}").status_code == 200, path


@pytest.mark.parametrize(
    ("path", "call", "result"),
    [
        (
            "/admin/retrain/sentiment",
            ("retrain", "sentiment"),
            {"task": "sentiment", "started": True},
        ),
        (
            "/admin/promote/sentiment/v0003",
            ("promote", "sentiment", "v0003"),
            {"task": "sentiment", "live": "v0003"},
        ),
        (
            "/admin/rollback/sentiment",
            ("rollback", "sentiment"),
            {"task": "sentiment", "live": "v0001"},
        ),
    ],
)
def test_admin_posts_with_the_right_token_call_the_actions(
    start: StartServer,
    http: httpx.Client,
    path: str,
    call: tuple[str, ...],
    result: dict[str, Any],
) -> None:
    admin = FakeAdmin()
    server = start(admin=admin)
    reply = http.post(f"{server.url}{path}", headers=bearer())
    assert reply.status_code == 200, reply.text
    assert reply.json() == result
    assert admin.calls == [call]


ADMIN_POSTS = [
    "/admin/retrain/sentiment",
    "/admin/promote/sentiment/v0003",
    "/admin/rollback/sentiment",
]


@pytest.mark.parametrize("path", ADMIN_POSTS)
def test_admin_posts_are_refused_when_no_token_is_configured(
    start: StartServer, http: httpx.Client, path: str
) -> None:
    admin = FakeAdmin()
    server = start(token=None, admin=admin)
    for headers in ({}, bearer(), bearer("other")):
        reply = http.post(f"{server.url}{path}", headers=headers)
        assert reply.status_code == 403
        assert "DISTILLD_ADMIN_TOKEN" in reply.json()["error"]
        assert "DISTILLD_ADMIN_TOKEN_FILE" in reply.json()["error"]
    assert admin.calls == []


@pytest.mark.parametrize("path", ADMIN_POSTS)
@pytest.mark.parametrize(
    ("headers", "invalid_token"),
    [
        ({}, False),
        ({"Authorization": "Bearer"}, False),
        ({"Authorization": f"Basic {TOKEN}"}, False),
        ({"Authorization": TOKEN}, False),
        (bearer("wrong-token"), True),
        (bearer(TOKEN[:-1]), True),
        (bearer(TOKEN + "x"), True),
        (bearer(TOKEN.upper()), True),
    ],
)
def test_admin_posts_with_a_missing_or_wrong_token_get_401(
    start: StartServer,
    http: httpx.Client,
    path: str,
    headers: dict[str, str],
    invalid_token: bool,
) -> None:
    admin = FakeAdmin()
    server = start(admin=admin)
    reply = http.post(f"{server.url}{path}", headers=headers)
    assert reply.status_code == 401
    challenge = reply.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    assert ('error="invalid_token"' in challenge) is invalid_token
    assert "error" in reply.json()
    assert admin.calls == []


def test_the_bearer_scheme_is_case_insensitive(start: StartServer, http: httpx.Client) -> None:
    server = start(token=SecretStr(TOKEN))
    reply = http.post(
        f"{server.url}/admin/rollback/sentiment", headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert reply.status_code == 200


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/admin/retrain/unknown-task", 404, "no task named 'unknown-task'"),
        ("/admin/rollback/unknown-task", 404, "no task named 'unknown-task'"),
        ("/admin/promote/unknown-task/v0001", 404, "no task named 'unknown-task'"),
        ("/admin/promote/sentiment/v0404", 404, "not in the registry"),
        ("/admin/retrain/Not%20A%20Task", 404, "no task named 'Not A Task'"),
        ("/admin/promote/sentiment/-v1", 400, "invalid version name"),
        ("/admin/promote/sentiment/v%2F1", 400, "invalid version name 'v/1'"),
        ("/admin/promote/sentiment/%2E%2E", 400, "invalid version name '..'"),
        ("/admin/retrain/no-retraining", 400, "does not retrain"),
        ("/admin/promote/sentiment/v0409", 409, "stayed locked"),
    ],
)
def test_admin_errors_map_to_statuses_with_the_message(
    start: StartServer, http: httpx.Client, path: str, status: int, message: str
) -> None:
    server = start()
    reply = http.post(f"{server.url}{path}", headers=bearer())
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]


def test_an_unexpected_admin_failure_is_a_500_without_details(
    start: StartServer, http: httpx.Client
) -> None:
    server = start()
    reply = http.post(f"{server.url}/admin/promote/sentiment/v0500", headers=bearer())
    assert reply.status_code == 500
    assert set(reply.json()) == {"error", "error_id"}
    assert "disk on fire" not in reply.text
    assert "/secret/internal/path" not in reply.text


def test_without_admin_actions_the_admin_api_is_404(http: httpx.Client) -> None:
    with OpsServer(
        OpsConfig(port=0, admin_token=TOKEN), metrics=DaemonTelemetry(fake_collect)
    ) as server:
        assert http.get(f"{server.url}/admin/status", headers=bearer()).status_code == 404
        reply = http.post(f"{server.url}/admin/rollback/sentiment", headers=bearer())
        assert reply.status_code == 404
        # auth still comes first
        assert http.post(f"{server.url}/admin/rollback/sentiment").status_code == 401


def test_request_bodies_are_read_and_large_ones_refused(
    start: StartServer, http: httpx.Client
) -> None:
    server = start()
    ok = http.post(
        f"{server.url}/admin/retrain/sentiment", headers=bearer(), json={"why": "manual"}
    )
    assert ok.status_code == 200
    big = http.post(
        f"{server.url}/admin/retrain/sentiment", headers=bearer(), content=b"x" * 100_000
    )
    assert big.status_code == 413


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize(
    "path", ["/", "/health", "/healthz/", "/metrics/x", "/admin", "/admin/retrain", "/admin/x"]
)
def test_unknown_paths_are_404(start: StartServer, http: httpx.Client, path: str) -> None:
    server = start()
    for method in ("GET", "POST"):
        reply = http.request(method, f"{server.url}{path}", headers=bearer())
        assert reply.status_code == 404
        assert reply.json()["error"].startswith("no such endpoint")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/readyz", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("POST", "/admin/status", "GET, HEAD"),
        ("GET", "/admin/retrain/sentiment", "POST"),
        ("GET", "/admin/promote/sentiment/v0003", "POST"),
        ("DELETE", "/admin/rollback/sentiment", "POST"),
        ("PATCH", "/admin/rollback/sentiment", "POST"),
    ],
)
def test_wrong_methods_are_405_with_allow(
    start: StartServer, http: httpx.Client, method: str, path: str, allow: str
) -> None:
    admin = FakeAdmin()
    server = start(admin=admin)
    reply = http.request(method, f"{server.url}{path}", headers=bearer())
    assert reply.status_code == 405
    assert reply.headers["allow"] == allow
    assert "not allowed" in reply.json()["error"]
    assert admin.calls == []


def test_an_unknown_method_gets_a_json_501(start: StartServer, http: httpx.Client) -> None:
    reply = http.request("BREW", f"{start().url}/healthz")
    assert reply.status_code == 501
    assert "error" in reply.json()


def test_a_query_string_does_not_change_the_route(start: StartServer, http: httpx.Client) -> None:
    assert http.get(f"{start().url}/healthz?verbose=1").status_code == 200


# ------------------------------------------------------------------ the token never leaks


def test_the_token_never_appears_in_logs_bodies_headers_or_reprs(
    start: StartServer,
    http: httpx.Client,
    debug_logs: list[Event],
    capsys: pytest.CaptureFixture[str],
) -> None:
    class FakeEchoingAdmin(FakeAdmin):
        """Stand-in whose errors echo the token, as a careless action might."""

        def rollback(self, task: str) -> Mapping[str, Any]:
            raise RegistryError(f"refused; header was Bearer {TOKEN}")

        def retrain(self, task: str) -> Mapping[str, Any]:
            raise RuntimeError(f"boom {TOKEN}")

    def fake_leaky_probe() -> bool:
        raise ConfigError(f"probe saw {TOKEN}")

    def fake_leaky_probe_bug() -> bool:
        raise ValueError(f"probe bug {TOKEN}")

    config = OpsConfig(port=0, admin_token=TOKEN)
    server = start(
        token=TOKEN,
        admin=FakeEchoingAdmin(),
        probes={"a": fake_leaky_probe, "b": fake_leaky_probe_bug},
    )
    replies = [
        http.get(f"{server.url}/healthz"),
        http.get(f"{server.url}/readyz"),
        http.get(f"{server.url}/metrics"),
        http.get(f"{server.url}/admin/status", headers=bearer()),
        http.get(f"{server.url}/admin/status", headers=bearer("wrong")),  # 401
        http.post(f"{server.url}/admin/promote/sentiment/v0003", headers=bearer()),  # ok
        http.post(f"{server.url}/admin/rollback/sentiment", headers=bearer()),  # 409
        http.post(f"{server.url}/admin/retrain/sentiment", headers=bearer()),  # 500
        http.post(f"{server.url}/admin/retrain/sentiment", headers=bearer("wrong")),  # 401
        http.post(f"{server.url}/admin/retrain/sentiment"),  # 401
        http.get(f"{server.url}/admin/retrain/sentiment", headers=bearer()),  # 405
        http.post(f"{server.url}/admin/nope/{TOKEN}", headers=bearer()),  # 404 path
        http.post(f"{server.url}/admin/retrain/{TOKEN}", headers=bearer()),  # 500, as a task
        http.post(f"{server.url}/admin/promote/sentiment/{TOKEN}", headers=bearer()),  # 200
    ]
    assert [r.status_code for r in replies] == [
        200, 503, 200, 200, 401, 200, 409, 500, 401, 401, 405, 404, 500, 200,
    ]  # fmt: skip
    for reply in replies:
        assert TOKEN not in reply.text
        assert all(TOKEN not in value for value in reply.headers.values())
    assert "**********" in replies[6].text  # the echoed token was masked
    assert TOKEN not in repr(config)
    assert TOKEN not in str(config)
    assert TOKEN not in repr(server)
    assert TOKEN not in repr(config.token)
    server.stop()
    assert named(debug_logs, "ops.request")  # debug request logs were written
    assert named(debug_logs, "ops.request_failed")
    assert named(debug_logs, "ops.admin_unauthorized")
    assert TOKEN not in rendered(debug_logs)
    captured = capsys.readouterr()  # whatever else wrote to the streams (stdlib logging)
    assert TOKEN not in captured.out
    assert TOKEN not in captured.err


# ------------------------------------------------------------------ config and lifecycle


def test_config_defaults_bind_to_loopback() -> None:
    config = OpsConfig()
    assert (config.host, config.port, config.token) == ("127.0.0.1", 8080, None)
    assert (config.public_status, config.max_connections, config.request_timeout_s) == (
        False,
        32,
        10.0,
    )


def test_a_plain_string_token_becomes_a_secret() -> None:
    config = OpsConfig(admin_token=TOKEN)
    assert isinstance(config.admin_token, SecretStr)
    assert config.token is not None and config.token.get_secret_value() == TOKEN


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"admin_token": ""}, "admin token is empty"),
        ({"admin_token": SecretStr("  \n")}, "admin token is empty"),
        ({"port": 70000}, "DISTILLD_HTTP_PORT"),
        ({"port": -1}, "DISTILLD_HTTP_PORT"),
        ({"probe_timeout_s": 0}, "probe_timeout_s"),
        ({"max_connections": 0}, "DISTILLD_HTTP_MAX_CONNECTIONS"),
        ({"request_timeout_s": 0}, "DISTILLD_HTTP_REQUEST_TIMEOUT_S"),
    ],
)
def test_invalid_config_is_a_config_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OpsConfig(**kwargs)


def test_port_zero_binds_a_free_loopback_port_and_stop_closes_it(http: httpx.Client) -> None:
    server = OpsServer(OpsConfig(port=0))
    with pytest.raises(RuntimeError):
        _ = server.port
    with server:
        port = server.port
        assert port > 0
        assert server.url == f"http://127.0.0.1:{port}"
        assert http.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        # the metrics of a server without a collector: HELP and TYPE only
        assert http.get(f"{server.url}/metrics").status_code == 200
    with pytest.raises(httpx.ConnectError):
        http.get(f"http://127.0.0.1:{port}/healthz")
    assert not any(t.name == "ops-http" and t.is_alive() for t in threading.enumerate())
    server.stop()  # idempotent


def test_a_taken_port_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="DISTILLD_HTTP_PORT"):
            OpsServer(OpsConfig(port=port)).start()


def test_requests_are_served_concurrently(start: StartServer, http: httpx.Client) -> None:
    entered = threading.Event()
    release = threading.Event()

    def fake_slow_status_admin_probe() -> bool:
        entered.set()
        release.wait(5)
        return True

    server = start(probes={"slow": fake_slow_status_admin_probe}, probe_timeout_s=5)
    results: list[int] = []
    worker = threading.Thread(
        target=lambda: results.append(http.get(f"{server.url}/readyz").status_code)
    )
    worker.start()
    try:
        assert entered.wait(5)
        assert http.get(f"{server.url}/healthz").status_code == 200
    finally:
        release.set()
        worker.join(5)
    assert results == [200]


# ------------------------------------------------------------------ slow and many clients


def closed_by_server(client: socket.socket, wait_s: float) -> bool:
    """Whether the server closed ``client`` within ``wait_s`` (end of stream or reset)."""
    readable, _, _ = select.select([client], [], [], wait_s)
    if not readable:
        return False
    try:
        return client.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_a_client_sending_one_byte_at_a_time_is_cut_off_at_the_request_deadline(
    start: StartServer,
) -> None:
    # Each byte comes well within the deadline: only a deadline for the whole
    # request (not one per read) can end this connection.
    server = start(request_timeout_s=1.0)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 10_000
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
        give_up = time.monotonic() + 30
        sent = 0
        closed = False
        while not closed and time.monotonic() < give_up:
            try:
                client.sendall(request[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sent += 1
            closed = closed_by_server(client, 0.2)
        assert closed, f"still connected after sending {sent} bytes one at a time"
        assert sent < len(request)
    assert httpx.get(f"{server.url}/healthz", trust_env=False).status_code == 200


def test_an_idle_connection_is_closed_at_the_request_deadline(start: StartServer) -> None:
    server = start(request_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
        assert closed_by_server(client, 30)


def test_connections_over_the_cap_get_503_at_once_and_the_server_recovers(
    start: StartServer,
) -> None:
    cap = 3
    server = start(max_connections=cap)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(cap)]
    try:
        # Accepted in order: these hold every slot, sending nothing.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            reply = b""
            while chunk := extra.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.0 503 "), reply
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"Retry-After: 1" in head
        assert "DISTILLD_HTTP_MAX_CONNECTIONS" in json.loads(body)["error"]
    finally:
        for client in idle:
            client.close()
    # Once the idle connections are gone, their slots are free again.
    give_up = time.monotonic() + 30
    status = 0
    with httpx.Client(timeout=5, trust_env=False) as http:
        while status != 200 and time.monotonic() < give_up:
            status = http.get(f"{server.url}/healthz").status_code
    assert status == 200
    # and many sequential connections never leak a slot
    with httpx.Client(
        timeout=5, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)
    ) as http:
        assert all(http.get(f"{server.url}/healthz").status_code == 200 for _ in range(3 * cap))
