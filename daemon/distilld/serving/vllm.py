"""The vLLM student backend: vLLM's OpenAI-compatible HTTP API, many requests at once.

vLLM batches continuously on its side, so the daemon must not send a batch
one request at a time: every input of a batch becomes its own HTTP request,
sent concurrently (bounded by ``concurrency``) through the OpenAI-compatible
client shared with the teacher (:mod:`distilld.openai_http`, which also maps
HTTP errors and reads the answers). ``predict`` stays synchronous for the
serving loop.

Requests per task kind (never the removed ``guided_*`` fields, which current
vLLM silently ignores):

* classification, causal-LM student: chat completion with
  ``structured_outputs: {"choice": labels}`` and ``logprobs`` /
  ``top_logprobs``; the label distribution comes from the first answer
  token's top-k where it covers the labels;
* extraction / generation: ``structured_outputs: {"json": schema}``; the
  answer is parsed and validated against the policy schema, and an invalid
  one is returned with ``error`` set (counted and logged by the loop);
* classification, sequence-classification student: ``POST /classify``.

Connection errors, timeouts, 5xx (and 408/429) answers and malformed bodies
raise :class:`BackendUnavailable`: the serving loop holds the batch and
retries it, so nothing is lost while vLLM is down. A 5xx answer while the
server's ``/health`` answers 200 is about an input, not an outage: the batch
raises :class:`BackendError`, so the loop retries its inputs one by one and
dead-letters the one that fails alone instead of holding the task forever. A
4xx answer is about the input and raises :class:`BackendError` too.

With an API key (``student.vllm.api_key_env`` / ``api_key_file`` for an
external server, a key of its own for a managed one), every request carries
it as a bearer token: vLLM started with ``--api-key`` / ``VLLM_API_KEY``
then refuses ``/v1`` requests, runtime LoRA loads included, from anyone
else. The key lives only in the HTTP client's headers and is masked in every
error message.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx
import jsonschema

from distilld.errors import BackendError, BackendUnavailable, EndpointUnavailable
from distilld.models.prompting import chat_messages, keep_tokens, render_prompt
from distilld.openai_http import OpenAIHttp, label_confidence, mean_token_probability
from distilld.serving.base import Prediction, validated_json

#: Special tokens a sequence-classification encoder adds around one input.
_ENCODER_SPECIAL_TOKENS = 2


@dataclass(frozen=True)
class VllmTarget:
    """What the backend needs to know about the task and the server."""

    base_url: str
    model: str  # the served model name (or the LoRA adapter name)
    kind: str  # "choice", "json" or "classify"
    labels: tuple[str, ...] = ()
    schema: dict[str, Any] | None = None
    prompt: str | None = None  # template with {input}; not used by "classify"
    max_new_tokens: int = 256
    max_input_tokens: int = 512
    truncation_side: str = "right"  # right keeps the start of the text, left the end
    top_logprobs: int = 5
    concurrency: int = 32
    timeout_s: float = 60.0


class VllmStudent:
    """A student served by a vLLM server (external or managed)."""

    def __init__(
        self,
        target: VllmTarget,
        model_version: str,
        *,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._current: tuple[VllmTarget, str] = (target, model_version)
        # Set while the server is being replaced (a full-weight version switch):
        # predict then raises BackendUnavailable, so the serving loop holds the
        # requests instead of sending them to a server that is going away.
        self._held_because: str | None = None
        self._in_flight = 0  # predict calls under way; guarded by _idle
        self._idle = threading.Condition()
        self._validator = (
            jsonschema.Draft202012Validator(target.schema) if target.schema is not None else None
        )
        self._http = OpenAIHttp(
            target.base_url,
            name="vLLM",
            api_key=api_key,
            concurrency=target.concurrency,
            timeout_s=target.timeout_s,
            timeout_field="student.vllm.timeout_s",
            transport=transport,
            thread_name="vllm-client",
        )

    # -- StudentBackend ---------------------------------------------------------

    @property
    def model_version(self) -> str:
        return self._current[1]

    @property
    def served_model(self) -> str:
        """The name requests are sent under (the served model or LoRA adapter)."""
        return self._current[0].model

    def switch(self, served_model: str, model_version: str) -> None:
        """Serve later batches with another served model (e.g. a new LoRA adapter),
        and end a :meth:`hold`.

        A batch already being answered finishes on the model it started with,
        and its predictions say so: no request is answered by a half-switched
        model or reported under the wrong version."""
        with self._idle:  # a concurrent predict sees the old pair or the new one
            self._current = (_replace(self._target, model=served_model), model_version)
            self._held_because = None

    def hold(self, reason: str, drain_timeout_s: float = 60.0) -> None:
        """Refuse new batches (BackendUnavailable, so the loop holds and retries them)
        until :meth:`switch` or :meth:`release`, and wait up to ``drain_timeout_s``
        for the batches already sent to finish, so none of them reaches the server
        that replaces the current one."""
        with self._idle:
            self._held_because = reason
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=drain_timeout_s)

    def release(self) -> None:
        """End a :meth:`hold` without changing the served model."""
        with self._idle:
            self._held_because = None

    def load_adapter(self, name: str, path: str, model_version: str | None = None) -> None:
        """Load a LoRA adapter into the server under a new name, then switch to it
        (answers then report ``model_version``, by default the adapter name).

        Every version needs a new name: vLLM may serve stale prefix-cache
        entries for an adapter reloaded under the same name."""
        self._http.run(self._http.load_lora_adapter(name, path))
        self.switch(name, model_version or name)

    @property
    def _target(self) -> VllmTarget:
        return self._current[0]

    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        with self._idle:
            if self._held_because is not None:
                raise BackendUnavailable(f"the vLLM student is held: {self._held_because}")
            self._in_flight += 1
            target, version = self._current  # one pair for the whole batch, even during a switch
        try:
            predictions = self._http.run(self._predict_all(list(inputs), target))
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
        return [replace(p, model_version=version) for p in predictions]

    def close(self) -> None:
        self._http.close()

    # -- the asyncio side -------------------------------------------------------

    async def _predict_all(self, texts: list[str], target: VllmTarget) -> list[Prediction]:
        one = self._classify_one if target.kind == "classify" else self._complete
        # Wait for every request, even after one failed: none keeps running
        # unobserved (hold() counts on that), and the worst failure decides.
        results = await asyncio.gather(*(one(t, target) for t in texts), return_exceptions=True)
        predictions = [r for r in results if isinstance(r, Prediction)]
        if len(predictions) == len(results):
            return predictions
        failure = batch_failure([r for r in results if isinstance(r, BaseException)])
        if (
            isinstance(failure, EndpointUnavailable)
            and failure.server_error
            and await self._http.healthy()
        ):
            raise BackendError(
                f"{failure}; the server's /health answers 200, so an input of this batch is "
                "the cause, not an outage (the serving loop retries the inputs one by one "
                "and dead-letters the one that fails alone)"
            ) from failure
        raise failure

    async def _complete(self, text: str, target: VllmTarget) -> Prediction:
        assert target.prompt is not None
        prompt = render_prompt(target.prompt, await self._truncate(text, target))
        body: dict[str, Any] = {
            "model": target.model,
            "messages": chat_messages(prompt),
            "temperature": 0.0,
            "max_tokens": target.max_new_tokens,
            "logprobs": True,
        }
        if target.kind == "choice":
            body["structured_outputs"] = {"choice": list(target.labels)}
            body["top_logprobs"] = target.top_logprobs
        else:
            body["structured_outputs"] = {"json": target.schema}
        answer = await self._http.chat("/v1/chat/completions", body)
        if target.kind == "choice":
            return choice_prediction(answer.content, answer.tokens, target.labels)
        return self._json_prediction(answer.content, answer.tokens)

    async def _truncate(self, text: str, target: VllmTarget, reserved: int = 0) -> str:
        """Cut the input text (not the prompt's instructions) to max_input_tokens minus
        ``reserved``, with the served model's own tokenizer, keeping the start or the
        end as truncation_side says. A byte-level tokenizer never makes more tokens
        than bytes, so short texts skip the two round trips."""
        budget = max(1, target.max_input_tokens - reserved)
        if len(text.encode("utf-8")) <= budget:
            return text
        tokens = await self._http.tokenize(target.model, text)
        if len(tokens) <= budget:
            return text
        kept = keep_tokens(tokens, budget, target.truncation_side)
        return await self._http.detokenize(target.model, kept)

    def _json_prediction(self, content: str, tokens: list[dict[str, Any]]) -> Prediction:
        assert self._validator is not None  # set for every JSON task
        return validated_json(content, mean_token_probability(tokens), self._validator)

    async def _classify_one(self, text: str, target: VllmTarget) -> Prediction:
        # vLLM's truncate_prompt_tokens keeps the END of the input; the policy's
        # truncation_side decides here instead. Two tokens are left for the encoder's
        # start and end markers ([CLS]/[SEP], <s>/</s>); truncate_prompt_tokens stays
        # as the hard cap in case a model adds more.
        text = await self._truncate(text, target, reserved=_ENCODER_SPECIAL_TOKENS)
        label, probs = await self._http.classify(
            "/classify",
            {
                "model": target.model,
                "input": [text],
                "truncate_prompt_tokens": target.max_input_tokens,
            },
        )
        return classify_prediction(label, probs, target.labels)


def _replace(target: VllmTarget, **changes: Any) -> VllmTarget:
    return replace(target, **changes)


def choice_prediction(
    content: str, tokens: list[dict[str, Any]], labels: tuple[str, ...]
) -> Prediction:
    """The label, its probability and, where the first token's top-k covers every
    label, the distribution over labels (:func:`distilld.openai_http.label_confidence`)."""
    if content not in labels:
        raise BackendUnavailable(
            f"vLLM answered {content!r} under a choice constraint over {list(labels)}; "
            "the server ignored structured_outputs (is it vLLM >= 0.10?)"
        )
    confidence, distribution = label_confidence(content, tokens, labels)
    return Prediction(output=content, confidence=confidence, probabilities=distribution)


def classify_prediction(label: str, probs: list[float], labels: tuple[str, ...]) -> Prediction:
    """A sequence-classification answer: the label, its probability the highest one."""
    if label not in labels:
        raise BackendError(
            f"the served classifier answered label {label!r}, not one of the policy's "
            f"{list(labels)}; serve a model trained for this label set"
        )
    return Prediction(output=label, confidence=max(probs) if probs else 1.0)


def batch_failure(failures: Sequence[BaseException]) -> BaseException:
    """The failure that decides a batch's fate, worst first: an interruption; the
    server not answering (or answering garbage), which holds the batch; an HTTP
    5xx, which holds it unless the server is healthy; then any other error, about
    one input (the loop isolates it)."""

    def rank(failure: BaseException) -> int:
        if not isinstance(failure, Exception):
            return 0
        if isinstance(failure, BackendUnavailable):
            return 2 if isinstance(failure, EndpointUnavailable) and failure.server_error else 1
        return 3

    return min(failures, key=rank)
