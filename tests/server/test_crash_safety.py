"""kill -9 (and SIGTERM) under load: every exchange a client saw acknowledged is stored.

The store is read only once a server runs on it again: opening a crashed SQLite database
with no server up would fold its write-ahead log away, and the next start rightly refuses
a crashed database whose log went missing (``ops.dbfile``). ``test_crash_rounds`` repeats
the kill 25 times.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import free_port, rows, serve_subprocess
from tests.server.crash_support import Load, integrity, lost_exchanges, server_env, wal_size

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("writer", ["thread", "process"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_a_stop_under_load_loses_no_acknowledged_exchange(
    tmp_path: Path, database_url: str, sig: signal.Signals, writer: str
) -> None:
    with FakeOpenAI() as upstream:
        env = server_env(tmp_path, database_url, upstream.base_url, PARLEY_WRITER=writer)
        port = free_port()
        load = Load(port, workers=8)
        with serve_subprocess(tmp_path, env, port) as process:
            load.start("r0")
            # Under load, then stopped: at least 2 s, and until 60 answers were
            # acknowledged (a busy machine gets there later).
            started = time.monotonic()
            while time.monotonic() - started < 2.0 or (
                len(load.acked) < 60 and time.monotonic() - started < 30.0
            ):
                time.sleep(0.1)
            process.send_signal(sig)
            returncode = process.wait(40)
            load.stop()
        acked = list(load.acked)
        assert len(acked) > 50, "the load did not get going"
        if sig == signal.SIGTERM:
            # A graceful stop: in-flight requests finish, the writer drains, exit 0, and
            # the write-ahead log is folded into the database.
            assert returncode == 0, (tmp_path / "server.log").read_text()
            if database_url.startswith("sqlite"):
                assert not wal_size(database_url)

        # The store opens cleanly again after the stop, and holds every acknowledged answer.
        with serve_subprocess(tmp_path, env, free_port(), "restart.log") as again:
            assert again.poll() is None
            lost = lost_exchanges(database_url, acked)
            assert lost == [], f"{len(lost)} of {len(acked)} acknowledged exchanges were lost"
            requests = rows(database_url, "SELECT count(*) AS n FROM request_log")[0]["n"]
            assert requests >= len(acked)
            if database_url.startswith("sqlite"):
                assert integrity(database_url) == "ok"
