"""An answer that fails after part of it went out (a real parley, SQLite only: no store
difference here).

A download whose blob fails to read midway must end in a closed connection, so the client
sees a broken answer: an error response written then would land inside the body, and a
client trusting its Content-Length would wait for bytes that never come or keep a spliced
file. A client that leaves midway is its own business, not an unhandled server error."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest

from parley.chat.attachments import Attachments
from parley.server.files_api import FILES
from parley.server.shutdown import DRAIN
from parley.store.attachments import AttachmentRow
from tests.harness import ParleyServer, settings_for, wait_for

CHUNK = 256 * 1024  # what the download handler reads at a time
BLOB = (b"0123456789abcdef" * (CHUNK // 16)) * 40  # 10 MiB: more than the socket buffers


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ParleyServer]:
    settings = settings_for(
        tmp_path, f"sqlite:///{tmp_path / 'p.db'}", PARLEY_MAX_UPLOAD_BYTES=str(2 * len(BLOB))
    )
    with ParleyServer(settings) as running:
        yield running


def uploaded(server: ParleyServer) -> str:
    with httpx.Client(base_url=server.root, timeout=30) as http:
        sent = http.post("/api/attachments", files={"file": ("big.txt", BLOB, "text/plain")})
    assert sent.status_code == 201, sent.text
    attachment_id: str = sent.json()["id"]
    return attachment_id


class _FailingRead:
    """A blob handle whose reads after the first fail as a bad disk sector would."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._reads = 0

    def read(self, size: int) -> bytes:
        self._reads += 1
        if self._reads > 1:
            raise OSError(errno.EIO, "Input/output error")
        return self._handle.read(size)

    def fileno(self) -> int:
        return self._handle.fileno()

    def close(self) -> None:
        self._handle.close()


def test_a_read_error_midway_closes_the_connection_instead_of_splicing_an_error(
    server: ParleyServer, caplog: pytest.LogCaptureFixture
) -> None:
    attachment_id = uploaded(server)
    assert server.app is not None
    attachments: Attachments = server.app[FILES].attachments
    real_open = attachments.open

    def failing_open(row: AttachmentRow) -> BinaryIO:
        return _FailingRead(real_open(row))  # type: ignore[return-value]

    attachments.open = failing_open  # type: ignore[method-assign]
    received = bytearray()
    with httpx.Client(base_url=server.root, timeout=10) as http:
        url = f"/api/attachments/{attachment_id}/content"
        with pytest.raises(httpx.RemoteProtocolError), http.stream("GET", url) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-length"] == str(len(BLOB))
            for part in answer.iter_bytes():
                received += part
        # What came is the blob's first chunk and nothing else (no error JSON in it).
        assert bytes(received) == BLOB[:CHUNK]
        broke = [r for r in caplog.records if "failed after its answer began" in r.message]
        assert len(broke) == 1 and "Input/output error" in (broke[0].exc_text or "")
        # The server goes on: the next download, read normally, is whole.
        attachments.open = real_open  # type: ignore[method-assign]
        whole = http.get(f"/api/attachments/{attachment_id}/content")
        assert whole.status_code == 200 and whole.content == BLOB


def test_a_client_leaving_a_download_is_not_an_unhandled_error(
    server: ParleyServer, caplog: pytest.LogCaptureFixture
) -> None:
    attachment_id = uploaded(server)
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=server.root, timeout=10) as http:
        with http.stream("GET", f"/api/attachments/{attachment_id}/content") as answer:
            assert answer.status_code == 200
            next(answer.iter_raw(CHUNK))
        # Leaving the block closed the connection with most of the blob unread; the
        # server finishes with it, stays up and logs no error for it.
        assert server.app is not None
        drain = server.app[DRAIN]
        wait_for(lambda: drain.in_flight == 0, timeout=10)
        assert http.get("/healthz").status_code == 200
    server_errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert server_errors == [], [r.getMessage() for r in server_errors]
