"""The vLLM student backend: vLLM's OpenAI-compatible HTTP API, many requests at once.

vLLM batches continuously on its side, so the daemon must not send a batch
one request at a time: every input of a batch becomes its own HTTP request,
sent concurrently (bounded by ``concurrency``) from a private asyncio loop on
a background thread. ``predict`` stays synchronous for the serving loop.

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

Connection errors, timeouts, 5xx answers and malformed bodies raise
:class:`BackendUnavailable`: the serving loop holds the batch and retries it,
so nothing is lost while vLLM is down. A 4xx answer is about the input and
raises :class:`BackendError` (the loop isolates and dead-letters that input).

With an API key (``student.vllm.api_key_env`` / ``api_key_file`` for an
external server, a key of its own for a managed one), every request carries
it as a bearer token: vLLM started with ``--api-key`` / ``VLLM_API_KEY``
then refuses ``/v1`` requests, runtime LoRA loads included, from anyone
else. The key lives only in the HTTP client's headers and is masked in every
error message.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import httpx
import jsonschema

from distilld.credentials import Redactor, excerpt
from distilld.errors import BackendError, BackendUnavailable
from distilld.serving.base import Prediction, validated_json

T = TypeVar("T")

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
        self, target: VllmTarget, model_version: str, *, api_key: str | None = None
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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-client", daemon=True
        )
        self._thread.start()
        self._redact = Redactor(api_key)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: httpx.AsyncClient = self._run(self._make_client(headers))
        self._semaphore: asyncio.Semaphore = self._run(self._make_semaphore())

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
        self._run(
            self._post(
                "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, expect_json=False
            )
        )
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
            predictions = self._run(self._predict_all(list(inputs), target))
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
        return [replace(p, model_version=version) for p in predictions]

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    # -- the asyncio side -------------------------------------------------------

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    async def _make_client(self, headers: dict[str, str]) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=self._target.concurrency,
            max_keepalive_connections=self._target.concurrency,
        )
        return httpx.AsyncClient(
            base_url=self._target.base_url,
            headers=headers,
            limits=limits,
            timeout=httpx.Timeout(self._target.timeout_s),
        )

    async def _make_semaphore(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self._target.concurrency)

    async def _predict_all(self, texts: list[str], target: VllmTarget) -> list[Prediction]:
        if target.kind == "classify":
            return await self._classify(texts, target)
        return list(await asyncio.gather(*(self._complete(t, target) for t in texts)))

    async def _post(
        self, path: str, body: dict[str, Any], expect_json: bool = True
    ) -> dict[str, Any]:
        async with self._semaphore:
            try:
                response = await self._client.post(path, json=body)
            except httpx.TransportError as exc:  # connect, read, timeouts
                raise BackendUnavailable(
                    self._redact(
                        f"vLLM at {self._target.base_url} did not answer {path}: "
                        f"{type(exc).__name__}: {exc}"
                    )
                ) from exc
        if response.status_code >= 500:
            raise BackendUnavailable(
                f"vLLM at {self._target.base_url} answered {path} with HTTP "
                f"{response.status_code}: {self._redact.excerpt(response.text)}"
            )
        if response.status_code >= 400:
            raise BackendError(
                f"vLLM refused the request to {path} (HTTP {response.status_code}): "
                f"{self._redact.excerpt(response.text, 300)}"
            )
        if not expect_json:
            return {}
        try:
            doc = response.json()
        except ValueError as exc:
            raise BackendUnavailable(
                f"vLLM answered {path} with a body that is not JSON: "
                f"{self._redact.excerpt(response.text)!r}"
            ) from exc
        if not isinstance(doc, dict):
            raise BackendUnavailable(
                f"vLLM answered {path} with {type(doc).__name__}, not an object"
            )
        return doc

    async def _complete(self, text: str, target: VllmTarget) -> Prediction:
        assert target.prompt is not None
        prompt = target.prompt.replace("{input}", await self._truncate(text, target))
        body: dict[str, Any] = {
            "model": target.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.0,
            "max_tokens": target.max_new_tokens,
            "logprobs": True,
        }
        if target.kind == "choice":
            body["structured_outputs"] = {"choice": list(target.labels)}
            body["top_logprobs"] = target.top_logprobs
        else:
            body["structured_outputs"] = {"json": target.schema}
        doc = await self._post("/v1/chat/completions", body)
        try:
            choice = doc["choices"][0]
            content = choice["message"]["content"] or ""
            tokens = (choice.get("logprobs") or {}).get("content") or []
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendUnavailable(
                f"vLLM chat completion without choices[0].message: {self._redact.excerpt(str(doc))}"
            ) from exc
        if target.kind == "choice":
            return choice_prediction(content, tokens, target.labels)
        return self._json_prediction(content, tokens)

    async def _truncate(self, text: str, target: VllmTarget, reserved: int = 0) -> str:
        """Cut the input text (not the prompt's instructions) to max_input_tokens minus
        ``reserved``, with the served model's own tokenizer, keeping the start or the
        end as truncation_side says. A byte-level tokenizer never makes more tokens
        than bytes, so short texts skip the two round trips."""
        budget = max(1, target.max_input_tokens - reserved)
        if len(text.encode("utf-8")) <= budget:
            return text
        doc = await self._post(
            "/tokenize", {"model": target.model, "prompt": text, "add_special_tokens": False}
        )
        tokens = doc.get("tokens")
        if not isinstance(tokens, list):
            raise BackendUnavailable(
                f"vLLM /tokenize answer without tokens: {self._redact.excerpt(str(doc))}"
            )
        if len(tokens) <= budget:
            return text
        kept = tokens[:budget] if target.truncation_side == "right" else tokens[-budget:]
        doc = await self._post("/detokenize", {"model": target.model, "tokens": kept})
        prompt = doc.get("prompt")
        if not isinstance(prompt, str):
            raise BackendUnavailable(
                f"vLLM /detokenize answer without prompt: {self._redact.excerpt(str(doc))}"
            )
        return prompt

    def _json_prediction(self, content: str, tokens: list[dict[str, Any]]) -> Prediction:
        assert self._validator is not None  # set for every JSON task
        return validated_json(content, mean_token_probability(tokens), self._validator)

    async def _classify(self, texts: list[str], target: VllmTarget) -> list[Prediction]:
        # One request per input, sent together: vLLM batches them itself.
        docs = await asyncio.gather(*(self._classify_one(text, target) for text in texts))
        return [_classify_prediction(doc, target.labels) for doc in docs]

    async def _classify_one(self, text: str, target: VllmTarget) -> dict[str, Any]:
        # vLLM's truncate_prompt_tokens keeps the END of the input; the policy's
        # truncation_side decides here instead. Two tokens are left for the encoder's
        # start and end markers ([CLS]/[SEP], <s>/</s>); truncate_prompt_tokens stays
        # as the hard cap in case a model adds more.
        text = await self._truncate(text, target, reserved=_ENCODER_SPECIAL_TOKENS)
        return await self._post(
            "/classify",
            {
                "model": target.model,
                "input": [text],
                "truncate_prompt_tokens": target.max_input_tokens,
            },
        )


def _replace(target: VllmTarget, **changes: Any) -> VllmTarget:
    return replace(target, **changes)


def mean_token_probability(tokens: list[dict[str, Any]]) -> float:
    """exp(mean log-probability) of the generated tokens (1.0 when vLLM sent none)."""
    values = [t["logprob"] for t in tokens if isinstance(t.get("logprob"), int | float)]
    finite = [v for v in values if math.isfinite(v)]
    return math.exp(sum(finite) / len(finite)) if finite else 0.0 if values else 1.0


def choice_prediction(
    content: str, tokens: list[dict[str, Any]], labels: tuple[str, ...]
) -> Prediction:
    """The label, its probability and, where the first token's top-k covers every
    label, the distribution over labels (top-k probabilities renormalised)."""
    if content not in labels:
        raise BackendUnavailable(
            f"vLLM answered {content!r} under a choice constraint over {list(labels)}; "
            "the server ignored structured_outputs (is it vLLM >= 0.10?)"
        )
    sequence_probability = (
        math.exp(sum(t["logprob"] for t in tokens if isinstance(t.get("logprob"), int | float)))
        if tokens
        else 1.0
    )
    distribution = _label_distribution(tokens[0] if tokens else {}, labels)
    if distribution is None:
        return Prediction(output=content, confidence=min(1.0, sequence_probability))
    return Prediction(output=content, confidence=distribution[content], probabilities=distribution)


def _label_distribution(first: dict[str, Any], labels: tuple[str, ...]) -> dict[str, float] | None:
    """Map each label to the longest top-k token that starts it; None unless every
    label has its own token (then the labels are told apart by their first token)."""
    candidates = [
        (str(c.get("token", "")), c.get("logprob")) for c in first.get("top_logprobs") or []
    ]
    chosen: dict[str, tuple[str, float]] = {}
    for label in labels:
        matches = [
            (tok, lp)
            for tok, lp in candidates
            if tok.strip()
            and label.startswith(tok.strip())
            and isinstance(lp, int | float)
            and math.isfinite(lp)
        ]
        if not matches:
            return None
        chosen[label] = max(matches, key=lambda m: len(m[0].strip()))
    if len({tok for tok, _ in chosen.values()}) != len(labels):
        return None  # two labels share their first token: top-k cannot tell them apart
    weights = {label: math.exp(lp) for label, (_tok, lp) in chosen.items()}
    total = sum(weights.values())
    return {label: w / total for label, w in weights.items()}


def _classify_prediction(doc: dict[str, Any], labels: tuple[str, ...]) -> Prediction:
    try:
        item = doc["data"][0]
        probs = [float(p) for p in item["probs"]]
        label = str(item["label"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise BackendUnavailable(
            f"vLLM /classify answer without data[0]: {excerpt(str(doc))}"
        ) from exc
    if label not in labels:
        raise BackendError(
            f"the served classifier answered label {label!r}, not one of the policy's "
            f"{list(labels)}; serve a model trained for this label set"
        )
    return Prediction(output=label, confidence=max(probs) if probs else 1.0)
