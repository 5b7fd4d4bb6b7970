"""The one exception tree of distilld.

Every error the daemon raises on purpose is a :class:`DistilldError`. Third-party
errors (kafka-python, transformers, pydantic, YAML) are wrapped where they enter
our code, so callers handle one family and the CLI can print a clear message
instead of a traceback. Messages say what was received, what was expected and
what to do.
"""

from __future__ import annotations


class DistilldError(Exception):
    """Base class of every error raised on purpose by distilld."""


class ConfigError(DistilldError):
    """Settings (environment variables) are invalid or inconsistent."""


class PolicyError(DistilldError):
    """A policy file is missing, unreadable or invalid.

    ``problems`` lists one human-readable line per problem, each naming the
    file and the field path.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        base = super().__str__()
        if not self.problems:
            return base
        return base + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class BrokerError(DistilldError):
    """The Kafka broker cannot be reached or refused an operation."""


class EmbeddedBrokerError(BrokerError):
    """The embedded Tansu broker could not be found or started."""


class ModelLoadError(DistilldError):
    """A student or teacher model could not be loaded from its directory."""


class BackendError(DistilldError):
    """A serving backend failed to answer a batch."""


class BackendUnavailable(BackendError):
    """The backend cannot answer right now (down, timing out, overloaded), whatever
    the inputs: the serving loop holds the batch and retries it later instead of
    giving up on the requests."""


class AssetError(DistilldError):
    """An offline asset (model or data set shipped in a PyPI wheel) is missing."""
