"""The OpenAI encoder over neutral event sequences, checked with the openai SDK's own types.

What a non-OpenAI upstream (Anthropic, Gemini, Ollama) answers reaches OpenAI clients
through this encoder, so its output must parse as ``ChatCompletion`` /
``ChatCompletionChunk`` and accumulate, with the SDK's stream helper, into the answer the
events describe.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from parley.domain.events import (
    Chunk,
    Event,
    Finish,
    ReasoningDelta,
    ResponseStart,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from parley.domain.usage import Usage
from parley.server.openai_encode import DONE, OpenAIEncoder

START = ResponseStart(id="up-123", model="claude-x", created=1_700_000_000)
USAGE = Usage(
    prompt_tokens=10, completion_tokens=4, total_tokens=14, cached_tokens=6, reasoning_tokens=2
)


def stream(
    chunks: Sequence[Sequence[Event]], *, include_usage: bool = False
) -> tuple[list[ChatCompletionChunk], bytes]:
    """Encode a stream (the last chunk is final); the parsed frames and the whole bytes."""
    encoder = OpenAIEncoder("requested-model", include_usage=include_usage)
    out = b"".join(
        encoder.frames(Chunk(events=tuple(events), final=i == len(chunks) - 1))
        for i, events in enumerate(chunks)
    )
    assert out.endswith(DONE) and out.count(DONE) == 1
    frames = []
    for block in out[: -len(DONE)].split(b"\n\n"):
        if block:
            assert block.startswith(b"data: ")
            frames.append(ChatCompletionChunk.model_validate(orjson.loads(block[6:])))
    return frames, out


def accumulate(frames: list[ChatCompletionChunk]) -> ChatCompletion:
    """What the SDK's stream helper makes of the frames."""
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for frame in frames:
        state.handle_chunk(frame)
    # The snapshot, not get_final_completion(): that one raises on finish_reason "length".
    return state.current_completion_snapshot


def test_streamed_text_carries_identity_role_and_finish() -> None:
    frames, _ = stream(
        [
            [START, TextDelta(0, "Hel")],
            [TextDelta(0, "lo")],
            [Finish(0, "end_turn"), UsageReport(USAGE)],
            [],
        ]
    )
    assert {(f.id, f.model, f.created) for f in frames} == {("up-123", "claude-x", 1_700_000_000)}
    assert frames[0].choices[0].delta.role == "assistant"
    assert all(f.choices[0].delta.role is None for f in frames[1:])
    assert all(f.usage is None for f in frames)  # the client did not ask for usage
    completion = accumulate(frames)
    assert completion.choices[0].message.content == "Hello"
    assert completion.choices[0].finish_reason == "stop"


def test_usage_frame_only_when_asked_and_just_before_done() -> None:
    frames, out = stream(
        [[START, TextDelta(0, "hi")], [Finish(0, "stop")], [UsageReport(USAGE)], []],
        include_usage=True,
    )
    usage_frame = frames[-1]
    assert usage_frame.choices == [] and usage_frame.usage is not None
    assert usage_frame.usage.prompt_tokens == 10 and usage_frame.usage.total_tokens == 14
    assert usage_frame.usage.prompt_tokens_details is not None
    assert usage_frame.usage.prompt_tokens_details.cached_tokens == 6
    assert usage_frame.usage.completion_tokens_details is not None
    assert usage_frame.usage.completion_tokens_details.reasoning_tokens == 2
    assert out.index(b'"choices":[]') < out.index(DONE)
    assert sum(1 for f in frames if f.usage is not None) == 1


def test_streamed_tool_calls_are_renumbered_and_named_once() -> None:
    # An Anthropic upstream numbers tool calls by content block (text was block 0).
    frames, _ = stream(
        [
            [START, TextDelta(0, "Let me look.")],
            [ToolCallDelta(0, 1, "toolu_a", "get_weather", "")],
            [ToolCallDelta(0, 1, None, None, '{"city": ')],
            [ToolCallDelta(0, 1, None, None, '"Paris"}')],
            [ToolCallDelta(0, 2, "toolu_b", "get_time", '{"tz": "CET"}')],
            [Finish(0, "tool_use")],
            [],
        ]
    )
    entries = [call for f in frames for call in f.choices[0].delta.tool_calls or []]
    assert [e.index for e in entries] == [0, 0, 0, 1]
    assert [e.id for e in entries] == ["toolu_a", None, None, "toolu_b"]
    assert [e.function.name if e.function else None for e in entries] == [
        "get_weather",
        None,
        None,
        "get_time",
    ]
    completion = accumulate(frames)
    message = completion.choices[0].message
    assert message.content == "Let me look."
    assert message.tool_calls is not None
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls]  # type: ignore[union-attr]
    assert calls == [
        ("toolu_a", "get_weather", '{"city": "Paris"}'),
        ("toolu_b", "get_time", '{"tz": "CET"}'),
    ]
    assert completion.choices[0].finish_reason == "tool_calls"


def test_reasoning_goes_out_as_reasoning_content() -> None:
    frames, _ = stream(
        [
            [START, ReasoningDelta(0, "think ")],
            [ReasoningDelta(0, "hard")],
            [TextDelta(0, "42")],
            [],
        ]
    )
    reasoning = "".join(
        (f.choices[0].delta.model_extra or {}).get("reasoning_content", "") for f in frames
    )
    assert reasoning == "think hard"
    assert "".join(f.choices[0].delta.content or "" for f in frames) == "42"


def test_several_choices_each_get_their_role_and_finish() -> None:
    frames, _ = stream(
        [
            [START, TextDelta(0, "a"), TextDelta(1, "b")],
            [TextDelta(1, "b"), TextDelta(0, "a")],
            [Finish(0, "stop"), Finish(1, "length")],
            [],
        ]
    )
    first = {f.choices[0].index: f for f in reversed(frames)}
    assert first[0].choices[0].delta.role == first[1].choices[0].delta.role == "assistant"
    completion = accumulate(frames)
    assert [(c.index, c.message.content, c.finish_reason) for c in completion.choices] == [
        (0, "aa", "stop"),
        (1, "bb", "length"),
    ]


def test_a_final_chunk_with_events_and_no_identity() -> None:
    # Gemini / Ollama style: the last upstream frame carries text, finish and usage at once.
    frames, _ = stream([[TextDelta(0, "all at once"), Finish(0, "stop"), UsageReport(USAGE)]])
    assert frames[0].id.startswith("chatcmpl-") and frames[0].model == "requested-model"
    assert frames[0].created > 0
    assert frames[0].choices[0].delta.content == "all at once"
    assert frames[0].choices[0].finish_reason == "stop"


def test_whole_body_with_reasoning_tools_and_usage() -> None:
    encoder = OpenAIEncoder("requested-model")
    body = encoder.body(
        Chunk(
            events=(
                START,
                ReasoningDelta(0, "hmm"),
                TextDelta(0, "Checking."),
                ToolCallDelta(0, 3, "toolu_1", "get_weather", '{"city": "Paris"}'),
                Finish(0, "tool_use"),
                UsageReport(USAGE),
            ),
            final=True,
        )
    )
    completion = ChatCompletion.model_validate(orjson.loads(body))
    assert (completion.id, completion.model, completion.object) == (
        "up-123",
        "claude-x",
        "chat.completion",
    )
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    assert (choice.message.model_extra or {})["reasoning_content"] == "hmm"
    [call] = choice.message.tool_calls or []
    assert (call.id, call.function.name, call.function.arguments) == (  # type: ignore[union-attr]
        "toolu_1",
        "get_weather",
        '{"city": "Paris"}',
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 6


def test_whole_body_of_several_choices_without_usage() -> None:
    body = OpenAIEncoder("m").body(
        Chunk(
            events=(TextDelta(1, "second"), TextDelta(0, "first"), Finish(0, "max_tokens")),
            final=True,
        )
    )
    completion = ChatCompletion.model_validate(orjson.loads(body))
    assert [(c.index, c.message.content, c.finish_reason) for c in completion.choices] == [
        (0, "first", "length"),
        (1, "second", "stop"),
    ]
    assert completion.usage is None and completion.id.startswith("chatcmpl-")
    # A tool call without content: content is null, as OpenAI sends it.
    only_tool = OpenAIEncoder("m").body(
        Chunk(events=(ToolCallDelta(0, 0, None, "f", "{}"),), final=True)
    )
    message = orjson.loads(only_tool)["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["id"].startswith("call_")
