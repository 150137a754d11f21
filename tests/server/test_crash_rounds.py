"""Rounds of kill -9 at a random moment under concurrent streaming load, each followed by
a restart: no acknowledged exchange is ever lost and the SQLite file stays sound.

Each round starts ``parley serve`` on the store the previous round killed, checks that
every exchange acknowledged so far is there (and ``PRAGMA integrity_check`` on SQLite),
puts it under load from 6 clients (60 % streaming), and kills it 0.2 to 1.2 s later.
The store is read only while a server runs on it (see ``test_crash_safety``). The seed is
in the failure message; ``PARLEY_CRASH_SEED`` replays a run. 10 rounds per database by
default (each costs a server start, ~7 s on a slow 2-core machine, and the suite must stay
under 15 minutes); ``PARLEY_CRASH_ROUNDS=100`` runs a longer campaign.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import free_port, serve_subprocess
from tests.server.crash_support import Load, integrity, kill_at_random, lost_exchanges, server_env

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("PARLEY_CRASH_ROUNDS") or 10)


def test_kill_9_at_random_moments_loses_no_acknowledged_exchange(
    tmp_path: Path, database_url: str
) -> None:
    seed = int(os.environ.get("PARLEY_CRASH_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    sqlite = database_url.startswith("sqlite")
    acked: list[str] = []
    pauses: list[float] = []
    with FakeOpenAI() as upstream:
        env = server_env(tmp_path, database_url, upstream.base_url)
        for round_number in range(ROUNDS + 1):
            port = free_port()
            log = f"round-{round_number}.log"
            with serve_subprocess(tmp_path, env, port, log) as process:
                where = f"seed {seed}, after round {round_number}"
                lost = lost_exchanges(database_url, acked)
                assert lost == [], f"{where}: {len(lost)} of {len(acked)} acknowledged lost"
                if sqlite:
                    assert integrity(database_url) == "ok", where
                if round_number == ROUNDS:
                    break
                load = Load(port, workers=6)
                load.start(f"r{round_number}")
                pauses.append(kill_at_random(process.pid, rng, 0.2, 1.2))
                process.wait(30)
                load.stop()
                acked.extend(load.acked)
    # The load got going: on average a few answers acknowledged per round.
    assert len(acked) > 2 * ROUNDS, f"seed {seed}: only {len(acked)} acknowledged"
    assert max(pauses) - min(pauses) > 0.2, "the kills were not spread out"
