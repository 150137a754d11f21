"""Answers from documents when the embedder fails, and copies of one document: a real
parley (the real local model, or the fake upstream's embeddings as a remote embedder)
over real HTTP, on a SQLite file and on PostgreSQL.

A failing embedder used to fail every message of a conversation with documents; now the
conversation's own documents are left out with a ``notice``, and named collections are
a 503 before anything is stored. A file uploaded twice used to fill the prompt's slots
with the same passage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from parley.search import rag
from parley.search.embedders import LocalEmbedder
from tests.fakes.openai_upstream import REFUSE_EMBEDDING, FakeOpenAI
from tests.harness import ParleyServer, settings_for, write_config
from tests.search.test_rag import (
    A_NOTE,
    MASTER,
    VAULT,
    EmbeddingServer,
    ask,
    client,
    conversation,
    indexed,
    sent_upstream,
    upload,
)

QUESTION = "What is the code of the north vault?"


class Faulty:
    """The local model, whose queries can be made to fail as a crashed embedding process
    does (``broken``) or to hang (``hung``); documents are still embedded."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self._inner = inner
        self.model = inner.model
        self.dimension = inner.dimension
        self.broken = False
        self.hung = False

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return await self._inner.embed(texts)

    async def embed_query(self, text: str) -> list[float]:
        if self.broken:
            raise BrokenProcessPool("A child process terminated abruptly, /secret/path")
        if self.hung:
            await asyncio.sleep(3600)
        return await self._inner.embed_query(text)


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def configure(tmp_path: Path, upstream: FakeOpenAI, search: str) -> None:
    provider = {
        "name": "up",
        "kind": "openai",
        "base_url": upstream.base_url,
        "models": ["gpt-4o-mini", "embed-8"],
        "list_models": False,
    }
    extra = f"[retry]\nattempts = 1\n[search]\npoll_seconds = 0.05\n{search}"
    write_config(tmp_path, [provider], extra=extra)


@pytest.fixture
def faulty(local_embedder: LocalEmbedder) -> Faulty:
    return Faulty(local_embedder)


@pytest.fixture
def server(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI, faulty: Faulty
) -> Iterator[ParleyServer]:
    configure(tmp_path, upstream, "")
    settings = settings_for(
        tmp_path, database_url, PARLEY_MASTER_KEY=MASTER, PARLEY_SEARCH_EMBEDDER="local"
    )
    with EmbeddingServer(settings, faulty) as running:  # type: ignore[arg-type]
        yield running


@pytest.fixture
def remote(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[ParleyServer]:
    """A server whose embedder is the fake upstream's ``embed-8`` model."""
    configure(tmp_path, upstream, 'embedder = "remote"\nmodel = "up/embed-8"\n')
    settings = settings_for(
        tmp_path, database_url, PARLEY_MASTER_KEY=MASTER, PARLEY_SEARCH_EMBEDDER=""
    )
    with ParleyServer(settings) as running:
        yield running


def _messages(http: httpx.Client, cid: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = http.get(f"/conversations/{cid}").json()["messages"]
    return messages


def _streamed(http: httpx.Client, cid: str, question: str) -> dict[str, Any]:
    """The ``done`` event of a streamed send."""
    body = {"content": question}
    event, done = None, None
    with http.stream("POST", f"/conversations/{cid}/messages", json=body) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
                assert event != "error", line
            elif line.startswith("data: ") and event == "done":
                done = orjson.loads(line.removeprefix("data: "))
    assert done is not None, "no done event"
    return done


def _refused(http: httpx.Client, cid: str, question: str, collection: str) -> dict[str, Any]:
    """A send naming ``collection`` that must be a 503 with nothing stored."""
    before = _messages(http, cid)
    reply = http.post(
        f"/conversations/{cid}/messages",
        json={"content": question, "stream": False, "collections": [collection]},
    )
    assert reply.status_code == 503, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert error["code"] == "search_unavailable"
    assert _messages(http, cid) == before
    return error


def test_a_crashed_local_embedder_answers_without_the_documents_and_says_so(
    server: ParleyServer, upstream: FakeOpenAI, faulty: Faulty, caplog: pytest.LogCaptureFixture
) -> None:
    with client(server, "alpha") as a:
        cid = conversation(a)
        vault = indexed(a, upload(a, "vault.txt", VAULT.encode(), conversation_id=cid))
        indexed(a, upload(a, "notes.txt", A_NOTE.encode(), collection="notes"))
        faulty.broken = True
        caplog.set_level(logging.WARNING, logger="parley.chat.service")

        answer = ask(a, cid, QUESTION)["assistant_message"]
        assert answer["content"] and answer["citations"] == []
        notice = answer["notice"]
        assert "document search failed" in notice and "BrokenProcessPool" in notice
        assert "/secret/path" not in notice
        assert VAULT not in sent_upstream(upstream, QUESTION)
        warnings = [
            r for r in caplog.records if "without its conversation's documents" in r.getMessage()
        ]
        assert len(warnings) == 1 and "/secret/path" not in warnings[0].getMessage()

        # Streamed: the notice is in ``done``. Both answers keep theirs: GET shows them
        # later, so an answer given without the documents never passes for one given
        # from them; the user messages have none.
        done = _streamed(a, cid, "And the code of the south vault?")
        assert done["notice"] == notice and done["citations"] == []
        stored = _messages(a, cid)
        assert [m["role"] for m in stored] == ["user", "assistant"] * 2
        assert done["id"] == stored[-1]["id"] and done == stored[-1]
        assert [m["notice"] for m in stored] == [None, notice, None, notice]

        # A regenerate while it is down is answered the same way, its notice kept too.
        again = a.post(
            f"/conversations/{cid}/messages/{done['id']}/regenerate", json={"stream": False}
        ).json()["assistant_message"]
        assert again["notice"] == notice and again["citations"] == []
        assert [m for m in _messages(a, cid) if m["id"] == again["id"]] == [again]
        a.patch(f"/conversations/{cid}", json={"active_leaf_id": done["id"]})

        # Collections named while it is down: a 503 naming the cause, nothing stored;
        # regenerating with them is refused the same way.
        error = _refused(a, cid, "Where is the spare key?", "notes")
        assert "BrokenProcessPool" in error["message"]
        again = a.post(
            f"/conversations/{cid}/messages/{done['id']}/regenerate",
            json={"stream": False, "collections": ["notes"]},
        )
        assert again.status_code == 503 and len(_messages(a, cid)) == 5

        # Back: the next message finds the document again.
        faulty.broken = False
        answer = ask(a, cid, QUESTION, collections=["notes"])["assistant_message"]
        assert answer["notice"] is None
        assert {c["document_id"] for c in answer["citations"]} >= {vault["id"]}
        assert _messages(a, cid)[-1] == answer
        assert VAULT in sent_upstream(upstream, QUESTION)


def test_a_hung_embedder_is_given_up_on(
    server: ParleyServer, faulty: Faulty, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rag, "EMBED_TIMEOUT_SECONDS", 0.5)
    with client(server, "alpha") as a:
        cid = conversation(a)
        indexed(a, upload(a, "vault.txt", VAULT.encode(), conversation_id=cid))
        faulty.hung = True
        answer = ask(a, cid, QUESTION)["assistant_message"]
        assert answer["citations"] == []
        assert "the embedder did not answer in 0.5 s" in answer["notice"]


def test_a_remote_embedder_that_errors_leaves_the_documents_out(
    remote: ParleyServer, upstream: FakeOpenAI
) -> None:
    """The provider refuses the query's embedding (a 400 here; a 5xx or a refused
    connection is the same path)."""
    with client(remote, "alpha") as a:
        cid = conversation(a)
        indexed(a, upload(a, "vault.txt", VAULT.encode(), conversation_id=cid))
        indexed(a, upload(a, "notes.txt", A_NOTE.encode(), collection="notes"))
        question = f"{QUESTION} {REFUSE_EMBEDDING}"
        answer = ask(a, cid, question)["assistant_message"]
        assert answer["citations"] == [] and answer["content"]
        assert "document search failed" in answer["notice"]
        assert "cannot be embedded" in answer["notice"]
        assert _messages(a, cid)[-1] == answer
        assert VAULT not in sent_upstream(upstream, question)

        error = _refused(a, cid, f"Where is the spare key? {REFUSE_EMBEDDING}", "notes")
        assert "cannot be embedded" in error["message"]
        # The conversation goes on: a message the embedder takes finds the document.
        answer = ask(a, cid, QUESTION, collections=["notes"])["assistant_message"]
        assert answer["notice"] is None and answer["citations"]
        assert VAULT in sent_upstream(upstream, QUESTION)


def test_a_file_uploaded_twice_takes_one_slot(server: ParleyServer, upstream: FakeOpenAI) -> None:
    with client(server, "alpha") as a:
        cid = conversation(a)
        first = indexed(a, upload(a, "vault.txt", VAULT.encode(), conversation_id=cid))
        indexed(a, upload(a, "vault.txt", VAULT.encode(), conversation_id=cid))
        indexed(a, upload(a, "copy.txt", f"  {VAULT}\n".encode(), conversation_id=cid))
        indexed(a, upload(a, "vault.txt", VAULT.encode(), collection="keys"))
        notes = indexed(a, upload(a, "notes.txt", A_NOTE.encode(), conversation_id=cid))
        cited = []
        for collections in ([], ["keys"], []):
            answer = ask(a, cid, QUESTION, collections=collections)["assistant_message"]
            assert sent_upstream(upstream, QUESTION).count("HERON-7731") == 1
            ids = [c["document_id"] for c in answer["citations"]]
            assert ids == [first["id"], notes["id"]]
            assert [c["index"] for c in answer["citations"]] == [1, 2]
            cited.append(answer["citations"])
        # The same copy each time, as GET shows it.
        assert cited[0] == cited[2]
        stored = [m["citations"] for m in _messages(a, cid) if m["role"] == "assistant"]
        assert stored == cited
