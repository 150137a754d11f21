"""A vector store whose files are damaged, missing or in the way, through a real server
and the real commands, on a SQLite file and on PostgreSQL. The embedder is the fake
upstream's ``embed-8`` model (a remote embedder), so that the commands embed too.

A damaged store used to answer semantic searches with a 500 and a traceback (a table's
directory emptied) or with "the semantic index is being built" (a file cut short or
overwritten: the failed read was remembered as an empty store), fail chat retrieval the
same way, log the indexer's traceback at every retry, and make ``parley reindex``, even
``--full``, print LanceDB's traceback. Now: semantic search is a 503
``search_unavailable`` that names the cause without the store's location, hybrid answers
by words with a notice, keyword search and chat go on (a conversation's documents left
out, with a notice), the indexer logs one line per retry and keeps its outbox rows, the
commands print one line and exit 1, and ``parley reindex --full`` rebuilds the store."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from click.testing import CliRunner, Result

from parley.cli.main import cli
from parley.ops.migrate import upgrade
from parley.search.vectors import VectorStore
from parley.server.state import SERVICES
from parley.settings import Settings
from tests.cli.test_environment_errors import DROP_READ, _permission_bits_apply
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, free_port, rows, settings_for, wait_for
from tests.search.test_rag import MASTER, VAULT, client, conversation, indexed, upload
from tests.search.test_rag_failures import configure

QUESTION = "What is the code of the north vault?"
QUEUED = "SELECT count(*) AS n FROM search_outbox"


def _garbage(store: Path) -> None:
    """Every file overwritten (a bad restore, a disk's garbage): nothing can be opened."""
    for path in store.rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage" * 8)


def _truncated(store: Path) -> None:
    """The data files cut short (a copy interrupted, a full disk)."""
    for path in store.glob("*.lance/data/*"):
        with path.open("r+b") as file:
            file.truncate(5)


def _tables_gone(store: Path) -> None:
    """The messages' and chunks' tables' files removed, their directories left (a careless
    clean-up); ``meta`` stays."""
    for table in ("messages.lance", "chunks.lance"):
        for path in (store / table).iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()


DAMAGES: dict[str, Callable[[Path], None]] = {
    "garbage": _garbage,
    "truncated": _truncated,
    "tables gone": _tables_gone,
}


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def settings(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Settings:
    configure(tmp_path, upstream, 'embedder = "remote"\nmodel = "up/embed-8"\n')
    # "": the config file's embedder, not the harness's "none".
    return settings_for(tmp_path, database_url, PARLEY_MASTER_KEY=MASTER, PARLEY_SEARCH_EMBEDDER="")


def _command(settings: Settings, *args: str) -> Result:
    env = {
        "PARLEY_CONFIG": str(settings.config_path),
        "PARLEY_DATA_DIR": str(settings.data_dir),
        "DATABASE_URL": settings.database_url,
        "PARLEY_SEARCH_EMBEDDER": "",
    }
    return CliRunner().invoke(cli, list(args), env=env)


def _refused(result: Result, store: Path) -> str:
    """The one line of a command that refused the store: exit 1, no traceback."""
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code == 1 and result.stdout == "", result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: cannot use the vector store {store}: ")
    return result.stderr


def _ask(http: httpx.Client, cid: str) -> dict[str, Any]:
    reply = http.post(f"/conversations/{cid}/messages", json={"content": QUESTION, "stream": False})
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()["assistant_message"]
    return answer


def _search(http: httpx.Client, mode: str) -> httpx.Response:
    return http.get("/search", params={"q": QUESTION, "mode": mode})


def _semantic_hits(settings: Settings) -> list[dict[str, Any]]:
    found = _command(settings, "search", QUESTION, "--mode", "semantic", "--json")
    assert found.exit_code == 0, found.output
    hits: list[dict[str, Any]] = orjson.loads(found.stdout)
    return hits


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_vector_store_is_a_clear_error_and_reindex_full_rebuilds_it(
    tmp_path: Path,
    database_url: str,
    settings: Settings,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Path(settings.vector_uri)
    with ParleyServer(settings) as server:
        alpha = client(server, "alpha")
        headers = dict(alpha.headers)
        with alpha:
            cid = conversation(alpha)
            indexed(alpha, upload(alpha, "vault.txt", VAULT.encode(), conversation_id=cid))
            assert _ask(alpha, cid)["citations"]
            wait_for(lambda: rows(database_url, QUEUED)[0]["n"] == 0, timeout=30)
            assert _search(alpha, "semantic").status_code == 200

    DAMAGES[damage](store)
    caplog.set_level(logging.WARNING, logger="parley")
    with (
        ParleyServer(settings) as server,
        httpx.Client(base_url=f"{server.root}/api", headers=headers, timeout=60) as alpha,
    ):
        semantic = _search(alpha, "semantic")
        assert semantic.status_code == 503, semantic.text
        error = semantic.json()["error"]
        assert error["code"] == "search_unavailable"
        assert error["message"].startswith("the semantic index could not be read (")
        assert "parley reindex --full" in error["message"]
        assert str(tmp_path) not in error["message"]
        hybrid = _search(alpha, "hybrid")
        assert hybrid.status_code == 200, hybrid.text
        assert hybrid.json()["mode"] == "keyword" and hybrid.json()["data"]
        assert "could not be read" in hybrid.json()["notice"]
        assert str(tmp_path) not in hybrid.json()["notice"]
        keyword = _search(alpha, "keyword")
        assert keyword.status_code == 200 and keyword.json()["data"]

        # Chat goes on without the conversation's documents, and says why.
        answer = _ask(alpha, cid)
        assert answer["content"] and answer["citations"] == []
        assert "the vector store could not be read" in answer["notice"]
        assert str(tmp_path) not in answer["notice"]

        # The indexer cannot write the new messages' vectors: their rows stay queued.
        indexer = server.app[SERVICES].search.indexer  # type: ignore[index,union-attr]
        wait_for(lambda: indexer.failures >= 2, timeout=30)
        assert rows(database_url, QUEUED)[0]["n"] >= 1

    logged = [r for r in caplog.records if r.name.startswith("parley")]
    assert not [r for r in logged if r.exc_info], "a traceback was logged"
    failed = [r for r in logged if r.name == "parley.search.indexer"]
    assert failed and all(f"cannot use the vector store {store}" in r.getMessage() for r in failed)
    assert rows(database_url, "SELECT count(*) AS n FROM messages")[0]["n"] == 4

    assert "parley reindex --full" in _refused(_command(settings, "reindex"), store)
    _refused(_command(settings, "search", QUESTION, "--mode", "semantic"), store)
    rebuilt = _command(settings, "reindex", "--full")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "emptied" in rebuilt.stdout
    assert rows(database_url, QUEUED)[0]["n"] == 0
    # Both questions are found again, the one asked while the store was damaged too.
    asked = [hit for hit in _semantic_hits(settings) if hit["snippet"] == QUESTION]
    assert len(asked) == 2, asked


def test_a_file_where_the_vector_store_should_be(
    tmp_path: Path, database_url: str, settings: Settings
) -> None:
    """Not parley's to remove: every answer names it, ``reindex --full`` included."""
    store = Path(settings.vector_uri)
    with ParleyServer(settings) as server:
        alpha = client(server, "alpha")
        with alpha:
            cid = conversation(alpha)
            _ask(alpha, cid)
            wait_for(lambda: rows(database_url, QUEUED)[0]["n"] == 0, timeout=30)
            shutil.rmtree(store)
            store.write_text("someone's notes")
            semantic = _search(alpha, "semantic")
            assert semantic.status_code == 503, semantic.text
            assert semantic.json()["error"]["message"] == (
                "the semantic index could not be read (it is a file, not a directory); "
                "use mode=keyword meanwhile"
            )
            assert _search(alpha, "hybrid").json()["mode"] == "keyword"
    for args in (("reindex",), ("reindex", "--full"), ("search", QUESTION)):
        line = _refused(_command(settings, *args), store)
        assert line.endswith(": it is a file, not a directory\n"), line
    assert store.read_text() == "someone's notes"


def test_maintenance_reports_a_damaged_vector_store(settings: Settings) -> None:
    """Its compaction step fails and its check cannot run, each said in its line of the
    report; the other steps and checks run (it used to stop on LanceDB's traceback)."""
    upgrade(settings)
    VectorStore.open(settings.vector_uri).prepare("test/any-4", 4)
    store = Path(settings.vector_uri)
    _garbage(store)
    report = _command(settings, "maintenance")
    assert isinstance(report.exception, SystemExit), report.exc_info
    assert report.exit_code == 3, report.output
    failed = f"cannot use the vector store {store}: its files are damaged or missing"
    assert f"FAILED   vector store: {failed}" in report.stdout
    assert "PROBLEM  vectors without rows: could not run" in report.stdout
    assert "DONE     vacuum" in report.stdout and "OK       foreign keys" in report.stdout


def test_a_vector_store_the_server_may_not_read(
    tmp_path: Path, database_url: str, settings: Settings
) -> None:
    """Permissions taken away from the store's directory: as root, the server runs without
    the capabilities that pass permission bits (``setpriv``), or the test is skipped."""
    if not _permission_bits_apply(tmp_path):
        pytest.skip("permission bits do not stop this user, and setpriv cannot drop that")
    store = Path(settings.vector_uri)
    with ParleyServer(settings) as server, client(server, "alpha") as alpha:
        headers = dict(alpha.headers)
        _ask(alpha, conversation(alpha))
        wait_for(lambda: rows(database_url, QUEUED)[0]["n"] == 0, timeout=30)
    store.chmod(0o000)
    port = free_port()
    env = {
        "PARLEY_CONFIG": str(settings.config_path),
        "PARLEY_DATA_DIR": str(settings.data_dir),
        "DATABASE_URL": settings.database_url,
        "PARLEY_SEARCH_EMBEDDER": "",
        "PARLEY_MASTER_KEY": MASTER,
        "PARLEY_LOG_LEVEL": "WARNING",
    }
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "parley", "serve", "--port", str(port)]
    if os.geteuid() == 0:
        command = [*DROP_READ, *command]
    try:
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, cwd=tmp_path, env={**os.environ, **env}, stdout=out, stderr=out
            )
        try:
            root = f"http://127.0.0.1:{port}"
            wait_for(lambda: _healthy(root), timeout=60)
            with httpx.Client(base_url=f"{root}/api", headers=headers, timeout=60) as alpha:
                semantic = _search(alpha, "semantic")
                assert semantic.status_code == 503, semantic.text
                assert semantic.json()["error"] == {
                    "message": "the semantic index could not be read (Permission denied); "
                    "use mode=keyword meanwhile",
                    "type": "service_unavailable",
                    "param": None,
                    "code": "search_unavailable",
                }
                assert _search(alpha, "hybrid").json()["mode"] == "keyword"
                assert _search(alpha, "keyword").json()["data"]
        finally:
            process.terminate()
            process.wait(30)
    finally:
        store.chmod(0o700)
    logged = log.read_text()
    assert "Traceback" not in logged, logged
    assert f"cannot use the vector store {store}: Permission denied" in logged


def _healthy(root: str) -> bool:
    try:
        return httpx.get(f"{root}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
