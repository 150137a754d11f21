"""A fake OpenAI-compatible upstream: a real aiohttp server speaking real HTTP and SSE.

``FakeOpenAI`` runs it on 127.0.0.1 in a background thread with its own event loop (a
context manager; ``base_url`` ends in ``/v1``; ``received`` lists every request it got).
``python -m tests.fakes.openai_upstream --port 0`` runs it as a process that records
nothing (so a benchmark cannot grow it): stdout's first line is ``PORT <n>``, then it
serves until killed.

Behaviour is chosen by the requested model name, so it works across processes:

- any other name: ``"echo: <last user text>"`` (streamed as 4 content deltas, the first
  carrying the role); usage counts words (prompt: all messages, completion: the reply);
- ``tool-call``: one ``get_weather {"city": "Paris"}`` call (arguments streamed in two
  fragments); after a ``tool`` message, ``"tool said: <its content>"``;
  ``tool-call-garbled``: the same call with arguments cut short (not a JSON object);
- ``fail-400|401|408|429|500|503``: that status with an OpenAI error body (429:
  Retry-After 1); ``redirect``: a 307 to another address, as a moved server answers;
- ``refuse``: a refusal (``refusal`` in place of ``content``, finish ``stop``), as OpenAI
  answers what it will not do; streamed in two ``refusal`` deltas;
- ``usage-huge``: the usual answer with counts no model could have (2**63 - 1 prompt
  tokens, -1 completion tokens);
- ``flaky-<N>``: 500 for the first N requests of each ``user``, then a normal answer;
- ``stall-first-byte``: 30 s before the headers; ``stall-mid``: 2 content chunks, then
  30 s; ``reset-mid``: 2 content chunks, then a TCP reset; ``malformed``: one chunk, then
  ``data: {not json``; ``eof-mid``: 2 chunks, then a clean end without finish or [DONE];
  ``slow-stream``: 5 chunks 100 ms apart; ``bench``: a tiny fixed answer, fastest path;
  ``error-mid``: 2 chunks, then an ``{"error": ...}`` frame; ``no-done``: a whole stream
  without the closing ``data: [DONE]``.

Embeddings are derived from the text (equal texts, equal vectors) with 8 dimensions, or N
for a model named ``embed-<N>``, or ``dimensions`` when the request gives it; a request
with an input containing ``REFUSE_EMBEDDING`` is refused (400), whatever the model, and
one containing ``STALL_EMBEDDING`` waits 30 s before its headers (an embedder busy on a
batch); ``stall-first-byte`` and ``fail-<status>`` behave as for chat.

Stalls are cancelled on ``stop()``, so they never hold up shutdown. Answers are
deterministic (ids hash the request, ``created`` is fixed): a test can compare the bytes
an adapter passes through with what the fake sends for the same body.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from array import array
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.runner import FakeServer, reset, serve_main

STALL_SECONDS = 30.0
# An embeddings input containing this is refused with a 400 (an input the model rejects).
REFUSE_EMBEDDING = "REFUSE_EMBEDDING"
# An embeddings input containing this is answered after STALL_SECONDS.
STALL_EMBEDDING = "STALL_EMBEDDING"
CREATED = 1_700_000_000
MODELS = ("gpt-4o-mini", "tool-call", "text-embedding-3-small", "bench")
# status -> (type, code, message, extra headers)
FAILURES = MappingProxyType(
    {
        400: ("invalid_request_error", "invalid_value", "Invalid value for 'messages'.", ()),
        401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided.", ()),
        408: ("timeout", None, "Request timed out.", ()),
        429: (
            "rate_limit_error",
            "rate_limit_exceeded",
            "Rate limit reached for requests.",
            (("Retry-After", "1"),),
        ),
        500: ("server_error", None, "The server had an error processing your request.", ()),
        503: ("server_error", None, "The engine is currently overloaded.", ()),
    }
)
REFUSAL = "I'm sorry, I can't help with that."
TOOL_ARGUMENTS = ('{"city": ', '"Paris"}')
GARBLED_ARGUMENTS = ('{"city": ', '"Par')
# model -> index of the stream frame sent in place of the rest of the answer
BREAK_AT = MappingProxyType(
    {"stall-mid": 2, "reset-mid": 2, "eof-mid": 2, "error-mid": 2, "malformed": 1}
)
Received = tuple[str, dict[str, str], Any]


class _Upstream:
    """The server's state and handlers; one per fake, used from its event loop only."""

    def __init__(self, api_key: str | None, record: bool) -> None:
        self.api_key = api_key
        self.record = record
        # ``received`` is read from the test's thread while the loop thread appends.
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.flaky: dict[tuple[str, str | None], int] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.runner: web.AppRunner | None = None
        # Streams whose client (parley) hung up before the answer was complete.
        self.abandoned = 0

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
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

    def _note(self, request: web.Request, body: Any) -> web.Response | None:
        """Record the request; the 401 to send when the key is wrong."""
        if self.record:
            with self.lock:
                self.received.append((request.path, dict(request.headers), body))
        if self.api_key is None:
            return None
        given = request.headers.get("Authorization", "")
        if given == f"Bearer {self.api_key}":
            return None
        # Like OpenAI, name the key it got: the adapter must scrub it from its errors.
        return _error(401, f"Incorrect API key provided: {given.removeprefix('Bearer ')}.")

    async def models(self, request: web.Request) -> web.Response:
        if (denied := self._note(request, None)) is not None:
            return denied
        data = [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "fake"} for m in MODELS
        ]
        return _json({"object": "list", "data": data})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if (denied := self._note(request, body)) is not None:
            return denied
        model = str(body.get("model", ""))
        if model.startswith("fail-"):
            return _error(int(model.removeprefix("fail-")))
        if model == "stall-first-byte":
            await self.sleep(STALL_SECONDS)
        inputs = body.get("input", [])
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if any(REFUSE_EMBEDDING in str(item) for item in inputs):
            return _error(400, "Invalid value for 'input': the text cannot be embedded.")
        if any(STALL_EMBEDDING in str(item) for item in inputs):
            await self.sleep(STALL_SECONDS)
        sized = model.removeprefix("embed-")
        dimensions = int(body.get("dimensions") or (sized if sized.isdigit() else 8))
        vectors: list[Any] = [_vector(str(item), dimensions) for item in inputs]
        if body.get("encoding_format") == "base64":  # the openai SDK's default
            vectors = [base64.b64encode(array("f", v).tobytes()).decode() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        words = sum(len(str(item).split()) for item in inputs)
        return _json(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        model = str(body.get("model", ""))
        stream = bool(body.get("stream"))
        usage_wanted = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        if model == "bench":
            return await _bench(request, stream, usage_wanted)
        if (denied := self._note(request, body)) is not None:
            return denied
        if model.startswith("fail-"):
            return _error(int(model.removeprefix("fail-")))
        if model == "redirect":
            return web.Response(status=307, headers={"Location": "http://127.0.0.1:9/v1"})
        if model.startswith("flaky-"):
            key = (model, body.get("user"))
            seen = self.flaky.get(key, 0)
            self.flaky[key] = seen + 1
            if seen < int(model.removeprefix("flaky-")):
                return _error(500)
        if model == "stall-first-byte":
            await self.sleep(STALL_SECONDS)
        if not stream and model == "reset-mid":
            reset(request)
            return web.Response()
        if not stream and model == "malformed":
            return web.Response(body=b"{not json", content_type="application/json")
        answer = _Answer(body)
        if not stream:
            return _json(answer.completion())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for index, frame in enumerate(answer.frames(5 if model == "slow-stream" else 4)):
                if model == "slow-stream" and index:
                    await asyncio.sleep(0.1)
                if index == BREAK_AT.get(model):
                    await self._break(model, request, response)
                    return response
                await response.write(b"data: " + orjson.dumps(frame) + b"\n\n")
        except (ConnectionError, asyncio.CancelledError):
            self.abandoned += 1
            raise
        if usage_wanted:
            await response.write(b"data: " + orjson.dumps(answer.usage_frame()) + b"\n\n")
        if model != "no-done":
            await response.write(b"data: [DONE]\n\n")
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
            await response.write(b"data: {not json\n\n")
        elif model == "error-mid":
            error = {"message": "The engine overloaded mid-stream.", "type": "server_error"}
            await response.write(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
        await response.write_eof()


class _Answer:
    """The reply to one chat request, as a whole body or as stream frames."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.model = str(body.get("model", ""))
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        tools = ("tool-call", "tool-call-garbled")
        self.tool_call = self.model in tools and last.get("role") != "tool"
        self.arguments = GARBLED_ARGUMENTS if self.model == "tool-call-garbled" else TOOL_ARGUMENTS
        self.refusal = self.model == "refuse"
        if self.refusal:
            self.text = REFUSAL
        elif self.model == "tool-call" and not self.tool_call:
            self.text = f"tool said: {_text(last)}"
        else:
            users = [m for m in messages if m.get("role") == "user"]
            self.text = f"echo: {_text(users[-1]) if users else ''}"
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        self.id = f"chatcmpl-{digest[:24]}"
        prompt = sum(len(_text(m).split()) for m in messages)
        completion = 5 if self.tool_call else len(self.text.split())
        self.usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        if self.model == "usage-huge":
            self.usage.update(prompt_tokens=2**63 - 1, completion_tokens=-1, total_tokens=None)

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": CREATED, "model": self.model}

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.refusal:
            message = {"role": "assistant", "content": None, "refusal": self.text}
        if self.tool_call:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_fake_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "".join(self.arguments)},
                    }
                ],
            }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": "tool_calls" if self.tool_call else "stop",
        }
        return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage}

    def frames(self, pieces: int) -> Iterator[dict[str, Any]]:
        """Content frames (``pieces`` of them for text), then the finish frame."""
        if self.tool_call:
            deltas: list[dict[str, Any]] = [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_fake_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ],
                }
            ]
            deltas += [
                {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
                for fragment in self.arguments
            ]
        elif self.refusal:
            deltas = [{"refusal": piece} for piece in _split(self.text, 2)]
            deltas[0] = {"role": "assistant", "content": None, **deltas[0]}
        else:
            deltas = [{"content": piece} for piece in _split(self.text, pieces)]
            deltas[0] = {"role": "assistant", **deltas[0]}
        for delta in deltas:
            yield {
                **self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
        reason = "tool_calls" if self.tool_call else "stop"
        yield {
            **self._head("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": {}, "finish_reason": reason}],
        }

    def usage_frame(self) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage}


async def _bench(request: web.Request, stream: bool, usage_wanted: bool) -> web.StreamResponse:
    head = (
        b'{"id":"chatcmpl-bench","object":"chat.completion%s","created":1700000000,'
        b'"model":"bench","choices":'
    )
    usage = b'{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}'
    if not stream:
        return web.Response(
            body=head % b"" + b'[{"index":0,"message":{"role":"assistant","content":"ok"},'
            b'"finish_reason":"stop"}],"usage":' + usage + b"}",
            content_type="application/json",
        )
    chunk = head % b".chunk"
    frames = [
        chunk + b'[{"index":0,"delta":{"role":"assistant","content":"ok"},"finish_reason":null}]}',
        chunk + b'[{"index":0,"delta":{},"finish_reason":"stop"}]}',
    ]
    if usage_wanted:
        frames.append(chunk + b'[],"usage":' + usage + b"}")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"".join(b"data: " + f + b"\n\n" for f in frames) + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return content if isinstance(content, str) else ""


def _split(text: str, pieces: int) -> list[str]:
    size, extra = divmod(len(text), pieces)
    out, start = [], 0
    for index in range(pieces):
        end = start + size + (1 if index < extra else 0)
        out.append(text[start:end])
        start = end
    return out


def _vector(text: str, dimensions: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [digest[i % len(digest)] / 127.5 - 1.0 for i in range(dimensions)]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, message: str | None = None) -> web.Response:
    error_type, code, default, headers = FAILURES[status]
    error = {"message": message or default, "type": error_type, "param": None, "code": code}
    response = _json({"error": error}, status)
    response.headers.update(dict(headers))
    return response


class FakeOpenAI(FakeServer[_Upstream]):
    """The fake on a real port, in a background thread with its own event loop."""

    api_root = "/v1"

    def __init__(self, *, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0):
        super().__init__(_Upstream(api_key, record=True), host, port)

    @property
    def abandoned(self) -> int:
        """How many streams the client hung up on before they were complete."""
        return self._upstream.abandoned


def main(argv: list[str] | None = None) -> None:
    serve_main(
        lambda: _Upstream(api_key=None, record=False), "Fake OpenAI-compatible upstream.", argv
    )


if __name__ == "__main__":
    main()
