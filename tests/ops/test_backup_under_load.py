"""Backups under load: 16 concurrent clients commit exchanges through the real writer while
a backup runs every second. Every backup passes its checks, holds every exchange
acknowledged before it started, and restores (into a fresh database) to exactly the
contents its manifest describes."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from parley.ops.backup import BackupInfo, create_backup, verify_backup
from parley.ops.migrate import upgrade
from parley.ops.restore import restore_backup
from parley.settings import Settings
from parley.store import snapshot
from parley.store.engine import create_engine
from parley.store.exchanges import Recorded
from parley.store.writer import Writer
from tests.conftest import _postgres_database
from tests.harness import rows
from tests.ops.backup_support import backup_settings
from tests.store.test_writer import exchange

pytestmark = pytest.mark.slow

CLIENTS = 16
BACKUPS = 5


class Load:
    """CLIENTS threads, each with its own event loop, submitting one exchange at a time
    and recording its request id once the writer has acknowledged (committed) it."""

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self._lock = threading.Lock()
        self._acked: list[uuid.UUID] = []
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(CLIENTS)]

    def acknowledged(self) -> set[uuid.UUID]:
        with self._lock:
            return set(self._acked)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not self._errors, self._errors

    async def _submit(self, i: int) -> Recorded:
        return await self._writer.submit(exchange(i))

    def _client(self, n: int) -> None:
        loop = asyncio.new_event_loop()
        try:
            i = 0
            while not self._stop.is_set():
                recorded = loop.run_until_complete(self._submit(n * 1_000_000 + i))
                with self._lock:
                    self._acked.extend(recorded.request_public_ids)
                i += 1
                # A busy but bounded load: on two shared cores an unpaced one starves the
                # backup thread of the interpreter, and its database grows by ~2,000 rows
                # a second.
                self._stop.wait(0.01)
        except BaseException as exc:  # reported by __exit__
            self._errors.append(exc)
        finally:
            loop.close()


def request_ids(settings: Settings) -> set[uuid.UUID]:
    return {
        uuid.UUID(str(r["public_id"]))
        for r in rows(settings.database_url, "SELECT public_id FROM request_log")
    }


def summaries(settings: Settings) -> dict[str, Any]:
    engine = create_engine(settings)
    try:
        with engine.connect() as conn:
            return snapshot.table_summaries(conn)
    finally:
        engine.dispose()


def test_backups_under_load_hold_every_acknowledged_exchange(
    tmp_path: Path, database_url: str
) -> None:
    settings = backup_settings(tmp_path, database_url)
    upgrade(settings)
    engine = create_engine(settings)
    writer = Writer(engine)
    writer.start()
    taken: list[tuple[BackupInfo, set[uuid.UUID]]] = []
    try:
        with Load(writer) as load:
            time.sleep(0.3)
            for _ in range(BACKUPS):
                started = time.monotonic()
                before = load.acknowledged()  # recorded before the backup starts
                taken.append((create_backup(settings), before))
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    finally:
        writer.stop(timeout=30)
        engine.dispose()

    acked = [len(before) for _, before in taken]
    assert acked[0] > 0 and acked == sorted(acked) and acked[-1] > acked[0]  # under load
    assert len({info.path for info, _ in taken}) == BACKUPS

    with ExitStack() as stack:
        for n, (info, before) in enumerate(taken):
            manifest = verify_backup(info.path, settings)  # checksums + integrity check
            tables = manifest["database"]["tables"]
            if settings.is_sqlite:
                url = f"sqlite:///{tmp_path / f'restore{n}' / 'parley.db'}"
            else:
                url = stack.enter_context(contextmanager(_postgres_database)())
            fresh = backup_settings(tmp_path / f"restore{n}", url)
            report = restore_backup(fresh, info.path)

            restored = request_ids(fresh)
            assert before <= restored, f"backup {n} lost {len(before - restored)} acknowledged"
            assert summaries(fresh) == tables  # identical per-table contents
            assert report.tables == {t: v["rows"] for t, v in tables.items()}
            assert report.tables["request_log"] >= len(before)
