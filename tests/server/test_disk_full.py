"""Disk full: the store on a small file system that fills up.

Clients get a clear 507 (OpenAI error JSON; an error event in a stream), the server stays
up, nothing is half-written (an exchange is stored whole or not at all), and once space is
freed recording resumes in the same process. On SQLite the database sits on a small
tmpfs; on PostgreSQL the database's tablespace does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import free_port, rows, serve_subprocess
from tests.server.crash_support import integrity, server_env
from tests.small_disk import fill, small_database

pytestmark = pytest.mark.slow

# Big enough that a few answers outgrow whatever free pages the store still has.
PADDING = "lorem ipsum " * 6000


@pytest.fixture(params=["sqlite", "postgresql"])
def small_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(database URL, directory on the small file system to fill)."""
    with small_database(request.param, tmp_path) as store:
        yield store


def _ask(port: int, marker: str, *, stream: bool = False, big: bool = True) -> tuple[int, Any]:
    """One chat request; (status, parsed body), or for a stream (status, last data line)."""
    content = f"{marker} {PADDING}" if big else marker
    messages = [{"role": "user", "content": content}]
    body = {"model": "up/gpt-4o-mini", "stream": stream, "messages": messages}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with httpx.Client(timeout=60) as http:
        if not stream:
            response = http.post(url, json=body)
            return response.status_code, response.json()
        with http.stream("POST", url, json=body) as response:
            data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        last = data[-1]
        return response.status_code, last if last == "[DONE]" else orjson.loads(last)


def _stored_questions(database_url: str) -> set[tuple[str, str]]:
    """("question", marker) for every stored user message, ("answer", marker) for every
    stored echo answer."""
    found = set()
    for row in rows(database_url, "SELECT role, content FROM messages"):
        words = str(row["content"]).split()
        if row["role"] == "user" and words:
            found.add(("question", words[0]))
        elif row["role"] == "assistant" and len(words) > 1:
            found.add(("answer", words[1]))
    return found


def test_a_full_disk_answers_507_and_recording_resumes_once_space_is_freed(
    tmp_path: Path, small_store: tuple[str, Path]
) -> None:
    database_url, small = small_store
    refused: list[str] = []
    acked: list[str] = []
    with FakeOpenAI() as upstream:
        env = server_env(
            tmp_path, database_url, upstream.base_url, PARLEY_DATA_DIR=str(small / "data")
        )
        port = free_port()
        with serve_subprocess(tmp_path, env, port) as process:
            status, _ = _ask(port, "before-0")
            assert status == 200
            acked.append("before-0")

            filler = fill(small)
            errors: list[Any] = []
            stream_error: Any = None
            for i in range(80):
                marker = f"full-{i}"
                # Once the store refuses, a stream too: its error comes as the last event.
                stream = bool(refused) and stream_error is None
                status, answer = _ask(port, marker, stream=stream)
                if stream:
                    assert status == 200
                    if answer == "[DONE]":
                        acked.append(marker)
                    else:
                        stream_error = answer
                        refused.append(marker)
                elif status == 200:
                    acked.append(marker)
                else:
                    assert status == 507, answer
                    errors.append(answer)
                    refused.append(marker)
                if len(errors) >= 3 and stream_error is not None:
                    break
            assert errors, "the store never reported the disk full"
            for error in errors:
                assert error["error"]["code"] == "insufficient_storage"
                assert "disk is full" in error["error"]["message"]
            assert stream_error is not None, "no stream met the full disk"
            assert stream_error["error"]["code"] == "insufficient_storage"
            # A write outside the recorder (the chat API) gets the same clear answer.
            conversation = {"default_model": "up/gpt-4o-mini", "system_prompt": PADDING}
            for _ in range(20):
                created = httpx.post(
                    f"http://127.0.0.1:{port}/api/conversations", json=conversation, timeout=30
                )
                if created.status_code != 201:
                    break
            assert created.status_code == 507, created.text
            assert created.json()["error"]["code"] == "insufficient_storage"
            # The server is up and says so.
            assert process.poll() is None
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
            assert health.status_code == 200 and health.json()["writer"]["running"]

            filler.unlink()
            for i in range(3):
                status, answer = _ask(port, f"after-{i}", stream=i == 1)
                assert status == 200 and (i != 1 or answer == "[DONE]"), answer
                acked.append(f"after-{i}")
            # The same process: no restart was needed.
            assert process.poll() is None

            stored = _stored_questions(database_url)
            for marker in acked:
                assert ("question", marker) in stored and ("answer", marker) in stored, marker
            # Nothing half-written: a refused exchange left neither question nor answer.
            for marker in refused:
                assert ("question", marker) not in stored, marker
                assert ("answer", marker) not in stored, marker
            if database_url.startswith("sqlite"):
                assert integrity(database_url) == "ok"
