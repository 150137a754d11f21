"""/v1/chat/completions end to end: the official openai SDK -> parley -> a fake upstream.

Every test runs a real parley server on loopback in front of a real fake upstream server,
and checks what the client saw and what the store holds, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes.openai_upstream import REFUSAL, FakeOpenAI
from tests.harness import (
    ParleyServer,
    as_datetime,
    leave_after_first_chunk,
    rows,
    settings_for,
    wait_for,
    write_config,
)


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[ParleyServer]:
    write_config(
        tmp_path,
        [
            {
                "name": "up",
                "kind": "openai",
                "base_url": upstream.base_url,
                "models": ["gpt-4o-mini"],
                "timeouts": {"connect": 2.0, "first_byte": 0.5, "idle": 0.5, "total": 2.0},
            }
        ],
        aliases={
            "fast": ["up/fail-500", "up/gpt-4o-mini"],
            "never": ["up/fail-503"],
            "moved": ["up/redirect", "up/gpt-4o-mini"],
            "proxied": ["up/fail-408", "up/gpt-4o-mini"],
        },
        extra=(
            "[retry]\nattempts = 2\nbackoff_base = 0.01\n"
            '[pricing."up/tool-call"]\ninput = 1.0\noutput = 2.0\n'
        ),
    )
    with ParleyServer(settings_for(tmp_path, database_url)) as running:
        yield running


def client(server: ParleyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_non_streaming_answer_is_recorded(server: ParleyServer, database_url: str) -> None:
    reply = client(server).chat.completions.create(
        model="up/gpt-4o-mini",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        temperature=0.5,
        max_tokens=50,
    )
    assert reply.choices[0].message.content == "echo: hi"
    assert reply.usage is not None and reply.usage.completion_tokens == 2

    [req] = rows(database_url, "SELECT * FROM request_log")
    assert req["success"] and req["status_code"] == 200
    assert (req["provider"], req["model"], req["model_requested"]) == (
        "up",
        "gpt-4o-mini",
        "up/gpt-4o-mini",
    )
    assert (req["prompt_tokens"], req["completion_tokens"], req["total_tokens"]) == (3, 2, 5)
    assert req["temperature"] == 0.5 and req["max_tokens"] == 50 and req["message_count"] == 2
    assert req["is_streaming"] is False or req["is_streaming"] == 0
    assert req["finish_reason"] == "stop" and req["client_protocol"] == "openai"
    # gpt-4o-mini is priced in the shipped table: 3 * 0.15 + 2 * 0.60 per million.
    assert req["cost_usd"] == pytest.approx((3 * 0.15 + 2 * 0.60) / 1e6)
    assert req["response_time_ms"] > 0 and req["time_to_first_token_ms"] is None

    messages = rows(database_url, "SELECT * FROM messages ORDER BY id")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[2]["content"] == "echo: hi"
    [response] = rows(database_url, "SELECT * FROM responses")
    assert response["message_id"] == messages[2]["id"] and response["request_id"] == req["id"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_reaches_the_client_as_sent_and_is_stored_as_the_answer(
    server: ParleyServer, database_url: str, stream: bool
) -> None:
    """OpenAI's ``refusal`` (in place of ``content``) passes through untouched; the store
    keeps its text as the assistant's message, finished ``content_filter``."""
    sdk = client(server)
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "do wrong"}]
    if stream:
        chunks = list(sdk.chat.completions.create(model="up/refuse", messages=ask, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.refusal or "" for d in deltas) == REFUSAL
        assert all(not d.content for d in deltas)
    else:
        message = sdk.chat.completions.create(model="up/refuse", messages=ask).choices[0].message
        assert (message.refusal, message.content) == (REFUSAL, None)
    [req] = rows(database_url, "SELECT * FROM request_log")
    assert req["success"] and req["finish_reason"] == "content_filter"
    stored = rows(database_url, "SELECT role, content FROM messages ORDER BY id")
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "do wrong"),
        ("assistant", REFUSAL),
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_usage_counts_no_model_could_have_are_not_stored_and_block_nothing(
    server: ParleyServer, database_url: str, stream: bool
) -> None:
    """Before, a prompt count of 2**63 - 1 went into the rollups, whose next sum on the
    same series overflowed: every later exchange of that model failed to commit (a 500
    after the upstream answered). On PostgreSQL the first one already failed."""
    sdk = client(server)
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "count"}]
    for model in ("up/usage-huge", "up/usage-huge", "up/usage-huge", "up/gpt-4o-mini"):
        if stream:
            list(sdk.chat.completions.create(model=model, messages=ask, stream=True))
        else:
            sdk.chat.completions.create(model=model, messages=ask)
    logged = rows(
        database_url,
        "SELECT model, prompt_tokens, completion_tokens, total_tokens, success "
        "FROM request_log ORDER BY id",
    )
    assert [tuple(r.values()) for r in logged] == [("usage-huge", None, None, None, 1)] * 3 + [
        ("gpt-4o-mini", 1, 2, 3, 1)
    ]


def test_streaming_with_usage_and_timings(server: ParleyServer, database_url: str) -> None:
    stream = client(server).chat.completions.create(
        model="up/gpt-4o-mini",
        messages=[{"role": "user", "content": "tell me a story"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: tell me a story"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    [req] = rows(database_url, "SELECT * FROM request_log")
    assert req["success"] and req["completion_tokens"] == 5 and not req["usage_estimated"]
    assert 0 < req["time_to_first_token_ms"] <= req["time_to_last_token_ms"]
    assert req["time_to_last_token_ms"] <= req["response_time_ms"]
    assert req["tokens_per_second"] is not None and req["tokens_per_second"] > 0


def test_stream_without_usage_request_hides_usage_but_records_it(
    server: ParleyServer, database_url: str, upstream: FakeOpenAI
) -> None:
    chunks = list(
        client(server).chat.completions.create(
            model="up/gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}], stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    # parley asked the upstream for usage anyway, and recorded it.
    assert upstream.received[-1][2]["stream_options"] == {"include_usage": True}
    [req] = rows(database_url, "SELECT completion_tokens FROM request_log")
    assert req["completion_tokens"] == 4  # "echo: a b c"


def test_async_client_streaming_and_not(server: ParleyServer, database_url: str) -> None:
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="unused", max_retries=0
        ) as aclient:
            plain = await aclient.chat.completions.create(
                model="up/gpt-4o-mini", messages=[{"role": "user", "content": "one"}]
            )
            stream = await aclient.chat.completions.create(
                model="up/gpt-4o-mini",
                messages=[{"role": "user", "content": "two"}],
                stream=True,
            )
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return plain.choices[0].message.content or "", "".join(parts)

    assert asyncio.run(run()) == ("echo: one", "echo: two")
    assert len(rows(database_url, "SELECT id FROM request_log")) == 2


def test_every_field_passes_through(server: ParleyServer, upstream: FakeOpenAI) -> None:
    client(server).chat.completions.create(
        model="up/gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        seed=7,
        n=1,
        stop=["\n\n"],
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_object"},
        user="alice",
        extra_body={"vendor_knob": {"x": 1}},
    )
    body = upstream.received[-1][2]
    assert body["model"] == "gpt-4o-mini"
    for key, value in {
        "seed": 7,
        "n": 1,
        "stop": ["\n\n"],
        "logprobs": True,
        "top_logprobs": 2,
        "response_format": {"type": "json_object"},
        "user": "alice",
        "vendor_knob": {"x": 1},
    }.items():
        assert body[key] == value, key


def test_tool_call_round_trip_lands_in_one_conversation(
    server: ParleyServer, database_url: str
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    history: list[dict[str, object]] = [{"role": "user", "content": "weather in Paris?"}]
    first = client(server).chat.completions.create(
        model="up/tool-call",
        messages=history,
        tools=tools,  # type: ignore[arg-type]
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city": "Paris"}'  # type: ignore[union-attr]
    history.append(first.choices[0].message.model_dump(exclude_none=True))
    history.append({"role": "tool", "tool_call_id": call.id, "content": "sunny"})
    second = client(server).chat.completions.create(
        model="up/tool-call",
        messages=history,
        tools=tools,  # type: ignore[arg-type]
    )
    assert second.choices[0].message.content == "tool said: sunny"

    conversations = rows(database_url, "SELECT id FROM conversations")
    assert len(conversations) == 1
    # Priced by the config override (USD per million tokens), not the shipped table.
    costs = rows(database_url, "SELECT prompt_tokens, completion_tokens, cost_usd FROM request_log")
    for cost in costs:
        expected = (cost["prompt_tokens"] * 1.0 + cost["completion_tokens"] * 2.0) / 1e6
        assert cost["cost_usd"] == pytest.approx(expected)
    roles = [m["role"] for m in rows(database_url, "SELECT role FROM messages ORDER BY id")]
    assert roles == ["user", "assistant", "tool", "assistant"]


def test_streamed_tool_call(server: ParleyServer) -> None:
    chunks = list(
        client(server).chat.completions.create(
            model="up/tool-call",
            messages=[{"role": "user", "content": "weather?"}],
            tools=[{"type": "function", "function": {"name": "get_weather"}}],
            stream=True,
        )
    )
    arguments = "".join(
        (c.choices[0].delta.tool_calls or [])[0].function.arguments or ""  # type: ignore[union-attr]
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert arguments == '{"city": "Paris"}'


def test_images_reach_the_upstream(server: ParleyServer, upstream: FakeOpenAI) -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    client(server).chat.completions.create(
        model="up/gpt-4o-mini",
        messages=[{"role": "user", "content": content}],  # type: ignore[typeddict-item]
    )
    assert upstream.received[-1][2]["messages"][0]["content"] == content


def test_upstream_400_is_the_clients_error(server: ParleyServer, database_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(
            model="up/fail-400", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 400
    [req] = rows(database_url, "SELECT * FROM request_log")
    assert not req["success"] and req["error_type"] == "bad_request"
    assert req["status_code"] == 400
    # What the user sent is kept even when the upstream refused it.
    assert [m["role"] for m in rows(database_url, "SELECT role FROM messages")] == ["user"]


def test_429_is_retried_after_retry_after_then_returned(
    server: ParleyServer, database_url: str
) -> None:
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": "up/fail-429", "messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    )
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"
    attempts = rows(database_url, "SELECT * FROM request_log ORDER BY attempt")
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert {a["error_type"] for a in attempts} == {"rate_limit"}
    # The retry waited for Retry-After (1 s) before the second attempt.
    gap = as_datetime(attempts[1]["created_at"]) - as_datetime(attempts[0]["created_at"])
    assert gap.total_seconds() >= 0.95


def test_a_client_that_leaves_during_retry_after_is_recorded_as_cancelled(
    server: ParleyServer, database_url: str
) -> None:
    # The upstream's 429 asks for 1 s; the client gives up after 0.3 s of that wait.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": "up/fail-429", "messages": [{"role": "user", "content": "x"}]},
            timeout=0.3,
        )
    attempts = wait_for(
        lambda: rows(database_url, "SELECT * FROM request_log ORDER BY attempt") or None
    )
    # The 429 that made it wait, then the retry the client's departure cancelled: never
    # sent, so it has no status, and its finish reason says why the exchange ended.
    assert [a["error_type"] for a in attempts] == ["rate_limit", "cancelled"]
    assert attempts[0]["status_code"] == 429
    assert attempts[1]["status_code"] is None
    assert attempts[1]["finish_reason"] == "client_disconnected"
    assert attempts[1]["chain_id"] == attempts[0]["chain_id"]
    # Recorded at the departure, not after the wait it gave up.
    gap = as_datetime(attempts[1]["created_at"]) - as_datetime(attempts[0]["created_at"])
    assert gap.total_seconds() < 0.9


def test_5xx_then_success_on_the_same_candidate(server: ParleyServer, database_url: str) -> None:
    reply = client(server).chat.completions.create(
        model="up/flaky-1", messages=[{"role": "user", "content": "x"}], user="retry-test"
    )
    assert reply.choices[0].message.content == "echo: x"
    attempts = rows(database_url, "SELECT * FROM request_log ORDER BY attempt")
    assert [(a["attempt"], a["success"]) for a in attempts] == [(1, False), (2, True)]
    assert attempts[0]["chain_id"] == attempts[1]["chain_id"]
    # "flaky-1" has no price anywhere: its cost is unknown (NULL), never zero.
    assert attempts[1]["completion_tokens"] == 2 and attempts[1]["cost_usd"] is None


def test_alias_falls_back_and_links_the_chain(server: ParleyServer, database_url: str) -> None:
    reply = client(server).chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "x"}]
    )
    assert reply.choices[0].message.content == "echo: x"
    attempts = rows(database_url, "SELECT * FROM request_log ORDER BY attempt")
    assert [(a["model"], a["success"]) for a in attempts] == [
        ("fail-500", False),
        ("fail-500", False),
        ("gpt-4o-mini", True),
    ]
    assert len({a["chain_id"] for a in attempts}) == 1
    assert {a["model_requested"] for a in attempts} == {"fast"}
    [response] = rows(database_url, "SELECT request_id FROM responses")
    assert response["request_id"] == attempts[2]["id"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_redirect_or_a_408_upstream_is_its_failure_not_the_clients(
    server: ParleyServer, database_url: str, stream: bool
) -> None:
    # parley follows no redirect: a 307 is a misconfigured candidate (not retried, the
    # next one serves); a 408 is the upstream giving up waiting (retried, then the next).
    question: Iterable[ChatCompletionMessageParam] = [{"role": "user", "content": "x"}]
    with client(server) as sdk:
        for alias in ("moved", "proxied"):
            if stream:
                with sdk.chat.completions.create(
                    model=alias, messages=question, stream=True
                ) as chunks:
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                reply = sdk.chat.completions.create(model=alias, messages=question)
                text = reply.choices[0].message.content or ""
            assert text == "echo: x"
        with pytest.raises(openai.APIStatusError) as moved:
            sdk.chat.completions.create(model="up/redirect", messages=question)
        assert moved.value.status_code == 502 and "base_url" in moved.value.message
        with pytest.raises(openai.APIStatusError) as timed_out:
            sdk.chat.completions.create(model="up/fail-408", messages=question)
        assert timed_out.value.status_code == 504
    attempts = rows(
        database_url,
        "SELECT model_requested, model, status_code, error_type FROM request_log ORDER BY id",
    )
    assert [tuple(a.values()) for a in attempts] == [
        ("moved", "redirect", 307, "protocol"),
        ("moved", "gpt-4o-mini", 200, None),
        ("proxied", "fail-408", 408, "timeout"),
        ("proxied", "fail-408", 408, "timeout"),
        ("proxied", "gpt-4o-mini", 200, None),
        ("up/redirect", "redirect", 307, "protocol"),
        ("up/fail-408", "fail-408", 408, "timeout"),
        ("up/fail-408", "fail-408", 408, "timeout"),
    ]


def test_all_candidates_failing_gives_a_502(server: ParleyServer, database_url: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client(server).chat.completions.create(
            model="never", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 502
    assert len(rows(database_url, "SELECT id FROM request_log")) == 2


def test_stream_stall_before_first_byte_is_retried_then_504(
    server: ParleyServer, database_url: str
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client(server).chat.completions.create(
            model="up/stall-first-byte", messages=[{"role": "user", "content": "x"}], stream=True
        )
    assert caught.value.status_code == 504
    attempts = rows(database_url, "SELECT error_type, error_message FROM request_log")
    assert [a["error_type"] for a in attempts] == ["timeout", "timeout"]
    assert "first_byte" in attempts[0]["error_message"]


def test_non_streaming_stall_is_bounded_by_total_and_not_retried(
    server: ParleyServer, database_url: str
) -> None:
    # A non-streaming upstream sends headers only when its answer is done: retrying a
    # slow one would pay for it twice, so only the total timeout applies, once.
    with pytest.raises(openai.APIStatusError) as caught:
        client(server).chat.completions.create(
            model="up/stall-first-byte", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 504
    [attempt] = rows(database_url, "SELECT error_type, error_message FROM request_log")
    assert attempt["error_type"] == "timeout" and "total" in attempt["error_message"]


def test_an_embeddings_stall_is_bounded_by_total_and_not_retried(
    server: ParleyServer, database_url: str
) -> None:
    # Embeddings come back whole, like a non-streaming answer: one attempt, bounded by
    # the total timeout (2 s here), not retried after the 0.5 s first-byte one.
    with pytest.raises(openai.APIStatusError) as caught:
        client(server).embeddings.create(model="up/stall-first-byte", input="x")
    assert caught.value.status_code == 504
    [attempt] = rows(database_url, "SELECT error_type, error_message FROM request_log")
    assert attempt["error_type"] == "timeout" and "total" in attempt["error_message"]


def test_client_leaving_before_the_first_byte_is_recorded(
    server: ParleyServer, database_url: str
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.base_url}/chat/completions",
            json={
                "model": "up/stall-first-byte",
                "stream": True,
                "messages": [{"role": "user", "content": "are you there?"}],
            },
            timeout=0.2,
        )
    [req] = wait_for(lambda: rows(database_url, "SELECT * FROM request_log"))
    assert req["finish_reason"] == "client_disconnected" and req["error_type"] == "cancelled"
    assert [m["content"] for m in rows(database_url, "SELECT content FROM messages")] == [
        "are you there?"
    ]


def test_client_leaving_an_embeddings_request_is_recorded(
    server: ParleyServer, database_url: str
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.base_url}/embeddings",
            json={"model": "up/stall-first-byte", "input": "are you there?"},
            timeout=0.2,
        )
    [req] = wait_for(
        lambda: rows(
            database_url,
            "SELECT endpoint, success, error_type, finish_reason FROM request_log",
        )
    )
    assert req == {
        "endpoint": "embeddings",
        "success": False,
        "error_type": "cancelled",
        "finish_reason": "client_disconnected",
    }


@pytest.mark.parametrize(
    ("model", "error_type"),
    [
        ("stall-mid", "timeout"),
        ("reset-mid", "interrupted"),
        ("malformed", "protocol"),
        ("eof-mid", "interrupted"),
    ],
)
def test_broken_stream_ends_in_an_error_event(
    server: ParleyServer, database_url: str, model: str, error_type: str
) -> None:
    received = []
    with pytest.raises(openai.APIError):
        for chunk in client(server).chat.completions.create(
            model=f"up/{model}", messages=[{"role": "user", "content": "a b c d"}], stream=True
        ):
            received.append(chunk)
    assert received, "the first chunks reached the client before the failure"
    [req] = rows(database_url, "SELECT * FROM request_log")
    assert not req["success"] and req["error_type"] == error_type
    # The upstream answered 200 before it broke off, as a stream its client left records.
    assert req["finish_reason"] == "error" and req["status_code"] == 200
    # The partial answer is kept with the request.
    assistant = rows(database_url, "SELECT content FROM messages WHERE role = 'assistant'")
    assert assistant and assistant[0]["content"]


def test_client_disconnect_cancels_and_records_partial(
    server: ParleyServer, database_url: str, upstream: FakeOpenAI
) -> None:
    leave_after_first_chunk(server, "one two three four five")
    [req] = wait_for(
        lambda: rows(database_url, "SELECT * FROM request_log WHERE finish_reason IS NOT NULL")
    )
    assert req["finish_reason"] == "client_disconnected"
    assert req["error_type"] == "cancelled" and not req["success"]
    # The upstream never reported usage: estimated, and marked as such.
    assert req["usage_estimated"] and req["completion_tokens"] >= 1
    assert req["prompt_tokens"] == 6  # 23 characters at ~4 a token
    # parley hung up on the upstream too, long before its 0.5 s answer was done.
    wait_for(lambda: upstream.abandoned == 1, timeout=2.0)
    # The part of the answer that had arrived is kept.
    [partial] = rows(database_url, "SELECT content FROM messages WHERE role = 'assistant'")
    assert partial["content"] and "five" not in partial["content"]


def test_overlong_names_are_clipped_not_lost(server: ParleyServer, database_url: str) -> None:
    # PostgreSQL refuses a value longer than its column; the answer must still commit.
    model = "up/" + "m" * 300
    reply = client(server).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "long"}]
    )
    assert reply.choices[0].message.content == "echo: long"
    [req] = rows(database_url, "SELECT model, model_requested, success FROM request_log")
    assert req["success"] and req["model_requested"] == model[:255]
    assert req["model"] == ("m" * 300)[:255]


def test_a_nul_character_is_recorded_on_every_database(
    server: ParleyServer, database_url: str
) -> None:
    # Valid JSON that PostgreSQL's text columns refuse: a paid answer must still commit.
    reply = client(server).chat.completions.create(
        model="up/gpt-4o-mini", messages=[{"role": "user", "content": "a\u0000b"}]
    )
    assert reply.choices[0].message.content == "echo: a\u0000b"
    stored = rows(database_url, "SELECT role, content, payload FROM messages ORDER BY id")
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "a\ufffdb"),
        ("assistant", "echo: a\ufffdb"),
    ]
    # The message itself is kept exactly, escaped in its JSON payload.
    assert "\\u0000" in stored[0]["payload"]


@pytest.mark.parametrize("recording", ["async", "journal"])
def test_async_and_journal_recording_answer_first_and_record_everything(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI, recording: str
) -> None:
    write_config(tmp_path, [{"name": "up", "kind": "openai", "base_url": upstream.base_url}])
    # Batches of one: the writer falls 4 batches behind at once, so some of the burst
    # waits for its commit and the rest is acknowledged first.
    settings = dataclasses.replace(
        settings_for(tmp_path, database_url, PARLEY_RECORDING=recording), writer_batch_max=1
    )
    with ParleyServer(settings) as running:
        sdk = openai.AsyncOpenAI(base_url=running.base_url, api_key="unused", max_retries=0)

        async def one(i: int) -> str:
            reply = await sdk.chat.completions.create(
                model="up/gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}]
            )
            return reply.choices[0].message.content or ""

        async def burst() -> list[str]:
            try:
                return await asyncio.gather(*(one(i) for i in range(40)))
            finally:
                await sdk.close()

        assert asyncio.run(burst()) == [f"echo: q{i}" for i in range(40)]
        wait_for(lambda: len(rows(database_url, "SELECT id FROM request_log")) == 40)
        health = httpx.get(f"{running.root}/healthz").json()
        if recording == "journal":
            wait_for(lambda: httpx.get(f"{running.root}/healthz").json()["journal"]["pending"] == 0)
        else:
            assert "journal" not in health
    answers = rows(database_url, "SELECT content FROM messages WHERE role = 'assistant'")
    assert sorted(a["content"] for a in answers) == sorted(f"echo: q{i}" for i in range(40))
    # Every record committed, the journal's segments are gone with the server.
    assert not list((tmp_path / "data" / "journal").glob("*.journal"))
