"""kill -9 (and SIGTERM) under load: every exchange a client saw acknowledged is stored.

The store is read only once a server runs on it again: opening a crashed SQLite database
with no server up would fold its write-ahead log away, and the next start rightly refuses
a crashed database whose log went missing (``ops.dbfile``). ``test_crash_rounds`` repeats
the kill 25 times.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
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
    _stop_under_load(tmp_path, database_url, writer, lambda process: process.send_signal(sig), sig)


@pytest.mark.parametrize("writer", ["thread", "process"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_journal_recording_loses_no_acknowledged_exchange(
    tmp_path: Path, database_url: str, sig: signal.Signals, writer: str
) -> None:
    # Acknowledged once on the journal: what the writer had not committed at a kill -9 is
    # replayed by the next start; a graceful stop commits everything and leaves no segment.
    _stop_under_load(
        tmp_path,
        database_url,
        writer,
        lambda process: process.send_signal(sig),
        sig,
        recording="journal",
    )


def test_a_sigterm_to_every_process_of_the_server_loses_nothing(tmp_path: Path) -> None:
    # systemd's stop (KillMode=control-group) and a terminal's Ctrl-C signal every process
    # of the server, its writer's child included: the child leaves the stop to the server
    # and commits everything it is sent.
    def signal_all(process: subprocess.Popen[bytes]) -> None:
        # Children are listed by the thread that started them.
        tasks = Path(f"/proc/{process.pid}/task").glob("*/children")
        children = [int(pid) for task in tasks for pid in task.read_text().split()]
        assert children, "the process writer's child runs"
        for pid in (process.pid, *children):
            os.kill(pid, signal.SIGTERM)

    database_url = f"sqlite:///{tmp_path / 'parley.db'}"
    _stop_under_load(tmp_path, database_url, "process", signal_all, signal.SIGTERM)


def _stop_under_load(
    tmp_path: Path,
    database_url: str,
    writer: str,
    stop: Callable[[subprocess.Popen[bytes]], None],
    sig: signal.Signals,
    recording: str = "durable",
) -> None:
    journal = tmp_path / "data" / "journal"
    with FakeOpenAI() as upstream:
        env = server_env(
            tmp_path,
            database_url,
            upstream.base_url,
            PARLEY_WRITER=writer,
            PARLEY_RECORDING=recording,
        )
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
            stop(process)
            returncode = process.wait(40)
            load.stop()
        acked = list(load.acked)
        assert len(acked) > 50, "the load did not get going"
        if sig == signal.SIGTERM:
            # A graceful stop: in-flight requests finish, the writer drains, exit 0, and
            # the write-ahead log is folded into the database.
            log = (tmp_path / "server.log").read_text()
            assert returncode == 0, log
            # Nothing failed on the way: the writer ran to the end, no request broke.
            assert "recording has stopped" not in log and "Traceback" not in log, log
            if database_url.startswith("sqlite"):
                assert not wal_size(database_url)
        if recording == "journal":
            # A kill leaves the segment being written; a graceful stop deletes it.
            assert bool(list(journal.glob("*.journal"))) == (sig == signal.SIGKILL)

        # The store opens cleanly again after the stop, and holds every acknowledged answer.
        with serve_subprocess(tmp_path, env, free_port(), "restart.log") as again:
            assert again.poll() is None
            lost = lost_exchanges(database_url, acked)
            assert lost == [], f"{len(lost)} of {len(acked)} acknowledged exchanges were lost"
            requests = rows(database_url, "SELECT count(*) AS n FROM request_log")[0]["n"]
            assert requests >= len(acked)
            if database_url.startswith("sqlite"):
                assert integrity(database_url) == "ok"
        if recording == "journal":
            assert not list(journal.glob("*.journal")), "the start replayed the journal"
            # Nothing twice: one attempt per request here, so one row per chain.
            [tally] = rows(
                database_url, "SELECT count(*) AS n, count(DISTINCT chain_id) AS d FROM request_log"
            )
            assert tally["n"] == tally["d"]
            if sig == signal.SIGKILL:
                assert "replayed" in (tmp_path / "restart.log").read_text()
