"""The documents an answer is given from (RAG), for ``chat.service``.

When the conversation has documents, or the message names collections
(``Options.collections``), the chunks nearest the message answered
(``search.rag.Retriever``: the conversation's owner's documents, the caller's own
collections) go upstream in the system message, numbered; the answer's message keeps
them as its citations, written once the answer is committed (durable mode: before
``Done``; async mode: by a background task once the writer has committed it). Copies of
one text take one slot (``Retriever``).

Invariants:
- named collections are searched before anything is stored: no embedder, or one that
  fails, refuses the send (``SearchUnavailable``, 503) and the message is not kept, since
  an answer without the sources asked for would mislead;
- a conversation's own documents are searched once the message is stored: without an
  embedder they are left out; when the embedder fails the message is still answered
  without them, with a notice that says so, stored with the answer (``ReplyTo.notice``:
  ``GET`` shows it later too), and a warning is logged.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from parley.chat.interface import Caller, Options
from parley.errors import SearchUnavailable
from parley.search.rag import Retriever, Scope, Source
from parley.store.conversations import Conversation, Conversations, StoredMessage, Turn
from parley.store.documents import CitationRow

log = logging.getLogger(__name__)

# Async recording: how long citations wait for their answer to be committed.
_CITE_WAIT_SECONDS = 30.0


class Sources:
    """``retriever``: the document retriever, None while no embedder is available;
    ``spawn``: runs a background task that the chat service waits for on close."""

    def __init__(
        self,
        store: Conversations,
        retriever: Callable[[], Retriever | None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._store = store
        self._retriever = retriever
        self._spawn = spawn

    def check(self, options: Options) -> None:
        """Refuse named collections while there is no embedder to search them."""
        if options.collections and self._retriever() is None:
            raise SearchUnavailable(
                "answering from document collections needs an embedder: none is configured "
                "or installed"
            )

    async def own_documents(
        self, caller: Caller, turn: Turn, options: Options
    ) -> tuple[list[Source], str | None]:
        """The conversation's own documents for the message answered, and the notice of an
        answer given without them because the embedder failed (logged once, here)."""
        try:
            found = await self.retrieve(caller, turn.conversation, turn.message.content, options)
        except SearchUnavailable as exc:
            log.warning("an answer is given without its conversation's documents: %s", exc.message)
            return [], f"{exc.message} (answered without your documents)"
        return found, None

    async def retrieve(
        self, caller: Caller, conversation: Conversation, query: str, options: Options
    ) -> list[Source]:
        """The document chunks for ``query`` (see the module docstring); a failing
        embedder is ``SearchUnavailable``."""
        retriever = self._retriever()
        if retriever is None:
            self.check(options)
            return []
        if not options.collections and not await asyncio.to_thread(
            retriever.has_documents, conversation.id
        ):
            return []
        scope = Scope(
            conversation_id=conversation.id,
            owner_id=conversation.user_id,
            caller_id=caller.user_id,
            collections=options.collections,
        )
        return await retriever.retrieve(query, scope)

    async def cite(self, turn: Turn, answer: StoredMessage, sources: Sequence[Source]) -> None:
        """Keep the answer's sources: now when it is committed, else once it is."""
        retriever = self._retriever()
        if retriever is None:
            return
        kept = {s.chunk.document_id for s in sources}
        if answer.id:
            try:
                kept = await asyncio.to_thread(retriever.cite, answer.id, sources)
            except Exception:
                log.exception("the citations of an answer could not be stored")
        else:
            self._spawn(self._cite_later(retriever, turn, answer.public_id, sources))
        # As ``GET`` shows them: a document deleted meanwhile has no id any more.
        answer.citations = tuple(
            CitationRow(
                ordinal=rank,
                document_public_id=(
                    s.chunk.document_public_id if s.chunk.document_id in kept else None
                ),
                filename=s.chunk.filename,
                page=s.chunk.page,
                chunk_ordinal=s.chunk.ordinal,
                score=s.score,
            )
            for rank, s in enumerate(sources, start=1)
        )

    async def _cite_later(
        self,
        retriever: Retriever,
        turn: Turn,
        answer_id: uuid.UUID,
        sources: Sequence[Source],
    ) -> None:
        """Async recording: wait for the writer to commit the answer, then cite."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CITE_WAIT_SECONDS
        while loop.time() < deadline:
            found = await asyncio.to_thread(
                self._store.get_message, turn.conversation.id, answer_id
            )
            if found is not None:
                await asyncio.to_thread(retriever.cite, found.id, sources)
                return
            await asyncio.sleep(0.1)
        log.warning("an answer was not committed in time: its citations are not stored")
