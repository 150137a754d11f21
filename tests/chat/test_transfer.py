"""Export and import: parley JSON round trips through a real store (SQLite and PostgreSQL)
to the same trees, OpenAI JSONL follows the active branch, and a ChatGPT export made here
imports with its branches, without its empty, hidden and tool nodes."""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from parley.chat import history, transfer
from parley.domain.messages import Message, chain_of, content_hash_of
from parley.errors import InvalidRequest
from parley.store.schema import users
from tests.harness import rows

T0 = 1_700_000_000.0


def doc(*conversations: dict[str, Any]) -> dict[str, Any]:
    return {"format": "parley", "version": 1, "conversations": list(conversations)}


def msg(
    key: str, parent: str | None, role: str, content: Any, second: int, **extra: Any
) -> dict[str, Any]:
    message = {"role": role, "content": content, **extra.pop("wire", {})}
    entry = {
        "id": key,
        "parent_id": parent,
        "created_at": f"2024-05-01T10:00:{second:02d}.123456Z",
        "model": extra.get("model"),
        "finish_reason": extra.get("finish_reason"),
        "message": message,
    }
    if "notice" in extra:
        entry["notice"] = extra["notice"]
    return entry


BRANCHED = {
    "id": "c1",
    "title": "Branches, tools and pictures",
    "source": "chat",
    "default_model": "up/gpt-4o-mini",
    "system_prompt": "Answer briefly.",
    "archived": False,
    "pinned": True,
    "created_at": "2024-05-01T10:00:00Z",
    "updated_at": "2024-05-01T10:05:00Z",
    "active_leaf_id": "a1",
    "messages": [
        msg("s", None, "system", "You are terse.", 0),
        msg(
            "u1",
            "s",
            "user",
            [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
            1,
        ),
        msg(
            "a1",
            "u1",
            "assistant",
            "A dot.",
            2,
            model="gpt-4o-mini",
            finish_reason="stop",
            notice="document search failed: timeout (answered without your documents)",
        ),
        # Regenerated: a sibling answer, the newer one.
        msg(
            "a2",
            "u1",
            "assistant",
            None,
            3,
            model="o3-mini",
            finish_reason="tool_calls",
            wire={
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "zoom", "arguments": '{"factor": 2}'},
                    }
                ],
                "reasoning_content": "Let me look closer.",
            },
        ),
        msg("t1", "a2", "tool", "zoomed: a cat", 4, wire={"tool_call_id": "call_1"}),
        # An edited first question: a second root.
        msg("u1b", None, "user", "Hello?", 5),
    ],
}


def canonical(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Conversations with ids replaced by positions, without what an import renews."""
    out = []
    for conv in document["conversations"]:
        position = {m["id"]: i for i, m in enumerate(conv["messages"])}
        conv = copy.deepcopy(conv)
        for key in ("id", "source"):
            conv.pop(key)
        conv["active_leaf_id"] = position.get(conv["active_leaf_id"])
        for m in conv["messages"]:
            m["id"] = position[m["id"]]
            m["parent_id"] = position.get(m["parent_id"])
        out.append(conv)
    return out


def export_all(engine: sa.Engine, user_id: int | None = None) -> dict[str, Any]:
    ids = history.user_conversations(engine, user_id)
    result: dict[str, Any] = orjson.loads(history.export(engine, ids, "json"))
    return result


def test_parley_export_imports_back_to_the_same_tree(
    migrated_engine: sa.Engine, database_url: str
) -> None:
    original = doc(BRANCHED)
    [first_id] = history.import_document(migrated_engine, orjson.dumps(original), None, None)
    exported = export_all(migrated_engine)
    assert canonical(exported) == canonical(original)
    [conv] = exported["conversations"]
    assert conv["id"] == str(first_id) and conv["source"] == "import"

    # And the export of that import imports back to the same tree again.
    [second_id] = history.import_document(migrated_engine, orjson.dumps(exported), "parley", None)
    again = export_all(migrated_engine)
    assert [c["id"] for c in again["conversations"]] == [str(first_id), str(second_id)]
    assert canonical(again)[1] == canonical(original)[0]

    # Stored as the exchange writer stores messages: same hashes, same chains.
    stored = rows(
        database_url,
        "SELECT m.role, m.content, m.chain_hash FROM messages m JOIN conversations c "
        "ON c.id = m.conversation_id WHERE c.public_id = :c ORDER BY m.id",
        c=first_id.hex if database_url.startswith("sqlite") else first_id,
    )
    system = Message("system", "You are terse.")
    question = Message(
        "user",
        (
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ),
    )
    answer = Message("assistant", "A dot.")
    hashes = [content_hash_of(m.canonical_json()) for m in (system, question, answer)]
    assert [r["chain_hash"] for r in stored[:3]] == chain_of(hashes)
    assert [r["content"] for r in stored[:3]] == ["You are terse.", "What is this?", "A dot."]
    [response] = rows(
        database_url, "SELECT model_used, request_id, notice FROM responses ORDER BY id LIMIT 1"
    )
    assert response == {
        "model_used": "gpt-4o-mini",
        "request_id": None,
        # An answer's notice (given without its documents) is kept through the round trip.
        "notice": "document search failed: timeout (answered without your documents)",
    }
    # Only answers that have one carry the field.
    [a1, a2] = [m for m in conv["messages"] if m["message"]["role"] == "assistant"]
    assert "notice" in a1 and "notice" not in a2


def test_an_import_is_owned_by_the_importer_and_lands_whole(
    migrated_engine: sa.Engine, database_url: str
) -> None:
    broken = copy.deepcopy(BRANCHED)
    broken["messages"][-1]["message"]["role"] = "robot"
    with pytest.raises(InvalidRequest, match=r"conversations\[1\]\.messages\[5\]\.message\.role"):
        history.import_document(migrated_engine, orjson.dumps(doc(BRANCHED, broken)), None, None)
    assert rows(database_url, "SELECT count(*) AS n FROM conversations") == [{"n": 0}]
    assert rows(database_url, "SELECT count(*) AS n FROM messages") == [{"n": 0}]

    now = datetime.now(UTC)
    with migrated_engine.begin() as conn:
        conn.execute(
            sa.insert(users).values(
                public_id=uuid.uuid4(),
                email="alice@example.com",
                username="alice",
                password_hash="not-a-real-hash",
                role="user",
                is_active=True,
                preferences="{}",
                created_at=now,
                updated_at=now,
            )
        )
    alice = history.user_id_by_name(migrated_engine, "ALICE@example.com")
    assert history.user_id_by_name(migrated_engine, "alice") == alice
    history.import_document(migrated_engine, orjson.dumps(doc(BRANCHED)), "parley", alice)
    assert export_all(migrated_engine)["conversations"] == []  # not the local admin's
    assert len(export_all(migrated_engine, alice)["conversations"]) == 1
    owners = rows(database_url, "SELECT DISTINCT user_id FROM messages")
    assert owners == [{"user_id": alice}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "the import is empty"),
        (b"{nope", "not valid JSON"),
        (b'{"format": "other"}', "not an export parley can import"),
        (b'{"format": "parley", "version": 9, "conversations": []}', "unsupported"),
        (
            orjson.dumps(doc({**BRANCHED, "messages": [msg("a", "b", "user", "x", 0)]})),
            "parent_id must be null or the id of an earlier message",
        ),
        (
            orjson.dumps(doc({**BRANCHED, "active_leaf_id": "zz"})),
            "active_leaf_id must be null or one of its message ids",
        ),
        (orjson.dumps(doc({**BRANCHED, "created_at": "yesterday"})), "ISO 8601"),
    ],
)
def test_bad_imports_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        transfer.import_trees(transfer.parse_json(body))


@pytest.mark.parametrize(
    ("changes", "param", "message"),
    [
        ({"title": 7}, "title", "must be a string or null"),
        ({"title": "t" * 501}, "title", "is longer than 500 characters"),
        ({"default_model": ""}, "default_model", "must be a non-empty string"),
        ({"default_model": ["up/m"]}, "default_model", "must be a non-empty string"),
        ({"default_model": "up/" + "m" * 253}, "default_model", "longer than 255 characters"),
        ({"system_prompt": 3}, "system_prompt", "must be a string"),
        ({"pinned": 1}, "pinned", "must be true or false"),
        ({"archived": 0}, "archived", "must be true or false"),
        ({"archived": "true"}, "archived", "must be true or false"),
        ({"pinned": None}, "pinned", "must be true or false"),
    ],
)
def test_a_parley_conversations_fields_are_checked_as_create_checks_them(
    changes: dict[str, Any], param: str, message: str
) -> None:
    body = orjson.dumps(doc(BRANCHED, {**BRANCHED, **changes}))
    with pytest.raises(InvalidRequest, match=message) as refused:
        transfer.import_trees(transfer.parse_json(body))
    where = f"conversations[1].{param}"
    assert refused.value.param == where and refused.value.message.startswith(f"'{where}'")


def test_an_import_refuses_unknown_fields_and_nul_characters() -> None:
    typo = orjson.dumps(doc({**BRANCHED, "pined": True}))
    with pytest.raises(InvalidRequest, match=r"unknown field\(s\) in conversations\[0\]: 'pined'"):
        transfer.import_trees(transfer.parse_json(typo))
    # Inside a message entry, and inside its message, too.
    entry = {**msg("u", None, "user", "hi", 0), "extra": 1}
    message = msg("u", None, "user", "hi", 0)
    message["message"] = {**message["message"], "colour": "blue"}
    for node, where, name in (
        (entry, r"conversations\[0\]\.messages\[0\]", "extra"),
        (message, r"conversations\[0\]\.messages\[0\]\.message", "colour"),
    ):
        extra = {**BRANCHED, "messages": [node], "active_leaf_id": "u"}
        with pytest.raises(InvalidRequest, match=rf"unknown field\(s\) in {where}: '{name}'"):
            transfer.import_trees(transfer.parse_json(orjson.dumps(doc(extra))))
    for conversation in (
        {**BRANCHED, "system_prompt": "a\u0000b"},
        {**BRANCHED, "messages": [msg("u", None, "user", "a\u0000b", 0)], "active_leaf_id": "u"},
    ):
        with pytest.raises(InvalidRequest, match=r"NUL character") as refused:
            transfer.import_trees(transfer.parse_json(orjson.dumps(doc(conversation))))
        assert refused.value.param == "conversations[0]"


def test_an_imported_title_is_tidied_as_a_created_one() -> None:
    for title, kept in (("  Trip \n  plans ", "Trip plans"), (" ", None)):
        [tree] = transfer.from_parley(doc({**BRANCHED, "title": title}))
        assert tree.title == kept


def test_jsonl_is_one_line_per_conversation_along_the_active_branch() -> None:
    newest = {**BRANCHED, "active_leaf_id": None, "system_prompt": None}
    empty = {**BRANCHED, "messages": [], "active_leaf_id": None}
    trees = transfer.from_parley(doc(BRANCHED, newest, empty))
    lines = transfer.to_openai_jsonl(trees).splitlines()
    assert len(lines) == 2  # a conversation without messages has no line
    first, second = (orjson.loads(line) for line in lines)
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][2] == {"role": "assistant", "content": "A dot."}
    # Without an active leaf, the newest message's branch (the edited question).
    assert second == {"messages": [{"role": "user", "content": "Hello?"}]}
    # The conversation's system prompt leads when no system message does.
    prompted = transfer.from_parley(doc({**BRANCHED, "active_leaf_id": "u1b"}))
    assert orjson.loads(transfer.to_openai_jsonl(prompted))["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello?"},
    ]


# --- ChatGPT ------------------------------------------------------------------------


def node(
    node_id: str,
    parent: str | None,
    children: list[str],
    role: str | None = None,
    parts: list[Any] | None = None,
    offset: float = 0,
    **extra: Any,
) -> dict[str, Any]:
    message = None
    if role is not None:
        message = {
            "id": node_id,
            "author": {"role": role, "name": None, "metadata": {}},
            "create_time": T0 + offset if offset else None,
            "content": extra.pop("content", {"content_type": "text", "parts": parts or []}),
            "status": "finished_successfully",
            "metadata": extra.pop("metadata", {}),
            "recipient": extra.pop("recipient", "all"),
        }
    return {"id": node_id, "message": message, "parent": parent, "children": children}


def chatgpt_export() -> list[dict[str, Any]]:
    mapping = {
        n["id"]: n
        for n in [
            node("root", None, ["sys"]),
            node(
                "sys",
                "root",
                ["ctx"],
                "system",
                [""],
                metadata={"is_visually_hidden_from_conversation": True},
            ),
            node(
                "ctx",
                "sys",
                ["u1"],
                "user",
                offset=0.5,
                content={"content_type": "user_editable_context", "user_profile": "I like cats"},
                metadata={"is_visually_hidden_from_conversation": True},
            ),
            node("u1", "ctx", ["a1", "a1b"], "user", ["Hello"], 1),
            node(
                "a1",
                "u1",
                ["u2"],
                "assistant",
                ["Hi there"],
                2,
                metadata={"model_slug": "gpt-4o", "finish_details": {"type": "stop"}},
            ),
            node("a1b", "u1", [], "assistant", ["Hey!"], 3, metadata={"model_slug": "gpt-4o"}),
            node(
                "u2",
                "a1",
                ["call"],
                "user",
                offset=4,
                content={
                    "content_type": "multimodal_text",
                    "parts": [
                        {
                            "content_type": "image_asset_pointer",
                            "asset_pointer": "file-service://x",
                        },
                        "Tell me a joke",
                    ],
                },
            ),
            node(
                "call",
                "u2",
                ["out"],
                "assistant",
                offset=5,
                recipient="python",
                content={"content_type": "code", "language": "python", "text": "print('joke')"},
            ),
            node(
                "out",
                "call",
                ["a3"],
                "tool",
                offset=6,
                content={"content_type": "execution_output", "text": "joke"},
            ),
            node(
                "a3",
                "out",
                [],
                "assistant",
                ["Why did the cat sit on the computer?"],
                7,
                metadata={"model_slug": "gpt-4o", "finish_details": {"type": "max_tokens"}},
            ),
        ]
    }
    return [
        {
            "title": "Jokes",
            "create_time": T0,
            "update_time": T0 + 7,
            "mapping": mapping,
            "current_node": "a3",
            "conversation_id": "abc",
        },
        # Nothing visible in it: not imported.
        {
            "title": "Empty",
            "create_time": T0,
            "update_time": T0,
            "mapping": {"r": node("r", None, ["s"]), "s": node("s", "r", [], "system", [""])},
            "current_node": "s",
        },
    ]


def test_chatgpt_export_imports_with_branches_and_without_hidden_nodes(
    migrated_engine: sa.Engine,
) -> None:
    raw = orjson.dumps(chatgpt_export())
    assert transfer.detect_format(orjson.loads(raw)) == "chatgpt"
    ids = history.import_document(migrated_engine, raw, None, None)
    assert len(ids) == 1
    [conv] = export_all(migrated_engine)["conversations"]
    assert conv["title"] == "Jokes" and conv["created_at"] == "2023-11-14T22:13:20Z"
    by_id = {m["id"]: m for m in conv["messages"]}
    shape = [
        (
            m["message"]["role"],
            m["message"]["content"],
            by_id[m["parent_id"]]["message"]["content"] if m["parent_id"] else None,
            m["model"],
            m["finish_reason"],
        )
        for m in conv["messages"]
    ]
    assert shape == [
        ("user", "Hello", None, None, None),
        ("assistant", "Hi there", "Hello", "gpt-4o", "stop"),
        ("assistant", "Hey!", "Hello", "gpt-4o", None),
        ("user", "Tell me a joke", "Hi there", None, None),
        ("assistant", "Why did the cat sit on the computer?", "Tell me a joke", "gpt-4o", "length"),
    ]
    assert by_id[conv["active_leaf_id"]]["message"]["content"].startswith("Why did the cat")
    line = orjson.loads(
        history.export(migrated_engine, history.user_conversations(migrated_engine, None), "jsonl")
    )
    assert [m["content"] for m in line["messages"]] == [
        "Hello",
        "Hi there",
        "Tell me a joke",
        "Why did the cat sit on the computer?",
    ]


def test_a_chatgpt_cycle_is_refused() -> None:
    looped = {
        "title": "loop",
        "mapping": {
            "x": node("x", "y", ["y"], "user", ["a"], 1),
            "y": node("y", "x", ["x"], "assistant", ["b"], 2),
        },
    }
    with pytest.raises(InvalidRequest, match="cycle"):
        transfer.from_chatgpt([looped])


def test_a_chatgpt_role_that_is_not_a_string_is_left_out_like_an_unknown_one() -> None:
    [conversation, _] = chatgpt_export()
    odd, unknown = copy.deepcopy(conversation), copy.deepcopy(conversation)
    odd["mapping"]["a1b"]["message"]["author"]["role"] = ["assistant"]
    unknown["mapping"]["a1b"]["message"]["author"]["role"] = "critic"
    [kept] = transfer.from_chatgpt([odd])
    assert kept == transfer.from_chatgpt([unknown])[0]
    assert len(kept.messages) == 4


def test_chatgpt_titles_and_kept_text_are_checked_as_create_checks_them() -> None:
    [conversation, _] = chatgpt_export()
    with pytest.raises(InvalidRequest, match="longer than 500") as refused:
        transfer.from_chatgpt([{**conversation, "title": "t" * 501}])
    assert refused.value.param == "ChatGPT conversation [0].title"
    for title in (5, "a\u0000b"):
        with pytest.raises(InvalidRequest):
            transfer.from_chatgpt([{**conversation, "title": title}])
    nul = copy.deepcopy(conversation)
    nul["mapping"]["a1b"]["message"]["content"]["parts"] = ["He\u0000y"]
    with pytest.raises(InvalidRequest, match="NUL character") as refused:
        transfer.from_chatgpt([nul])
    assert refused.value.param == "ChatGPT conversation [0].mapping['a1b']"
    # A NUL in what is left out (ChatGPT's own tool traffic) refuses nothing.
    hidden = copy.deepcopy(conversation)
    hidden["mapping"]["out"]["message"]["content"]["text"] = "\u0000binary"
    [tree] = transfer.from_chatgpt([hidden])
    assert len(tree.messages) == 5
