"""Settings: read from DISTILLD_* variables into a frozen object; clear ConfigErrors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from distilld.errors import ConfigError
from distilld.settings import KafkaConfig, Settings, load_settings

SECRET = "s3cr3t-hunter2"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test without any DISTILLD_* variable from the outer environment."""
    for name in list(os.environ):
        if name.upper().startswith("DISTILLD_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.kafka_bootstrap_servers is None
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert settings.kafka_sasl_mechanism is None
    assert settings.kafka_sasl_username is None
    assert settings.kafka_sasl_password is None
    assert settings.kafka_ssl_cafile is None
    assert settings.kafka_client_id == "distilld"
    assert settings.kafka_session_timeout_ms == 10_000
    assert settings.kafka_max_message_bytes == 1_000_000
    assert settings.policies_dir == Path("policies")
    assert settings.models_dir == Path("models")
    assert settings.state_dir == Path("var")
    assert settings.tansu_binary is None
    assert settings.commit_interval_ms == 0
    assert settings.fallback_dead_letter_topic == "distilld.dead-letter"
    assert settings.log_level == "INFO"
    assert settings.log_format == "json"


def test_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("DISTILLD_KAFKA_SESSION_TIMEOUT_MS", "30000")
    monkeypatch.setenv("DISTILLD_POLICIES_DIR", "/etc/distilld/policies")
    monkeypatch.setenv("DISTILLD_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("DISTILLD_COMMIT_INTERVAL_MS", "500")
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "k1:9092,k2:9092"
    assert settings.kafka_session_timeout_ms == 30_000
    assert settings.policies_dir == Path("/etc/distilld/policies")
    assert settings.log_level == "DEBUG"
    assert settings.commit_interval_ms == 500


def test_env_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("distilld_kafka_client_id", "lower-case")
    assert load_settings().kafka_client_id == "lower-case"


def test_unprefixed_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "elsewhere:9092")
    monkeypatch.setenv("LOG_LEVEL", "ERROR")
    settings = load_settings()
    assert settings.kafka_bootstrap_servers is None
    assert settings.log_level == "INFO"


def test_unknown_prefixed_variable_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_NOT_A_SETTING", "x")
    assert load_settings().kafka_client_id == "distilld"


def test_overrides_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_CLIENT_ID", "from-env")
    assert load_settings(kafka_client_id="from-arg").kafka_client_id == "from-arg"


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.kafka_client_id = "changed"  # type: ignore[misc]
    assert settings.kafka_client_id == "distilld"


def test_kafka_config_is_frozen() -> None:
    config = load_settings().kafka("k:9092")
    with pytest.raises(AttributeError):
        config.client_id = "changed"  # type: ignore[misc]


def test_kafka_without_bootstrap_servers_raises() -> None:
    with pytest.raises(ConfigError, match="DISTILLD_KAFKA_BOOTSTRAP_SERVERS"):
        load_settings().kafka()


def test_kafka_with_explicit_bootstrap() -> None:
    config = load_settings().kafka("b1:9092,b2:9093")
    assert config == KafkaConfig(
        bootstrap_servers="b1:9092,b2:9093",
        client_id="distilld",
        session_timeout_ms=10_000,
        max_message_bytes=1_000_000,
        security={"security_protocol": "PLAINTEXT"},
    )
    assert config.client_kwargs() == {
        "bootstrap_servers": ["b1:9092", "b2:9093"],
        "client_id": "distilld",
        "security_protocol": "PLAINTEXT",
    }


def test_explicit_bootstrap_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_BOOTSTRAP_SERVERS", "from-env:9092")
    settings = load_settings()
    assert settings.kafka().bootstrap_servers == "from-env:9092"
    assert settings.kafka("embedded:19092").bootstrap_servers == "embedded:19092"


def test_kafka_carries_client_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_BOOTSTRAP_SERVERS", "k:9092")
    monkeypatch.setenv("DISTILLD_KAFKA_CLIENT_ID", "distilld-7")
    monkeypatch.setenv("DISTILLD_KAFKA_SESSION_TIMEOUT_MS", "45000")
    monkeypatch.setenv("DISTILLD_KAFKA_MAX_MESSAGE_BYTES", "2048")
    config = load_settings().kafka()
    assert config.client_id == "distilld-7"
    assert config.session_timeout_ms == 45_000
    assert config.max_message_bytes == 2_048
    assert config.client_kwargs()["bootstrap_servers"] == ["k:9092"]
    assert config.client_kwargs()["client_id"] == "distilld-7"


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize(
    "env",
    [
        {},
        {"DISTILLD_KAFKA_SASL_MECHANISM": "PLAIN"},
        {"DISTILLD_KAFKA_SASL_USERNAME": "svc"},
    ],
)
def test_sasl_without_mechanism_or_username_raises(
    monkeypatch: pytest.MonkeyPatch, protocol: str, env: dict[str, str]
) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_SECURITY_PROTOCOL", protocol)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    with pytest.raises(ConfigError) as info:
        settings.kafka("k:9092")
    message = str(info.value)
    assert f"DISTILLD_KAFKA_SECURITY_PROTOCOL={protocol}" in message
    assert "DISTILLD_KAFKA_SASL_MECHANISM" in message
    assert "DISTILLD_KAFKA_SASL_USERNAME" in message


def test_sasl_with_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_BOOTSTRAP_SERVERS", "k:9093")
    monkeypatch.setenv("DISTILLD_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("DISTILLD_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("DISTILLD_KAFKA_SASL_USERNAME", "svc-distilld")
    monkeypatch.setenv("DISTILLD_KAFKA_SASL_PASSWORD", SECRET)
    settings = load_settings()
    config = settings.kafka()
    assert config.client_kwargs() == {
        "bootstrap_servers": ["k:9093"],
        "client_id": "distilld",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc-distilld",
        "sasl_plain_password": SECRET,
    }
    # The secret is usable but never shown.
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert "svc-distilld" in repr(settings)  # repr is still useful, only the secret is hidden


def test_sasl_without_password_has_no_password_kwarg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("DISTILLD_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("DISTILLD_KAFKA_SASL_USERNAME", "svc")
    kwargs = load_settings().kafka("k:9092").client_kwargs()
    assert kwargs["sasl_mechanism"] == "PLAIN"
    assert kwargs["sasl_plain_username"] == "svc"
    assert "sasl_plain_password" not in kwargs


def test_sasl_ssl_adds_ssl_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("DISTILLD_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("DISTILLD_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("DISTILLD_KAFKA_SSL_CAFILE", "/etc/ssl/ca.pem")
    kwargs = load_settings().kafka("k:9093").client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["ssl_cafile"] == "/etc/ssl/ca.pem"
    assert "ssl_certfile" not in kwargs
    assert "ssl_keyfile" not in kwargs


def test_ssl_files_only_with_ssl_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_SSL_CAFILE", "/etc/ssl/ca.pem")
    plaintext = load_settings().kafka("k:9092").client_kwargs()
    assert "ssl_cafile" not in plaintext
    monkeypatch.setenv("DISTILLD_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("DISTILLD_KAFKA_SSL_CERTFILE", "/etc/ssl/cert.pem")
    monkeypatch.setenv("DISTILLD_KAFKA_SSL_KEYFILE", "/etc/ssl/key.pem")
    ssl = load_settings().kafka("k:9093").client_kwargs()
    assert ssl["security_protocol"] == "SSL"
    assert ssl["ssl_cafile"] == "/etc/ssl/ca.pem"
    assert ssl["ssl_certfile"] == "/etc/ssl/cert.pem"
    assert ssl["ssl_keyfile"] == "/etc/ssl/key.pem"
    assert "sasl_mechanism" not in ssl


def test_invalid_integer_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_SESSION_TIMEOUT_MS", "abc")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("invalid settings:")
    assert "DISTILLD_KAFKA_SESSION_TIMEOUT_MS" in message
    assert "'abc'" in message
    # A clean message, not a pydantic dump.
    assert info.value.__cause__ is None
    assert "pydantic" not in message


def test_value_below_minimum_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_MAX_MESSAGE_BYTES", "10")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "DISTILLD_KAFKA_MAX_MESSAGE_BYTES" in str(info.value)
    assert "1024" in str(info.value)


def test_invalid_choice_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_SECURITY_PROTOCOL", "SASL")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "DISTILLD_KAFKA_SECURITY_PROTOCOL" in message
    assert "'SASL'" in message


def test_every_invalid_variable_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_KAFKA_SESSION_TIMEOUT_MS", "abc")
    monkeypatch.setenv("DISTILLD_LOG_LEVEL", "LOUD")
    monkeypatch.setenv("DISTILLD_COMMIT_INTERVAL_MS", "-1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    lines = str(info.value).splitlines()
    named = {line.strip().split(":", 1)[0] for line in lines[1:]}
    assert named == {
        "DISTILLD_KAFKA_SESSION_TIMEOUT_MS",
        "DISTILLD_LOG_LEVEL",
        "DISTILLD_COMMIT_INTERVAL_MS",
    }


def test_settings_class_reads_env_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_STATE_DIR", "/var/lib/distilld")
    assert Settings().state_dir == Path("/var/lib/distilld")


def test_secrets_come_from_files_and_never_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "sasl-password"
    secret_file.write_text(SECRET + "\n")
    monkeypatch.setenv("DISTILLD_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("DISTILLD_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("DISTILLD_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("DISTILLD_KAFKA_SASL_PASSWORD_FILE", str(secret_file))
    monkeypatch.setenv("DISTILLD_ADMIN_TOKEN", SECRET)

    settings = load_settings()
    kafka = settings.kafka("broker:9092")

    assert kafka.security["sasl_plain_password"] == SECRET  # the newline dropped
    for shown in (repr(settings), str(settings.model_dump()), repr(kafka), str(kafka)):
        assert SECRET not in shown

    # Both a value and a file: refused, naming the variables only.
    monkeypatch.setenv("DISTILLD_KAFKA_SASL_PASSWORD", SECRET)
    with pytest.raises(ConfigError) as both:
        load_settings().kafka("broker:9092")
    assert "DISTILLD_KAFKA_SASL_PASSWORD or DISTILLD_KAFKA_SASL_PASSWORD_FILE" in str(both.value)
    assert SECRET not in str(both.value)
    monkeypatch.delenv("DISTILLD_KAFKA_SASL_PASSWORD")

    secret_file.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings().kafka("broker:9092")
    secret_file.unlink()
    with pytest.raises(ConfigError, match="cannot read the secret"):
        load_settings().kafka("broker:9092")


def test_an_invalid_secret_setting_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLD_ADMIN_TOKEN_FILE", "")  # not a path
    monkeypatch.setenv("DISTILLD_HTTP_PORT", "99999")

    with pytest.raises(ConfigError) as invalid:
        load_settings(admin_token=["not", "a", SECRET])

    message = str(invalid.value)
    assert "DISTILLD_HTTP_PORT" in message and "99999" in message
    assert "DISTILLD_ADMIN_TOKEN" in message and "(received (hidden))" in message
    assert SECRET not in message


ADMIN_TOKEN = "adm-7e21c9-planted-token-55a0"  # 29 characters


def test_http_limits_default_to_a_closed_status_and_bounded_clients() -> None:
    settings = load_settings()
    assert settings.http_public_status is False
    assert settings.http_max_connections == 32
    assert settings.http_request_timeout_s == 10.0
    assert settings.admin_secret() is None


def test_the_admin_token_comes_from_the_variable_or_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILLD_ADMIN_TOKEN", f" {ADMIN_TOKEN} ")
    direct = load_settings().admin_secret()
    assert direct is not None and direct.get_secret_value() == ADMIN_TOKEN
    path = tmp_path / "token"
    path.write_text(f"{ADMIN_TOKEN}\n", encoding="utf-8")
    monkeypatch.setenv("DISTILLD_ADMIN_TOKEN_FILE", str(path))
    with pytest.raises(ConfigError, match="not both") as both:
        load_settings().admin_secret()
    assert ADMIN_TOKEN not in str(both.value)
    monkeypatch.delenv("DISTILLD_ADMIN_TOKEN")
    from_file = load_settings().admin_secret()
    assert from_file is not None and from_file.get_secret_value() == ADMIN_TOKEN
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings().admin_secret()
    path.unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings().admin_secret()


@pytest.mark.parametrize("short", ["q9", "short-tok3n", "fifteen-chars-Z", " " * 20 + "Zq7"])
@pytest.mark.parametrize("variable", ["DISTILLD_ADMIN_TOKEN", "DISTILLD_ADMIN_TOKEN_FILE"])
def test_a_short_admin_token_is_refused_with_its_length_never_its_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short: str, variable: str
) -> None:
    if variable.endswith("_FILE"):
        path = tmp_path / "token"
        path.write_text(short + "\n", encoding="utf-8")
        monkeypatch.setenv(variable, str(path))
    else:
        monkeypatch.setenv(variable, short)
    with pytest.raises(ConfigError) as refused:
        load_settings().admin_secret()
    message = str(refused.value)
    assert message.startswith(f"{variable}: ")
    assert f"is {len(short.strip())} characters long" in message
    assert "at least 16" in message
    assert "head -c 32 /dev/urandom" in message
    assert short.strip() not in message


def test_an_admin_token_of_sixteen_characters_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISTILLD_ADMIN_TOKEN", "a" * 16)
    token = load_settings().admin_secret()
    assert token is not None and len(token.get_secret_value()) == 16
