"""Adapter for Google's Gemini API (``generativelanguage.googleapis.com``).

``config.base_url`` is the API root with its version, by default
``https://generativelanguage.googleapis.com/v1beta`` (used when it is empty). Calls go to
``{base}/models/{model}:generateContent``, ``:streamGenerateContent?alt=sse``,
``:embedContent``, ``:batchEmbedContents`` and ``:countTokens``; the key travels in the
``x-goog-api-key`` header, never in the URL, so it cannot leak into access logs. This
module owns the HTTP side; translating to and from the wire format is ``gemini_wire``'s.

Invariants:

- No client speaks Gemini's protocol: chunks carry events only (``raw`` and ``protocol``
  are None) and the server encodes them for its client.
- A stream has no end marker: it ends when the HTTP body does. Every frame's chunk is
  yielded as it comes; at the end of the body a ``final`` chunk without events follows
  when every candidate finished, else ``UpstreamInterrupted``.
- Gemini repeats ``usageMetadata`` on many frames: a ``UsageReport`` is emitted only once
  every candidate has finished (normally once, with the last frame; again only if a later
  frame changes the counts, and the recorder keeps the last), so a stream cut short
  reports no usage, as with OpenAI.
- A prompt blocked by safety filters, or an answer blocked before any output, is an
  ``UpstreamHTTPError`` 400 of type ``content_filter`` (final, never retried); a safety
  stop after some output is ``Finish(reason="content_filter")``.
- Before the first chunk is yielded, failures are the retryable kinds of ``errors.py``;
  after it ``UpstreamInterrupted`` / ``UpstreamTimeout`` / ``UpstreamProtocolError``.
  Timeouts: ``connect`` through aiohttp, ``first_byte`` up to the first frame with events
  (the whole body when not streaming: ``total``), ``idle`` each later read.
- No error message carries request headers or the API key: every upstream text is
  scrubbed.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncGenerator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from parley.domain.events import Chunk, Event
from parley.domain.messages import ChatRequest
from parley.domain.usage import Usage
from parley.errors import InvalidRequest, UpstreamError, UpstreamProtocolError
from parley.providers import gemini_wire as wire
from parley.providers.base import EmbeddingsResult
from parley.providers.gemini_request import request_body
from parley.providers.http import UpstreamHTTP, finish
from parley.providers.sse import SSEDecoder
from parley.providers.wire import dumps, loads_object
from parley.settings import ProviderConfig

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
# ``models.list`` pages; a few are plenty (Google lists a few dozen models).
MAX_MODEL_PAGES = 5


class GeminiProvider:
    """The provider seam (``providers.base.Provider``) over the Gemini API."""

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self._base = (config.base_url or DEFAULT_BASE_URL).rstrip("/")
        key = config.api_key.get() if config.api_key is not None else ""
        headers = {"x-goog-api-key": key} if key else {}
        self._http = UpstreamHTTP(config, session, headers, (key,))

    @property
    def protocol(self) -> str:
        return wire.PROTOCOL

    def chat(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        """Send ``request`` to upstream ``model``; see the module docstring for the contract."""
        return self._stream(request, model) if request.stream else self._complete(request, model)

    def chat_body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        """The upstream JSON body for ``request`` (public for tests and dry runs)."""
        return request_body(request, model)

    async def embeddings(self, body: Mapping[str, Any], model: str) -> EmbeddingsResult:
        """``embedContent`` for one string, ``batchEmbedContents`` for a list; ``raw`` is an
        OpenAI embeddings response built from the vectors."""
        single, payload = _embedding_requests(body, model)
        action = "embedContent" if single else "batchEmbedContents"
        obj = await self._call(self._url(model, action), payload, whole_work=True)
        vectors = _embedding_vectors(obj, single)
        if len(vectors) != (1 if single else len(payload["requests"])):
            raise UpstreamProtocolError(f"upstream {self.config.name}: embeddings count mismatch")
        return EmbeddingsResult(
            raw=_embeddings_json(vectors, model, body.get("encoding_format")),
            protocol="openai",
            model=model,
            # Gemini reports no token counts for embeddings.
            usage=Usage(),
            count=len(vectors),
        )

    async def list_models(self) -> list[str]:
        """``GET {base}/models``, following ``nextPageToken`` for a few pages."""
        names: list[str] = []
        token = ""
        for _ in range(MAX_MODEL_PAGES):
            url = f"{self._base}/models?pageSize=1000"
            if token:
                url += f"&pageToken={quote(token, safe='')}"
            obj = await self._call(url, None, method="GET")
            models = obj.get("models", [])
            if not isinstance(models, list):
                raise UpstreamProtocolError(f"upstream {self.config.name}: model list is malformed")
            names += [
                item["name"].removeprefix("models/")
                for item in models
                if isinstance(item, dict) and isinstance(item.get("name"), str)
            ]
            token = obj.get("nextPageToken") or ""
            if not isinstance(token, str) or not token:
                break
        return names

    async def count_tokens(self, request: ChatRequest, model: str) -> int:
        """``:countTokens`` for the prompt of ``request`` (system instruction and tools
        included, hence the ``generateContentRequest`` form)."""
        body = request_body(request, model)
        inner: dict[str, Any] = {
            k: body[k] for k in ("contents", "systemInstruction", "tools") if k in body
        }
        payload = {"generateContentRequest": {"model": f"models/{_name(model)}", **inner}}
        total = (await self._call(self._url(model, "countTokens"), payload)).get("totalTokens")
        if type(total) is not int:
            raise UpstreamProtocolError(f"upstream {self.config.name}: no totalTokens in answer")
        return total

    # -- chat ---------------------------------------------------------------------------

    async def _complete(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        data = dumps(request_body(request, model))
        # A non-streaming answer's headers come only once it is whole: ``total`` bounds it,
        # and such a timeout is not retried (it would bill twice).
        deadline, phase = self._http.total_deadline()
        _, raw = await self._http.open(
            self._url(model, "generateContent"), data, deadline, phase, self._error_for, whole=True
        )
        reader = wire.ResponseReader(model, self._http.scrub)
        events = list(reader.read(loads_object(raw, "response"), yielded=False))
        if not reader.seen:
            raise UpstreamProtocolError(f"upstream {self.config.name}: response has no candidates")
        events += reader.closing()
        yield Chunk(events=tuple(events), final=True)

    async def _stream(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        data = dumps(request_body(request, model))
        http = self._http
        total_at = http.now() + self.config.timeouts.total
        deadline, phase = http.first_deadline()
        url = self._url(model, "streamGenerateContent") + "?alt=sse"
        resp, _ = await http.open(url, data, deadline, phase, self._error_for)
        try:
            if resp.content_type == "application/json":
                # Not SSE: an error object (or a server ignoring alt=sse).
                raw = await http.read_all(resp, deadline, phase)
                obj = loads_object(raw, "response")
                if obj.get("error"):
                    raise wire.error_object(obj["error"], False, http.scrub)
                raise UpstreamProtocolError(f"upstream {self.config.name} did not stream")
            decoder = SSEDecoder()
            reader = wire.ResponseReader(model, http.scrub)
            yielded = False
            while True:
                if yielded:
                    deadline, phase = http.next_deadline(total_at)
                data = await http.read(resp.content, deadline, phase, yielded)
                ready: list[tuple[Event, ...]] = []
                failure: UpstreamError | None = None
                for payload in decoder.feed(data) if data else decoder.close():
                    try:
                        events = reader.frame(payload, yielded or bool(ready))
                    except UpstreamError as exc:
                        failure = exc
                        break
                    if events:
                        ready.append(events)
                last = len(ready) - 1
                for i, events in enumerate(ready):
                    yielded = True
                    yield Chunk(events=events, more=i < last)
                if failure is not None:
                    raise failure
                if not data:
                    if reader.complete():
                        yield Chunk(events=reader.closing(), final=True)
                        return
                    raise http.broken("the stream ended before every candidate finished", yielded)
        finally:
            finish(resp)

    # -- plumbing -----------------------------------------------------------------------

    def _url(self, model: str, action: str) -> str:
        # Quoted whole: a model name can never reach another path of the API.
        return f"{self._base}/models/{quote(_name(model), safe='')}:{action}"

    async def _call(
        self,
        url: str,
        payload: Mapping[str, Any] | None,
        method: str = "POST",
        *,
        whole_work: bool = False,
    ) -> dict[str, Any]:
        """One request answered with one JSON object (never streamed); ``whole_work``:
        an answer made whole before it is sent (embeddings, see ``total_deadline``)."""
        deadline, phase = self._http.total_deadline() if whole_work else self._http.first_deadline()
        data = dumps(payload) if payload is not None else None
        _, raw = await self._http.open(
            url, data, deadline, phase, self._error_for, whole=True, method=method
        )
        obj = loads_object(raw, "response")
        if obj.get("error"):
            raise wire.error_object(obj["error"], False, self._http.scrub)
        return obj

    def _error_for(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        return wire.http_error(status, body, headers, self._http.scrub)


def _name(model: str) -> str:
    return model.removeprefix("models/")


def _embedding_requests(body: Mapping[str, Any], model: str) -> tuple[bool, dict[str, Any]]:
    """(single, payload): ``embedContent`` for one string, ``batchEmbedContents`` for a list."""
    items = body.get("input")
    dimensions = body.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
        raise InvalidRequest("'dimensions' must be a positive integer", "dimensions")

    def one(text: str) -> dict[str, Any]:
        request: dict[str, Any] = {"content": {"parts": [{"text": text}]}}
        if dimensions is not None:
            request["outputDimensionality"] = dimensions
        return request

    if isinstance(items, str):
        return True, one(items)
    if isinstance(items, list) and items and all(isinstance(i, str) for i in items):
        name = f"models/{_name(model)}"
        return False, {"requests": [{"model": name, **one(item)} for item in items]}
    raise InvalidRequest("Gemini embeds only a string or a list of strings", "input")


def _embedding_vectors(obj: dict[str, Any], single: bool) -> list[list[float]]:
    """The vectors of an ``embedContent`` / ``batchEmbedContents`` answer."""
    found = [obj.get("embedding")] if single else obj.get("embeddings")
    if not isinstance(found, list):
        raise UpstreamProtocolError("upstream embeddings response has no embeddings")
    vectors: list[list[float]] = []
    for item in found:
        values = item.get("values") if isinstance(item, dict) else None
        if not isinstance(values, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise UpstreamProtocolError("upstream embedding values are not a list of numbers")
        vectors.append([float(v) for v in values])
    return vectors


def _embeddings_json(vectors: list[list[float]], model: str, encoding: Any) -> bytes:
    """An OpenAI embeddings response; ``encoding`` "base64" packs float32 little-endian."""
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            if encoding == "base64"
            else v,
        }
        for index, v in enumerate(vectors)
    ]
    # Gemini reports no token counts for embeddings, but the openai SDK's
    # CreateEmbeddingResponse requires ``usage``: zeros here, None in the recorded Usage.
    usage = {"prompt_tokens": 0, "total_tokens": 0}
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage})
