"""A fake Anthropic Messages upstream: a real aiohttp server speaking real HTTP and SSE.

Written from Anthropic's public API reference (Messages, streaming, count tokens, models,
errors), so that the official ``anthropic`` SDK can be pointed at it. ``FakeAnthropic``
runs it on 127.0.0.1 in a background thread with its own event loop (a context manager;
``base_url`` is the API root without ``/v1``, as the SDK takes it; ``received`` lists
every request as (path with query, headers, parsed JSON body or None)).
``python -m tests.fakes.anthropic_upstream --port 0`` runs it as a process that records
nothing: stdout's first line is ``PORT <n>``, then it serves until killed.

Routes: ``POST /v1/messages`` (JSON, or SSE with ``"stream": true``: ``message_start``,
then per content block ``content_block_start`` / ``content_block_delta``s /
``content_block_stop`` with a ``ping`` after the first start, ``message_delta``,
``message_stop``), ``POST /v1/messages/count_tokens``, ``GET /v1/models`` (``limit``,
``after_id``, ``before_id``; pages of at most ``max_page_size``).

Checks, like Anthropic: a missing or wrong key (``x-api-key``, or ``Authorization: Bearer``
as recent SDKs send it) is a 401 ``authentication_error``
(the message names the key it got, so that adapters must scrub it); a missing
``anthropic-version`` a 400; a body Anthropic would refuse (no ``max_tokens``, fields it
does not know, empty text blocks, bad image sources, a ``tool_result`` without its
``tool_use`` in the previous turn or the reverse) a 400 ``invalid_request_error``.

Behaviour is chosen by the requested model name, so it works across processes:

- any other name: ``"echo: <last user text>"`` (streamed as 3 text deltas);
- with ``thinking`` enabled in the request, a thinking block comes first
  (``"pondering: <text>"``, 2 thinking deltas and a signature delta);
- ``tool-use`` (with tools given): a text block, then one ``tool_use`` of the first tool
  with input ``{"city": "Paris"}`` (streamed as ``""`` and two JSON fragments);
  ``tool-use-2``: two calls (Paris, London); after a ``tool_result``: ``"tool said:
  <its content>"``;
- ``stop-<reason>``: the echo ended with that ``stop_reason`` (``max_tokens``,
  ``stop_sequence``, ``refusal``, ``pause_turn``, ``model_context_window_exceeded``);
- ``fail-<key>`` for each key of ``FAILURES``: that status and Anthropic error body
  (``fail-429`` with ``retry-after: 1``; ``fail-529`` overloaded);
- ``error-first``: a 200 stream whose first event is an ``overloaded_error``;
- ``stall-first-byte``: 30 s before the headers; ``stall-mid``: 2 text deltas, then 30 s;
  ``reset-mid``: 2 text deltas, then a TCP reset; ``eof-mid``: 2 text deltas, then a
  clean end without ``message_stop``; ``error-mid``: 2 text deltas, then an ``error``
  event; ``malformed``: the first events, then ``data: {not json`` (non-streaming: a body
  that is not JSON); ``slow-stream``: text deltas 100 ms apart.

Usage counts words: ``input_tokens`` for the system prompt and every message, plus a fixed
``cache_read_input_tokens`` of 2 and ``cache_creation_input_tokens`` of 1; ``output_tokens``
the reply (5 per tool call), with ``output_tokens_details.thinking_tokens`` when thinking.
Answers are deterministic (ids hash the request).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.runner import FakeServer, reset, serve_main

STALL_SECONDS = 30.0
CACHE_READ = 2
CACHE_WRITE = 1
MODELS = (
    "claude-fake-opus",
    "claude-fake-sonnet",
    "claude-fake-haiku",
    "tool-use",
    "tool-use-2",
)
# model -> (status, error type, message, extra headers)
FAILURES = MappingProxyType(
    {
        "fail-400": (400, "invalid_request_error", "temperature: range: 0..1", ()),
        "fail-context": (
            400,
            "invalid_request_error",
            "prompt is too long: 215000 tokens > 200000 maximum",
            (),
        ),
        "fail-filter": (
            400,
            "invalid_request_error",
            "Output blocked by content filtering policy",
            (),
        ),
        "fail-401": (401, "authentication_error", "invalid x-api-key", ()),
        "fail-403": (
            403,
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
            (),
        ),
        "fail-404": (404, "not_found_error", "model: fail-404", ()),
        "fail-413": (413, "request_too_large", "Request exceeds the maximum size", ()),
        "fail-429": (
            429,
            "rate_limit_error",
            "This request would exceed the rate limit for your organization.",
            (("retry-after", "1"),),
        ),
        "fail-500": (500, "api_error", "Internal server error", ()),
        "fail-529": (529, "overloaded_error", "Overloaded", ()),
    }
)
MESSAGE_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "metadata",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
        "context_management",
        "output_config",
        "output_format",
    }
)
COUNT_FIELDS = frozenset(
    {"model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers"}
)
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
TOOL_CITIES = ("Paris", "London")
# model -> index of the stream event sent in place of the rest of the answer (events:
# message_start, content_block_start, ping, then the text deltas)
BREAK_AT = MappingProxyType(
    {"stall-mid": 5, "reset-mid": 5, "eof-mid": 5, "error-mid": 5, "malformed": 2}
)
Received = tuple[str, dict[str, str], Any]


class BadRequest(Exception):
    """A body Anthropic would refuse with 400 ``invalid_request_error``."""


class _Upstream:
    """The server's state and handlers; one per fake, used from its event loop only."""

    def __init__(self, api_key: str | None, record: bool, max_page_size: int) -> None:
        self.api_key = api_key
        self.record = record
        self.max_page_size = max_page_size
        # ``received`` is read from the test's thread while the loop thread appends.
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()
        return int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.runner is not None:
            await self.runner.cleanup()

    async def sleep(self, seconds: float) -> None:
        """A stall that ``stop()`` can cut short."""
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.tasks.discard(task)

    async def _accept(
        self, request: web.Request, read_body: bool
    ) -> tuple[Any, web.Response | None]:
        """Record the request; (its body, the error to answer with when it is refused)."""
        body = None
        if read_body:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                return None, _error(
                    400, "invalid_request_error", "There was an issue with the JSON"
                )
        if self.record:
            with self.lock:
                self.received.append((request.path_qs, dict(request.headers), body))
        # The key may come as ``x-api-key`` or as a bearer token (what recent SDKs send).
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        key = request.headers.get("x-api-key") or bearer
        if not key:
            return body, _error(401, "authentication_error", "x-api-key header is required")
        if self.api_key is not None and key != self.api_key:
            # The fake names the key it got: the adapter must scrub it from its errors.
            return body, _error(401, "authentication_error", f"invalid x-api-key: {key}")
        if not request.headers.get("anthropic-version"):
            return body, _error(
                400, "invalid_request_error", "anthropic-version: header is required"
            )
        if read_body and not isinstance(body, dict):
            return body, _error(400, "invalid_request_error", "body: Input should be an object")
        return body, None

    async def models(self, request: web.Request) -> web.Response:
        _, denied = await self._accept(request, read_body=False)
        if denied is not None:
            return denied
        try:
            limit = min(int(request.query.get("limit", "20")), self.max_page_size)
        except ValueError:
            return _error(400, "invalid_request_error", "limit: Input should be an integer")
        ids = list(MODELS)
        if "after_id" in request.query:
            after = request.query["after_id"]
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        elif "before_id" in request.query:
            before = request.query["before_id"]
            ids = ids[: ids.index(before)][-limit:] if before in ids else []
        page = ids[:limit]
        data = [
            {
                "type": "model",
                "id": model,
                "display_name": model.replace("-", " ").title(),
                "created_at": "2025-09-29T00:00:00Z",
                "lifecycle": "active",
            }
            for model in page
        ]
        return _json(
            {
                "data": data,
                "has_more": len(ids) > len(page),
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            }
        )

    async def count_tokens(self, request: web.Request) -> web.Response:
        body, denied = await self._accept(request, read_body=True)
        if denied is not None:
            return denied
        if (refused := _refusal(body, COUNT_FIELDS)) is not None:
            return refused
        tools = len(body.get("tools") or ())
        return _json({"input_tokens": _prompt_words(body) + 10 * tools})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body, denied = await self._accept(request, read_body=True)
        if denied is not None:
            return denied
        if type(body.get("max_tokens")) is not int:
            return _error(400, "invalid_request_error", "max_tokens: Field required")
        if (refused := _refusal(body, MESSAGE_FIELDS)) is not None:
            return refused
        model = str(body["model"])
        stream = body.get("stream") is True
        if model in FAILURES:
            status, error_type, message, headers = FAILURES[model]
            return _error(status, error_type, message, dict(headers))
        if model == "stall-first-byte":
            await self.sleep(STALL_SECONDS)
        if not stream and model == "reset-mid":
            reset(request)
            return web.Response()
        if not stream and model == "malformed":
            return web.Response(body=b"{not json", content_type="application/json")
        answer = _Answer(body)
        if not stream:
            return _json(answer.message())
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "request-id": _request_id(),
            }
        )
        await response.prepare(request)
        if model == "error-first":
            await _send(response, "error", _error_body("overloaded_error", "Overloaded"))
            await response.write_eof()
            return response
        for index, (kind, data) in enumerate(answer.events()):
            if model == "slow-stream" and kind == "content_block_delta":
                await asyncio.sleep(0.1)
            if index == BREAK_AT.get(model):
                await self._break(model, request, response)
                return response
            await _send(response, kind, data)
        await response.write_eof()
        return response

    async def _break(self, model: str, request: web.Request, response: web.StreamResponse) -> None:
        if model == "reset-mid":
            await asyncio.sleep(0.1)  # let the client read what was sent
            reset(request)
            return
        if model == "stall-mid":
            await self.sleep(STALL_SECONDS)
        elif model == "malformed":
            await response.write(b"event: content_block_delta\ndata: {not json\n\n")
        elif model == "error-mid":
            await _send(response, "error", _error_body("overloaded_error", "Overloaded mid-stream"))
        await response.write_eof()


class _Answer:
    """The reply to one Messages request, as a whole body or as stream events."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.model = str(body["model"])
        messages = body["messages"]
        last = messages[-1]
        results = [b for b in _blocks(last) if b.get("type") == "tool_result"]
        tools = body.get("tools") or []
        calls = 2 if self.model == "tool-use-2" else 1
        self.stop_sequence: str | None = None
        self.blocks: list[dict[str, Any]] = []
        thinking = body.get("thinking")
        users = [_text_of(m) for m in messages if m.get("role") == "user"]
        user_text = next((text for text in reversed(users) if text), "")
        if isinstance(thinking, dict) and thinking.get("type") != "disabled":
            self.blocks.append(
                {"type": "thinking", "thinking": f"pondering: {user_text}", "signature": "c2ln"}
            )
        if self.model.startswith("tool-use") and results:
            self.blocks.append({"type": "text", "text": f"tool said: {_result_text(results[0])}"})
            self.stop_reason = "end_turn"
        elif self.model.startswith("tool-use") and tools:
            self.blocks.append({"type": "text", "text": "Let me check."})
            for n in range(calls):
                self.blocks.append(
                    {
                        "type": "tool_use",
                        "id": f"toolu_fake_{n + 1}",
                        "name": tools[0]["name"],
                        "input": {"city": TOOL_CITIES[n]},
                    }
                )
            self.stop_reason = "tool_use"
        else:
            self.blocks.append({"type": "text", "text": f"echo: {user_text}"})
            self.stop_reason = (
                self.model.removeprefix("stop-") if self.model.startswith("stop-") else "end_turn"
            )
            if self.stop_reason == "stop_sequence":
                self.stop_sequence = (body.get("stop_sequences") or ["\n\nHuman:"])[0]
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        self.id = f"msg_{digest[:24]}"
        thought = sum(len(b["thinking"].split()) for b in self.blocks if b["type"] == "thinking")
        self.output_tokens = thought + sum(
            5 if b["type"] == "tool_use" else len(b.get("text", "").split()) for b in self.blocks
        )
        self.usage: dict[str, Any] = {
            "input_tokens": _prompt_words(body),
            "cache_creation_input_tokens": CACHE_WRITE,
            "cache_read_input_tokens": CACHE_READ,
            "output_tokens": self.output_tokens,
            "service_tier": "standard",
        }
        if thought:
            self.usage["output_tokens_details"] = {"thinking_tokens": thought}

    def message(self, *, started: bool = False) -> dict[str, Any]:
        """The whole answer; when ``started``, the ``message_start`` form of it."""
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [] if started else self.blocks,
            "stop_reason": None if started else self.stop_reason,
            "stop_sequence": None if started else self.stop_sequence,
            "usage": {**self.usage, "output_tokens": 1} if started else self.usage,
        }

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event type, data) of the whole stream, in Anthropic's order."""
        yield "message_start", {"type": "message_start", "message": self.message(started=True)}
        pieces = 5 if self.model == "slow-stream" else 3
        for index, block in enumerate(self.blocks):
            kind = block["type"]
            start: dict[str, Any]
            deltas: list[dict[str, Any]]
            if kind == "text":
                start = {"type": "text", "text": ""}
                deltas = [
                    {"type": "text_delta", "text": piece} for piece in _split(block["text"], pieces)
                ]
            elif kind == "thinking":
                start = {"type": "thinking", "thinking": "", "signature": ""}
                deltas = [
                    {"type": "thinking_delta", "thinking": piece}
                    for piece in _split(block["thinking"], 2)
                ]
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
            else:
                start = {**block, "input": {}}
                text = orjson.dumps(block["input"]).decode()
                fragments = ["", text[: len(text) // 2], text[len(text) // 2 :]]
                deltas = [{"type": "input_json_delta", "partial_json": f} for f in fragments]
            yield (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": start,
                },
            )
            if index == 0:
                yield "ping", {"type": "ping"}
            for delta in deltas:
                yield (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": delta,
                    },
                )
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
        yield (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
                "usage": {
                    key: self.usage[key]
                    for key in ("output_tokens", "output_tokens_details")
                    if key in self.usage
                },
            },
        )
        yield "message_stop", {"type": "message_stop"}


# -- validation, as Anthropic refuses bodies -----------------------------------------------


def _refusal(body: dict[str, Any], allowed: frozenset[str]) -> web.Response | None:
    """The 400 Anthropic would answer ``body`` with, if any."""
    try:
        _check(body, allowed)
    except BadRequest as exc:
        return _error(400, "invalid_request_error", str(exc))
    except (AttributeError, KeyError, TypeError):
        return _error(400, "invalid_request_error", "body: Input does not match the schema")
    return None


def _check(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for key in body:
        if key not in allowed:
            raise BadRequest(f"{key}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("model: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: Field required")
    system = body.get("system")
    if not (system is None or isinstance(system, str)) and (
        not isinstance(system, list) or any(b.get("type") != "text" for b in system)
    ):
        raise BadRequest("system: Input should be a valid string or list of text blocks")
    for tool in body.get("tools") or ():
        if not isinstance(tool.get("name"), str) or "input_schema" not in tool:
            raise BadRequest("tools.0.custom.input_schema: Field required")
    choice = body.get("tool_choice")
    if choice is not None and choice.get("type") not in ("auto", "any", "tool", "none"):
        raise BadRequest("tool_choice: Input tag does not match any of the expected tags")
    pending: set[str] = set()  # tool_use ids the next turn must answer
    for n, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages.{n}.role: Input should be 'user' or 'assistant'")
        blocks = _blocks(message)
        for block in blocks:
            _check_block(block, n)
        answered = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
        if pending - answered:
            raise BadRequest(
                "messages: `tool_use` ids were found without `tool_result` blocks immediately "
                f"after: {', '.join(sorted(pending - answered))}"
            )
        if answered - pending:
            raise BadRequest(
                f"messages.{n}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{', '.join(sorted(str(a) for a in answered - pending))}"
            )
        pending = {b["id"] for b in blocks if b.get("type") == "tool_use" and role == "assistant"}


def _check_block(block: Any, n: int) -> None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        if not isinstance(block.get("text"), str) or not block["text"]:
            raise BadRequest(f"messages.{n}: text content blocks must be non-empty")
    elif kind == "image":
        source = block.get("source") or {}
        if source.get("type") == "base64":
            if source.get("media_type") not in IMAGE_TYPES or not source.get("data"):
                raise BadRequest(f"messages.{n}.content.image.source.base64: invalid image")
        elif source.get("type") != "url" or not str(source.get("url", "")).startswith("http"):
            raise BadRequest(f"messages.{n}.content.image.source: invalid source")
    elif kind == "tool_use":
        if not isinstance(block.get("input"), dict) or not block.get("id"):
            raise BadRequest(f"messages.{n}.content.tool_use.input: Input should be an object")
    elif kind not in ("tool_result", "thinking", "redacted_thinking", "document"):
        raise BadRequest(f"messages.{n}.content: Input tag {kind!r} is not a known block type")


def _blocks(message: dict[str, Any]) -> list[Any]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def _text_of(message: dict[str, Any]) -> str:
    return " ".join(b["text"] for b in _blocks(message) if b.get("type") == "text" and "text" in b)


def _result_text(block: dict[str, Any]) -> str:
    content = block.get("content", "")
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) for b in content if b.get("type") == "text")
    return str(content)


def _prompt_words(body: dict[str, Any]) -> int:
    system = body.get("system") or ""
    if isinstance(system, list):
        system = " ".join(str(b.get("text", "")) for b in system)
    words = len(system.split())
    for message in body["messages"]:
        for block in _blocks(message):
            if block.get("type") == "text":
                words += len(str(block.get("text", "")).split())
            elif block.get("type") == "tool_result":
                words += len(_result_text(block).split())
    return words


# -- wire helpers ----------------------------------------------------------------------


def _split(text: str, pieces: int) -> list[str]:
    size, extra = divmod(len(text), pieces)
    out, start = [], 0
    for index in range(pieces):
        end = start + size + (1 if index < extra else 0)
        out.append(text[start:end])
        start = end
    return [piece for piece in out if piece]


async def _send(response: web.StreamResponse, kind: str, data: dict[str, Any]) -> None:
    await response.write(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")


def _request_id() -> str:
    return "req_fake_0123456789"


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/json",
        headers={"request-id": _request_id()},
    )


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": _request_id(),
    }


def _error(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    response = _json(_error_body(error_type, message), status)
    response.headers.update(headers or {})
    return response


class FakeAnthropic(FakeServer[_Upstream]):
    """The fake on a real port, in a background thread with its own event loop."""

    api_root = ""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_page_size: int = 1000,
    ):
        super().__init__(_Upstream(api_key, record=True, max_page_size=max_page_size), host, port)


def main(argv: list[str] | None = None) -> None:
    serve_main(
        lambda: _Upstream(api_key=None, record=False, max_page_size=1000),
        "Fake Anthropic Messages upstream.",
        argv,
    )


if __name__ == "__main__":
    main()
