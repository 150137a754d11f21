"""The Gemini adapter against a real fake upstream over loopback HTTP and SSE.

Every test drives ``GeminiProvider`` with a real ``aiohttp.ClientSession`` against
``tests.fakes.gemini_upstream``; timeouts are short so the stall tests stay fast.
"""

from __future__ import annotations

import base64
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
from parley.providers.gemini import GeminiProvider
from parley.providers.gemini_request import clean_schema
from parley.providers.gemini_wire import finish_reason, usage_from
from parley.settings import ProviderConfig, Secret, Timeouts
from tests.fakes.gemini_upstream import FakeGemini
from tests.providers.support import closed_port_url, collect, error_of, events

CANARY = "AIza-canary-7f3a9c1e5b2d4f60"
KEY = "AIza-test-key"
WEATHER = MappingProxyType(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with FakeGemini(api_key=KEY) as upstream:
        yield upstream


def make_provider(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    key: str = KEY,
    first_byte: float = 5.0,
    idle: float = 5.0,
    total: float = 30.0,
) -> GeminiProvider:
    config = ProviderConfig(
        name="gem",
        kind="gemini",
        base_url=base_url,
        api_key=Secret(key),
        timeouts=Timeouts(connect=2.0, first_byte=first_byte, idle=idle, total=total),
    )
    return GeminiProvider(config, session)


def request(text: str = "hello big world", *, stream: bool = False, **fields: Any) -> ChatRequest:
    messages = fields.pop("messages", (Message("user", text),))
    return ChatRequest(model="gem/x", messages=messages, stream=stream, **fields)


def text(chunks: list[Chunk], choice: int = 0) -> str:
    return "".join(e.text for e in events(chunks, TextDelta) if e.choice == choice)


def last_body(fake: FakeGemini) -> dict[str, Any]:
    body = fake.received[-1][2]
    assert isinstance(body, dict)
    return body


# -- answers -----------------------------------------------------------------------------


async def test_non_streaming_answer(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    provider = make_provider(session, fake.base_url)
    [chunk] = await collect(provider.chat(request(), "gemini-2.0-flash"))
    assert chunk.final and chunk.raw is None and chunk.protocol is None
    start, *rest = chunk.events
    assert isinstance(start, ResponseStart)
    assert start.model == "gemini-2.0-flash-001" and len(start.id) == 22
    assert abs(start.created - time.time()) < 60
    assert rest == [
        TextDelta(0, "echo: hello big world"),
        Finish(0, "stop"),
        UsageReport(Usage(3, 4, 7)),
    ]
    path, headers, body = fake.received[-1]
    assert path == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert headers["x-goog-api-key"] == KEY and "Authorization" not in headers
    assert body == {"contents": [{"role": "user", "parts": [{"text": "hello big world"}]}]}


async def test_streaming_answer_ends_with_one_final_chunk(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    chunks = await collect(provider.chat(request(stream=True), "gemini-2.0-flash"))
    assert fake.received[-1][0] == "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    assert "key=" not in fake.received[-1][0]
    assert text(chunks) == "echo: hello big world"
    assert len(events(chunks, TextDelta)) == 3
    assert len(events(chunks, ResponseStart)) == 1 and isinstance(
        chunks[0].events[0], ResponseStart
    )
    assert events(chunks, Finish) == [Finish(0, "stop")]
    # The fake repeats usageMetadata on every frame: only the last, complete one is reported.
    assert events(chunks, UsageReport) == [UsageReport(Usage(3, 4, 7))]
    assert chunks[-1].final and chunks[-1].events == ()
    assert not any(c.final for c in chunks[:-1])
    assert all(c.raw is None and c.protocol is None for c in chunks)


async def test_system_prompt_and_history(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    history = (
        Message("system", "be brief"),
        Message("developer", "use French"),
        Message("user", "hi"),
        Message("assistant", "salut"),
        Message("user", "first"),
        Message("user", ({"type": "text", "text": "second"},)),
    )
    [chunk] = await collect(
        make_provider(session, fake.base_url).chat(request(messages=history), "gemini-2.0-flash")
    )
    body = last_body(fake)
    assert body["systemInstruction"] == {"parts": [{"text": "be brief"}, {"text": "use French"}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "hi"}]},
        {"role": "model", "parts": [{"text": "salut"}]},
        {"role": "user", "parts": [{"text": "first"}, {"text": "second"}]},
    ]
    assert text([chunk]) == "echo: first second"


async def test_images(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    parts = (
        {"type": "text", "text": "what are these?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp?size=2"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/picture"}},
    )
    provider = make_provider(session, fake.base_url)
    [chunk] = await collect(
        provider.chat(request(messages=(Message("user", parts),)), "gemini-2.0-flash")
    )
    assert last_body(fake)["contents"][0]["parts"] == [
        {"text": "what are these?"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp?size=2"}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/picture"}},
    ]
    assert text([chunk]) == "echo: what are these?"

    sent = len(fake.received)
    for url in ("ftp://example.com/cat.png", "data:image/png,notbase64"):
        image = ({"type": "image_url", "image_url": {"url": url}},)
        with pytest.raises(InvalidRequest):
            await collect(provider.chat(request(messages=(Message("user", image),)), "m"))
    assert len(fake.received) == sent, "refused before any HTTP call"


# -- tools -------------------------------------------------------------------------------


async def test_tool_declarations_are_cleaned_for_gemini(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    no_arguments = {
        "type": "function",
        "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
    }
    provider = make_provider(session, fake.base_url)
    await collect(provider.chat(request(tools=(WEATHER, no_arguments)), "gemini-2.0-flash"))
    assert last_body(fake)["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather of a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
                {"name": "now"},
            ]
        }
    ]


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
async def test_tool_choice(
    fake: FakeGemini, session: aiohttp.ClientSession, choice: Any, config: dict[str, Any]
) -> None:
    provider = make_provider(session, fake.base_url)
    chunks = await collect(
        provider.chat(request(tools=(WEATHER,), tool_choice=choice), "tool-call")
    )
    assert last_body(fake)["toolConfig"] == {"functionCallingConfig": config}
    called = bool(events(chunks, ToolCallDelta))
    assert called == (choice != "none")


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_call_round_trip(
    fake: FakeGemini, session: aiohttp.ClientSession, stream: bool
) -> None:
    provider = make_provider(session, fake.base_url)
    chunks = await collect(
        provider.chat(request("weather?", stream=stream, tools=(WEATHER,)), "tool-call")
    )
    [call] = events(chunks, ToolCallDelta)
    assert (call.choice, call.index, call.name, call.arguments) == (
        0,
        0,
        "get_weather",
        '{"city":"Paris"}',
    )
    assert call.id.startswith("call_")
    assert events(chunks, Finish) == [Finish(0, "tool_calls")]

    history = (
        Message("user", "weather?"),
        Message("assistant", None, tool_calls=(ToolCall(call.id, "get_weather", call.arguments),)),
        Message("tool", "18C and sunny", tool_call_id=call.id),
    )
    answer = await collect(
        provider.chat(request(messages=history, stream=stream, tools=(WEATHER,)), "tool-call")
    )
    assert text(answer) == 'tool said: {"content":"18C and sunny"}'
    assert events(answer, Finish) == [Finish(0, "stop")]
    assert last_body(fake)["contents"] == [
        {"role": "user", "parts": [{"text": "weather?"}]},
        {
            "role": "model",
            "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
        },
        {
            "role": "user",
            "parts": [
                {
                    "functionResponse": {
                        "name": "get_weather",
                        "response": {"content": "18C and sunny"},
                    }
                }
            ],
        },
    ]


async def test_parallel_calls_and_json_results(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    [chunk] = await collect(provider.chat(request(tools=(WEATHER,)), "tool-call-2"))
    calls = events([chunk], ToolCallDelta)
    assert [(c.index, c.arguments) for c in calls] == [
        (0, '{"city":"Paris"}'),
        (1, '{"city":"London"}'),
    ]
    assert len({c.id for c in calls}) == 2
    again = events(
        await collect(provider.chat(request(tools=(WEATHER,)), "tool-call-2")), ToolCallDelta
    )
    assert [c.id for c in again] == [c.id for c in calls], "ids are stable for one response"

    history = (
        Message("user", "weather?"),
        Message(
            "assistant",
            "Checking both.",
            tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in calls),
        ),
        Message("tool", '{"temp": 18}', tool_call_id=calls[0].id),
        Message("tool", ({"type": "text", "text": "[1, 2]"},), tool_call_id=calls[1].id),
        Message("user", "and so?"),
    )
    await collect(provider.chat(request(messages=history, tools=(WEATHER,)), "gemini-2.0-flash"))
    model_turn, results = last_body(fake)["contents"][1:]
    assert model_turn["parts"][0] == {"text": "Checking both."}
    assert "thoughtSignature" not in model_turn["parts"][1], "only Gemini 3 needs one"
    assert results["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
        {"functionResponse": {"name": "get_weather", "response": {"content": "[1, 2]"}}},
        {"text": "and so?"},
    ]


async def test_gemini_3_replays_calls_with_a_placeholder_signature(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    calls = (
        ToolCall("call_a", "get_weather", '{"city": "Paris"}'),
        ToolCall("call_b", "get_weather", ""),
    )
    history = (
        Message("user", "weather?"),
        Message("assistant", None, tool_calls=calls),
        Message("tool", "18C", tool_call_id="call_a"),
        Message("tool", "12C", tool_call_id="call_b"),
    )
    provider = make_provider(session, fake.base_url)
    # The fake, like Gemini 3, refuses a replayed call without a thought signature.
    await collect(
        provider.chat(request(messages=history, tools=(WEATHER,)), "gemini-3-pro-preview")
    )
    parts = last_body(fake)["contents"][1]["parts"]
    assert parts[0]["thoughtSignature"] == "skip_thought_signature_validator"
    assert parts[1] == {"functionCall": {"name": "get_weather", "args": {}}}


@pytest.mark.parametrize(
    "history",
    [
        (
            Message("user", "x"),
            Message("assistant", None, tool_calls=(ToolCall("c1", "f", "{not json"),)),
        ),
        (
            Message("user", "x"),
            Message("assistant", None, tool_calls=(ToolCall("c1", "f", "[1]"),)),
        ),
        (Message("user", "x"), Message("tool", "result", tool_call_id="nobody")),
    ],
)
async def test_untranslatable_histories_are_refused_before_sending(
    fake: FakeGemini, session: aiohttp.ClientSession, history: tuple[Message, ...]
) -> None:
    sent = len(fake.received)
    with pytest.raises(InvalidRequest):
        await collect(make_provider(session, fake.base_url).chat(request(messages=history), "m"))
    assert len(fake.received) == sent


# -- generation settings, usage, finish reasons --------------------------------------------


async def test_generation_config(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": ["string", "null"]}},
        "additionalProperties": False,
    }
    neutral = request(
        stop=("END", "STOP"),
        temperature=0.5,
        top_p=0.9,
        max_tokens=64,
        n=2,
        user="u-1",
        extra={
            "seed": 7,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            # Fields that ask for nothing are no reason to refuse.
            "logprobs": False,
            "top_logprobs": 0,
            "logit_bias": {},
            "parallel_tool_calls": False,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": schema, "strict": True},
            },
        },
    )
    [chunk] = await collect(make_provider(session, fake.base_url).chat(neutral, "gemini-2.0-flash"))
    assert last_body(fake)["generationConfig"] == {
        "temperature": 0.5,
        "topP": 0.9,
        "maxOutputTokens": 64,
        "candidateCount": 2,
        "seed": 7,
        "presencePenalty": 0.1,
        "frequencyPenalty": 0.2,
        "stopSequences": ["END", "STOP"],
        "responseMimeType": "application/json",
        "responseSchema": {
            "type": "object",
            "properties": {"answer": {"type": "string", "nullable": True}},
        },
    }
    assert text([chunk], 0) == text([chunk], 1) == "echo: hello big world"
    assert events([chunk], Finish) == [Finish(0, "stop"), Finish(1, "stop")]

    json_mode = request(extra={"response_format": {"type": "json_object"}}, tool_choice="none")
    await collect(make_provider(session, fake.base_url).chat(json_mode, "gemini-2.0-flash"))
    assert last_body(fake)["generationConfig"] == {"responseMimeType": "application/json"}
    assert "toolConfig" not in last_body(fake), "no tool config without tools"


async def test_top_k_reaches_gemini_as_top_k(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    # The Anthropic front door passes top_k on "for upstreams that take them" (docs/api.md),
    # and Gemini takes it: dropped, it would silently sample from the whole vocabulary.
    await collect(
        make_provider(session, fake.base_url).chat(request(extra={"top_k": 5}), "gemini-2.0-flash")
    )
    assert last_body(fake)["generationConfig"] == {"topK": 5}


async def test_two_candidates_stream(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    chunks = await collect(
        make_provider(session, fake.base_url).chat(request(stream=True, n=2), "m")
    )
    assert text(chunks, 0) == text(chunks, 1) == "echo: hello big world"
    assert sorted(f.choice for f in events(chunks, Finish)) == [0, 1]
    assert chunks[-1].final


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_effort_brings_thoughts_back_as_reasoning(
    fake: FakeGemini, session: aiohttp.ClientSession, stream: bool
) -> None:
    # Gemini sends thought summaries only when asked to (includeThoughts): without it the
    # reasoning_content docs/api.md promises never came.
    neutral = request(stream=stream, extra={"reasoning_effort": "high"})
    chunks = await collect(make_provider(session, fake.base_url).chat(neutral, "thinking"))
    assert last_body(fake)["generationConfig"] == {
        "thinkingConfig": {"thinkingBudget": 24576, "includeThoughts": True}
    }
    assert events(chunks, ReasoningDelta) == [ReasoningDelta(0, "Let me think.")]
    assert text(chunks) == "echo: hello big world"
    # completion = candidates (4) + thoughts (7); prompt includes the cached tokens.
    assert events(chunks, UsageReport) == [
        UsageReport(
            Usage(
                prompt_tokens=3,
                completion_tokens=11,
                total_tokens=14,
                cached_tokens=2,
                reasoning_tokens=7,
            )
        )
    ]


async def test_without_reasoning_effort_no_thinking_config_is_sent(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    # The model thinks as it would by default; its thoughts are counted, not shown.
    chunks = await collect(make_provider(session, fake.base_url).chat(request(), "thinking"))
    assert "generationConfig" not in last_body(fake)
    assert events(chunks, ReasoningDelta) == []
    assert events(chunks, UsageReport)[-1].usage.reasoning_tokens == 7


THOUGHTS = {"includeThoughts": True}


@pytest.mark.parametrize(
    ("model", "effort", "expected"),
    [
        # Gemini 2.5: budgets as Google's OpenAI compatibility layer maps them.
        ("gemini-2.5-flash", "minimal", {"thinkingBudget": 1024, **THOUGHTS}),
        ("gemini-2.5-flash", "low", {"thinkingBudget": 1024, **THOUGHTS}),
        ("gemini-2.5-flash", "medium", {"thinkingBudget": 8192, **THOUGHTS}),
        ("gemini-2.5-flash", "high", {"thinkingBudget": 24576, **THOUGHTS}),
        ("gemini-2.5-flash", "xhigh", {"thinkingBudget": 24576, **THOUGHTS}),
        ("gemini-2.5-flash-lite", "none", {"thinkingBudget": 0}),
        # 2.5 Pro cannot stop thinking (budget 0 is a 400): its least budget.
        ("gemini-2.5-pro", "none", {"thinkingBudget": 128}),
        ("models/gemini-2.5-pro", "low", {"thinkingBudget": 1024, **THOUGHTS}),
        # Gemini 3: levels (only Gemini 3 takes them).
        ("gemini-3-flash-preview", "none", {"thinkingLevel": "minimal"}),
        ("gemini-3-flash-preview", "minimal", {"thinkingLevel": "minimal", **THOUGHTS}),
        ("gemini-3-flash-preview", "medium", {"thinkingLevel": "medium", **THOUGHTS}),
        ("gemini-3-pro-preview", "none", {"thinkingLevel": "low"}),
        ("gemini-3-pro-preview", "minimal", {"thinkingLevel": "low", **THOUGHTS}),
        ("gemini-3.1-pro-preview", "xhigh", {"thinkingLevel": "high", **THOUGHTS}),
        # No version in the name: a budget, which every thinking Gemini takes.
        ("gemini-flash-latest", "high", {"thinkingBudget": 24576, **THOUGHTS}),
        ("gemini-pro-latest", "none", {"thinkingBudget": 128}),
        # Before 2.5 Gemini does not think: "none" needs nothing, the others are asked.
        ("gemini-2.0-flash", "none", None),
        ("gemini-2.0-flash", "low", {"thinkingBudget": 1024, **THOUGHTS}),
        ("gemini-2.5-flash", None, None),
    ],
)
async def test_reasoning_effort_becomes_a_thinking_config(
    fake: FakeGemini,
    session: aiohttp.ClientSession,
    model: str,
    effort: str | None,
    expected: dict[str, Any] | None,
) -> None:
    neutral = request(extra={"reasoning_effort": effort} if effort else {})
    # The fake refuses (400) the thinking configs Gemini refuses.
    await collect(make_provider(session, fake.base_url).chat(neutral, model))
    assert last_body(fake).get("generationConfig", {}).get("thinkingConfig") == expected


SNAKE = {"thinking_budget": 2048, "include_thoughts": True}


@pytest.mark.parametrize(
    "extra",
    [
        {"thinking_config": SNAKE},
        {"thinkingConfig": {"thinkingBudget": 2048, "includeThoughts": True}},
        # The form Google's OpenAI compatibility layer documents (the SDK's extra_body).
        {"extra_body": {"google": {"thinking_config": SNAKE}}},
    ],
)
async def test_a_gemini_thinking_config_from_the_client_wins(
    fake: FakeGemini, session: aiohttp.ClientSession, extra: dict[str, Any]
) -> None:
    neutral = request(extra={**extra, "reasoning_effort": "none"})
    chunks = await collect(make_provider(session, fake.base_url).chat(neutral, "thinking"))
    thinking = {"thinkingBudget": 2048, "includeThoughts": True}
    assert last_body(fake)["generationConfig"] == {"thinkingConfig": thinking}
    assert events(chunks, ReasoningDelta) == [ReasoningDelta(0, "Let me think.")]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"reasoning_effort": "max"}, "reasoning_effort"),
        ({"reasoning_effort": 3}, "reasoning_effort"),
        ({"thinking_config": "high"}, "thinking_config"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 5}, "logprobs"),
        ({"top_logprobs": 5}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ],
)
async def test_what_gemini_cannot_honour_is_refused_before_sending(
    fake: FakeGemini, session: aiohttp.ClientSession, extra: dict[str, Any], param: str
) -> None:
    # Dropped, these came back as "logprobs": null, an unbiased sample, a guessed effort.
    sent = len(fake.received)
    with pytest.raises(InvalidRequest) as caught:
        await collect(make_provider(session, fake.base_url).chat(request(extra=extra), "m"))
    assert caught.value.param == param and param in caught.value.message
    assert len(fake.received) == sent


async def test_parallel_tool_calls_false_is_not_refused(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    # Gemini has no switch for parallel calls; agents send the field with every request.
    neutral = request(tools=(WEATHER,), extra={"parallel_tool_calls": False})
    chunks = await collect(make_provider(session, fake.base_url).chat(neutral, "tool-call"))
    assert [c.name for c in events(chunks, ToolCallDelta)] == ["get_weather"]
    assert set(last_body(fake)) == {"contents", "tools"}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("gemini-2.0-flash", "stop"),
        ("finish-MAX_TOKENS", "length"),
        ("finish-RECITATION", "content_filter"),
        ("finish-SPII", "content_filter"),
        ("finish-MALFORMED_FUNCTION_CALL", "stop"),
        ("finish-OTHER", "stop"),
        ("safety-mid", "content_filter"),
    ],
)
async def test_finish_reasons(
    fake: FakeGemini, session: aiohttp.ClientSession, model: str, reason: str, stream: bool
) -> None:
    chunks = await collect(
        make_provider(session, fake.base_url).chat(request(stream=stream), model)
    )
    assert text(chunks) == "echo: hello big world"
    assert events(chunks, Finish) == [Finish(0, reason)]
    assert chunks[-1].final


def test_finish_reason_table() -> None:
    assert finish_reason("STOP", called=True) == "tool_calls"
    assert finish_reason("MAX_TOKENS", called=True) == "length"
    for reason in ("SAFETY", "BLOCKLIST", "PROHIBITED_CONTENT", "IMAGE_SAFETY"):
        assert finish_reason(reason, called=False) == "content_filter"
    assert finish_reason("SOMETHING_NEW", called=False) == "stop"


def test_usage_mapping() -> None:
    assert usage_from(
        {
            "promptTokenCount": 10,
            "toolUsePromptTokenCount": 2,
            "candidatesTokenCount": 5,
            "thoughtsTokenCount": 3,
            "cachedContentTokenCount": 4,
            "totalTokenCount": 20,
        }
    ) == Usage(12, 8, 20, 4, 3)
    assert usage_from({"promptTokenCount": 4}) == Usage(prompt_tokens=4)
    assert usage_from({"promptTokenCount": 4, "candidatesTokenCount": 1}) == Usage(4, 1, 5)
    assert usage_from("nonsense") == Usage()


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "status", "error_type", "retryable", "upstream_type"),
    [
        ("fail-400", 400, "bad_request", False, "INVALID_ARGUMENT"),
        ("fail-context", 400, "context_length", False, "INVALID_ARGUMENT"),
        ("fail-401", 401, "authentication", False, "UNAUTHENTICATED"),
        ("fail-403", 403, "permission", False, "PERMISSION_DENIED"),
        ("fail-404", 404, "not_found", False, "NOT_FOUND"),
        ("fail-429", 429, "rate_limit", True, "RESOURCE_EXHAUSTED"),
        ("fail-429-header", 429, "rate_limit", True, "RESOURCE_EXHAUSTED"),
        ("fail-500", 500, "server_error", True, "INTERNAL"),
        ("fail-503", 503, "overloaded", True, "UNAVAILABLE"),
        ("fail-504", 504, "server_error", True, "DEADLINE_EXCEEDED"),
    ],
)
async def test_http_errors_are_mapped(
    fake: FakeGemini,
    session: aiohttp.ClientSession,
    model: str,
    status: int,
    error_type: str,
    retryable: bool,
    upstream_type: str,
    stream: bool,
) -> None:
    with pytest.raises(UpstreamHTTPError) as caught:
        await collect(make_provider(session, fake.base_url).chat(request(stream=stream), model))
    error = caught.value
    assert (error.status_code, error.error_type, error.retryable) == (status, error_type, retryable)
    assert error.message and "HTTP" not in error.message, "the upstream's own message is kept"
    if status not in (401, 403):
        assert error.openai_type == (upstream_type if status < 500 else "api_error")
    expected_wait = {"fail-429": 12.0, "fail-429-header": 2.0}.get(model)
    assert error.retry_after == expected_wait
    if model == "fail-context":
        assert error.code == "context_length_exceeded" and "token count" in error.message


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "reason"),
    [("blocked-prompt", "blockReason SAFETY"), ("safety-first", "finishReason SAFETY")],
)
async def test_safety_blocks_before_any_output_are_final_errors(
    fake: FakeGemini, session: aiohttp.ClientSession, model: str, reason: str, stream: bool
) -> None:
    with pytest.raises(UpstreamHTTPError) as caught:
        await collect(make_provider(session, fake.base_url).chat(request(stream=stream), model))
    error = caught.value
    assert (error.status_code, error.error_type, error.retryable) == (400, "content_filter", False)
    assert reason in error.message and error.code == "content_filter"


async def test_stream_stall_before_first_byte_times_out(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, first_byte=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(stream=True), "stall-first-byte"))
    assert 0.25 < time.monotonic() - started < 2.0
    assert caught.value.phase == "first_byte" and caught.value.retryable


async def test_non_streaming_stall_is_bounded_by_total(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, first_byte=0.1, total=0.4)
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(), "stall-first-byte"))
    assert caught.value.phase == "total" and not caught.value.retryable


async def test_stall_mid_stream_is_an_idle_timeout(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url, idle=0.3)
    got: list[Chunk] = []
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(provider.chat(request(stream=True), "stall-mid"), got)
    assert time.monotonic() - started < 2.0
    assert caught.value.phase == "idle" and not caught.value.retryable
    assert len(events(got, TextDelta)) == 2


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
    fake: FakeGemini, session: aiohttp.ClientSession, model: str, error: type[Exception]
) -> None:
    got: list[Chunk] = []
    with pytest.raises(error) as caught:
        await collect(make_provider(session, fake.base_url).chat(request(stream=True), model), got)
    assert got and text(got).startswith("echo:")
    assert not any(c.final for c in got) and not events(got, Finish)
    assert not getattr(caught.value, "retryable", True)
    if model == "error-mid":
        # UNAVAILABLE mid-stream stays overloaded (an Anthropic client is told so).
        assert "overloaded" in str(caught.value)
        assert getattr(caught.value, "error_type", None) == "overloaded"
    elif model != "malformed":
        assert getattr(caught.value, "error_type", None) == "interrupted"


@pytest.mark.parametrize(
    ("model", "error"), [("malformed", UpstreamProtocolError), ("reset-mid", UpstreamConnectError)]
)
async def test_broken_whole_bodies(
    fake: FakeGemini, session: aiohttp.ClientSession, model: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await collect(make_provider(session, fake.base_url).chat(request(), model))


async def test_connection_refused_is_retryable(session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamConnectError) as caught:
        await collect(
            make_provider(session, closed_port_url("/v1beta")).chat(request(stream=True), "m")
        )
    assert caught.value.retryable


async def test_the_api_key_never_appears_in_errors(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    def leaks(error: BaseException) -> bool:
        shown = [str(error), repr(error), "".join(traceback.format_exception(error))]
        if isinstance(error, UpstreamError):
            shown.append(orjson.dumps(error.to_openai()).decode())
        return any(CANARY in s for s in shown)

    failures: list[BaseException] = []
    # The fake echoes a wrong key in its 400 API_KEY_INVALID, as Google's message could.
    denied = make_provider(session, fake.base_url, key=CANARY)
    for stream in (False, True):
        with pytest.raises(UpstreamHTTPError) as caught:
            await collect(denied.chat(request(stream=stream), "gemini-2.0-flash"))
        error = caught.value
        assert (error.status_code, error.error_type) == (401, "authentication")
        assert "[redacted]" in error.message and error.status == 502
        failures.append(error)
    failures.append(await error_of(denied.embeddings({"input": "x"}, "text-embedding-004")))
    failures.append(await error_of(denied.list_models()))
    with FakeGemini() as open_fake:
        provider = make_provider(session, open_fake.base_url, key=CANARY, first_byte=0.3, idle=0.3)
        for model in (
            "fail-400",
            "fail-429",
            "blocked-prompt",
            "stall-first-byte",
            "stall-mid",
            "reset-mid",
            "malformed",
            "eof-mid",
            "error-mid",
        ):
            failures.append(await error_of(collect(provider.chat(request(stream=True), model))))
        assert not [r for r in open_fake.received if CANARY in r[0]], "the key is never in a URL"
    refused = make_provider(session, closed_port_url("/v1beta"), key=CANARY)
    failures.append(await error_of(collect(refused.chat(request(), "m"))))
    assert len(failures) == 14 and all(isinstance(f, UpstreamError) for f in failures)
    assert not [f for f in failures if leaks(f)]


# -- embeddings, models, token counts ------------------------------------------------------


async def test_embeddings_batch_and_base64(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    from openai.types import CreateEmbeddingResponse

    provider = make_provider(session, fake.base_url)
    body = {"model": "gem/emb", "input": ["hello world", "goodbye"], "dimensions": 4}
    result = await provider.embeddings(body, "text-embedding-004")
    path, _, sent = fake.received[-1]
    assert path == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert sent == {
        "requests": [
            {
                "model": "models/text-embedding-004",
                "content": {"parts": [{"text": t}]},
                "outputDimensionality": 4,
            }
            for t in ("hello world", "goodbye")
        ]
    }
    assert (result.count, result.protocol, result.model) == (2, "openai", "text-embedding-004")
    assert result.usage == Usage()
    parsed = CreateEmbeddingResponse.model_validate_json(result.raw)
    assert [len(d.embedding) for d in parsed.data] == [4, 4] and parsed.usage.total_tokens == 0
    floats = parsed.data[0].embedding

    packed = await provider.embeddings({**body, "encoding_format": "base64"}, "text-embedding-004")
    first = orjson.loads(packed.raw)["data"][0]["embedding"]
    assert struct.unpack("<4f", base64.b64decode(first)) == pytest.approx(floats)


async def test_embeddings_single_string_and_errors(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, fake.base_url)
    result = await provider.embeddings({"input": "hi"}, "text-embedding-004")
    assert fake.received[-1][0] == "/v1beta/models/text-embedding-004:embedContent"
    assert last_body(fake) == {"content": {"parts": [{"text": "hi"}]}}
    assert result.count == 1 and len(orjson.loads(result.raw)["data"][0]["embedding"]) == 8
    with pytest.raises(InvalidRequest):
        await provider.embeddings({"input": [[1, 2, 3]]}, "text-embedding-004")
    with pytest.raises(UpstreamHTTPError) as caught:
        await provider.embeddings({"input": "hi"}, "fail-429")
    assert caught.value.retry_after == 12.0


async def test_list_models_follows_pages(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    names = await make_provider(session, fake.base_url).list_models()
    assert names == [
        "gemini-2.0-flash",
        "gemini-2.5-pro",
        "gemini-3-pro-preview",
        "text-embedding-004",
        "gemini-embedding-001",
    ]
    pages = [r[0] for r in fake.received[-3:]]
    assert pages[0] == "/v1beta/models?pageSize=1000"
    assert pages[1:] == [
        "/v1beta/models?pageSize=1000&pageToken=page-2",
        "/v1beta/models?pageSize=1000&pageToken=page-4",
    ]


async def test_count_tokens(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    history = (Message("system", "be brief"), Message("user", "one two three"))
    provider = make_provider(session, fake.base_url)
    total = await provider.count_tokens(
        request(messages=history, tools=(WEATHER,)), "gemini-2.0-flash"
    )
    # The fake counts words, plus 10 per declared function.
    assert total == 5 + 10
    path, _, body = fake.received[-1]
    assert path == "/v1beta/models/gemini-2.0-flash:countTokens"
    assert set(body) == {"generateContentRequest"}
    assert body["generateContentRequest"]["model"] == "models/gemini-2.0-flash"
    assert set(body["generateContentRequest"]) == {
        "model",
        "contents",
        "systemInstruction",
        "tools",
    }


# -- seams and pure translation ------------------------------------------------------------


async def test_a_gemini_client_body_passes_through(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    raw = {
        "contents": [{"role": "user", "parts": [{"text": "hi there"}]}],
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
    }
    neutral = request("ignored", raw=raw, client_protocol="gemini")
    [chunk] = await collect(make_provider(session, fake.base_url).chat(neutral, "gemini-2.0-flash"))
    assert last_body(fake) == raw and text([chunk]) == "echo: hi there"


def test_clean_schema() -> None:
    schema = {
        "$schema": "x",
        "$defs": {
            "Pet": {"type": "object", "properties": {"name": {"type": "string", "const": "rex"}}},
            "Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}},
        },
        "type": "object",
        "properties": {
            "pet": {"$ref": "#/$defs/Pet", "description": "the pet"},
            "maybe": {"anyOf": [{"type": "integer", "exclusiveMinimum": 0}, {"type": "null"}]},
            "either": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            "tags": {"type": "array", "items": {"type": "string", "additionalProperties": False}},
            "node": {"$ref": "#/$defs/Node"},
            "properties": {"type": "string"},
        },
        "additionalProperties": False,
        "strict": True,
    }
    assert clean_schema(schema) == {
        "type": "object",
        "properties": {
            "pet": {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": ["rex"]}},
                "description": "the pet",
            },
            "maybe": {"nullable": True, "type": "integer"},
            "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "node": {"type": "object", "properties": {"next": {"type": "object"}}},
            "properties": {"type": "string"},
        },
    }
    assert clean_schema(None) == {}


def test_provider_satisfies_the_seam() -> None:
    from parley.providers.base import Provider

    provider: Provider = GeminiProvider(
        ProviderConfig(name="g", kind="gemini", base_url=""),
        SimpleNamespace(),  # type: ignore[arg-type]
    )
    assert provider.protocol == "gemini"


def test_reader_edge_cases() -> None:
    from parley.providers.gemini_wire import ResponseReader

    reader = ResponseReader("m", scrub=lambda s: s.replace("AIza-x", "***"))
    whole = {"candidates": [{"content": {"parts": [{"text": "hi"}]}}], "responseId": "r"}
    got = list(reader.read(whole, yielded=False)) + list(reader.closing())
    assert got[1:] == [TextDelta(0, "hi"), Finish(0, "stop")], "a whole body is complete"

    error = {"error": {"message": "bad key AIza-x", "status": "INVALID_ARGUMENT"}}
    with pytest.raises(UpstreamHTTPError) as caught:
        ResponseReader("m", str).read(error, yielded=False)
    assert (caught.value.status_code, caught.value.openai_type) == (400, "INVALID_ARGUMENT")
    with pytest.raises(UpstreamInterrupted, match=r"bad key \*\*\*"):
        reader.read(error, yielded=True)
    for bad in (
        b'{"candidates": [{"index": "0"}]}',
        b'{"candidates": [{"content": {"parts": [{"text": 1}]}}]}',
        b"[1]",
        b"{",
    ):
        with pytest.raises(UpstreamProtocolError):
            ResponseReader("m", str).frame(bad, yielded=True)


def test_error_bodies() -> None:
    from parley.providers.gemini_wire import http_error

    proxy = http_error(502, b"<html>Bad Gateway</html>", {}, str)
    assert (proxy.status_code, proxy.message, proxy.retryable) == (
        502,
        "<html>Bad Gateway</html>",
        True,
    )
    key = orjson.dumps(
        {
            "error": {
                "code": 400,
                "message": "API key not valid.",
                "status": "INVALID_ARGUMENT",
                "details": [{"reason": "API_KEY_INVALID"}],
            }
        }
    )
    assert http_error(400, key, {}, str).error_type == "authentication"
    quota = orjson.dumps(
        {
            "error": {
                "code": 429,
                "status": "RESOURCE_EXHAUSTED",
                "details": [{"retryDelay": "0.5s"}],
            }
        }
    )
    assert http_error(429, quota, {}, str).retry_after == 0.5
    assert http_error(429, quota, {"Retry-After": "3"}, str).retry_after == 3.0
    output = b'{"error": {"code": 400, "message": "maxOutputTokens exceeds the limit of 8192."}}'
    assert http_error(400, output, {}, str).error_type == "bad_request"


async def test_a_missing_key_is_a_permission_error(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    config = ProviderConfig(name="gem", kind="gemini", base_url=fake.base_url)
    with pytest.raises(UpstreamHTTPError) as caught:
        await collect(GeminiProvider(config, session).chat(request(), "gemini-2.0-flash"))
    assert (caught.value.status_code, caught.value.error_type) == (403, "permission")
    assert "x-goog-api-key" not in fake.received[-1][1]
