"""The exchange repository on SQLite and PostgreSQL: threading, attempts, nothing lost."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa

from parley.domain.exchange import Attempt, Choice, Exchange, ReplyTo
from parley.domain.messages import Message, ToolCall, chain_hashes
from parley.domain.usage import Usage
from parley.store import exchange_lookups
from parley.store.engine import writer_connection
from parley.store.exchanges import (
    Recorded,
    conversation_messages,
    list_requests,
    write_batch,
)
from parley.store.schema import conversations, messages

SYSTEM = Message("system", "Be brief.")


def attempt(number: int = 1, *, ok: bool = True, **fields: Any) -> Attempt:
    base: dict[str, Any] = {
        "provider": "openai",
        "model_used": "gpt-test-2024",
        "started_at": datetime.now(UTC),
        "success": ok,
        "status_code": 200 if ok else 500,
        "response_time_ms": 250.0,
        "usage": Usage(prompt_tokens=11, completion_tokens=7, total_tokens=18),
    }
    base.update(fields)
    return Attempt(number, **base)


def chat(
    messages: Sequence[Message],
    answers: Sequence[str] = ("ok",),
    attempts: Sequence[Attempt] | None = None,
    **fields: Any,
) -> Exchange:
    return Exchange(
        model_requested=fields.pop("model_requested", "gpt-test"),
        messages=tuple(messages),
        started_at=datetime.now(UTC),
        attempts=list(attempts) if attempts is not None else [attempt()],
        choices=[Choice(i, text, finish_reason="stop") for i, text in enumerate(answers)],
        **fields,
    )


def answer(text: str) -> Message:
    return Choice(0, text).message()


def write(engine: sa.Engine, *exchanges: Exchange) -> list[Recorded]:
    with writer_connection(engine) as conn, conn.begin():
        return write_batch(conn, exchanges)


def rows(engine: sa.Engine, sql: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.exec_driver_sql(sql)]


def stateless_rounds() -> list[Exchange]:
    """A client that re-sends its whole history each time, as OpenAI SDK users do."""
    history: list[Message] = [SYSTEM]
    out = []
    for n in (1, 2, 3):
        history.append(Message("user", f"question {n}"))
        out.append(chat(history, [f"answer {n}"]))
        history.append(answer(f"answer {n}"))
    return out


def assert_one_threaded_conversation(engine: sa.Engine, recorded: list[Recorded]) -> None:
    [conversation] = rows(engine, "SELECT * FROM conversations")
    assert {r.conversation_id for r in recorded} == {conversation["id"]}
    messages = rows(engine, "SELECT * FROM messages ORDER BY id")
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Be brief."),
        ("user", "question 1"),
        ("assistant", "answer 1"),
        ("user", "question 2"),
        ("assistant", "answer 2"),
        ("user", "question 3"),
        ("assistant", "answer 3"),
    ]
    # One chain: every message's parent is the one before it.
    assert [m["parent_id"] for m in messages] == [None] + [m["id"] for m in messages[:-1]]
    assert {m["conversation_id"] for m in messages} == {conversation["id"]}
    # The stored chain hashes are the ones the client's next request will carry.
    history = [Message(m["role"], m["content"]) for m in messages]
    assert [m["chain_hash"] for m in messages] == chain_hashes(history)
    # Every answer links to the request row of its own exchange.
    responses = rows(engine, "SELECT * FROM responses ORDER BY id")
    assistants = [m for m in messages if m["role"] == "assistant"]
    assert [r["message_id"] for r in responses] == [m["id"] for m in assistants]
    assert [r["request_id"] for r in responses] == [r.request_ids[0] for r in recorded]
    assert [m["request_id"] for m in assistants] == [r.request_ids[0] for r in recorded]
    requests = rows(engine, "SELECT * FROM request_log ORDER BY id")
    assert [r["conversation_id"] for r in requests] == [conversation["id"]] * 3


def test_stateless_client_resending_history_threads_one_conversation(
    migrated_engine: sa.Engine,
) -> None:
    recorded = [write(migrated_engine, exchange)[0] for exchange in stateless_rounds()]
    assert_one_threaded_conversation(migrated_engine, recorded)
    assert [len(r.message_ids) for r in recorded] == [3, 2, 2]


def test_threading_works_within_one_batch(migrated_engine: sa.Engine) -> None:
    recorded = write(migrated_engine, *stateless_rounds())
    assert_one_threaded_conversation(migrated_engine, recorded)


def test_only_messages_after_an_answer_get_a_lookup_key(migrated_engine: sa.Engine) -> None:
    # A client that starts over with a system and a user message, then continues.
    recorded = [write(migrated_engine, exchange)[0] for exchange in stateless_rounds()]
    messages = rows(migrated_engine, "SELECT role, content, chain_key FROM messages ORDER BY id")
    unkeyed = [(m["role"], m["content"]) for m in messages if m["chain_key"] == 0]
    assert unkeyed == [("system", "Be brief."), ("user", "question 1")]
    # The continuations found their conversation through the keyed messages alone.
    assert len({r.conversation_id for r in recorded}) == 1
    with migrated_engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            # The lookup reads the partial index (a full scan would grow with the table).
            lookup = exchange_lookups._MATCHES_SQL.format(marks="?, ?")
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {lookup}", (5, 7)).all()
            assert any("ix_messages_chain_key" in str(row) for row in plan), plan
        entries = conn.exec_driver_sql(
            "SELECT count(*) FROM messages WHERE chain_key <> 0"
        ).scalar_one()
    assert entries == len(messages) - 2


def test_two_clients_saying_hi_get_two_conversations(migrated_engine: sa.Engine) -> None:
    hi = [Message("user", "Hi")]
    first = write(migrated_engine, chat(hi, ["Hello!"]))[0]
    second = write(migrated_engine, chat(hi, ["Hello!"]))[0]
    assert first.conversation_id != second.conversation_id
    assert len(rows(migrated_engine, "SELECT id FROM conversations")) == 2
    # A follow-up re-sending "Hi", "Hello!" continues the newest of the two.
    follow = write(migrated_engine, chat([*hi, answer("Hello!"), Message("user", "Bye")]))[0]
    assert follow.conversation_id == second.conversation_id


def test_identical_histories_of_two_users_never_merge(migrated_engine: sa.Engine) -> None:
    history = [Message("user", "Hi"), answer("Hello!"), Message("user", "Weather?")]
    alice = write(migrated_engine, chat(history[:1], ["Hello!"], user_id=1))[0]
    bob = write(migrated_engine, chat(history[:1], ["Hello!"], user_id=2))[0]
    alice_next = write(migrated_engine, chat(history, user_id=1))[0]
    bob_next = write(migrated_engine, chat(history, user_id=2))[0]
    assert alice_next.conversation_id == alice.conversation_id
    assert bob_next.conversation_id == bob.conversation_id != alice.conversation_id


def test_resending_the_same_request_adds_a_sibling_answer(migrated_engine: sa.Engine) -> None:
    history = [Message("user", "Hi"), answer("Hello!"), Message("user", "Joke?")]
    write(migrated_engine, chat(history[:1], ["Hello!"]))
    first = write(migrated_engine, chat(history, ["Knock knock."]))[0]
    again = write(migrated_engine, chat(history, ["Why did the chicken..."]))[0]
    assert again.conversation_id == first.conversation_id
    assert len(again.message_ids) == 1  # only the new answer
    by_id = {m["id"]: m for m in rows(migrated_engine, "SELECT * FROM messages")}
    assert by_id[again.message_ids[0]]["parent_id"] == by_id[first.message_ids[-1]]["parent_id"]


def test_fallback_chain_records_every_attempt(migrated_engine: sa.Engine) -> None:
    exchange = chat(
        [Message("user", "Hi")],
        ["Hello from the fallback"],
        attempts=[
            attempt(
                1,
                ok=False,
                status_code=429,
                error_type="rate_limit",
                error_message="slow down",
                provider="primary",
                usage=Usage(),
            ),
            attempt(2, provider="backup", model_used="backup-model"),
        ],
    )
    [recorded] = write(migrated_engine, exchange)
    requests = rows(migrated_engine, "SELECT * FROM request_log ORDER BY attempt")
    summary = [(r["attempt"], bool(r["success"]), r["error_type"], r["provider"]) for r in requests]
    assert summary == [
        (1, False, "rate_limit", "primary"),
        (2, True, None, "backup"),
    ]
    assert {str(r["chain_id"]).replace("-", "") for r in requests} == {exchange.chain_id.hex}
    assert [r["id"] for r in requests] == list(recorded.request_ids)
    [response] = rows(migrated_engine, "SELECT * FROM responses")
    assert response["request_id"] == requests[1]["id"]
    assert response["model_used"] == "backup-model"
    assert (response["prompt_tokens"], response["completion_tokens"]) == (11, 7)
    messages = rows(migrated_engine, "SELECT * FROM messages ORDER BY id")
    assert {m["request_id"] for m in messages} == {requests[1]["id"]}
    assert {r["conversation_id"] for r in requests} == {recorded.conversation_id}


def test_an_answer_whose_conversation_was_deleted_keeps_its_attempts(
    migrated_engine: sa.Engine,
) -> None:
    # Two chat-API answers: one to a conversation its owner deleted while the answer was
    # being made, one to a message deleted meanwhile; and one answer whose place exists.
    kept, gone, pruned = (
        write(migrated_engine, chat([SYSTEM, Message("user", f"q{n}")]))[0] for n in range(3)
    )

    def reply(to: Recorded, parent: int) -> Exchange:
        assert to.conversation_id is not None and to.conversation_public_id is not None
        return chat(
            [],
            [f"answer to {to.conversation_id}"],
            reply_to=ReplyTo(to.conversation_id, to.conversation_public_id, parent, "h"),
        )

    replies = [reply(kept, kept.message_ids[-1]), reply(gone, gone.message_ids[-1])]
    replies.append(reply(pruned, pruned.message_ids[-1]))
    with migrated_engine.begin() as conn:
        conn.execute(sa.delete(conversations).where(conversations.c.id == gone.conversation_id))
        conn.execute(sa.delete(messages).where(messages.c.id == pruned.message_ids[-1]))
    recorded = write(migrated_engine, *replies)  # one batch: the others are not sunk
    answers = rows(migrated_engine, "SELECT content FROM messages WHERE role = 'assistant'")
    assert [a["content"] for a in answers if a["content"].startswith("answer to")] == [
        f"answer to {kept.conversation_id}"
    ]
    logged = rows(migrated_engine, "SELECT id, conversation_id FROM request_log ORDER BY id")
    assert [r["conversation_id"] for r in logged[-3:]] == [kept.conversation_id, None, None]
    assert [r.answer_public_ids == () for r in recorded] == [False, True, True]


def test_failed_exchange_keeps_what_the_user_sent(migrated_engine: sa.Engine) -> None:
    failed = chat(
        [SYSTEM, Message("user", "Are you there?")],
        answers=[],
        attempts=[attempt(1, ok=False, error_type="server_error", error_message="boom")],
    )
    [recorded] = write(migrated_engine, failed)
    [request] = rows(migrated_engine, "SELECT * FROM request_log")
    assert not request["success"] and request["error_message"] == "boom"
    messages = rows(migrated_engine, "SELECT * FROM messages ORDER BY id")
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Be brief."),
        ("user", "Are you there?"),
    ]
    assert {m["request_id"] for m in messages} == {request["id"]}
    assert rows(migrated_engine, "SELECT * FROM responses") == []
    assert recorded.answer_public_ids == ()


def test_disconnect_mid_stream_keeps_the_partial_answer(migrated_engine: sa.Engine) -> None:
    cut = chat(
        [Message("user", "Tell me a story")],
        attempts=[attempt(1, ok=False, error_type="cancelled")],
    )
    cut.choices = [
        Choice(0, "Once upon a", finish_reason="cancelled"),
        Choice(1, "", finish_reason="cancelled"),  # nothing arrived: nothing to keep
    ]
    write(migrated_engine, cut)
    assistant = rows(migrated_engine, "SELECT * FROM messages WHERE role = 'assistant'")
    assert [m["content"] for m in assistant] == ["Once upon a"]
    [response] = rows(migrated_engine, "SELECT * FROM responses")
    assert response["finish_reason"] == "cancelled"


def test_embeddings_write_only_the_request_log(migrated_engine: sa.Engine) -> None:
    exchange = chat([Message("user", "embed me")], answers=[], endpoint="embeddings")
    [recorded] = write(migrated_engine, exchange)
    assert recorded.conversation_id is None and recorded.message_ids == ()
    [request] = rows(migrated_engine, "SELECT * FROM request_log")
    assert request["endpoint"] == "embeddings" and request["conversation_id"] is None
    assert rows(migrated_engine, "SELECT * FROM conversations") == []
    assert rows(migrated_engine, "SELECT * FROM messages") == []


def test_request_fields_usage_and_payload_are_stored(migrated_engine: sa.Engine) -> None:
    tool_call = ToolCall(id="call_1", name="lookup", arguments='{"q": "x"}')
    exchange = chat(
        [Message("user", ({"type": "text", "text": "look"}, {"type": "image_url", "x": 1}))],
        model_requested="alias",
        is_streaming=True,
        max_tokens=64,
        temperature=0.5,
        top_p=0.9,
        origin="203.0.113.7",
        user_id=7,
        api_key_id=3,
    )
    exchange.choices = [
        Choice(0, "", reasoning="thinking", tool_calls=(tool_call,), finish_reason="tool_calls")
    ]
    write(migrated_engine, exchange)
    [request] = rows(migrated_engine, "SELECT * FROM request_log")
    assert {
        k: request[k]
        for k in (
            "model_requested",
            "max_tokens",
            "temperature",
            "top_p",
            "message_count",
            "endpoint",
            "client_protocol",
            "origin",
            "user_id",
            "api_key_id",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
        )
    } == {
        "model_requested": "alias",
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "message_count": 1,
        "endpoint": "chat",
        "client_protocol": "openai",
        "origin": "203.0.113.7",
        "user_id": 7,
        "api_key_id": 3,
        "model": "gpt-test-2024",
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "total_tokens": 18,
    }
    assert bool(request["is_streaming"])
    user, assistant = rows(migrated_engine, "SELECT * FROM messages ORDER BY id")
    assert user["content"] == "look"
    assert orjson.loads(user["payload"])["content"][1] == {"type": "image_url", "x": 1}
    payload = orjson.loads(assistant["payload"])
    assert payload["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"q": "x"}'}
    assert payload["reasoning_content"] == "thinking"
    [conversation] = rows(migrated_engine, "SELECT * FROM conversations")
    assert (conversation["source"], conversation["default_model"]) == ("api", "alias")
    assert (conversation["user_id"], conversation["api_key_id"]) == (7, 3)
    assert conversation["title"] is None


def test_read_helpers_return_what_was_written(migrated_engine: sa.Engine) -> None:
    recorded = write(migrated_engine, *stateless_rounds())
    with migrated_engine.connect() as conn:
        requests = list_requests(conn, limit=2)
        assert [r.id for r in requests] == [recorded[2].request_ids[0], recorded[1].request_ids[0]]
        assert requests[0].public_id == recorded[2].request_public_ids[0]
        public_id = recorded[0].conversation_public_id
        assert public_id is not None
        thread = conversation_messages(conn, public_id)
    assert [m.role for m in thread] == ["system", "user", "assistant"] * 1 + [
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    answers = [m for m in thread if m.role == "assistant"]
    assert [m.public_id for m in answers] == [r.answer_public_ids[0] for r in recorded]
    assert [m.response_request_id for m in answers] == [r.request_ids[0] for r in recorded]
    assert {m.model_used for m in answers} == {"gpt-test-2024"}


def test_a_large_batch_goes_in_few_statements_with_every_row_intact(
    migrated_engine: sa.Engine,
) -> None:
    """On SQLite the writer's rows go in multi-row statements, not one step per row: the
    driver gives up the GIL at every step, and a busy event loop makes each re-take wait."""
    batch = [chat([SYSTEM, Message("user", f"question {i}")], [f"answer {i}"]) for i in range(150)]
    statements: list[str] = []
    with writer_connection(migrated_engine) as conn, conn.begin():
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.connection.driver_connection.set_trace_callback(statements.append)  # type: ignore[union-attr]
        recorded = write_batch(conn, batch)
        if sqlite:
            conn.connection.driver_connection.set_trace_callback(None)  # type: ignore[union-attr]
    if sqlite:
        inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
        # 150 conversations, requests and answers, 450 messages with their search rows:
        # 1,800 rows, in chunks of 64 and the rest (under 64 a table) one by one.
        assert 18 <= len(inserts) <= 6 * 63 + 1800 // 64, len(inserts)
    assert len(recorded) == 150
    messages = rows(migrated_engine, "SELECT id, role, content FROM messages ORDER BY id")
    assert len(messages) == 450
    assert [m["content"] for m in messages[1::3]] == [f"question {i}" for i in range(150)]
    assert [m["content"] for m in messages[2::3]] == [f"answer {i}" for i in range(150)]
    assert rows(migrated_engine, "SELECT count(*) AS n FROM request_log") == [{"n": 150}]
    if sqlite:
        found = rows(
            migrated_engine,
            "SELECT count(*) AS n FROM messages_fts WHERE messages_fts MATCH 'answer'",
        )
        assert found == [{"n": 150}]
        assert rows(migrated_engine, "SELECT count(*) AS n FROM search_outbox") == [{"n": 450}]
