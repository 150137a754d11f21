"""Answers from documents (RAG), end to end: a real parley with the real local embedding
model, its background indexer and LanceDB, in front of the fake OpenAI upstream, on a
SQLite file and on PostgreSQL.

The PDF is made by the test. What the model was asked is read from ``FakeOpenAI.received``;
citations from the chat API and the store; vectors from the server's vector store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from parley.search.embedders import LocalEmbedder
from parley.server.app import create_app
from parley.server.state import SERVICES
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, write_config
from tests.search.pdfs import make_pdf

MASTER = "rag-master-key-0123456789"
PASSWORD = "correct horse battery"
MODEL = "up/gpt-4o-mini"
# A's canary: on page 2 of A's PDF, and in a collection of A's with a name B also uses.
VAULT = "The access code for the north vault is HERON-7731."
A_NOTE = "Alpha keeps the spare vault key under the blue ceramic owl, code OWL-4412."
B_NOTE = "Bravo's garden has tomatoes, basil and a small pond with goldfish."


class EmbeddingServer(ParleyServer):
    """``ParleyServer`` with an embedder loaded once for the whole session."""

    def __init__(self, settings: Any, embedder: LocalEmbedder) -> None:
        super().__init__(settings)
        self._embedder = embedder

    async def _start(self) -> None:
        self.app = create_app(self.settings, embedder=self._embedder)
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def server(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI, local_embedder: LocalEmbedder
) -> Iterator[ParleyServer]:
    provider = {
        "name": "up",
        "kind": "openai",
        "base_url": upstream.base_url,
        "models": ["gpt-4o-mini"],
        "list_models": False,
    }
    write_config(
        tmp_path, [provider], extra="[retry]\nattempts = 1\n[search]\npoll_seconds = 0.05\n"
    )
    settings = settings_for(
        tmp_path, database_url, PARLEY_MASTER_KEY=MASTER, PARLEY_SEARCH_EMBEDDER="local"
    )
    with EmbeddingServer(settings, local_embedder) as running:
        yield running


def client(server: ParleyServer, name: str) -> httpx.Client:
    master = {"Authorization": f"Bearer {MASTER}"}
    made = httpx.post(
        f"{server.root}/api/admin/users",
        json={"email": f"{name}@example.org", "username": name, "password": PASSWORD},
        headers=master,
        timeout=10,
    )
    assert made.status_code == 201, made.text
    key = httpx.post(
        f"{server.root}/api/keys", json={"name": "k", "user": name}, headers=master, timeout=10
    )
    assert key.status_code == 201, key.text
    headers = {"Authorization": f"Bearer {key.json()['key']}"}
    return httpx.Client(base_url=f"{server.root}/api", headers=headers, timeout=60)


def upload(http: httpx.Client, name: str, data: bytes, **fields: str) -> dict[str, Any]:
    reply = http.post("/documents", files={"file": (name, data, "application/pdf")}, data=fields)
    assert reply.status_code == 201, reply.text
    body: dict[str, Any] = reply.json()
    return body


def indexed(http: httpx.Client, document: dict[str, Any]) -> dict[str, Any]:
    """The document once the background indexer has embedded it (status transitions)."""
    seen = [document["status"]]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now: dict[str, Any] = http.get(f"/documents/{document['id']}").json()
        if now["status"] != seen[-1]:
            seen.append(now["status"])
        if now["status"] != "pending":
            assert seen == ["pending", "indexed"], seen
            return now
        time.sleep(0.05)
    raise AssertionError(f"document still pending: {seen}")


def conversation(http: httpx.Client) -> str:
    made = http.post("/conversations", json={"default_model": MODEL, "title": "docs"})
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def ask(http: httpx.Client, cid: str, question: str, **extra: Any) -> dict[str, Any]:
    reply = http.post(
        f"/conversations/{cid}/messages", json={"content": question, "stream": False, **extra}
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def sent_upstream(upstream: FakeOpenAI, question: str) -> str:
    """The system text of the last chat request that asked ``question``."""
    for path, _, body in reversed(upstream.received):
        if path.endswith("/chat/completions") and body["messages"][-1]["content"] == question:
            return "\n".join(str(m["content"]) for m in body["messages"] if m["role"] == "system")
    raise AssertionError(f"{question!r} never went upstream")


def test_the_answer_gets_the_right_chunk_and_keeps_its_citation(
    server: ParleyServer, upstream: FakeOpenAI
) -> None:
    with client(server, "alpha") as a:
        cid = conversation(a)
        pdf = make_pdf(
            [
                ["Quarterly report.", "Revenue grew by four percent over the summer months."],
                ["Security appendix.", VAULT],
                ["Cafeteria menu: lentil soup on Mondays, fish on Fridays."],
            ]
        )
        document = upload(a, "handbook.pdf", pdf, conversation_id=cid)
        assert document["status"] == "pending" and document["chunk_count"] == 3
        assert indexed(a, document)["error"] is None

        question = "What is the code to open the north vault?"
        answer = ask(a, cid, question)["assistant_message"]
        system = sent_upstream(upstream, question)
        assert VAULT in system and "[1] handbook.pdf, page 2" in system
        first = answer["citations"][0]
        assert first["document_id"] == document["id"]
        assert (first["index"], first["filename"], first["page"], first["chunk"]) == (
            1,
            "handbook.pdf",
            2,
            1,
        )
        assert 0 < first["score"] <= 1
        # The citations are stored with the answer: the conversation shows them.
        stored = a.get(f"/conversations/{cid}").json()["messages"]
        [kept] = [m for m in stored if m["id"] == answer["id"]]
        assert kept["citations"] == answer["citations"]
        url = server.settings.database_url
        [row] = rows(url, "SELECT page, chunk_ordinal FROM citations WHERE ordinal = 1")
        assert (row["page"], row["chunk_ordinal"]) == (2, 1)

        # Deleting the document deletes its chunks, then (outbox) their vectors; the
        # next answer has no sources, and the old answer keeps its citation, unlinked.
        assert a.delete(f"/documents/{document['id']}").status_code == 200
        assert rows(url, "SELECT count(*) AS n FROM document_chunks")[0]["n"] == 0
        assert server.app is not None
        search = server.app[SERVICES].search
        assert search is not None
        deadline = time.monotonic() + 30
        while search.vectors.chunk_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert search.vectors.chunk_ids() == set()
        again = ask(a, cid, question)["assistant_message"]
        assert again["citations"] == []
        assert VAULT not in sent_upstream(upstream, question)
        stored = a.get(f"/conversations/{cid}").json()["messages"]
        [kept] = [m for m in stored if m["id"] == answer["id"]]
        assert kept["citations"][0]["document_id"] is None
        assert kept["citations"][0]["page"] == 2


def test_b_never_retrieves_a_s_documents(server: ParleyServer, upstream: FakeOpenAI) -> None:
    with client(server, "alpha") as a, client(server, "bravo") as b:
        a_cid = conversation(a)
        indexed(a, upload(a, "a.pdf", make_pdf([["Appendix.", VAULT]]), conversation_id=a_cid))
        indexed(a, upload(a, "a-notes.txt", A_NOTE.encode(), collection="vault"))
        indexed(b, upload(b, "b-notes.txt", B_NOTE.encode(), collection="garden"))
        # A's own retrieval works, from the conversation and from the collection.
        mine = ask(a, a_cid, "Where is the spare vault key?", collections=["vault"])
        assert {c["filename"] for c in mine["assistant_message"]["citations"]} == {
            "a.pdf",
            "a-notes.txt",
        }

        b_cid = conversation(b)
        question = "What is the access code of the north vault, and where is the spare key?"
        # B names A's collection name, and B's own: only B's own document is used.
        answer = ask(b, b_cid, question, collections=["vault", "garden"])
        system = sent_upstream(upstream, question)
        assert "HERON-7731" not in system and "OWL-4412" not in system
        assert B_NOTE in system
        assert {c["filename"] for c in answer["assistant_message"]["citations"]} == {"b-notes.txt"}
        # A conversation of B's without documents: no retrieval at all.
        plain = b.post("/conversations", json={"default_model": MODEL, "title": "t"}).json()["id"]
        asked = "Tell me about the north vault access code."
        assert ask(b, plain, asked)["assistant_message"]["citations"] == []
        assert sent_upstream(upstream, asked) == ""
        # A's conversation is not B's to ask in.
        sent = b.post(
            f"/conversations/{a_cid}/messages", json={"content": question, "stream": False}
        )
        assert sent.status_code == 404


def test_a_document_deleted_while_its_answer_streams_keeps_every_citation(
    server: ParleyServer,
) -> None:
    """Deleted after retrieval, before the answer is committed: the answer still has all
    of its citations, the deleted document's without its id, in ``done`` as in ``GET``
    (the foreign keys used to refuse them all, with only a traceback in the log)."""
    with client(server, "alpha") as a:
        cid = a.post(
            "/conversations", json={"default_model": "up/slow-stream", "title": "docs"}
        ).json()["id"]
        doomed = indexed(a, upload(a, "vault.txt", VAULT.encode(), conversation_id=cid))
        kept = indexed(a, upload(a, "notes.txt", A_NOTE.encode(), conversation_id=cid))
        done: dict[str, Any] = {}
        body = {"content": "What is the code of the north vault?"}
        with a.stream("POST", f"/conversations/{cid}/messages", json=body) as reply:
            assert reply.status_code == 200
            event = None
            for line in reply.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                    if event == "delta" and doomed:
                        # The upstream is answering: retrieval is over.
                        assert a.delete(f"/documents/{doomed['id']}").status_code == 200
                        doomed = {}
                elif line.startswith("data: ") and event == "done":
                    done = orjson.loads(line.removeprefix("data: "))
        assert not doomed and done, "the answer never streamed"
        cited = {c["filename"]: c["document_id"] for c in done["citations"]}
        assert cited == {"vault.txt": None, "notes.txt": kept["id"]}
        [stored] = [m for m in a.get(f"/conversations/{cid}").json()["messages"] if m["citations"]]
        assert stored["id"] == done["id"] and stored["citations"] == done["citations"]
