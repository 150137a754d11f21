"""Every provider family end to end: official SDKs -> parley -> fake upstreams that speak
OpenAI, Anthropic, Gemini and Ollama over real HTTP, with the store on SQLite and
PostgreSQL.

The OpenAI SDK talks to the Anthropic, Gemini and Ollama fakes (events re-encoded as
OpenAI), the Anthropic SDK to the Anthropic fake (bytes passed through); one conversation
switches provider every turn; a 429 falls back to another family; embeddings and model
listing go across families; a capability a model lacks is refused before any call.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, write_config

TIMEOUTS = {"connect": 2.0, "first_byte": 2.0, "idle": 2.0, "total": 5.0}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PIXEL = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


@dataclass
class Fakes:
    openai: FakeOpenAI
    anthropic: FakeAnthropic
    gemini: FakeGemini
    ollama: FakeOllama


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    with (
        FakeOpenAI() as oa,
        FakeAnthropic(api_key="sk-ant-canary-0123456789") as an,
        FakeGemini(api_key="gemini-canary-0123456789") as ge,
        FakeOllama() as ol,
    ):
        yield Fakes(oa, an, ge, ol)


@pytest.fixture
def server(tmp_path: Path, database_url: str, fakes: Fakes) -> Iterator[ParleyServer]:
    for fake in (fakes.openai, fakes.anthropic, fakes.gemini, fakes.ollama):
        fake.clear()
    write_config(
        tmp_path,
        [
            {
                "name": "oa",
                "kind": "openai",
                "base_url": fakes.openai.base_url,
                "timeouts": TIMEOUTS,
            },
            {
                "name": "an",
                "kind": "anthropic",
                "base_url": fakes.anthropic.base_url,
                "api_key": "sk-ant-canary-0123456789",
                "timeouts": TIMEOUTS,
            },
            {
                "name": "ge",
                "kind": "gemini",
                "base_url": fakes.gemini.base_url,
                "api_key": "gemini-canary-0123456789",
                "timeouts": TIMEOUTS,
            },
            {
                "name": "ol",
                "kind": "ollama",
                "base_url": fakes.ollama.base_url,
                "timeouts": TIMEOUTS,
            },
        ],
        aliases={
            "resilient": ["an/fail-429", "ge/gemini-2.0-flash"],
            # Gemini and Ollama refuse logprobs before sending; OpenAI takes them.
            "with-logprobs": ["ge/gemini-2.0-flash", "ol/llama3.2:latest", "oa/gpt-4o-mini"],
            "no-logprobs": ["ge/gemini-2.0-flash", "ol/llama3.2:latest"],
            # Anthropic has no embeddings API.
            "embedder": ["an/claude-fake-opus", "oa/text-embedding-3-small"],
            "anthropic-first": ["an/claude-fake-opus", "oa/gpt-4o-mini"],
        },
        extra=(
            "[retry]\nattempts = 2\nbackoff_base = 0.01\nmax_retry_after = 0.5\n"
            '[capabilities."ol/llama3.2:latest"]\nvision = false\n'
        ),
    )
    with ParleyServer(settings_for(tmp_path, database_url)) as running:
        yield running


@pytest.fixture
def oa(server: ParleyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def an(server: ParleyServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.root, api_key="unused", max_retries=0) as client:
        yield client


FAMILIES = ["an/claude-fake-sonnet", "ge/gemini-2.0-flash", "ol/llama3.2:latest"]


@pytest.mark.parametrize("model", FAMILIES)
def test_openai_sdk_reads_every_family(
    server: ParleyServer, oa: openai.OpenAI, database_url: str, model: str
) -> None:
    client = oa
    messages: Any = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=64)
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0

    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    logged = rows(database_url, "SELECT * FROM request_log ORDER BY id")
    assert [(r["provider"], r["success"], r["is_streaming"]) for r in logged] == [
        (model.split("/")[0], True, False),
        (model.split("/")[0], True, True),
    ]
    assert all(r["completion_tokens"] and r["client_protocol"] == "openai" for r in logged)


@pytest.mark.parametrize(
    ("model", "family"),
    [("an/tool-use", "anthropic"), ("ge/tool-call", "gemini"), ("ol/tool-call", "ollama")],
)
def test_openai_sdk_tool_round_trip_on_every_family(
    server: ParleyServer, oa: openai.OpenAI, fakes: Fakes, model: str, family: str
) -> None:
    client = oa
    messages: Any = [{"role": "user", "content": "weather in Paris?"}]
    first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    stream = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER_TOOL], stream=True
    )
    answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "sunny, 21C" in answer

    # The follow-up reached the upstream in its own format: the call and its result.
    _path, _headers, body = getattr(fakes, family).received[-1]
    if family == "anthropic":
        assert "tool_use" in [block["type"] for block in body["messages"][1]["content"]]
        result = body["messages"][2]["content"][0]
        assert (result["type"], result["tool_use_id"]) == ("tool_result", call.id)
    elif family == "gemini":
        assert "functionCall" in body["contents"][1]["parts"][0]
        response = body["contents"][2]["parts"][0]["functionResponse"]
        assert response["name"] == "get_weather"
    else:
        assert body["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
        assert (body["messages"][2]["role"], body["messages"][2]["tool_name"]) == (
            "tool",
            "get_weather",
        )


def test_anthropic_sdk_passes_through_to_anthropic(
    server: ParleyServer, an: anthropic.Anthropic, database_url: str, fakes: Fakes
) -> None:
    client = an
    reply = client.messages.create(
        model="an/claude-fake-haiku",
        max_tokens=64,
        system="be brief",
        messages=[{"role": "user", "content": "bonjour"}],
    )
    assert reply.content[0].type == "text" and reply.content[0].text == "echo: bonjour"
    assert reply.stop_reason == "end_turn"
    # The client's body went through as sent, with only the model replaced.
    _path, headers, body = fakes.anthropic.received[-1]
    assert body["model"] == "claude-fake-haiku" and body["system"] == "be brief"
    assert headers["x-api-key"] == "sk-ant-canary-0123456789"

    with client.messages.stream(
        model="an/tool-use",
        max_tokens=64,
        tools=[{"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}],
        messages=[{"role": "user", "content": "weather in Paris?"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    tool_use = next(block for block in final.content if block.type == "tool_use")
    assert tool_use.name == "get_weather"
    assert tool_use.input == {"city": "Paris"}

    logged = rows(database_url, "SELECT * FROM request_log ORDER BY id")
    assert [(r["client_protocol"], r["endpoint"], r["success"]) for r in logged] == [
        ("anthropic", "messages", True),
        ("anthropic", "messages", True),
    ]


def test_one_conversation_switches_provider_every_turn(
    server: ParleyServer, oa: openai.OpenAI, database_url: str, fakes: Fakes
) -> None:
    client = oa
    messages: Any = [{"role": "system", "content": "be brief"}]
    for word, model in zip(("one", "two", "three"), FAMILIES, strict=True):
        messages.append({"role": "user", "content": word})
        reply = client.chat.completions.create(model=model, messages=messages)
        assert reply.choices[0].message.content == f"echo: {word}"
        messages.append({"role": "assistant", "content": f"echo: {word}"})

    # Each adapter got the earlier turns, in its own format.
    an_body = fakes.anthropic.received[-1][2]
    assert an_body["system"] == "be brief"
    assert [m["role"] for m in an_body["messages"]] == ["user"]
    assert "one" in json.dumps(an_body["messages"][0]["content"])
    ge_body = fakes.gemini.received[-1][2]
    assert ge_body["systemInstruction"]["parts"][0]["text"] == "be brief"
    assert [(c["role"], c["parts"][0]["text"]) for c in ge_body["contents"]] == [
        ("user", "one"),
        ("model", "echo: one"),
        ("user", "two"),
    ]
    ol_body = fakes.ollama.received[-1][2]
    assert [(m["role"], m["content"]) for m in ol_body["messages"]] == [
        ("system", "be brief"),
        ("user", "one"),
        ("assistant", "echo: one"),
        ("user", "two"),
        ("assistant", "echo: two"),
        ("user", "three"),
    ]

    # One conversation, one row per message, each answer linked to its provider's attempt.
    [conversation] = rows(database_url, "SELECT * FROM conversations")
    stored = rows(
        database_url,
        "SELECT m.role, m.content, r.provider FROM messages m "
        "LEFT JOIN request_log r ON r.id = m.request_id "
        "WHERE m.conversation_id = :c ORDER BY m.id",
        c=conversation["id"],
    )
    assert [(m["role"], m["content"]) for m in stored] == [
        ("system", "be brief"),
        ("user", "one"),
        ("assistant", "echo: one"),
        ("user", "two"),
        ("assistant", "echo: two"),
        ("user", "three"),
        ("assistant", "echo: three"),
    ]
    assert [m["provider"] for m in stored if m["role"] == "assistant"] == ["an", "ge", "ol"]


def test_a_429_falls_back_to_another_family(
    server: ParleyServer, oa: openai.OpenAI, database_url: str
) -> None:
    reply = oa.chat.completions.create(
        model="resilient", messages=[{"role": "user", "content": "anyone?"}]
    )
    assert reply.choices[0].message.content == "echo: anyone?"
    logged = rows(database_url, "SELECT * FROM request_log ORDER BY id")
    assert [(r["provider"], r["success"], r["error_type"]) for r in logged] == [
        ("an", False, "rate_limit"),
        ("ge", True, None),
    ]
    assert len({r["chain_id"] for r in logged}) == 1
    assert all("canary" not in (r["error_message"] or "") for r in logged)


@pytest.mark.parametrize("model", ["ge/text-embedding-004", "ol/nomic-embed-text:latest"])
def test_embeddings_across_families(
    server: ParleyServer, oa: openai.OpenAI, database_url: str, model: str
) -> None:
    result = oa.embeddings.create(model=model, input=["alpha", "beta gamma"])
    assert [item.index for item in result.data] == [0, 1]
    assert len(result.data[0].embedding) > 0
    [logged] = rows(database_url, "SELECT * FROM request_log")
    assert (logged["endpoint"], logged["success"], logged["provider"]) == (
        "embeddings",
        True,
        model.split("/")[0],
    )
    if model.startswith("ol/"):
        # Ollama reports the tokens it read; Gemini's embeddings report none (NULL, not 0).
        assert logged["prompt_tokens"] == result.usage.prompt_tokens > 0
    else:
        assert logged["prompt_tokens"] is None


def test_model_listing_merges_what_providers_list(server: ParleyServer, oa: openai.OpenAI) -> None:
    listed = {m.id for m in oa.models.list()}
    assert {"ol/llama3.2:latest", "ge/gemini-2.0-flash", "an/claude-fake-opus"} <= listed
    assert "oa/gpt-4o-mini" in listed and "resilient" in listed


def test_a_capability_the_model_lacks_is_refused_before_any_call(
    server: ParleyServer, oa: openai.OpenAI, fakes: Fakes, database_url: str
) -> None:
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}
    with pytest.raises(openai.BadRequestError) as caught:
        oa.chat.completions.create(
            model="ol/llama3.2:latest",
            messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}],
        )
    assert "does not accept images" in str(caught.value)
    assert fakes.ollama.received == []
    assert rows(database_url, "SELECT * FROM request_log") == []
    # Through the Anthropic front door the refusal is Anthropic's error shape.
    response = httpx.post(
        f"{server.root}/v1/messages",
        json={
            "model": "ol/llama3.2:latest",
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": PIXEL},
                        },
                    ],
                }
            ],
        },
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_request_one_family_refuses_goes_to_the_next_candidate(
    server: ParleyServer, oa: openai.OpenAI, fakes: Fakes, database_url: str
) -> None:
    answer = oa.chat.completions.create(
        model="with-logprobs", messages=[{"role": "user", "content": "hi"}], logprobs=True
    )
    assert answer.choices[0].message.content
    assert fakes.gemini.received == [] and fakes.ollama.received == []
    assert len(fakes.openai.received) == 1
    logged = rows(database_url, "SELECT * FROM request_log ORDER BY attempt")
    assert [(r["provider"], r["success"], r["status_code"], r["error_type"]) for r in logged] == [
        ("ge", False, 400, "bad_request"),
        ("ol", False, 400, "bad_request"),
        ("oa", True, 200, None),
    ]
    assert "logprobs" in logged[0]["error_message"] and "Gemini" in logged[0]["error_message"]
    assert len({r["chain_id"] for r in logged}) == 1


def test_a_request_every_candidate_refuses_gets_the_first_refusal(
    server: ParleyServer, oa: openai.OpenAI, fakes: Fakes, database_url: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oa.chat.completions.create(
            model="no-logprobs", messages=[{"role": "user", "content": "hi"}], logprobs=True
        )
    assert caught.value.status_code == 400
    assert "cannot be sent to Gemini" in caught.value.message
    assert caught.value.param == "logprobs"
    assert fakes.gemini.received == [] and fakes.ollama.received == []
    logged = rows(database_url, "SELECT provider, status_code FROM request_log ORDER BY attempt")
    assert [(r["provider"], r["status_code"]) for r in logged] == [("ge", 400), ("ol", 400)]


def test_a_request_no_provider_would_take_is_not_sent_to_the_next_candidate(
    server: ParleyServer, oa: openai.OpenAI, fakes: Fakes, database_url: str
) -> None:
    # Not base64: Anthropic's adapter refuses it, and so would any upstream.
    image = {"type": "image_url", "image_url": {"url": "data:image/png,not-base64"}}
    with pytest.raises(openai.BadRequestError) as caught:
        oa.chat.completions.create(
            model="anthropic-first",
            messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}],
        )
    assert "must be base64" in caught.value.message
    assert fakes.anthropic.received == [] and fakes.openai.received == []
    logged = rows(database_url, "SELECT provider, status_code FROM request_log")
    assert [(r["provider"], r["status_code"]) for r in logged] == [("an", 400)]


def test_embeddings_go_past_a_family_without_an_embeddings_api(
    server: ParleyServer, oa: openai.OpenAI, database_url: str
) -> None:
    result = oa.embeddings.create(model="embedder", input="alpha")
    assert len(result.data[0].embedding) > 0
    logged = rows(database_url, "SELECT * FROM request_log ORDER BY attempt")
    assert [(r["provider"], r["success"], r["status_code"]) for r in logged] == [
        ("an", False, 400),
        ("oa", True, 200),
    ]


def test_an_anthropic_client_tool_round_trip_stays_in_one_conversation(
    server: ParleyServer, an: anthropic.Anthropic, database_url: str
) -> None:
    client = an
    tools: Any = [{"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    history: Any = [{"role": "user", "content": "weather in Paris?"}]
    # The OpenAI upstream spaces its argument JSON; the client sends back an object.
    first = client.messages.create(
        model="oa/tool-call", max_tokens=64, tools=tools, messages=history
    )
    tool_use = next(block for block in first.content if block.type == "tool_use")
    history += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}],
        },
    ]
    client.messages.create(model="oa/tool-call", max_tokens=64, tools=tools, messages=history)
    assert len(rows(database_url, "SELECT id FROM conversations")) == 1
    roles = [m["role"] for m in rows(database_url, "SELECT role FROM messages ORDER BY id")]
    assert roles == ["user", "assistant", "tool", "assistant"]
