"""/v1/messages end to end: the official anthropic SDK -> parley -> fake upstreams.

Most server tests run a real parley server on loopback in front of the real fake OpenAI
upstream, so the whole translation is exercised: Anthropic request -> neutral request ->
OpenAI upstream body, and OpenAI answer -> neutral events -> Anthropic message or SSE. A
few put the fake Anthropic upstream behind it (bytes passed through, count_tokens). The
store is read back on SQLite and PostgreSQL. The last tests drive the Anthropic encoder
directly over event sequences that the fakes cannot produce.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pydantic
import pytest
import sqlalchemy as sa
from anthropic.types import Message, RawMessageStreamEvent

from parley.domain.events import (
    Chunk,
    Finish,
    ReasoningDelta,
    ResponseStart,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from parley.domain.usage import Usage
from parley.server.anthropic_encode import AnthropicEncoder, stop_reason
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import REFUSAL, FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, write_config

MASTER = "parley-master-test-key"
WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _config(tmp_path: Path, upstream: FakeOpenAI) -> None:
    write_config(
        tmp_path,
        [
            {
                "name": "up",
                "kind": "openai",
                "base_url": upstream.base_url,
                "models": ["gpt-4o-mini"],
                "timeouts": {"connect": 2.0, "first_byte": 0.5, "idle": 0.5, "total": 5.0},
            }
        ],
        # Retry-After (1 s) is longer than parley will wait: a 429 comes back at once.
        extra="[retry]\nattempts = 2\nbackoff_base = 0.01\nmax_retry_after = 0.5\n",
    )


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[ParleyServer]:
    _config(tmp_path, upstream)
    with ParleyServer(settings_for(tmp_path, database_url)) as running:
        yield running


@contextmanager
def connect(server: ParleyServer, api_key: str = "unused") -> Iterator[anthropic.Anthropic]:
    # The SDK appends /v1/messages to the base URL: parley's root, not its /v1.
    with anthropic.Anthropic(base_url=server.root, api_key=api_key, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def sdk(server: ParleyServer) -> Iterator[anthropic.Anthropic]:
    with connect(server) as client:
        yield client


def sent(upstream: FakeOpenAI) -> dict[str, Any]:
    """The body of the last request the upstream received."""
    body: dict[str, Any] = upstream.received[-1][2]
    return body


# -- answers ---------------------------------------------------------------------------


def test_non_streaming_answer_is_recorded(
    server: ParleyServer, database_url: str, upstream: FakeOpenAI, sdk: anthropic.Anthropic
) -> None:
    reply = sdk.messages.create(
        model="up/gpt-4o-mini",
        max_tokens=50,
        system="be brief",
        messages=[{"role": "user", "content": "hi"}],
        # This SDK no longer types the sampling knobs; the API still takes them.
        extra_body={"temperature": 0.5},
    )
    assert reply.id.startswith("msg_") and reply.model == "gpt-4o-mini"
    assert [(b.type, getattr(b, "text", None)) for b in reply.content] == [("text", "echo: hi")]
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    # The fake counts words: "be brief" + "hi" in, "echo: hi" out.
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (3, 2)
    assert reply.usage.cache_read_input_tokens == 0

    body = sent(upstream)
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("gpt-4o-mini", 50, 0.5)
    assert "system" not in body and "stream" not in body

    [req] = rows(database_url, "SELECT * FROM request_log")
    assert (req["endpoint"], req["client_protocol"]) == ("messages", "anthropic")
    assert req["success"] and req["status_code"] == 200 and req["finish_reason"] == "stop"
    assert (req["prompt_tokens"], req["completion_tokens"], req["total_tokens"]) == (3, 2, 5)
    assert (req["model"], req["model_requested"]) == ("gpt-4o-mini", "up/gpt-4o-mini")
    assert req["max_tokens"] == 50 and req["temperature"] == 0.5 and req["message_count"] == 2


@pytest.mark.parametrize("stream", [False, True])
def test_an_openai_refusal_is_an_anthropic_refusal(
    server: ParleyServer, sdk: anthropic.Anthropic, stream: bool
) -> None:
    ask: Any = {
        "model": "up/refuse",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "x"}],
    }
    if stream:
        with sdk.messages.stream(**ask) as events:
            text = "".join(events.text_stream)
            reply = events.get_final_message()
        assert text == REFUSAL
    else:
        reply = sdk.messages.create(**ask)
    assert [(b.type, getattr(b, "text", None)) for b in reply.content] == [("text", REFUSAL)]
    assert reply.stop_reason == "refusal"


def test_stream_helper_gives_text_usage_and_timings(
    server: ParleyServer, database_url: str, upstream: FakeOpenAI, sdk: anthropic.Anthropic
) -> None:
    with sdk.messages.stream(
        model="up/gpt-4o-mini",
        max_tokens=100,
        messages=[{"role": "user", "content": "tell me a story"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: tell me a story"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (4, 5)
    # parley asked the OpenAI upstream for usage: message_delta needs it.
    assert sent(upstream)["stream_options"] == {"include_usage": True}

    [req] = rows(database_url, "SELECT * FROM request_log")
    assert req["success"] and req["completion_tokens"] == 5
    assert req["endpoint"] == "messages" and req["client_protocol"] == "anthropic"
    assert req["is_streaming"] is True or req["is_streaming"] == 1
    assert 0 < req["time_to_first_token_ms"] <= req["time_to_last_token_ms"]


def test_raw_stream_events_in_order(server: ParleyServer, sdk: anthropic.Anthropic) -> None:
    events = list(
        sdk.messages.create(
            model="up/gpt-4o-mini",
            max_tokens=100,
            messages=[{"role": "user", "content": "a b c"}],
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and start.message.content == []
    assert delta.type == "message_delta" and delta.delta.stop_reason == "end_turn"
    assert (delta.usage.input_tokens, delta.usage.output_tokens) == (3, 4)


def test_multi_turn_history_reaches_the_upstream(
    server: ParleyServer, upstream: FakeOpenAI, sdk: anthropic.Anthropic
) -> None:
    history: list[Any] = [{"role": "user", "content": "hello there"}]
    first = sdk.messages.create(model="up/gpt-4o-mini", max_tokens=50, messages=history)
    history += [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "text", "text": "and again"}]},
    ]
    second = sdk.messages.create(model="up/gpt-4o-mini", max_tokens=50, messages=history)
    assert second.content[0].type == "text" and second.content[0].text == "echo: and again"
    assert sent(upstream)["messages"] == [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "echo: hello there"},
        {"role": "user", "content": "and again"},
    ]


def test_a_conversation_is_threaded_like_chat_completions(
    server: ParleyServer, database_url: str, sdk: anthropic.Anthropic
) -> None:
    history: list[Any] = [{"role": "user", "content": "hello there"}]
    first = sdk.messages.create(model="up/gpt-4o-mini", max_tokens=50, messages=history)
    history += [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": "and again"},
    ]
    sdk.messages.create(model="up/gpt-4o-mini", max_tokens=50, messages=history)
    assert len(rows(database_url, "SELECT id FROM conversations")) == 1
    stored = rows(database_url, "SELECT role, content FROM messages ORDER BY id")
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "hello there"),
        ("assistant", "echo: hello there"),
        ("user", "and again"),
        ("assistant", "echo: and again"),
    ]


def test_images_become_openai_image_parts(
    server: ParleyServer, upstream: FakeOpenAI, sdk: anthropic.Anthropic
) -> None:
    sdk.messages.create(
        model="up/gpt-4o-mini",
        max_tokens=50,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what are these?"},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": "iVBORw0KGgo=",
                        },
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
                ],
            }
        ],
    )
    assert sent(upstream)["messages"][0]["content"] == [
        {"type": "text", "text": "what are these?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
    ]


def test_tool_use_round_trip(
    server: ParleyServer, upstream: FakeOpenAI, sdk: anthropic.Anthropic
) -> None:
    history: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    first = sdk.messages.create(
        model="up/tool-call",
        max_tokens=50,
        messages=history,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "auto"},
    )
    body = sent(upstream)
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": WEATHER_TOOL["input_schema"],
            },
        }
    ]
    assert body["tool_choice"] == "auto"
    assert first.stop_reason == "tool_use"
    [call] = first.content
    assert call.type == "tool_use"
    assert (call.id, call.name, call.input) == ("call_fake_1", "get_weather", {"city": "Paris"})

    history += [
        {"role": "assistant", "content": first.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
        },
    ]
    second = sdk.messages.create(
        model="up/tool-call", max_tokens=50, messages=history, tools=[WEATHER_TOOL]
    )
    assert second.content[0].type == "text" and second.content[0].text == "tool said: sunny"
    assert second.stop_reason == "end_turn"
    assert sent(upstream)["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_fake_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_fake_1"},
    ]


def test_streamed_tool_use(
    server: ParleyServer, upstream: FakeOpenAI, sdk: anthropic.Anthropic
) -> None:
    with sdk.messages.stream(
        model="up/tool-call",
        max_tokens=50,
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    ) as stream:
        final = stream.get_final_message()
    body = sent(upstream)
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert final.stop_reason == "tool_use"
    [call] = final.content
    assert call.type == "tool_use" and call.input == {"city": "Paris"}


def test_anthropic_only_fields_are_translated_or_kept_out(
    server: ParleyServer, upstream: FakeOpenAI, sdk: anthropic.Anthropic
) -> None:
    sdk.messages.create(
        model="up/gpt-4o-mini",
        max_tokens=50,
        system=[{"type": "text", "text": "rule one"}, {"type": "text", "text": "rule two"}],
        stop_sequences=["END"],
        extra_body={"top_p": 0.9, "top_k": 5},
        metadata={"user_id": "alice"},
        messages=[
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "a"},
                ],
            },
            {"role": "user", "content": "q2"},
        ],
    )
    body = sent(upstream)
    assert body["messages"] == [
        {"role": "system", "content": "rule one\nrule two"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
    ]
    assert (body["stop"], body["top_p"], body["top_k"], body["user"]) == (["END"], 0.9, 5, "alice")
    assert "metadata" not in body and "stop_sequences" not in body


@pytest.mark.parametrize("field", ["output_config", "output_format"])
def test_structured_output_reaches_an_openai_upstream_as_response_format(
    server: ParleyServer, upstream: FakeOpenAI, sdk: anthropic.Anthropic, field: str
) -> None:
    """Anthropic's structured output (``output_config.format``, or the beta's
    ``output_format``) asks an OpenAI upstream for the same schema."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    spec = {"type": "json_schema", "schema": schema}
    sdk.messages.create(
        model="up/gpt-4o-mini",
        max_tokens=50,
        messages=[{"role": "user", "content": "q"}],
        extra_body={field: {"format": spec} if field == "output_config" else spec},
    )
    assert sent(upstream)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    assert "output_config" not in sent(upstream)


# -- errors ----------------------------------------------------------------------------


def test_missing_max_tokens_is_a_400_in_anthropic_shape(
    server: ParleyServer, database_url: str, sdk: anthropic.Anthropic
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(
            model="up/gpt-4o-mini",
            max_tokens=10,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"max_tokens": None},
        )
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: field required"},
    }
    assert rows(database_url, "SELECT id FROM request_log") == []


def test_unknown_model_is_not_found(server: ParleyServer, sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk.messages.create(
            model="nonexistent", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "not_found_error"


def test_upstream_429_is_a_rate_limit_error_with_retry_after(
    server: ParleyServer, database_url: str, sdk: anthropic.Anthropic
) -> None:
    with pytest.raises(anthropic.RateLimitError) as caught:
        sdk.messages.create(
            model="up/fail-429", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.response.headers["retry-after"] == "1"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    [req] = rows(database_url, "SELECT * FROM request_log")
    assert req["error_type"] == "rate_limit" and req["client_protocol"] == "anthropic"


@pytest.mark.parametrize(
    ("model", "error_class", "error_type"),
    [
        ("up/fail-500", anthropic.InternalServerError, "api_error"),
        ("up/fail-503", anthropic.InternalServerError, "overloaded_error"),
        ("up/fail-400", anthropic.BadRequestError, "invalid_request_error"),
    ],
)
def test_upstream_failures_map_to_sdk_errors(
    server: ParleyServer,
    model: str,
    error_class: type[Exception],
    error_type: str,
    sdk: anthropic.Anthropic,
) -> None:
    with pytest.raises(error_class) as caught:
        sdk.messages.create(model=model, max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert isinstance(caught.value, anthropic.APIStatusError)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == error_type


@pytest.mark.parametrize(
    ("model", "error_type"), [("error-mid", "interrupted"), ("reset-mid", "interrupted")]
)
def test_a_broken_stream_is_an_sdk_error_not_a_clean_end(
    server: ParleyServer, database_url: str, model: str, error_type: str, sdk: anthropic.Anthropic
) -> None:
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        for event in sdk.messages.create(
            model=f"up/{model}",
            max_tokens=50,
            messages=[{"role": "user", "content": "a b c d"}],
            stream=True,
        ):
            seen.append(event.type)
    assert seen[:2] == ["message_start", "content_block_start"]
    assert "message_stop" not in seen
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "api_error"
    [req] = rows(database_url, "SELECT * FROM request_log")
    assert not req["success"] and req["error_type"] == error_type
    assert req["finish_reason"] == "error"


def test_an_answer_that_cannot_be_encoded_is_recorded_as_the_error_the_client_got(
    server: ParleyServer, database_url: str, sdk: anthropic.Anthropic
) -> None:
    # The upstream's tool-call arguments are cut short: an Anthropic tool_use block needs
    # a JSON object, so parley cannot give this answer to the client.
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk.messages.create(
            model="up/tool-call-garbled", max_tokens=50, messages=USER_X, tools=[WEATHER_TOOL]
        )
    assert caught.value.status_code == 502
    [req] = rows(database_url, "SELECT * FROM request_log")
    # Not the upstream's success: the client got an error, and the row says which.
    assert not req["success"] and req["error_type"] == "protocol"
    assert "not a JSON object" in req["error_message"]
    assert req["finish_reason"] == "error"
    # What the upstream did send and bill is kept.
    assert req["status_code"] == 200 and req["completion_tokens"] == 5


def test_a_stream_whose_tool_arguments_are_not_an_object_ends_in_an_error(
    server: ParleyServer, database_url: str, sdk: anthropic.Anthropic
) -> None:
    # The deltas are out before the arguments are whole: the stream cannot end cleanly
    # with a tool_use whose input the SDK would make up from a fragment.
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        for event in sdk.messages.create(
            model="up/tool-call-garbled",
            max_tokens=50,
            messages=USER_X,
            tools=[WEATHER_TOOL],
            stream=True,
        ):
            seen.append(event.type)
    assert "content_block_start" in seen
    assert "message_delta" not in seen and "message_stop" not in seen
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "api_error"
    assert "not a JSON object" in caught.value.body["error"]["message"]
    [req] = rows(database_url, "SELECT * FROM request_log")
    assert not req["success"] and req["error_type"] == "protocol"
    assert req["finish_reason"] == "error"


USER_X = [{"role": "user", "content": "x"}]
TOOL_USE_BAD_INPUT = {"type": "tool_use", "id": "t", "name": "f", "input": "{}"}


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 2**31}, "max_tokens: must be an integer from 1 to 2147483647"),
    ({"messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "hologram"}]}]}, "hologram"),
    ({"messages": [{"role": "assistant", "content": [TOOL_USE_BAD_INPUT]}]}, "input"),
    ({"temperature": 1.5}, "temperature"),
    ({"tool_choice": {"type": "maybe"}}, "tool_choice"),
    ({"system": [{"type": "image"}]}, "system"),
    ({"stream": "yes"}, "stream"),
    # Anthropic refuses an empty turn; dropping it would change the conversation.
    ({"messages": [{"role": "user", "content": ""}]}, "non-empty content"),
    (
        {
            "messages": [
                *USER_X,
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": []},
            ]
        },
        "messages.2: all messages must have non-empty content",
    ),
    (
        {"messages": [*USER_X, {"role": "assistant", "content": []}, *USER_X]},
        "messages.1: all messages must have non-empty content",
    ),
    ({"output_config": "json"}, "output_config: must be an object"),
    ({"output_config": {"format": {"type": "xml"}}}, "output_config.format: must be"),
    ({"output_format": {"type": "json_schema"}}, "output_format.schema: must be an object"),
]


def test_bad_requests_get_anthropic_400s_and_store_nothing(
    server: ParleyServer, database_url: str
) -> None:
    # One server for every case: a server per case would cost more than the checks.
    for change, fragment in BAD_REQUESTS:
        body = {"model": "up/gpt-4o-mini", "max_tokens": 5, "messages": USER_X, **change}
        response = httpx.post(
            f"{server.root}/v1/messages",
            content=orjson.dumps({k: v for k, v in body.items() if v is not None}),
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 400, change
        error = response.json()
        assert error["type"] == "error", change
        assert error["error"]["type"] == "invalid_request_error", change
        assert fragment in error["error"]["message"], change
    assert rows(database_url, "SELECT id FROM request_log") == []


def test_http_level_errors_on_messages_paths_are_anthropic_shaped(server: ParleyServer) -> None:
    not_json = httpx.post(f"{server.root}/v1/messages", content=b"{not json", timeout=5)
    assert not_json.status_code == 400
    assert not_json.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(f"{server.root}/v1/messages/nothing", json={}, timeout=5)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    wrong_method = httpx.get(f"{server.root}/v1/messages", timeout=5)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["type"] == "error"
    # Elsewhere errors stay OpenAI-shaped.
    other = httpx.get(f"{server.base_url}/nothing", timeout=5)
    assert other.json()["error"]["message"].startswith("no such endpoint")


def test_master_key_via_x_api_key(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> None:
    _config(tmp_path, upstream)
    settings = settings_for(tmp_path, database_url, PARLEY_MASTER_KEY=MASTER)
    with ParleyServer(settings) as server:
        with (
            pytest.raises(anthropic.AuthenticationError) as caught,
            connect(server, "wrong") as bad,
        ):
            bad.messages.create(
                model="up/gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["error"]["type"] == "authentication_error"
        assert MASTER not in str(caught.value.body)
        with connect(server, MASTER) as good:
            ok = good.messages.create(
                model="up/gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        assert ok.content[0].type == "text" and ok.content[0].text == "echo: x"


# -- durability ------------------------------------------------------------------------


@contextmanager
def store_locked(database_url: str) -> Iterator[None]:
    """Hold the database so that parley's writer cannot commit until the block ends."""
    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("LOCK TABLE request_log IN EXCLUSIVE MODE")
            try:
                yield
            finally:
                conn.rollback()
    finally:
        engine.dispose()


def test_message_stop_is_sent_only_after_the_commit(
    server: ParleyServer, database_url: str
) -> None:
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        body = {
            "model": "up/slow-stream",
            "max_tokens": 50,
            "stream": True,
            "messages": [{"role": "user", "content": "one two three four five"}],
        }
        with httpx.stream("POST", f"{server.root}/v1/messages", json=body, timeout=30) as r:
            for line in r.iter_lines():
                lines.put(line)
        lines.put(None)

    def until(wanted: str, timeout: float) -> list[str]:
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            got.append(line)
            if line == wanted:
                break
        return got

    reader = threading.Thread(target=read, daemon=True)
    with store_locked(database_url):
        reader.start()
        before = until("event: content_block_delta", 10)
        assert before[-1] == "event: content_block_delta", "the stream is live"
        # The upstream answer is complete within 0.5 s; the commit cannot happen.
        held = until("event: message_stop", 1.5)
        assert "event: message_stop" not in held
    after = until("event: message_stop", 10)
    assert after[-1] == "event: message_stop"
    # Acknowledged means committed: the row is there the moment message_stop arrived.
    [req] = rows(database_url, "SELECT success, endpoint FROM request_log")
    assert req["success"] and req["endpoint"] == "messages"
    reader.join(5)


# -- an Anthropic upstream: passthrough and count_tokens -------------------------------


@pytest.fixture
def anthropic_fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key="sk-ant-test") as fake:
        yield fake


def write_both(
    tmp_path: Path,
    upstream: FakeOpenAI,
    anthropic_fake: FakeAnthropic,
    headers: dict[str, str] | None = None,
) -> None:
    """The OpenAI fake as ``up`` and the Anthropic fake as ``an`` (with ``headers``)."""
    anthropic: dict[str, Any] = {
        "name": "an",
        "kind": "anthropic",
        "base_url": anthropic_fake.base_url,
        "api_key": "sk-ant-test",
    }
    if headers:
        anthropic["headers"] = headers
    write_config(
        tmp_path,
        [{"name": "up", "kind": "openai", "base_url": upstream.base_url}, anthropic],
        # An OpenAI-style upstream first: it cannot count tokens, the second can.
        aliases={"either": ["up/gpt-4o-mini", "an/claude-fake-opus"]},
    )


@pytest.fixture
def both(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI, anthropic_fake: FakeAnthropic
) -> Iterator[ParleyServer]:
    """A server with the OpenAI fake as ``up`` and the Anthropic fake as ``an``."""
    write_both(tmp_path, upstream, anthropic_fake)
    with ParleyServer(settings_for(tmp_path, database_url)) as running:
        yield running


def test_an_anthropic_upstream_gets_the_body_as_sent_and_its_bytes_come_back(
    both: ParleyServer, database_url: str, anthropic_fake: FakeAnthropic
) -> None:
    history: list[Any] = [
        {"role": "user", "content": "first"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "earlier", "signature": "sig-1"},
                {"type": "text", "text": "echo: first"},
            ],
        },
        {"role": "user", "content": "second"},
    ]
    with (
        connect(both) as sdk,
        sdk.messages.stream(
            model="an/claude-fake-opus",
            max_tokens=200,
            thinking={"type": "enabled", "budget_tokens": 100},
            messages=history,
        ) as stream,
    ):
        final = stream.get_final_message()
    # The thinking block parley leaves out of its neutral form still reached Anthropic.
    assert anthropic_fake.received[-1][2]["messages"] == history
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].type == "thinking" and final.content[0].signature
    [req] = rows(database_url, "SELECT * FROM request_log")
    assert (req["provider"], req["endpoint"], req["client_protocol"]) == (
        "an",
        "messages",
        "anthropic",
    )
    assert req["success"] and req["reasoning_tokens"]


def test_count_tokens_asks_an_upstream_that_can_count(
    both: ParleyServer, database_url: str, upstream: FakeOpenAI, anthropic_fake: FakeAnthropic
) -> None:
    with connect(both) as sdk:
        counted = sdk.messages.count_tokens(
            model="an/claude-fake-opus",
            system="be brief",
            messages=[{"role": "user", "content": "how many words"}],
        )
        assert counted.input_tokens == 5  # the fake counts words
        assert anthropic_fake.received[-1][0] == "/v1/messages/count_tokens"
        through_alias = sdk.messages.count_tokens(
            model="either", messages=[{"role": "user", "content": "three more words"}]
        )
        assert through_alias.input_tokens == 3
        with pytest.raises(anthropic.BadRequestError) as caught:
            sdk.messages.count_tokens(
                model="up/gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
    assert isinstance(caught.value.body, dict)
    assert "cannot count tokens" in caught.value.body["error"]["message"]
    # Counting is not an exchange: nothing recorded, nothing sent to the OpenAI upstream.
    assert rows(database_url, "SELECT id FROM request_log") == []
    assert upstream.received == []


# -- the encoder over events the fake cannot produce ----------------------------------

EVENTS = pydantic.TypeAdapter(RawMessageStreamEvent)


def encode_stream(chunks: list[list[Any]]) -> list[Any]:
    encoder = AnthropicEncoder("requested")
    out = b"".join(
        encoder.frames(Chunk(events=tuple(events), final=i == len(chunks) - 1))
        for i, events in enumerate(chunks)
    )
    parsed = []
    for block in out.split(b"\n\n"):
        if block:
            kind, data = block.split(b"\n")
            event = EVENTS.validate_python(orjson.loads(data.removeprefix(b"data: ")))
            assert kind == b"event: " + event.type.encode()
            parsed.append(event)
    return parsed


@pytest.mark.parametrize(
    ("reason", "tools", "expected"),
    [
        ("stop", False, "end_turn"),
        ("length", False, "max_tokens"),
        ("tool_calls", True, "tool_use"),
        ("stop", True, "tool_use"),
        ("content_filter", False, "refusal"),
        ("stop_sequence", False, "stop_sequence"),
        (None, False, "end_turn"),
    ],
)
def test_stop_reasons(reason: str | None, tools: bool, expected: str) -> None:
    assert stop_reason(reason, tools) == expected


def test_whole_message_with_thinking_text_tools_and_cached_usage() -> None:
    usage = Usage(prompt_tokens=100, completion_tokens=7, total_tokens=107, cached_tokens=60)
    body = AnthropicEncoder("requested").body(
        Chunk(
            events=(
                ResponseStart("x", "gemini-pro", 0),
                ReasoningDelta(0, "think"),
                TextDelta(0, "Sure."),
                ToolCallDelta(0, 0, "c1", "f", '{"a": '),
                ToolCallDelta(0, 0, None, None, "1}"),
                TextDelta(1, "another choice is ignored"),
                Finish(0, "length"),
                UsageReport(usage),
            ),
            final=True,
        )
    )
    message = Message.model_validate(orjson.loads(body))
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[1].type == "text" and message.content[1].text == "Sure."
    assert message.content[2].type == "tool_use" and message.content[2].input == {"a": 1}
    assert message.model == "gemini-pro" and message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (40, 60)
    assert message.usage.output_tokens == 7


def test_stream_blocks_and_a_held_message_delta() -> None:
    usage = Usage(prompt_tokens=9, completion_tokens=3, total_tokens=12)
    events = encode_stream(
        [
            [ResponseStart("x", "m", 0), ReasoningDelta(0, "hm")],
            [TextDelta(0, "Hi")],
            [ToolCallDelta(0, 4, "c1", "f", ""), ToolCallDelta(0, 4, None, None, "{}")],
            [Finish(0, "tool_calls")],
            [],  # no usage yet: message_delta waits
            [UsageReport(usage)],
            [],
        ]
    )
    kinds = [(e.type, getattr(e, "index", None)) for e in events]
    assert kinds == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[1].content_block.type == "thinking"
    assert events[7].content_block.type == "tool_use" and events[7].content_block.id == "c1"
    delta = events[-2]
    assert delta.delta.stop_reason == "tool_use"
    assert (delta.usage.input_tokens, delta.usage.output_tokens) == (9, 3)


def test_message_delta_without_usage_comes_with_the_final_chunk() -> None:
    events = encode_stream([[TextDelta(0, "a")], [Finish(0, "stop")], []])
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]
    assert events[0].message.model == "requested"
    assert events[-2].usage.output_tokens == 0 and events[-2].usage.input_tokens is None


def test_an_anthropic_clients_beta_features_reach_an_anthropic_upstream(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI, anthropic_fake: FakeAnthropic
) -> None:
    write_both(tmp_path, upstream, anthropic_fake, {"Anthropic-Beta": "configured-2025-01-01"})
    with ParleyServer(settings_for(tmp_path, database_url)) as running, connect(running) as sdk:
        question = [{"role": "user", "content": "hi"}]
        beta = {"anthropic-beta": "context-1m-2025-08-07, configured-2025-01-01"}
        sdk.messages.create(
            model="an/claude-fake-opus", max_tokens=50, messages=question, extra_headers=beta
        )
        with sdk.messages.stream(
            model="an/claude-fake-opus", max_tokens=50, messages=question, extra_headers=beta
        ) as stream:
            stream.get_final_message()
        sdk.messages.count_tokens(
            model="an/claude-fake-opus", messages=question, extra_headers=beta
        )
        # Without the client's header the configured features alone go out.
        sdk.messages.create(model="an/claude-fake-opus", max_tokens=50, messages=question)
        # An OpenAI-style upstream gets a translated body: no Anthropic header to pass.
        sdk.messages.create(
            model="up/gpt-4o-mini", max_tokens=50, messages=question, extra_headers=beta
        )
    sent = [
        {k.lower(): v for k, v in headers.items()}.get("anthropic-beta")
        for _, headers, _ in anthropic_fake.received
    ]
    assert sent == [
        "context-1m-2025-08-07,configured-2025-01-01",
        "context-1m-2025-08-07,configured-2025-01-01",
        "context-1m-2025-08-07,configured-2025-01-01",
        "configured-2025-01-01",
    ]
    assert all(
        "anthropic-beta" not in {k.lower() for k in headers} for _, headers, _ in upstream.received
    )
