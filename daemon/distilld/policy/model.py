"""Policy files as pydantic models.

One YAML file per task. Every model forbids unknown keys so that a typo is an
error, not a silently ignored setting. Validation that spans fields (a
classification task needs labels, a causal-LM student needs a prompt) lives in
model validators here; the loader (``policy/load.py``) turns pydantic's errors
into messages that name the file and the field path.

Sections read by one part of the daemon are defined beside it and plugged in
here: ``teacher`` (``teacher/config.py``), ``sampling`` and ``monitors``
(``monitoring/config.py``). The names those modules share with this one live
in ``policy/common.py`` so that they need not import this module.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distilld.monitoring.config import CATEGORICAL_FEATURES, MonitorsConfig, SamplingConfig
from distilld.policy.common import (
    INPUT_PLACEHOLDER,
    Architecture,
    PolicyFieldError,
    check_no_parent_parts,
)
from distilld.retrain.config import RetrainingConfig
from distilld.retrain.decide import size_warnings
from distilld.teacher.config import (
    ENV_NAME_PATTERN,
    OpenAITeacherConfig,
    TeacherConfig,
    TransformersTeacherConfig,
)
from distilld.vocabulary import LENGTH_SEGMENT_KEY, TaskKind

__all__ = [
    "INPUT_PLACEHOLDER",
    "NAME_PATTERN",
    "TOPIC_PATTERN",
    "AlertsPolicy",
    "Architecture",
    "BatchPolicy",
    "Policy",
    "PolicyFieldError",
    "StudentPolicy",
    "TopicName",
    "TrafficPolicy",
    "VllmPolicy",
]

# Kafka's own rule for topic names (legal characters, at most 249 of them, not "."
# or ".."), without look-ahead: pydantic's default (Rust) regex engine has none,
# and in that engine "$" is the end of the text. (Python's re, where "$" also
# matches before a final newline, accepted "reviews\n" as a task name.)
TOPIC_PATTERN = (
    r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,248}"
    r"|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,247}"
    r"|\.\.[A-Za-z0-9._-]{1,247})$"
)
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


TopicName = Annotated[str, Field(pattern=TOPIC_PATTERN, description="A Kafka topic name.")]


class _Strict(BaseModel):
    # pydantic's default (Rust) regex engine: "$" ends the text, so no pattern
    # accepts a trailing newline (python-re did).
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrafficPolicy(_Strict):
    """Where requests come from and where answers go."""

    requests_topic: TopicName
    responses_topic: TopicName
    dead_letter_topic: TopicName
    consumer_group: str = Field(default="distilld", min_length=1, max_length=255)
    max_input_chars: int = Field(
        default=20_000,
        gt=0,
        description="Requests whose input is longer go to the dead-letter topic.",
    )

    @model_validator(mode="after")
    def _distinct_topics(self) -> TrafficPolicy:
        topics = [self.requests_topic, self.responses_topic, self.dead_letter_topic]
        if len(set(topics)) != 3:
            names = ["requests_topic", "responses_topic", "dead_letter_topic"]
            repeated = next(n for i, n in enumerate(names) if topics[i] in topics[:i])
            raise PolicyFieldError(
                repeated,
                "requests_topic, responses_topic and dead_letter_topic must be three "
                f"different topics (received {topics})",
            )
        return self


class BatchPolicy(_Strict):
    """Dynamic micro-batching: a batch closes at max_size requests or after max_wait_ms."""

    max_size: int = Field(default=8, ge=1, le=1024)
    max_wait_ms: int = Field(default=10, ge=0, le=10_000)


class VllmPolicy(_Strict):
    """How to reach the vLLM server that serves the student (backend: vllm)."""

    base_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+(:[0-9]+)?/?$",
        description="External server (e.g. http://vllm:8000). Unset: the daemon starts one.",
    )
    served_model_name: str | None = Field(
        default=None,
        min_length=1,
        description="The model name the server knows. Default: the model directory's name.",
    )
    concurrency: int = Field(
        default=32, ge=1, le=1024, description="Requests in flight at once (vLLM batches them)."
    )
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="Per HTTP request.")
    top_logprobs: int = Field(
        default=5, ge=1, le=20, description="Classification: top-k used for the label distribution."
    )
    max_model_len: int = Field(default=2048, ge=128, description="Managed server: context length.")
    enforce_eager: bool = Field(
        default=False, description="Managed server: skip torch.compile (faster start)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="bfloat16",
        description="Managed server: weight dtype. On CPUs without AVX-512 bf16 support "
        "float32 is several times faster.",
    )
    start_timeout_s: float = Field(
        default=600.0, gt=0, description="Managed server: how long to wait for readiness."
    )
    api_key_env: str | None = Field(
        default=None,
        pattern=ENV_NAME_PATTERN,
        description="External server: name of the environment variable holding the key the "
        "server was started with (vLLM --api-key / VLLM_API_KEY), sent as a Bearer token. "
        "A managed server gets this key, or else a random key of its own.",
    )
    api_key_file: str | None = Field(
        default=None,
        min_length=1,
        description="File holding that key, instead of api_key_env, in DISTILLD_SECRETS_DIR "
        "(e.g. /run/secrets/vllm_student_api_key).",
    )

    @model_validator(mode="after")
    def _one_key_source(self) -> VllmPolicy:
        if self.api_key_env is not None and self.api_key_file is not None:
            raise PolicyFieldError(
                "api_key_file",
                "set api_key_env or api_key_file, not both (the key comes from one place)",
            )
        return self


class StudentPolicy(_Strict):
    """The model that answers production traffic."""

    backend: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="transformers: in-process on this machine; vllm: a vLLM server over HTTP.",
    )
    vllm: VllmPolicy | None = Field(
        default=None, description="Settings of the vLLM backend (backend: vllm)."
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        description="Model directory (safetensors), absolute or relative to DISTILLD_MODELS_DIR. "
        "Once the task has a live version in the model registry, that version is served "
        "instead. Unset: the task starts cold (see retraining.cold_start).",
    )
    architecture: Architecture = Architecture.sequence_classification
    max_input_tokens: int = Field(
        default=256, ge=8, le=32_768, description="Longer inputs are truncated, never rejected."
    )
    truncation_side: Literal["right", "left"] = Field(
        default="right", description="right: keep the start of the text; left: keep the end."
    )
    max_new_tokens: int = Field(
        default=256, ge=1, le=8192, description="Generation budget for JSON outputs."
    )
    batch: BatchPolicy = BatchPolicy()

    @model_validator(mode="after")
    def _backend_settings(self) -> StudentPolicy:
        if self.vllm is not None and self.backend != "vllm":
            raise PolicyFieldError(
                "vllm",
                f"the vllm section only applies to backend: vllm (backend is {self.backend})",
            )
        return self

    _no_escape = field_validator("model")(check_no_parent_parts)


class AlertsPolicy(_Strict):
    """Where alert events go besides the log (a structlog JSON line per event)."""

    topic: TopicName | None = Field(
        default=None,
        description="Also produce each alert event (breach and recovery) as JSON to this "
        "Kafka topic. Unset: the log only.",
    )


class Policy(_Strict):
    """One distillation task: what it is, where its traffic flows, who answers."""

    version: Literal[1] = Field(default=1, description="Policy file format version.")
    task: str = Field(pattern=NAME_PATTERN, description="Unique task name, as requests name it.")
    kind: TaskKind
    description: str = ""
    labels: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, description="Classification: the closed label set (at least two)."
    )
    output_schema: dict[str, Any] | None = Field(
        default=None,
        description="Extraction / generation: JSON Schema (an object) every output must match.",
    )
    prompt: str | None = Field(
        default=None,
        description="Prompt template for causal-LM models; must contain {input}.",
    )
    traffic: TrafficPolicy
    student: StudentPolicy
    teacher: TeacherConfig | None = Field(
        default=None,
        description="Who labels the sampled requests the student is compared with "
        "(backend: openai or transformers). Unset: no shadow comparison, so no accuracy "
        "verdict; drift monitoring still runs.",
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        description="Which requests are also sent to the teacher (needs a teacher).",
    )
    monitors: MonitorsConfig = Field(
        default_factory=MonitorsConfig,
        description="Accuracy (needs a teacher) and drift checks: interval, windows, thresholds.",
    )
    alerts: AlertsPolicy = Field(
        default_factory=AlertsPolicy, description="Where alert events go besides the log."
    )
    retraining: RetrainingConfig | None = Field(
        default=None,
        description="Regenerate data with the teacher, retrain, validate, shadow and promote "
        "(needs a teacher). Unset: the task is never retrained.",
    )

    @field_validator("labels")
    def _labels_distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if len(value) < 2:
            raise ValueError(f"needs at least two labels (received {value})")
        duplicates = sorted({v for v in value if value.count(v) > 1})
        if duplicates:
            raise ValueError(f"labels must be distinct (repeated: {duplicates})")
        return value

    @field_validator("output_schema")
    def _schema_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"is not a valid JSON Schema: {exc.message}") from None
        if value.get("type") != "object":
            raise ValueError(
                f"must describe a JSON object (type: object), received type {value.get('type')!r}"
            )
        return value

    @field_validator("prompt")
    def _prompt_has_placeholder(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError(
                "must not be empty (leave it out for sequence-classification students)"
            )
        if INPUT_PLACEHOLDER not in value:
            raise ValueError(
                f"must contain the placeholder {INPUT_PLACEHOLDER} (received {value!r})"
            )
        return value

    @model_validator(mode="after")
    def _measurable_quality_bar(self) -> Policy:
        # distilld refuses open-ended tasks: without a label set or an output
        # schema there is nothing to measure the student against.
        if self.kind is TaskKind.classification:
            if self.labels is None:
                raise PolicyFieldError(
                    "labels",
                    "a classification task needs `labels` (the closed label set); distilld "
                    "refuses tasks without a measurable quality bar",
                )
            if self.output_schema is not None:
                raise PolicyFieldError(
                    "output_schema", "a classification task takes `labels`, not `output_schema`"
                )
        else:
            a_kind = f"{_article(self.kind.value)} {self.kind.value}"
            if self.output_schema is None:
                raise PolicyFieldError(
                    "output_schema",
                    f"{a_kind} task needs `output_schema` (JSON Schema of the output); "
                    "distilld refuses open-ended tasks without a measurable quality bar",
                )
            if self.labels is not None:
                raise PolicyFieldError(
                    "labels",
                    f"{a_kind} task takes `output_schema`, not `labels`",
                )
            if self.kind is TaskKind.extraction and not self.output_schema.get("properties"):
                raise PolicyFieldError(
                    "output_schema",
                    "an extraction task's output_schema must list `properties` (fields)",
                )
        arch = self.student.architecture
        if arch is Architecture.causal_lm and self.prompt is None:
            raise PolicyFieldError(
                "prompt", "a causal-lm student needs a `prompt` template containing {input}"
            )
        is_classification = self.kind is TaskKind.classification
        if arch is Architecture.sequence_classification and not is_classification:
            raise PolicyFieldError(
                "student.architecture",
                f"a sequence-classification student can only serve classification tasks; "
                f"use architecture: causal-lm for {self.kind.value}",
            )
        return self

    @model_validator(mode="after")
    def _teacher_fits_the_task(self) -> Policy:
        teacher = self.teacher
        if teacher is None:
            # A sampling section that says something (not the defaults, which a
            # dumped-and-reloaded policy carries) would be silently ignored.
            if "sampling" in self.model_fields_set and self.sampling != SamplingConfig():
                raise PolicyFieldError(
                    "sampling",
                    "the sampling section chooses the requests sent to the teacher, and this "
                    "policy has no teacher section; add a teacher or remove sampling",
                )
            return self
        has_prompt = teacher.prompt is not None or self.prompt is not None
        if isinstance(teacher, OpenAITeacherConfig) and not has_prompt:
            raise PolicyFieldError(
                "teacher.prompt",
                "an openai teacher needs a prompt template containing {input}; set "
                "teacher.prompt, or the policy's prompt (which the teacher then uses too)",
            )
        if isinstance(teacher, TransformersTeacherConfig):
            if teacher.architecture is Architecture.causal_lm and not has_prompt:
                raise PolicyFieldError(
                    "teacher.prompt",
                    "a causal-lm teacher needs a prompt template containing {input}; set "
                    "teacher.prompt, or the policy's prompt (which the teacher then uses too)",
                )
            is_classification = self.kind is TaskKind.classification
            if teacher.architecture is Architecture.sequence_classification and (
                not is_classification
            ):
                raise PolicyFieldError(
                    "teacher.architecture",
                    f"a sequence-classification teacher can only label classification tasks; "
                    f"use architecture: causal-lm for {self.kind.value}",
                )
        return self

    @model_validator(mode="after")
    def _retraining_fits_the_task(self) -> Policy:
        retraining = self.retraining
        if self.student.model is None and (retraining is None or retraining.base_model is None):
            raise PolicyFieldError(
                "student.model",
                "is required unless the task starts cold: then set retraining.base_model "
                "(the model the first student is trained from) and a teacher",
            )
        if retraining is None or not retraining.enabled:
            if self.student.model is None:
                raise PolicyFieldError(
                    "retraining.enabled",
                    "a task without student.model starts cold and needs retraining to get "
                    "its first student; enable retraining or set student.model",
                )
            return self
        if self.teacher is None:
            raise PolicyFieldError(
                "retraining",
                "retraining labels its data with the teacher, and this policy has no teacher "
                "section; add a teacher, or set retraining.enabled: false",
            )
        lora = retraining.training.lora
        if lora is not None and self.student.architecture is not Architecture.causal_lm:
            raise PolicyFieldError(
                "retraining.training.lora",
                "LoRA applies to causal-lm students; a sequence-classification student is "
                "always fully fine-tuned (remove lora)",
            )
        if lora is not None and not lora.merge:
            raise PolicyFieldError(
                "retraining.training.lora.merge",
                "this version promotes full checkpoints only: set merge: true (the adapter "
                "is merged into the base model when saved)",
            )
        holds = self.student.model is None and retraining.cold_start.serve == "hold"
        if holds and not retraining.seed_files:
            raise PolicyFieldError(
                "retraining.seed_files",
                "a cold start that holds requests (cold_start.serve: hold) has no traffic "
                "to learn from; name seed_files, or use cold_start.serve: teacher",
            )
        if self.student.model is None and self.student.backend == "vllm":
            raise PolicyFieldError(
                "student.model",
                "a cold start (no student.model) needs backend: transformers in this version "
                "(a managed vLLM server needs a model to start on)",
            )
        return self

    @model_validator(mode="after")
    def _monitors_fit_the_task(self) -> Policy:
        features = self.monitors.drift.features or []
        categorical = sorted(CATEGORICAL_FEATURES.intersection(features))
        if categorical and self.kind is not TaskKind.classification:
            raise PolicyFieldError(
                "monitors.drift.features",
                f"{categorical} only exist for classification tasks (a predicted label); "
                f"remove them for {_article(self.kind.value)} {self.kind.value} task",
            )
        sampled = self.sampling.segment_keys
        checked = self.monitors.accuracy.segments.keys
        if checked is not None:
            # Only declared metadata keys become segments (unset: none, just the length).
            recorded = {*(sampled or ()), LENGTH_SEGMENT_KEY}
            missing = [key for key in checked if key not in recorded]
            if missing:
                raise PolicyFieldError(
                    "monitors.accuracy.segments.keys",
                    f"{missing} are not segment keys of the sampled requests (sampling."
                    f"segment_keys is {'unset' if sampled is None else sampled}, plus "
                    f"{LENGTH_SEGMENT_KEY!r}), so these "
                    "segments would never have comparisons; add them to "
                    "sampling.segment_keys or remove them here",
                )
        return self

    @model_validator(mode="after")
    def _alerts_topic_is_its_own(self) -> Policy:
        topic = self.alerts.topic
        traffic = self.traffic
        for name in ("requests_topic", "responses_topic", "dead_letter_topic"):
            if topic is not None and topic == getattr(traffic, name):
                raise PolicyFieldError(
                    "alerts.topic",
                    f"{topic!r} is already traffic.{name}; alert events need a topic of "
                    "their own (e.g. distilld.alerts)",
                )
        return self

    def warnings(self) -> list[str]:
        """What is valid but will not work as written (``distilld policy validate``
        prints these and still exits 0)."""
        retraining = self.retraining
        if retraining is None or not retraining.enabled:
            return []
        n_labels = len(self.labels) if self.labels else None
        return size_warnings(retraining, self.kind.value, n_labels)
