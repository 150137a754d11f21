"""The branch a chat-API turn sends upstream (``Turn.path``), on SQLite and PostgreSQL:
exactly the messages from the root to the message answered, whatever the tree around it
(forks, edits, answers asked again, another conversation's rows in between) and however
long it is, each with its answer's response row and its files; and read in as many
queries, with as many bound values, on a long branch as on a short one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from parley.domain.messages import Message, chain_hash
from parley.server.identity import Identity
from parley.store.bulk import assign_ids, bulk_insert
from parley.store.conversation_rows import StoredMessage
from parley.store.conversations import Conversation, Conversations, Turn
from parley.store.engine import writer_connection
from parley.store.exchange_lookups import chain_key
from parley.store.history_rows import insert_messages
from parley.store.schema import attachments, messages, responses

ALICE = Identity(user_id=1, api_key_id=10, role="user", via="api_key")
TRUNK = 600  # messages of the long branch: over the old reads' 500-id chunks


@dataclass
class Node:
    """A message as the test made it: what the store must give back for it."""

    key: str
    conversation: Conversation
    parent: Node | None
    role: str
    text: str
    created_at: datetime
    row: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


@dataclass
class Forest:
    nodes: dict[str, Node] = field(default_factory=dict)
    order: list[Node] = field(default_factory=list)

    def add(self, key: str, conversation: Conversation, parent: str | None, role: str) -> None:
        started = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=len(self.order))
        above = None if parent is None else self.nodes[parent]
        node = Node(key, conversation, above, role, f"{role} {key}", started)
        self.nodes[key] = node
        self.order.append(node)

    def branch(self, leaf: str) -> list[Node]:
        """Root to ``leaf``, walked in the test's own records."""
        out: list[Node] = []
        node: Node | None = self.nodes[leaf]
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


@pytest.fixture
def store(migrated_engine: sa.Engine) -> Conversations:
    return Conversations(migrated_engine)


def new(store: Conversations) -> Conversation:
    return store.create(user_id=ALICE.user_id, api_key_id=ALICE.api_key_id, default_model="up/m")


def write(engine: sa.Engine, forest: Forest) -> None:
    """Insert the forest's messages in the order made (so that the ids of conversations
    and branches interleave), a response row per answer and the files named."""
    for node in forest.order:
        message = Message(node.role, node.text)
        above = None if node.parent is None else node.parent.row["chain_hash"]
        chain = chain_hash(above, message.content_hash())
        node.row = {
            "public_id": uuid.uuid4(),
            "conversation_id": node.conversation.id,
            "role": node.role,
            "content": node.text,
            "payload": message.canonical_json().decode(),
            "content_hash": message.content_hash(),
            "chain_hash": chain,
            "chain_key": chain_key(chain),
            "created_at": node.created_at,
            "user_id": ALICE.user_id,
        }
    rows = [node.row for node in forest.order]
    with writer_connection(engine) as conn, conn.begin():
        assign_ids(conn, [(messages, rows)])
        for node in forest.order:
            node.row["parent_id"] = None if node.parent is None else node.parent.row["id"]
        insert_messages(conn, rows)
        answers = [n for n in forest.order if n.role == "assistant"]
        bulk_insert(conn, responses, [response(n) for n in answers])
        files = [(n, name) for n in forest.order for name in n.files]
        if files:
            conn.execute(
                sa.insert(attachments),
                [
                    {
                        "public_id": uuid.uuid4(),
                        # No users row here: the files are the local admin's.
                        "user_id": None,
                        "conversation_id": n.conversation.id,
                        "message_id": n.row["id"],
                        "filename": name,
                        "mime_type": "text/plain",
                        "size": 1,
                        "sha256": "ab" * 32,
                        "created_at": n.created_at,
                    }
                    for n, name in files
                ],
            )


def response(node: Node) -> dict[str, Any]:
    number = len(node.key)
    return {
        "message_id": node.row["id"],
        "model_used": f"model of {node.key}",
        "prompt_tokens": number,
        "completion_tokens": number + 1,
        "total_tokens": 2 * number + 1,
        "finish_reason": "stop" if number % 2 else "length",
        "created_at": node.created_at,
    }


def check(path: list[StoredMessage], expected: list[Node]) -> None:
    """``path`` is ``expected``, message for message, with every field a turn uses."""
    assert [m.content for m in path] == [n.text for n in expected]
    for got, node in zip(path, expected, strict=True):
        parent = node.parent
        assert got.id == node.row["id"] and got.public_id == node.row["public_id"]
        assert got.parent_id == (None if parent is None else parent.row["id"])
        assert got.parent_public_id == (None if parent is None else parent.row["public_id"])
        assert (got.role, got.payload) == (node.role, node.row["payload"])
        assert got.created_at == node.created_at and got.created_at.tzinfo is not None
        assert got.message() == Message(node.role, node.text)
        answered = (
            got.model_used,
            got.prompt_tokens,
            got.completion_tokens,
            got.total_tokens,
            got.finish_reason,
        )
        if node.role == "assistant":
            expected_row = response(node)
            assert answered == tuple(
                expected_row[k]
                for k in (
                    "model_used",
                    "prompt_tokens",
                    "completion_tokens",
                    "total_tokens",
                    "finish_reason",
                )
            )
        else:
            assert answered == (None,) * 5
        assert [a.filename for a in got.attachments] == node.files
        assert all(a.message_id == got.id for a in got.attachments)


def say(store: Conversations, conv: Conversation, text: str, parent: Node) -> Turn:
    turn = store.add_user_message(
        ALICE,
        conv.public_id,
        Message("user", text),
        parent=parent.row["public_id"],
        user_id=ALICE.user_id,
        api_key_id=ALICE.api_key_id,
    )
    assert turn is not None
    return turn


def role(i: int) -> str:
    return "user" if i % 2 == 0 else "assistant"


@pytest.fixture
def forest(store: Conversations, migrated_engine: sa.Engine) -> Forest:
    """Conversation A: a trunk of ``TRUNK`` messages; an edit under answer t99 that grew a
    branch of 60 messages; a second answer to question t300; files on t6, t450 (two)
    and on the edited branch. Conversation B: 200 messages of its own. Rows of all of them
    interleave, as concurrent chats' would."""
    a, b = new(store), new(store)
    f = Forest()
    for i in range(TRUNK):
        f.add(f"t{i}", a, None if i == 0 else f"t{i - 1}", role(i))
        if 100 <= i < 160:
            j = i - 100
            f.add(f"e{j}", a, "t99" if j == 0 else f"e{j - 1}", role(j))
        if i == 301:
            f.add("r301", a, "t300", "assistant")
        if i % 3 == 0:
            k = i // 3
            f.add(f"b{k}", b, None if k == 0 else f"b{k - 1}", role(k))
    f.nodes["t6"].files = ["six.txt"]
    f.nodes["t450"].files = ["first.txt", "second.txt"]
    f.nodes["e10"].files = ["edited.txt"]
    f.nodes["b4"].files = ["other.txt"]
    write(migrated_engine, f)
    return f


def test_a_turn_sends_exactly_its_branch(store: Conversations, forest: Forest) -> None:
    n = forest.nodes
    a, b = n["t0"].conversation, n["b0"].conversation
    for conv, leaf in [
        (a, f"t{TRUNK - 1}"),  # the long branch, to its end
        (a, "e59"),  # the edited branch, forked from t99
        (a, "t98"),  # beside t99: a fork mid-trunk
        (a, "r301"),  # after the second answer to t300
        (a, "t301"),  # after the first
        (a, "t0"),  # the root alone
        (b, "b199"),  # the other conversation, among A's rows
    ]:
        turn = say(store, conv, f"after {leaf}", n[leaf])
        check(turn.path[:-1], forest.branch(leaf))
        assert turn.path[-1] == turn.message and turn.message.content == f"after {leaf}"
        assert turn.path[-1].parent_public_id == n[leaf].row["public_id"]


def test_answering_again_sends_the_branch_up_to_the_question(
    store: Conversations, forest: Forest
) -> None:
    n = forest.nodes
    conv = n["t0"].conversation
    for asked, question in [
        (f"t{TRUNK - 1}", f"t{TRUNK - 2}"),  # an answer: asked again of its question
        ("r301", "t300"),
        ("e59", "e58"),
        ("e58", "e58"),  # a user message: answered (again)
    ]:
        turn = store.answer_again(ALICE, conv.public_id, n[asked].row["public_id"])
        assert turn is not None
        assert turn.message.public_id == n[question].row["public_id"]
        assert turn.chain_hash == n[question].row["chain_hash"]
        check(turn.path, forest.branch(question))


def test_a_branch_continued_through_the_store_keeps_its_messages(
    store: Conversations, forest: Forest
) -> None:
    """Messages the store adds itself are read back like the seeded ones: a turn after a
    turn sees the first one's message in its branch."""
    n = forest.nodes
    conv = n["t0"].conversation
    first = say(store, conv, "a new question", n["t451"])
    second = store.add_user_message(
        ALICE,
        conv.public_id,
        Message("user", "and another"),
        parent=first.message.public_id,
        user_id=ALICE.user_id,
        api_key_id=ALICE.api_key_id,
    )
    assert second is not None
    check(second.path[:-2], forest.branch("t451"))
    assert second.path[-2] == first.message
    assert [m.content for m in second.path[-2:]] == ["a new question", "and another"]
    assert second.path[-2].attachments == () and second.path[-2].model_used is None


@contextmanager
def counting(engine: sa.Engine) -> Iterator[list[int]]:
    """The number of bound values of each statement run on ``engine`` meanwhile."""
    seen: list[int] = []

    def count(conn: Any, cursor: Any, statement: str, params: Any, *rest: Any) -> None:
        seen.append(len(params) if params else 0)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


def test_a_long_branch_is_read_in_as_many_queries_as_a_short_one(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    """A send reads the branch for the model's context. Its ids went back to the
    database as ``IN`` lists (responses, then files in chunks of 500): a query more per
    500 messages and a bound value per message, most of a send's time on a long branch."""
    conv = new(store)
    f = Forest()
    for i in range(TRUNK):
        f.add(f"t{i}", conv, None if i == 0 else f"t{i - 1}", role(i))
    write(migrated_engine, f)
    with counting(migrated_engine) as short:
        say(store, conv, "short", f.nodes["t2"])
    with counting(migrated_engine) as long:
        say(store, conv, "long", f.nodes[f"t{TRUNK - 1}"])
    assert long == short
