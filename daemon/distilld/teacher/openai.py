"""A teacher behind an OpenAI-compatible chat-completions API (vLLM or a hosted service).

Every input of a batch is its own HTTP request, sent concurrently (bounded by
``concurrency``) through the client shared with the vLLM student backend
(:mod:`distilld.openai_http`, which also maps HTTP errors and reads the
answers); ``label`` stays synchronous for the worker thread that calls it.

Requests per task kind and ``constraint`` setting:

* classification: ``structured_outputs: {"choice": labels}`` (vLLM), or no
  constraint (hosted APIs); the answer text is matched to the label set and,
  with ``logprobs``, the label distribution comes from the first answer
  token's top-k (shared with the vLLM student backend);
* extraction / generation: ``structured_outputs: {"json": schema}`` (vLLM), or
  ``response_format: {"type": "json_schema", ...}`` (hosted APIs), or no
  constraint; the answer is parsed and validated against the policy schema.

Failure handling, per request: connection errors, timeouts, HTTP 408/429/5xx
and malformed bodies are retried with exponential back-off and full jitter;
when the retries are spent the batch raises :class:`TeacherUnavailable` and
the circuit breaker counts a failure. HTTP 400/413/422 refuse one input: that
input's answer carries ``error`` and the batch goes on. Any other 4xx (bad
key, unknown model) raises :class:`TeacherError` and counts as a failure, so a
misconfigured teacher is not hammered. While the breaker is open, or the
hourly budget is spent, ``label`` raises at once without sending anything.

The API key is read from the environment variable the policy names and only
ever lives in the HTTP client's headers: it is not an attribute, not in
``repr``, and it is cut out of every error message and log line (an endpoint
may echo a rejected key back in its error body).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from distilld.credentials import policy_api_key
from distilld.errors import BackendUnavailable, EndpointRefused, PolicyError
from distilld.log import get_logger
from distilld.openai_http import (
    ChatAnswer,
    OpenAIHttp,
    label_confidence,
    mean_token_probability,
    token_top_logprobs,
)
from distilld.policy.model import Policy
from distilld.serving.base import validated_json
from distilld.teacher.base import (
    TeacherAnswer,
    TeacherBudgetExhausted,
    TeacherCircuitOpen,
    TeacherError,
    TeacherStatus,
    TeacherUnavailable,
)
from distilld.teacher.config import OpenAITeacherConfig
from distilld.teacher.resilience import (
    Backoff,
    BreakerState,
    CallBudget,
    CircuitBreaker,
    Clock,
    retry_async,
)
from distilld.vocabulary import TaskKind

#: Where the chat completions are, under the teacher's base URL (which ends in /v1).
CHAT_PATH = "chat/completions"
# Statuses that refuse this one input (too long, unprocessable); the server itself is fine.
_INPUT_REFUSED_STATUS = frozenset({400, 413, 422})
# What a chat model wraps a one-word answer in: whitespace, quotes, final punctuation.
_NOISE = " \t\r\n\"'`.!?"


class OpenAITeacher:
    """Labels inputs with a model behind an OpenAI-compatible chat-completions endpoint."""

    def __init__(
        self,
        config: OpenAITeacherConfig,
        policy: Policy,
        *,
        environ: Mapping[str, str] | None = None,
        secrets_dir: Path | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._config = config
        self._kind = policy.kind
        self._labels = tuple(policy.labels or ())
        self._schema = policy.output_schema
        self._validator = (
            jsonschema.Draft202012Validator(self._schema) if self._schema is not None else None
        )
        prompt = config.prompt or policy.prompt
        if prompt is None:
            raise PolicyError(
                f"task {policy.task!r}: the openai teacher needs a prompt template",
                [
                    f"task {policy.task!r}: teacher.prompt: set a prompt template containing "
                    "{input} (or the policy's top-level prompt); a chat model needs "
                    "instructions, e.g. 'Answer with one of: a, b.\\nText: {input}'"
                ],
            )
        self._prompt = prompt

        self._breaker = CircuitBreaker(
            config.breaker_failure_threshold, config.breaker_reset_s, clock=clock
        )
        self._budget = CallBudget(config.max_calls_per_hour, window_s=3600.0, clock=clock)
        self._backoff = Backoff(config.backoff_base_s, config.backoff_max_s)
        self._rng = rng or random.Random()
        self._log = get_logger("teacher").bind(teacher="openai", model=config.model)
        self._http = OpenAIHttp(
            config.base_url,
            name="teacher",
            api_key=teacher_api_key(config, environ, secrets_dir=secrets_dir),
            concurrency=config.concurrency,
            timeout_s=config.timeout_s,
            timeout_field="teacher.timeout_s",
            transport=transport,
            thread_name="teacher-client",
        )

    def __repr__(self) -> str:
        return (
            f"OpenAITeacher(base_url={self._config.base_url!r}, model={self._config.model!r}, "
            f"api_key_env={self._config.api_key_env!r})"
        )

    # -- Teacher ------------------------------------------------------------------

    def label(self, inputs: Sequence[str]) -> list[TeacherAnswer]:
        texts = list(inputs)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TeacherError(
                    f"input {index} of the batch is a {type(text).__name__}, expected str"
                )
        if self._http.closed:
            raise TeacherError(f"{self!r} is closed; build a new teacher to label inputs")
        if not texts:
            return []
        if not self._breaker.allow():
            raise TeacherCircuitOpen(
                f"teacher {self._config.model!r} at {self._config.base_url} is paused: "
                f"{self._breaker.consecutive_failures} requests failed in a row (circuit breaker "
                f"open); the next call goes through in {self._breaker.retry_after():.0f} s",
                retry_after_s=self._breaker.retry_after(),
            )
        try:
            if not self._budget.try_acquire(len(texts)):
                wait = self._budget.retry_after(len(texts))
                raise TeacherBudgetExhausted(
                    f"teacher budget spent: a batch of {len(texts)} inputs does not fit in the "
                    f"{self._budget.remaining} calls left of teacher.max_calls_per_hour="
                    f"{self._budget.max_calls}; calls resume in {wait:.0f} s (raise the budget "
                    "in the policy to compare more)",
                    retry_after_s=wait,
                )
            return self._http.run(self._label_all(texts))
        finally:
            # A half-open probe that ended without an outcome (budget refused it)
            # must not block every later call.
            self._breaker.release()

    def status(self) -> TeacherStatus:
        if self._http.closed:
            return TeacherStatus(available=False, reason="closed")
        if self._breaker.state is BreakerState.open:
            return TeacherStatus(
                available=False,
                reason=f"circuit breaker open after {self._breaker.consecutive_failures} "
                "failed requests in a row",
                retry_after_s=self._breaker.retry_after(),
                calls_left=self._budget.remaining,
            )
        remaining = self._budget.remaining
        if remaining == 0:
            return TeacherStatus(
                available=False,
                reason=f"hourly budget of {self._budget.max_calls} calls spent",
                retry_after_s=self._budget.retry_after(),
                calls_left=0,
            )
        return TeacherStatus(available=True, calls_left=remaining)

    def close(self) -> None:
        self._http.close()

    # -- the asyncio side -----------------------------------------------------------

    async def _label_all(self, texts: list[str]) -> list[TeacherAnswer]:
        # Wait for every request, even after one failed: none keeps running
        # unobserved on the loop, and the breaker hears every outcome.
        results = await asyncio.gather(*(self._label_one(t) for t in texts), return_exceptions=True)
        answers: list[TeacherAnswer] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            answers.append(result)
        return answers

    async def _label_one(self, text: str) -> TeacherAnswer:
        body = self._body(text)

        async def attempt() -> ChatAnswer:
            return await self._http.chat(CHAT_PATH, body)

        try:
            answer = await retry_async(
                attempt,
                retries=self._config.max_retries,
                backoff=self._backoff,
                retryable=lambda exc: isinstance(exc, BackendUnavailable),
                rng=self._rng,
                on_retry=self._log_retry,
            )
        except EndpointRefused as exc:
            if exc.status in _INPUT_REFUSED_STATUS:
                self._breaker.record_success()  # the server answered; the input was the problem
                return TeacherAnswer(output="", confidence=0.0, error=str(exc))
            self._breaker.record_failure()
            raise TeacherError(
                f"{exc}; check teacher.base_url, teacher.model and the key in "
                f"{self._config.api_key_env or '(no api_key_env set)'}"
            ) from None
        except BackendUnavailable as exc:
            self._breaker.record_failure()
            self._log.info(
                "teacher.request_failed", error=str(exc), attempts=self._config.max_retries + 1
            )
            raise TeacherUnavailable(
                f"{exc} (after {self._config.max_retries + 1} attempts)",
                retry_after_s=self._breaker.retry_after(),
            ) from None
        self._breaker.record_success()
        if self._kind is TaskKind.classification:
            return self._label_answer(answer.content, answer.tokens)
        return self._json_answer(answer.content, answer.tokens)

    def _log_retry(self, attempt: int, error: BaseException, delay: float) -> None:
        self._log.debug(
            "teacher.retry", attempt=attempt + 1, delay_s=round(delay, 3), error=str(error)
        )

    def _body(self, text: str) -> dict[str, Any]:
        config = self._config
        body: dict[str, Any] = {
            "model": config.model,
            "messages": [{"role": "user", "content": self._prompt.replace("{input}", text)}],
            "temperature": 0.0,
            "max_tokens": config.max_new_tokens,
        }
        if config.logprobs:
            body["logprobs"] = True
        if self._kind is TaskKind.classification:
            if config.logprobs:
                body["top_logprobs"] = config.top_logprobs
            if config.constraint == "structured_outputs":
                body["structured_outputs"] = {"choice": list(self._labels)}
        elif config.constraint == "structured_outputs":
            body["structured_outputs"] = {"json": self._schema}
        elif config.constraint == "response_format":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": self._schema},
            }
        return body

    def _shown(self, text: str) -> str:
        """Text from the endpoint as an error quotes it: the key masked first, then cut."""
        return self._http.redact.excerpt(text)

    # -- answers --------------------------------------------------------------------

    def _label_answer(self, content: str, tokens: list[dict[str, Any]]) -> TeacherAnswer:
        label = match_label(content, self._labels)
        if label is None:
            hint = (
                "; the endpoint ignored structured_outputs (a vLLM server >= 0.10 honours it; "
                "for other endpoints set teacher.constraint: none)"
                if self._config.constraint == "structured_outputs"
                else ""
            )
            return TeacherAnswer(
                output=content,
                confidence=0.0,
                error=f"teacher answered {self._shown(content)!r}, not one of the labels "
                f"{list(self._labels)}{hint}",
            )
        # The label's own probability and, where the first token's top-k covers
        # every label, the distribution (as the vLLM student backend reads it).
        confidence, distribution = label_confidence(label, tokens, self._labels)
        return TeacherAnswer(
            output=label,
            confidence=confidence,
            probabilities=distribution,
            top_logprobs=token_top_logprobs(tokens),
        )

    def _json_answer(self, content: str, tokens: list[dict[str, Any]]) -> TeacherAnswer:
        assert self._validator is not None  # every non-classification policy has a schema
        prediction = validated_json(
            _strip_code_fence(content), mean_token_probability(tokens), self._validator
        )
        return TeacherAnswer(
            output=prediction.output,
            confidence=prediction.confidence,
            error=prediction.error,
            top_logprobs=token_top_logprobs(tokens) if prediction.error is None else None,
        )


def teacher_api_key(
    config: OpenAITeacherConfig,
    environ: Mapping[str, str] | None = None,
    *,
    secrets_dir: Path | None = None,
) -> str | None:
    """The teacher's API key from ``api_key_env`` (in ``environ``, default the process
    environment) or ``api_key_file``; None when the policy names neither. A variable
    that is unset or empty, or a file that cannot be read, is a ConfigError (also
    raised by the preflight, before a policy set is started). ``api_key_file`` must
    lie in ``secrets_dir`` (DISTILLD_SECRETS_DIR; relative names are resolved under
    it): a policy cannot send any file the daemon can read as a bearer key."""
    return policy_api_key(
        env=config.api_key_env,
        file=config.api_key_file,
        secrets_dir=secrets_dir,
        field="teacher",
        environ=environ,
    )


def match_label(content: str, labels: Sequence[str]) -> str | None:
    """The label an answer names: exactly, or ignoring case, surrounding whitespace,
    quotes and final punctuation ("Fresh." names "fresh"). None when it names no
    label; a sentence that merely mentions one ("not fresh") is not guessed at."""
    if content in labels:
        return content
    cleaned = _normalise(content)
    matches = [label for label in labels if _normalise(label) == cleaned]
    return matches[0] if len(matches) == 1 else None


def _normalise(text: str) -> str:
    return text.strip(_NOISE).casefold()


def _strip_code_fence(content: str) -> str:
    """Chat models without a JSON constraint often wrap JSON in ```json ... ```."""
    text = content.strip()
    if text.startswith("```") and text.endswith("```") and "\n" in text:
        return text[text.index("\n") + 1 : -3].strip()
    return content
