"""Keyword search over message content and conversation titles (all of its SQL).

The index is the database's own (migration 0004): FTS5 external-content tables on
SQLite, a generated ``tsvector`` column with a GIN index on PostgreSQL, both maintained
in the transaction that writes the rows, so a committed message is searchable at once
and a deleted one is gone at once. Invariants:

- a query is user text, never search syntax: it is put in Unicode NFC (the form text is
  typed and stored in) and cut into words (runs of letters and digits, with the combining
  marks that follow them: a Devanagari or Thai word, or a decomposed "é", stays one word,
  as PostgreSQL's parser keeps it; FTS5 cuts such a quoted word into a phrase the way it
  cut the text). The words are bound as quoted FTS5 strings or handed to
  ``plainto_tsquery``; every word must match (AND). Quotes, ``*``, ``NEAR``, ``AND``,
  ``OR`` are words or separators like any other;
- the owner filter is inside the query that ranks: a search only ever ranks rows the
  scope may see (``Scope``: one owner's history, NULL for the local / master admin, or
  everyone's for admins); a conversation filter narrows it further, never widens it;
- ranking: bm25 on SQLite, ``ts_rank`` on PostgreSQL; a higher ``score`` is better.
  Messages and titles are ranked apart and merged by score;
- snippets mark matched words between ``MARK_START`` and ``MARK_END`` (private-use
  characters: the caller decides how to render them, e.g. as escaped HTML). They are
  computed for the returned rows only, never for every match.

Every method blocks: call it through ``asyncio.to_thread`` from the event loop.
"""

from __future__ import annotations

import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy
from sqlalchemy import Connection, text

from parley.domain.times import utc
from parley.errors import InvalidRequest

MAX_QUERY = 1000
MAX_LIMIT = 100
MARK_START = "\ue000"
MARK_END = "\ue001"
# Words around a match in a snippet.
_SNIPPET_TOKENS = 16
_HEADLINE = (
    f"StartSel={MARK_START}, StopSel={MARK_END}, MaxWords=24, MinWords=8, "
    'MaxFragments=2, FragmentDelimiter=" … "'
)


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose history a search covers: ``user_id``'s (None: the rows without an owner, the
    local or master admin's), or everyone's (``everyone``, for admins)."""

    user_id: int | None
    everyone: bool = False


@dataclass(frozen=True, slots=True)
class Hit:
    """One result: a message (``kind`` "message") or a conversation title ("title")."""

    kind: str
    score: float
    snippet: str
    conversation_id: uuid.UUID
    conversation_title: str | None
    # The message to jump to; None for a title.
    message_id: uuid.UUID | None
    role: str | None
    created_at: datetime


def words(query: str) -> list[str]:
    """The words of a user's query, checked: a 400 for an empty or too long one."""
    if not query.strip():
        raise InvalidRequest("the search query 'q' must not be empty", "q")
    if len(query) > MAX_QUERY:
        raise InvalidRequest(
            f"the search query 'q' is {len(query)} characters long; the limit is {MAX_QUERY}",
            "q",
        )
    return _words(unicodedata.normalize("NFC", query))


def _words(text: str) -> list[str]:
    """Runs of letters and digits, each with the combining marks that follow its letters
    (``re`` has no class for marks); underscore and punctuation separate words."""
    found: list[str] = []
    word: list[str] = []
    for char in text:
        if char.isalnum() or (word and unicodedata.category(char).startswith("M")):
            word.append(char)
        elif word:
            found.append("".join(word))
            word = []
    if word:
        found.append("".join(word))
    return found


class Search:
    """Keyword search on one engine."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self._engine = engine

    def keyword(
        self,
        query: str,
        scope: Scope,
        *,
        conversation: uuid.UUID | None = None,
        limit: int = 20,
    ) -> list[Hit]:
        """The best ``limit`` messages and titles matching every word of ``query``."""
        terms = words(query)
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequest(f"'limit' must be between 1 and {MAX_LIMIT}", "limit")
        if not terms:
            return []  # only punctuation: nothing can match
        with self._engine.connect() as conn:
            return search(conn, terms, scope, conversation=conversation, limit=limit)


def search(
    conn: Connection,
    terms: list[str],
    scope: Scope,
    *,
    conversation: uuid.UUID | None = None,
    limit: int = 20,
) -> list[Hit]:
    """``Search.keyword`` on an open connection, for checked ``terms``."""
    where, params = _filters(scope, conversation)
    params["limit"] = limit
    if conn.dialect.name == "sqlite":
        params["query"] = " ".join('"' + term.replace('"', '""') + '"' for term in terms)
        found = _sqlite(conn, where, params)
    else:
        params["query"] = " ".join(terms)
        found = _postgresql(conn, where, params)
    found.sort(key=lambda hit: hit.score, reverse=True)
    return found[:limit]


def _filters(scope: Scope, conversation: uuid.UUID | None) -> tuple[str, dict[str, Any]]:
    """SQL conditions on ``c`` (the conversation) for the scope, and their parameters."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if not scope.everyone:
        if scope.user_id is None:
            clauses.append("c.user_id IS NULL")
        else:
            clauses.append("c.user_id = :user_id")
            params["user_id"] = scope.user_id
    if conversation is not None:
        clauses.append("c.public_id = :conversation")
        params["conversation"] = conversation
    return "".join(f" AND {clause}" for clause in clauses), params


def _sqlite(conn: Connection, where: str, params: dict[str, Any]) -> list[Hit]:
    # Uuid columns are stored as 32 hex digits on SQLite.
    if "conversation" in params:
        params["conversation"] = params["conversation"].hex
    # Ranked first, snippets after: FTS5 would compute a snippet for every match before
    # the sort; the second statement computes them for the returned rows only.
    ranked = conn.execute(
        text(
            "SELECT f.rowid, bm25(messages_fts) AS score FROM messages_fts AS f "
            "JOIN messages AS m ON m.id = f.rowid "
            "JOIN conversations AS c ON c.id = m.conversation_id "
            f"WHERE messages_fts MATCH :query{where} ORDER BY score LIMIT :limit"
        ),
        params,
    ).all()
    hits: list[Hit] = []
    message_sql = text(
        "SELECT snippet(messages_fts, 0, :open, :close, '…', :tokens), "
        "m.public_id, m.role, m.created_at, c.public_id, c.title FROM messages_fts AS f "
        "JOIN messages AS m ON m.id = f.rowid JOIN conversations AS c ON c.id = m.conversation_id "
        "WHERE messages_fts MATCH :query AND f.rowid = :rowid"
    )
    marks = {"open": MARK_START, "close": MARK_END, "tokens": _SNIPPET_TOKENS}
    for rowid, score in ranked:
        row = conn.execute(message_sql, {**marks, "query": params["query"], "rowid": rowid}).one()
        hits.append(
            Hit(
                "message",
                -float(score),
                row[0],
                _uuid(row[4]),
                row[5],
                _uuid(row[1]),
                row[2],
                _time(row[3]),
            )
        )
    titles = conn.execute(
        text(
            "SELECT highlight(conversations_fts, 0, :open, :close), bm25(conversations_fts) "
            "AS score, c.public_id, c.title, c.created_at FROM conversations_fts AS f "
            "JOIN conversations AS c ON c.id = f.rowid "
            f"WHERE conversations_fts MATCH :query{where} ORDER BY score LIMIT :limit"
        ),
        {**params, **marks},
    ).all()
    for snippet, score, public_id, title, created_at in titles:
        hits.append(
            Hit(
                "title",
                -float(score),
                snippet,
                _uuid(public_id),
                title,
                None,
                None,
                _time(created_at),
            )
        )
    return hits


def _postgresql(conn: Connection, where: str, params: dict[str, Any]) -> list[Hit]:
    params["options"] = _HEADLINE
    # The headline (a re-parse of the text) is computed for the limited rows only.
    messages = conn.execute(
        text(
            "SELECT ts_headline('simple', m.content, top.q, :options), top.score, "
            "m.public_id, m.role, m.created_at, c.public_id, c.title FROM ("
            "SELECT m.id, ts_rank(m.search_vector, q) AS score, q "
            "FROM messages AS m JOIN conversations AS c ON c.id = m.conversation_id, "
            "plainto_tsquery('simple', :query) AS q "
            f"WHERE m.search_vector @@ q{where} ORDER BY score DESC, m.id DESC LIMIT :limit"
            ") AS top JOIN messages AS m ON m.id = top.id "
            "JOIN conversations AS c ON c.id = m.conversation_id"
        ),
        params,
    ).all()
    hits = [
        Hit("message", float(score), snippet, conv_id, title, message_id, role, _time(created))
        for snippet, score, message_id, role, created, conv_id, title in messages
    ]
    titles = conn.execute(
        text(
            "SELECT ts_headline('simple', c.title, q, :options), ts_rank(c.search_vector, q) "
            "AS score, c.public_id, c.title, c.created_at "
            "FROM conversations AS c, plainto_tsquery('simple', :query) AS q "
            f"WHERE c.search_vector @@ q{where} ORDER BY score DESC, c.id DESC LIMIT :limit"
        ),
        params,
    ).all()
    hits += [
        Hit("title", float(score), snippet, public_id, title, None, None, _time(created))
        for snippet, score, public_id, title, created in titles
    ]
    return hits


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(value)


def _time(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return utc(value)
