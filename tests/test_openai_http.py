"""The shared OpenAI-compatible client: error mapping, masking, parsers.

The endpoint is an ``httpx.MockTransport`` (no socket): each test's handler
answers like the server case it is about. The teacher and the vLLM student
tests run the same client against real local HTTP servers.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from distilld.errors import (
    BackendError,
    BackendUnavailable,
    EndpointAuthRefused,
    EndpointRefused,
    EndpointUnavailable,
)
from distilld.openai_http import (
    MalformedAnswer,
    OpenAIHttp,
    chat_answer,
    classify_answer,
    detokenize_answer,
    label_confidence,
    mean_token_probability,
    served_model_ids,
    token_top_logprobs,
    tokenize_answer,
)

KEY = "sk-shared-0123456789abcdef"
Handler = Callable[[httpx.Request], Any]


@pytest.fixture
def clients() -> Iterator[list[OpenAIHttp]]:
    made: list[OpenAIHttp] = []
    yield made
    for client in made:
        client.close()


def _client(
    clients: list[OpenAIHttp],
    handler: Handler,
    *,
    api_key: str | None = None,
    concurrency: int = 4,
    timeout_s: float = 5.0,
) -> OpenAIHttp:
    client = OpenAIHttp(
        "http://endpoint.test",
        name="vLLM",
        api_key=api_key,
        concurrency=concurrency,
        timeout_s=timeout_s,
        timeout_field="student.vllm.timeout_s",
        transport=httpx.MockTransport(handler),
    )
    clients.append(client)
    return client


def _answer(status: int, body: Any = None) -> Handler:
    def handler(_request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body if body is not None else {})

    return handler


def _completion(content: Any, tokens: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content}}
    if tokens is not None:
        choice["logprobs"] = {"content": tokens}
    return {"choices": [choice]}


# -- error mapping --------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_5xx_is_unavailable_and_says_the_server_answered(
    clients: list[OpenAIHttp], status: int
) -> None:
    http = _client(clients, _answer(status, {"error": "engine crashed"}))
    with pytest.raises(EndpointUnavailable) as caught:
        http.run(http.post("/v1/chat/completions", {}))
    assert isinstance(caught.value, BackendUnavailable)
    assert caught.value.status == status and caught.value.server_error
    assert f"HTTP {status}" in str(caught.value) and "engine crashed" in str(caught.value)
    assert "vLLM at http://endpoint.test" in str(caught.value)


@pytest.mark.parametrize("status", [408, 429])
def test_timeouts_and_rate_limits_are_unavailable_but_no_server_error(
    clients: list[OpenAIHttp], status: int
) -> None:
    http = _client(clients, _answer(status, {"error": "slow down"}))
    with pytest.raises(EndpointUnavailable) as caught:
        http.run(http.post("/v1/chat/completions", {}))
    assert caught.value.status == status and not caught.value.server_error


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, EndpointAuthRefused),
        (403, EndpointAuthRefused),
        (400, EndpointRefused),
        (404, EndpointRefused),
        (413, EndpointRefused),
        (422, EndpointRefused),
    ],
)
def test_a_4xx_is_a_refusal_and_401_403_an_auth_refusal(
    clients: list[OpenAIHttp], status: int, error: type[EndpointRefused]
) -> None:
    http = _client(clients, _answer(status, {"error": "no"}))
    with pytest.raises(EndpointRefused) as caught:
        http.run(http.post("/classify", {}))
    assert type(caught.value) is error
    assert isinstance(caught.value, BackendError)
    assert not isinstance(caught.value, BackendUnavailable)
    assert caught.value.status == status
    assert f"refused the request to /classify (HTTP {status})" in str(caught.value)


def test_no_answer_is_unavailable_without_a_status(clients: list[OpenAIHttp]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    http = _client(clients, refuse)
    with pytest.raises(EndpointUnavailable, match="did not answer /tokenize: ConnectError") as c:
        http.run(http.post("/tokenize", {}))
    assert c.value.status is None and not c.value.server_error


def test_the_whole_request_is_bounded_by_timeout_s(clients: list[OpenAIHttp]) -> None:
    async def trickle(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json={})

    http = _client(clients, trickle, timeout_s=0.05)
    with pytest.raises(EndpointUnavailable, match=r"within student\.vllm\.timeout_s=0\.05 s"):
        http.run(http.post("/v1/chat/completions", {}))


def test_a_body_that_is_not_json_is_unavailable(clients: list[OpenAIHttp]) -> None:
    http = _client(clients, _answer(200, "<html>proxy error</html>"))
    with pytest.raises(EndpointUnavailable, match=r"not JSON.*proxy error"):
        http.run(http.post("/v1/chat/completions", {}))


def test_a_malformed_answer_is_unavailable_and_quoted(clients: list[OpenAIHttp]) -> None:
    http = _client(clients, _answer(200, {"choices": []}))
    with pytest.raises(EndpointUnavailable, match=r"without choices\[0\]") as caught:
        http.run(http.chat("/v1/chat/completions", {}))
    assert '{"choices": []}' in str(caught.value)


def test_the_key_is_sent_and_masked_before_the_body_is_cut(clients: list[OpenAIHttp]) -> None:
    seen: list[str | None] = []
    body = {"text": ""}

    def echo(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(int(body["status"]), text=body["text"])

    http = _client(clients, echo, api_key=KEY)
    for status in (500, 401, 400, 200):
        for offset in (0, 150, 190, 195, 199):
            body.update(status=str(status), text="x" * offset + KEY + "y" * 400)
            with pytest.raises((EndpointUnavailable, EndpointRefused)) as caught:
                http.run(http.post("/v1/chat/completions", {}))
            for length in (4, 8, len(KEY)):
                assert KEY[:length] not in str(caught.value), (status, offset, length)
    assert set(seen) == {f"Bearer {KEY}"}
    assert KEY not in repr(http.__dict__)


def test_without_a_key_no_authorization_header(clients: list[OpenAIHttp]) -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text="")

    http = _client(clients, record)
    http.run(http.load_lora_adapter("v2", "/registry/v2"))
    assert "Authorization" not in seen[0].headers
    assert seen[0].url.path == "/v1/load_lora_adapter"
    assert json.loads(seen[0].content) == {"lora_name": "v2", "lora_path": "/registry/v2"}


def test_requests_are_bounded_by_concurrency(clients: list[OpenAIHttp]) -> None:
    in_flight = 0
    most = 0

    async def slow(_request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(200, json={"tokens": [1]})

    http = _client(clients, slow, concurrency=2)

    async def many() -> list[list[int]]:
        return list(await asyncio.gather(*(http.tokenize("m", "t") for _ in range(8))))

    assert http.run(many()) == [[1]] * 8
    assert most == 2


@pytest.mark.parametrize(
    ("answer", "healthy"),
    [(_answer(200, ""), True), (_answer(503, ""), False), (_answer(404, ""), False)],
)
def test_healthy_means_health_answers_200(
    clients: list[OpenAIHttp], answer: Handler, healthy: bool
) -> None:
    http = _client(clients, answer)
    assert http.run(http.healthy()) is healthy


def test_unreachable_is_not_healthy(clients: list[OpenAIHttp]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    http = _client(clients, refuse)
    assert http.run(http.healthy()) is False


def test_close_is_safe_twice(clients: list[OpenAIHttp]) -> None:
    http = _client(clients, _answer(200))
    http.close()
    http.close()
    assert http.closed


# -- parsers --------------------------------------------------------------------------


def test_chat_answer_reads_content_and_token_logprobs() -> None:
    tokens = [{"token": "pos", "logprob": -0.1, "top_logprobs": []}, "junk"]
    answer = chat_answer(_completion("positive", tokens))  # type: ignore[list-item]
    assert answer.content == "positive"
    assert answer.tokens == [tokens[0]]
    assert chat_answer(_completion(None)).content == ""  # a refusal without text
    for bad in ({"choices": []}, [1, 2], {"choices": [{"message": {"content": 3}}]}, None):
        with pytest.raises(MalformedAnswer, match="without choices"):
            chat_answer(bad)


def test_the_other_parsers() -> None:
    assert classify_answer({"data": [{"label": "fresh", "probs": [0.9, 0.1]}]}) == (
        "fresh",
        [0.9, 0.1],
    )
    assert tokenize_answer({"tokens": [1, 2]}) == [1, 2]
    assert detokenize_answer({"prompt": "hi"}) == "hi"
    assert served_model_ids({"object": "list", "data": [{"id": "a"}, {"id": "b"}]}) == ["a", "b"]
    for parser, bad in (
        (classify_answer, {"data": []}),
        (classify_answer, {"data": [{"label": "x", "probs": ["p"]}]}),
        (tokenize_answer, {"tokens": "1 2"}),
        (tokenize_answer, [1, 2]),
        (detokenize_answer, {}),
        (served_model_ids, {"data": [{}]}),
        (served_model_ids, "models"),
    ):
        with pytest.raises(MalformedAnswer):
            parser(bad)


def test_label_confidence_with_and_without_a_distribution() -> None:
    first = {
        "token": "pos",
        "logprob": math.log(0.6),
        "top_logprobs": [
            {"token": "pos", "logprob": math.log(0.6)},
            {"token": " neg", "logprob": math.log(0.2)},
            {"token": "meh", "logprob": math.log(0.1)},
        ],
    }
    confidence, distribution = label_confidence("positive", [first], ["positive", "negative"])
    assert distribution == pytest.approx({"positive": 0.75, "negative": 0.25})
    assert confidence == pytest.approx(0.75)
    # A label without its own token in the top-k: the sequence's probability only.
    confidence, distribution = label_confidence("positive", [first], ["positive", "other"])
    assert distribution is None and confidence == pytest.approx(0.6)
    assert label_confidence("positive", [], ["positive", "negative"]) == (1.0, None)


def test_mean_token_probability_and_top_logprobs() -> None:
    tokens = [{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -0.3}]
    assert mean_token_probability(tokens) == pytest.approx(math.exp(-0.2))
    assert mean_token_probability([]) == 1.0
    assert mean_token_probability([{"logprob": -math.inf}]) == 0.0
    top = [{"token": "a", "logprob": -0.1, "top_logprobs": [{"token": "b", "logprob": -2.0}]}]
    assert token_top_logprobs(top) == ({"b": -2.0, "a": -0.1},)
    assert token_top_logprobs([{"token": "a"}]) is None
    assert token_top_logprobs([]) is None
