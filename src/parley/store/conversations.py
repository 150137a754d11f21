"""The conversation repository: the chat API's conversations and messages (all of its SQL).

Invariants:
- a caller sees a conversation only if ``viewer.may_see(its user_id)``; any other reads
  as missing (None), so ids cannot be probed. A listing shows the viewer's own
  conversations: ``user_id`` equal to the viewer's (NULL for the local or master admin);
- the sidebar order is pinned first, then newest activity (``updated_at``), then the
  public id (a UUIDv7: time-ordered like the internal id) as the tie-break. A cursor is
  the position of a page's last row in that order, never an internal id; a page after it
  holds exactly the rows after that position;
- ``updated_at`` is the time of the newest message: this module moves it for user
  messages, the exchange writer for answers. Settings (title, pinned...) leave it alone,
  so renaming a conversation does not reorder the sidebar;
- ``active_leaf_id`` is the last message of the branch the chat continues; NULL means the
  newest message, which is always a leaf (a child is stored after its parent);
- message counts and last message times are computed for the rows of a page only;
- a user message is committed in its own transaction, before any upstream call, so it
  survives whatever happens to its answer; the files it carries are linked to it
  (``attachments.message_id`` and ``conversation_id``) in that same transaction. Its row
  keeps its text only (no file bytes in ``payload``); its content hash is that of the
  message as the model gets it, files included (``hashed_as``), so that a ``/v1`` client
  re-sending that history threads onto it;
- deleting a conversation goes by foreign keys: its messages, responses and attachments
  rows cascade; request-log rows stay, with ``conversation_id`` NULL. The attachments'
  blobs are the caller's to sweep after the commit (``delete`` names them). Deleting a
  message deletes its subtree (``delete_message``, ``store.message_delete``) the same way.
  Both wait for the exchange writer's batch under way (``_wait_for_the_writer``): an
  answer to what they delete is then not stored, and never fails the batch.

Every method blocks: call it through ``asyncio.to_thread`` from the event loop.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy
from sqlalchemy import Connection, delete, insert, select, tuple_, update

from parley.domain.messages import Message, chain_hash
from parley.errors import InvalidRequest, NotFound, refuse_unknown
from parley.store import attachments as files
from parley.store import documents
from parley.store.attachments import AttachmentRow, ConversationRef
from parley.store.bulk import new_public_id
from parley.store.conversation_rows import (
    ACTIVE_LEAF,
    MESSAGES,
    RESPONSES,
    ActiveLeaf,
    Anchor,
    Conversation,
    Page,
    Parent,
    StoredMessage,
    Tree,
    Turn,
    Viewer,
    active_leaf,
    anchor,
    conversation_of,
    counted,
    decode_cursor,
    encode_cursor,
    messages_of,
    needs_title,
    one_row,
    path_to,
    system_prompt_of,
    visible_row,
    with_files,
)
from parley.store.engine import IMMEDIATE
from parley.store.exchange_lookups import chain_key
from parley.store.exchanges import WRITER_LOCK
from parley.store.history_rows import index_conversations, index_messages
from parley.store.message_delete import delete_messages, subtree, unlink_parents
from parley.store.schema import attachments, conversations, messages, responses

__all__ = [
    "ACTIVE_LEAF",
    "FIELDS",
    "MAX_PAGE",
    "Conversation",
    "Conversations",
    "Page",
    "Parent",
    "StoredMessage",
    "Tree",
    "Turn",
    "Viewer",
]

# Settings a caller may change (``update``); ``active_leaf_id`` is a message's public id.
FIELDS: Final = frozenset(
    {
        "title",
        "default_model",
        "archived",
        "pinned",
        "is_active",
        "system_prompt",
        "active_leaf_id",
    }
)
MAX_PAGE: Final = 200

_C = conversations.c
_M = messages.c
_R = responses.c


class Conversations:
    """Conversations and their messages on one engine."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self._engine = engine

    # -- conversations ----------------------------------------------------------------

    def create(
        self,
        *,
        user_id: int | None,
        api_key_id: int | None,
        default_model: str,
        title: str | None = None,
        system_prompt: str | None = None,
        source: str = "chat",
        provider_config_id: int | None = None,
    ) -> Conversation:
        now = datetime.now(UTC)
        row = {
            "public_id": new_public_id(),
            "created_at": now,
            "updated_at": now,
            "title": title,
            "source": source,
            "default_model": default_model,
            "user_id": user_id,
            "api_key_id": api_key_id,
            "archived": False,
            "pinned": False,
            "is_active": True,
            "system_prompt": system_prompt,
            "provider_config_id": provider_config_id,
        }
        with self._writing() as conn:
            key = conn.execute(insert(conversations).values(row)).inserted_primary_key
            assert key is not None
            index_conversations(conn, [(key[0], title)])
            return conversation_of(one_row(conn, _C.id == key[0]))

    def list_page(
        self,
        viewer: Viewer,
        *,
        limit: int = 50,
        cursor: str | None = None,
        archived: bool | None = False,
        pinned: bool | None = None,
        q: str | None = None,
    ) -> Page:
        """A page of the viewer's conversations in sidebar order (see the module
        docstring). ``archived`` / ``pinned`` None: either; ``q``: title substring."""
        limit = max(1, min(limit, MAX_PAGE))
        owner = _C.user_id.is_(None) if viewer.user_id is None else _C.user_id == viewer.user_id
        query = select(conversations).where(owner)
        if archived is not None:
            query = query.where(_C.archived == archived)
        if pinned is not None:
            query = query.where(_C.pinned == pinned)
        if q:
            query = query.where(_C.title.icontains(q, autoescape=True))
        if cursor is not None:
            after = decode_cursor(cursor)
            query = query.where(tuple_(_C.pinned, _C.updated_at, _C.public_id) < after)
        query = query.order_by(_C.pinned.desc(), _C.updated_at.desc(), _C.public_id.desc())
        with self._engine.connect() as conn:
            rows = conn.execute(query.limit(limit + 1)).all()
            more = len(rows) > limit
            items = counted(conn, rows[:limit])
        next_cursor = encode_cursor(items[-1]) if more else None
        return Page(items, next_cursor)

    def get(self, viewer: Viewer, public_id: uuid.UUID) -> Conversation | None:
        with self._engine.connect() as conn:
            row = visible_row(conn, viewer, public_id)
            return counted(conn, [row])[0] if row is not None else None

    def load(self, viewer: Viewer, public_id: uuid.UUID) -> Tree | None:
        """The conversation with its message tree, or None (missing or not visible)."""
        with self._engine.connect() as conn:
            row = visible_row(conn, viewer, public_id)
            if row is None:
                return None
            rows = conn.execute(MESSAGES.where(_M.conversation_id == row.id)).all()
            answers = {r[0]: r for r in conn.execute(RESPONSES.where(_M.conversation_id == row.id))}
            attached = files.on_messages_of(conn, row.id)
            cited = documents.citations_in(conn, row.id)
        listed = messages_of(rows, answers)
        with_files(listed, attached)
        for message in listed:
            if message.id in cited:
                message.citations = tuple(cited[message.id])
        last = max((m.created_at for m in listed), default=None)
        parent_of = {m.id: m.parent_id for m in listed}
        leaf = row.active_leaf_id
        if leaf not in parent_of:
            leaf = listed[-1].id if listed else None
        path: list[int] = []
        while leaf is not None:
            path.append(leaf)
            leaf = parent_of.get(leaf)
        path.reverse()
        return Tree(conversation_of(row, len(listed), last), listed, path)

    def update(
        self, viewer: Viewer, public_id: uuid.UUID, changes: Mapping[str, Any]
    ) -> Conversation | None:
        """Apply ``changes`` (keys of ``FIELDS``, values already validated by type); None
        when the conversation is missing or not visible. ``active_leaf_id`` must name a
        message of this conversation (None: back to the newest message)."""
        refuse_unknown(changes, FIELDS)
        with self._writing() as conn:
            row = visible_row(conn, viewer, public_id)
            if row is None:
                return None
            values = dict(changes)
            if values.get("active_leaf_id") is not None:
                leaf = anchor(conn, row.id, _M.public_id == values["active_leaf_id"])
                if leaf is None:
                    raise InvalidRequest(
                        "'active_leaf_id' must be a message of this conversation",
                        "active_leaf_id",
                    )
                values["active_leaf_id"] = leaf.id
            if "title" in values:
                # A title a user sets is theirs: deleting messages never resets it.
                values["title_message_id"] = None
            if values:
                conn.execute(update(conversations).where(_C.id == row.id).values(values))
            return counted(conn, [one_row(conn, _C.id == row.id)])[0]

    def delete(self, viewer: Viewer, public_id: uuid.UUID) -> set[str] | None:
        """Delete the conversation (rows go by foreign keys); the blob hashes its
        attachments and documents named, for the caller to sweep once this is committed,
        or None when it is missing or not visible."""
        with self._writing() as conn:
            _wait_for_the_writer(conn)
            # Locked before the hashes are read: an upload into the conversation commits
            # before (its blob is named here) or finds it gone (``hold_conversation``).
            row = visible_row(conn, viewer, public_id, lock=True)
            if row is None:
                return None
            named = select(attachments.c.sha256).where(attachments.c.conversation_id == row.id)
            blobs = set(conn.execute(named.distinct()).scalars())
            blobs |= documents.conversation_hashes(conn, row.id)
            unlink_parents(conn, _M.conversation_id == row.id)
            conn.execute(delete(conversations).where(_C.id == row.id))
            return blobs

    def delete_message(
        self, viewer: Viewer, public_id: uuid.UUID, message_id: uuid.UUID
    ) -> set[str] | None:
        """Delete the message ``message_id`` with every reply below it, their files and
        search entries (``store.message_delete``); the blob hashes their files named, for
        the caller to sweep once this is committed. None when the conversation is missing
        or not visible; ``NotFound`` when it holds no such message.

        When the active branch ran through a deleted message, the deleted message's
        parent becomes the active leaf (None for a root: the newest message left, if
        any). Serialised with the exchange writer (``_wait_for_the_writer``) and with
        sends to the conversation (``add_user_message``), so no answer or message is
        stored under a message deleted meanwhile.

        A generated title made from a deleted message is reset (None, as a new
        conversation has); a title a user set is never touched."""
        with self._writing() as conn:
            _wait_for_the_writer(conn)
            row = visible_row(conn, viewer, public_id, lock=True)
            if row is None:
                return None
            target = anchor(conn, row.id, _M.public_id == message_id)
            if target is None:
                raise NotFound(f"no such message: {message_id}")
            doomed = subtree(conn, target.id)
            gone = set(doomed)
            changes: dict[str, Any] = {}
            shown = active_leaf(conn, row.id, row.active_leaf_id)
            if shown is not None and shown.id in gone:
                changes["active_leaf_id"] = target.parent_id
            if row.title_message_id in gone:
                # The generated title carries the deleted text: untitled again, as a new
                # conversation is, so that a later answer titles it anew.
                changes.update(title=None, title_message_id=None)
            if changes:
                conn.execute(update(conversations).where(_C.id == row.id).values(changes))
            return delete_messages(conn, doomed)

    def set_generated_title(self, conversation_id: int, title: str, source_id: int) -> bool:
        """Store ``title``, made from the message ``source_id``, unless somebody set a
        title meanwhile or that message was deleted meanwhile (its text would outlive it)."""
        with self._writing() as conn:
            # The conversation locked first (``delete_message`` locks it too): the check
            # of the source below then sees a deletion that committed while this waited.
            locked = select(_C.id).where(_C.id == conversation_id).with_for_update()
            if conn.execute(locked).first() is None:
                return False
            kept = select(_M.id).where(_M.id == source_id, _M.conversation_id == conversation_id)
            done = conn.execute(
                update(conversations)
                .where(_C.id == conversation_id, _C.title.is_(None), kept.exists())
                .values(title=title, title_message_id=source_id)
            )
            return done.rowcount == 1

    # -- messages ---------------------------------------------------------------------

    def add_user_message(
        self,
        viewer: Viewer,
        public_id: uuid.UUID,
        message: Message,
        *,
        parent: Parent = ACTIVE_LEAF,
        user_id: int | None,
        api_key_id: int | None,
        attachments: Sequence[AttachmentRow] = (),
        hashed_as: Message | None = None,
    ) -> Turn | None:
        """Commit ``message`` under ``parent`` (a message's public id; None: a new root;
        ``ACTIVE_LEAF``: the end of the active branch) and make it the active leaf. None
        when the conversation is missing or not visible.

        ``attachments``: uploads the caller may attach (checked by the caller), linked to
        the message in this transaction (``store.attachments.attach``: one already on
        another message is copied); ``hashed_as``: the message as the model gets it, with
        its files as content parts, for the content hash (default: ``message``)."""
        with self._writing() as conn:
            # Locked: a message deleted meanwhile (``delete_message``) is never a parent.
            row = visible_row(conn, viewer, public_id, lock=True)
            if row is None:
                return None
            above: Anchor | None
            if isinstance(parent, ActiveLeaf):
                above = active_leaf(conn, row.id, row.active_leaf_id)
            elif parent is None:
                above = None
            else:
                above = anchor(conn, row.id, _M.public_id == parent)
                if above is None:
                    raise InvalidRequest(
                        "'parent_id' must be a message of this conversation", "parent_id"
                    )
            now = datetime.now(UTC)
            content_hash = (hashed_as or message).content_hash()
            chain = chain_hash(above.chain_hash if above else None, content_hash)
            values: dict[str, Any] = {
                "public_id": new_public_id(),
                "conversation_id": row.id,
                "parent_id": above.id if above else None,
                "role": message.role,
                "content": message.text(),
                "payload": message.canonical_json().decode(),
                "content_hash": content_hash,
                "chain_hash": chain,
                "chain_key": chain_key(chain),
                "created_at": now,
                "user_id": user_id,
                "api_key_id": api_key_id,
            }
            key = conn.execute(insert(messages).values(values)).inserted_primary_key
            assert key is not None
            index_messages(conn, [(key[0], values["content"])])
            linked = files.attach(
                conn,
                attachments,
                ConversationRef(row.id, row.public_id, row.user_id),
                key[0],
                values["public_id"],
            )
            conn.execute(
                update(conversations)
                .where(_C.id == row.id)
                .values(updated_at=now, active_leaf_id=key[0])
            )
            stored = StoredMessage(
                id=key[0],
                public_id=values["public_id"],
                parent_id=values["parent_id"],
                parent_public_id=above.public_id if above else None,
                role=message.role,
                content=values["content"],
                payload=values["payload"],
                created_at=now,
                attachments=tuple(linked),
            )
            path = [*path_to(conn, above.id), stored] if above else [stored]
            return Turn(
                conversation_of(row),
                stored,
                chain,
                path,
                system_prompt_of(conn, row),
                needs_title(conn, row),
                # Made the active leaf above, in this transaction.
                leaf_at_start=stored.id,
            )

    def answer_again(
        self, viewer: Viewer, public_id: uuid.UUID, message_id: uuid.UUID
    ) -> Turn | None:
        """The turn that regenerates ``message_id``: an answer is asked again of its
        parent; a user message is answered (again). None when the conversation is
        missing or not visible; ``InvalidRequest`` for a message it does not hold."""
        with self._engine.connect() as conn:
            row = visible_row(conn, viewer, public_id)
            if row is None:
                return None
            target = anchor(conn, row.id, _M.public_id == message_id)
            if target is None:
                raise InvalidRequest("no such message in this conversation", "message_id")
            if target.role == "assistant":
                answered = (
                    anchor(conn, row.id, _M.id == target.parent_id)
                    if target.parent_id is not None
                    else None
                )
                if answered is None:
                    raise InvalidRequest("this answer has no message to answer again")
            elif target.role == "user":
                answered = target
            else:
                raise InvalidRequest("only answers and user messages can be regenerated")
            path = path_to(conn, answered.id)
            return Turn(
                conversation_of(row),
                path[-1],
                answered.chain_hash,
                path,
                system_prompt_of(conn, row),
                needs_title(conn, row),
                leaf_at_start=row.active_leaf_id,
            )

    def get_message(self, conversation_id: int, public_id: uuid.UUID) -> StoredMessage | None:
        """A message of a conversation, with its response row and citations."""
        with self._engine.connect() as conn:
            row = conn.execute(
                MESSAGES.where(_M.public_id == public_id, _M.conversation_id == conversation_id)
            ).first()
            if row is None:
                return None
            answer = conn.execute(RESPONSES.where(_R.message_id == row[0])).first()
            parents: dict[int, uuid.UUID] = {}
            if row[2] is not None:
                parents[row[2]] = conn.execute(
                    select(_M.public_id).where(_M.id == row[2])
                ).scalar_one()
            cited = documents.citations_of(conn, [row[0]]).get(row[0], [])
        found = messages_of([row], {} if answer is None else {row[0]: answer}, parents)[0]
        found.citations = tuple(cited)
        return found

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        # BEGIN IMMEDIATE on SQLite: these transactions read, then write, alongside the
        # exchange writer; a deferred one could fail to upgrade its lock instead of waiting.
        with (
            self._engine.connect().execution_options(**{IMMEDIATE: True}) as conn,
            conn.begin(),
        ):
            yield conn


def _wait_for_the_writer(conn: Connection) -> None:
    """Take the exchange writer's lock for this transaction (PostgreSQL; on SQLite the
    write transaction already excludes it), before the conversation's row, as the writer
    takes them. A delete then never falls between the writer's check that what it answers
    still exists (``exchange_lookups.unanswerable``) and its insert of the answer, which
    failed the writer's batch on a foreign key and lost that exchange's request-log rows;
    the answer finds its conversation or message gone and is not stored."""
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITER_LOCK})")
