"""Deleting messages of a conversation: one message with every reply below it.

``store.conversations`` calls these inside its write transaction, after locking the
conversation. Invariants:

- a message goes with its whole subtree (its replies, their branches): a reply never
  outlives the message it answers, and no row is left pointing at a deleted parent;
- the rows that hang off a message go with it: its ``responses`` row and its citations
  by their foreign keys; the files attached to it (``attachments`` rows) here, their
  hashes handed back so that the caller sweeps the blobs once the deletion is committed;
- search entries follow the rows, as when a conversation is deleted: the delete
  triggers take the full-text entries out (SQLite's FTS5 triggers; PostgreSQL's
  ``tsvector`` is a column of the row) and queue an outbox ``delete`` per message for
  the vector store (the indexer deletes the vectors, maintenance rewrites the files
  that still hold them);
- request-log rows are facts about upstream calls: they stay, as they do when a
  conversation is deleted. Only the messages and responses pointed at them;
- on SQLite the ``parent_id`` links inside the subtree are cleared first: else the
  ``ON DELETE CASCADE`` on ``parent_id`` runs as nested triggers, one level per message
  of a long branch, quadratic and refused past 1,000 levels (``unlink_parents``, shared
  with the conversation delete).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, Connection, delete, select, update

from parley.store.schema import attachments, messages

_M = messages.c
# Ids per ``IN`` list: well under SQLite's limit of bound parameters.
_CHUNK = 500


def subtree(conn: Connection, root: int) -> list[int]:
    """``root`` and every message below it, parents before children (one recursive
    query down the ``parent_id`` index)."""
    down = select(_M.id).where(_M.id == root).cte("subtree", recursive=True)
    down = down.union_all(select(_M.id).select_from(messages.join(down, _M.parent_id == down.c.id)))
    return list(conn.execute(select(down.c.id)).scalars())


def delete_messages(conn: Connection, ids: Sequence[int]) -> set[str]:
    """Delete the messages ``ids`` (a whole subtree, see ``subtree``) and the files
    attached to them; the blob hashes those files named, for the caller to sweep after
    the commit."""
    blobs: set[str] = set()
    for part in _chunks(ids):
        named = attachments.c.message_id.in_(part)
        blobs.update(conn.execute(select(attachments.c.sha256).where(named)).scalars())
        conn.execute(delete(attachments).where(named))
    for part in _chunks(ids):
        unlink_parents(conn, _M.id.in_(part))
    for part in _chunks(ids):
        conn.execute(delete(messages).where(_M.id.in_(part)))
    return blobs


def unlink_parents(conn: Connection, where: ColumnElement[bool]) -> None:
    """On SQLite, clear ``parent_id`` of the messages ``where`` selects, all about to be
    deleted: else each deletion cascades into its child, recursively down the branch,
    which SQLite runs as nested triggers: quadratic (13 s for 800 messages, the write
    lock held) and refused past 1,000 levels ("too many levels of trigger recursion").
    No trigger fires on that column. PostgreSQL's cascade has no such limit."""
    if conn.dialect.name == "sqlite":
        conn.execute(
            update(messages).where(where, _M.parent_id.is_not(None)).values(parent_id=None)
        )


def _chunks(ids: Sequence[int]) -> list[Sequence[int]]:
    return [ids[start : start + _CHUNK] for start in range(0, len(ids), _CHUNK)]
