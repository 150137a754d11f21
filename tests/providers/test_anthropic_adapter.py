"""The Anthropic adapter against a real fake upstream over loopback HTTP and SSE.

Every test drives ``AnthropicProvider`` with a real ``aiohttp.ClientSession`` against
``tests.fakes.anthropic_upstream``, and asserts what a user would notice: the events, the
bytes an Anthropic client would receive, the body and headers the upstream received, and
the typed error of each failure. Timeouts are short so the stall tests stay fast.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator, Mapping
from types import MappingProxyType, SimpleNamespace
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from anthropic._streaming import SSEDecoder

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
from parley.providers.anthropic import AnthropicProvider
from parley.providers.anthropic_wire import StreamFrames
from parley.settings import ProviderConfig, Secret, Timeouts
from tests.fakes.anthropic_upstream import CACHE_READ, CACHE_WRITE, FakeAnthropic
from tests.providers.support import closed_port_url, collect, error_of, events, text

CANARY = "sk-ant-canary-7f3a9c1e5b2d4f60"
KEY = "sk-ant-test-key"
WEATHER_TOOL = MappingProxyType(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
)
PNG = "iVBORw0KGgo="


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as upstream:
        yield upstream


def make_provider(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    key: str = KEY,
    first_byte: float = 5.0,
    idle: float = 5.0,
    total: float = 30.0,
    headers: Mapping[str, str] | None = None,
) -> AnthropicProvider:
    config = ProviderConfig(
        name="claude",
        kind="anthropic",
        base_url=base_url,
        api_key=Secret(key),
        headers=dict(headers or {}),
        timeouts=Timeouts(connect=2.0, first_byte=first_byte, idle=idle, total=total),
    )
    return AnthropicProvider(config, session)


def request(
    text: str = "hello big world",
    *,
    stream: bool = False,
    messages: tuple[Message, ...] | None = None,
    **fields: Any,
) -> ChatRequest:
    return ChatRequest(
        model="claude/x",
        messages=messages if messages is not None else (Message("user", text),),
        stream=stream,
        **fields,
    )


def sent(fake: FakeAnthropic) -> dict[str, Any]:
    """The body of the last request the fake received."""
    body: dict[str, Any] = fake.received[-1][2]
    return body


async def upstream_bytes(session: aiohttp.ClientSession, fake: FakeAnthropic) -> bytes:
    """What the fake answers when sent the last body it received, directly."""
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    url = f"{fake.base_url}/v1/messages"
    async with session.post(url, data=orjson.dumps(sent(fake)), headers=headers) as resp:
        return await resp.read()


# -- text, streaming and not ----------------------------------------------------------


async def test_non_streaming_events_usage_headers_and_raw_bytes(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    before = int(time.time())
    [chunk] = await collect(provider.chat(request(), "claude-fake-sonnet"))
    assert chunk.final and chunk.protocol == "anthropic" and not chunk.internal
    start, *rest = chunk.events
    assert isinstance(start, ResponseStart) and start.id.startswith("msg_")
    assert start.model == "claude-fake-sonnet" and start.created >= before
    # prompt = 3 words uncached + the cache read + the cache write, as OpenAI counts it
    prompt = 3 + CACHE_READ + CACHE_WRITE
    assert rest == [
        TextDelta(0, "echo: hello big world"),
        Finish(0, "stop"),
        UsageReport(Usage(prompt, 4, prompt + 4, cached_tokens=CACHE_READ)),
    ]
    path, headers, body = fake.received[-1]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in headers
    assert body == {
        "model": "claude-fake-sonnet",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello big world"}]}],
    }
    assert chunk.raw == await upstream_bytes(session, fake)


async def test_streaming_deltas_event_lines_and_bytes_pass_through(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    chunks = await collect(provider.chat(request(stream=True), "claude-fake-sonnet"))
    assert text(chunks) == "echo: hello big world" and len(events(chunks, TextDelta)) == 3
    assert len(events(chunks, ResponseStart)) == 1
    assert events(chunks, Finish) == [Finish(0, "stop")]
    prompt = 3 + CACHE_READ + CACHE_WRITE
    # Input usage as soon as the message starts (kept if the stream breaks), then the whole.
    assert [e.usage for e in events(chunks, UsageReport)] == [
        Usage(prompt, cached_tokens=CACHE_READ),
        Usage(prompt, 4, prompt + 4, cached_tokens=CACHE_READ),
    ]
    assert sent(fake)["stream"] is True
    kinds = [(c.raw or b"").split(b"\n", 1)[0] for c in chunks]
    assert kinds[:3] == [
        b"event: message_start",
        b"event: content_block_start",
        b"event: ping",
    ]
    assert kinds[-1] == b"event: message_stop" and chunks[-1].final
    assert chunks[-1].events == () and not any(c.final for c in chunks[:-1])
    assert all(c.protocol == "anthropic" for c in chunks)
    assert b"".join(c.raw or b"" for c in chunks) == await upstream_bytes(session, fake)


async def test_the_official_sdk_reads_the_fake_and_the_adapters_stream_bytes(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    # The fake speaks the wire format the SDK parses; the adapter forwards it unchanged.
    client = anthropic.AsyncAnthropic(base_url=fake.base_url, api_key=KEY, max_retries=0)
    try:
        message = await client.messages.create(
            model="tool-use",
            max_tokens=64,
            messages=[{"role": "user", "content": "weather?"}],
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
            thinking={"type": "enabled", "budget_tokens": 32},
        )
        assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
        async with client.messages.stream(
            model="claude-fake-sonnet",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi there"}],
        ) as stream:
            assert await stream.get_final_text() == "echo: hi there"
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(
                model="fail-429", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
        count = await client.messages.count_tokens(
            model="m", messages=[{"role": "user", "content": "one two"}]
        )
        assert count.input_tokens == 2
    finally:
        await client.close()
    # And what the adapter hands an Anthropic client parses as the same message.
    provider = make_provider(session, fake.base_url)
    chunks = await collect(provider.chat(request("hi there", stream=True), "claude-fake-sonnet"))
    sse = list(SSEDecoder().iter_bytes(iter([b"".join(c.raw or b"" for c in chunks)])))
    assert [f.event for f in sse][-1] == "message_stop"
    assert all(f.event == f.json()["type"] for f in sse)
    deltas = [f.json()["delta"]["text"] for f in sse if f.event == "content_block_delta"]
    assert "".join(deltas) == "echo: hi there"


# -- translation ----------------------------------------------------------------------


async def test_system_prompts_and_history_become_alternating_turns(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    history = (
        Message("system", "be brief"),
        Message("developer", "answer in French"),
        Message("user", "hi"),
        Message("user", "are you there?"),
        Message("assistant", "oui"),
        Message("assistant", None),  # says nothing: dropped
        Message("user", "ok then"),
    )
    [chunk] = await collect(
        make_provider(session, fake.base_url).chat(request(messages=history), "m")
    )
    body = sent(fake)
    assert body["system"] == "be brief\n\nanswer in French"
    assert body["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "are you there?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "oui"}]},
        {"role": "user", "content": [{"type": "text", "text": "ok then"}]},
    ]
    assert text([chunk]) == "echo: ok then"


async def test_sampling_fields_are_mapped(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    neutral = request(
        max_tokens=50,
        temperature=0.3,
        top_p=0.9,
        stop=("END", "STOP"),
        user="u-42",
        extra={
            "top_k": 5,
            "seed": 7,
            "frequency_penalty": 0.5,
            "response_format": {},
            "logprobs": False,
            "logit_bias": None,
        },
    )
    await collect(provider.chat(neutral, "m"))
    body = sent(fake)
    assert {k: v for k, v in body.items() if k != "messages"} == {
        "model": "m",
        "max_tokens": 50,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop_sequences": ["END", "STOP"],
        "top_k": 5,
        "metadata": {"user_id": "u-42"},
    }
    # OpenAI's newer spelling of the output limit counts too.
    await collect(provider.chat(request(extra={"max_completion_tokens": 77}), "m"))
    assert sent(fake)["max_tokens"] == 77


async def test_a_json_schema_response_format_is_structured_output(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    """OpenAI's ``response_format`` json_schema goes out as Anthropic's
    ``output_config.format``, the schema unchanged; ``text`` asks for nothing."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    provider = make_provider(session, fake.base_url)
    response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    await collect(provider.chat(request(extra={"response_format": response_format}), "m"))
    assert sent(fake)["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    await collect(provider.chat(request(extra={"response_format": {"type": "text"}}), "m"))
    assert "output_config" not in sent(fake)


async def test_images_data_url_and_http_url(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    parts = (
        MappingProxyType({"type": "text", "text": "what is this?"}),
        MappingProxyType(
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
        ),
        MappingProxyType(
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
        ),
    )
    provider = make_provider(session, fake.base_url)
    [chunk] = await collect(provider.chat(request(messages=(Message("user", parts),)), "m"))
    assert sent(fake)["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    assert text([chunk]) == "echo: what is this?"


@pytest.mark.parametrize(
    ("part", "complaint"),
    [
        ({"type": "image_url", "image_url": {"url": "ftp://x/cat.png"}}, "data URLs"),
        ({"type": "image_url", "image_url": {"url": "data:image/png,abc"}}, "base64"),
        ({"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}}, "image/bmp"),
        ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "input_audio"),
    ],
)
async def test_content_anthropic_cannot_take_is_refused_before_any_call(
    fake: FakeAnthropic, session: aiohttp.ClientSession, part: dict[str, Any], complaint: str
) -> None:
    before = len(fake.received)
    neutral = request(messages=(Message("user", (MappingProxyType(part),)),))
    for stream in (False, True):
        neutral.stream = stream
        with pytest.raises(InvalidRequest, match=complaint):
            await collect(make_provider(session, fake.base_url).chat(neutral, "m"))
    assert len(fake.received) == before


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ({"type": "function", "function": {"name": "get_weather"}}, None, None),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
)
async def test_tool_definitions_and_tool_choice(
    fake: FakeAnthropic,
    session: aiohttp.ClientSession,
    choice: Any,
    parallel: bool | None,
    expected: dict[str, Any] | None,
) -> None:
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    neutral = request(tools=(WEATHER_TOOL,), tool_choice=choice, extra=extra)
    await collect(make_provider(session, fake.base_url).chat(neutral, "m"))
    body = sent(fake)
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    if isinstance(choice, dict):
        expected = {"type": "tool", "name": "get_weather"}
    assert body.get("tool_choice") == expected


async def test_tool_call_round_trip(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    provider = make_provider(session, fake.base_url)
    ask = request("weather in Paris?", tools=(WEATHER_TOOL,))
    [whole] = await collect(provider.chat(ask, "tool-use"))
    assert text([whole]) == "Let me check."
    assert events([whole], ToolCallDelta) == [
        ToolCallDelta(0, 0, "toolu_fake_1", "get_weather", '{"city":"Paris"}')
    ]
    assert events([whole], Finish) == [Finish(0, "tool_calls")]

    ask.stream = True
    chunks = await collect(provider.chat(ask, "tool-use"))
    deltas = events(chunks, ToolCallDelta)
    assert (deltas[0].index, deltas[0].id, deltas[0].name, deltas[0].arguments) == (
        0,
        "toolu_fake_1",
        "get_weather",
        "",
    )
    assert all(d.id is None and d.index == 0 for d in deltas[1:]) and len(deltas) == 3
    assert "".join(d.arguments for d in deltas) == '{"city":"Paris"}'
    assert events(chunks, Finish) == [Finish(0, "tool_calls")]

    history = (
        Message("user", "weather in Paris?"),
        Message(
            "assistant",
            "Let me check.",
            tool_calls=(ToolCall("toolu_fake_1", "get_weather", '{"city": "Paris"}'),),
        ),
        Message("tool", "18C and sunny", tool_call_id="toolu_fake_1"),
    )
    answer = request(messages=history, tools=(WEATHER_TOOL,), stream=True)
    assert text(await collect(provider.chat(answer, "tool-use"))) == "tool said: 18C and sunny"
    assert sent(fake)["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "weather in Paris?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": "toolu_fake_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_fake_1", "content": "18C and sunny"}
            ],
        },
    ]


async def test_parallel_tool_calls_are_indexed_among_calls_and_results_share_a_turn(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    for stream in (False, True):
        chunks = await collect(
            provider.chat(request("weather?", tools=(WEATHER_TOOL,), stream=stream), "tool-use-2")
        )
        calls: dict[int, str] = {}
        for delta in events(chunks, ToolCallDelta):
            calls[delta.index] = calls.get(delta.index, "") + delta.arguments
        # Content block 0 is text: the calls are numbered 0 and 1 among calls, not blocks.
        assert calls == {0: '{"city":"Paris"}', 1: '{"city":"London"}'}
    history = (
        Message("user", "weather?"),
        Message(
            "assistant",
            None,
            tool_calls=(
                ToolCall("toolu_fake_1", "get_weather", '{"city":"Paris"}'),
                ToolCall("toolu_fake_2", "get_weather", ""),  # no arguments: {}
            ),
        ),
        Message("tool", "sunny", tool_call_id="toolu_fake_1"),
        Message("tool", ({"type": "text", "text": "rainy"},), tool_call_id="toolu_fake_2"),
        Message("user", "and tomorrow?"),
    )
    await collect(provider.chat(request(messages=history, tools=(WEATHER_TOOL,)), "tool-use-2"))
    turns = sent(fake)["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"][1]["input"] == {}
    assert turns[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_fake_1", "content": "sunny"},
        {
            "type": "tool_result",
            "tool_use_id": "toolu_fake_2",
            "content": [{"type": "text", "text": "rainy"}],
        },
        {"type": "text", "text": "and tomorrow?"},
    ]


@pytest.mark.parametrize(
    ("neutral", "complaint"),
    [
        (
            request(
                messages=(
                    Message("user", "hi"),
                    Message("assistant", None, tool_calls=(ToolCall("t1", "f", "{not json"),)),
                    Message("tool", "x", tool_call_id="t1"),
                )
            ),
            "not a JSON object",
        ),
        (
            request(
                messages=(Message("assistant", None, tool_calls=(ToolCall("t", "f", "[1]"),)),)
            ),
            "not a JSON object",
        ),
        (request(n=2), "n must be 1"),
        (request(extra={"logprobs": True}), "'logprobs' cannot be sent to Anthropic"),
        (request(extra={"top_logprobs": 3}), "'top_logprobs' cannot be sent to Anthropic"),
        (request(extra={"logit_bias": {"9": 1}}), "'logit_bias' cannot be sent to Anthropic"),
        (request(messages=(Message("tool", "x"),)), "tool_call_id"),
        (
            request(extra={"response_format": {"type": "json_object"}}),
            "json_object cannot be sent to Anthropic",
        ),
        (
            request(extra={"response_format": {"type": "json_schema", "json_schema": {}}}),
            "'response_format.json_schema.schema' must be an object",
        ),
        (request(extra={"response_format": {"type": "yaml"}}), "'response_format.type'"),
    ],
)
async def test_requests_anthropic_cannot_take_are_refused(
    fake: FakeAnthropic, session: aiohttp.ClientSession, neutral: ChatRequest, complaint: str
) -> None:
    before = len(fake.received)
    with pytest.raises(InvalidRequest, match=complaint):
        await collect(make_provider(session, fake.base_url).chat(neutral, "m"))
    assert len(fake.received) == before


async def test_an_anthropic_clients_body_passes_through(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    raw = {
        "model": "claude/alias",
        "max_tokens": 99,
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hello there"}],
        "top_k": 3,
        "metadata": {"user_id": "u-1"},
        "service_tier": "auto",
        "stream": False,
    }
    provider = make_provider(session, fake.base_url)
    neutral = request(raw=raw, client_protocol="anthropic", stream=True)
    chunks = await collect(provider.chat(neutral, "claude-fake-haiku"))
    assert sent(fake) == {**raw, "model": "claude-fake-haiku", "stream": True}
    assert raw["stream"] is False, "the client's body is not mutated"
    assert text(chunks) == "echo: hello there"
    neutral.stream = False
    await collect(provider.chat(neutral, "claude-fake-haiku"))
    assert "stream" not in sent(fake) and sent(fake)["top_k"] == 3
    # The same body from an OpenAI client is translated, not passed through.
    await collect(provider.chat(request(raw=raw, client_protocol="openai"), "m"))
    assert "service_tier" not in sent(fake)


# -- thinking and finish reasons ------------------------------------------------------


async def test_thinking_is_reasoning_with_its_token_count(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    for stream in (False, True):
        chunks = await collect(
            provider.chat(request("why?", stream=stream, extra={"thinking": thinking}), "m")
        )
        assert sent(fake)["thinking"] == thinking
        assert "".join(e.text for e in events(chunks, ReasoningDelta)) == "pondering: why?"
        assert text(chunks) == "echo: why?"
        usage = events(chunks, UsageReport)[-1].usage
        assert (usage.reasoning_tokens, usage.completion_tokens) == (2, 4)
    # The signature delta is forwarded to Anthropic clients but is no neutral event.
    signature = [c for c in chunks if b'"signature_delta"' in (c.raw or b"")]
    assert len(signature) == 1 and signature[0].events == ()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("claude-fake-sonnet", "stop"),
        ("stop-stop_sequence", "stop"),
        ("stop-pause_turn", "stop"),
        ("stop-max_tokens", "length"),
        ("stop-model_context_window_exceeded", "length"),
        ("stop-refusal", "content_filter"),
        ("tool-use", "tool_calls"),
    ],
)
async def test_every_finish_reason(
    fake: FakeAnthropic, session: aiohttp.ClientSession, model: str, reason: str, stream: bool
) -> None:
    neutral = request(stream=stream, tools=(WEATHER_TOOL,))
    chunks = await collect(make_provider(session, fake.base_url).chat(neutral, model))
    assert events(chunks, Finish) == [Finish(0, reason)]


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "status", "error_type", "retryable"),
    [
        ("fail-400", 400, "bad_request", False),
        ("fail-context", 400, "context_length", False),
        ("fail-filter", 400, "content_filter", False),
        ("fail-401", 401, "authentication", False),
        ("fail-403", 403, "permission", False),
        ("fail-404", 404, "not_found", False),
        ("fail-413", 413, "context_length", False),
        ("fail-429", 429, "rate_limit", True),
        ("fail-500", 500, "server_error", True),
        ("fail-529", 529, "overloaded", True),
    ],
)
async def test_http_errors_are_mapped(
    fake: FakeAnthropic,
    session: aiohttp.ClientSession,
    model: str,
    status: int,
    error_type: str,
    retryable: bool,
    stream: bool,
) -> None:
    provider = make_provider(session, fake.base_url)
    with pytest.raises(UpstreamHTTPError) as caught:
        await collect(provider.chat(request(stream=stream), model))
    error = caught.value
    assert (error.status_code, error.error_type, error.retryable) == (status, error_type, retryable)
    assert error.message and "HTTP" not in error.message, "the upstream's own message is kept"
    assert error.retry_after == (1.0 if status == 429 else None)
    if status == 400:
        assert error.openai_type == "invalid_request_error"


async def test_an_error_event_before_anything_else_is_a_retryable_http_error(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    with pytest.raises(UpstreamHTTPError) as caught:
        await collect(provider.chat(request(stream=True), "error-first"))
    error = caught.value
    assert (error.status_code, error.error_type, error.retryable) == (529, "overloaded", True)
    assert error.message == "Overloaded"


async def test_stream_stall_before_first_byte_times_out(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, first_byte=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(stream=True), "stall-first-byte"))
    assert 0.25 < time.monotonic() - started < 2.0
    assert caught.value.phase == "first_byte" and caught.value.retryable


async def test_non_streaming_stall_is_bounded_by_total_only(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, first_byte=0.1, total=0.4)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(), "stall-first-byte"))
    assert 0.35 < time.monotonic() - started < 2.0
    assert caught.value.phase == "total" and not caught.value.retryable


async def test_stall_mid_stream_is_an_idle_timeout_after_chunks(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, idle=0.3)
    got: list[Chunk] = []
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(stream=True), "stall-mid"), got)
    assert time.monotonic() - started < 2.0
    assert caught.value.phase == "idle" and not caught.value.retryable
    assert len(events(got, TextDelta)) == 2


async def test_total_timeout_cuts_a_slow_stream(
    fake: FakeAnthropic, session: aiohttp.ClientSession
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
    fake: FakeAnthropic, session: aiohttp.ClientSession, model: str, error: type[Exception]
) -> None:
    got: list[Chunk] = []
    provider = make_provider(session, fake.base_url)
    with pytest.raises(error) as caught:
        await collect(provider.chat(request(stream=True), model), got)
    assert got and not any(c.final for c in got)
    assert not getattr(caught.value, "retryable", True)
    assert "echo: hello big world".startswith(text(got))
    if model != "malformed":
        assert len(events(got, TextDelta)) == 2
    if model == "error-mid":
        # Its overloaded_error stays overloaded (an Anthropic client is told so).
        assert "Overloaded mid-stream" in str(caught.value)
        assert getattr(caught.value, "error_type", None) == "overloaded"
    elif model != "malformed":
        assert getattr(caught.value, "error_type", None) == "interrupted"
    if model == "eof-mid":
        assert "message_stop" in str(caught.value)


@pytest.mark.parametrize("model", ["malformed", "reset-mid"])
async def test_broken_whole_bodies(
    fake: FakeAnthropic, session: aiohttp.ClientSession, model: str
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


async def test_the_api_key_never_appears_in_errors(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    def leaks(error: BaseException) -> bool:
        shown = [str(error), repr(error), "".join(traceback.format_exception(error))]
        if isinstance(error, UpstreamError):
            shown.append(orjson.dumps(error.to_openai()).decode())
        return any(CANARY in s for s in shown)

    failures: list[BaseException] = []
    # The fake echoes a wrong key it was given, as an upstream may: the adapter scrubs it.
    denied = make_provider(session, fake.base_url, key=CANARY)
    for stream in (False, True):
        with pytest.raises(UpstreamHTTPError) as caught:
            await collect(denied.chat(request(stream=stream), "m"))
        assert caught.value.status_code == 401 and "[redacted]" in caught.value.message
        assert caught.value.error_type == "authentication"
        failures.append(caught.value)
    failures.append(await error_of(denied.list_models()))
    failures.append(await error_of(denied.count_tokens(request(), "m")))
    with FakeAnthropic() as open_fake:
        provider = make_provider(session, open_fake.base_url, key=CANARY, first_byte=0.3, idle=0.3)
        for model in (
            "fail-400",
            "fail-429",
            "fail-529",
            "error-first",
            "stall-first-byte",
            "stall-mid",
            "reset-mid",
            "malformed",
            "eof-mid",
            "error-mid",
        ):
            failures.append(await error_of(collect(provider.chat(request(stream=True), model))))
    refused = make_provider(session, closed_port_url(), key=CANARY)
    failures.append(await error_of(collect(refused.chat(request(), "m"))))
    assert len(failures) == 15 and all(isinstance(f, UpstreamError) for f in failures)
    assert not [f for f in failures if leaks(f)]


# -- URLs, headers, the other endpoints -----------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_base_url_with_or_without_v1(
    fake: FakeAnthropic, session: aiohttp.ClientSession, suffix: str
) -> None:
    provider = make_provider(session, fake.base_url + suffix)
    assert text(await collect(provider.chat(request(), "m"))) == "echo: hello big world"
    assert fake.received[-1][0] == "/v1/messages"


async def test_configured_headers_replace_or_add(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    headers = {"Anthropic-Version": "2023-01-01", "anthropic-beta": "output-128k-2025-02-19"}
    provider = make_provider(session, fake.base_url, headers=headers)
    await collect(provider.chat(request(), "m"))
    received = [(name.lower(), value) for name, value in fake.received[-1][1].items()]
    assert [v for k, v in received if k == "anthropic-version"] == ["2023-01-01"]
    assert ("anthropic-beta", "output-128k-2025-02-19") in received
    assert ("x-api-key", KEY) in received


async def test_embeddings_are_refused_without_a_call(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    before = len(fake.received)
    with pytest.raises(InvalidRequest, match=r"provider claude \(anthropic\) has no embeddings"):
        await make_provider(session, fake.base_url).embeddings({"input": "x"}, "m")
    assert len(fake.received) == before


async def test_list_models_follows_pages(session: aiohttp.ClientSession) -> None:
    with FakeAnthropic(api_key=KEY, max_page_size=2) as paged:
        models = await make_provider(session, paged.base_url).list_models()
        paths = [path for path, _, _ in paged.received]
    assert models == [
        "claude-fake-opus",
        "claude-fake-sonnet",
        "claude-fake-haiku",
        "tool-use",
        "tool-use-2",
    ]
    assert paths == [
        "/v1/models?limit=1000",
        "/v1/models?limit=1000&after_id=claude-fake-sonnet",
        "/v1/models?limit=1000&after_id=tool-use",
    ]


async def test_count_tokens_sends_only_what_the_endpoint_takes(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    neutral = request(
        messages=(Message("system", "be brief"), Message("user", "one two three")),
        max_tokens=10,
        temperature=0.5,
        stop=("x",),
        stream=True,
        tools=(WEATHER_TOOL,),
        tool_choice="required",
        extra={"thinking": {"type": "enabled", "budget_tokens": 1024}, "top_k": 3},
    )
    # The fake refuses any other field with a 400, as Anthropic does.
    assert await provider.count_tokens(neutral, "m") == 2 + 3 + 10
    path, _, body = fake.received[-1]
    assert path == "/v1/messages/count_tokens"
    assert sorted(body) == ["messages", "model", "system", "thinking", "tool_choice", "tools"]


# -- frame parsing --------------------------------------------------------------------


def frames() -> StreamFrames:
    return StreamFrames("m", 1_700_000_000, scrub=lambda s: s.replace("sk-x", "***"))


def test_final_usage_prefers_the_counts_message_delta_repeats() -> None:
    parse = frames()
    start = {
        "type": "message_start",
        "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 10}},
    }
    assert parse.chunk(orjson.dumps(start), False).events == (
        ResponseStart("msg_1", "claude", 1_700_000_000),
        UsageReport(Usage(10)),
    )
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"input_tokens": 12, "cache_read_input_tokens": 5, "output_tokens": 7},
    }
    assert parse.chunk(orjson.dumps(delta), True).events == (
        Finish(0, "stop"),
        UsageReport(Usage(17, 7, 24, cached_tokens=5)),
    )


def test_a_streamed_tool_call_without_arguments_has_an_empty_object() -> None:
    """As a whole answer gives it ("{}"), never "": clients json.loads the arguments."""
    parse = frames()

    def events(event: dict[str, Any]) -> tuple[Any, ...]:
        return parse.chunk(orjson.dumps(event), True).events

    none = {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}
    some = {"type": "tool_use", "id": "toolu_2", "name": "w", "input": {}}
    assert events({"type": "content_block_start", "index": 0, "content_block": none}) == (
        ToolCallDelta(0, 0, "toolu_1", "get_time", ""),
    )
    empty = {"type": "input_json_delta", "partial_json": ""}
    assert events({"type": "content_block_delta", "index": 0, "delta": empty}) == ()
    assert events({"type": "content_block_stop", "index": 0}) == (
        ToolCallDelta(0, 0, None, None, "{}"),
    )
    events({"type": "content_block_start", "index": 1, "content_block": some})
    json_delta = {"type": "input_json_delta", "partial_json": '{"a": 1}'}
    assert events({"type": "content_block_delta", "index": 1, "delta": json_delta}) == (
        ToolCallDelta(0, 1, None, None, '{"a": 1}'),
    )
    assert events({"type": "content_block_stop", "index": 1}) == ()


def test_unknown_events_pass_through_and_multi_line_data_is_one_line() -> None:
    chunk = frames().chunk(b'{"type": "future_event",\n"x": 1}', True)
    assert chunk.events == () and not chunk.final
    assert chunk.raw == b'event: future_event\ndata: {"type": "future_event", "x": 1}\n\n'


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}}',
        b'{"type": "content_block_delta", "index": "0", "delta": {}}',
        b'{"type": "message_start", "message": []}',
        b'{"no": "type"}',
        b"[1, 2]",
        b'{"type": "message_stop"}',  # the end before any start
    ],
)
def test_frames_of_the_wrong_shape_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        frames().chunk(payload, False)


def test_an_error_event_is_scrubbed_and_typed_by_when_it_comes() -> None:
    event = b'{"type": "error", "error": {"type": "rate_limit_error", "message": "key sk-x"}}'
    with pytest.raises(UpstreamHTTPError) as caught:
        frames().chunk(event, yielded=False)
    assert (caught.value.status_code, caught.value.message) == (429, "key ***")
    assert caught.value.error_type == "rate_limit" and caught.value.retryable
    with pytest.raises(UpstreamInterrupted, match=r"key \*\*\*"):
        frames().chunk(event, yielded=True)


def test_provider_satisfies_the_seam_and_counts_tokens() -> None:
    from parley.providers.base import Provider, TokenCounter

    provider: Provider = AnthropicProvider(
        ProviderConfig(name="p", kind="anthropic", base_url="https://api.anthropic.com"),
        SimpleNamespace(),  # type: ignore[arg-type]
    )
    assert provider.protocol == "anthropic" and isinstance(provider, TokenCounter)


async def test_a_finished_stream_reuses_its_connection_and_an_abandoned_one_does_not(
    fake: FakeAnthropic,
) -> None:
    created: list[object] = []

    async def on_create(_: object, __: object, params: object) -> None:
        created.append(params)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        provider = make_provider(session, fake.base_url)
        for _ in range(2):  # read to message_stop and past it: the connection is pooled
            await collect(provider.chat(request(stream=True), "m"))
        assert len(created) == 1
        stream = provider.chat(request(stream=True), "slow-stream")
        assert (await anext(stream)).events
        await stream.aclose()  # the consumer walks away mid-stream
        chunks = await collect(provider.chat(request(stream=True), "m"))
        assert text(chunks) == "echo: hello big world"
        assert len(created) == 2, "the abandoned connection was closed, not pooled"
