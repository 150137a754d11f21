"""The Ollama adapter against a real fake Ollama server over loopback HTTP and NDJSON.

Every chat test drives ``OllamaProvider`` with a real ``aiohttp.ClientSession`` against
``tests.fakes.ollama_upstream`` and checks both what the caller gets (events, errors) and
what the server received (the translated body, headers). Timeouts are short so the stall
tests stay fast.
"""

from __future__ import annotations

import asyncio
import base64
import re
import struct
import time
import traceback
from collections.abc import Iterator
from types import MappingProxyType, SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest

from parley.domain.events import (
    Chunk,
    Finish,
    ReasoningDelta,
    ResponseStart,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from parley.domain.messages import ChatRequest, Message, ToolCall
from parley.domain.usage import Usage
from parley.errors import (
    InvalidRequest,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamInterrupted,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from parley.providers import ollama_wire as wire
from parley.providers.ollama import OllamaProvider, server_root
from parley.settings import ProviderConfig, Secret, Timeouts
from tests.fakes.ollama_upstream import CREATED, MID_STREAM_ERROR, MODELS, FakeOllama
from tests.providers.support import closed_port_url, collect, error_of, events, text

CANARY = "sk-canary-5e8b1d2c9a7f4036"
WEATHER = MappingProxyType(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
)
CLOCK = MappingProxyType({"type": "function", "function": {"name": "get_time"}})


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as upstream:
        yield upstream


def make_provider(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    key: str | None = None,
    first_byte: float = 5.0,
    idle: float = 5.0,
    total: float = 30.0,
) -> OllamaProvider:
    config = ProviderConfig(
        name="local",
        kind="ollama",
        base_url=base_url,
        api_key=Secret(key) if key is not None else None,
        timeouts=Timeouts(connect=2.0, first_byte=first_byte, idle=idle, total=total),
    )
    return OllamaProvider(config, session)


def request(text: str = "hello big world", *, stream: bool = False, **fields: Any) -> ChatRequest:
    return ChatRequest(model="local/x", messages=(Message("user", text),), stream=stream, **fields)


def chat(*messages: Message, stream: bool = False, **fields: Any) -> ChatRequest:
    return ChatRequest(model="local/x", messages=messages, stream=stream, **fields)


def sent(fake: FakeOllama) -> dict[str, Any]:
    """The body of the last chat request the fake received."""
    path, _, body = fake.received[-1]
    assert path == "/api/chat"
    assert isinstance(body, dict)
    return body


# -- answers ------------------------------------------------------------------------------


async def test_non_streaming_answer_events_and_usage(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    [chunk] = await collect(provider.chat(request(), "llama3.2"))
    assert chunk.final and chunk.raw is None and chunk.protocol is None
    start, *rest = chunk.events
    assert isinstance(start, ResponseStart) and re.fullmatch(r"ollama-[0-9a-f]{32}", start.id)
    assert (start.model, start.created) == ("llama3.2", CREATED)
    assert rest == [
        TextDelta(0, "echo: hello big world"),
        Finish(0, "stop"),
        UsageReport(Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)),
    ]
    path, headers, body = fake.received[-1]
    assert path == "/api/chat" and "Authorization" not in headers
    assert body == {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hello big world"}],
        "stream": False,
    }


async def test_streaming_deltas_reassemble_and_the_done_line_is_final(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    chunks = await collect(provider.chat(request(stream=True), "llama3.2"))
    assert sent(fake)["stream"] is True
    assert text(chunks) == "echo: hello big world"
    assert len(events(chunks, TextDelta)) == 4 and len(events(chunks, ResponseStart)) == 1
    assert all(c.raw is None and c.protocol is None for c in chunks)
    final = chunks[-1]
    assert final.final and not any(c.final for c in chunks[:-1])
    assert final.events == (Finish(0, "stop"), UsageReport(Usage(3, 4, 7)))


async def test_each_response_gets_its_own_id(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    ids = set()
    for stream in (False, True, True):
        chunks = await collect(provider.chat(request(stream=stream), "llama3.2"))
        ids.add(events(chunks, ResponseStart)[0].id)
    assert len(ids) == 3


async def test_a_stream_cut_at_awkward_places_reads_the_same(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    # Lines split across writes, several per write, blank lines, CRLF, no final newline.
    provider = make_provider(session, fake.base_url)
    chunks = await collect(provider.chat(request(stream=True), "ragged"))
    assert text(chunks) == "echo: hello big world"
    assert chunks[-1].final and events(chunks, Finish) == [Finish(0, "stop")]
    # Lines that arrived in one read are marked so the server can write them at once.
    assert any(c.more for c in chunks) and not chunks[-1].more


@pytest.mark.parametrize("suffix", ["", "/", "/api", "/api/", "/v1", "/v1/"])
async def test_base_url_spellings_reach_the_native_api(
    fake: FakeOllama, session: aiohttp.ClientSession, suffix: str
) -> None:
    provider = make_provider(session, fake.base_url + suffix)
    assert text(await collect(provider.chat(request("hi"), "llama3.2"))) == "echo: hi"
    assert fake.received[-1][0] == "/api/chat"


def test_server_root_rule() -> None:
    assert server_root("http://h:11434") == "http://h:11434"
    assert server_root("http://h:11434/api/") == "http://h:11434"
    assert server_root("https://proxy.example/ollama/v1") == "https://proxy.example/ollama"
    assert server_root("https://proxy.example/apiary") == "https://proxy.example/apiary"


async def test_a_configured_key_is_sent_as_a_bearer_token(session: aiohttp.ClientSession) -> None:
    with FakeOllama(api_key="proxy-key-123") as guarded:
        provider = make_provider(session, guarded.base_url, key="proxy-key-123")
        assert text(await collect(provider.chat(request("hi"), "llama3.2"))) == "echo: hi"
        assert guarded.received[-1][1]["Authorization"] == "Bearer proxy-key-123"
        with pytest.raises(UpstreamHTTPError) as caught:
            await collect(make_provider(session, guarded.base_url).chat(request(), "m"))
        assert caught.value.status_code == 401 and caught.value.error_type == "authentication"


# -- translation --------------------------------------------------------------------------


async def test_system_developer_and_history_are_translated(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    parts = (
        MappingProxyType({"type": "text", "text": "second"}),
        MappingProxyType({"type": "text", "text": "question"}),
    )
    history = chat(
        Message("system", "be brief"),
        Message("developer", "answer in English"),
        Message("user", "first question", name="ann"),
        Message("assistant", "first answer"),
        Message("user", parts),
    )
    chunks = await collect(make_provider(session, fake.base_url).chat(history, "llama3.2"))
    assert sent(fake)["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "answer in English"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second\nquestion"},
    ]
    assert text(chunks) == "echo: second\nquestion"


async def test_sampling_fields_become_options(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    neutral = request(
        max_tokens=50,
        temperature=0.2,
        top_p=0.9,
        stop=("\n\n", "User:"),
        n=1,
        user="u-1",
        extra={
            "seed": 42,
            "top_k": 20,
            "num_ctx": 8192,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.25,
            "keep_alive": "10m",
            # Asking for nothing Ollama lacks: no reason to refuse.
            "logprobs": False,
            "top_logprobs": None,
            "logit_bias": {},
            "metadata": {"k": "v"},
        },
    )
    await collect(make_provider(session, fake.base_url).chat(neutral, "llama3.2"))
    body = sent(fake)
    assert body["options"] == {
        "temperature": 0.2,
        "top_p": 0.9,
        "num_predict": 50,
        "stop": ["\n\n", "User:"],
        "seed": 42,
        "top_k": 20,
        "num_ctx": 8192,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.25,
    }
    assert body["keep_alive"] == "10m"
    assert set(body) == {"model", "messages", "stream", "options", "keep_alive"}


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "json_object"}, "json"),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "age", "schema": {"type": "object", "required": ["a"]}},
            },
            {"type": "object", "required": ["a"]},
        ),
        ({"type": "text"}, None),
    ],
)
async def test_response_format_becomes_format(
    fake: FakeOllama,
    session: aiohttp.ClientSession,
    response_format: dict[str, Any],
    expected: Any,
) -> None:
    neutral = request(extra={"response_format": response_format})
    await collect(make_provider(session, fake.base_url).chat(neutral, "llama3.2"))
    assert sent(fake).get("format") == expected


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("extra", "think"),
    [
        ({"think": True}, True),
        ({"reasoning_effort": "low"}, True),
        ({"reasoning_effort": "none"}, False),
        ({"think": False}, False),
    ],
)
async def test_thinking_is_asked_for_and_comes_back_as_reasoning(
    fake: FakeOllama,
    session: aiohttp.ClientSession,
    stream: bool,
    extra: dict[str, Any],
    think: bool,
) -> None:
    neutral = request("why?", stream=stream, extra=extra)
    chunks = await collect(make_provider(session, fake.base_url).chat(neutral, "qwen3"))
    assert sent(fake)["think"] is think
    reasoning = "".join(e.text for e in events(chunks, ReasoningDelta))
    assert reasoning == ("thinking about: why?" if think else "")
    assert text(chunks) == "echo: why?"


async def test_a_data_url_image_is_sent_as_bare_base64(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    parts = (
        MappingProxyType({"type": "text", "text": "what is this?"}),
        MappingProxyType(
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
            }
        ),
    )
    chunks = await collect(
        make_provider(session, fake.base_url).chat(chat(Message("user", parts)), "llava")
    )
    assert sent(fake)["messages"] == [
        {"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo="]}
    ]
    assert text(chunks) == "echo: what is this?"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://example.com/cat.png", "only inline image bytes"),
        ("data:image/svg+xml,<svg/>", "not base64"),
    ],
)
async def test_images_ollama_cannot_take_are_refused_before_any_call(
    fake: FakeOllama, session: aiohttp.ClientSession, url: str, says: str
) -> None:
    parts = (MappingProxyType({"type": "image_url", "image_url": {"url": url}}),)
    before = len(fake.received)
    for stream in (False, True):
        with pytest.raises(InvalidRequest, match=says) as caught:
            neutral = chat(Message("user", parts), stream=stream)
            await collect(make_provider(session, fake.base_url).chat(neutral, "llava"))
        assert caught.value.status == 400 and caught.value.param == "messages[0].content"
    assert len(fake.received) == before, "nothing was sent upstream"


async def test_a_part_ollama_has_no_field_for_is_refused(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    audio = MappingProxyType({"type": "input_audio", "input_audio": {"data": "AA=="}})
    with pytest.raises(InvalidRequest, match="input_audio"):
        await collect(
            make_provider(session, fake.base_url).chat(chat(Message("user", (audio,))), "m")
        )


# -- tools --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_tool_call_comes_back_with_a_synthesised_id(
    fake: FakeOllama, session: aiohttp.ClientSession, stream: bool
) -> None:
    neutral = request("weather in Paris?", stream=stream, tools=(WEATHER,), tool_choice="auto")
    chunks = await collect(make_provider(session, fake.base_url).chat(neutral, "tool-call"))
    assert sent(fake)["tools"] == [dict(WEATHER)]
    assert "tool_choice" not in sent(fake)
    [call] = events(chunks, ToolCallDelta)
    start = events(chunks, ResponseStart)[0]
    # The id is made from the response's own: call_<first 8 hex of it>_<n>.
    assert call == ToolCallDelta(
        0, 0, f"call_{start.id.removeprefix('ollama-')[:8]}_0", "get_weather", '{"city":"Paris"}'
    )
    assert events(chunks, Finish) == [Finish(0, "tool_calls")]
    assert text(chunks) == ""


async def test_several_tool_calls_are_numbered_across_lines(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    neutral = request("weather and time?", stream=True, tools=(WEATHER, CLOCK))
    chunks = await collect(make_provider(session, fake.base_url).chat(neutral, "two-tools"))
    calls = events(chunks, ToolCallDelta)
    tag = events(chunks, ResponseStart)[0].id.removeprefix("ollama-")[:8]
    assert [(c.index, c.id, c.name) for c in calls] == [
        (0, f"call_{tag}_0", "get_weather"),
        (1, f"call_{tag}_1", "get_time"),
    ]
    assert len([c for c in chunks if events([c], ToolCallDelta)]) == 2, "one call per line"


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_call_ids_never_repeat_across_the_turns_of_a_conversation(
    fake: FakeOllama, session: aiohttp.ClientSession, stream: bool
) -> None:
    # Two tool rounds of one agent loop: were both calls "call_0", the history would hold
    # the same id twice, which Anthropic refuses ("tool_use ids must be unique") once the
    # conversation moves there, and which clients keying results by id mix up.
    provider = make_provider(session, fake.base_url)
    neutral = request("weather in Paris?", stream=stream, tools=(WEATHER,))
    first = events(await collect(provider.chat(neutral, "tool-call")), ToolCallDelta)
    second = events(await collect(provider.chat(neutral, "tool-call")), ToolCallDelta)
    assert len(first) == len(second) == 1
    assert first[0].id != second[0].id
    assert all(re.fullmatch(r"call_[0-9a-f]{8}_0", c.id) for c in (*first, *second))


async def test_n_over_one_is_refused_before_any_call(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    # Ollama has no n: the client would silently get one choice where it asked for three.
    fake.clear()
    with pytest.raises(InvalidRequest) as caught:
        await collect(make_provider(session, fake.base_url).chat(request(n=3), "llama3.2"))
    assert caught.value.param == "n"
    assert fake.received == []
    await collect(make_provider(session, fake.base_url).chat(request(n=1), "llama3.2"))
    assert "n" not in sent(fake)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
    ],
)
async def test_logprobs_and_logit_bias_are_refused_before_any_call(
    fake: FakeOllama, session: aiohttp.ClientSession, extra: dict[str, Any], param: str
) -> None:
    # Dropped, the client got "logprobs": null or an unbiased sample and no word of it.
    fake.clear()
    with pytest.raises(InvalidRequest) as caught:
        await collect(make_provider(session, fake.base_url).chat(request(extra=extra), "llama3.2"))
    assert caught.value.param == param and param in caught.value.message
    assert fake.received == []


async def test_parallel_tool_calls_false_is_not_refused(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    # Ollama cannot forbid parallel calls, and agents send the field with every request.
    neutral = request(tools=(WEATHER,), extra={"parallel_tool_calls": False})
    chunks = await collect(make_provider(session, fake.base_url).chat(neutral, "tool-call"))
    assert len(events(chunks, ToolCallDelta)) == 1
    assert "parallel_tool_calls" not in sent(fake)


@pytest.mark.parametrize(
    ("tools", "tool_choice", "param"),
    [
        ((MappingProxyType({"type": "custom", "custom": {"name": "grep"}}),), None, "tools"),
        ((MappingProxyType({"type": "function"}),), None, "tools"),
        ((WEATHER,), {"type": "function", "function": {"name": "get_time"}}, "tool_choice"),
    ],
)
async def test_tools_ollama_cannot_offer_are_refused_before_any_call(
    fake: FakeOllama,
    session: aiohttp.ClientSession,
    tools: tuple[Any, ...],
    tool_choice: Any,
    param: str,
) -> None:
    # Sent on, a custom tool reached Ollama nameless and a forced function absent from
    # the tools left the model with no tool at all: the client's intent was lost.
    fake.clear()
    neutral = request(tools=tools, tool_choice=tool_choice)
    with pytest.raises(InvalidRequest) as caught:
        await collect(make_provider(session, fake.base_url).chat(neutral, "tool-call"))
    assert caught.value.param == param
    assert fake.received == []


@pytest.mark.parametrize(
    ("tool_choice", "offered"),
    [
        ("none", None),
        ({"type": "function", "function": {"name": "get_time"}}, ["get_time"]),
        ("required", ["get_weather", "get_time"]),
    ],
)
async def test_tool_choice_is_approximated_by_the_tools_offered(
    fake: FakeOllama, session: aiohttp.ClientSession, tool_choice: Any, offered: Any
) -> None:
    neutral = request(tools=(WEATHER, CLOCK), tool_choice=tool_choice)
    await collect(make_provider(session, fake.base_url).chat(neutral, "llama3.2"))
    tools = sent(fake).get("tools")
    assert (None if tools is None else [t["function"]["name"] for t in tools]) == offered


async def test_a_tool_result_round_trip(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    history = chat(
        Message("user", "weather in Paris?"),
        Message(
            "assistant",
            None,
            tool_calls=(
                ToolCall("call_0", "get_weather", '{"city": "Paris"}'),
                ToolCall("call_1", "get_time", ""),
            ),
        ),
        Message("tool", "18C and sunny", tool_call_id="call_0"),
        Message("tool", ({"type": "text", "text": "noon"},), tool_call_id="call_1"),
        stream=True,
        tools=(WEATHER, CLOCK),
    )
    chunks = await collect(make_provider(session, fake.base_url).chat(history, "tool-call"))
    assert sent(fake)["messages"][1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "get_time", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "18C and sunny", "tool_name": "get_weather"},
        {"role": "tool", "content": "noon", "tool_name": "get_time"},
    ]
    assert text(chunks) == "tool said: noon (from get_time)"
    assert events(chunks, Finish) == [Finish(0, "stop")]


@pytest.mark.parametrize("arguments", ['{"city": ', '["Paris"]'])
async def test_tool_call_arguments_that_are_not_an_object_are_refused(
    fake: FakeOllama, session: aiohttp.ClientSession, arguments: str
) -> None:
    history = chat(
        Message("user", "weather?"),
        Message("assistant", None, tool_calls=(ToolCall("c", "get_weather", arguments),)),
        Message("tool", "18C", tool_call_id="c"),
    )
    before = len(fake.received)
    with pytest.raises(InvalidRequest, match="not a JSON object") as caught:
        await collect(make_provider(session, fake.base_url).chat(history, "tool-call"))
    assert caught.value.param == "messages[1].tool_calls"
    assert len(fake.received) == before


# -- finish reasons -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_reply_cut_by_max_tokens_finishes_with_length(
    fake: FakeOllama, session: aiohttp.ClientSession, stream: bool
) -> None:
    neutral = request("one two three four", stream=stream, max_tokens=2)
    chunks = await collect(make_provider(session, fake.base_url).chat(neutral, "llama3.2"))
    assert text(chunks) == "echo: one"
    assert events(chunks, Finish) == [Finish(0, "length")]
    assert events(chunks, UsageReport)[0].usage.completion_tokens == 2


async def test_a_load_only_answer_finishes_with_stop(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    # Ollama answers an empty conversation by loading the model: done_reason "load".
    chunks = await collect(make_provider(session, fake.base_url).chat(chat(), "llama3.2"))
    assert events(chunks, Finish) == [Finish(0, "stop")] and text(chunks) == ""
    assert events(chunks, UsageReport) == [], "no counts reported, none invented"


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "status", "error_type", "retryable", "message"),
    [
        ("missing-model", 404, "not_found", False, "model 'missing-model' not found, try pulling"),
        ("fail-400", 400, "bad_request", False, "invalid options"),
        ("fail-context", 400, "context_length", False, "exceeds the context length"),
        ("fail-401", 401, "authentication", False, "unauthorized"),
        ("fail-403", 403, "permission", False, "forbidden"),
        ("fail-429", 429, "rate_limit", True, "too many requests"),
        ("fail-500", 500, "server_error", True, "llama runner process has terminated"),
        ("fail-503", 503, "overloaded", True, "server busy"),
    ],
)
async def test_http_errors_are_mapped(
    fake: FakeOllama,
    session: aiohttp.ClientSession,
    model: str,
    status: int,
    error_type: str,
    retryable: bool,
    message: str,
    stream: bool,
) -> None:
    provider = make_provider(session, fake.base_url)
    with pytest.raises(UpstreamHTTPError) as caught:
        await collect(provider.chat(request(stream=stream), model))
    error = caught.value
    assert (error.status_code, error.error_type, error.retryable) == (status, error_type, retryable)
    assert message in error.message, "Ollama's own message is kept"
    if status == 429:
        assert error.retry_after == 2.0 and error.headers() == {"Retry-After": "2"}
    if model == "missing-model":
        assert error.code == "model_not_found" and error.status == 404
    if model == "fail-context":
        assert error.code == "context_length_exceeded"


async def test_an_error_line_before_anything_is_a_retryable_500(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(UpstreamHTTPError) as caught:
        await collect(
            make_provider(session, fake.base_url).chat(request(stream=True), "error-first")
        )
    assert caught.value.status_code == 500 and caught.value.retryable
    assert caught.value.message == MID_STREAM_ERROR


async def test_stream_stall_before_first_byte_times_out(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, first_byte=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(stream=True), "stall-first-byte"))
    assert 0.25 < time.monotonic() - started < 2.0
    assert caught.value.phase == "first_byte" and caught.value.retryable


async def test_non_streaming_stall_is_bounded_by_total_only(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, first_byte=0.1, total=0.4)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(), "stall-first-byte"))
    assert 0.35 < time.monotonic() - started < 2.0
    assert caught.value.phase == "total" and not caught.value.retryable


async def test_stall_mid_stream_is_an_idle_timeout_after_chunks(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, idle=0.3)
    got: list[Chunk] = []
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(stream=True), "stall-mid"), got)
    assert caught.value.phase == "idle" and not caught.value.retryable
    assert len(events(got, TextDelta)) == 2


async def test_total_timeout_cuts_a_slow_stream(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, total=0.25)
    got: list[Chunk] = []
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(stream=True), "slow-stream"), got)
    # The whole stream takes 400 ms; how many chunks came first depends on the machine.
    assert caught.value.phase == "total"


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("reset-mid", UpstreamInterrupted),
        ("eof-mid", UpstreamInterrupted),
        ("error-mid", UpstreamInterrupted),
        ("malformed", UpstreamProtocolError),
    ],
)
async def test_broken_streams_raise_after_their_first_chunks(
    fake: FakeOllama, session: aiohttp.ClientSession, model: str, error: type[Exception]
) -> None:
    got: list[Chunk] = []
    with pytest.raises(error) as caught:
        await collect(make_provider(session, fake.base_url).chat(request(stream=True), model), got)
    assert got and text(got).startswith("echo")
    assert not any(c.final for c in got), "a broken stream never ends cleanly"
    assert not getattr(caught.value, "retryable", True)
    if model == "error-mid":
        assert MID_STREAM_ERROR in str(caught.value)


@pytest.mark.parametrize("model", ["malformed", "reset-mid"])
async def test_broken_whole_bodies(
    fake: FakeOllama, session: aiohttp.ClientSession, model: str
) -> None:
    expected = UpstreamProtocolError if model == "malformed" else UpstreamConnectError
    with pytest.raises(expected):
        await collect(make_provider(session, fake.base_url).chat(request(), model))


@pytest.mark.parametrize("stream", [False, True])
async def test_connection_refused_is_a_retryable_connect_error(
    session: aiohttp.ClientSession, stream: bool
) -> None:
    with pytest.raises(UpstreamConnectError) as caught:
        await collect(make_provider(session, closed_port_url()).chat(request(stream=stream), "m"))
    assert caught.value.retryable


async def test_the_key_never_appears_in_errors(session: aiohttp.ClientSession) -> None:
    def leaks(error: BaseException) -> bool:
        shown = [str(error), repr(error), "".join(traceback.format_exception(error))]
        if isinstance(error, UpstreamError):
            shown.append(orjson.dumps(error.to_openai()).decode())
        return any(CANARY in s for s in shown)

    failures: list[BaseException] = []
    with FakeOllama(api_key="the-right-key") as guarded, FakeOllama() as fake:
        # This proxy echoes the key it was given: the adapter scrubs it.
        denied = make_provider(session, guarded.base_url, key=CANARY)
        for stream in (False, True):
            with pytest.raises(UpstreamHTTPError) as caught:
                await collect(denied.chat(request(stream=stream), "m"))
            assert caught.value.status_code == 401 and "[redacted]" in caught.value.message
            failures.append(caught.value)
        failures.append(await error_of(denied.embeddings({"input": "x"}, "e")))
        failures.append(await error_of(denied.list_models()))
        provider = make_provider(session, fake.base_url, key=CANARY, first_byte=0.3, idle=0.3)
        for model in (
            "missing-model",
            "fail-context",
            "fail-429",
            "stall-first-byte",
            "stall-mid",
            "reset-mid",
            "malformed",
            "eof-mid",
            "error-mid",
            "error-first",
        ):
            failures.append(await error_of(collect(provider.chat(request(stream=True), model))))
        refused = make_provider(session, closed_port_url(), key=CANARY)
        failures.append(await error_of(collect(refused.chat(request(), "m"))))
    assert len(failures) == 15 and all(isinstance(f, UpstreamError) for f in failures)
    assert not [f for f in failures if leaks(f)]


async def test_a_cancelled_stream_releases_its_connection_and_never_reuses_it(
    fake: FakeOllama,
) -> None:
    created: list[object] = []

    async def on_create(_: object, __: object, params: object) -> None:
        created.append(params)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        provider = make_provider(session, fake.base_url)
        for _ in range(2):  # a stream read to its end hands its connection back for reuse
            await collect(provider.chat(request(stream=True), "llama3.2"))
        assert len(created) == 1

        stream = provider.chat(request(stream=True), "slow-stream")
        assert (await anext(stream)).events
        await stream.aclose()  # the consumer walks away mid-stream

        chunks = await asyncio.wait_for(collect(provider.chat(request(stream=True), "m")), 2)
        assert text(chunks) == "echo: hello big world"
        assert len(created) == 2, "the abandoned connection was closed, not pooled"


# -- embeddings and models ----------------------------------------------------------------


async def test_embeddings_as_floats(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    provider = make_provider(session, fake.base_url)
    body = {"model": "local/emb", "input": ["hello world", "goodbye"], "dimensions": 4}
    result = await provider.embeddings(body, "nomic-embed-text")
    path, _, received = fake.received[-1]
    assert path == "/api/embed"
    assert received == {
        "model": "nomic-embed-text",
        "input": ["hello world", "goodbye"],
        "dimensions": 4,
    }
    parsed = orjson.loads(result.raw)
    assert (result.protocol, result.model, result.count) == ("openai", "nomic-embed-text", 2)
    assert result.usage == Usage(prompt_tokens=3, total_tokens=3)
    assert parsed["object"] == "list" and parsed["model"] == "nomic-embed-text"
    assert parsed["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [(d["object"], d["index"], len(d["embedding"])) for d in parsed["data"]] == [
        ("embedding", 0, 4),
        ("embedding", 1, 4),
    ]


async def test_embeddings_as_base64_float32(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    floats = orjson.loads((await provider.embeddings({"input": "hello"}, "nomic-embed-text")).raw)[
        "data"
    ][0]["embedding"]
    result = await provider.embeddings(
        {"input": "hello", "encoding_format": "base64"}, "nomic-embed-text"
    )
    assert "encoding_format" not in fake.received[-1][2], "Ollama has no such field"
    encoded = orjson.loads(result.raw)["data"][0]["embedding"]
    decoded = list(struct.unpack(f"<{len(floats)}f", base64.b64decode(encoded)))
    assert decoded == floats and result.count == 1


async def test_embeddings_refusals_and_errors(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    before = len(fake.received)
    with pytest.raises(InvalidRequest, match="token arrays"):
        await provider.embeddings({"input": [[1, 2, 3]]}, "nomic-embed-text")
    assert len(fake.received) == before
    with pytest.raises(UpstreamHTTPError) as caught:
        await provider.embeddings({"input": "x"}, "missing-model")
    assert caught.value.error_type == "not_found" and "try pulling" in caught.value.message
    with pytest.raises(UpstreamHTTPError) as caught:
        await provider.embeddings({"input": "x"}, "fail-429")
    assert caught.value.retry_after == 2.0 and caught.value.retryable


async def test_list_models_returns_the_names_as_ollama_lists_them(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    assert await make_provider(session, fake.base_url + "/api").list_models() == list(MODELS)
    assert fake.received[-1][0] == "/api/tags"
    with pytest.raises(UpstreamConnectError):
        await make_provider(session, closed_port_url()).list_models()


# -- the wire format, without HTTP ----------------------------------------------------------


NDJSON_STREAM = b"".join(
    [
        b'{"a": 1}\n',
        b"\n",  # a blank line
        b'{"b": 2}\r\n',  # CRLF
        b"   \n",  # a line of spaces
        b'{"c": "x\\ny"}\n',  # an escaped newline inside a string
        b'{"d": 4}',  # the last line, without its newline
    ]
)
NDJSON_LINES = [b'{"a": 1}', b'{"b": 2}', b'{"c": "x\\ny"}', b'{"d": 4}']


def split_lines(pieces: list[bytes]) -> list[bytes]:
    decoder = wire.NDJSONDecoder()
    out = [line for piece in pieces for line in decoder.feed(piece)]
    return out + decoder.close()


def test_ndjson_whole_and_one_byte_at_a_time() -> None:
    assert split_lines([NDJSON_STREAM]) == NDJSON_LINES
    pieces = [NDJSON_STREAM[i : i + 1] for i in range(len(NDJSON_STREAM))]
    assert split_lines(pieces) == NDJSON_LINES


def test_ndjson_split_at_every_boundary() -> None:
    for cut in range(len(NDJSON_STREAM) + 1):
        assert split_lines([NDJSON_STREAM[:cut], NDJSON_STREAM[cut:]]) == NDJSON_LINES, cut


def test_ndjson_refuses_an_endless_line() -> None:
    decoder = wire.NDJSONDecoder()
    piece = b"x" * (1024 * 1024)
    with pytest.raises(UpstreamProtocolError, match="over"):
        for _ in range(wire.MAX_LINE_BYTES // len(piece) + 2):
            decoder.feed(piece)
    whole_line = b"y" * (wire.MAX_LINE_BYTES + 1) + b"\n"
    with pytest.raises(UpstreamProtocolError):
        wire.NDJSONDecoder().feed(whole_line)
    fits = b"z" * wire.MAX_LINE_BYTES
    assert wire.NDJSONDecoder().feed(fits + b"\n") == [fits]


@pytest.mark.parametrize(
    "line",
    [
        {"model": "m", "message": {"content": 5}, "done": False},
        {"model": "m", "message": {"thinking": ["x"]}, "done": False},
        {"model": "m", "message": "hi", "done": False},
        {"model": "m", "message": {"tool_calls": {"function": {}}}, "done": False},
        {"model": "m", "message": {"tool_calls": [{"function": {"name": 3}}]}, "done": False},
        {"model": "m", "message": {"tool_calls": ["get_weather"]}, "done": False},
        {"model": "m", "done": "true"},
        {"model": "m", "done": True, "done_reason": 7},
        {"model": 7, "done": False},
    ],
)
def test_lines_with_wrong_types_are_protocol_errors(line: dict[str, Any]) -> None:
    with pytest.raises(UpstreamProtocolError):
        wire.Answer("m", str).line(orjson.dumps(line), yielded=True)


def test_lines_that_are_not_objects_are_protocol_errors() -> None:
    for line in (b"[1, 2]", b'"text"', b"{not json"):
        with pytest.raises(UpstreamProtocolError):
            wire.Answer("m", str).line(line, yielded=False)


def test_upstream_tool_call_ids_are_kept_and_counts_may_be_missing() -> None:
    answer = wire.Answer("m", str)
    first = answer.line(
        b'{"model": "m", "created_at": "bad date", "message": {"content": "", "tool_calls":'
        b' [{"id": "call_up", "function": {"name": "f", "arguments": {"x": [1]}}}]},'
        b' "done": false}',
        yielded=False,
    )
    assert events([first], ToolCallDelta) == [ToolCallDelta(0, 0, "call_up", "f", '{"x":[1]}')]
    assert abs(events([first], ResponseStart)[0].created - time.time()) < 5
    last = answer.line(b'{"done": true, "eval_count": 3}', yielded=True)
    assert last.final and last.events == (
        Finish(0, "tool_calls"),
        UsageReport(Usage(prompt_tokens=None, completion_tokens=3, total_tokens=3)),
    )


def test_an_error_object_before_and_after_the_first_chunk() -> None:
    scrub = lambda s: s.replace("secret-k", "***")  # noqa: E731
    line = b'{"error": "bad key secret-k"}'
    with pytest.raises(UpstreamHTTPError) as caught:
        wire.Answer("m", scrub).line(line, yielded=False)
    assert (caught.value.status_code, caught.value.message) == (500, "bad key ***")
    with pytest.raises(UpstreamInterrupted, match=r"bad key \*\*\*"):
        wire.Answer("m", scrub).line(line, yielded=True)


def test_a_proxy_error_page_is_kept_short() -> None:
    error = wire.http_error(502, b"<html>Bad Gateway</html>" + b"x" * 2000, {}, str)
    assert error.status_code == 502 and error.retryable
    assert error.message.startswith("<html>Bad Gateway</html>") and len(error.message) == 500


def test_an_ollama_request_passes_through_untouched() -> None:
    raw = {
        "model": "local/llama3.2",
        "messages": [{"role": "user", "content": "hi", "images": ["AAAA"]}],
        "options": {"mirostat": 1},
        "stream": True,
        "x_future_field": [1],
    }
    neutral = ChatRequest(
        model="local/llama3.2",
        messages=(Message("user", "hi"),),
        raw=raw,
        client_protocol="ollama",
    )
    assert wire.chat_body(neutral, "llama3.2") == {**raw, "model": "llama3.2", "stream": False}
    assert raw["model"] == "local/llama3.2", "the client's body is not mutated"


def test_provider_satisfies_the_seam() -> None:
    from parley.providers.base import Provider

    provider: Provider = OllamaProvider(
        ProviderConfig(name="o", kind="ollama", base_url="http://o:11434"),
        SimpleNamespace(),  # type: ignore[arg-type]
    )
    assert provider.protocol == "ollama"
