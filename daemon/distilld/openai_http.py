"""One client for OpenAI-compatible HTTP endpoints: the vLLM student's server and the teacher.

:class:`OpenAIHttp` sends requests concurrently (at most ``concurrency`` at a
time) from a private asyncio loop on a background thread, so its synchronous
callers (the serving loop, the shadow worker) hand it a whole batch at once
(:meth:`OpenAIHttp.run`). The API key, when there is one, lives only in the
HTTP client's headers.

Errors are mapped here, once, into the daemon's exception tree
(:mod:`distilld.errors`); callers decide what each means for them (the teacher
retries, the serving loop holds or dead-letters):

=====================================================  ===========================
connection error, timeout (``timeout_s`` bounds the     :class:`EndpointUnavailable`
whole request), HTTP 5xx, 408, 429, a body that is      (``status``: the HTTP status
not JSON or not the answer expected                     of an error answer, or None)
HTTP 401, 403                                           :class:`EndpointAuthRefused`
any other HTTP 4xx                                      :class:`EndpointRefused`
=====================================================  ===========================

Every text quoted from the endpoint (an error body, a malformed answer) is
masked first, then cut (:meth:`distilld.credentials.Redactor.excerpt`): an
endpoint may echo a rejected key back.

The parsers below read the answers (chat completions with their token
log-probabilities, ``/classify``, ``/tokenize``, ``/detokenize``,
``/v1/models``); they are pure functions, raising :class:`MalformedAnswer`,
which the client turns into :class:`EndpointUnavailable`.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from distilld.credentials import Redactor
from distilld.errors import EndpointAuthRefused, EndpointRefused, EndpointUnavailable

T = TypeVar("T")

#: Statuses that say "try again later": the server is overloaded, restarting or rate-limiting.
RETRY_LATER_STATUS = frozenset({408, 429})
#: Statuses that say the key is missing or wrong.
AUTH_STATUS = frozenset({401, 403})
#: How long a health check may take before the server counts as unhealthy.
HEALTH_TIMEOUT_S = 5.0


class MalformedAnswer(ValueError):
    """An answer that is JSON but not the shape expected; says what is missing."""


@dataclass(frozen=True)
class ChatAnswer:
    """A chat completion's answer text and its tokens' log-probabilities (each
    ``{"token", "logprob", "top_logprobs": [...]}``; empty when none were asked for)."""

    content: str
    tokens: list[dict[str, Any]]


class OpenAIHttp:
    """An OpenAI-compatible endpoint at ``base_url``, called from synchronous code.

    ``name`` says whose endpoint it is in error messages (``vLLM``, ``teacher``);
    ``timeout_field`` names the setting ``timeout_s`` comes from. ``transport``
    replaces the network (tests pass an ``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        name: str,
        concurrency: int,
        timeout_s: float,
        timeout_field: str,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        thread_name: str = "openai-http",
    ) -> None:
        self.base_url = base_url
        self.redact = Redactor(api_key)
        self._where = f"{name} at {base_url}"
        self._timeout_s = timeout_s
        self._timeout_field = timeout_field
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=thread_name, daemon=True
        )
        self._thread.start()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: httpx.AsyncClient = self.run(
            self._open(headers, concurrency, transport, base_url)
        )
        self._semaphore: asyncio.Semaphore = self.run(self._make_semaphore(concurrency))

    def __repr__(self) -> str:
        return f"OpenAIHttp({self._where!r})"

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the client's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    def close(self) -> None:
        """Close the connections and stop the loop. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.run(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    # -- requests (coroutines: run them with run(), or gather them in one) -----------

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` as JSON to ``path``; the answer's JSON value."""
        response = await self._send("POST", path, body)
        try:
            return response.json()
        except ValueError:
            raise EndpointUnavailable(
                f"{self._where} answered {path} (HTTP {response.status_code}) with a body "
                f"that is not JSON: {self.redact.excerpt(response.text)!r}"
            ) from None

    async def post_ignoring_answer(self, path: str, body: dict[str, Any]) -> None:
        """POST ``body`` to ``path`` for its effect; the answer body is not read as JSON."""
        await self._send("POST", path, body)

    async def chat(self, path: str, body: dict[str, Any]) -> ChatAnswer:
        """A chat completion (``path``: ``/v1/chat/completions`` or relative to a /v1 base)."""
        return self._parsed(path, await self.post(path, body), chat_answer)

    async def classify(self, path: str, body: dict[str, Any]) -> tuple[str, list[float]]:
        """vLLM's ``/classify`` for one input: its label and class probabilities."""
        return self._parsed(path, await self.post(path, body), classify_answer)

    async def tokenize(self, model: str, text: str) -> list[int]:
        """vLLM's ``/tokenize`` (no special tokens added): the text's token ids."""
        body = {"model": model, "prompt": text, "add_special_tokens": False}
        return self._parsed("/tokenize", await self.post("/tokenize", body), tokenize_answer)

    async def detokenize(self, model: str, tokens: Sequence[int]) -> str:
        """vLLM's ``/detokenize``: the text of ``tokens``."""
        body = {"model": model, "tokens": list(tokens)}
        return self._parsed("/detokenize", await self.post("/detokenize", body), detokenize_answer)

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """vLLM's runtime LoRA load: the adapter at ``path`` served under ``name``."""
        body = {"lora_name": name, "lora_path": path}
        await self.post_ignoring_answer("/v1/load_lora_adapter", body)

    async def healthy(self, path: str = "/health") -> bool:
        """True when the server's health endpoint answers 200 within HEALTH_TIMEOUT_S
        (vLLM's ``/health`` answers 503 while its engine is dead or warming up)."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                response = await self._client.get(path)
        except (TimeoutError, httpx.HTTPError):
            return False
        return response.status_code == 200

    # -- the boundary ---------------------------------------------------------------

    async def _open(
        self,
        headers: dict[str, str],
        concurrency: int,
        transport: httpx.AsyncBaseTransport | None,
        base_url: str,
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            timeout=httpx.Timeout(self._timeout_s),
            transport=transport,
        )

    async def _make_semaphore(self, concurrency: int) -> asyncio.Semaphore:
        return asyncio.Semaphore(concurrency)

    async def _send(self, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
        async with self._semaphore:
            try:
                # httpx's timeout bounds each phase; this bounds the whole request
                # (a server that trickles bytes never trips a per-read timeout).
                async with asyncio.timeout(self._timeout_s):
                    response = await self._client.request(method, path, json=body)
            except TimeoutError:
                raise EndpointUnavailable(
                    f"{self._where} did not answer {path} within "
                    f"{self._timeout_field}={self._timeout_s:g} s"
                ) from None
            except httpx.RequestError as exc:  # connect, read, protocol, decoding errors
                raise EndpointUnavailable(
                    self.redact(f"{self._where} did not answer {path}: {type(exc).__name__}: {exc}")
                ) from None
        raise_for_status(response, self._where, path, self.redact)
        return response

    def _parsed(self, path: str, doc: Any, parser: Callable[[Any], T]) -> T:
        try:
            return parser(doc)
        except MalformedAnswer as exc:
            shown = self.redact.excerpt(json.dumps(doc, default=str))
            raise EndpointUnavailable(f"{self._where} answered {path} {exc}: {shown}") from None


def raise_for_status(response: httpx.Response, where: str, path: str, redact: Redactor) -> None:
    """Map an error status to the exception tree (see the module's table); the body
    is quoted masked, then cut."""
    status = response.status_code
    if status < 400:
        return
    body = redact.excerpt(response.text)
    if status >= 500 or status in RETRY_LATER_STATUS:
        raise EndpointUnavailable(f"{where} answered {path} with HTTP {status}: {body}", status)
    refused = EndpointAuthRefused if status in AUTH_STATUS else EndpointRefused
    raise refused(f"{where} refused the request to {path} (HTTP {status}): {body}", status)


# -- parsers: an answer's JSON value in, what it says out -------------------------------


def chat_answer(doc: Any) -> ChatAnswer:
    """The answer text and its token log-probabilities from a chat completion."""
    try:
        choice = doc["choices"][0]
        content = choice["message"]["content"] or ""
        tokens = (choice.get("logprobs") or {}).get("content") or []
        if not isinstance(content, str) or not isinstance(tokens, list):
            raise TypeError("content must be a string and logprobs.content a list")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise MalformedAnswer(
            f"with a chat completion without choices[0].message.content ({exc})"
        ) from None
    return ChatAnswer(content, [t for t in tokens if isinstance(t, dict)])


def classify_answer(doc: Any) -> tuple[str, list[float]]:
    """vLLM's ``/classify`` answer for one input: ``data[0]``'s label and probabilities."""
    try:
        item = doc["data"][0]
        return str(item["label"]), [float(p) for p in item["probs"]]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise MalformedAnswer(f"without data[0].label and data[0].probs ({exc!r})") from None


def tokenize_answer(doc: Any) -> list[int]:
    tokens = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(tokens, list):
        raise MalformedAnswer("without a list of tokens")
    return tokens


def detokenize_answer(doc: Any) -> str:
    prompt = doc.get("prompt") if isinstance(doc, dict) else None
    if not isinstance(prompt, str):
        raise MalformedAnswer("without the prompt text")
    return prompt


def served_model_ids(doc: Any) -> list[str]:
    """The model names a ``GET /v1/models`` answer lists."""
    try:
        return [str(item["id"]) for item in doc["data"]]
    except (KeyError, TypeError) as exc:
        raise MalformedAnswer(f"without data[].id ({exc!r})") from None


# -- reading token log-probabilities ------------------------------------------------------


def mean_token_probability(tokens: list[dict[str, Any]]) -> float:
    """exp(mean log-probability) of the generated tokens (1.0 when the answer came
    without log-probabilities, 0.0 when none of them is finite)."""
    values = [t["logprob"] for t in tokens if isinstance(t.get("logprob"), int | float)]
    finite = [v for v in values if math.isfinite(v)]
    return math.exp(sum(finite) / len(finite)) if finite else 0.0 if values else 1.0


def label_confidence(
    label: str, tokens: list[dict[str, Any]], labels: Sequence[str]
) -> tuple[float, dict[str, float] | None]:
    """The probability of ``label`` (one of ``labels``) and, where the first answer
    token's top-k covers every label, the distribution over labels (top-k
    probabilities renormalised; the label's probability is then its share).
    Without the distribution: the answer sequence's probability (1.0 without
    log-probabilities)."""
    distribution = _label_distribution(tokens[0] if tokens else {}, labels)
    if distribution is not None:
        return distribution[label], distribution
    sequence = (
        math.exp(sum(t["logprob"] for t in tokens if isinstance(t.get("logprob"), int | float)))
        if tokens
        else 1.0
    )
    return min(1.0, sequence), None


def _label_distribution(first: dict[str, Any], labels: Sequence[str]) -> dict[str, float] | None:
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


def token_top_logprobs(tokens: list[dict[str, Any]]) -> tuple[dict[str, float], ...] | None:
    """Per answer token, its top-k alternatives (token -> log-probability), the chosen
    token included; None when the answer came without log-probabilities."""
    steps: list[dict[str, float]] = []
    for token in tokens:
        step: dict[str, float] = {}
        for alternative in token.get("top_logprobs") or []:
            if isinstance(alternative, dict) and isinstance(alternative.get("token"), str):
                logprob = alternative.get("logprob")
                if isinstance(logprob, int | float):
                    step[alternative["token"]] = float(logprob)
        chosen, logprob = token.get("token"), token.get("logprob")
        if isinstance(chosen, str) and isinstance(logprob, int | float):
            step.setdefault(chosen, float(logprob))
        if not step:
            return None
        steps.append(step)
    return tuple(steps) or None
