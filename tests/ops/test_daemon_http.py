"""The HTTP endpoints of a real running daemon (the session's Tansu broker, an
in-process MiniLM student): health, readiness, metrics filled from the daemon's
own counters, the admin API behind its token, and the token never in any output.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from distilld import __version__, lifecycle
from distilld.errors import ConfigError
from distilld.lifecycle import running_daemon
from distilld.settings import Settings
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.replay import read_topic, replay
from support.kafka import write_sentiment_policy
from support.logs import Event, named, rendered
from support.metrics import samples, value
from support.wait import wait_until

TOKEN = "adm-9c1e77-planted-token-b4f0"


@pytest.mark.slow
def test_a_running_daemon_serves_health_readiness_metrics_and_a_guarded_admin_api(
    tmp_path: Path,
    broker: EmbeddedBroker,
    minilm_sentiment_dir: Path,
    debug_logs: list[Event],
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = write_sentiment_policy(tmp_path, minilm_sentiment_dir)
    task = served.policy.task
    settings = served.settings(broker).model_copy(
        update={"http_port": 0, "admin_token": SecretStr(TOKEN)}
    )
    with running_daemon(settings, {task: served.policy}) as daemon:
        assert daemon.ops is not None
        url = daemon.ops.url
        assert url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
        assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
        assert daemon.wait_ready(60)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200, ready.text

        lines = [
            json.dumps({"id": f"r{i}", "task": task, "input": f"a fine film {i}"}).encode()
            for i in range(10)
        ]
        lines.append(b"{not json")
        replay(daemon.kafka, lines, served.policy.traffic.requests_topic)
        read_topic(
            daemon.kafka,
            served.policy.traffic.responses_topic,
            until=lambda rs: len({r.get("id") for r in rs}) >= 10,
            timeout_s=60,
        )
        metrics = httpx.get(f"{url}/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        scraped = samples(metrics.text)
        assert value(scraped, "distilld_requests_total", task=task) == 10
        assert value(scraped, "distilld_request_latency_seconds_count", task=task) == 10
        live = value(
            scraped, "distilld_live_version_info", task=task, version=minilm_sentiment_dir.name
        )
        assert live == 1
        assert value(scraped, "distilld_build_info", version=__version__) == 1
        assert any(name.startswith("process_") for name, _ in scraped)

        # Every request was polled: the consumer lag of the requests topic (measured
        # every few seconds by the loop) comes down to 0.
        requests_topic = served.policy.traffic.requests_topic

        def lag() -> list[float]:
            found = samples(httpx.get(f"{url}/metrics").text)
            return [
                v
                for (name, labels), v in found.items()
                if name == "distilld_consumer_lag_records"
                and dict(labels)["topic"] == requests_topic
            ]

        def caught_up() -> bool:
            measured = lag()
            return bool(measured) and all(v == 0 for v in measured)

        wait_until(caught_up, timeout=30, message=lambda: f"a consumer lag of 0, saw {lag()}")

        # The admin API, reading included, needs the token.
        assert httpx.get(f"{url}/admin/status").status_code == 401
        status = httpx.get(
            f"{url}/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}
        ).json()
        assert task in json.dumps(status)
        assert httpx.post(f"{url}/admin/retrain/{task}").status_code == 401
        wrong = httpx.post(f"{url}/admin/retrain/{task}", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = httpx.post(
            f"{url}/admin/retrain/{task}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert right.status_code == 400  # authorised, but this policy does not retrain
        assert "does not retrain" in right.json()["error"]
        unknown = httpx.post(
            f"{url}/admin/rollback/nope", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert unknown.status_code == 404
        shown = [right.text, wrong.text, unknown.text, str(status), repr(daemon.ops)]

    assert named(debug_logs, "ops.request")  # the requests were logged
    output = capsys.readouterr()  # whatever else wrote to the streams (stdlib logging)
    for text in [*shown, rendered(debug_logs), output.out, output.err]:
        assert TOKEN not in text


def test_a_short_admin_token_stops_the_start_before_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_kafka_connection(*_: object, **__: object) -> None:
        raise AssertionError("the broker was started despite the short admin token")

    monkeypatch.setattr(lifecycle, "kafka_connection", fake_kafka_connection)
    settings = Settings(
        state_dir=tmp_path / "state",
        policy_reload_s=0,
        admin_token=SecretStr("too-short-123"),
    )
    with pytest.raises(ConfigError, match="is 13 characters long; expected at least 16") as info:
        lifecycle.serve(settings, {}, threading.Event(), tmp_path)
    assert "too-short-123" not in str(info.value)
