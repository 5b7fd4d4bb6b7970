"""The policy's ``teacher`` section: who labels the samples the student is measured on.

Two backends, told apart by ``backend``:

* ``openai``: any OpenAI-compatible chat-completions endpoint (a vLLM server or
  a hosted API), reached over HTTP with retries, a circuit breaker and an
  hourly call budget;
* ``transformers``: a model loaded in-process, the same way an in-process
  student is loaded.

The API key is never written in a policy: ``api_key_env`` names the
environment variable that holds it, so policies can be committed and shown.

The section is a union told apart by ``backend``, and the loader requires the
key even though each model has it as a default (a policy must say which kind
of teacher it means); the JSON Schema says so too. Cross-field rules that
involve the rest of the policy (a prompt for an openai teacher, an
architecture that fits the task kind) live in ``Policy``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# policy.common, not policy.model: model.py imports this module.
from distilld.policy.common import (
    INPUT_PLACEHOLDER,
    Architecture,
    PolicyFieldError,
    check_no_parent_parts,
)

ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _backend_required(schema: dict[str, Any]) -> None:
    # pydantic needs the discriminator in the input, default or not.
    required = schema.get("required")
    names = list(required) if isinstance(required, list) else []
    schema["required"] = ["backend", *(n for n in names if n != "backend")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_backend_required)


def _check_prompt(value: str | None) -> str | None:
    if value is None:
        return None
    if INPUT_PLACEHOLDER not in value:
        raise ValueError(f"must contain the placeholder {INPUT_PLACEHOLDER} (received {value!r})")
    return value


class OpenAITeacherConfig(_Strict):
    """A teacher behind an OpenAI-compatible HTTP API (vLLM or a hosted service)."""

    backend: Literal["openai"] = "openai"
    base_url: str = Field(
        pattern=r"^https?://[^\s]+$",
        description="API root that chat/completions hangs off, e.g. http://vllm:8000/v1 or "
        "https://api.openai.com/v1.",
    )
    model: str = Field(min_length=1, description="The model name the endpoint knows.")
    api_key_env: str | None = Field(
        default=None,
        pattern=ENV_NAME_PATTERN,
        description="Name of the environment variable holding the API key (sent as a Bearer "
        "token). Never the key itself. Unset: no Authorization header.",
    )
    api_key_file: str | None = Field(
        default=None,
        min_length=1,
        description="File holding the API key (e.g. a container secret at /run/secrets/...), "
        "instead of api_key_env. Never the key itself.",
    )
    prompt: str | None = Field(
        default=None,
        description="Prompt template with {input} for the teacher. Default: the policy's prompt.",
    )
    constraint: Literal["structured_outputs", "response_format", "none"] = Field(
        default="structured_outputs",
        description="How answers are constrained. structured_outputs (vLLM): a choice over the "
        "labels or the output JSON Schema. response_format (hosted APIs): JSON outputs through "
        "response_format json_schema; labels unconstrained. none: no constraint. Unconstrained "
        "label answers are matched to the label set (case and punctuation ignored).",
    )
    logprobs: bool = Field(
        default=True,
        description="Ask for token log-probabilities (confidence, label distribution). Turn off "
        "for endpoints that refuse them; confidence is then 1.0.",
    )
    top_logprobs: int = Field(
        default=5, ge=1, le=20, description="Classification: top-k behind the label distribution."
    )
    max_new_tokens: int = Field(default=512, ge=1, le=16_384, description="Answer budget.")
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="Per HTTP request.")
    max_retries: int = Field(
        default=2, ge=0, le=10, description="Retries of a failed request (5xx, 429, timeouts)."
    )
    backoff_base_s: float = Field(
        default=0.5, gt=0, le=60, description="First retry waits up to this long (full jitter)."
    )
    backoff_max_s: float = Field(
        default=10.0, gt=0, le=600, description="No retry waits longer than this."
    )
    concurrency: int = Field(default=8, ge=1, le=256, description="Requests in flight at once.")
    max_calls_per_hour: int = Field(
        default=1000,
        ge=1,
        description="Budget: inputs sent to the teacher in any sliding hour (retries not "
        "counted). When spent, comparisons pause until calls age out of the hour.",
    )
    breaker_failure_threshold: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Consecutive failed requests that open the circuit breaker.",
    )
    breaker_reset_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="An open breaker lets one probe request through after this long.",
    )

    _prompt = field_validator("prompt")(_check_prompt)

    @field_validator("base_url")
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _backoff_order(self) -> OpenAITeacherConfig:
        if self.backoff_max_s < self.backoff_base_s:
            raise PolicyFieldError(
                "backoff_max_s",
                f"backoff_max_s ({self.backoff_max_s}) must be at least backoff_base_s "
                f"({self.backoff_base_s})",
            )
        if self.api_key_env is not None and self.api_key_file is not None:
            raise PolicyFieldError(
                "api_key_file",
                "set api_key_env or api_key_file, not both (the key comes from one place)",
            )
        return self


class TransformersTeacherConfig(_Strict):
    """A teacher loaded in-process with transformers (a laptop, CI, a small deployment)."""

    backend: Literal["transformers"] = "transformers"
    model: str = Field(
        min_length=1,
        description="Model directory (safetensors), absolute or relative to DISTILLD_MODELS_DIR.",
    )
    architecture: Architecture = Architecture.sequence_classification
    prompt: str | None = Field(
        default=None,
        description="causal-lm: prompt template with {input}. Default: the policy's prompt.",
    )
    max_input_tokens: int = Field(
        default=512, ge=8, le=32_768, description="Longer inputs are truncated."
    )
    truncation_side: Literal["right", "left"] = Field(
        default="right", description="right: keep the start of the text; left: keep the end."
    )
    max_new_tokens: int = Field(
        default=256, ge=1, le=8192, description="causal-lm: generation budget for JSON outputs."
    )

    _prompt = field_validator("prompt")(_check_prompt)

    _no_escape = field_validator("model")(check_no_parent_parts)


TeacherConfig = Annotated[
    OpenAITeacherConfig | TransformersTeacherConfig, Field(discriminator="backend")
]
"""The ``teacher`` section of a policy: one of the two backends, picked by ``backend``."""
