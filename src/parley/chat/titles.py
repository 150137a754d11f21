"""Conversation titles: made by the conversation's model after its first complete answer.

``make_title`` asks the model for a short title of the message answered (``title_source``:
its text, else its files' names), records that exchange on its own (endpoint ``title``,
outside the conversation) and stores the title only if nobody set one meanwhile and that
message was not deleted meanwhile (deleting it later resets the title: ``delete_message``);
``clean_title`` makes a model's answer a sidebar title.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime

from parley.chat.interface import PROTOCOL, Caller, Recorder
from parley.domain.exchange import Exchange
from parley.domain.messages import ChatRequest, Message
from parley.errors import ParleyError, StoreError
from parley.gateway.service import Gateway
from parley.store.conversations import Conversation, Conversations, StoredMessage

log = logging.getLogger(__name__)

TITLE_PROMPT = (
    "Write a short title (at most six words) for the conversation that begins with the "
    "user's message below. Answer with the title only: no quotes, no final period."
)
MAX_TITLE = 80
# Quotes and markup models wrap titles in (typographic quotes by code point).
_QUOTES = "\"'`*# \u201c\u201d\u2018\u2019"
# How much of the first message the title model reads.
_TITLE_INPUT = 2000


async def make_title(
    gateway: Gateway,
    recorder: Recorder,
    store: Conversations,
    caller: Caller,
    conversation: Conversation,
    source: StoredMessage,
) -> None:
    """Title ``conversation`` from the message ``source`` (what ``title_source`` gives)."""
    first = title_source(source)
    model = conversation.default_model
    if model is None or not first.strip():
        return
    messages = (Message("system", TITLE_PROMPT), Message("user", first[:_TITLE_INPUT]))
    exchange = Exchange(
        model_requested=model,
        messages=messages,
        started_at=datetime.now(UTC),
        endpoint="title",
        client_protocol=PROTOCOL,
        user_id=caller.user_id,
        api_key_id=caller.api_key_id,
    )
    request = ChatRequest(model=model, messages=messages, client_protocol=PROTOCOL)
    try:
        async for _ in gateway.stream(request, exchange):
            pass
    except ParleyError as exc:
        log.info("no title for a conversation: %s", exc.message)
        await recorder.record_quietly(exchange)
        return
    try:
        await recorder.record(exchange)
    except StoreError:
        log.error("could not record a title exchange (model %s)", model)
    title = clean_title(exchange.choices[0].text) if exchange.choices else None
    if title is not None:
        await asyncio.to_thread(store.set_generated_title, conversation.id, title, source.id)


def title_source(message: StoredMessage) -> str:
    """What a title is made from: the message's text, else (a message of files alone)
    the names of its files, so that such a conversation is titled too."""
    if message.content.strip():
        return message.content
    return "\n".join(f"[file: {a.filename}]" for a in message.attachments)


def clean_title(text: str) -> str | None:
    """A model's title as a sidebar shows it: first line, no quotes, no "Title:", no final
    period, single spaces, at most ``MAX_TITLE`` characters; None when nothing is left."""
    line = next((part for part in text.splitlines() if part.strip()), "")
    line = re.sub(r"^\s*title\s*:\s*", "", line, flags=re.IGNORECASE)
    line = re.sub(r"\s+", " ", line).strip().strip(_QUOTES).rstrip(".").strip()
    return line[:MAX_TITLE].rstrip() or None
