"""The vLLM student client sends the server's API key and never shows it.

``KeyedServer`` is a stand-in, labelled so: a real HTTP server on a local socket
that, like vLLM started with ``--api-key``, refuses ``/v1`` requests without the
key. The real server's check was read in vLLM's source
(``entrypoints/serve/middleware/authenticate.py``: bearer token on every path
under /v1, /v2, /inference, /cohere); starting vLLM here costs minutes.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from distilld.errors import BackendError, BackendUnavailable
from distilld.policy.model import Policy
from distilld.serving.vllm import VllmStudent, VllmTarget
from distilld.settings import Settings
from distilld.students import vllm_deployment
from support.kafka import sentiment_task

KEY = "Qk7-student-key-0123456789"


class KeyedServer:
    """Answers /classify and /v1/load_lora_adapter; /v1 paths need the key; records headers."""

    def __init__(self, key: str) -> None:
        self.headers: list[dict[str, str]] = []
        self.fail_with: tuple[int, str] | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(length)
                server.headers.append(dict(self.headers))
                if server.fail_with is not None:
                    self._send(*server.fail_with)
                elif self.path.startswith("/v1") and (
                    self.headers.get("Authorization") != f"Bearer {key}"
                ):
                    self._send(401, json.dumps({"error": "Unauthorized"}))
                elif self.path == "/classify":
                    doc = {"data": [{"label": "fresh", "probs": [0.9, 0.1]}]}
                    self._send(200, json.dumps(doc))
                else:
                    self._send(200, "")

            def _send(self, status: int, body: str) -> None:
                payload = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def server() -> Iterator[KeyedServer]:
    keyed = KeyedServer(KEY)
    yield keyed
    keyed.close()


def _student(server: KeyedServer, api_key: str | None) -> VllmStudent:
    target = VllmTarget(
        base_url=server.base_url, model="student", kind="classify", labels=("fresh", "rotten")
    )
    return VllmStudent(target, model_version="v1", api_key=api_key)


def test_every_request_carries_the_key(server: KeyedServer) -> None:
    student = _student(server, KEY)
    try:
        assert student.predict(["a fine film"])[0].output == "fresh"
        student.load_adapter("v2", "/registry/versions/v2", "v2")
        assert student.model_version == "v2"
    finally:
        student.close()
    assert len(server.headers) == 2
    assert all(h.get("Authorization") == f"Bearer {KEY}" for h in server.headers)
    assert KEY not in repr(student.__dict__)


def test_without_the_key_a_lora_load_is_refused(server: KeyedServer) -> None:
    student = _student(server, None)
    try:
        with pytest.raises(BackendError, match="HTTP 401"):
            student.load_adapter("evil", "/tmp/evil", "evil")
        assert student.model_version == "v1"  # nothing switched
    finally:
        student.close()
    assert "Authorization" not in server.headers[-1]


def test_a_key_echoed_in_an_error_body_is_masked(server: KeyedServer) -> None:
    student = _student(server, KEY)
    try:
        for status, error in ((500, BackendUnavailable), (400, BackendError)):
            for offset in (0, 190, 195, 199, 290, 295):
                server.fail_with = (status, "x" * offset + KEY + "y" * 400)
                with pytest.raises(error) as caught:
                    student.predict(["a fine film"])
                assert KEY[:3] not in str(caught.value), (status, offset)
    finally:
        student.close()


# -- the daemon's wiring: a managed server gets a key of its own -----------------------

_KEYED_STAND_IN = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
name = args[args.index("--served-model-name") + 1]
key = os.environ.get("VLLM_API_KEY")

class Handler(BaseHTTPRequestHandler):
    def _answer(self, body):
        if key and self.path.startswith("/v1") and (
            self.headers.get("Authorization") != "Bearer " + key
        ):
            status, body = 401, {"error": "Unauthorized"}
        else:
            status = 200
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self._answer({"object": "list", "data": [{"id": name}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._answer({})

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def _keyed_stand_in_python(tmp_path: Path) -> Path:
    """An interpreter whose `-m vllm...` answers like a vLLM server started with a key."""
    script = tmp_path / "keyed_stand_in.py"
    script.write_text(_KEYED_STAND_IN)
    python = tmp_path / "fake-python"
    python.write_text(f'#!/usr/bin/env bash\nshift 2; exec {sys.executable} {script} "$@"\n')
    python.chmod(0o755)
    return python


def test_a_managed_server_gets_a_key_that_only_the_daemon_sends(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "student").mkdir(parents=True)
    policy = Policy.model_validate(
        {
            **sentiment_task("keyed"),
            "student": {
                "backend": "vllm",
                "model": "student",
                "architecture": "causal-lm",
                "vllm": {"start_timeout_s": 30},
            },
            "prompt": "fresh or rotten? {input}",
        }
    )
    settings = Settings(
        models_dir=models,
        state_dir=tmp_path / "state",
        vllm_python=_keyed_stand_in_python(tmp_path),
    )
    stop = threading.Event()
    with ExitStack() as stack:
        deployment = vllm_deployment(policy, settings, stack, stop, (models / "student", "student"))
        stack.callback(stop.set)
        server = deployment.server
        assert server is not None
        key = server.config.api_key
        assert key is not None and len(key) >= 32
        assert key not in repr(server.config)
        # The daemon's client sends it (the adapter load is answered) ...
        deployment.load_adapter("v2", tmp_path / "adapter", "v2")
        assert deployment.model_version == "v2"
        # ... and nobody else can load an adapter.
        refused = httpx.post(
            f"{server.base_url}/v1/load_lora_adapter",
            json={"lora_name": "evil", "lora_path": "/tmp/evil"},
            timeout=10,
        )
        assert refused.status_code == 401
