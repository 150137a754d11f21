"""A fake Gemini API upstream: a real aiohttp server speaking Gemini's REST and SSE.

Written from Google's public API reference (ai.google.dev/api): ``POST
/v1beta/models/{model}:generateContent``, ``:streamGenerateContent?alt=sse`` (data-only SSE
frames separated by ``\\r\\n\\r\\n``, each a ``GenerateContentResponse``; the stream ends
with the body, there is no ``[DONE]``), ``:embedContent``, ``:batchEmbedContents``,
``:countTokens`` and ``GET /v1beta/models`` (at most 2 models a page, ``nextPageToken``).

``FakeGemini`` runs it on 127.0.0.1 in a background thread (a context manager; ``base_url``
ends in ``/v1beta``; ``received`` lists (path with query, headers, JSON body) of every
request). ``python -m tests.fakes.gemini_upstream --port 0`` runs it as a process: stdout's
first line is ``PORT <n>``, then it serves until killed.

With ``api_key`` set, the ``x-goog-api-key`` header must match: a missing key is a 403, a
wrong one a 400 ``API_KEY_INVALID`` whose message echoes the key (the adapter must scrub
it). Like Google, the fake refuses with a 400 what Gemini refuses: roles other than
``user``/``model``, empty parts, a ``toolConfig`` without tools, schema keys outside its
OpenAPI subset, an OBJECT parameter schema without properties, for ``gemini-3*``
models a replayed ``functionCall`` turn without a ``thoughtSignature``, and in
``thinkingConfig``: both ``thinkingBudget`` and ``thinkingLevel``, ``thinkingLevel`` for a
model before Gemini 3, level ``minimal`` for a Gemini 3 Pro, budget 0 for a Pro model
(it cannot stop thinking).

Behaviour is chosen by the model name:

- any other name: ``"echo: <last user text>"`` (streamed in 3 frames, ``usageMetadata``
  on every frame, finishReason on the last), one candidate per ``candidateCount``;
- ``tool-call`` / ``tool-call-2``: with tools declared (and mode not NONE), one / two
  ``functionCall`` parts (``{"city": "Paris"}``, then ``"London"``); after a
  ``functionResponse``, ``"tool said: <its response as JSON>"``;
- ``thinking``: usage with thoughts and cached tokens; with ``includeThoughts`` (and only
  then, as Gemini), a ``thought`` part before the echo;
- ``finish-<REASON>``: the echo ending with that finishReason;
- ``blocked-prompt``: ``promptFeedback.blockReason`` SAFETY and no candidates;
  ``safety-first``: one candidate finishing SAFETY with no content; ``safety-mid``: some
  text, then finishReason SAFETY;
- ``fail-400|context|401|403|404|429|429-header|500|503|504``: that error (429: a
  ``RetryInfo`` of 12 s; 429-header: ``Retry-After: 2`` instead);
- ``stall-first-byte``: 30 s before the headers; ``stall-mid``: 2 frames, then 30 s;
  ``reset-mid``: 2 frames, then a TCP reset; ``eof-mid``: 2 frames, then the end of the
  body before any finishReason; ``error-mid``: 2 frames, then an ``{"error": ...}`` frame;
  ``malformed``: 1 frame, then ``data: {not json`` (a whole body that is not JSON).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.runner import FakeServer, reset, serve_main

STALL_SECONDS = 30.0
PAGE_SIZE = 2
MODELS = (
    "gemini-2.0-flash",
    "gemini-2.5-pro",
    "gemini-3-pro-preview",
    "text-embedding-004",
    "gemini-embedding-001",
)
SCHEMA_KEYS = frozenset(
    {
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "default",
        "example",
        "required",
        "propertyOrdering",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minProperties",
        "maxProperties",
        "minimum",
        "maximum",
        "pattern",
        "properties",
        "items",
        "anyOf",
    }
)
RETRY_INFO = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"}
QUOTA_FAILURE = {
    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
    "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content"}],
}
# model -> (HTTP status, rpc status, message, details, headers)
FAILURES = MappingProxyType(
    {
        "fail-400": (400, "INVALID_ARGUMENT", "Invalid value at 'contents'.", (), ()),
        "fail-context": (
            400,
            "INVALID_ARGUMENT",
            "The input token count (1200000) exceeds the maximum number of tokens allowed "
            "(1048576).",
            (),
            (),
        ),
        "fail-401": (
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
            (),
            (),
        ),
        "fail-403": (403, "PERMISSION_DENIED", "The caller does not have permission.", (), ()),
        "fail-404": (
            404,
            "NOT_FOUND",
            "models/fail-404 is not found for API version v1beta.",
            (),
            (),
        ),
        "fail-429": (
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
            (QUOTA_FAILURE, RETRY_INFO),
            (),
        ),
        "fail-429-header": (
            429,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted (e.g. check quota).",
            (),
            (("Retry-After", "2"),),
        ),
        "fail-500": (500, "INTERNAL", "An internal error has occurred.", (), ()),
        "fail-503": (
            503,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
            (),
            (),
        ),
        "fail-504": (
            504,
            "DEADLINE_EXCEEDED",
            "Deadline expired before operation could complete.",
            (),
            (),
        ),
    }
)
# model -> index of the stream frame sent in place of the rest of the answer
BREAK_AT = MappingProxyType(
    {"stall-mid": 2, "reset-mid": 2, "eof-mid": 2, "error-mid": 2, "malformed": 1}
)
SAFETY_RATINGS = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]
Received = tuple[str, dict[str, str], Any]


class _Refused(Exception):
    """A request Gemini would refuse: becomes a 400 INVALID_ARGUMENT."""


class _Upstream:
    """The server's state and handlers; one per fake, used from its event loop only."""

    def __init__(self, api_key: str | None, record: bool) -> None:
        self.api_key = api_key
        self.record = record
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_post("/v1beta/models/{target}", self.post)
        app.router.add_get("/v1beta/models", self.models)
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
        """Record the request; the refusal to send when the key is wrong."""
        if self.record:
            with self.lock:
                self.received.append((request.path_qs, dict(request.headers), body))
        if self.api_key is None:
            return None
        given = request.headers.get("x-goog-api-key")
        if given == self.api_key:
            return None
        if given is None:
            return _error(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers. Please use an API key.",
            )
        info = {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
        }
        # Echo the key, so that the adapter's scrubbing is put to the test.
        message = f"API key not valid: {given}. Please pass a valid API key."
        return _error(400, "INVALID_ARGUMENT", message, [info])

    async def models(self, request: web.Request) -> web.Response:
        if (denied := self._note(request, None)) is not None:
            return denied
        size = min(int(request.query.get("pageSize") or 50), PAGE_SIZE)
        start = int(request.query.get("pageToken", "page-0").removeprefix("page-"))
        page = MODELS[start : start + size]
        body: dict[str, Any] = {
            "models": [{"name": f"models/{m}", "displayName": m.title()} for m in page]
        }
        if start + size < len(MODELS):
            body["nextPageToken"] = f"page-{start + size}"
        return _json(body)

    async def post(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["target"].partition(":")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if (denied := self._note(request, body)) is not None:
            return denied
        if not isinstance(body, dict):
            return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        if model in FAILURES:
            return _error(*FAILURES[model])
        try:
            if action == "embedContent":
                return _json({"embedding": _embedding(body, model)})
            if action == "batchEmbedContents":
                requests = body.get("requests") or []
                return _json({"embeddings": [_embedding(r, model) for r in requests]})
            if action == "countTokens":
                return _json({"totalTokens": _count_tokens(body, model)})
            if action == "generateContent":
                return await self._generate(request, body, model, stream=False)
            if action == "streamGenerateContent":
                return await self._generate(request, body, model, stream=True)
        except _Refused as exc:
            return _error(400, "INVALID_ARGUMENT", str(exc))
        return _error(404, "NOT_FOUND", f"Method {action} not found.")

    async def _generate(
        self, request: web.Request, body: dict[str, Any], model: str, stream: bool
    ) -> web.StreamResponse:
        _validate(body, model)
        if model == "stall-first-byte":
            await self.sleep(STALL_SECONDS)
        if not stream and model == "reset-mid":
            reset(request)
            return web.Response()
        if not stream and model == "malformed":
            return web.Response(body=b"{not json", content_type="application/json")
        answer = _Answer(body, model)
        if not stream or request.query.get("alt") != "sse":
            whole = answer.whole()
            return _json(whole if not stream else [whole])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, frame in enumerate(answer.frames()):
            if index == BREAK_AT.get(model):
                await self._break(model, request, response)
                return response
            await response.write(b"data: " + orjson.dumps(frame) + b"\r\n\r\n")
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
            await response.write(b"data: {not json\r\n\r\n")
        elif model == "error-mid":
            error = {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}
            await response.write(b"data: " + orjson.dumps({"error": error}) + b"\r\n\r\n")
        await response.write_eof()


class _Answer:
    """The reply to one generateContent request, whole or as stream frames."""

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.model = model
        contents = body.get("contents") or []
        last_user = next((c for c in reversed(contents) if c.get("role") == "user"), {})
        responses = [
            p["functionResponse"] for p in last_user.get("parts", []) if "functionResponse" in p
        ]
        declared = [
            d["name"]
            for tool in body.get("tools") or []
            for d in tool.get("functionDeclarations", [])
        ]
        calling = ((body.get("toolConfig") or {}).get("functionCallingConfig")) or {}
        allowed = calling.get("allowedFunctionNames") or declared
        self.calls: list[dict[str, Any]] = []
        asks = model.startswith("tool-call") and not responses
        if asks and declared and calling.get("mode") != "NONE":
            cities = ["Paris", "London"][: 2 if model == "tool-call-2" else 1]
            self.calls = [{"name": allowed[0], "args": {"city": c}} for c in cities]
        if responses:
            said = " ".join(orjson.dumps(r.get("response")).decode() for r in responses)
            self.text = f"tool said: {said}"
        else:
            self.text = "echo: " + " ".join(_texts(last_user))
        config = body.get("generationConfig") or {}
        self.candidates = int(config.get("candidateCount") or 1)
        self.reason = model.removeprefix("finish-") if model.startswith("finish-") else "STOP"
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        self.id = digest[:22]
        system = body.get("systemInstruction") or {}
        self.prompt = sum(len(t.split()) for c in [system, *contents] for t in _texts(c))
        self.thinking = model == "thinking"
        shown = (config.get("thinkingConfig") or {}).get("includeThoughts") is True
        self.thoughts = self.thinking and shown

    def _head(self) -> dict[str, Any]:
        return {"modelVersion": f"{self.model}-001", "responseId": self.id}

    def usage(self, completion: int, final: bool) -> dict[str, Any]:
        usage = {"promptTokenCount": self.prompt, "candidatesTokenCount": completion}
        thoughts = 7 if self.thinking else 0
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
            usage["cachedContentTokenCount"] = 2
        usage["totalTokenCount"] = self.prompt + completion + (thoughts if final else 0)
        return usage

    def _parts(self) -> list[list[dict[str, Any]]]:
        """The answer's parts, grouped by stream frame."""
        if self.calls:
            return [[{"functionCall": call} for call in self.calls]]
        pieces = _split(self.text, 3)
        frames = [[{"text": p}] for p in pieces]
        if self.thoughts:
            frames.insert(0, [{"text": "Let me think.", "thought": True}])
        return frames

    def whole(self) -> dict[str, Any]:
        if self.model == "blocked-prompt":
            return self._blocked()
        if self.model == "safety-first":
            return {
                **self._head(),
                "candidates": [_filtered(0)],
                "usageMetadata": self.usage(0, True),
            }
        parts = [p for frame in self._parts() for p in frame]
        if self.thoughts:
            parts = [parts[0], {"text": self.text}]
        elif not self.calls:
            parts = [{"text": self.text}]
        reason = "SAFETY" if self.model == "safety-mid" else self.reason
        candidates = [
            {"content": {"role": "model", "parts": parts}, "finishReason": reason, "index": i}
            for i in range(self.candidates)
        ]
        return {**self._head(), "candidates": candidates, "usageMetadata": self._final_usage()}

    def _final_usage(self) -> dict[str, Any]:
        return self.usage(5 if self.calls else len(self.text.split()) * self.candidates, True)

    def frames(self) -> list[dict[str, Any]]:
        if self.model == "blocked-prompt":
            return [self._blocked()]
        if self.model == "safety-first":
            return [
                {**self._head(), "candidates": [_filtered(0)], "usageMetadata": self.usage(0, True)}
            ]
        grouped = self._parts()
        out: list[dict[str, Any]] = []
        for number, parts in enumerate(grouped):
            last = number == len(grouped) - 1 and self.model != "safety-mid"
            candidates = []
            for i in range(self.candidates):
                candidate: dict[str, Any] = {
                    "content": {"role": "model", "parts": parts},
                    "index": i,
                }
                if last:
                    candidate["finishReason"] = self.reason
                candidates.append(candidate)
            usage = self._final_usage() if last else self.usage(number + 1, False)
            out.append({**self._head(), "candidates": candidates, "usageMetadata": usage})
        if self.model == "safety-mid":
            out.append(
                {**self._head(), "candidates": [_filtered(0)], "usageMetadata": self._final_usage()}
            )
        return out

    def _blocked(self) -> dict[str, Any]:
        feedback = {"blockReason": "SAFETY", "safetyRatings": SAFETY_RATINGS}
        return {**self._head(), "promptFeedback": feedback, "usageMetadata": self.usage(0, True)}


def _filtered(index: int) -> dict[str, Any]:
    return {"finishReason": "SAFETY", "index": index, "safetyRatings": SAFETY_RATINGS}


def _validate(body: dict[str, Any], model: str) -> None:
    """Refuse what Gemini refuses (see the module docstring)."""
    for content in body.get("contents") or []:
        if content.get("role") not in ("user", "model"):
            raise _Refused(f"Please use a valid role: user, model (got {content.get('role')}).")
        if not content.get("parts"):
            raise _Refused("contents.parts must not be empty.")
        if model.startswith("gemini-3") and content["role"] == "model":
            calls = [p for p in content["parts"] if "functionCall" in p]
            if calls and "thoughtSignature" not in calls[0]:
                raise _Refused(
                    "Function call is missing a thought_signature in functionCall parts."
                )
    if body.get("toolConfig") and not body.get("tools"):
        raise _Refused("Function calling config is set without function_declarations.")
    for tool in body.get("tools") or []:
        for declaration in tool.get("functionDeclarations", []):
            parameters = declaration.get("parameters")
            if parameters is not None:
                _check_schema(parameters, "parameters")
                if parameters.get("type", "").lower() == "object" and not parameters.get(
                    "properties"
                ):
                    raise _Refused("parameters.properties: should be non-empty for OBJECT type")
    schema = (body.get("generationConfig") or {}).get("responseSchema")
    if schema is not None:
        _check_schema(schema, "generation_config.response_schema")
    thinking = (body.get("generationConfig") or {}).get("thinkingConfig")
    if thinking is not None:
        _check_thinking(thinking, model)


def _check_thinking(config: dict[str, Any], model: str) -> None:
    level = config.get("thinkingLevel")
    if level is not None and config.get("thinkingBudget") is not None:
        raise _Refused("You can only set one of thinking budget and thinking level.")
    if level is not None and not model.startswith("gemini-3"):
        raise _Refused("Thinking level is not supported for this model.")
    if level == "minimal" and model.startswith("gemini-3") and "-pro" in model:
        raise _Refused("Thinking level MINIMAL is not supported for this model.")
    if config.get("thinkingBudget") == 0 and "-pro" in model:
        raise _Refused("Budget 0 is invalid. This model only works in thinking mode.")


def _check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise _Refused(f"Invalid value at '{where}'")
    for key, value in schema.items():
        if key not in SCHEMA_KEYS:
            raise _Refused(f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}'")
        if key == "properties":
            for name, sub in value.items():
                _check_schema(sub, f"{where}.properties[{name}]")
        elif key == "items":
            _check_schema(value, f"{where}.items")
        elif key == "anyOf":
            for sub in value:
                _check_schema(sub, f"{where}.any_of")


def _texts(content: Any) -> list[str]:
    parts = content.get("parts", []) if isinstance(content, dict) else []
    return [p["text"] for p in parts if isinstance(p.get("text"), str) and not p.get("thought")]


def _count_tokens(body: dict[str, Any], model: str) -> int:
    if ("contents" in body) == ("generateContentRequest" in body):
        raise _Refused("Exactly one of contents or generateContentRequest must be set.")
    if "contents" in body:
        return sum(len(t.split()) for c in body["contents"] for t in _texts(c))
    inner = body["generateContentRequest"]
    if inner.get("model") != f"models/{model}":
        raise _Refused("generateContentRequest.model must name the model of the URL.")
    system = inner.get("systemInstruction") or {}
    words = sum(len(t.split()) for c in [system, *inner.get("contents", [])] for t in _texts(c))
    functions = sum(len(t.get("functionDeclarations", [])) for t in inner.get("tools", []))
    return words + 10 * functions


def _embedding(request: dict[str, Any], model: str) -> dict[str, Any]:
    if request.get("model", f"models/{model}") != f"models/{model}":
        raise _Refused("Model names in batch requests must match the model of the URL.")
    text = " ".join(_texts(request.get("content")))
    dimensions = int(request.get("outputDimensionality") or 8)
    digest = hashlib.sha256(text.encode()).digest()
    return {"values": [digest[i % len(digest)] / 127.5 - 1.0 for i in range(dimensions)]}


def _split(text: str, pieces: int) -> list[str]:
    size, extra = divmod(len(text), pieces)
    out, start = [], 0
    for index in range(pieces):
        end = start + size + (1 if index < extra else 0)
        out.append(text[start:end])
        start = end
    return out


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(
    status: int,
    rpc_status: str,
    message: str,
    details: Any = (),
    headers: Any = (),
) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": rpc_status}
    if details:
        error["details"] = list(details)
    response = _json({"error": error}, status)
    response.headers.update(dict(headers))
    return response


class FakeGemini(FakeServer[_Upstream]):
    """The fake on a real port, in a background thread with its own event loop."""

    api_root = "/v1beta"

    def __init__(self, *, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0):
        super().__init__(_Upstream(api_key, record=True), host, port)


def main(argv: list[str] | None = None) -> None:
    serve_main(lambda: _Upstream(api_key=None, record=False), "Fake Gemini API upstream.", argv)


if __name__ == "__main__":
    main()
