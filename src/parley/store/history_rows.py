"""The one way rows enter ``messages`` and ``conversations``: the insert, and in the same
transaction the search entries that follow from it.

Every new message needs a full-text entry and a search-outbox row, every new conversation
a full-text entry for its title. On PostgreSQL the database does both (a generated
``tsvector`` column, an outbox trigger). On SQLite migration 0006 replaced the three
AFTER INSERT triggers that did it with the statements here: measured with the exchange
writer's ``executemany``, the triggers cost ~25 us per message, the same inserts made
directly ~2.5 us. Edits and deletes are rare and keep their triggers, which since 0006
remove a full-text entry only if the index holds one: a row inserted some other way is
missing from keyword search, never a corrupt index.

Invariants:
- a caller inserts messages and conversations only through ``insert_messages`` /
  ``insert_conversations``, or calls ``index_messages`` / ``index_conversations`` in the
  same transaction right after an insert of its own; the rows must already carry ``id``;
- the entries are what the dropped triggers wrote: one full-text row per message (its
  content) and per titled conversation (an untitled one has nothing to index: two WAL
  pages fewer per gateway commit), one ``upsert`` outbox row per message; reconcile
  (``parley reindex``) still repairs the vector side, and ``parley db check`` reports the
  triggers that must remain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from parley.store.bulk import bulk_insert, execute_rows
from parley.store.schema import conversations, messages


def insert_messages(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert message ``rows`` (ids assigned) and their search entries."""
    bulk_insert(conn, messages, rows)
    index_messages(conn, [(row["id"], row["content"]) for row in rows])


def insert_conversations(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert conversation ``rows`` (ids assigned) and the entries of their titles.

    An untitled conversation (most of the gateway's) gets no entry: there is nothing to
    find, and the edit trigger indexes the title it is given later."""
    bulk_insert(conn, conversations, rows)
    index_conversations(conn, [(row["id"], row["title"]) for row in rows])


def index_messages(conn: Connection, inserted: Sequence[tuple[int, str]]) -> None:
    """The search entries of messages just inserted: ``(id, content)`` each."""
    if not inserted or conn.dialect.name != "sqlite":
        return
    execute_rows(conn, "INSERT INTO messages_fts(rowid, content) VALUES (?, ?)", inserted)
    execute_rows(
        conn,
        "INSERT INTO search_outbox(kind, item_id, op) VALUES ('message', ?, 'upsert')",
        [(message_id,) for message_id, _ in inserted],
    )


def index_conversations(conn: Connection, inserted: Sequence[tuple[int, str | None]]) -> None:
    """The title entries of conversations just inserted: ``(id, title)`` each; untitled
    ones get none."""
    titled = [(conv_id, title) for conv_id, title in inserted if title]
    if not titled or conn.dialect.name != "sqlite":
        return
    execute_rows(conn, "INSERT INTO conversations_fts(rowid, title) VALUES (?, ?)", titled)
