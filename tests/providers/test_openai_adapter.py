"""The OpenAI adapter against a real fake upstream over loopback HTTP and SSE.

Every test drives ``OpenAIProvider`` with a real ``aiohttp.ClientSession`` against
``tests.fakes.openai_upstream``; timeouts are short so the stall tests stay fast.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest

from parley.domain.events import (
    Chunk,
    Finish,
    ResponseStart,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from parley.domain.messages import ChatRequest, Message, ToolCall
from parley.domain.usage import Usage
from parley.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamInterrupted,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from parley.providers.openai import OpenAIProvider
from parley.settings import ProviderConfig, Secret, Timeouts
from tests.fakes.openai_upstream import FakeOpenAI
from tests.providers.support import closed_port_url, collect, error_of, events, text

CANARY = "sk-canary-7f3a9c1e5b2d4f60"
DONE = b"data: [DONE]\n\n"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as upstream:
        yield upstream


def make_provider(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    key: str = "sk-test",
    first_byte: float = 5.0,
    idle: float = 5.0,
    total: float = 30.0,
    stream_usage: bool = True,
) -> OpenAIProvider:
    config = ProviderConfig(
        name="fake",
        kind="openai",
        base_url=base_url,
        api_key=Secret(key),
        timeouts=Timeouts(connect=2.0, first_byte=first_byte, idle=idle, total=total),
        stream_usage=stream_usage,
    )
    return OpenAIProvider(config, session)


def request(
    text: str = "hello big world",
    *,
    stream: bool = False,
    include_usage: bool = False,
    raw: Mapping[str, Any] | None = None,
    **fields: Any,
) -> ChatRequest:
    return ChatRequest(
        model="fake/x",
        messages=(Message("user", text),),
        stream=stream,
        include_usage=include_usage,
        raw=raw,
        **fields,
    )


async def upstream_bytes(session: aiohttp.ClientSession, fake: FakeOpenAI) -> bytes:
    """What the fake answers when sent the last body it received, directly."""
    body = fake.received[-1][2]
    async with session.post(f"{fake.base_url}/chat/completions", data=orjson.dumps(body)) as r:
        return await r.read()


async def test_non_streaming_events_usage_and_raw_bytes(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    [chunk] = await collect(provider.chat(request(), "gpt-4o-mini"))
    assert chunk.final and chunk.protocol == "openai" and not chunk.internal
    start, *rest = chunk.events
    assert isinstance(start, ResponseStart) and start.id.startswith("chatcmpl-")
    assert (start.model, start.created) == ("gpt-4o-mini", 1_700_000_000)
    assert rest == [
        TextDelta(0, "echo: hello big world"),
        Finish(0, "stop"),
        UsageReport(Usage(3, 4, 7, cached_tokens=0, reasoning_tokens=0)),
    ]
    path, headers, body = fake.received[-1]
    assert path == "/v1/chat/completions" and body["model"] == "gpt-4o-mini"
    assert headers["Authorization"] == "Bearer sk-test"
    assert chunk.raw == await upstream_bytes(session, fake)


async def test_streaming_deltas_reassemble_and_bytes_pass_through(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    chunks = await collect(provider.chat(request(stream=True, include_usage=True), "m"))
    assert text(chunks) == "echo: hello big world"
    assert len(events(chunks, TextDelta)) == 4
    assert events(chunks, Finish) == [Finish(0, "stop")]
    assert [e.usage.total_tokens for e in events(chunks, UsageReport)] == [7]
    assert len(events(chunks, ResponseStart)) == 1
    assert chunks[-1].final and chunks[-1].raw == DONE and chunks[-1].events == ()
    assert not any(c.final for c in chunks[:-1]) and not any(c.internal for c in chunks)
    assert b"".join(c.raw or b"" for c in chunks) == await upstream_bytes(session, fake)


async def test_usage_is_requested_upstream_but_hidden_from_a_client_that_did_not_ask(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    raw = {
        "model": "fake/x",
        "stream": True,
        "stream_options": {"vendor_flag": 1},
        "messages": [{"role": "user", "content": "hi"}],
    }
    chunks = await collect(provider.chat(request("hi", stream=True, raw=raw), "m"))
    assert fake.received[-1][2]["stream_options"] == {"vendor_flag": 1, "include_usage": True}
    assert raw["stream_options"] == {"vendor_flag": 1}, "the client's body is not mutated"
    [hidden] = [c for c in chunks if c.internal]
    assert [type(e) for e in hidden.events] == [UsageReport]
    assert text([c for c in chunks if not c.internal]) == "echo: hi"


async def test_stream_usage_off_sends_no_stream_options(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, stream_usage=False)
    chunks = await collect(provider.chat(request(stream=True), "m"))
    assert "stream_options" not in fake.received[-1][2]
    assert events(chunks, UsageReport) == [] and chunks[-1].raw == DONE


async def test_every_client_field_passes_through(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    raw = {
        "model": "fake/gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi", "name": "ann"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "n": 2,
        "stop": ["\n"],
        "seed": 42,
        "logprobs": True,
        "top_logprobs": 2,
        "user": "u-1",
        "metadata": {"k": "v"},
        "x_vendor_extension": {"deep": [1, 2]},
    }
    await collect(make_provider(session, fake.base_url).chat(request(raw=raw), "gpt-4o-mini"))
    assert fake.received[-1][2] == {**raw, "model": "gpt-4o-mini"}


async def test_a_neutral_request_becomes_an_openai_body(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    tool = MappingProxyType({"type": "function", "function": {"name": "f"}})
    neutral = request(
        max_tokens=5,
        temperature=0.5,
        stop=("x",),
        tools=(tool,),
        tool_choice="none",
        user="u-2",
        extra={"seed": 7},
    )
    await collect(make_provider(session, fake.base_url).chat(neutral, "m"))
    assert fake.received[-1][2] == {
        "model": "m",
        "messages": [{"role": "user", "content": "hello big world"}],
        "max_tokens": 5,
        "temperature": 0.5,
        "stop": ["x"],
        "tool_choice": "none",
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "user": "u-2",
        "seed": 7,
    }


async def test_tool_call_round_trip(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    provider = make_provider(session, fake.base_url)
    [whole] = await collect(provider.chat(request("weather?"), "tool-call"))
    assert events([whole], ToolCallDelta) == [
        ToolCallDelta(0, 0, "call_fake_1", "get_weather", '{"city": "Paris"}')
    ]
    assert events([whole], Finish) == [Finish(0, "tool_calls")]

    chunks = await collect(provider.chat(request("weather?", stream=True), "tool-call"))
    deltas = events(chunks, ToolCallDelta)
    assert deltas[0].id == "call_fake_1" and deltas[0].name == "get_weather"
    assert len([d for d in deltas if d.arguments]) >= 2
    assert "".join(d.arguments for d in deltas) == '{"city": "Paris"}'
    assert events(chunks, Finish) == [Finish(0, "tool_calls")]

    history = (
        Message("user", "weather?"),
        Message(
            "assistant",
            None,
            tool_calls=(ToolCall("call_fake_1", "get_weather", '{"city": "Paris"}'),),
        ),
        Message("tool", "18C and sunny", tool_call_id="call_fake_1"),
    )
    answer = ChatRequest(model="fake/tool-call", messages=history, stream=True)
    assert text(await collect(provider.chat(answer, "tool-call"))) == "tool said: 18C and sunny"
    sent = fake.received[-1][2]["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert sent[2] == {"role": "tool", "content": "18C and sunny", "tool_call_id": "call_fake_1"}


async def test_images_reach_the_upstream_intact(
    fake: FakeOpenAI, session: aiohttp.ClientSession
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
    provider = make_provider(session, fake.base_url)
    neutral = ChatRequest(model="fake/x", messages=(Message("user", parts),))
    [chunk] = await collect(provider.chat(neutral, "m"))
    assert fake.received[-1][2]["messages"][0]["content"] == [dict(p) for p in parts]
    assert text([chunk]) == "echo: what is this?"
    raw = {"model": "fake/x", "messages": [{"role": "user", "content": [dict(p) for p in parts]}]}
    await collect(provider.chat(request(raw=raw), "m"))
    assert fake.received[-1][2]["messages"] == raw["messages"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "status", "error_type", "retryable"),
    [
        ("fail-400", 400, "bad_request", False),
        ("fail-401", 401, "authentication", False),
        ("fail-429", 429, "rate_limit", True),
        ("fail-500", 500, "server_error", True),
        ("fail-503", 503, "overloaded", True),
    ],
)
async def test_http_errors_are_mapped(
    fake: FakeOpenAI,
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
    if status == 429:
        assert error.retry_after == 1.0 and error.openai_type == "rate_limit_error"
        assert error.code == "rate_limit_exceeded"


async def test_flaky_upstream_fails_then_answers(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    for _ in range(2):
        with pytest.raises(UpstreamHTTPError) as caught:
            await collect(provider.chat(request(user="flaky-user"), "flaky-2"))
        assert caught.value.retryable
    assert text(await collect(provider.chat(request(user="flaky-user"), "flaky-2")))


async def test_stream_stall_before_first_byte_times_out(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, first_byte=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(stream=True), "stall-first-byte"))
    assert 0.25 < time.monotonic() - started < 2.0
    assert caught.value.phase == "first_byte" and caught.value.retryable


async def test_non_streaming_stall_is_bounded_by_total_only(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    # Headers of a non-streaming answer come when the answer is done, so first_byte does
    # not apply; total does, and its timeout is not retryable (a retry would bill twice).
    provider = make_provider(session, fake.base_url, first_byte=0.1, total=0.4)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(stream=False), "stall-first-byte"))
    assert 0.35 < time.monotonic() - started < 2.0
    assert caught.value.phase == "total" and not caught.value.retryable


async def test_stall_mid_stream_is_an_idle_timeout_after_chunks(
    fake: FakeOpenAI, session: aiohttp.ClientSession
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
    fake: FakeOpenAI, session: aiohttp.ClientSession
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
    fake: FakeOpenAI, session: aiohttp.ClientSession, model: str, error: type[Exception]
) -> None:
    got: list[Chunk] = []
    with pytest.raises(error) as caught:
        await collect(make_provider(session, fake.base_url).chat(request(stream=True), model), got)
    assert got and text(got).startswith("echo:")
    assert not getattr(caught.value, "retryable", True)
    if model == "error-mid":
        assert "overloaded mid-stream" in str(caught.value)


async def test_a_stream_without_done_but_finished_still_ends_cleanly(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    chunks = await collect(
        make_provider(session, fake.base_url).chat(request(stream=True), "no-done")
    )
    assert text(chunks) == "echo: hello big world"
    assert chunks[-1].final and chunks[-1].raw == DONE


@pytest.mark.parametrize("model", ["malformed", "reset-mid"])
async def test_broken_whole_bodies(
    fake: FakeOpenAI, session: aiohttp.ClientSession, model: str
) -> None:
    provider = make_provider(session, fake.base_url)
    expected = UpstreamProtocolError if model == "malformed" else UpstreamConnectError
    with pytest.raises(expected):
        await collect(provider.chat(request(), model))


@pytest.mark.parametrize("stream", [False, True])
async def test_connection_refused_is_a_retryable_connect_error(
    session: aiohttp.ClientSession, stream: bool
) -> None:
    with pytest.raises(UpstreamConnectError) as caught:
        await collect(
            make_provider(session, closed_port_url("/v1")).chat(request(stream=stream), "m")
        )
    assert caught.value.retryable


async def test_embeddings(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    provider = make_provider(session, fake.base_url)
    body = {"model": "fake/emb", "input": ["hello world", "goodbye"], "dimensions": 4}
    result = await provider.embeddings(body, "text-embedding-3-small")
    assert fake.received[-1][2] == {**body, "model": "text-embedding-3-small"}
    parsed = orjson.loads(result.raw)
    assert (result.count, result.protocol, result.model) == (2, "openai", "text-embedding-3-small")
    assert len(parsed["data"][0]["embedding"]) == 4
    assert result.usage == Usage(prompt_tokens=3, total_tokens=3)
    with pytest.raises(UpstreamHTTPError) as caught:
        await provider.embeddings(body, "fail-429")
    assert caught.value.retry_after == 1.0


async def test_a_cancelled_stream_releases_its_connection_and_never_reuses_it(
    fake: FakeOpenAI,
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
            await collect(provider.chat(request(stream=True), "m"))
        assert len(created) == 1

        stream = provider.chat(request(stream=True), "slow-stream")
        assert (await anext(stream)).events
        await stream.aclose()  # the consumer walks away mid-stream

        consumer = asyncio.create_task(collect(provider.chat(request(stream=True), "slow-stream")))
        await asyncio.sleep(0.15)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer

        # With a pool of one, a leaked connection would block this; a half-read one reused
        # would garble it.
        chunks = await asyncio.wait_for(collect(provider.chat(request(stream=True), "m")), 2)
        assert text(chunks) == "echo: hello big world"
        assert len(created) == 3, "the abandoned connections were closed, not pooled"


async def test_the_api_key_never_appears_in_errors(session: aiohttp.ClientSession) -> None:
    def leaks(error: BaseException) -> bool:
        shown = [str(error), repr(error), "".join(traceback.format_exception(error))]
        if isinstance(error, UpstreamError):
            shown.append(orjson.dumps(error.to_openai()).decode())
        return any(CANARY in s for s in shown)

    failures: list[BaseException] = []
    with FakeOpenAI(api_key="sk-the-right-one") as wrong_key, FakeOpenAI() as fake:
        # This fake echoes the key it was given, as OpenAI does: the adapter scrubs it.
        denied = make_provider(session, wrong_key.base_url, key=CANARY)
        for stream in (False, True):
            with pytest.raises(UpstreamHTTPError) as caught:
                await collect(denied.chat(request(stream=stream), "m"))
            assert caught.value.status_code == 401 and "[redacted]" in caught.value.message
            failures.append(caught.value)
        failures.append(await error_of(denied.embeddings({"input": "x"}, "e")))
        provider = make_provider(session, fake.base_url, key=CANARY, first_byte=0.3, idle=0.3)
        for model in (
            "fail-400",
            "fail-429",
            "stall-first-byte",
            "stall-mid",
            "reset-mid",
            "malformed",
            "eof-mid",
            "error-mid",
        ):
            failures.append(await error_of(collect(provider.chat(request(stream=True), model))))
        refused = make_provider(session, closed_port_url("/v1"), key=CANARY)
        failures.append(await error_of(collect(refused.chat(request(), "m"))))
    assert len(failures) == 12 and all(isinstance(f, UpstreamError) for f in failures)
    assert not [f for f in failures if leaks(f)]


def test_retry_after_forms() -> None:
    from parley.providers.wire import MAX_RETRY_AFTER, retry_after

    assert retry_after({"Retry-After": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "Retry-After": "9"}) == 1.5
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < (retry_after({"Retry-After": later}) or 0) <= 30
    assert retry_after({"Retry-After": "soon"}) is None and retry_after({}) is None
    # Too large for a float, or far off, is still "not soon", never "no wait given".
    for huge in ("9" * 400, "1e400", "Fri, 31 Dec 9999 23:59:59 GMT"):
        assert retry_after({"Retry-After": huge}) == MAX_RETRY_AFTER, huge
    assert retry_after({"retry-after-ms": "9" * 400}) == MAX_RETRY_AFTER
    assert retry_after({"Retry-After": "nan"}) is None
    assert retry_after({"Retry-After": "-5"}) == 0.0


def test_error_bodies_of_other_servers() -> None:
    from parley.providers.openai_wire import error_fields

    assert error_fields(b'{"error": "Input validation error", "error_type": "validation"}') == (
        "Input validation error",
        "validation",
        None,
    )
    assert error_fields(b'{"detail": "Not Found"}') == ("Not Found", None, None)
    assert error_fields(b"<html>Bad Gateway</html>" + b"x" * 2000)[0] == (
        "<html>Bad Gateway</html>" + "x" * 476
    )
    assert error_fields(b'{"error": {"message": "m", "type": "t", "code": 400}}') == (
        "m",
        "t",
        "400",
    )


def test_an_error_object_before_any_chunk_is_an_http_error() -> None:
    from parley.providers.openai_wire import StreamFrames

    frames = StreamFrames("m", hide_usage=True, scrub=lambda s: s.replace("sk-x", "***"))
    vllm = b'{"error": {"message": "bad key sk-x", "type": "BadRequestError", "code": 400}}'
    with pytest.raises(UpstreamHTTPError) as caught:
        frames.chunk(vllm, yielded=False)
    assert (caught.value.status_code, caught.value.message) == (400, "bad key ***")
    with pytest.raises(UpstreamInterrupted):
        frames.chunk(vllm, yielded=True)


def test_a_multi_line_data_field_is_forwarded_as_one_line() -> None:
    from parley.providers.openai_wire import StreamFrames

    chunk = StreamFrames("m", True, str).chunk(b'{"id": "c",\n"choices": []}', False)
    assert chunk.raw == b'data: {"id": "c", "choices": []}\n\n'
    assert orjson.loads(chunk.raw[6:]) == {"id": "c", "choices": []}


# -- the SSE decoder ------------------------------------------------------------------

SSE_STREAM = (
    b": keep-alive comment\r\n\r\n"
    b'event: message\r\nid: 1\r\ndata: {"a": 1}\r\n\r\n'
    b'data: {"b":\ndata:  2}\n\n'
    b"retry: 100\n\n"
    b"data:no-space\rdata\r\r"
    b'dataX: not a data field\ndata: {"c": 3}\n\n'
    b"data: [DONE]\n\n"
)
SSE_EVENTS = [b'{"a": 1}', b'{"b":\n 2}', b"no-space\n", b'{"c": 3}', b"[DONE]"]


def decode(pieces: list[bytes]) -> list[bytes]:
    from parley.providers.sse import SSEDecoder

    decoder = SSEDecoder()
    out = [payload for piece in pieces for payload in decoder.feed(piece)]
    return out + decoder.close()


def test_sse_decoder_whole_and_one_byte_at_a_time() -> None:
    assert decode([SSE_STREAM]) == SSE_EVENTS
    assert decode([SSE_STREAM[i : i + 1] for i in range(len(SSE_STREAM))]) == SSE_EVENTS


def test_sse_decoder_split_at_every_boundary() -> None:
    for cut in range(len(SSE_STREAM) + 1):
        assert decode([SSE_STREAM[:cut], SSE_STREAM[cut:]]) == SSE_EVENTS, cut


def test_sse_decoder_refuses_an_endless_event() -> None:
    from parley.providers.sse import MAX_EVENT_BYTES, SSEDecoder

    decoder = SSEDecoder()
    with pytest.raises(UpstreamProtocolError):
        for _ in range(MAX_EVENT_BYTES // 65536 + 2):
            decoder.feed(b"data: " + b"x" * 65536)


def test_sse_decoder_end_of_stream() -> None:
    # A last event missing its blank line is kept; a line cut off mid-way is not.
    assert decode([b"data: 1\n\ndata: 2\n"]) == [b"1", b"2"]
    assert decode([b'data: 1\n\ndata: {"trunc']) == [b"1"]
    assert decode([b"data: 1\r"]) == [b"1"]


def test_provider_satisfies_the_seam() -> None:
    from parley.providers.base import Provider

    provider: Provider = OpenAIProvider(
        ProviderConfig(name="p", kind="openai", base_url="http://x/v1"),
        SimpleNamespace(),  # type: ignore[arg-type]
    )
    assert provider.protocol == "openai"


def test_registry_builds_configured_providers_and_refuses_unsupported_kinds() -> None:
    from parley.errors import ConfigError
    from parley.providers.registry import ADAPTERS, build_providers
    from parley.settings import Settings

    session: Any = SimpleNamespace()
    configs = (
        ProviderConfig(name="a", kind="openai", base_url="http://a/v1"),
        ProviderConfig(name="h", kind="huggingface", base_url="http://h/v1"),
    )
    settings = Settings(data_dir=Path("."), database_url="sqlite://", providers=configs)
    built = build_providers(settings, session)
    assert sorted(built) == ["a", "h"]
    assert all(isinstance(p, OpenAIProvider) for p in built.values())
    assert build_providers(Settings(data_dir=Path("."), database_url="sqlite://"), session) == {}
    with pytest.raises(TypeError):
        ADAPTERS["nonexistent"] = OpenAIProvider  # type: ignore[index]
    # Settings refuse unknown kinds; a config built in code is refused here too.
    bogus = ProviderConfig(name="o", kind="nonexistent", base_url="http://o")
    with pytest.raises(ConfigError, match="not supported"):
        build_providers(
            Settings(data_dir=Path("."), database_url="sqlite://", providers=(bogus,)), session
        )


def test_parallel_tool_calls_streamed_without_an_index_stay_apart() -> None:
    """Google's OpenAI-compatible API streams parallel calls with ids and no ``index``: a
    new id is the next call; a delta without an id continues the current one."""
    from parley.providers.openai_wire import StreamFrames

    frames = StreamFrames("m", hide_usage=False, scrub=lambda s: s)

    def call(call_id: str | None, arguments: str, name: str | None = "w") -> bytes:
        function: dict[str, Any] = {"arguments": arguments}
        if name is not None:
            function["name"] = name
        delta: dict[str, Any] = {"type": "function", "function": function}
        if call_id is not None:
            delta["id"] = call_id
        choice = {"index": 0, "delta": {"tool_calls": [delta]}}
        return orjson.dumps({"id": "c", "model": "m", "choices": [choice]})

    sent = [
        call("function-call-1", '{"city":'),
        call(None, ' "Paris"}', name=None),
        call("function-call-2", '{"city": "Rome"}'),
        call("function-call-2", "", name=None),
    ]
    deltas = [
        event
        for payload in sent
        for event in frames.chunk(payload, yielded=False).events
        if isinstance(event, ToolCallDelta)
    ]
    assert [(d.index, d.id, d.arguments) for d in deltas] == [
        (0, "function-call-1", '{"city":'),
        (0, None, ' "Paris"}'),
        (1, "function-call-2", '{"city": "Rome"}'),
        (1, "function-call-2", ""),
    ]
    # Indices given by the upstream are kept as they are.
    indexed = StreamFrames("m", hide_usage=False, scrub=lambda s: s)
    payload = orjson.dumps(
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 3, "id": "x"}]}}]}
    )
    [event] = indexed.chunk(payload, yielded=False).events
    assert isinstance(event, ToolCallDelta) and event.index == 3
