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


class EndpointUnavailable(BackendUnavailable):
    """An HTTP endpoint (a vLLM server, an OpenAI-compatible API) did not answer
    (connection refused, timeout), answered HTTP 5xx, 408 or 429, or sent a body
    that is not the JSON expected. ``status`` is the HTTP status of an error
    answer (5xx, 408, 429), None when there was none. Raised by
    :mod:`distilld.openai_http`."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def server_error(self) -> bool:
        """True when the server answered, with HTTP 5xx."""
        return self.status is not None and self.status >= 500


class EndpointRefused(BackendError):
    """An HTTP endpoint refused a request with HTTP 4xx (other than 408 and 429): the
    request (its input, the model it names, the key) is the problem, so sending it
    again unchanged will not help. ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class EndpointAuthRefused(EndpointRefused):
    """HTTP 401 or 403: the endpoint wants an API key that was not sent or is wrong."""


class MonitoringError(DistilldError):
    """A monitor could not measure, so no verdict is given for that check.

    Raised by ``distilld.monitoring`` (and by policy evaluation, which reads its
    measurements) for inputs that cannot be measured (texts, labels or
    embeddings of the wrong shape or range, a comparison with a score outside
    [0, 1]), for a drift reference file that is missing or unreadable, and when
    Evidently fails (wrapped where it enters).
    """


class CompareError(DistilldError):
    """Student and teacher answers cannot be compared.

    Raised by ``distilld.shadow.compare`` for an unknown task kind, answers of
    the wrong type for the kind (a classification answer that is not a label
    string), a generation task compared without its output schema, or an output
    schema that is not valid JSON Schema: a mistake of the caller or the policy,
    not of one answer (answers that disagree or fail the schema get a low
    score, never an error).
    """


class StoreError(DistilldError):
    """The sample store cannot be opened, read or written.

    Raised by ``distilld.store`` implementations, wrapping the database
    driver's errors where they enter: a directory that is missing or not
    writable, a file that is not a distilld store or was written by a newer
    distilld, a database that stays locked or is full, a store used after
    ``close()``.
    """


class AssetError(DistilldError):
    """An offline asset (model or data set shipped in a PyPI wheel) is missing."""


class RegistryError(DistilldError):
    """The model registry cannot register, promote or roll back a version.

    Raised by ``distilld.registry``: an unknown version, a state change the
    registry does not allow (a second live version, retiring the live one), a
    rollback with no previous live version, a lock held too long by another
    process, or a registry directory that cannot be read or written.
    """


class TrainingError(DistilldError):
    """A student could not be trained: bad examples or settings, a base model that
    does not load, a failure or out-of-memory during training, or a model that
    could not be saved. Raised by ``distilld.retrain.train``; nothing half-written
    is left behind, and the live student keeps serving."""
