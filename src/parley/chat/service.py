"""The conversation service: what the chat API does between HTTP and the gateway.

``ChatService.send`` commits the user message (``store.conversations``) and only then
returns the answer as an async stream of neutral events (``Delta``, then ``Done`` or
``Failed``) that the server encodes; ``regenerate`` answers a stored message again.

Invariants:
- the user message is committed before any upstream call: an upstream failure, a client
  that leaves or a crash loses only the answer;
- the context sent upstream is one branch: the system prompt (the conversation's own,
  else its provider configuration's), then the messages from the root to the message
  answered; other branches never reach the model;
- files: a message carries only its sender's own uploads (any other id is the 404 of a
  missing one, before anything is stored), linked to it in the transaction that commits
  it. Their bytes are read from the blob store whenever a context is built and become
  content parts after the message's text (``chat.attachments.content_part``: images as
  data URLs, text files as text); they are never copied into a stored message. A model
  known not to take images refuses such a context in the gateway (``Gateway.capable``),
  before any upstream call: a ``Failed`` 400 after the user message was committed;
- the exchange names its conversation and parent (``ReplyTo``), so the writer adds only
  the answer, linked to its request rows like any ``/v1`` exchange. Recording follows
  ``server/relay.py``: ``Done`` comes only after the record is committed (durable mode);
  a failure records the attempts and then yields ``Failed``; a consumer that stops
  early (client gone) cancels the upstream call and the partial answer is recorded in
  the background;
- the server's shutdown (``Interruptions``: the server's ``Drain``) may interrupt an
  answer only while it waits on the upstream, never while it commits or a client reads:
  the partial answer is recorded as interrupted by the shutdown and the answer ends in
  ``Failed`` (``ServerShuttingDown``), so no client takes a cut-off answer for a complete
  one. An answer aiohttp cancels later (its client too slow to read) is recorded as a
  client disconnect, as on ``/v1``;
- documents (RAG): the chunks of the conversation's documents, or of the collections the
  message names, go upstream in the system message and become the answer's citations
  (``chat.sources``: when each is searched, and what a failing embedder does);
- titles: after the first complete answer of an untitled conversation (a failed or
  cut-short one does not count), a background task asks the conversation's model for a
  short title of the message answered (of its files' names when it has no text),
  recorded as an exchange of its own (endpoint ``title``, outside the conversation), and
  stored only if nobody set a title meanwhile (``chat.titles``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from parley.chat.attachments import Attachments
from parley.chat.context import Part, carrying, parts_of, with_sources
from parley.chat.interface import (
    PROTOCOL,
    Caller,
    ChatEvent,
    Delta,
    Done,
    Failed,
    Interruptions,
    NoShutdown,
    Options,
    Recorder,
    Reply,
)
from parley.chat.sources import Sources
from parley.chat.titles import make_title
from parley.domain.events import Chunk, TextDelta
from parley.domain.exchange import Exchange, ReplyTo
from parley.domain.messages import ChatRequest, Message
from parley.errors import (
    InvalidRequest,
    ModelNotFound,
    NotFound,
    ParleyError,
    ServerShuttingDown,
    StoreError,
)
from parley.gateway.recording import INTERRUPTED_MESSAGE, mark_interrupted
from parley.gateway.service import Gateway, finish
from parley.search.rag import Retriever, Source, prompt
from parley.store.attachments import AttachmentRow
from parley.store.bulk import new_public_id
from parley.store.conversations import (
    ACTIVE_LEAF,
    Conversations,
    Parent,
    StoredMessage,
    Turn,
)

log = logging.getLogger(__name__)


# How long shutdown waits for titles being made before it cancels them.
_TITLE_GRACE_SECONDS = 5.0


class ChatService:
    """``attachments``: how to reach the attachment service (the server builds it after
    this one, so it is asked for when a message needs it); ``sources``: the document
    retriever, None while no embedder is available."""

    def __init__(
        self,
        store: Conversations,
        gateway: Gateway,
        recorder: Recorder,
        *,
        durable: bool,
        attachments: Callable[[], Attachments],
        sources: Callable[[], Retriever | None] = lambda: None,
        interruptions: Interruptions | None = None,
    ) -> None:
        self.store = store
        self._gateway = gateway
        self._recorder = recorder
        self._interruptions = interruptions or NoShutdown()
        self._durable = durable
        self._attachments = attachments
        self._sources = Sources(store, sources, self._spawn)
        self._tasks: set[asyncio.Task[None]] = set()

    async def check_model(self, model: str, param: str = "model") -> str:
        """``model`` if the router knows it (a ``provider/model`` id, an alias or a
        provider configuration); a 400 otherwise: for the chat API a model is a field of
        the body, not the endpoint."""
        try:
            await self._gateway.candidates(model, None)
        except ModelNotFound as exc:
            raise InvalidRequest(exc.message, param) from None
        return model

    async def send(
        self,
        caller: Caller,
        conversation_id: uuid.UUID,
        message: Message,
        options: Options,
        parent: Parent = ACTIVE_LEAF,
        attachments: Sequence[uuid.UUID] = (),
    ) -> Reply:
        """Commit ``message`` under ``parent`` (see ``Conversations.add_user_message``)
        with the uploads ``attachments`` (the caller's own: any other is ``NotFound``),
        then answer it."""
        await self._check_answerable(caller, conversation_id, options)
        self._sources.check(options)
        # Refused before the message is stored: the caller knows nothing was kept.
        await self._recorder.admit(caller)
        named: list[Source] | None = None
        if options.collections:
            conversation = await asyncio.to_thread(self.store.get, caller, conversation_id)
            if conversation is None:
                raise NotFound("no such conversation")
            named = await self._sources.retrieve(caller, conversation, message.text(), options)
        rows: list[AttachmentRow] = []
        parts: list[Part] = []
        if attachments:
            files = self._attachments()
            # Only the sender's own files, admins included: a file goes into a
            # conversation by the hand of whoever uploaded it.
            rows = await asyncio.to_thread(
                files.for_message, attachments, lambda owner: owner == caller.user_id
            )
            parts = await asyncio.to_thread(parts_of, files, rows)
        turn = await asyncio.to_thread(
            self.store.add_user_message,
            caller,
            conversation_id,
            message,
            parent=parent,
            user_id=caller.user_id,
            api_key_id=caller.api_key_id,
            attachments=rows,
            hashed_as=carrying(message, parts) if parts else None,
        )
        if turn is None:
            raise NotFound("no such conversation")
        known = {turn.message.id: parts}
        return Reply(turn.message, self._answer(caller, turn, options, known, named))

    async def regenerate(
        self, caller: Caller, conversation_id: uuid.UUID, message_id: uuid.UUID, options: Options
    ) -> Reply:
        """A new answer to what ``message_id`` answered (or to ``message_id`` itself, a
        user message): a sibling branch; the old answer stays."""
        await self._check_answerable(caller, conversation_id, options)
        self._sources.check(options)
        await self._recorder.admit(caller)
        turn = await asyncio.to_thread(self.store.answer_again, caller, conversation_id, message_id)
        if turn is None:
            raise NotFound("no such conversation")
        named: list[Source] | None = None
        if options.collections:
            named = await self._sources.retrieve(
                caller, turn.conversation, turn.message.content, options
            )
        return Reply(turn.message, self._answer(caller, turn, options, named=named))

    async def _check_answerable(
        self, caller: Caller, conversation_id: uuid.UUID, options: Options
    ) -> None:
        """The model that would answer is known to the router: the one asked for, else
        the conversation's default. Checked before anything is stored, so a refused send
        leaves no stray message behind (an imported conversation has no default model)."""
        if options.model is not None:
            await self.check_model(options.model)
            return
        conversation = await asyncio.to_thread(self.store.get, caller, conversation_id)
        if conversation is None:
            raise NotFound("no such conversation")
        if conversation.default_model is None:
            raise InvalidRequest("the conversation has no default model: pass 'model'", "model")
        await self.check_model(conversation.default_model)

    async def close(self) -> None:
        """Let titles being made finish (briefly), then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=_TITLE_GRACE_SECONDS)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _answer(
        self,
        caller: Caller,
        turn: Turn,
        options: Options,
        known: Mapping[int, list[Part]] | None = None,
        named: list[Source] | None = None,
    ) -> AsyncGenerator[ChatEvent, None]:
        """``known``: content parts already read, by message id; ``named``: the sources
        already found when the message names collections."""
        conversation = turn.conversation
        model = options.model or conversation.default_model
        if model is None:
            yield Failed(InvalidRequest("the conversation has no default model: pass 'model'"))
            return
        try:
            context = await self._context(turn, known or {})
        except ParleyError as exc:
            yield Failed(exc)
            return
        sources: list[Source] = named or []
        notice: str | None = None
        if named is None:
            sources, notice = await self._sources.own_documents(caller, turn, options)
        if sources:
            context = with_sources(context, prompt(sources))
        chat = ChatRequest(
            model=model,
            messages=context,
            stream=options.stream,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            client_protocol=PROTOCOL,
        )
        answer_id = new_public_id()
        exchange = Exchange(
            model_requested=model,
            messages=context,
            started_at=datetime.now(UTC),
            is_streaming=options.stream,
            endpoint="chat",
            client_protocol=PROTOCOL,
            origin=options.origin,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            user_id=caller.user_id,
            api_key_id=caller.api_key_id,
            reply_to=ReplyTo(
                conversation_id=conversation.id,
                conversation_public_id=conversation.public_id,
                parent_message_id=turn.message.id,
                parent_chain_hash=turn.chain_hash,
                answer_public_ids=(answer_id,),
                leaf_at_start=turn.leaf_at_start,
                notice=notice,
            ),
        )
        stream = self._gateway.stream(chat, exchange)
        failure: ParleyError | None = None
        try:
            # Only waits on the upstream may be interrupted: never the commit, nor a write
            # to a client too slow to read (it could not read an error event either).
            with self._interruptions.answering():
                chunk = await anext(stream)
            while True:
                text = _text(chunk)
                if text:
                    yield Delta(text)
                if chunk.final:
                    break
                with self._interruptions.answering():
                    chunk = await anext(stream)
        except ModelNotFound as exc:
            # The conversation's model left the configuration: the body's fault (400),
            # not a missing conversation (404).
            failure = InvalidRequest(exc.message, "model")
        except ParleyError as exc:
            failure = exc
        except asyncio.CancelledError:
            # Asked first, as the relay does: it consumes the shutdown's cancellation, so
            # closing the stream runs in a task that is no longer being cancelled.
            interrupted = self._interruptions.interrupted()
            await stream.aclose()
            if not interrupted:
                self._abandoned(exchange)
                raise
            # The shutdown's grace ran out while the upstream was answering.
            mark_interrupted(exchange)
            failure = ServerShuttingDown(INTERRUPTED_MESSAGE)
        except BaseException:
            # The consumer stopped (client gone, or the server past its drain): closing
            # the stream cancels the upstream call; the partial answer is still recorded.
            await stream.aclose()
            self._abandoned(exchange)
            raise
        # From here on the exchange is recorded once, whatever the consumer does.
        if failure is not None:
            await stream.aclose()
            await self._recorder.record_quietly(exchange)
            yield Failed(failure)
            return
        try:
            await self._recorder.record(exchange)
        except StoreError as exc:
            await stream.aclose()
            yield Failed(exc)
            return
        await finish(stream)
        if turn.needs_title:
            self._spawn(
                make_title(
                    self._gateway, self._recorder, self.store, caller, conversation, turn.message
                )
            )
        answer = await self._stored_answer(turn, exchange, answer_id)
        if sources:
            await self._sources.cite(turn, answer, sources)
        yield Done(answer)

    def _abandoned(self, exchange: Exchange) -> None:
        """Record, without waiting, an answer whose consumer stopped: a client that left,
        or the shutdown cancelling what still ran after its drain (recorded as
        interrupted by it, not as a client disconnect)."""
        if self._interruptions.drained():
            mark_interrupted(exchange)
        self._recorder.record_in_background(exchange)

    async def _context(self, turn: Turn, known: Mapping[int, list[Part]]) -> tuple[Message, ...]:
        """The system prompt, then the branch, each message with its files as content
        parts after its text."""
        unread = [m for m in turn.path if m.attachments and m.id not in known]
        parts = dict(known)
        if unread:
            parts.update(await asyncio.to_thread(self._read_parts, unread))
        branch = [carrying(stored.message(), parts.get(stored.id, ())) for stored in turn.path]
        if turn.system_prompt:
            return (Message("system", turn.system_prompt), *branch)
        return tuple(branch)

    def _read_parts(self, messages: Sequence[StoredMessage]) -> dict[int, list[Part]]:
        files = self._attachments()
        return {stored.id: parts_of(files, stored.attachments) for stored in messages}

    async def _stored_answer(
        self, turn: Turn, exchange: Exchange, answer_id: uuid.UUID
    ) -> StoredMessage:
        """The answer as ``GET`` will show it: read back when committed, else (async
        recording) made from the exchange."""
        if self._durable:
            found = await asyncio.to_thread(self.store.get_message, turn.conversation.id, answer_id)
            if found is not None:
                return found
        choice = exchange.choices[0] if exchange.choices else None
        attempt = exchange.succeeded
        usage = attempt.usage if attempt is not None else None
        message = choice.message() if choice is not None else Message("assistant", "")
        return StoredMessage(
            id=0,
            public_id=answer_id,
            parent_id=turn.message.id,
            parent_public_id=turn.message.public_id,
            role="assistant",
            content=message.text(),
            payload=orjson.dumps(message.canonical()).decode(),
            created_at=datetime.now(UTC),
            model_used=attempt.model_used if attempt is not None else exchange.model_requested,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            total_tokens=usage.total_tokens if usage else None,
            finish_reason=choice.finish_reason if choice is not None else None,
            notice=exchange.reply_to.notice if exchange.reply_to is not None else None,
        )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(_logged(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _logged(work: Coroutine[Any, Any, None]) -> None:
    """A background task: nobody awaits it, so its failure is logged here."""
    try:
        await work
    except Exception:
        log.exception("a background task of the chat service failed")


def _text(chunk: Chunk) -> str:
    """The answer's text in ``chunk`` (the first choice: the chat API asks for one)."""
    parts = [e.text for e in chunk.events if isinstance(e, TextDelta) and e.choice == 0]
    return parts[0] if len(parts) == 1 else "".join(parts)
