"""A fake Ollama server: a real aiohttp server speaking Ollama's native API over real HTTP.

Written from Ollama's public API reference (docs.ollama.com/api: chat, embed, tags,
errors). ``FakeOllama`` runs it on 127.0.0.1 in a background thread with its own event loop
(a context manager; ``base_url`` is the server root, like ``http://127.0.0.1:11434``;
``received`` lists every request it got). ``python -m tests.fakes.ollama_upstream --port
0`` runs it as a process that records nothing: stdout's first line is ``PORT <n>``, then it
serves until killed.

Routes: ``POST /api/chat`` (NDJSON stream, ``application/x-ndjson``, unless ``"stream":
false``), ``POST /api/embed``, ``GET /api/tags``. Like Ollama, images must be bare base64
(a ``data:`` prefix is a 400) and an empty ``messages`` list only loads the model
(``done_reason: "load"``). With ``api_key`` set it acts as an authenticating reverse proxy:
a wrong ``Authorization: Bearer`` gets a 401 whose message names the key it got.

Behaviour is chosen by the requested model name, so it works across processes:

- any other name: ``"echo: <last user text>"`` streamed as 4 content lines then the
  ``done`` line; ``prompt_eval_count`` counts the words of every message, ``eval_count``
  those of the reply. ``options.num_predict`` cuts the reply to that many words, ending
  with ``done_reason: "length"``. With ``"think": true`` two ``thinking`` lines
  (``"thinking about: <text>"``) come first.
- ``tool-call``: with tools, one call of the first tool with ``{"city": "Paris"}``; after a
  ``tool`` message, ``"tool said: <content> (from <tool_name>)"``. ``two-tools``: a call
  of each of the first two tools, one per line.
- ``missing-model``: 404 "model 'missing-model' not found, try pulling it first";
  ``fail-400``: 400; ``fail-context``: 400 about the context length; ``fail-401``,
  ``fail-403``: a proxy's refusals; ``fail-429``: 429 with ``Retry-After: 2``;
  ``fail-500``: 500; ``fail-503``: 503 "server busy" (Ollama's full queue).
- ``stall-first-byte``: 30 s before the headers; ``stall-mid``: 2 lines, then 30 s;
  ``reset-mid``: 2 lines, then a TCP reset; ``eof-mid``: 2 lines, then a clean end
  without the ``done`` line; ``error-mid``: 2 lines, then ``{"error": ...}``;
  ``error-first``: a 200 stream whose first line is ``{"error": ...}``; ``malformed``: 1
  line, then a line that is not JSON; ``ragged``: the normal stream cut at awkward places
  (lines split across writes, several per write, blank lines, CRLF, no final newline);
  ``slow-stream``: 5 content lines 100 ms apart.

Stalls are cancelled on ``stop()``, so they never hold up shutdown. ``created_at`` is fixed
(``CREATED_AT``), so answers are deterministic.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import threading
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.runner import FakeServer, reset, serve_main

STALL_SECONDS = 30.0
# Ollama reports times in RFC 3339 with nanoseconds.
CREATED_AT = "2024-07-22T20:33:28.123456789Z"
CREATED = 1_721_680_408
NDJSON = "application/x-ndjson"
MODELS = ("llama3.2:latest", "qwen3:8b", "nomic-embed-text:latest")
# model -> (status, message, extra headers)
FAILURES = MappingProxyType(
    {
        "missing-model": (404, "model 'missing-model' not found, try pulling it first", ()),
        "fail-400": (400, "invalid options: num_ctx must be a number", ()),
        "fail-context": (400, "the input length exceeds the context length", ()),
        "fail-401": (401, "unauthorized", ()),
        "fail-403": (403, "forbidden: this key may not use the server", ()),
        "fail-429": (429, "too many requests", (("Retry-After", "2"),)),
        "fail-500": (500, "llama runner process has terminated: exit status 2", ()),
        "fail-503": (503, "server busy, please try again.  maximum pending requests exceeded", ()),
    }
)
MID_STREAM_ERROR = "an error was encountered while running the model"
# model -> index of the stream line sent in place of the rest of the answer
BREAK_AT = MappingProxyType(
    {"stall-mid": 2, "reset-mid": 2, "eof-mid": 2, "error-mid": 2, "malformed": 1, "error-first": 0}
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
        self.tasks: set[asyncio.Task[Any]] = set()
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/embed", self.embed)
        app.router.add_get("/api/tags", self.tags)
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
        # Like some proxies, name the key it got: the adapter must scrub it from errors.
        return _error(401, f"invalid key {given.removeprefix('Bearer ')!r}")

    async def tags(self, request: web.Request) -> web.Response:
        if (denied := self._note(request, None)) is not None:
            return denied
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": "2025-10-03T23:34:03.409490317-07:00",
                "size": 3338801804,
                "digest": hashlib.sha256(name.encode()).hexdigest(),
                "details": {"format": "gguf", "family": name.split(":")[0]},
            }
            for name in MODELS
        ]
        return _json({"models": models})

    async def embed(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if (denied := self._note(request, body)) is not None:
            return denied
        model = str(body.get("model", ""))
        if model in FAILURES:
            return _failure(model)
        inputs = body.get("input", [])
        if isinstance(inputs, str):
            inputs = [inputs]
        dimensions = int(body.get("dimensions") or 8)
        return _json(
            {
                "model": model,
                "embeddings": [_vector(str(item), dimensions) for item in inputs],
                "total_duration": 14143917,
                "load_duration": 1019500,
                "prompt_eval_count": sum(len(str(item).split()) for item in inputs),
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if (denied := self._note(request, body)) is not None:
            return denied
        model = str(body.get("model", ""))
        stream = body.get("stream", True) is not False
        if model in FAILURES:
            return _failure(model)
        if (bad := _bad_images(body)) is not None:
            return bad
        if model == "stall-first-byte":
            await self.sleep(STALL_SECONDS)
        if not stream and model == "reset-mid":
            reset(request)
            return web.Response()
        if not stream and model == "malformed":
            return web.Response(body=b"{not json", content_type="application/json")
        answer = _Answer(body)
        if not stream:
            return _json(answer.whole())
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        await response.prepare(request)
        lines = [orjson.dumps(line) + b"\n" for line in answer.lines()]
        if model == "ragged":
            for piece in _ragged(b"".join(lines)):
                await response.write(piece)
                await asyncio.sleep(0.01)
            await response.write_eof()
            return response
        for index, line in enumerate(lines):
            if model == "slow-stream" and index:
                await asyncio.sleep(0.1)
            if index == BREAK_AT.get(model):
                await self._break(model, request, response)
                return response
            await response.write(line)
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
            await response.write(b"{not json\n")
        elif model in ("error-mid", "error-first"):
            await response.write(orjson.dumps({"error": MID_STREAM_ERROR}) + b"\n")
        await response.write_eof()


class _Answer:
    """The reply to one chat request, as one whole object or as stream lines."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.model = str(body.get("model", ""))
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        tools = body.get("tools") or []
        wants_tools = self.model in ("tool-call", "two-tools") and last.get("role") != "tool"
        self.calls = [_call(tool) for tool in tools[: 2 if self.model == "two-tools" else 1]]
        if not wants_tools:
            self.calls = []
        self.thinking = ""
        self.load = not messages
        if self.model in ("tool-call", "two-tools") and last.get("role") == "tool":
            self.text = f"tool said: {last.get('content')} (from {last.get('tool_name')})"
        else:
            users = [m for m in messages if m.get("role") == "user"]
            said = str(users[-1].get("content", "")) if users else ""
            self.text = "" if self.load or self.calls else f"echo: {said}"
            if body.get("think") is True and not self.load:
                self.thinking = f"thinking about: {said}"
        self.reason = "load" if self.load else "stop"
        limit = (body.get("options") or {}).get("num_predict")
        words = self.text.split(" ")
        if isinstance(limit, int) and 0 <= limit < len(words):
            self.text = " ".join(words[:limit])
            self.reason = "length"
        self.prompt = sum(len(str(m.get("content", "")).split()) for m in messages)
        self.completion = 5 * len(self.calls) + len(self.text.split())

    def _line(self, message: dict[str, Any] | None, done: bool) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model, "created_at": CREATED_AT}
        if message is not None:
            line["message"] = {"role": "assistant", **message}
        line["done"] = done
        return line

    def _done(self, message: dict[str, Any]) -> dict[str, Any]:
        line = self._line(message, True)
        line["done_reason"] = self.reason
        if not self.load:
            line.update(
                total_duration=885095291,
                load_duration=3753500,
                prompt_eval_count=self.prompt,
                prompt_eval_duration=328493000,
                eval_count=self.completion,
                eval_duration=552222000,
            )
        return line

    def whole(self) -> dict[str, Any]:
        message: dict[str, Any] = {"content": self.text}
        if self.thinking:
            message["thinking"] = self.thinking
        if self.calls:
            message["tool_calls"] = self.calls
        return self._done(message)

    def lines(self) -> Iterator[dict[str, Any]]:
        """Thinking lines, content (or tool-call) lines, then the ``done`` line."""
        for piece in _split(self.thinking, 2) if self.thinking else ():
            yield self._line({"content": "", "thinking": piece}, False)
        if self.calls:
            for call in self.calls:
                yield self._line({"content": "", "tool_calls": [call]}, False)
        elif self.text:
            for piece in _split(self.text, 5 if self.model == "slow-stream" else 4):
                yield self._line({"content": piece}, False)
        yield self._done({"content": ""})


def _call(tool: Any) -> dict[str, Any]:
    name = tool.get("function", {}).get("name", "?") if isinstance(tool, dict) else "?"
    return {"function": {"name": name, "arguments": {"city": "Paris"}}}


def _bad_images(body: dict[str, Any]) -> web.Response | None:
    """Ollama decodes each image as bare base64: a data URL or a link is a 400."""
    for message in body.get("messages") or []:
        for image in message.get("images") or []:
            try:
                base64.b64decode(str(image), validate=True)
            except (binascii.Error, ValueError):
                return _error(400, "illegal base64 data at input byte 4")
    return None


def _ragged(data: bytes) -> Iterator[bytes]:
    """The stream with blank lines and CRLFs added, cut at awkward places, and no final
    newline."""
    lines = data.rstrip(b"\n").split(b"\n")
    text = b"\n".join([lines[0], b"", *(line + b"\r" for line in lines[1:-1]), b"  "])
    text += b"\n" + lines[-1]
    half = len(text) // 2
    cuts = sorted({0, 3, 4, 40, half, half + 1, len(text) - 5, len(text)})
    for start, end in itertools.pairwise(cuts):
        yield text[start:end]


def _split(text: str, pieces: int) -> list[str]:
    size, extra = divmod(len(text), pieces)
    out, start = [], 0
    for index in range(pieces):
        end = start + size + (1 if index < extra else 0)
        out.append(text[start:end])
        start = end
    return [piece for piece in out if piece]


def _vector(text: str, dimensions: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    # Values exact in float32, so a base64 round trip can be compared exactly.
    return [(digest[i % len(digest)] - 128) / 64 for i in range(dimensions)]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _failure(model: str) -> web.Response:
    status, message, headers = FAILURES[model]
    response = _error(status, message)
    response.headers.update(dict(headers))
    return response


class FakeOllama(FakeServer[_Upstream]):
    """The fake on a real port, in a background thread with its own event loop."""

    api_root = ""

    def __init__(self, *, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0):
        super().__init__(_Upstream(api_key, record=True), host, port)


def main(argv: list[str] | None = None) -> None:
    serve_main(
        lambda: _Upstream(api_key=None, record=False), "Fake Ollama server (native API).", argv
    )


if __name__ == "__main__":
    main()
