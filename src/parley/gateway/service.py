"""The gateway: run a request through its candidates with retries and fallbacks.

``Gateway.stream`` yields the chunks of the one attempt that got through, and records every
attempt (failed ones included) on the ``Exchange`` it is given. Invariants:

- retries and fallbacks happen only before the first chunk of an attempt was yielded,
  so nothing is ever retried after a byte went to the client;
- a retry waits for exponential backoff with jitter, or the upstream's Retry-After when it
  is no longer than ``RetryPolicy.max_retry_after`` (longer: go to the next candidate);
- errors that are the client's (a 400 from upstream, a content filter) are not retried
  or sent to another candidate: another model would refuse the same request;
- a request an adapter refuses before sending it because its provider family cannot
  serve it (``Unsupported``: ``logprobs`` for Gemini, embeddings for Anthropic) goes to
  the next candidate, which may be of another family; when every candidate refuses, the
  first refusal is the answer, and a candidate that was tried and failed upstream
  outranks a refusal. Any other refusal (``ClientError``: a malformed request no provider
  would take) ends the request, as a 400 from upstream does;
- when the consumer stops early (client disconnect), the upstream call is closed and the
  attempt is recorded as cancelled with finish reason ``client_disconnected``;
- candidates come from ``candidates``: the router's, after the directory of database
  configurations was refreshed if the model may need it and it is stale, with the
  caller's own provider keys (``Exchange.user_id``, BYOK) swapped in.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime
from typing import Any

from parley.domain.capabilities import needs_of
from parley.domain.events import Chunk
from parley.domain.exchange import Attempt, Exchange
from parley.domain.messages import ChatRequest
from parley.domain.usage import Usage
from parley.errors import (
    ClientError,
    InvalidRequest,
    ModelNotFound,
    ParleyError,
    Unsupported,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamInterrupted,
    UpstreamProtocolError,
)
from parley.gateway.byok import UserKeys
from parley.gateway.capabilities import CapabilityBook
from parley.gateway.pricing import PriceBook
from parley.gateway.recording import Fold
from parley.gateway.router import Candidate, Router
from parley.providers.base import EmbeddingsResult
from parley.settings import RetryPolicy

log = logging.getLogger(__name__)

# Errors that another attempt cannot fix: the request itself is refused.
_FINAL_ERROR_TYPES = frozenset({"bad_request", "content_filter"})


class Gateway:
    def __init__(
        self,
        router: Router,
        prices: PriceBook,
        retry: RetryPolicy,
        capabilities: CapabilityBook | None = None,
        user_keys: UserKeys | None = None,
    ) -> None:
        self.router = router
        self.prices = prices
        self.retry = retry
        self.capabilities = capabilities or CapabilityBook({}, {})
        self.user_keys = user_keys

    async def candidates(self, model: str, user_id: int | None) -> list[Candidate]:
        """The candidates for ``model`` as the caller ``user_id`` gets them (their own
        provider keys in place of the configured ones)."""
        directory = self.router.directory
        if directory is not None and directory.stale() and self.router.needs_directory(model):
            await directory.refresh()
        candidates = self.router.resolve(model)
        if self.user_keys is not None:
            candidates = await self.user_keys.personal(user_id, candidates)
        return candidates

    async def stream(self, request: ChatRequest, exchange: Exchange) -> AsyncGenerator[Chunk, None]:
        """Yield the chunks of the first attempt that starts; record every attempt."""
        candidates = self.capable(request, await self.candidates(request.model, exchange.user_id))
        last_error: UpstreamError | None = None
        refusal: Unsupported | None = None
        for candidate in candidates:
            for try_number in range(max(1, self.retry.attempts)):
                fold = self._begin(exchange, candidate)
                upstream = candidate.provider.chat(request, candidate.model)
                try:
                    first = await anext(upstream)
                except StopAsyncIteration:
                    error: UpstreamError = UpstreamProtocolError("upstream sent no response")
                    fold.fail(error)
                    last_error = error
                    break
                except BaseException as exc:
                    await upstream.aclose()
                    failure = self._failed(fold, candidate, exc)
                    if isinstance(failure, Unsupported):
                        refusal = refusal or failure
                        break
                    last_error = failure
                    if await self._wait_to_retry(exchange, candidate, last_error, try_number):
                        continue
                    break
                # Committed to this attempt: from here on nothing is retried.
                try:
                    chunk = first
                    while True:
                        fold.feed(chunk)
                        if chunk.final:
                            # Recorded as complete before the final chunk is released, so
                            # the server can commit the record and only then acknowledge.
                            fold.finish()
                        yield chunk
                        if chunk.final:
                            break
                        chunk = await anext(upstream)
                    # The consumer came back after the final chunk: let the adapter read
                    # to the end of the response so its connection returns to the pool.
                    async for _ in upstream:
                        pass
                except StopAsyncIteration:
                    error = UpstreamInterrupted("upstream stream ended without a final event")
                    fold.fail(error, finish_reason="error")
                    raise error from None
                except ParleyError as exc:
                    fold.fail(exc, finish_reason="error")
                    raise
                except Exception as exc:
                    error = _unreadable(candidate, exc)
                    fold.fail(error, finish_reason="error")
                    raise error from exc
                finally:
                    # Left early (client gone): cancelled. After an outcome, a no-op.
                    fold.cancel()
                    await upstream.aclose()
                return
        raise _outcome(last_error, refusal, request.model)

    def capable(self, request: ChatRequest, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates able to serve ``request``; ``InvalidRequest`` when none is, so
        a request a model cannot take is refused before any upstream call."""
        needs = needs_of(request)
        able: list[Candidate] = []
        refusals: list[str] = []
        for candidate in candidates:
            unmet = needs.unmet(self.capabilities.of(candidate.provider_name, candidate.model))
            if unmet:
                refusals.append(f"{candidate.id} {' and '.join(unmet)}")
            else:
                able.append(candidate)
        if candidates and not able:
            raise InvalidRequest(
                f"model '{request.model}' cannot serve this request: {'; '.join(refusals)}",
                "model",
            )
        return able

    def _begin(self, exchange: Exchange, candidate: Candidate) -> Fold:
        attempt = Attempt(
            attempt=len(exchange.attempts) + 1,
            provider=candidate.provider_name,
            model_used=candidate.model,
            started_at=datetime.now(UTC),
        )
        exchange.attempts.append(attempt)
        return Fold(exchange, attempt, self.prices)

    @staticmethod
    def _failed(
        fold: Fold, candidate: Candidate, exc: BaseException
    ) -> UpstreamError | Unsupported:
        """Record the attempt ``exc`` ended before it answered. An upstream's error is
        returned (another try may do better), and so is a refusal by the adapter's
        provider family (``Unsupported``: another candidate may take it); any other is
        raised: the client's own (``ClientError``: no other attempt would take it), a bug
        or an answer of an unexpected shape (an error of this attempt, never a traceback
        for the client), or a cancellation (the client went away meanwhile)."""
        if isinstance(exc, Unsupported | UpstreamError):
            fold.fail(exc)
            return exc
        if isinstance(exc, ClientError):
            fold.fail(exc)
            raise exc
        if isinstance(exc, Exception):
            error = _unreadable(candidate, exc)
            fold.fail(error)
            raise error from exc
        fold.cancel()
        raise exc

    async def _wait_to_retry(
        self, exchange: Exchange, candidate: Candidate, error: UpstreamError, try_number: int
    ) -> bool:
        """After a failed attempt: raise if no attempt can help, wait and return True to
        retry the same candidate, or return False to move on to the next one."""
        if error.error_type in _FINAL_ERROR_TYPES:
            raise error
        delay = self._delay(error, try_number)
        if delay is None:
            return False
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            # The client left (or the shutdown's grace ran out) during the wait: the retry
            # it cancelled is recorded as a cancelled attempt, so the exchange's last row
            # says how it ended, not only the error that made it wait.
            self._begin(exchange, candidate).cancel()
            raise
        return True

    def _delay(self, error: UpstreamError, try_number: int) -> float | None:
        """Seconds to wait before retrying this candidate, or None to move on."""
        if not error.retryable or try_number + 1 >= self.retry.attempts:
            return None
        if isinstance(error, UpstreamHTTPError) and error.retry_after is not None:
            if error.retry_after > self.retry.max_retry_after:
                return None
            return float(error.retry_after)
        backoff = min(self.retry.backoff_max, self.retry.backoff_base * (2.0**try_number))
        return backoff * (0.5 + random.random() / 2)

    async def embeddings(
        self, body: Mapping[str, Any], model: str, exchange: Exchange
    ) -> EmbeddingsResult:
        """Create embeddings through the candidates of ``model``, recording each attempt."""
        last_error: UpstreamError | None = None
        refusal: Unsupported | None = None
        for candidate in await self.candidates(model, exchange.user_id):
            for try_number in range(max(1, self.retry.attempts)):
                fold = self._begin(exchange, candidate)
                try:
                    result = await candidate.provider.embeddings(body, candidate.model)
                except BaseException as exc:
                    failure = self._failed(fold, candidate, exc)
                    if isinstance(failure, Unsupported):
                        refusal = refusal or failure
                        break
                    last_error = failure
                    if await self._wait_to_retry(exchange, candidate, last_error, try_number):
                        continue
                    break
                fold.attempt.usage = Usage(
                    prompt_tokens=result.usage.prompt_tokens,
                    completion_tokens=0 if result.usage.prompt_tokens is not None else None,
                    total_tokens=result.usage.total_tokens,
                )
                fold.attempt.model_used = result.model or candidate.model
                fold.finish()
                return result
        raise _outcome(last_error, refusal, model)


def _outcome(
    last_error: UpstreamError | None, refusal: Unsupported | None, model: str
) -> ParleyError:
    """The error of a request no candidate answered: the last upstream failure (a
    candidate that could take the request but failed is what the client may retry), else
    the first adapter's refusal, else that there was no candidate."""
    if last_error is not None:
        return last_error
    if refusal is not None:
        return refusal
    return ModelNotFound(f"no upstream candidate for model '{model}'")


def _unreadable(candidate: Candidate, exc: Exception) -> UpstreamProtocolError:
    log.error("could not process the answer of %s", candidate.id, exc_info=exc)
    return UpstreamProtocolError(
        f"could not process the answer of {candidate.id} ({type(exc).__name__})"
    )


async def finish(chunks: AsyncGenerator[Chunk, None]) -> None:
    """Run a stream whose answer is complete to its end, so its connection is reused."""
    try:
        async for _ in chunks:
            pass
    except ParleyError as exc:
        log.info("upstream misbehaved after its answer was complete: %s", exc.message)
    finally:
        await chunks.aclose()
