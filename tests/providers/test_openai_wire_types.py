"""Upstream frames with fields of the wrong type are protocol errors, never crashes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from parley.errors import UpstreamProtocolError
from parley.providers import openai_wire as wire


def frames() -> wire.StreamFrames:
    return wire.StreamFrames("m", hide_usage=False, scrub=lambda text: text)


@pytest.mark.parametrize(
    "choice",
    [
        {"index": None, "delta": {"content": "x"}},
        {"index": "0", "delta": {"content": "x"}},
        {"index": 0, "delta": {"content": 5}},
        {"index": 0, "delta": {}, "finish_reason": 3},
        {"index": 0, "delta": {"tool_calls": [{"index": [1], "function": {"name": "f"}}]}},
        {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": {"x": 1}}}]}},
    ],
)
def test_stream_frame_with_wrong_types_is_a_protocol_error(choice: dict[str, Any]) -> None:
    payload = orjson.dumps({"id": "c", "model": "m", "choices": [choice]})
    with pytest.raises(UpstreamProtocolError):
        frames().chunk(payload, yielded=True)


@pytest.mark.parametrize(
    "choice",
    [
        {"index": None, "message": {"content": "x"}, "finish_reason": "stop"},
        {"index": 0, "message": {"content": 5}, "finish_reason": "stop"},
        {"index": 0, "message": {"content": "x"}, "finish_reason": ["stop"]},
    ],
)
def test_completion_with_wrong_types_is_rejected(choice: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        wire.completion_events({"id": "c", "model": "m", "choices": [choice]}, "m")


def test_well_typed_frame_still_parses() -> None:
    payload = orjson.dumps(
        {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    )
    chunk = frames().chunk(payload, yielded=False)
    assert chunk.raw == b"data: " + payload + b"\n\n"
    assert any(getattr(e, "text", None) == "hi" for e in chunk.events)


def test_tool_call_argument_spacing_does_not_change_a_message_hash() -> None:
    from parley.domain.messages import Message, ToolCall

    spaced = Message("assistant", None, tool_calls=(ToolCall("c1", "f", '{"city": "Paris"}'),))
    compact = Message("assistant", None, tool_calls=(ToolCall("c1", "f", '{"city":"Paris"}'),))
    assert spaced.content_hash() == compact.content_hash()
    broken = Message("assistant", None, tool_calls=(ToolCall("c1", "f", '{"city": '),))
    assert broken.canonical()["tool_calls"][0]["function"]["arguments"] == '{"city": '
